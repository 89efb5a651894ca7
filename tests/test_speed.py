"""The speed levers keep the method's numerics: LoRA passes without peft's fp32 input cast, a compile that falls back
to eager, and the klein edit teacher's smaller reference image."""

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    CONCEPT,
    TINY_KLEIN,
    TINY_ZIMAGE,
    load_family,
    lora_script as script,
    run_in_process,
    script_args,
)
from PIL import Image
from safetensors.torch import load_file
from torch.compiler._cache import CacheArtifact, CacheArtifactFactory, CacheArtifactManager


def test_lora_without_the_fp32_input_cast_predicts_what_the_cast_path_did(tmp_path):
    """bf16 transformer, fp32 LoRA, bf16 autocast (as training runs it): skipping peft's cast changes nothing
    beyond bf16 rounding, and the trained weights stay fp32."""
    args, family = load_family(tmp_path, TINY_ZIMAGE)
    family.transformer.to(torch.bfloat16)
    mixed = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16", native_amp=True)
    targets = script.resolve_lora_targets(family.transformer, args.lora_layers)
    transformer, _ = script.prepare_student(args, family, mixed, targets)
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


def broken_forward(graph, example_inputs):
    raise RuntimeError("no compiler here")


def broken_backward(graph, example_inputs):
    """Compiles the forward; the backward's compile (which AOTAutograd does lazily, in the backward) fails."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def refuse(graph, example_inputs):
        raise RuntimeError("no backward compiler here")

    return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), bw_compiler=refuse)(graph, example_inputs)


def broken_recompile(graph, example_inputs):
    """aot_eager until the first micro-batch is done; a graph compiled after it (here: the last batch of a bucket,
    one sample where the others had two) fails."""
    if broken_recompile.micro_batches > 1:
        broken_recompile.failures += 1
        raise RuntimeError("no recompile here")
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(graph, example_inputs)


@pytest.fixture(scope="module")
def three_images(tmp_path_factory):
    """Three square images at batch size 2: one bucket whose batches hold 2 and 1 samples, so the second
    micro-batch compiles a new graph (dynamo specialises a size of 1)."""
    folder = tmp_path_factory.mktemp("three-images")
    for index in (1, 2, 3):
        for suffix in (".jpg", ".txt"):
            shutil.copy(CONCEPT / f"chelsea-{index}{suffix}", folder)
    return folder


def fallback_run(output_dir, data, flag):
    run_in_process(script_args(
        output_dir, TINY_ZIMAGE, "--max_train_steps", 1, "--gradient_accumulation_steps", 2, "--train_batch_size", 2,
        "--rollout_steps", 2, "--validation_inference_steps", 1, "--learning_rate", 1e-3, flag,
        "--overwrite_output_dir", data=data))
    return load_file(output_dir / script.LORA_WEIGHT_NAME)


@pytest.fixture(scope="module")
def eager_weights(tmp_path_factory, three_images):
    output_dir = tmp_path_factory.mktemp("fallback")  # one folder for every run: they reuse its contexts
    return output_dir, fallback_run(output_dir, three_images, "--no-compile")


@pytest.mark.parametrize("backend, message", [(broken_forward, "no compiler here"),
                                              (broken_backward, "no backward compiler here"),
                                              (broken_recompile, "no recompile here")])
def test_a_failing_compile_warns_once_and_trains_eager(eager_weights, three_images, backend, message, monkeypatch,
                                                       caplog):
    """The compile fails in the first forward, in the first backward (AOTAutograd compiles it lazily, in
    accelerator.backward), or only at the recompile of the second micro-batch: one warning line, the accumulation
    window runs again eager, and the run ends with exactly the weights of an eager run."""
    import torch._dynamo

    output_dir, eager = eager_weights
    broken_recompile.micro_batches, broken_recompile.failures = 0, 0
    micro_batch = script.CompiledBlocks.micro_batch

    def counted(self, *args):
        broken_recompile.micro_batches += 1
        return micro_batch(self, *args)

    monkeypatch.setattr(script.CompiledBlocks, "micro_batch", counted)
    monkeypatch.setattr(script.CompiledBlocks, "backend", staticmethod(backend))
    with caplog.at_level(logging.WARNING):
        try:
            fallback = fallback_run(output_dir, three_images, "--compile")
        finally:
            torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and message in warnings[0]
    if backend is broken_recompile:
        assert broken_recompile.failures == 1  # the first micro-batch compiled and ran; the second's graph failed
    assert eager.keys() == fallback.keys()
    for key in eager:
        assert torch.equal(eager[key], fallback[key]), key


def test_an_error_that_eager_repeats_is_raised(tmp_path):
    """The eager retry is the test of attribution: an error that is not the compiler's comes back, and is raised."""
    blocks = script.CompiledBlocks(None, False)
    blocks.enabled, blocks.transformer = True, torch.nn.Linear(2, 2)
    calls = []

    def work():
        calls.append(blocks.enabled)
        raise ValueError("a bug of our own")

    with pytest.raises(ValueError, match="a bug of our own"):
        blocks.call(work)
    assert calls == [True, False]
    blocks.enabled = True
    for error in (torch.OutOfMemoryError("out of memory"), script.UserError("bad input")):
        with pytest.raises(type(error)):
            blocks.call(lambda: (_ for _ in ()).throw(error))
        assert blocks.enabled  # raised at once, still compiled


