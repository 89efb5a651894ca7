"""Run safety (both scripts): a copy-swapped or bf16 EMA teacher, resume, full disks, used output folders, file
modes, checks before effects, signals in every phase. (Bad numeric flags: tests/test_bad_inputs.py; damaged files:
tests/test_damaged_files.py.)"""

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import CONCEPT, TINY_KLEIN, TINY_VLM, TINY_ZIMAGE, add_random_lora, run_in_process, script_args
from PIL import Image
from safetensors.torch import load_file, save_file

import train_dopsd_full as full_script
import train_dopsd_lora as lora_script


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_one_backward_with_a_copy_swapped_teacher_gives_the_per_step_gradient(tmp_path, accelerator, kind):
    """DeepSpeed's arrangement (one backward after the K steps) with a teacher swapped in by copying, as where the
    EMA's dtype differs from the weights': LoRA weights in fp64 (standing in for DeepSpeed's bf16 copy of them) under
    the fp32 EMA, full fine-tuning with gradient checkpointing and the bf16 EMA of --ema_dtype bf16."""
    script = lora_script if kind == "lora" else full_script
    extra = ("--rollout_steps", 2) if kind == "lora" else ("--rollout_steps", 2, "--gradient_checkpointing")
    args, family = tiny_family(tmp_path, *extra, script=script)
    transformer = family.transformer
    if kind == "lora":
        for parameter in add_random_lora(transformer, args, script):
            parameter.data = parameter.data.double()
        named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
        ema = script.EMATeacher(named, 0.9999)
    else:
        transformer.requires_grad_(True).enable_gradient_checkpointing()
        named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
        ema = script.EMATeacher(named, 0.9999, dtype=torch.bfloat16)
    with torch.no_grad():
        for shadow in ema.shadow:
            shadow.add_(0.02 * torch.randn_like(shadow))
    batch = caption_only_batch(family)
    grads, losses = [], []
    for per_step in (True, False):
        loss, _ = script.dopsd_step(family, transformer, transformer, ema, batch, accelerator, args.rollout_steps,
                                    args.loss_space,
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
    family_class = script.detect_family(args)
    family_class.apply_defaults(args, script.TRAINING)
    return args, family_class(args, torch.float32, torch.device("cpu"))


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
    fp32 = full_script.EMATeacher([("w", student)], 0.9999)
    bf16 = full_script.EMATeacher([("w", student)], 0.9999, dtype=torch.bfloat16)
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


# -- one short run, then what may and may not follow it --------------------------------------------------------------

UMASK = 0o027


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Two LoRA steps started with the README's recovery command (`--resume_from_checkpoint latest`) in an empty
    folder, under a umask that differs from the usual 022."""
    output_dir, data = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("one-image")
    for name in ("chelsea-1.jpg", "chelsea-1.txt"):
        shutil.copy(CONCEPT / name, data / name)
    argv = script_args(output_dir, TINY_ZIMAGE, "--max_train_steps", 2, "--checkpointing_steps", 1,
                       "--gradient_accumulation_steps", 1, "--rollout_steps", 1, "--validation_steps", 100,
                       "--validation_inference_steps", 1, data=data)
    previous = os.umask(UMASK)
    try:
        run_in_process([*argv, "--resume_from_checkpoint", "latest"])
    finally:
        os.umask(previous)
    return output_dir, argv


def test_resume_latest_without_a_checkpoint_starts_a_new_run(finished_run, tmp_path):
    output_dir, _ = finished_run
    assert (output_dir / lora_script.LORA_WEIGHT_NAME).is_file()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # the full script shares the code path: its setup finds nothing to resume and says so without a traceback
    args = full_script.parse_args(script_args(tmp_path, TINY_ZIMAGE, "--resume_from_checkpoint", "latest"))
    assert full_script.setup(args)[3] is None
    full_script.release_output_dir(tmp_path)


def test_outputs_follow_the_umask(finished_run):
    output_dir, _ = finished_run
    expected = 0o666 & ~UMASK
    for file in (output_dir / lora_script.LORA_WEIGHT_NAME, output_dir / "checkpoint-2" / "ema_teacher.safetensors",
                 output_dir / "checkpoint-2" / lora_script.LORA_WEIGHT_NAME,
                 output_dir / "checkpoint-2" / "rollout_noise_0.safetensors",
                 *(output_dir / "context_cache").iterdir()):
        assert file.stat().st_mode & 0o777 == expected, file


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten(finished_run, capsys, monkeypatch):
    output_dir, argv = finished_run
    monkeypatch.setattr(sys, "argv", ["train_dopsd_lora.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        lora_script.run()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert f"--output_dir {output_dir} holds another run's results" in last and "--overwrite_output_dir" in last
    args = lora_script.parse_args([*argv, "--overwrite_output_dir"])
    lora_script.check_output_dir_is_free(args)


def test_a_second_run_on_a_locked_output_dir_gets_one_line(finished_run):
    output_dir, argv = finished_run
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; lock = open(sys.argv[1], 'a');"
                               " fcntl.flock(lock, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                               str(output_dir / lora_script.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lora_script.UserError, match="another run is using --output_dir"):
            lora_script.lock_output_dir(output_dir)
    finally:
        holder.kill()
        holder.wait()
    lora_script.lock_output_dir(output_dir)  # free again once the other run has ended
    with open(output_dir / lora_script.LOCK_FILE) as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lora_script.release_output_dir(output_dir)


def test_resume_refuses_every_setting_that_changes_the_checkpoints_meaning_in_one_line(finished_run):
    output_dir, argv = finished_run
    args = lora_script.parse_args([*argv, "--resume_from_checkpoint", "latest", "--lora_alpha", "8", "--rank", "4",
                                   "--loss_space", "v", "--learning_rate", "5e-5", "--max_train_steps", "3",
                                   "--teacher_vlm_rope_theta", "vlm", "--quantize_base", "fp8"])
    with pytest.raises(lora_script.UserError) as error:
        lora_script.setup(args)
    message = str(error.value)
    assert message.startswith(f"cannot resume from {output_dir / 'checkpoint-2'}: it was trained with")
    assert "--rank 64 (now 4)" in message and "--lora_alpha 128 (now 8)" in message
    assert "--loss_space x0 (now v)" in message and "--teacher_vlm_rope_theta text_encoder (now vlm)" in message
    assert "--quantize_base none (now fp8)" in message
    assert "learning_rate" not in message and "max_train_steps" not in message  # these may change
    assert "\n" not in message


def test_resuming_a_finished_run_only_writes_its_outputs(finished_run, caplog):
    output_dir, argv = finished_run
    lora_file = output_dir / lora_script.LORA_WEIGHT_NAME
    trained = load_file(lora_file)
    lora_file.unlink()
    with caplog.at_level(logging.INFO):
        run_in_process([*argv, "--resume_from_checkpoint", "latest"])
    assert "checkpoint-2 is at step 2 of --max_train_steps 2: nothing left to train" in caplog.text
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    again = load_file(lora_file)
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)


def test_a_new_learning_rate_is_applied_on_resume():
    """The restored optimizer and schedule take the command line's learning rate (and Adam settings)."""
    from diffusers.optimization import get_scheduler

    def optimizer_and_schedule(learning_rate, beta2=0.999):
        parameter = torch.nn.Parameter(torch.zeros(3))
        optimizer = torch.optim.AdamW([parameter], lr=learning_rate, betas=(0.9, beta2))
        schedule = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
        return optimizer, schedule

    optimizer, schedule = optimizer_and_schedule(1e-3)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    saved = optimizer.state_dict(), schedule.state_dict()
    resumed_optimizer, resumed_schedule = optimizer_and_schedule(1e-4, beta2=0.99)
    resumed_optimizer.load_state_dict(saved[0])
    resumed_schedule.load_state_dict(saved[1])
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.6)  # what a plain resume keeps
    args = SimpleNamespace(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8,
                           adam_weight_decay=0.0)
    lora_script.apply_optimizer_settings(resumed_optimizer, resumed_schedule, args)
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.6)
    assert resumed_optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    resumed_optimizer.step()
    resumed_schedule.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5)


