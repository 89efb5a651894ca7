"""Adding a model family is one class and one MODEL_FAMILIES entry (README, "Adding a model family").

A minimal third family, built from Z-Image-Turbo's parts but with a pipeline class, name, defaults, guidance and a
flag of its own, is registered and trained by the unchanged LoRA script: everything the run does differently comes
from the class.
"""

import json
import shutil
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import CONCEPT, TINY_ZIMAGE, load_lora_into_pipeline, lora_script as script, script_args
from safetensors.torch import load_file

from diffusers import ZImagePipeline


class ThirdPipeline(ZImagePipeline):
    """A new model's pipeline, as diffusers would ship it (here: Z-Image-Turbo's under another name)."""


class ThirdFamily(script.ZImageTurbo):
    name = "Third-Family"
    pipeline_class_name = "ThirdPipeline"
    pipeline_class = ThirdPipeline  # the shipped families look theirs up in diffusers by name
    modelspec_architecture = "Third-Family"
    hub_tags = ("third-family",)
    guidance_scale = 0.0  # its pipeline's "no CFG" (a name-based guess would give 1.0)
    default_inference_steps = 3
    default_learning_rate = 3e-4
    default_lora_layers = "to_q,to_v"

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--caption_prefix", type=str, default="", help="Text put before every student caption.")

    def context_fingerprint(self):
        return {**super().context_fingerprint(), "caption_prefix": self.args.caption_prefix}

    def encode_student_context(self, caption):
        return super().encode_student_context(self.args.caption_prefix + caption)


@pytest.fixture
def third_family(tmp_path, monkeypatch):
    """ThirdFamily registered, and a tiny pipeline folder of its own (the tiny Z-Image-Turbo, renamed)."""
    monkeypatch.setitem(script.MODEL_FAMILIES, ThirdFamily.pipeline_class_name, ThirdFamily)
    model = tmp_path / "third-model"
    shutil.copytree(TINY_ZIMAGE, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "ThirdPipeline"}))
    return model


def test_a_registered_family_brings_its_flags_and_refuses_others(third_family, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "Third-Family only:\n  --caption_prefix" in help_text
    # the help lists its defaults beside the others' (--validation_inference_steps)
    assert "8(Z-Image-Turbo),4(FLUX.2-klein),3(Third-Family)" in "".join(help_text.split())  # wrapped at hyphens
    # another family's flag is one clear line, before anything is loaded
    monkeypatch.setattr(sys, "argv", ["train_dopsd_lora.py", *script_args(tmp_path / "out", TINY_ZIMAGE,
                                                                           "--caption_prefix", "sks ")])
    with pytest.raises(SystemExit) as exit_info:
        script.run()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert last == "error: --caption_prefix applies to Third-Family only, not to Z-Image-Turbo"
    assert not (tmp_path / "out").exists()


def test_a_third_family_trains_with_its_own_defaults_guidance_and_flag(third_family, tmp_path):
    data = tmp_path / "one-image"
    data.mkdir()
    for name in ("chelsea-1.jpg", "chelsea-1.txt"):
        shutil.copy(CONCEPT / name, data / name)
    output_dir = tmp_path / "out"
    args = script.parse_args(script_args(output_dir, third_family, "--max_train_steps", 1, "--caption_prefix",
                                         "sks ", "--validation_prompt", "a cat", "--validation_steps", 1, data=data))
    script.main(args)

    # the family's defaults, resolved in one place and recorded with the checkpoint
    settings = json.loads((output_dir / "checkpoint-1" / script.SETTINGS_FILE).read_text())
    assert (settings["learning_rate"], settings["validation_inference_steps"]) == (3e-4, 3)
    assert (settings["lora_layers"], settings["teacher_context"]) == ("to_q,to_v", "vlm")
    assert settings["caption_prefix"] == "sks "
    # its guidance, step count, name and tags on the model card
    card = (output_dir / "README.md").read_text()
    assert "from diffusers import ThirdPipeline" in card and "D-OPSD LoRA for Third-Family" in card
    assert "num_inference_steps=3,\n             guidance_scale=0.0" in card and "- third-family" in card
    # its flag shaped the cached student contexts: each equals the base encoding of the prefixed caption
    family = ThirdFamily(args, torch.float32, torch.device("cpu"))
    examples = script.collect_examples(args, family.resolution_multiple)
    store = script.ContextStore(family, examples, Accelerator(cpu=True), output_dir)
    cached = load_file(store.path(examples[0], "student"))["prompt_embeds"]
    expected = script.ZImageTurbo.encode_student_context(family, "sks " + examples[0].caption)["prompt_embeds"]
    assert torch.equal(cached, expected)
    assert not torch.equal(cached, script.ZImageTurbo.encode_student_context(family, examples[0].caption)[
        "prompt_embeds"])
    # the LoRA (on its own default layers) loads into the family's pipeline, every key applied
    saved = load_lora_into_pipeline(ThirdPipeline.from_pretrained(third_family), output_dir)
    assert saved and all(".to_q." in key or ".to_v." in key for key in saved)
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["step-000001-prompt0-0.png",
                                                                          "step-000001-teacher-view.png"]
