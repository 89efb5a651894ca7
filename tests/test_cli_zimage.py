"""The script as a user runs it, end to end on the tiny Z-Image-Turbo: outputs, loading in diffusers, resume, Hub,
and a bad input's one line without a traceback in a real process (every bad input: tests/test_bad_inputs.py)."""

import json
import logging
import re
import shutil
import sys

import pytest
import torch
from conftest import load_lora_into_pipeline, CONCEPT, TINY_ZIMAGE, lora_script as script, run_in_process, run_script
from conftest import ROOT, script_args
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from diffusers import ZImagePipeline


README = ROOT / "README.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three steps of one batch each via `accelerate launch`, a checkpoint after each, validation at the end, logged
    to wandb (offline)."""
    output_dir = tmp_path_factory.mktemp("zimage-run")
    result = run_script(script_args(output_dir, TINY_ZIMAGE, "--max_train_steps", 3, "--checkpointing_steps", 1,
                                    "--gradient_accumulation_steps", 1, "--validation_steps", 3,
                                    "--validation_prompt", "a photo of sks cat", "--ema_decay", 0.9,
                                    "--learning_rate", 1e-3, "--rank", 8, "--lora_alpha", 16, "--report_to", "wandb"),
                        launcher="accelerate", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    return output_dir, result


def test_run_writes_lora_checkpoints_and_samples(trained):
    output_dir, _ = trained
    assert (output_dir / script.LORA_WEIGHT_NAME).is_file()
    for step in (1, 2, 3):
        checkpoint = output_dir / f"checkpoint-{step}"
        assert (checkpoint / script.LORA_WEIGHT_NAME).is_file() and (checkpoint / "ema_teacher.safetensors").is_file()
    samples = sorted(p.name for p in (output_dir / "samples").iterdir())
    assert samples == ["step-000003-prompt0-0.png", "step-000003-teacher-view.png"]
    assert Image.open(output_dir / "samples" / samples[0]).size == (64, 64)
    # the final LoRA is the last checkpoint's student, exported in bf16 with alpha / r (16 / 8) folded into lora_B;
    # the checkpoint keeps the fp32 training representation
    final = load_file(output_dir / script.LORA_WEIGHT_NAME)
    last = load_file(output_dir / "checkpoint-3" / script.LORA_WEIGHT_NAME)
    assert final.keys() == last.keys()
    for key in final:
        assert final[key].dtype == torch.bfloat16 and last[key].dtype == torch.float32
        scale = 2.0 if ".lora_B." in key else 1.0
        torch.testing.assert_close(final[key], (scale * last[key]).to(torch.bfloat16))


def test_a_run_names_its_device_logs_above_the_progress_bar_and_writes_only_its_output_folder(trained):
    output_dir, result = trained
    lines = re.split(r"[\r\n]", result.stderr)
    # the precision is said, not silent (accelerate launch --cpu: fp32)
    assert any(line.endswith("] training on cpu in fp32") for line in lines), result.stderr[-3000:]
    # each log line is a line of its own, also those written while the progress bar shows (the validation's)
    logged = [line for line in lines if re.search(r" - (INFO|WARNING) - ", line)]
    assert any("validation at step 3:" in line for line in logged)
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - ", line) for line in logged), logged
    # wandb's run folder is in the output folder's logs, not in the current directory (here the repository)
    assert any(p.name.startswith("offline-run-") for p in (output_dir / "logs" / "wandb").iterdir())
    started = output_dir.stat().st_ctime
    assert not any(p.stat().st_mtime >= started for p in (ROOT / "wandb").glob("*"))
    # the output folder holds what the README's quick start lists, nothing else
    listed = re.search(r"leaves in `outputs/quickstart/`: (.*?)The images are", README.read_text(), re.S).group(1)
    listed = {re.sub(r"-\d+$", "-N", name.rstrip("/")) for name in re.findall(r"`([^`]+)`", listed)
              if not name.startswith("--")}  # (flags named on the way)
    written = {re.sub(r"-\d+$", "-N", path.name) for path in output_dir.iterdir()}
    assert written == listed


def test_ema_teacher_is_updated_after_every_optimizer_step(trained):
    """teacher_i = d * teacher_{i-1} + (1 - d) * student_i, read back from consecutive checkpoints (d = 0.9: a
    swapped d and 1 - d would fail)."""
    output_dir, _ = trained
    for step in (2, 3):
        previous = load_file(output_dir / f"checkpoint-{step - 1}" / "ema_teacher.safetensors")
        teacher = load_file(output_dir / f"checkpoint-{step}" / "ema_teacher.safetensors")
        student = load_file(output_dir / f"checkpoint-{step}" / script.LORA_WEIGHT_NAME)
        assert len(teacher) == len(student) > 0
        for name, value in teacher.items():
            student_key = "transformer." + name.replace(".default", "")
            torch.testing.assert_close(value, 0.9 * previous[name] + 0.1 * student[student_key])
        assert any((teacher[n] - previous[n]).abs().max() > 0 for n in teacher)


def test_lora_loads_in_the_stock_pipeline_and_changes_its_images(trained):
    output_dir, _ = trained
    pipe = ZImagePipeline.from_pretrained(TINY_ZIMAGE)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a photo of sks cat", height=64, width=64, num_inference_steps=4, guidance_scale=0.0,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = generate()
    load_lora_into_pipeline(pipe, output_dir)
    # trained at rank 8, alpha 16 (scale 2); the export folds the 2 into lora_B and records alpha = rank, so the
    # pipeline's weight change is the trained one (the last checkpoint keeps the training representation)
    with safe_open(output_dir / script.LORA_WEIGHT_NAME, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (8, 8)
    to_q = pipe.transformer.layers[0].attention.to_q
    adapter = pipe.get_active_adapters()[0]
    assert to_q.scaling[adapter] == 1.0
    trained = load_file(output_dir / "checkpoint-3" / script.LORA_WEIGHT_NAME)
    key = "transformer.layers.0.attention.to_q.lora_{}.weight"
    expected = 2.0 * trained[key.format("B")] @ trained[key.format("A")]
    applied = to_q.scaling[adapter] * to_q.lora_B[adapter].weight.float() @ to_q.lora_A[adapter].weight.float()
    torch.testing.assert_close(applied, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    after = generate()
    assert abs(after - before).max() > 1e-3


def resume_from_checkpoint_2(trained, output_dir, *extra):
    """A copy of the fixture run without its last checkpoint, resumed to step 3 in this process; returns the final
    LoRA and the step-3 teacher. checkpoint-2 lies mid-epoch (4 images, one per step): the resumed step must take
    the epoch's third batch, not replay its first."""
    shutil.copytree(trained[0], output_dir)
    shutil.rmtree(output_dir / "checkpoint-3")
    run_in_process(script_args(output_dir, TINY_ZIMAGE, "--max_train_steps", 3, "--checkpointing_steps", 1,
                               "--gradient_accumulation_steps", 1, "--validation_steps", 100, "--ema_decay", 0.9,
                               "--learning_rate", 1e-3, "--rank", 8, "--lora_alpha", 16,
                               "--resume_from_checkpoint", "latest", *extra))
    return (load_file(output_dir / "checkpoint-3" / script.LORA_WEIGHT_NAME),
            load_file(output_dir / "checkpoint-3" / "ema_teacher.safetensors"))


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(trained, tmp_path, caplog):
    """Resumed mid-epoch from checkpoint-2, step 3 is the uninterrupted run's step 3: same batch, noise, optimizer
    state and teacher."""
    output_dir, _ = trained
    with caplog.at_level(logging.INFO):
        student, teacher = resume_from_checkpoint_2(trained, tmp_path / "resumed")
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    for resumed, uninterrupted in ((student, load_file(output_dir / "checkpoint-3" / script.LORA_WEIGHT_NAME)),
                                   (teacher, load_file(output_dir / "checkpoint-3" / "ema_teacher.safetensors"))):
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-7, msg=key)
    assert load_file(tmp_path / "resumed" / script.LORA_WEIGHT_NAME).keys() == student.keys()