# -- a really full disk ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (a real filesystem that fills up); skipped where this user may not mount one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk, leave):
    """Use up the disk but `leave` bytes."""
    free = shutil.disk_usage(disk).free
    with open(disk / f"filler-{len(list(disk.glob('filler-*')))}", "wb") as filler:
        filler.write(b"\0" * max(0, free - leave))


def test_a_really_full_disk_keeps_the_previous_checkpoint_and_leaves_no_partial_one(small_disk):
    """torch.save (RuntimeError) and safetensors (SafetensorError) fail on a full disk; each ends in one line."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(256, 256)  # 256 KiB of weights, 512 KiB of Adam state
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    args = lora_script.parse_args(script_args(small_disk, TINY_ZIMAGE, "--checkpoints_total_limit", 1))
    lora_script.save_checkpoint(accelerator, args.output_dir, 2, torch.Generator())
    previous = {p.name: p.read_bytes() for p in (small_disk / "checkpoint-2").iterdir()}
    for step, leave in ((4, 400 << 10), (6, 0)):  # the weights fit but not the optimizer (torch.save); nothing fits
        fill(small_disk, leave)
        with pytest.raises(lora_script.UserError) as error:
            lora_script.save_checkpoint(accelerator, args.output_dir, step, torch.Generator())
        assert str(error.value).startswith(f"could not write {small_disk / f'checkpoint-{step}'} (No space left on"
                                           " device); checkpoint-2 is the last checkpoint")
        assert sorted(p.name for p in small_disk.iterdir() if not p.name.startswith("filler")) == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in (small_disk / "checkpoint-2").iterdir()} == previous




def test_a_really_full_disk_keeps_the_previous_output_and_the_context_cache(small_disk):
    output = small_disk / lora_script.LORA_WEIGHT_NAME
    output.write_bytes(b"previous lora")
    fill(small_disk, 64 << 10)
    with pytest.raises(lora_script.UserError) as error:
        lora_script.write_output(output, lambda path: save_file({"weight": torch.zeros(256, 256)}, path), small_disk)
    assert str(error.value) == (f"could not write {output} (No space left on device); no checkpoint is saved yet. Free"
                                " disk space and rerun with --resume_from_checkpoint latest")
    assert output.read_bytes() == b"previous lora" and not (small_disk / f"{output.name}.tmp").exists()

    args = lora_script.parse_args(script_args(small_disk, TINY_ZIMAGE))
    family = SimpleNamespace(context_fingerprint=lambda: {"model": "stand-in"},
                             encode_student_context=lambda caption: {"prompt_embeds": torch.zeros(256, 256)},
                             build_teacher_context=lambda image, caption: {"prompt_embeds": torch.zeros(256, 256)})
    example = lora_script.Example("a.png", "a cat", (64, 64), "a", 0, load=lambda: Image.new("RGB", (64, 64)))
    store = lora_script.ContextStore(family, [example], Accelerator(cpu=True), args.output_dir)
    with pytest.raises(lora_script.UserError, match=r"could not write .*context_cache.* \(No space left on"):
        store.fill()
    assert list((small_disk / "context_cache").iterdir()) == []


def test_a_programming_error_while_saving_is_not_taken_for_a_full_disk(tmp_path):
    def buggy(path):
        path.write_bytes(b"half")
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        lora_script.write_output(tmp_path / "out.safetensors", buggy, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert lora_script.write_failure(RuntimeError("a bug"), tmp_path) is None
    assert lora_script.write_failure(OSError(28, "No space left on device"), tmp_path) == "No space left on device"


# -- every check that can refuse a run comes before its first write -------------------------------------------------


def tree(path):
    """Every entry below `path` with its size and modification time."""
    return {str(p.relative_to(path)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in Path(path).rglob("*")}


def vlm_config_of_another_size(folder):
    """A Qwen3-VL config whose language model is smaller than the text encoder (no weights: none are read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(TINY_VLM)
    config.text_config.num_hidden_layers = 2
    config.text_config.layer_types = config.text_config.layer_types[:2]
    config.save_pretrained(folder)
    return folder


REFUSED_BEFORE_ANY_WRITE = [  # (script, model, flags, the line's start); each with --overwrite_output_dir
    (lora_script, TINY_ZIMAGE, ["--lora_layers", "to_q,not_a_layer"], "--lora_layers entry 'not_a_layer' matches no"),
    (full_script, TINY_ZIMAGE, ["--train_layers", "not_a_layer"], "--train_layers entry 'not_a_layer' matches no"),
    (lora_script, TINY_ZIMAGE, ["--teacher_vlm_name_or_path", vlm_config_of_another_size],
     "the teacher VLM {vlm} does not match the pipeline's text encoder: 0 missing, 286 unexpected"),
    (lora_script, TINY_ZIMAGE, ["--teacher_vlm_name_or_path", TINY_ZIMAGE / "text_encoder"],
     "--teacher_vlm_name_or_path {vlm} is a qwen3, not a Qwen3-VL model"),
    (lora_script, TINY_KLEIN, ["--teacher_vlm_rope_theta", "vlm"],
     "--teacher_vlm_rope_theta applies to the vlm teacher only, not to FLUX.2-klein's edit teacher"),
]


@pytest.mark.parametrize("script,model,flags,expected", REFUSED_BEFORE_ANY_WRITE)
def test_a_refused_run_deletes_and_writes_nothing(finished_run, tmp_path, capsys, monkeypatch, script, model, flags,
                                                  expected):
    """--overwrite_output_dir deletes the previous run's checkpoints only once nothing can refuse the run."""
    output_dir = tmp_path / "used"
    shutil.copytree(finished_run[0], output_dir)
    flags = [flag(tmp_path / "vlm") if callable(flag) else flag for flag in flags]
    vlm = flags[flags.index("--teacher_vlm_name_or_path") + 1] if "--teacher_vlm_name_or_path" in flags else None
    before = tree(tmp_path)
    for folder, argv in ((output_dir, ["--overwrite_output_dir"]), (tmp_path / "new", [])):
        monkeypatch.setattr(sys, "argv", ["train.py", *script_args(folder, model, *flags, *argv)])
        with pytest.raises(SystemExit) as exit_info:
            script.run()
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {expected.format(vlm=vlm)}")
        assert tree(tmp_path) == before  # the old checkpoints are there, the new folder is not made


# -- resume: every flag that shapes the teacher, the base or the objective is refused -------------------------------

REFUSED_ON_RESUME = {"teacher_vlm_rope_theta": "vlm", "reference_resolution": 512, "quantize_encoders": "int8",
                     "quantize_base": "nf4", "teacher_prompt_suffix": "Keep the cat.", "text_encoder_out_layers": [1],
                     "teacher_vlm_name_or_path": "Qwen/Qwen3-VL-8B-Instruct", "teacher_context": "edit",
                     "ema_decay": 0.99, "rollout_steps": 8, "seed": 1, "num_processes": 2}
ACCEPTED_ON_RESUME = {"learning_rate": 1e-5, "max_train_steps": 10, "validation_steps": 5, "checkpointing_steps": 5,
                      "mixed_precision": "bf16", "gradient_checkpointing": True, "lr_scheduler": "cosine",
                      "instance_data_dir": "/elsewhere", "report_to": "tensorboard", "compile": True}


def saved_settings(finished_run):
    return json.loads((finished_run[0] / "checkpoint-2" / lora_script.SETTINGS_FILE).read_text())


@pytest.mark.parametrize("name,value", REFUSED_ON_RESUME.items())
def test_resume_refuses_a_change_that_shapes_the_teacher_or_the_base(finished_run, name, value):
    saved = saved_settings(finished_run)
    with pytest.raises(lora_script.UserError, match=f"it was trained with --{name} "):
        lora_script.check_resume_settings(finished_run[0] / "checkpoint-2", {**saved, name: value})


def test_resume_accepts_what_only_changes_how_the_run_goes_on(finished_run, caplog):
    saved = saved_settings(finished_run)
    with caplog.at_level(logging.INFO):
        lora_script.check_resume_settings(finished_run[0] / "checkpoint-2", {**saved, **ACCEPTED_ON_RESUME})
    assert all(f"--{name} " in caplog.text for name in ACCEPTED_ON_RESUME)


def test_naming_the_default_teacher_vlm_is_no_change(tmp_path):
    default = "Qwen/Qwen3-VL-4B-Instruct"
    family = SimpleNamespace(teacher_context="vlm", default_teacher_vlm=lambda: default)
    accelerator = SimpleNamespace(num_processes=1)
    argv = [a for a in script_args(tmp_path, TINY_ZIMAGE) if a not in (str(TINY_VLM), "--teacher_vlm_name_or_path")]
    implicit = lora_script.run_settings(lora_script.parse_args(argv), accelerator, family)
    named = lora_script.run_settings(lora_script.parse_args([*argv, "--teacher_vlm_name_or_path", default]),
                                     accelerator, family)
    assert implicit == named and named["teacher_vlm_name_or_path"] == default
    edit = lora_script.run_settings(lora_script.parse_args(argv), accelerator, SimpleNamespace(teacher_context="edit"))
    assert edit["teacher_vlm_name_or_path"] is None  # an edit teacher uses no VLM, whatever is named
    # a checkpoint of an earlier version recorded the default as None: resuming it with the default is no change
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / lora_script.SETTINGS_FILE).write_text(
        json.dumps({**named, "teacher_vlm_name_or_path": None}))
    lora_script.check_resume_settings(tmp_path / "checkpoint-1", named)


