"""Reliability (both scripts): exact resume after SIGKILL, clean stop on SIGINT/SIGTERM, atomic checkpoints on a
full disk, bounded non-finite steps, refused resumes, safe formats. (Every bad input as one clear
line: tests/test_bad_inputs.py.)"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_ZIMAGE, lora_script as script, run_in_process, run_script, script_args
from PIL import Image
from safetensors.torch import load_file


STEPS = 12
SCRIPTS = {"lora": "train_dopsd_lora.py", "full": "train_dopsd_full.py"}


def run_argv(output_dir, *extra):
    return script_args(output_dir, TINY_ZIMAGE, "--max_train_steps", STEPS, "--checkpointing_steps", 2,
                       "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3, "--ema_decay", 0.9,
                       "--validation_steps", 1000, *extra)


def final_weights(output_dir, kind):
    """Student and EMA teacher at the end of a run, as {name: tensor}."""
    student_file = (Path(output_dir) / script.LORA_WEIGHT_NAME if kind == "lora"
                    else Path(output_dir) / "transformer" / "diffusion_pytorch_model.safetensors")
    teacher = load_file(Path(output_dir) / f"checkpoint-{STEPS}" / "ema_teacher.safetensors")
    return {**{f"student.{k}": v for k, v in load_file(student_file).items()},
            **{f"teacher.{k}": v for k, v in teacher.items()}}


def start(argv, script_name):
    return subprocess.Popen([sys.executable, str(ROOT / script_name), *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not Path(path).exists():
        assert process.poll() is None, f"run ended before {path} appeared:\n{process.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Reference runs that nothing interrupts, one per script."""
    runs = {}
    for kind, script_name in SCRIPTS.items():
        output_dir = tmp_path_factory.mktemp(f"reference-{kind}")
        run_script(run_argv(output_dir), script=script_name)
        runs[kind] = final_weights(output_dir, kind)
    return runs


def assert_same_weights(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind", SCRIPTS)
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted, kind):
    process = start(run_argv(tmp_path), SCRIPTS[kind])
    wait_for(tmp_path / "checkpoint-4", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / f"checkpoint-{STEPS}").exists()
    result = run_script([*run_argv(tmp_path), "--resume_from_checkpoint", "latest"], script=SCRIPTS[kind])
    assert "resuming from" in result.stderr
    assert_same_weights(final_weights(tmp_path, kind), uninterrupted[kind])