class CountedArtifact(CacheArtifact):
    """A compiler cache artifact of the tests' own kind: what reaches the cache when torch loads it is recorded."""

    populated = []

    def populate_cache(self):
        CountedArtifact.populated.append((self.key, self.content))

    @staticmethod
    def type():
        return "dopsd-test"


CacheArtifactFactory.register(CountedArtifact)


def test_compile_cache_is_saved_with_the_checkpoint_and_loaded_on_resume(tmp_path, monkeypatch):
    """A compiled run writes the compiler's cache artifacts beside its checkpoints; the resumed run hands them back
    to torch before it compiles. (aot_eager caches nothing itself: its graphs record an artifact of the tests' kind.)
    A damaged file: one warning, and the run compiles anew."""
    import torch._dynamo
    from torch._dynamo.backends.debugging import aot_eager

    def recording_backend(graph, example_inputs):
        CacheArtifactManager.record_artifact(CountedArtifact.type(), "graph", b"compiled graph")
        return aot_eager(graph, example_inputs)

    monkeypatch.setattr(script.CompiledBlocks, "backend", staticmethod(recording_backend))
    CountedArtifact.populated.clear()
    cache = tmp_path / script.COMPILE_CACHE_FILE

    def run(steps, *extra):
        try:
            run_in_process(script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", steps, "--rollout_steps", 1,
                                       "--validation_inference_steps", 1, "--compile", *extra))
        finally:
            torch._dynamo.reset()

    messages = []  # what the script logs, whatever logging set-up earlier tests left behind
    for level in ("info", "warning"):
        monkeypatch.setattr(script.logger, level, lambda message, *args, **kwargs: messages.append(message))
    run(1)
    assert cache.is_file() and (tmp_path / "checkpoint-1").is_dir()
    assert CountedArtifact.populated == []
    run(2, "--resume_from_checkpoint", "latest")
    assert CountedArtifact.populated == [("graph", b"compiled graph")]  # handed back to torch before compiling
    assert any(m.endswith(f"cached artifact(s) loaded from {cache}") for m in messages)
    cache.write_bytes(b"not a cache")
    messages.clear()
    script.CompiledBlocks(None, False).load_cache(cache)
    assert messages == [f"{cache} is damaged or was written by another torch version: compiling anew"]


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
    assert stores[0].path(examples[0], "teacher") != stores[1].path(examples[0], "teacher")


@pytest.mark.parametrize("model, extra, expected", [
    (TINY_ZIMAGE, (), "--reference_resolution applies to FLUX.2-klein only, not to Z-Image-Turbo"),
    (TINY_KLEIN, ("--teacher_context", "vlm"), "--reference_resolution applies to FLUX.2-klein's edit teacher only"),
])
def test_reference_resolution_is_refused_without_the_edit_teacher(tmp_path, model, extra, expected):
    with pytest.raises(script.UserError, match=expected):
        load_family(tmp_path, model, "--reference_resolution", 64, *extra)


def test_fp8_compute_is_refused_without_fp8_tensor_cores(capsys):
    """On a machine without CUDA fp8 support (this CPU) the flag is refused before anything loads: exit 2, one line."""
    assert not script.has_fp8_tensor_cores()
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(script_args("out", TINY_ZIMAGE, "--quantize_base", "fp8_compute"))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        "error: --quantize_base fp8_compute needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+:"
        " RTX 40xx, L4, H100 or newer);"
        " use --quantize_base fp8 (weight-only) here"]


def test_fp8_compute_linear_passes_the_input_gradient_through_the_frozen_weight():
    """fp8_compute's linear (here with an unquantised weight, whose dequantize() is itself: the fp8 matmul needs
    the GPU) gives the input the gradient of F.linear, and the frozen weight none."""
    layer = torch.nn.Linear(8, 4).requires_grad_(False)
    layer.forward = script.fp8_compute_forward.__get__(layer)
    inputs = torch.randn(3, 8, requires_grad=True)
    (layer(inputs) ** 2).sum().backward()
    expected_inputs = inputs.detach().clone().requires_grad_()
    (torch.nn.functional.linear(expected_inputs, layer.weight, layer.bias) ** 2).sum().backward()
    assert torch.equal(inputs.grad, expected_inputs.grad)
    assert layer.weight.grad is None and isinstance(layer, torch.nn.Linear)
