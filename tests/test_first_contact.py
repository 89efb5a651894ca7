"""What a newcomer meets first: the real reason a pipeline cannot be loaded, and a --help that documents every flag."""

import argparse
import json
import logging

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
