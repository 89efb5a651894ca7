"""The method's claims (docs/method.md §2-§4) on the tiny Z-Image-Turbo: on-policy roll-out, teacher context, EMA,
loss."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import (TINY_RESOLUTION, TINY_ZIMAGE, add_random_lora, load_family, lora_script as script,
                      student_and_differing_teacher, train_in_process)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def example_batch(family, store, index=0):
    return script.collate_examples([store[index]])


def test_rollout_schedule_is_the_pipelines_for_k_steps(tmp_path):
    _, family = load_family(tmp_path)
    _, sigmas = family.rollout_schedule(4, 1024, 1024)
    # docs/method.md §4: N=4 -> 1, 0.9, 0.75, 0.5 -> 0 (shift 3.0, no dynamic shift)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


@pytest.mark.parametrize("steps", [1, 4])
def test_rollout_reproduces_the_stock_pipeline_latents(tmp_path, accelerator, steps):
    """On-policy exactness: same noise, current student weights -> the pipeline's own K-step latents."""
    args, family = load_family(tmp_path, TINY_ZIMAGE, "--rollout_steps", steps)
    examples = script.collect_examples(args, family.resolution_multiple)
    store = script.ContextStore(family, examples, accelerator, args.output_dir)
    store.fill()
    add_random_lora(family.transformer, args)
    ema = script.EMATeacher([(n, p) for n, p in family.transformer.named_parameters() if p.requires_grad], 0.9999)
    batch = example_batch(family, store)
    height, width = batch["bucket"]

    generator = torch.Generator().manual_seed(123)
    _, latents = script.dopsd_step(family, family.transformer, family.transformer, ema, batch, accelerator,
                                   args.rollout_steps, args.loss_space,
                                   generator)
    expected = family.pipeline(
        prompt_embeds=[batch["student"][0]["prompt_embeds"]], height=height, width=width,
        num_inference_steps=steps, guidance_scale=0.0, output_type="latent",
        generator=torch.Generator().manual_seed(123),
    ).images
    assert latents.shape == expected.shape
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    # and the LoRA matters: the base model's roll-out is different
    family.transformer.disable_adapters()
    base = family.pipeline(prompt_embeds=[batch["student"][0]["prompt_embeds"]], height=height, width=width,
                           num_inference_steps=steps, guidance_scale=0.0, output_type="latent",
                           generator=torch.Generator().manual_seed(123)).images
    assert (base - expected).abs().max() > 1e-3


