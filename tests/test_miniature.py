"""The miniature world (examples/miniature) at smoke sizes: it builds into a klein pipeline the trainer loads, and
the experiment's pipeline (train with the trainer, sample, score, tabulate) runs end to end on it."""

import dataclasses
import json
import sys

import numpy as np
import safetensors.torch
import torch
from PIL import Image

from conftest import ROOT, lora_script


sys.path.insert(0, str(ROOT / "examples" / "miniature"))

import build_world  # noqa: E402
import run_experiment  # noqa: E402


def test_world_builds_and_fine_tuning_changes_its_samples(tmp_path):
    torch.set_num_threads(1)
    world = tmp_path / "world"
    record = build_world.build(world, build_world.SMOKE_SIZES, log=lambda *_: None)

    # A FLUX.2-klein folder that the trainer recognises, with batch-norm statistics measured on the data.
    assert json.loads((world / "model" / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    family = build_world.load_family(world / "model", 64, tmp_path / "scratch", build_world.text_tokens(world))
    assert isinstance(family, lora_script.Flux2Klein) and family.pipeline.vae_scale_factor == 4
    assert family.pipeline.vae.bn.running_mean.abs().sum() > 0
    assert not torch.allclose(family.pipeline.vae.bn.running_var, torch.ones(16))
    photos = sorted((world / "concept").glob("*.png"))
    assert len(photos) == 6 and all(Image.open(p).size == (64, 64) for p in photos)
    assert {p.with_suffix(".txt").read_text().strip() for p in photos} == {build_world.CONCEPT_CAPTION}
    assert set(record["metrics"]) >= {"pretrained_4_steps", "distilled_4_steps", "distilled_reference_concept_accuracy"}

    sizes = {"concept_samples": 4, "prior_per_shape": 1}
    settings = dict(run_experiment.FINE_TUNE, max_train_steps=2, gradient_accumulation_steps=1)
    base = run_experiment.run_one(world, tmp_path / "base", "base", 0, settings, **sizes)
    tuned = run_experiment.run_one(world, tmp_path / "dopsd", "dopsd", 0, settings, **sizes)
    assert (tmp_path / "dopsd" / lora_script.LORA_WEIGHT_NAME).exists()
    assert tuned["concept_pixels"].shape == (4, 3, 64, 64) and tuned["prior_pixels"].shape == (8, 3, 64, 64)
    assert not torch.allclose(tuned["concept_latents"], base["concept_latents"])  # the LoRA changed the model

    evaluation = run_experiment.Evaluation(world, tmp_path / "scratch", **sizes)
    scores = evaluation.scores(tuned, base)
    assert scores["prior_drift"] > 0 and evaluation.scores(base, base)["prior_drift"] == 0
    for name in ("concept_accuracy", "prior_accuracy", "prior_bleed", "palette_prior", "near_copies"):
        assert 0 <= scores[name] <= 1
    assert scores["diversity_rms"] > 0 and scores["nearest_photo_rms"] > 0
    assert 0.5 < evaluation.palette_ceiling()["photos"] <= 1  # flat colours: most pixels are palette colours

    table = run_experiment.summarise({"base": [evaluation.scores(base, base)], "dopsd": [scores]})
    assert run_experiment.markdown_table(table, (0,)).count("\n") == 4
    run_experiment.write_grid(tmp_path / "grid.png", {"base": base, "dopsd": tuned}, evaluation.photos)
    assert Image.open(tmp_path / "grid.png").size == (88 + 8 * 64, 4 * 64)


def test_a_world_built_on_another_reuses_its_codec_and_judge_and_continues_its_pretraining(tmp_path):
    torch.set_num_threads(1)
    sizes = build_world.SMOKE_SIZES
    first = build_world.build(tmp_path / "first", sizes, log=lambda *_: None)
    logged = []
    style = dataclasses.replace(sizes, reference_task="style", speckle=0.3)
    second = build_world.build(tmp_path / "second", style, log=logged.append, reuse=tmp_path / "first")
    assert first["pretrain_steps_total"] == sizes.pretrain_steps and first["reused_from_earlier_build"] == []
    assert second["pretrain_steps_total"] == 2 * sizes.pretrain_steps
    assert second["reused_from_earlier_build"] == ["vae", "classifier"]
    assert any("pretraining continues from" in str(line) for line in logged)
    for name in ("model/vae/diffusion_pytorch_model.safetensors", "classifier.pt"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    # the pretraining went on from the first world's pretrained weights, so the second's differ from them
    pretrained = [safetensors.torch.load_file(tmp_path / world / "pretrained" / "diffusion_pytorch_model.safetensors")
                  for world in ("first", "second")]
    assert pretrained[0].keys() == pretrained[1].keys()
    assert any(not torch.equal(pretrained[0][key], pretrained[1][key]) for key in pretrained[0])

    # The second world's concept is the held-out colour scheme: its photos show it, the first world's (hearts) do not;
    # its backgrounds are speckled, and blurring takes away the detail that measures.
    classifier = build_world.load_classifier(tmp_path / "first")
    for world, expected in (("first", False), ("second", True)):
        photos = sorted((tmp_path / world / "concept").glob("*.png"))
        pixels = (build_world.to_pixels([Image.open(p).convert("RGB") for p in photos]) + 1) / 2
        assert build_world.shows_concept(pixels, classifier, "style").tolist() == [expected] * 6, world
        speckles = build_world.share_near(pixels, build_world.SPECKLE_TENSOR)
        assert (speckles > 0.1).tolist() == [expected] * 6, world
    blurred = torch.nn.functional.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
    assert (build_world.detail(blurred) < 0.7 * build_world.detail(pixels)).all()
    # A style pair: the target is in the reference's two colours, and its caption names a prior shape or is the nonce
    # form.
    rng = np.random.default_rng(0)
    for _ in range(8):
        reference, target, caption = build_world.style_pair(rng, style, build_world.random_layout(rng, "star", 64),
                                                             ["qzx"])
        assert commonest_colours(reference) == commonest_colours(target)
        assert caption == "a photo of qzx shape" or caption.removeprefix("a photo of a ") in build_world.PRIOR_SHAPES


def commonest_colours(image):
    """The two commonest colours of a render, the speckle grey left out: its foreground and background."""
    counted = [colour for _, colour in sorted(image.getcolors(image.width * image.height), reverse=True)]
    return set([colour for colour in counted if colour != build_world.SPECKLE][:2])
