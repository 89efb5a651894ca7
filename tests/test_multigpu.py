"""Both scripts under each multi-GPU engine, run as two CPU processes (gloo): DDP, DeepSpeed ZeRO-2 as shipped
(examples/accelerate/deepspeed_zero2.yaml + .json) and, for full fine-tuning, FSDP2 (examples/accelerate/fsdp2.yaml).

Two `accelerate launch`es (DeepSpeed; FSDP2 with the DDP runs) hold every training run (tests/multigpu_worker.py):
a 2-step run with a checkpoint after each step, and a copy of it without checkpoint-2 resumed from checkpoint-1.
Each run records what the network predicts as student and, inside the EMA teacher's swap, as teacher (at its last
validation), and its final weights per process (DDP and DeepSpeed).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import CONCEPT, ROOT, TINY_VLM, TINY_ZIMAGE
from safetensors.torch import load_file

import train_dopsd_full as full_script
from diffusers import ZImageTransformer2DModel


SCRIPTS = ("train_dopsd_full", "train_dopsd_lora")
RUN = ["--pretrained_model_name_or_path", str(TINY_ZIMAGE), "--teacher_vlm_name_or_path", str(TINY_VLM),
       "--instance_data_dir", str(CONCEPT), "--resolution", "64", "--report_to", "none", "--seed", "0",
       "--mixed_precision", "no", "--learning_rate", "1e-3", "--lr_scheduler", "linear", "--ema_decay", "0.9",
       "--max_train_steps", "2",
       "--gradient_accumulation_steps", "2", "--checkpointing_steps", "1", "--rollout_steps", "2",
       "--prior_prompts", "--validation_inference_steps", "2"]
DEEPSPEED = ["--config_file", str(ROOT / "examples" / "accelerate" / "deepspeed_zero2.yaml")]
FSDP2 = ["--config_file", str(ROOT / "examples" / "accelerate" / "fsdp2.yaml")]
DDP_RUN = {"ACCELERATE_USE_FSDP": "false"}  # in the FSDP2 launch: the processes' DDP runs


def launch(options, folder, runs, port, env=None):
    """Every run in `runs` ((script, engine, resume), engine "ddp" for DDP) in one launch; returns {(script, engine,
    "uninterrupted" | "resumed"): output folder}."""
    specs, folders = [], {}
    for script, engine, resume in runs:
        flags = ["--save_ema"] if script == "train_dopsd_full" else []
        uninterrupted, resumed = folder / engine / script / "uninterrupted", folder / engine / script / "resumed"
        specs.append({"script": script, "argv": [*RUN, *flags, "--output_dir", str(uninterrupted)],
                      "env": DDP_RUN if engine == "ddp" else {}})
        if folders:  # the contexts the first run computed (the same for every run here)
            specs[-1]["copy"] = {"from": str(next(iter(folders.values()))), "only": ["context_cache"]}
        folders[script, engine, "uninterrupted"] = uninterrupted
        if resume:
            specs.append({"script": script, "argv": [*RUN, *flags, "--output_dir", str(resumed),
                                                     "--resume_from_checkpoint", "latest"],
                          "copy": {"from": str(uninterrupted), "drop": ["checkpoint-2"]}})
            folders[script, engine, "resumed"] = resumed
    command = [sys.executable, "-m", "accelerate.commands.launch", *options, "--num_processes", "2",
               "--main_process_port", str(port), str(ROOT / "tests" / "multigpu_worker.py"), json.dumps(specs)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    assert result.returncode == 0, result.stderr[-6000:]
    return folders


@pytest.fixture(scope="module")
def deepspeed(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return launch(DEEPSPEED, tmp_path_factory.mktemp("deepspeed"),
                  [(script, "deepspeed", True) for script in SCRIPTS], port=29542)


@pytest.fixture(scope="module")
def fsdp2_and_ddp(tmp_path_factory):
    return launch(FSDP2, tmp_path_factory.mktemp("fsdp2"),
                  [*[(script, "ddp", False) for script in SCRIPTS], ("train_dopsd_full", "fsdp2", True)],
                  port=29543, env={"ACCELERATE_USE_CPU": "true"})


def probe(folder, rank=0):
    return torch.load(folder / f"probe-{rank}.pt")


def assert_same(got, expected, exact):
    assert got.keys() == expected.keys()
    for key in expected:
        if exact:
            assert torch.equal(got[key], expected[key]), key
        else:  # fp32: the engines sum the two processes' gradients in another order
            torch.testing.assert_close(got[key], expected[key], msg=key)


def saved(folder, name):
    files = {"student": "transformer/diffusion_pytorch_model.safetensors",
             "teacher": "transformer_ema/diffusion_pytorch_model.safetensors",
             "ema": "checkpoint-2/ema_teacher.safetensors"}
    return load_file(folder / files[name])


def predict(folder, record):
    """What a plain transformer with the weights saved in `folder` predicts for the probe's input."""
    model = ZImageTransformer2DModel.from_pretrained(folder)
    family = SimpleNamespace(transformer=model)  # predict() reads only the transformer's dtype from its family
    with torch.no_grad():
        return full_script.ZImageTurbo.predict(family, model, record["latents"], record["timestep"],
                                               record["context"])