def test_grafted_vlm_reproduces_the_text_encoder_text_only(tmp_path):
    _, family = load_family(tmp_path)
    caption = "a photo of sks cat lying on a wooden floor"
    student = family.encode_student_context(caption)["prompt_embeds"]
    text = family.pipeline.tokenizer.apply_chat_template(
        [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    hidden_states, mask = family.vlm.hidden_states(text)
    torch.testing.assert_close(hidden_states[-2][0][mask], student, rtol=1e-5, atol=1e-5)
    # the language model really is the text encoder's (and not the VLM's own random weights)
    vlm_embed = family.vlm.vlm.model.language_model.embed_tokens.weight
    torch.testing.assert_close(vlm_embed, family.pipeline.text_encoder.embed_tokens.weight)


def test_teacher_context_holds_the_image(tmp_path):
    args, family = load_family(tmp_path)
    example = script.collect_examples(args, family.resolution_multiple)[0]
    image = script.resize_to_bucket(example.load(), example.bucket)
    teacher = family.build_teacher_context(image, example.caption)["prompt_embeds"]
    student = family.encode_student_context(example.caption)["prompt_embeds"]
    _, num_image_tokens = family.vlm.vision_inputs(image)
    # each image token covers 32x32 pixels; the processor keeps the image between 512^2 and 768^2 pixels
    # (docs/method.md §3.1)
    assert 512 * 512 <= num_image_tokens * 32 * 32 <= 768 * 768
    assert teacher.shape[0] == student.shape[0] + num_image_tokens + 2
    # another image gives another teacher context for the same caption
    flipped = family.build_teacher_context(image.transpose(0), example.caption)["prompt_embeds"]
    assert (flipped - teacher).abs().max() > 1e-4


def test_teacher_context_is_capped_to_what_the_transformer_can_place(tmp_path):
    """Captions sit at RoPE positions 1..padded length and the image after them: 992 tokens fit an axis of 1024."""
    _, family = load_family(tmp_path)
    assert family.transformer.config.axes_lens[0] == 1024 and family.max_teacher_tokens == 992
    latents = family.initial_noise(1, TINY_RESOLUTION, TINY_RESOLUTION)
    timesteps, _ = family.rollout_schedule(4, TINY_RESOLUTION, TINY_RESOLUTION)
    width = family.transformer.config.cap_feat_dim
    context = {"prompt_embeds": [torch.randn(family.max_teacher_tokens, width)]}
    assert family.predict(family.transformer, latents, timesteps[0], context).shape == latents.shape
    with pytest.raises(IndexError):
        family.predict(family.transformer, latents, timesteps[0], {"prompt_embeds": [torch.randn(1024, width)]})


def test_cached_contexts_equal_fresh_ones(tmp_path, accelerator):
    args, family = load_family(tmp_path)
    examples = script.collect_examples(args, family.resolution_multiple)
    store = script.ContextStore(family, examples, accelerator, args.output_dir)
    # two captions of one image are two cache entries with two contexts (the caption is part of the key)
    first, second = next(pair for pair in zip(examples, examples[1:]) if pair[0].image_index == pair[1].image_index)
    assert first.caption != second.caption and store.path(first, "teacher") != store.path(second, "teacher")
    store.fill()
    # one file per role of each example: 4 images, 2 with 2 captions
    assert len(list(store.folder.glob("*.teacher.safetensors"))) == len(examples) == 6
    assert len(list(store.folder.glob("*.safetensors"))) == 2 * len(examples)
    for role in ("student", "teacher"):
        assert not torch.equal(store.get(first)[role]["prompt_embeds"], store.get(second)[role]["prompt_embeds"])
    for example in examples:
        cached, fresh = store.get(example), store.compute(example)
        assert cached.keys() == fresh.keys() == {"student", "teacher"}
        for role in cached:
            assert cached[role].keys() == fresh[role].keys()
            for key in cached[role]:
                torch.testing.assert_close(cached[role][key], fresh[role][key])


def test_ema_teacher_is_the_closed_form_ema():
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    history = [[p.detach().clone() for p in parameters]]
    decay = 0.9
    ema = script.EMATeacher(zip("ab", parameters), decay)
    frozen = script.EMATeacher(zip("ab", parameters), 1.0)
    for _ in range(7):
        with torch.no_grad():
            for p in parameters:
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in parameters])
        ema.update()
        frozen.update()
    n = len(history) - 1
    for i, shadow in enumerate(ema.shadow):
        # theta_bar_n = d^n theta_0 + sum_{j=1..n} (1 - d) d^(n-j) theta_j
        expected = decay**n * history[0][i] + sum((1 - decay) * decay ** (n - j) * history[j][i]
                                                  for j in range(1, n + 1))
        torch.testing.assert_close(shadow, expected)
        torch.testing.assert_close(frozen.shadow[i], history[0][i])


def test_teacher_swap_is_free_and_restores_the_student():
    parameters = [torch.nn.Parameter(torch.randn(3, 4))]
    ema = script.EMATeacher([("a", parameters[0])], 0.5)
    with torch.no_grad():
        parameters[0].add_(1.0)
    student = parameters[0].detach().clone()
    with ema.swapped_in():
        assert parameters[0].data_ptr() == ema.shadow[0].data_ptr()  # no copy
        torch.testing.assert_close(parameters[0].detach(), ema.shadow[0])
    torch.testing.assert_close(parameters[0].detach(), student)


def test_x0_loss_is_sigma_squared_weighted_velocity_loss():
    generator = torch.Generator().manual_seed(0)
    latents, student, teacher = (torch.randn(2, 16, 8, 8, generator=generator) for _ in range(3))
    for sigma in (1.0, 0.75, 0.1):
        x0 = script.dopsd_loss(student, teacher, latents, torch.tensor(sigma), "x0")
        v = script.dopsd_loss(student, teacher, latents, torch.tensor(sigma), "v")
        torch.testing.assert_close(x0, sigma**2 * v)


def test_per_step_backward_gives_the_gradient_of_the_mean(tmp_path, accelerator):
    args, family = load_family(tmp_path)
    store, lora, ema = student_and_differing_teacher(family, args, accelerator)
    batch = example_batch(family, store)
    loss, _ = script.dopsd_step(family, family.transformer, family.transformer, ema, batch, accelerator,
                                args.rollout_steps, args.loss_space,
                                torch.Generator().manual_seed(7))
    per_step = [p.grad.clone() for p in lora]
    for p in lora:
        p.grad = None

    # Reference: every step's graph kept alive, one backward over the mean of the K losses.
    height, width = batch["bucket"]
    timesteps, sigmas = family.rollout_schedule(args.rollout_steps, height, width)
    student_context, teacher_context = family.collate(batch["student"]), family.collate(batch["teacher"])
    latents = family.initial_noise(1, height, width, torch.Generator().manual_seed(7))
    losses = []
    for k in range(args.rollout_steps):
        with torch.no_grad(), ema.swapped_in():
            teacher_velocity = family.predict(family.transformer, latents, timesteps[k], teacher_context)
        student_velocity = family.predict(family.transformer, latents, timesteps[k], student_context)
        losses.append(script.dopsd_loss(student_velocity, teacher_velocity, latents, sigmas[k], "x0"))
        latents = latents + (sigmas[k + 1] - sigmas[k]) * student_velocity.detach()
    reference_loss = torch.stack(losses).mean()
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss.detach())
    assert sum(g.abs().sum() for g in per_step) > 0
    for got, expected in zip(per_step, (p.grad for p in lora)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)


