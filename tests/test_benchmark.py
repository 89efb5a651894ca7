"""The benchmark runs (tiny, CPU) so it cannot rot; the speed levers keep the method's numerics."""

import gc
import json
import os
import types
import weakref

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_ZIMAGE, add_random_lora, load_family, lora_script as script

import benchmarks.bench_dopsd as bench


def test_benchmark_prints_a_row_per_configuration(tmp_path, monkeypatch):
    """Eager and compiled rows (aot_eager stands in for inductor on the CPU): the compile happens in the warm-up on
    three buckets, outside the FLOP count and the timing, later buckets and the timed runs add no graph, and the
    compiled iteration's loss is the eager one."""
    monkeypatch.setattr(bench.trainer.CompiledBlocks, "backend", "inductor")  # main() sets it from the flag
    rows = bench.main(["--models", "tiny-z-image", "--resolutions", "64", "--rollout_steps", "1",
                       "--modes", "eager", "compiled", "--compile_backend", "aot_eager", "--repeats", "1",
                       "--output", str(tmp_path / "r.jsonl"), "--markdown", str(tmp_path / "r.md")])
    rows += bench.main(["--models", "tiny-klein", "--resolutions", "64", "--rollout_steps", "1",
                        "--reference_resolutions", "64", "48", "--repeats", "1",
                        "--output", str(tmp_path / "r.jsonl"), "--markdown", str(tmp_path / "r.md")])
    assert [(r["model"], r["mode"], r["K"], r["reference_resolution"]) for r in rows] == [
        ("tiny-z-image", "eager", 1, None), ("tiny-z-image", "compiled", 1, None), ("tiny-klein", "eager", 1, 64),
        ("tiny-klein", "eager", 1, 48)]
    written = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert written == rows
    for row in rows:
        assert row["sft_step_s"] > 0 and row["iteration_s"] > 0 and row["ratio"] > 0
        assert row["flop_teacher_fwd"] > 0 and row["flop_student_fwd_bwd"] > row["flop_teacher_fwd"] / 2
        assert row["ratio_target"] == 1.25 * row["K"]
        # MFU against two labelled peaks: a CPU has no spec-sheet entry; the measured matmul peak always exists
        assert row["spec_peak_tflops"] is None and row["mfu_vs_spec_peak"] is None
        assert row["matmul_peak_tflops"] > 0 and row["mfu_vs_matmul_peak"] > 0 and row["sft_mfu_vs_matmul_peak"] > 0
    compiled = rows[1]
    assert len(compiled["compile_buckets"]) == 3 and compiled["compile_new_graphs"][0] >= 2
    assert sum(compiled["compile_new_graphs"][1:]) == 0 and compiled["recompiles_after_warmup"] == 0
    assert compiled["loss_vs_eager"] < 1e-6
    klein_full, klein_small = rows[2:]
    assert klein_small["flop_teacher_fwd"] < klein_full["flop_teacher_fwd"]  # fewer reference tokens
    assert klein_small["flop_student_fwd_bwd"] == klein_full["flop_student_fwd_bwd"]
    table = (tmp_path / "r.md").read_text()
    assert table.count("\n") == 2 + 2 and "| tiny-klein | cpu | eager | 64² | 48² | 1 |" in table
    assert "| MFU (spec peak) | MFU (measured matmul peak) |" in table
    mfu = f"{100 * klein_small['mfu_vs_matmul_peak']:.0f} % of {klein_small['matmul_peak_tflops']:.4g}"
    assert f"| n/a | {mfu} |" in table


def test_a_benchmark_run_with_its_defaults_writes_into_the_ignored_outputs_folder(monkeypatch):
    """Run as its docstring's CPU example shows (no output flags), a benchmark changes no file of the repository and
    leaves no untracked one: its defaults lie under outputs/, which .gitignore names."""
    import argparse

    import benchmarks.bench_memory as bench_memory
    from conftest import ROOT

    parsers = []

    def keep_parser(parser, args=None, namespace=None):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep_parser)
    for main in (bench.main, bench_memory.main):
        with pytest.raises(SystemExit):
            main([])
    defaults = [parsers[0].get_default("output"), parsers[0].get_default("markdown"),
                parsers[1].get_default("output_dir")]
    assert all(path.is_relative_to(ROOT / "outputs" / "benchmarks") for path in defaults), defaults
    assert "/outputs/" in (ROOT / ".gitignore").read_text().splitlines()


def test_bench_spec_peak_is_looked_up_by_card_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: names[device.index])
    names = ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA L4"]
    assert [bench.spec_peak_tflops(torch.device("cuda", i)) for i in range(5)] == [989, 989, 756, 312, None]
    assert bench.spec_peak_tflops(torch.device("cpu")) is None