@pytest.mark.parametrize("kind,sig", [("lora", signal.SIGINT), ("full", signal.SIGTERM)])
def test_interrupt_saves_a_checkpoint_exits_zero_and_resumes_exactly(tmp_path, uninterrupted, kind, sig):
    process = start(run_argv(tmp_path), SCRIPTS[kind])
    wait_for(tmp_path / "checkpoint-2", process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert f"{sig.name} received" in stderr and "stopped at step" in stderr
    resume_line = stderr.split("To continue:")[1].strip().splitlines()[0]
    assert resume_line.endswith("--resume_from_checkpoint latest") and SCRIPTS[kind] in resume_line
    stopped_at = int(stderr.split("stopped at step ")[1].split(";")[0])
    assert 2 <= stopped_at < STEPS and (tmp_path / f"checkpoint-{stopped_at}").is_dir()
    run_script([*run_argv(tmp_path), "--resume_from_checkpoint", "latest"], script=SCRIPTS[kind])
    assert_same_weights(final_weights(tmp_path, kind), uninterrupted[kind])


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    args = script.parse_args(script_args(tmp_path, TINY_ZIMAGE, "--checkpoints_total_limit", 1))
    previous = tmp_path / "checkpoint-2"
    previous.mkdir()
    (previous / "ema_teacher.safetensors").write_bytes(b"complete")

    def fill_the_disk(output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half written")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", fill_the_disk)
    with pytest.raises(script.UserError) as error:
        script.save_checkpoint(accelerator, args.output_dir, 4, torch.Generator())
    assert str(error.value).startswith(f"could not write {tmp_path / 'checkpoint-4'} (No space left on device);"
                                       " checkpoint-2 is the last checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert (previous / "ema_teacher.safetensors").read_bytes() == b"complete"
    assert script.list_checkpoints(tmp_path) == [previous]


def test_a_failed_final_save_keeps_the_previous_output(tmp_path):
    output = tmp_path / script.LORA_WEIGHT_NAME
    output.write_bytes(b"previous lora")
    def fill_the_disk(path):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(script.UserError, match=r"\(No space left on device\); no checkpoint is saved yet"):
        script.write_output(output, fill_the_disk, tmp_path)
    assert output.read_bytes() == b"previous lora" and sorted(p.name for p in tmp_path.iterdir()) == [output.name]
    assert script.write_output(output, lambda path: path.write_bytes(b"new lora"), tmp_path)
    assert output.read_bytes() == b"new lora"


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(tmp_path):
    result = run_script(script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", 20, "--learning_rate", 1e36,
                                    "--gradient_accumulation_steps", 1, "--max_bad_steps", 3), check=False)
    assert result.returncode == 2
    assert result.stderr.count("the update was skipped") == 3
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped at step") and "3 consecutive non-finite steps" in last
    assert "lower --learning_rate" in last
    stopped_at = int(last.split("stopped at step ")[1].split()[0])
    assert (tmp_path / f"checkpoint-{stopped_at}").is_dir()


def test_images_of_any_mode_become_8_bit_rgb(tmp_path):
    gray = Image.fromarray(np.full((80, 96), 100, np.uint8), mode="L")
    rgba = Image.new("RGBA", (96, 80), (10, 20, 30, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 48, 80))
    sixteen = Image.fromarray(np.full((80, 96), 257 * 50, np.uint16))
    paths = {}
    for name, image in (("gray.png", gray), ("rgba.png", rgba), ("sixteen.png", sixteen)):
        image.save(tmp_path / name)
        paths[name] = script.read_image_file(tmp_path / name)
    assert all(i.mode == "RGB" and i.size == (96, 80) for i in paths.values())
    assert np.asarray(paths["gray.png"])[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(paths["rgba.png"])[0, 0].tolist() == [200, 0, 0]  # opaque half kept
    assert np.asarray(paths["rgba.png"])[0, -1].tolist() == [255, 255, 255]  # transparent half on white
    assert np.asarray(paths["sixteen.png"])[0, 0].tolist() == [50, 50, 50]  # 16-bit scaled, not clipped


def test_resuming_a_checkpoint_of_another_lora_rank_is_refused(tmp_path, capsys, monkeypatch):
    run_in_process(script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", 1, "--rank", 8))
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["train_dopsd_lora.py", *script_args(
        tmp_path, TINY_ZIMAGE, "--max_train_steps", 2, "--rank", 4, "--resume_from_checkpoint", "latest")])
    with pytest.raises(SystemExit) as exit_info:
        script.run()  # the command line's entry point, in this process
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume from") and "checkpoint-1" in last
    assert "it was trained with --rank 8 (now 4)" in last


def test_weights_are_safetensors_and_nothing_unpickles_unsafely():
    for name in SCRIPTS.values():
        source = (ROOT / name).read_text()
        assert "trust_remote_code" not in source and "torch.load(" not in source and "pickle" not in source
    assert "torch.load(" not in (ROOT / "examples" / "tiny" / "make_tiny_models.py").read_text()


def test_checkpoints_total_limit_keeps_the_newest_complete_ones(tmp_path):
    run_in_process(script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", 4, "--checkpointing_steps", 1,
                               "--checkpoints_total_limit", 2, "--validation_steps", 100))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert all((tmp_path / name / "ema_teacher.safetensors").is_file() for name in ("checkpoint-3", "checkpoint-4"))