# -- a full disk for samples and logs costs a warning; for the final outputs, one line -----------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_for_samples_and_logs_warns_once_each_and_the_run_ends_with_its_lora(finished_run, tmp_path,
                                                                                          monkeypatch, caplog):
    import accelerate.tracking

    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copytree(finished_run[0] / "context_cache", output_dir / "context_cache")  # the same contexts
    monkeypatch.setattr(accelerate.tracking.TensorBoardTracker, "__init__", no_space)
    monkeypatch.setattr(Image.Image, "save", no_space)
    argv = [*finished_run[1], "--output_dir", output_dir, "--max_train_steps", 1, "--validation_prompt", "a cat",
            "--report_to", "tensorboard"]
    with caplog.at_level(logging.WARNING):
        run_in_process(argv)
    warnings = [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records if "could not write" in r.getMessage()]
    assert warnings == [f"could not write {output_dir / 'logs'} (No space left on device); going on without it",
                        f"could not write {output_dir / 'samples' / 'step-000001-prompt0-0.png'} (No space left on"
                        " device); going on without it",
                        f"could not write {output_dir / 'image_0.png'} (No space left on device); going on without it"]
    assert (output_dir / lora_script.LORA_WEIGHT_NAME).is_file() and (output_dir / "README.md").is_file()
    assert not list(output_dir.rglob("*.tmp")) and not list(output_dir.rglob("*.png"))