def assert_teacher_is_the_ema(folder):
    """The teacher pass predicts what the saved EMA weights predict, and not what the student predicts; the
    student's weights are back, bit for bit, after it."""
    record = probe(folder)
    assert (record["teacher"] - record["student"]).abs().max() > 1e-2  # training moved the student off the teacher
    torch.testing.assert_close(record["teacher"], predict(folder / "transformer_ema", record))
    torch.testing.assert_close(record["student"], predict(folder / "transformer", record))
    assert torch.equal(record["again"], record["student"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_deepspeed_zero2_as_shipped_trains_what_ddp_trains_and_resumes_exactly(deepspeed, fsdp2_and_ddp, script):
    uninterrupted, resumed = deepspeed[script, "deepspeed", "uninterrupted"], deepspeed[script, "deepspeed", "resumed"]
    reference = fsdp2_and_ddp[script, "ddp", "uninterrupted"]
    weights = probe(uninterrupted)["weights"]
    assert_same(probe(uninterrupted, rank=1)["weights"], weights, exact=True)
    assert_same(weights, probe(reference)["weights"], exact=False)
    assert_same(saved(uninterrupted, "ema"), saved(reference, "ema"), exact=False)
    # resumed from checkpoint-1: the same student and teacher, bit for bit (every process asks the same teacher)
    assert_same(probe(resumed)["weights"], weights, exact=True)
    assert_same(probe(resumed, rank=1)["weights"], weights, exact=True)
    assert_same(saved(resumed, "ema"), saved(uninterrupted, "ema"), exact=True)
    if script == "train_dopsd_full":
        assert_teacher_is_the_ema(uninterrupted)
        # ZeRO-2 splits the fp32 master weights and AdamW state; the weights it computes with and the EMA stay whole
        held, whole = probe(uninterrupted)["bytes"], probe(reference)["bytes"]
        assert held["weights"] == whole["weights"] and held["ema"] == whole["ema"]
        assert abs(2 * held["master"] - whole["weights"]) <= whole["weights"] / 100  # half, up to alignment
        assert held["adam"] == 2 * held["master"] and whole["adam"] == 2 * whole["weights"]


def test_fsdp2_trains_what_ddp_trains_with_the_ema_teacher_on_its_shards_and_resumes_exactly(fsdp2_and_ddp):
    runs = {key[1:]: folder for key, folder in fsdp2_and_ddp.items() if key[0] == "train_dopsd_full"}
    uninterrupted, resumed = runs["fsdp2", "uninterrupted"], runs["fsdp2", "resumed"]
    reference = runs["ddp", "uninterrupted"]
    for name in ("student", "teacher", "ema"):
        assert_same(saved(uninterrupted, name), saved(reference, name), exact=False)
        assert_same(saved(resumed, name), saved(uninterrupted, name), exact=True)
    assert_teacher_is_the_ema(uninterrupted)
    assert_teacher_is_the_ema(reference)
    for key in ("student", "teacher"):  # both processes took part in every pass and got the same
        assert torch.equal(probe(uninterrupted, rank=1)[key], probe(uninterrupted)[key])
    # each process holds its half of every weight, gradient, AdamW moment and EMA tensor (DDP: all of each)
    whole, halves = probe(reference)["bytes"], [probe(uninterrupted, rank)["bytes"] for rank in (0, 1)]
    for name in ("weights", "gradients", "adam", "ema"):
        assert halves[0][name] + halves[1][name] == whole[name], name
        assert abs(halves[0][name] - halves[1][name]) <= whole[name] / 100, name  # tensors split by rows