def test_a_resume_takes_the_new_learning_rate(trained, tmp_path):
    """Resumed at a tenth of the learning rate, the step from checkpoint-2 is a tenth of the uninterrupted one (Adam:
    same moments, same gradient, the update scales with the rate)."""
    output_dir, _ = trained
    student, _ = resume_from_checkpoint_2(trained, tmp_path / "resumed", "--learning_rate", 1e-4)
    before = load_file(output_dir / "checkpoint-2" / script.LORA_WEIGHT_NAME)
    uninterrupted = load_file(output_dir / "checkpoint-3" / script.LORA_WEIGHT_NAME)
    for key in student:
        torch.testing.assert_close(student[key] - before[key], 0.1 * (uninterrupted[key] - before[key]),
                                   rtol=1e-3, atol=1e-6, msg=key)  # atol: fp32 rounding of the weights


def test_the_training_loop_clips_the_gradient_norm(trained, tmp_path):
    """Every optimizer step of a run sees gradients of norm --max_grad_norm at most (here far below their norm)."""
    norms = []

    def record(optimizer, args, kwargs):
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients])).item())

    hook = register_optimizer_step_pre_hook(record)
    try:
        resume_from_checkpoint_2(trained, tmp_path / "resumed", "--max_grad_norm", 1e-4)
    finally:
        hook.remove()
    assert norms and all(n == pytest.approx(1e-4, rel=1e-3) for n in norms), norms