def half_then_no_space(path, *args, **kwargs):
    Path(path).write_bytes(b"half written")
    no_space()


@pytest.mark.parametrize("output,writer", [(lora_script.LORA_WEIGHT_NAME, "save_file"), ("README.md", "card")])
def test_a_full_disk_for_the_final_outputs_is_one_line_naming_the_checkpoint(finished_run, tmp_path, capsys,
                                                                             monkeypatch, output, writer):
    from huggingface_hub import ModelCard

    output_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], output_dir)
    previous = (output_dir / output).read_bytes()
    if writer == "card":
        monkeypatch.setattr(ModelCard, "save", lambda card, path: half_then_no_space(path))
    else:
        monkeypatch.setattr(lora_script, "save_file", lambda tensors, path, **kwargs: half_then_no_space(path))
    monkeypatch.setattr(sys, "argv", ["train.py", *finished_run[1], "--output_dir", str(output_dir),
                                      "--resume_from_checkpoint", "latest"])
    with pytest.raises(SystemExit) as exit_info:
        lora_script.run()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: could not write {output_dir / output} (No space left on device); checkpoint-2 is the last"
        " checkpoint. Free disk space and rerun with --resume_from_checkpoint latest")
    assert (output_dir / output).read_bytes() == previous and not list(output_dir.rglob("*.tmp"))


