"""FLUX.2-klein behind the same seam (docs/method.md §3-§5): inference schedule, edit and VLM teachers, LoRA targets."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_KLEIN, add_random_lora, load_family, lora_script as script, train_in_process


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_schedule_is_the_pipelines_not_the_released_codes(tmp_path):
    _, family = load_family(tmp_path, TINY_KLEIN)
    _, sigmas = family.rollout_schedule(4, 1024, 1024)
    # docs/method.md §4: linspace sigmas with dynamic shift mu(4096 tokens, 4 steps) -> 1, 0.967, 0.908, 0.767 -> 0 ...
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.9674, 0.9081, 0.7672, 0.0]), atol=1e-4, rtol=0)
    # ... not the released code's set_timesteps(4, mu=mu) grid, 1, 0.952, 0.832, 0.010
    released = script.FlowMatchEulerDiscreteScheduler.from_config(family.scheduler.config)
    released.set_timesteps(4, mu=script.compute_empirical_mu(4096, 4))
    assert abs(float(released.sigmas[3]) - 0.0098) < 1e-3 and abs(float(sigmas[3]) - 0.7672) < 1e-3


@pytest.mark.parametrize("height,width", [(64, 64), (64, 128)])
def test_rollout_reproduces_the_stock_pipeline_latents(tmp_path, accelerator, height, width):
    """Same noise and a non-zero LoRA: the training roll-out ends where Flux2KleinPipeline ends, at two sizes."""
    args, family = load_family(tmp_path, TINY_KLEIN)
    lora = add_random_lora(family.transformer, args)
    ema = script.EMATeacher([(str(i), p) for i, p in enumerate(lora)], 0.9999)
    example = script.collect_examples(args, family.resolution_multiple)[0]
    example.bucket = (height, width)
    contexts = script.ContextStore(family, [example], accelerator, args.output_dir).compute(example)
    batch = script.collate_examples([{**contexts, "bucket": (height, width)}])
    student = contexts["student"]
    _, latents = script.dopsd_step(family, family.transformer, family.transformer, ema, batch, accelerator,
                                   args.rollout_steps, args.loss_space,
                                   torch.Generator().manual_seed(5))
    expected = family.pipeline(prompt_embeds=student["prompt_embeds"][None], height=height, width=width,
                               num_inference_steps=args.rollout_steps, output_type="latent", guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(5)).images
    got = family.unnormalize(latents)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    family.transformer.disable_adapters()
    base = family.pipeline(prompt_embeds=student["prompt_embeds"][None], height=height, width=width,
                           num_inference_steps=args.rollout_steps, output_type="latent", guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(5)).images
    assert (base - expected).abs().max() > 1e-3


def test_edit_teacher_is_the_pipelines_reference_image_path(tmp_path):
    """The reference tokens/ids equal what the stock pipeline builds for image=[target], and the teacher's output on
    the noisy tokens equals the stock transformer call with that reference."""
    args, family = load_family(tmp_path, TINY_KLEIN)
    example = script.collect_examples(args, family.resolution_multiple)[1]
    image = script.resize_to_bucket(example.load(), example.bucket)
    context = family.build_teacher_context(image, example.caption)
    height, width = example.bucket
    calls = []

    def record(module, call_args, kwargs, output):
        calls.append((kwargs, output[0].detach().clone()))

    handle = family.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        family.pipeline(image=[image], prompt_embeds=context["prompt_embeds"][None], height=height, width=width,
                        num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    kwargs, output = calls[1]  # the second step: a state the pipeline itself produced
    num_noisy = (height // 16) * (width // 16)
    assert kwargs["hidden_states"].shape[1] == num_noisy + context["image_latents"].shape[0]
    torch.testing.assert_close(kwargs["hidden_states"][0, num_noisy:], context["image_latents"])
    torch.testing.assert_close(kwargs["img_ids"][0, num_noisy:], context["image_latent_ids"])
    assert int(context["image_latent_ids"][:, 0].unique()) == 10  # the first reference image's time offset
    # teacher caption = caption + suffix (docs/method.md §3.2)
    suffixed = family.encode_caption(f"{example.caption} {args.teacher_prompt_suffix}")
    torch.testing.assert_close(context["prompt_embeds"], suffixed)
    # the teacher's prediction at the pipeline's state, sliced to the noisy tokens
    noisy = kwargs["hidden_states"][:, :num_noisy]
    latents = noisy.permute(0, 2, 1).reshape(1, -1, height // 16, width // 16)
    timestep = kwargs["timestep"][0] * 1000
    velocity = family.predict(family.transformer, latents, timestep, family.collate([context]))
    torch.testing.assert_close(velocity, output[:, :num_noisy].permute(0, 2, 1).reshape(velocity.shape))


def test_grafted_vlm_reproduces_klein_text_features(tmp_path):
    _, family = load_family(tmp_path, TINY_KLEIN, "--teacher_context", "vlm")
    caption = "a close-up photo of sks cat"
    student = family.encode_student_context(caption)["prompt_embeds"]
    text = family.pipeline.tokenizer.apply_chat_template(
        [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    hidden_states, _ = family.vlm.hidden_states(text, max_length=family.args.max_sequence_length)
    stacked = torch.cat([hidden_states[k][0] for k in (9, 18, 27)], dim=-1)
    assert stacked.shape == student.shape == (512, 3 * 32)
    # interleaved per token as the pipeline stacks them: [layer 9 | layer 18 | layer 27]
    torch.testing.assert_close(stacked, student, rtol=1e-5, atol=1e-5)


def test_max_sequence_length_is_the_pipelines_and_keys_the_cache(tmp_path):
    _, short = load_family(tmp_path, TINY_KLEIN, "--max_sequence_length", "64")
    caption = "a close-up photo of sks cat"
    embeds = short.encode_student_context(caption)["prompt_embeds"]
    expected, _ = short.pipeline.encode_prompt(caption, device="cpu", max_sequence_length=64)
    assert embeds.shape == (64, 3 * 32)
    torch.testing.assert_close(embeds, expected[0])
    _, default = load_family(tmp_path / "default", TINY_KLEIN)
    assert default.context_fingerprint()["max_sequence_length"] == 512  # the pipelines' default
    assert short.context_fingerprint()["max_sequence_length"] == 64


def test_vlm_teacher_context_holds_the_image_and_batches(tmp_path):
    args, family = load_family(tmp_path, TINY_KLEIN, "--teacher_context", "vlm")
    examples = script.collect_examples(args, family.resolution_multiple)
    first, other = examples[1], examples[2]  # two captions of the same image
    image = script.resize_to_bucket(first.load(), first.bucket)
    context = family.build_teacher_context(image, first.caption)["prompt_embeds"]
    _, num_image_tokens = family.vlm.vision_inputs(image)
    assert context.shape == (512 + num_image_tokens, 96)
    # same bucket -> same length, so a batch stacks
    second = family.build_teacher_context(image, other.caption)
    assert family.collate([{"prompt_embeds": context}, second])["prompt_embeds"].shape[0] == 2


def test_default_lora_targets_all_exist_in_the_flux2_transformer(tmp_path):
    args, family = load_family(tmp_path, TINY_KLEIN)
    targets = script.resolve_lora_targets(family.transformer, args.lora_layers)
    assert all(isinstance(family.transformer.get_submodule(t), torch.nn.Linear) for t in targets)
    covered = {t.split(".", 2)[2] if t.startswith(("transformer_blocks", "single_transformer_blocks")) else t
               for t in targets}
    assert covered == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out",
    }
    assert len(targets) == 12 * 1 + 2 * 1  # one double block, one single block in the tiny model


@pytest.mark.parametrize("teacher", ["edit", "vlm"])
def test_a_short_run_closes_the_student_teacher_gap_on_heldout_noise(tmp_path, accelerator, teacher):
    heldout_seeds = range(1000, 1003)

    def gap_after(steps):
        args, family = load_family(tmp_path, TINY_KLEIN, "--rank", 16, "--lora_alpha", 16, "--teacher_context", teacher)
        examples = script.collect_examples(args, family.resolution_multiple)
        ema, dataset = train_in_process(family, args, examples, accelerator, steps=steps, learning_rate=1e-3)
        return np.mean([script.heldout_teacher_gap(family, family.transformer, ema, script.collate_examples([item]),
                                                   args.rollout_steps, heldout_seeds) for item in dataset])

    before, after = gap_after(0), gap_after(20)
    assert before > 0 and after <= 0.7 * before, (before, after)


def test_vlm_teacher_default_matches_the_text_encoder_size(tmp_path):
    _, family = load_family(tmp_path, TINY_KLEIN)
    config = family.pipeline.text_encoder.config
    for hidden, expected in ((2560, "Qwen/Qwen3-VL-4B-Instruct"), (4096, "Qwen/Qwen3-VL-8B-Instruct")):
        config.hidden_size = hidden  # klein-4B uses Qwen3-4B (2560), klein-9B Qwen3-8B (4096)
        assert family.default_teacher_vlm() == expected


@pytest.mark.parametrize("resolution", [1024, 1536])
def test_reference_image_is_the_pipelines_for_every_bucket(tmp_path, resolution):
    """The pipeline caps a reference image at 1024^2 pixels before encoding it (and crops it to a multiple of 16):
    for every aspect bucket the teacher's reference pixels equal those the stock pipeline prepares for image=[target]
    (at --resolution 1024 two buckets exceed 1 MP; at 1536 all do)."""
    _, family = load_family(tmp_path, TINY_KLEIN)
    family.load_transformer()  # the stock pipeline calls it; the family loads it only when first used
    captured = []

    def capture(images, **kwargs):
        captured.append(images[0])
        raise StopIteration  # nothing past the preprocessing is needed

    buckets = script.generate_aspect_ratio_buckets(resolution, divisibility=16)
    prompt_embeds = torch.zeros(1, 8, 96)
    over = 0
    for height, width in buckets:
        image = script.Image.fromarray(np.random.default_rng(height).integers(0, 255, (height, width, 3), np.uint8))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(family.pipeline, "prepare_image_latents", capture)
            with pytest.raises(StopIteration):
                family.pipeline(image=[image], prompt_embeds=prompt_embeds, height=height, width=width,
                                num_inference_steps=1)
        ours = family.reference_pixels(image)
        assert ours.shape == captured[-1].shape, (height, width)
        torch.testing.assert_close(ours, captured[-1])
        assert ours.shape[-2] * ours.shape[-1] <= 1024 * 1024
        over += height * width > 1024 * 1024
    assert over == (2 if resolution == 1024 else len(buckets))
