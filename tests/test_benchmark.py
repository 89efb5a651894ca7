"""The benchmark runs (tiny, CPU) so it cannot rot; the speed levers keep the method's numerics."""

import json

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_ZIMAGE, add_random_lora, load_family, lora_script as script

import benchmarks.bench_dopsd as bench


def test_benchmark_prints_a_row_per_configuration(tmp_path, capsys):
    rows = bench.main(["--models", "tiny-z-image", "tiny-klein", "--resolutions", "64", "--rollout_steps", "1", "2",
                       "--repeats", "1", "--output", str(tmp_path / "r.jsonl"), "--markdown", str(tmp_path / "r.md")])
    assert [(r["model"], r["K"]) for r in rows] == [("tiny-z-image", 1), ("tiny-z-image", 2), ("tiny-klein", 1),
                                                     ("tiny-klein", 2)]
    written = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert written == rows
    for row in rows:
        assert row["sft_step_s"] > 0 and row["iteration_s"] > 0 and row["ratio"] > 0
        assert row["forward_flop_teacher"] > row["forward_flop_student"] > 0  # the teacher sees more tokens
        assert row["ratio_target"] == 1.25 * row["K"]
    table = (tmp_path / "r.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| tiny-klein | cpu | 64² | 2 |" in table


def test_benchmark_builds_random_weight_transformers_from_configs(tmp_path, monkeypatch):
    """The full-size path (used on GPUs) with the same code on a small config."""
    monkeypatch.setitem(bench.FULL_SIZE, "small-z-image", ("z-image", dict(
        dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=48, axes_dims=[8, 12, 12])))
    monkeypatch.setitem(bench.FULL_SIZE, "small-klein", ("klein", dict(
        num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=128,
        joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)))
    rows = bench.main(["--models", "small-z-image", "small-klein", "--resolutions", "64", "--rollout_steps", "2",
                       "--repeats", "1", "--rank", "4", "--lora_alpha", "4", "--gradient_checkpointing",
                       "--output", str(tmp_path / "r.jsonl"), "--markdown", str(tmp_path / "r.md")])
    assert [r["model"] for r in rows] == ["small-z-image", "small-klein"]
    assert all(r["gradient_checkpointing"] and r["iteration_s"] > 0 for r in rows)


def test_teacher_weight_swap_causes_no_recompiles(tmp_path):
    import torch._dynamo

    accelerator = Accelerator(cpu=True)
    args, family = load_family(tmp_path, TINY_ZIMAGE)
    examples = script.collect_examples(args, family.resolution_multiple)
    store = script.ContextStore(family, args, examples, accelerator)
    store.fill()
    add_random_lora(family.transformer, args)
    ema = script.EMATeacher([(n, p) for n, p in family.transformer.named_parameters() if p.requires_grad], 0.5)
    batch = script.collate_examples([script.ContextDataset(examples, store)[0]])
    eager, _ = script.dopsd_step(family, family.transformer, family.transformer, ema, batch, args, accelerator,
                                 torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    family.transformer.compile_repeated_blocks(backend="aot_eager")
    script.dopsd_step(family, family.transformer, family.transformer, ema, batch, args, accelerator,
                      torch.Generator().manual_seed(1))  # compiles the teacher (no grad) and student (grad) graphs
    try:
        torch._dynamo.config.error_on_recompile = True
        compiled, _ = script.dopsd_step(family, family.transformer, family.transformer, ema, batch, args, accelerator,
                                        torch.Generator().manual_seed(1))
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-7)


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
