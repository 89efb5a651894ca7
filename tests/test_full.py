"""train_dopsd_full.py: full fine-tuning on both tiny families, EMA of all weights, two processes, resume, and the
copy check that keeps its shared blocks identical to the LoRA script's."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, TINY_KLEIN, TINY_ZIMAGE, load_family, run_in_process, script_args, train_in_process
from safetensors.torch import load_file

import train_dopsd_full as full_script
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, ZImagePipeline, ZImageTransformer2DModel
from utils.check_copies import check_copies


FAMILIES = {
    "z-image": (TINY_ZIMAGE, ZImagePipeline, ZImageTransformer2DModel, {"guidance_scale": 0.0}),
    "klein": (TINY_KLEIN, Flux2KleinPipeline, Flux2Transformer2DModel, {"guidance_scale": 1.0}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tune_loads_into_the_stock_pipeline_and_changes_its_images(tmp_path, family):
    model, pipeline_class, transformer_class, call = FAMILIES[family]
    run_in_process(script_args(tmp_path, model, "--max_train_steps", 2, "--learning_rate", 1e-3, "--save_ema",
                               "--ema_decay", 0.5, "--validation_prompt", "sks cat", "--validation_steps", 2),
                   full_script)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step-000002-prompt0-0.png", "step-000002-teacher-view.png"]

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a photo of sks cat", height=64, width=64, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0), **call).images

    base = generate(pipeline_class.from_pretrained(model))
    trained = transformer_class.from_pretrained(tmp_path / "transformer")
    tuned = generate(pipeline_class.from_pretrained(model, transformer=trained))
    assert abs(tuned - base).max() > 1e-3
    # the EMA teacher (decay 0.5 over 2 steps) lies strictly between base and student
    ema = transformer_class.from_pretrained(tmp_path / "transformer_ema")
    original = transformer_class.from_pretrained(model, subfolder="transformer")
    name, student = next((n, p) for n, p in trained.named_parameters() if n.endswith("weight") and p.dim() == 2)
    teacher, start = dict(ema.named_parameters())[name], dict(original.named_parameters())[name]
    assert 0 < (teacher - start).abs().max() < (student - start).abs().max()


def test_full_ema_is_the_closed_form_and_cpu_or_other_dtype_ema_trains_the_same(tmp_path):
    """Three steps with the teacher held alike (storage swap) or apart (fp64 EMA: copy-in/copy-out swap)."""
    accelerator = Accelerator(cpu=True)
    results = []
    for ema_dtype in (None, torch.float64):
        args, family = load_family(tmp_path, TINY_ZIMAGE, "--ema_decay", 0.5, script=full_script)
        examples = full_script.collect_examples(args, family.resolution_multiple)
        history = [[p.detach().clone() for p in family.transformer.parameters()]]  # the student before step 1
        ema, _ = train_in_process(family, args, examples, accelerator, 3, 1e-3, script=full_script, dtype=ema_dtype,
                                  after_step=lambda named: history.append([p.detach().clone() for _, p in named]))
        for i, shadow in enumerate(ema.shadow[:20]):
            expected = 0.125 * history[0][i] + sum(0.5 * 0.5 ** (3 - j) * history[j][i] for j in (1, 2, 3))
            torch.testing.assert_close(shadow.float(), expected, rtol=1e-5, atol=1e-6)
        results.append(history[-1])
    for alike, apart in zip(*results):
        torch.testing.assert_close(alike, apart, rtol=1e-5, atol=1e-6)


def test_two_processes_train_and_end_with_identical_weights(tmp_path):
    # accelerate's --cpu flag runs one process; multi-process CPU (gloo) is --multi_gpu with ACCELERATE_USE_CPU
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "29533", str(ROOT / "tests" / "ddp_worker.py"), "train_dopsd_full",
               *script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", 2, "--learning_rate", 1e-3,
                            "--gradient_accumulation_steps", 2)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    base = ZImageTransformer2DModel.from_pretrained(TINY_ZIMAGE, subfolder="transformer").state_dict()
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any((rank0[k] - base[k]).abs().max() > 0 for k in rank0)


def test_full_resume_restores_weights_and_teacher(tmp_path, caplog):
    argv = script_args(tmp_path, TINY_ZIMAGE, "--learning_rate", 1e-3, "--ema_decay", 0.5,
                       "--checkpointing_steps", 1, "--validation_steps", 100)
    run_in_process([*argv, "--max_train_steps", 2], full_script)
    with caplog.at_level(logging.INFO):
        run_in_process([*argv, "--max_train_steps", 3, "--resume_from_checkpoint", "latest"], full_script)
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    old_teacher = load_file(tmp_path / "checkpoint-2" / "ema_teacher.safetensors")
    teacher = load_file(tmp_path / "checkpoint-3" / "ema_teacher.safetensors")
    student = ZImageTransformer2DModel.from_pretrained(tmp_path / "checkpoint-3", subfolder="transformer")
    for name, value in student.named_parameters():
        torch.testing.assert_close(teacher[name], 0.5 * old_teacher[name] + 0.5 * value.detach())
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_train_layers_trains_only_those_layers(tmp_path):
    run_in_process(script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", 1, "--learning_rate", 1e-3,
                               "--train_layers", "layers.1,all_final_layer"), full_script)
    tuned = ZImageTransformer2DModel.from_pretrained(tmp_path / "transformer").state_dict()
    base = ZImageTransformer2DModel.from_pretrained(TINY_ZIMAGE, subfolder="transformer").state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith(("layers.1.", "all_final_layer.")) for k in changed)
    assert any(k.startswith("layers.1.") for k in changed) and any(k.startswith("all_final_layer") for k in changed)


def test_copy_check_passes_and_catches_a_drifted_copy(tmp_path):
    assert check_copies(ROOT / "train_dopsd_full.py") == []
    drifted = tmp_path / "train_dopsd_full.py"
    text = (ROOT / "train_dopsd_full.py").read_text()
    drifted.write_text(text.replace("return F.mse_loss(student_velocity.float(), teacher_velocity.float())",
                                    "return F.l1_loss(student_velocity.float(), teacher_velocity.float())"))
    problems = check_copies(drifted)
    assert len(problems) == 1 and "dopsd_loss differs from train_dopsd_lora.dopsd_loss" in problems[0]
    assert check_copies(drifted, fix=True) and check_copies(drifted) == []
    assert drifted.read_text() == text
    cli = subprocess.run([sys.executable, str(ROOT / "utils" / "check_copies.py")], capture_output=True, text=True)
    assert cli.returncode == 0 and "all copies match" in cli.stdout


@pytest.mark.parametrize("old, new, expected", [
    # a shared constant that lost its marker
    ("# Copied from train_dopsd_lora.MIN_IMAGE_SIDE\n", "",
     "MIN_IMAGE_SIDE is also defined in train_dopsd_lora.py: mark it '# Copied from"),
    # an import that differs from the source's
    ("import numpy as np  # noqa: E402", "import numpy as npy  # noqa: E402",
     "'import numpy' (as npy) is not imported so by train_dopsd_lora.py"),
    ("from safetensors.torch import load_file, save_file", "from torch import load as load_file\nfrom safetensors.torch"
     " import save_file", "'from torch import load' (as load_file) is not imported so"),
    # a statement outside any block that drifted
    ('warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")',
     'warnings.filterwarnings("ignore", message="MatMul8bitLt")', "this statement is not in train_dopsd_lora.py"),
])
def test_copy_check_covers_constants_imports_and_statements(tmp_path, old, new, expected):
    text = (ROOT / "train_dopsd_full.py").read_text()
    assert text.count(old) == 1
    drifted = tmp_path / "train_dopsd_full.py"
    drifted.write_text(text.replace(old, new))
    problems = check_copies(drifted)
    assert len(problems) == 1 and expected in problems[0], problems


def test_an_own_version_may_differ_but_must_be_declared(tmp_path):
    text = (ROOT / "train_dopsd_full.py").read_text()
    assert "# Own version of train_dopsd_lora.main\ndef main(args):" in text  # main differs from the LoRA script's
    drifted = tmp_path / "train_dopsd_full.py"
    drifted.write_text(text.replace("# Own version of train_dopsd_lora.main\n", ""))
    assert [p.split(": ", 1)[1] for p in check_copies(drifted)] == [
        "main is also defined in train_dopsd_lora.py: mark it '# Copied from train_dopsd_lora.main' or '# Own version"
        " of train_dopsd_lora.main'"]