# -- SIGINT and SIGTERM in every phase --------------------------------------------------------------------------------


def signalling(function, *signals):
    """`function`, then these signals sent to this process, for real; refused if the run has no handler (the
    default SIGTERM handler would end the test process)."""
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        for sig in signals:
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN), f"no {sig.name} handler"
            os.kill(os.getpid(), sig)
        return result

    return wrapper


RESUME = "--resume_from_checkpoint latest"
PHASES = [  # (phase, what the signal follows, signals, exit status, the line's start)
    ("loading", "collect_examples", [signal.SIGTERM], 143, "interrupted before training started; rerun the same"
     " command (contexts cached so far are kept)"),
    ("caching", "cache_contexts", [signal.SIGINT], 130, "interrupted before training started"),
    ("training", "dopsd_step", [signal.SIGTERM, signal.SIGTERM], 143, "interrupted at step 1; checkpoint-1 is the"
     " last checkpoint. To continue: "),
    ("saving", "export_lora", [signal.SIGINT], 130, "interrupted while writing the outputs (none is half-written);"
     " checkpoint-2 is the last checkpoint. To write them: "),
]


@pytest.mark.parametrize("phase,after,signals,status,expected", PHASES, ids=[p[0] for p in PHASES])
def test_a_signal_in_any_phase_ends_in_one_line(finished_run, tmp_path, capsys, monkeypatch, phase, after, signals,
                                                status, expected):
    output_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], output_dir)
    if phase == "training":  # continue from checkpoint-1, so that a step is trained
        shutil.rmtree(output_dir / "checkpoint-2")
    (output_dir / lora_script.LORA_WEIGHT_NAME).unlink()
    monkeypatch.setattr(lora_script, after, signalling(getattr(lora_script, after), *signals))
    monkeypatch.setattr(sys, "argv", ["train_dopsd_lora.py", *finished_run[1], "--output_dir", str(output_dir),
                                      *RESUME.split()])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        lora_script.run()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == status
    assert last.startswith(f"error: {expected}")
    assert phase in ("loading", "caching") or last.endswith(RESUME)
    assert not (output_dir / lora_script.LORA_WEIGHT_NAME).exists() and not list(output_dir.rglob("*.tmp"))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # run() restores them