def test_a_short_run_closes_the_student_teacher_gap_on_heldout_noise(tmp_path, accelerator):
    """It learns: the x0 gap along the student's own roll-outs from unseen seeds falls by at least 30 %."""
    heldout_seeds = range(1000, 1003)  # training noise comes from seed 0's generator

    def gap_after(steps):
        args, family = load_family(tmp_path, TINY_ZIMAGE, "--rank", 16, "--lora_alpha", 16)
        examples = script.collect_examples(args, family.resolution_multiple)
        ema, dataset = train_in_process(family, args, examples, accelerator, steps=steps, learning_rate=1e-3)
        return sum(script.heldout_teacher_gap(family, family.transformer, ema, script.collate_examples([item]),
                                              args.rollout_steps, heldout_seeds) for item in dataset) / len(dataset)

    before, after = gap_after(0), gap_after(20)
    assert before > 0 and after <= 0.7 * before, (before, after)


def test_copy_swap_for_weights_of_another_dtype_restores_the_student_in_place():
    """Weights in another dtype than the fp32 EMA (DeepSpeed's bf16 copy; fp64 here) swap by copying in place: the
    parameters keep their storage (no second model on the GPU)."""
    parameters = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)),
                  torch.nn.Parameter(torch.randn(6, dtype=torch.float64))]
    ema = script.EMATeacher(zip("ab", parameters), 0.5)
    with torch.no_grad():
        for p in parameters:
            p.add_(1.0)
    ema.update()
    students = [p.detach().clone() for p in parameters]
    pointers = [p.data_ptr() for p in parameters]
    with ema.swapped_in():
        assert [p.data_ptr() for p in parameters] == pointers
        for p, shadow in zip(parameters, ema.shadow):
            torch.testing.assert_close(p.detach(), shadow.double())
    assert [p.data_ptr() for p in parameters] == pointers
    for p, student in zip(parameters, students):
        assert torch.equal(p.detach(), student)


def test_single_backward_mode_gives_the_same_gradient(tmp_path, accelerator):
    """DeepSpeed's one-backward-per-micro-batch arrangement trains exactly what per-step backward trains."""
    args, family = load_family(tmp_path)
    store, lora, ema = student_and_differing_teacher(family, args, accelerator)
    batch = example_batch(family, store, 2)
    grads, losses = [], []
    for per_step in (True, False):
        loss, _ = script.dopsd_step(family, family.transformer, family.transformer, ema, batch, accelerator,
                                    args.rollout_steps, args.loss_space,
                                    torch.Generator().manual_seed(3), backward_per_step=per_step)
        grads.append([p.grad.clone() for p in lora])
        losses.append(loss)
        for p in lora:
            p.grad = None
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_validation_renders_the_teachers_view_with_the_teachers_context(tmp_path, accelerator):
    """The teacher-view image is the EMA teacher's roll-out conditioned on [image, caption] of the first example, not
    on its caption alone."""
    args, family = load_family(tmp_path, TINY_ZIMAGE, "--validation_inference_steps", 2)
    examples = script.collect_examples(args, family.resolution_multiple)
    store, validation = script.cache_contexts(args, family, examples, accelerator)
    add_random_lora(family.transformer, args)
    ema = script.EMATeacher([(n, p) for n, p in family.transformer.named_parameters() if p.requires_grad], 0.9)
    logged, _ = script.log_validation(family, family.transformer, ema, validation, args, accelerator, step=1)
    (teacher_view,) = logged[f"teacher view: {examples[0].caption}"]

    def view(role):
        generator = torch.Generator().manual_seed(args.seed)
        with ema.swapped_in():
            latents = script.sample(family, family.transformer, validation["teacher_view"][role],
                                    *examples[0].bucket, 2, generator)
        return np.asarray(family.decode(latents)[0], dtype=np.int16)

    teacher, student = view("teacher"), view("student")
    assert np.abs(teacher - student).max() > 0
    assert np.array_equal(np.asarray(teacher_view, dtype=np.int16), teacher)
