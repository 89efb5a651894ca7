"""What a newcomer meets first: the real reason a pipeline cannot be loaded, and a --help that documents every flag."""

import argparse
import json
import logging
from types import SimpleNamespace

import pytest
from conftest import lora_script as script, script_args

import train_dopsd_full as full_script


def load_error(tmp_path, model):
    args = script.parse_args(script_args(tmp_path / "out", model, "--cache_dir", tmp_path / "hub-cache"))
    with pytest.raises(script.UserError) as error:
        script.detect_family(args)
    return str(error.value)


def test_missing_local_folder_is_named_as_a_path_problem(tmp_path):
    missing = tmp_path / "z-image-turbo"
    assert load_error(tmp_path, missing) == f"{missing} does not exist: check the path"


def test_folder_without_model_index_is_not_a_pipeline_folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel"}))
    message = load_error(tmp_path, tmp_path / "transformer")
    assert message.endswith("has no model_index.json: give the folder of a diffusers pipeline (the one holding it)")


def test_offline_mode_with_an_uncached_hub_id_says_so_without_retry_warnings(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.WARNING):
        message = load_error(tmp_path, "Tongyi-MAI/Z-Image-Turbo")
    assert "not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE)" in message
    assert "Retrying" not in caplog.text


@pytest.mark.parametrize("module", [script, full_script], ids=["lora", "full"])
def test_help_documents_every_flag_with_its_default(module, monkeypatch, capsys):
    parsers = []

    def keep_parser(parser, args=None, namespace=None):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep_parser)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    parser = parsers[0]
    undocumented = [a.option_strings for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    # full fine-tuning refuses --quantize_base (it trains those weights), so its --help does not offer it
    assert undocumented == ([] if module is script else [["--quantize_base"]])
    text = " ".join(parser.format_help().split())
    assert "(default: 2000)" in text and "(default: 0.9999)" in text and "(default: None)" not in text
    # a default of 0 is a default like any other (0 == False once hid it)
    assert "Random seed. (default: 0)" in text and "lr schedule. (default: 0)" in text
    assert "AdamW weight decay. (default: 0.0)" in text
    if module is script:
        assert "(default: 64)" in text and "(default: bf16)" in text


def test_no_network_says_so_once_without_retry_warnings(tmp_path, monkeypatch, caplog):
    """The Hub at a closed local port stands in for no network; the backoff's sleeps are skipped to keep it fast."""
    import huggingface_hub.utils._http as hub_http
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)
    with caplog.at_level(logging.WARNING):
        message = load_error(tmp_path, "Tongyi-MAI/Z-Image-Turbo")
    assert message.startswith("cannot reach the Hugging Face Hub to download Tongyi-MAI/Z-Image-Turbo (no network?)")
    assert "Retrying" not in caplog.text


@pytest.mark.parametrize("script_name", ["train_dopsd_lora.py", "train_dopsd_full.py"])
def test_help_answers_before_the_heavy_imports(script_name):
    """`--help` is parsed before torch, diffusers and transformers are imported (they take seconds)."""
    import subprocess
    import sys

    from conftest import ROOT

    probe = ("import runpy, sys\n"
             f"sys.argv = [{script_name!r}, '--help']\n"
             "try:\n"
             f"    runpy.run_path({str(ROOT / script_name)!r}, run_name='__main__')\n"
             "except SystemExit as stop:\n"
             "    assert stop.code == 0, stop.code\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--pretrained_model_name_or_path" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def fake_gpu(monkeypatch, compute_capability_major, name="NVIDIA L4"):
    """A CUDA GPU as torch sees it; bf16 tensors can be made on it, as on every CUDA card (emulated before 8.0)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        major=compute_capability_major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_without_mixed_precision_a_gpu_with_bf16_trains_in_bf16_and_says_so(monkeypatch):
    import torch

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert script.default_mixed_precision() == "no"  # this CPU
    fake_gpu(monkeypatch, 8)  # Ampere or newer
    assert script.default_mixed_precision() == "bf16"
    # a T4 or V100: torch says it "supports" bf16 (emulated, slowly), but it has none: fp32, and the line says so
    fake_gpu(monkeypatch, 7, "Tesla T4")
    assert torch.cuda.is_bf16_supported() and not script.gpu_has_bf16()
    assert script.default_mixed_precision() == "no"
    accelerator = SimpleNamespace(device=torch.device("cuda", 0), mixed_precision="no", num_processes=2)
    assert script.device_and_precision(accelerator) == ("training on cuda:0 (Tesla T4), 2 processes in fp32;"
                                                        " --mixed_precision fp16 halves the memory (this GPU has no"
                                                        " bf16)")
    # accelerate launch's own setting (its config or flag) wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert script.default_mixed_precision() == "fp16"


def test_the_accelerate_configs_take_the_number_of_gpus_from_the_command_line():
    """No config fixes the process count (8 processes on a 2-GPU machine fail deep inside); without
    --num_processes accelerate refuses at once."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from conftest import ROOT

    for config in sorted((ROOT / "examples" / "accelerate").glob("*.yaml")):
        parsed = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "x.py"])
        assert _validate_launch_command(parsed)[0].num_processes == 2
        with pytest.raises(ValueError, match="--num_processes"):
            _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))


def test_the_install_section_names_every_optional_library_a_flag_needs():
    from conftest import ROOT

    install = ROOT.joinpath("README.md").read_text().split("## Install")[1].split("\n## ")[0]
    for library in {"bitsandbytes", "torchao", "wandb"}:  # --quantize_base/--quantize_encoders, --use_8bit_adam; wandb
        assert f"`{library}`" in install, library
