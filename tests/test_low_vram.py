"""Small cards: a quantised frozen base (QLoRA), quantised encoders for caching, one encoder on the device at a time.

The LoRA trained on a quantised base must do to the stock, un-quantised pipeline what it did to the quantised
student; quantised encoders must change the contexts only a little.
"""

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import CONCEPT, TINY_ZIMAGE, lora_script as script, run_in_process, script_args
from safetensors.torch import load_file

import benchmarks.bench_memory as bench_memory
from diffusers import ZImagePipeline


def tiny_family(output_dir):
    """The un-quantised tiny Z-Image-Turbo family (float32, CPU), without its VLM."""
    args = script.parse_args(script_args(output_dir, TINY_ZIMAGE))
    script.ZImageTurbo.apply_defaults(args, script.TRAINING)
    return script.ZImageTurbo(args, torch.float32, torch.device("cpu"))


def one_image_concept(folder):
    folder.mkdir()
    for name in ("chelsea-1.jpg", "chelsea-1.txt"):
        shutil.copy(CONCEPT / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, monkeypatch_module):
    """One step on an nf4 base with int8 encoders; records which encoder was present for each context."""
    root = tmp_path_factory.mktemp("qlora")
    data = one_image_concept(root / "data")
    output_dir = root / "run"
    present = []
    family_class = script.ZImageTurbo
    encode, build = family_class.encode_student_context, family_class.build_teacher_context

    def encode_student_context(family, caption):
        present.append(("student", family.pipeline.text_encoder is not None, family.vlm is not None))
        return encode(family, caption)

    def build_teacher_context(family, image, caption):
        present.append(("teacher", family.pipeline.text_encoder is not None, family.vlm is not None))
        return build(family, image, caption)

    monkeypatch_module.setattr(family_class, "encode_student_context", encode_student_context)
    monkeypatch_module.setattr(family_class, "build_teacher_context", build_teacher_context)
    argv = script_args(output_dir, TINY_ZIMAGE, "--max_train_steps", 1, "--gradient_accumulation_steps", 1,
                       "--rollout_steps", 2, "--learning_rate", 1e-2, "--validation_inference_steps", 1,
                       "--quantize_base", "nf4", "--quantize_encoders", "int8", data=data)
    transformer = run_in_process(argv)
    return output_dir, data, transformer, present


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_caching_holds_one_large_encoder_at_a_time(qlora_run):
    """Student contexts (the prior prompts', then the image's) with the text encoder alone, then the grafted VLM
    alone for the teacher contexts."""
    _, _, _, present = qlora_run
    assert present == [("student", True, False)] * (len(script.PRIOR_PROMPTS) + 1) + [("teacher", False, True)]


def test_quantised_base_trains_and_its_lora_changes_the_stock_pipeline_the_same_way(qlora_run, tmp_path):
    """effect = prediction with the LoRA - prediction without it, same input. On the nf4 student and on the
    un-quantised stock transformer the LoRA adds B A x to the same layers; the two effects differ only through the
    quantisation error of the activations each layer sees (nf4: ~9 % per layer on these random weights), so they
    must point the same way (cosine > 0.9) with the same size (within 25 %)."""
    output_dir, data, transformer, _ = qlora_run
    assert type(transformer.layers[0].attention.to_q.base_layer).__name__ == "Linear4bit"
    # bitsandbytes' AVX512-BF16 repacking (which breaks on narrow layers) is off, so any CPU runs the same code
    quantised = [m for m in transformer.modules() if type(m).__name__ == "Linear4bit"]
    assert quantised and not any(m.support_avx512bf16_for_cpu for m in quantised)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantised)
    saved = load_file(output_dir / script.LORA_WEIGHT_NAME)
    assert any(value.abs().max() > 0 for key, value in saved.items() if "lora_B" in key)  # it trained

    family = tiny_family(tmp_path)
    latents = family.initial_noise(1, 64, 64, torch.Generator().manual_seed(0))
    timesteps, _ = family.rollout_schedule(4, 64, 64)
    context = family.collate([family.encode_student_context("a photo of sks cat lying on a wooden floor")])

    def effect(model):
        with torch.no_grad():
            with_lora = family.predict(model, latents, timesteps[1], context)
            model.disable_adapters()
            without = family.predict(model, latents, timesteps[1], context)
            model.enable_adapters()
        return with_lora - without

    quantised_effect = effect(transformer)
    pipe = ZImagePipeline.from_pretrained(TINY_ZIMAGE)
    pipe.load_lora_weights(output_dir)
    stock_effect = effect(pipe.transformer)
    cosine = torch.nn.functional.cosine_similarity(quantised_effect.flatten(), stock_effect.flatten(), dim=0)
    ratio = quantised_effect.norm() / stock_effect.norm()
    print(f"LoRA effect nf4 student vs stock pipeline: cosine {cosine:.4f}, norm ratio {ratio:.4f}")
    assert stock_effect.abs().max() > 1e-4
    assert cosine > 0.9 and 0.8 < ratio < 1.25