# -- every file a run reads may be damaged ----------------------------------------------------------------------------


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {  # file in checkpoint-2: damage
    "ema_teacher.safetensors": truncated, "pytorch_lora_weights.safetensors": truncated, "optimizer.bin": truncated,
    "scheduler.bin": lambda path: path.write_bytes(b"garbage"), "run_settings.json": truncated,
    "random_states_0.pkl": lambda path: path.write_bytes(b""), "rollout_noise_0.safetensors": Path.unlink,
}


def damaged_copy(finished_run, folder, name):
    shutil.copytree(finished_run[0], folder)
    DAMAGES[name](folder / "checkpoint-2" / name)
    return folder


@pytest.mark.parametrize("name", DAMAGES)
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_newest_intact_one(finished_run, tmp_path, capsys,
                                                                                    monkeypatch, name):
    output_dir = damaged_copy(finished_run, tmp_path / "run", name)
    monkeypatch.setattr(sys, "argv", ["train.py", *finished_run[1], "--output_dir", str(output_dir),
                                      "--resume_from_checkpoint", "checkpoint-2"])
    with pytest.raises(SystemExit) as exit_info:
        lora_script.run()
    assert exit_info.value.code == 2
    damage = "is missing" if name.startswith("rollout_noise") else "is damaged ("
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: cannot resume from {output_dir / 'checkpoint-2'}: {output_dir / 'checkpoint-2' / name} {damage}")
    assert lora_script.find_resume_checkpoint("checkpoint-1", output_dir) == output_dir / "checkpoint-1"
    with pytest.raises(lora_script.UserError, match=f"; checkpoint-1 is the newest intact checkpoint: resume with"
                                                    f" --resume_from_checkpoint {output_dir / 'checkpoint-1'}$"):
        lora_script.find_resume_checkpoint("checkpoint-2", output_dir)