def test_failed_upload_keeps_outputs_and_prints_the_retry_command(tmp_path):
    token = "hf_secret_test_token_123"
    result = run_script(script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", 1, "--push_to_hub",
                                    "--hub_model_id", "someone/sks-cat", "--validation_prompt", "sks cat"),
                        check=False, env={"HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert "upload to the Hub failed" in result.stderr and "hf upload someone/sks-cat" in result.stderr
    assert (tmp_path / script.LORA_WEIGHT_NAME).is_file()
    card = (tmp_path / "README.md").read_text()
    assert "D-OPSD" in card and "load_lora_weights" in card  # a local base model is named, not a base_model
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in {".md", ".json", ".yml", ".txt"}:
            assert token not in path.read_text()
    assert token not in result.stdout + result.stderr


def test_skip_bad_images_skips_with_a_warning(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("chelsea-1.jpg", "chelsea-1.txt", "chelsea-2.jpg", "chelsea-2.txt"):
        (data / name).write_bytes((CONCEPT / name).read_bytes())
    (data / "broken.png").write_bytes(b"garbage")
    Image.new("RGB", (20, 20)).save(data / "tiny.png")
    args = script.parse_args(script_args(tmp_path / "out", TINY_ZIMAGE, "--skip_bad_images", "--instance_prompt",
                                         "sks", data=data))
    with caplog.at_level(logging.WARNING):
        examples = script.collect_examples(args, 16)
    assert sorted({e.source.rsplit("/", 1)[1] for e in examples}) == ["chelsea-1.jpg", "chelsea-2.jpg"]
    assert "broken.png" in caplog.text and "tiny.png" in caplog.text and "20x20" in caplog.text


def test_cli_prints_no_traceback(tmp_path):
    result = run_script(script_args(tmp_path, TINY_ZIMAGE, data=tmp_path / "nowhere"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --instance_data_dir")
    assert "Traceback" not in result.stderr


def test_local_dataset_folder_is_read_lazily_with_its_columns(tmp_path, capsys, monkeypatch):
    data = tmp_path / "dataset"
    data.mkdir()
    lines = []
    for index, name in enumerate(("chelsea-1.jpg", "chelsea-3.jpg")):
        (data / name).write_bytes((CONCEPT / name).read_bytes())
        lines.append(json.dumps({"file_name": name, "text": f"sks cat, photo {index}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    args = script.parse_args(["--pretrained_model_name_or_path", str(TINY_ZIMAGE), "--dataset_name", str(data),
                              "--caption_column", "text", "--output_dir", str(tmp_path / "out"), "--resolution", "64"])
    examples = script.collect_examples(args, 16)
    assert sorted(e.caption for e in examples) == ["sks cat, photo 0", "sks cat, photo 1"]
    assert all(e.source.startswith("dataset:") for e in examples)
    assert {e.load().size for e in examples} == {Image.open(CONCEPT / "chelsea-1.jpg").size,
                                                  Image.open(CONCEPT / "chelsea-3.jpg").size}
    monkeypatch.setattr(sys, "argv", ["train_dopsd_lora.py", "--pretrained_model_name_or_path", str(TINY_ZIMAGE),
                                      "--dataset_name", str(data), "--caption_column", "caption",
                                      "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        script.run()
    assert exit_info.value.code == 2
    assert "has no column 'caption' (columns: image, text)" in capsys.readouterr().err


def test_uncached_contexts_train_exactly_like_cached_ones(tmp_path):
    """--no-cache_contexts keeps the encoders and computes contexts per batch: same contexts, same LoRA."""
    runs = {}
    for flag in ("--cache_contexts", "--no-cache_contexts"):
        output_dir = tmp_path / flag.strip("-")
        run_in_process(script_args(output_dir, TINY_ZIMAGE, "--max_train_steps", 2, "--learning_rate", 1e-3, flag))
        runs[flag] = load_file(output_dir / script.LORA_WEIGHT_NAME)
        assert (output_dir / "context_cache").exists() == (flag == "--cache_contexts")
    cached, uncached = runs.values()
    assert cached.keys() == uncached.keys()
    for key in cached:
        assert torch.equal(cached[key], uncached[key]), key