def test_benchmark_builds_random_weight_transformers_from_configs(tmp_path, monkeypatch):
    """The full-size path (used on GPUs) with the same code on a small config."""
    monkeypatch.setitem(bench.FULL_SIZE, "small-z-image", ("z-image", dict(
        dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=48, axes_dims=[8, 12, 12])))
    monkeypatch.setitem(bench.FULL_SIZE, "small-klein", ("klein", dict(
        num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=128,
        joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)))
    built = []

    def build_family(*args):
        # the previous model is gone before the next is built (on a GPU: nothing allocated), so its peak is its own
        assert all(transformer() is None for transformer in built)
        family, train_args = build(*args)
        # the reference cycle accelerate's mixed precision makes on a GPU: the instance holds its own bound forward
        family.transformer.forward = types.MethodType(type(family.transformer).forward, family.transformer)
        built.append(weakref.ref(family.transformer))
        return family, train_args

    build = bench.build_family
    monkeypatch.setattr(bench, "build_family", build_family)
    gc.disable()  # a model left in a reference cycle stays until a collection: only the benchmark's own may run
    try:
        rows = bench.main(["--models", "small-z-image", "small-klein", "--resolutions", "64", "--rollout_steps",
                           "2", "--repeats", "1", "--rank", "4", "--lora_alpha", "4", "--gradient_checkpointing",
                           "--output", str(tmp_path / "r.jsonl"), "--markdown", str(tmp_path / "r.md")])
    finally:
        gc.enable()
    assert [r["model"] for r in rows] == ["small-z-image", "small-klein"]
    assert all(r["gradient_checkpointing"] and r["iteration_s"] > 0 for r in rows)
    assert len(built) == 2 and built[1]() is None


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(
        os.environ.get("DOPSD_TEST_INDUCTOR") != "1", reason="inductor's C++ code generation takes minutes on a CPU;"
        " DOPSD_TEST_INDUCTOR=1 runs it")),
])
def test_teacher_weight_swap_causes_no_recompiles(tmp_path, monkeypatch, backend):
    """The trainer's compiled blocks: the first step compiles the teacher (no grad) and student (grad, backward)
    graphs; after it, the EMA swap, the grad/no-grad alternation and another bucket compile nothing new, and the
    compiled step equals the eager one. (aot_eager: dynamo and AOTAutograd as with inductor, without the code
    generation.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    accelerator = Accelerator(cpu=True)
    args, family = load_family(tmp_path, TINY_ZIMAGE)
    examples = script.collect_examples(args, family.resolution_multiple)
    store = script.ContextStore(family, examples, accelerator, args.output_dir)
    store.fill()
    add_random_lora(family.transformer, args)
    ema = script.EMATeacher([(n, p) for n, p in family.transformer.named_parameters() if p.requires_grad], 0.5)
    batch = script.collate_examples([store[0]])

    def step(batch):
        return script.dopsd_step(family, family.transformer, family.transformer, ema, batch, accelerator,
                                 args.rollout_steps, args.loss_space,
                                 torch.Generator().manual_seed(1))[0]

    def move_teacher():
        with torch.no_grad():
            for shadow in ema.shadow:
                shadow.add_(0.01)

    eager = step(batch)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(script.CompiledBlocks, "backend", backend)
    compiled = script.CompiledBlocks(family.transformer, enabled=True)
    try:
        first = step(batch)  # compiles
        assert counters["stats"]["unique_graphs"] >= 2  # at least the teacher's and the student's forward
        assert counters["aot_autograd"]["total"] >= 2
        torch._dynamo.config.error_on_recompile = True
        move_teacher()
        moved = step(batch)
        other_bucket = step({**batch, "bucket": (128, 96)})
    finally:
        torch._dynamo.config.error_on_recompile = False
        compiled.undo()
        torch._dynamo.reset()
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(moved, step(batch), rtol=1e-4, atol=1e-7)
    assert not torch.equal(moved, eager) and torch.isfinite(other_bucket)


def test_attention_backend_flag(tmp_path):
    args, family = load_family(tmp_path, TINY_ZIMAGE)
    latents = family.initial_noise(1, 64, 64, torch.Generator().manual_seed(0))
    timesteps, _ = family.rollout_schedule(4, 64, 64)
    context = family.collate([family.encode_student_context("a photo of sks cat")])
    default = family.predict(family.transformer, latents, timesteps[1], context)
    _, native = load_family(tmp_path, TINY_ZIMAGE, "--attention_backend", "native")
    torch.testing.assert_close(native.predict(native.transformer, latents, timesteps[1], context), default)
    with pytest.raises(script.UserError, match="--attention_backend no_such_backend"):
        load_family(tmp_path, TINY_ZIMAGE, "--attention_backend", "no_such_backend")
