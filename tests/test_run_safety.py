"""Run safety (both scripts): a copy-swapped or bf16 EMA teacher, resume, full disks, used output folders,
numeric flags and file modes."""

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_ZIMAGE, add_random_lora, script_args

import train_dopsd_full as full_script
import train_dopsd_lora as lora_script


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_one_backward_with_a_copy_swapped_teacher_gives_the_per_step_gradient(tmp_path, accelerator, kind):
    """DeepSpeed's arrangement (one backward after the K steps) with an EMA of another dtype, which is swapped in by
    copying: LoRA with an fp64 EMA (standing in for a CPU EMA), full fine-tuning with gradient checkpointing and the
    bf16 EMA of --ema_dtype bf16."""
    script = lora_script if kind == "lora" else full_script
    extra = ("--rollout_steps", 2) if kind == "lora" else ("--rollout_steps", 2, "--gradient_checkpointing")
    args, family = tiny_family(tmp_path, *extra, script=script)
    transformer = family.transformer
    if kind == "lora":
        add_random_lora(transformer, args, script)
        ema_dtype = torch.float64
    else:
        transformer.requires_grad_(True).enable_gradient_checkpointing()
        ema_dtype = torch.bfloat16
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    ema = script.EMATeacher(named, 0.9999, dtype=ema_dtype)
    with torch.no_grad():
        for shadow in ema.shadow:
            shadow.add_(0.02 * torch.randn_like(shadow))
    batch = caption_only_batch(family)
    grads, losses = [], []
    for per_step in (True, False):
        loss, _ = script.dopsd_step(family, transformer, transformer, ema, batch, args, accelerator,
                                    torch.Generator().manual_seed(3), backward_per_step=per_step)
        grads.append([p.grad.clone() for _, p in named])
        losses.append(loss)
        for _, p in named:
            p.grad = None
    assert losses[0] > 0
    torch.testing.assert_close(losses[0], losses[1])
    assert sum(g.abs().sum() for g in grads[0]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def tiny_family(output_dir, *extra, script=lora_script):
    """Parsed args and the tiny Z-Image family without its teacher VLM (for tests that need no image context)."""
    args = script.parse_args(script_args(output_dir, TINY_ZIMAGE, *extra))
    family = script.detect_family(args)(args, torch.float32, torch.device("cpu"))
    if hasattr(args, "lora_layers"):
        args.lora_layers = family.default_lora_layers
    return args, family


def caption_only_batch(family):
    """A one-sample batch whose teacher context is a longer caption: a teacher that differs, without the VLM."""
    student = family.encode_student_context("a photo of sks cat")
    teacher = family.encode_student_context("a photo of sks cat on a red sofa, seen from the left, soft light")
    return {"student": [student], "teacher": [teacher], "bucket": (64, 64)}


def test_a_bf16_teacher_tracks_the_fp32_teacher():
    """At decay 0.9999 one update is far below bf16's resolution; stochastic rounding keeps the bf16 teacher moving
    with the fp32 one (round-to-nearest would leave it where it started)."""
    torch.manual_seed(0)
    student = torch.nn.Parameter(torch.randn(64, 256) * 0.02)
    fp32 = lora_script.EMATeacher([("w", student)], 0.9999)
    bf16 = lora_script.EMATeacher([("w", student)], 0.9999, dtype=torch.bfloat16)
    start = bf16.shadow[0].float().clone()
    for _ in range(200):
        with torch.no_grad():
            student.add_(1e-4 * torch.randn_like(student) + 1e-4)  # a drift the teacher must follow
        fp32.update()
        bf16.update()
    moved = fp32.shadow[0] - start
    error = bf16.shadow[0].float() - fp32.shadow[0]
    assert moved.mean() > 5e-5
    assert abs(error.mean()) < 0.05 * moved.mean()  # unbiased: the mean drift is kept
    assert error.abs().max() < 3 * bf16_step(fp32.shadow[0]).max()  # and each weight stays within a few bf16 steps
    # resumable: the rounding noise follows the update count saved with the shadow
    assert bf16.num_updates == 200


def bf16_step(values):
    """The spacing of bf16 numbers around each value."""
    return torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(values.abs().clamp_min(1e-30)))