def test_resuming_latest_past_a_damaged_checkpoint_ends_with_the_uninterrupted_weights(finished_run, tmp_path,
                                                                                        caplog):
    output_dir = damaged_copy(finished_run, tmp_path / "run", "ema_teacher.safetensors")
    with caplog.at_level(logging.WARNING):
        run_in_process([*finished_run[1], "--output_dir", output_dir, "--resume_from_checkpoint", "latest"])
    assert (f"{output_dir / 'checkpoint-2' / 'ema_teacher.safetensors'} is damaged" in caplog.text
            and "resuming from checkpoint-1, the newest intact checkpoint" in caplog.text)
    for name in (lora_script.LORA_WEIGHT_NAME, "checkpoint-2/ema_teacher.safetensors"):
        again, uninterrupted = load_file(output_dir / name), load_file(finished_run[0] / name)
        assert again.keys() == uninterrupted.keys() and all(torch.equal(again[k], uninterrupted[k]) for k in again)


@pytest.mark.parametrize("name", ["transformer/diffusion_pytorch_model.safetensors", "model_index.json"])
def test_a_damaged_model_file_is_named(tmp_path, capsys, monkeypatch, name):
    model = tmp_path / "model"
    shutil.copytree(TINY_ZIMAGE, model)
    truncated(model / name)
    monkeypatch.setattr(sys, "argv", ["train.py", *script_args(tmp_path / "out", model)])
    with pytest.raises(SystemExit) as exit_info:
        lora_script.run()
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {model / name} is damaged (") and last.endswith("): copy or download it again")


def test_damage_is_found_from_headers_without_reading_tens_of_gigabytes(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [8 << 30], "data_offsets": [0, 32 << 30]}}).encode()
    big = tmp_path / "optimizer-sized.safetensors"
    with open(big, "wb") as file:  # sparse: 32 GiB long, almost nothing on disk
        file.write(len(header).to_bytes(8, "little") + header)
        file.truncate(8 + len(header) + (32 << 30))
    torch.save({"step": torch.zeros(3)}, tmp_path / "scheduler.bin")
    assert lora_script.damaged_file(tmp_path) is None
    os.truncate(big, big.stat().st_size - 1)
    assert lora_script.damaged_file(tmp_path) == f"{big} is damaged ({big.stat().st_size} bytes, not the size its" \
                                                 " header gives)"
    big.unlink()
    os.truncate(tmp_path / "scheduler.bin", 100)
    assert lora_script.damaged_file(tmp_path).startswith(f"{tmp_path / 'scheduler.bin'} is damaged (")