def test_quantised_encoders_change_the_contexts_a_little(qlora_run, tmp_path):
    """int8 text encoder and VLM against full precision: relative difference small but not zero."""
    output_dir, data, _, _ = qlora_run
    cached = {role: load_file(path) for role in ("student", "teacher")
              for path in (output_dir / "context_cache").glob(f"*.{role}.safetensors")}  # one image, one caption
    family = tiny_family(tmp_path)
    family.prepare_teacher_contexts(keep_text_encoder=True)
    args = script.parse_args(script_args(tmp_path, TINY_ZIMAGE, data=data))
    example = script.collect_examples(args, family.resolution_multiple)[0]
    with torch.no_grad():
        student = family.encode_student_context(example.caption)
        teacher = family.build_teacher_context(script.resize_to_bucket(example.load(), example.bucket),
                                               example.caption)
    for role, context in (("student", student), ("teacher", teacher)):
        reference = context["prompt_embeds"]
        difference = ((cached[role]["prompt_embeds"] - reference).norm() / reference.norm()).item()
        print(f"{role} context, int8 encoders vs full precision: relative difference {difference:.4f}")
        assert 0 < difference < 0.05


@pytest.mark.parametrize("method", ["int8", pytest.param("fp8", marks=pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="fp8 needs torchao (.ci/run installs it)"))])
def test_each_base_quantisation_keeps_the_prediction_close_and_the_lora_trainable(tmp_path, method):
    family = tiny_family(tmp_path)
    latents = family.initial_noise(1, 64, 64, torch.Generator().manual_seed(0))
    timesteps, _ = family.rollout_schedule(4, 64, 64)
    context = family.collate([{"prompt_embeds": torch.randn(8, family.transformer.config.cap_feat_dim)}])
    with torch.no_grad():
        reference = family.predict(family.transformer, latents, timesteps[1], context)
    expected = len(script.repeated_block_linears(family.transformer))
    assert script.quantize_linear_layers(family.transformer, method, torch.device("cpu"), torch.float32) == expected
    weight = family.transformer.layers[0].attention.to_q.weight
    assert weight.dtype == torch.int8 if method == "int8" else type(weight).__name__ == "Float8Tensor"
    family.transformer.add_adapter(script.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                     target_modules=["to_q", "feed_forward.w1"]))
    lora = [p for p in family.transformer.parameters() if p.requires_grad]
    prediction = family.predict(family.transformer, latents, timesteps[1], context)
    difference = ((prediction - reference).norm() / reference.norm()).item()
    print(f"{method} base: prediction relative difference {difference:.4f}")
    assert 0 < difference < 0.1
    prediction.square().mean().backward()
    assert all(p.grad is not None for p in lora) and any(p.grad.abs().max() > 0 for p in lora)


def test_memory_benchmark_rows_and_fp16_check_run_on_the_cpu(tmp_path):
    """The GPU benchmark's code path, on the tiny klein (no memory figures or caps on the CPU)."""
    common = ["--models", "tiny-klein", "--resolutions", "64", "--rollout_steps", "1", "--repeats", "1", "--rank", "4",
              "--lora_alpha", "4", "--output_dir", str(tmp_path)]
    rows, _ = bench_memory.main([*common, "--quantize_base", "none", "nf4"])
    assert [r["quantize_base"] for r in rows] == ["none", "nf4"]
    assert rows[0]["prediction_rel_diff_vs_bf16"] == 0 < rows[1]["prediction_rel_diff_vs_bf16"] < 0.2
    assert all(r["iteration_s"] > 0 and r["peak_GiB"] is None and r["fits_12GB"] is None for r in rows)
    offloaded, _ = bench_memory.main([*common, "--quantize_base", "none", "--offload"])  # the hooks, host to host
    assert offloaded[0]["offload"] and offloaded[0]["prediction_rel_diff_vs_bf16"] == 0
    rows += offloaded
    _, fp16_rows = bench_memory.main([*common, "--fp16_check", "2"])
    assert fp16_rows[0]["fp16_iterations"] == 2 and fp16_rows[0]["fp16_nonfinite_losses"] == 0
    assert fp16_rows[0]["fp16_max_block_output"] > 0
    written = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert written == rows + fp16_rows
    assert "| tiny-klein | no | 64² | 1 | 2 | 0 | 0 |" in (tmp_path / "memory.md").read_text()


def test_memory_benchmark_whole_run_reports_every_phase_on_the_cpu(tmp_path):
    """--whole_run: the trainer itself, in a fresh process, with host memory per phase (no accelerator here)."""
    rows = bench_memory.main(["--models", "tiny-klein", "--resolutions", "64", "--rollout_steps", "1", "--rank", "4",
                              "--lora_alpha", "4", "--whole_run", "--output_dir", str(tmp_path)])
    assert [r["phase"] for r in rows] == ["load", "student contexts", "teacher contexts", "load transformer",
                                          "training", "outputs"]
    assert all(0 < r["peak_anonymous_GiB"] <= r["peak_rss_GiB"] and r["peak_gpu_GiB"] is None for r in rows)
    assert "| tiny-klein | (defaults) | 64² | training |" in (tmp_path / "phases.md").read_text()
