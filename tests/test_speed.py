"""The speed levers keep the method's numerics: LoRA passes without peft's fp32 input cast, a compile that falls back
to eager, and the klein edit teacher's smaller reference image."""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    TINY_KLEIN,
    TINY_ZIMAGE,
    load_family,
    lora_script as script,
    run_in_process,
    script_args,
)
from PIL import Image
from safetensors.torch import load_file


def test_lora_without_the_fp32_input_cast_predicts_what_the_cast_path_did(tmp_path):
    """bf16 transformer, fp32 LoRA, bf16 autocast (as training runs it): skipping peft's cast changes nothing
    beyond bf16 rounding, and the trained weights stay fp32."""
    args, family = load_family(tmp_path, TINY_ZIMAGE)
    family.transformer.to(torch.bfloat16)
    mixed = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16", native_amp=True)
    transformer, _ = script.prepare_student(args, family, mixed)
    lora = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    with torch.no_grad():
        for name, parameter in lora.items():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    layers = [m for m in transformer.modules() if isinstance(m, script.BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    latents = family.initial_noise(1, 64, 64, torch.Generator().manual_seed(0))
    timesteps, _ = family.rollout_schedule(4, 64, 64)
    context = family.collate([family.encode_student_context("a photo of sks cat")])

    def predict():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return family.predict(transformer, latents, timesteps[1], context)

    cast_free = predict()
    for layer in layers:
        layer.cast_input_dtype_enabled = True  # the path before: every LoRA input cast to fp32
    with_cast = predict()
    assert (cast_free - with_cast).abs().max() <= 0.02 * with_cast.abs().max()
    ema = script.EMATeacher(list(lora.items()), 0.9)
    ema.update()
    assert {s.dtype for s in ema.shadow} == {torch.float32}
    assert {t.dtype for t in script.get_peft_model_state_dict(transformer).values()} == {torch.float32}


def test_a_failing_compile_warns_once_and_trains_eager(tmp_path, monkeypatch, caplog):
    """The first compiled call fails (a backend that raises): one warning line, and the run ends with exactly the
    weights of an eager run."""
    import torch._dynamo

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(script.CompiledBlocks, "backend", staticmethod(broken_backend))
    outputs = {}
    for flag in ("--no-compile", "--compile"):  # one output folder: the second run reuses the contexts
        with caplog.at_level(logging.WARNING):
            try:
                run_in_process(script_args(
                    tmp_path, TINY_ZIMAGE, "--max_train_steps", 1, "--gradient_accumulation_steps", 1,
                    "--rollout_steps", 2, "--validation_inference_steps", 1, "--learning_rate", 1e-3, flag,
                    "--overwrite_output_dir"))
            finally:
                torch._dynamo.reset()
        outputs[flag] = load_file(tmp_path / script.LORA_WEIGHT_NAME)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "no compiler here" in warnings[0]
    eager, fallback = outputs.values()
    assert eager.keys() == fallback.keys()
    for key in eager:
        assert torch.equal(eager[key], fallback[key]), key


def test_compile_is_off_by_default_on_cpu_and_can_be_forced():
    assert script.compile_by_default(torch.device("cpu")) is False
    assert script.parse_args(script_args("out", TINY_ZIMAGE)).compile is None
    assert script.parse_args(script_args("out", TINY_ZIMAGE, "--compile")).compile is True
    assert script.parse_args(script_args("out", TINY_ZIMAGE, "--no-compile")).compile is False


def test_reference_resolution_shrinks_the_edit_teachers_reference_tokens(tmp_path):
    _, full = load_family(tmp_path, TINY_KLEIN, "--resolution", 128)
    args, family = load_family(tmp_path, TINY_KLEIN, "--resolution", 128, "--reference_resolution", 64)
    image = Image.new("RGB", (128, 128), (200, 120, 40))
    reference = family.build_teacher_context(image, "a photo of sks cat")["image_latents"]
    assert reference.shape[0] * 4 == full.build_teacher_context(image, "a photo of sks cat")["image_latents"].shape[0]
    # A non-square bucket keeps its aspect ratio; its ids are the pipeline's for a reference image of that size.
    wide = Image.new("RGB", (160, 96), (10, 90, 160))
    assert family.reference_size(96, 160) == (48, 80)
    context = family.build_teacher_context(wide, "a photo of sks cat")
    small = script.image_to_tensor(wide.resize((80, 48), Image.Resampling.LANCZOS))
    latents, ids = family.pipeline.prepare_image_latents([small], batch_size=1, generator=None,
                                                         device=family.device, dtype=family.pipeline.vae.dtype)
    assert context["image_latents"].shape == latents[0].shape == ((48 // 16) * (80 // 16), latents.shape[-1])
    assert torch.equal(context["image_latent_ids"], ids[0])
    # The contexts differ, so the cache must not mix them up.
    examples = script.collect_examples(args, family.resolution_multiple)
    stores = [script.ContextStore(f, examples, SimpleNamespace(), a.output_dir) for a, f in
              ((load_family(tmp_path, TINY_KLEIN, "--resolution", 128)[0], full), (args, family))]
    assert stores[0].path(examples[0]) != stores[1].path(examples[0])


@pytest.mark.parametrize("model, extra", [(TINY_ZIMAGE, ()), (TINY_KLEIN, ("--teacher_context", "vlm"))])
def test_reference_resolution_is_refused_without_the_edit_teacher(tmp_path, model, extra):
    with pytest.raises(script.UserError, match="--reference_resolution applies to FLUX.2-klein's edit teacher only"):
        load_family(tmp_path, model, "--reference_resolution", 64, *extra)
