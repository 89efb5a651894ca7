"""Data (both scripts share this code): every image weighs the same whatever its caption variants, augmentation and
buckets as diffusers/kohya users expect, the context cache keyed on what determines a context, and --skip_bad_images.
(Bad data as one line naming the file: tests/test_bad_inputs.py.)"""

import collections
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import CONCEPT, TINY_KLEIN, TINY_VLM, TINY_ZIMAGE, load_family, lora_script as script, script_args
from PIL import Image
from safetensors.torch import load_file, save_file
from test_bad_inputs import TRUNCATED_ROW


def data_folder(path, captions):
    """A folder of the example concept's photos with the given caption files ({image name: text or None})."""
    path.mkdir()
    for index, (name, text) in enumerate(captions.items()):
        (path / name).write_bytes((CONCEPT / f"chelsea-{index + 1}.jpg").read_bytes())
        if text is not None:
            (path / name).with_suffix(".txt").write_text(text)
    return path


def test_caption_variants_do_not_change_how_often_an_image_is_seen(tmp_path):
    data = data_folder(tmp_path / "data", {"a.jpg": "a one\na two\na three\n", "b.jpg": "b only"})
    args = script.parse_args(script_args(tmp_path / "out", TINY_ZIMAGE, "--repeats", 2, data=data))
    examples = script.collect_examples(args, 16)
    assert len(examples) == 4  # one context each: (a, 3 variants), (b, 1 variant)
    sampler = script.BucketBatchSampler(examples, batch_size=1, repeats=2, seed=0)
    captions_used = collections.Counter()
    orders = []
    for epoch in range(12):
        sampler.start_epoch(epoch)
        visits = [examples[i] for batch in sampler for i in batch]
        assert len(sampler) == len(visits) == 4
        assert collections.Counter(e.source.rsplit("/", 1)[1] for e in visits) == {"a.jpg": 2, "b.jpg": 2}
        captions_used.update(e.caption for e in visits)
        orders.append([e.caption for e in visits])
    assert set(captions_used) == {"a one", "a two", "a three", "b only"} and captions_used["b only"] == 24
    # the draw is a function of (seed, epoch, position): a resumed run gets the same visits
    again = script.BucketBatchSampler(examples, batch_size=1, repeats=2, seed=0)
    again.start_epoch(5)
    assert [examples[i].caption for batch in again for i in batch] == orders[5]
    other_seed = script.BucketBatchSampler(examples, batch_size=1, repeats=2, seed=1)
    assert any(other_seed.start_epoch(e) or [examples[i].caption for b in other_seed for i in b] != orders[e]
               for e in range(12))


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """The tiny FLUX.2-klein with its edit teacher: contexts without a VLM, the cheapest to compute."""
    return load_family(tmp_path_factory.mktemp("klein"), TINY_KLEIN)[1]


def test_a_model_replaced_at_the_same_path_gets_new_contexts(tmp_path, accelerator, klein, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(TINY_KLEIN, model)
    args = script.parse_args(script_args(tmp_path / "out", model))
    monkeypatch.setattr(klein, "args", args)  # the family's context fingerprint reads its flags
    example = script.collect_examples(args, klein.resolution_multiple)[0]
    store = script.ContextStore(klein, [example], accelerator, args.output_dir)
    store.fill()
    assert all(store.path(example, role).exists() for role in store.roles)
    weights = model / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 1.5
    save_file(state, weights)  # same path, same size, new contents

    replaced = script.ContextStore(klein, [example], accelerator, args.output_dir)
    assert replaced.path(example, "teacher") != store.path(example, "teacher")
    assert not replaced.path(example, "teacher").exists()
    # and every setting that shapes a context is part of the key
    args.text_encoder_out_layers = [9, 18, 26]
    assert (script.ContextStore(klein, [example], accelerator, args.output_dir).path(example, "teacher")
            != replaced.path(example, "teacher"))


def test_a_hub_model_is_keyed_on_its_cached_commit(tmp_path):
    cache = tmp_path / "hub"
    for commit in ("a" * 40, "b" * 40):
        snapshot = cache / "models--user--model" / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "model_index.json").write_text("{}")
    refs = cache / "models--user--model" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    first = script.model_fingerprint("user/model", cache_dir=cache)
    assert first == script.model_fingerprint(str(cache / "models--user--model" / "snapshots" / ("a" * 40)))
    (refs / "main").write_text("b" * 40)
    assert script.model_fingerprint("user/model", cache_dir=cache) != first
    assert script.model_fingerprint("user/model", revision="a" * 40, cache_dir=cache) == first


def test_an_unreadable_cache_file_is_computed_again_with_one_warning(tmp_path, accelerator, klein, caplog):
    args, family = script.parse_args(script_args(tmp_path, TINY_KLEIN)), klein
    examples = script.collect_examples(args, family.resolution_multiple)[:2]
    store = script.ContextStore(family, examples, accelerator, args.output_dir)
    store.fill()
    good = [{k: v.clone() for k, v in load_file(store.path(e, "teacher")).items()} for e in examples]  # not mmapped
    truncated, empty = (store.path(e, "teacher") for e in examples)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        script.ContextStore(family, examples, accelerator, args.output_dir).fill()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and str(truncated) in warnings[0] and str(empty) in warnings[1]
    for example, expected in zip(examples, good):
        recomputed = load_file(store.path(example, "teacher"))
        assert recomputed.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(recomputed[key], expected[key])
    # damaged after caching, when the encoders are gone: one line naming the file and what to do
    empty.write_bytes(b"")
    with pytest.raises(script.UserError, match=f"context cache file {empty} cannot be read.*delete it and resume"):
        store.get(examples[1])


def test_teacher_vlm_rope_theta_option(tmp_path):
    """Default: the graft takes the text encoder's RoPE base, so text-only features are the student's. "vlm": the
    authors' graft, Qwen3-VL's own base (the tiny VLM's is 5x the text encoder's, as in the real models)."""
    caption = "a photo of sks cat"
    args, family = load_family(tmp_path)
    student = family.encode_student_context(caption)["prompt_embeds"]
    text = family.pipeline.tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                                         add_generation_prompt=True, enable_thinking=True)
    example = script.collect_examples(args, family.resolution_multiple)[0]
    image = script.resize_to_bucket(example.load(), example.bucket)
    teacher = family.build_teacher_context(image, caption)["prompt_embeds"]
    assert family.vlm.vlm.config.text_config.rope_parameters["rope_theta"] == 1e6
    hidden_states, mask = family.vlm.hidden_states(text)
    torch.testing.assert_close(hidden_states[-2][0][mask], student, rtol=1e-5, atol=1e-5)

    _, authors = load_family(tmp_path, TINY_ZIMAGE, "--teacher_vlm_rope_theta", "vlm")
    assert authors.vlm.vlm.config.text_config.rope_parameters["rope_theta"] == 5e6
    hidden_states, mask = authors.vlm.hidden_states(text)
    assert (hidden_states[-2][0][mask] - student).abs().max() > 1e-3
    assert (authors.build_teacher_context(image, caption)["prompt_embeds"] - teacher).abs().max() > 1e-3


def test_random_flip_shows_the_teacher_the_mirrored_image(tmp_path, accelerator, klein):
    data = data_folder(tmp_path / "data", {"a.jpg": "sks cat", "b.jpg": "sks cat, again"})
    args = script.parse_args(script_args(tmp_path / "out", TINY_KLEIN, "--random_flip", data=data))
    examples = script.collect_examples(args, klein.resolution_multiple)
    assert [(e.source[-5:], e.flip) for e in examples] == [("a.jpg", False), ("a.jpg", True), ("b.jpg", False),
                                                            ("b.jpg", True)]
    sampler = script.BucketBatchSampler(examples, batch_size=1, repeats=1, seed=0)
    flips = collections.Counter()
    for epoch in range(40):
        sampler.start_epoch(epoch)
        visits = [examples[i] for batch in sampler for i in batch]
        assert sorted(e.image_index for e in visits) == [0, 1]  # each image once per epoch, flipped or not
        flips.update(e.flip for e in visits)
    assert 25 <= flips[True] <= 55  # about half of 80 visits
    plain, flipped = examples[:2]
    mirrored = script.training_image(plain).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert np.array_equal(np.asarray(script.training_image(flipped)), np.asarray(mirrored))
    store = script.ContextStore(klein, examples[:2], accelerator, args.output_dir)
    assert store.path(plain, "teacher") != store.path(flipped, "teacher")
    (plain_student, plain_teacher), (student, teacher) = (store.compute(e).values() for e in (plain, flipped))
    torch.testing.assert_close(student["prompt_embeds"], plain_student["prompt_embeds"])  # the caption's, unchanged
    expected = klein.build_teacher_context(mirrored, flipped.caption)
    torch.testing.assert_close(teacher["image_latents"], expected["image_latents"])
    assert (teacher["image_latents"] - plain_teacher["image_latents"]).abs().max() > 1e-3


def test_bucket_no_upscale_trains_small_images_at_their_own_size(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (100, 84), (200, 10, 10)).save(data / "small.png")
    Image.new("RGB", (400, 300), (10, 200, 10)).save(data / "large.png")
    buckets = {}
    for flag in ((), ("--bucket_no_upscale",)):
        args = script.parse_args(script_args(tmp_path / "out", TINY_ZIMAGE, "--resolution", 128, "--instance_prompt",
                                             "sks", *flag, data=data))
        buckets[flag] = {e.source.rsplit("/", 1)[1]: e.bucket for e in script.collect_examples(args, 16)}
    upscaled, kept = buckets[()], buckets[("--bucket_no_upscale",)]
    assert upscaled["small.png"][0] > 84 and kept["small.png"] == (80, 96)  # (height, width), multiples of 16
    assert kept["large.png"] == upscaled["large.png"]  # larger images are only ever scaled down
    small = script.read_image_file(data / "small.png")
    assert script.resize_to_bucket(small, kept["small.png"]).size == (96, 80)  # a center crop, no resize


def test_images_and_captions_of_every_kind_are_read_correctly(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((80, 96), 0.5, np.float32), mode="F").save(data / "float.tif")
    Image.new("CMYK", (96, 80), (0, 255, 255, 0)).save(data / "cmyk.jpg")
    rotated = Image.new("RGB", (96, 80), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated by 90 degrees
    rotated.save(data / "rotated.jpg", exif=exif)
    (data / "._float.tif").write_bytes(b"macOS resource fork")  # hidden: not an image
    (data / "folder.jpg").mkdir()  # a folder: not an image
    (data / "float.txt").write_bytes("\ufeffsks float\r\nsks again\r\n".encode())  # BOM and CRLF
    (data / "cmyk.txt").write_text("sks " + "very " * 20_000 + "long")
    (data / "rotated.txt").write_text("sks rotated")
    args = script.parse_args(script_args(tmp_path / "out", TINY_ZIMAGE, data=data))
    with caplog.at_level(logging.WARNING):
        examples = {(e.source.rsplit("/", 1)[1], e.caption[:9]): e for e in script.collect_examples(args, 16)}
    assert sorted(examples) == [("cmyk.jpg", "sks very "), ("float.tif", "sks again"), ("float.tif", "sks float"),
                                ("rotated.jpg", "sks rotat")]
    assert np.asarray(examples["float.tif", "sks float"].load())[0, 0].tolist() == [127, 127, 127]  # not black
    assert np.asarray(examples["cmyk.jpg", "sks very "].load())[0, 0].tolist() == pytest.approx([255, 0, 0], abs=8)
    assert examples["rotated.jpg", "sks rotat"].load().size == (80, 96)  # upright
    assert len(examples["cmyk.jpg", "sks very "].caption) == script.MAX_CAPTION_CHARS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cmyk.jpg" in warnings[0] and "cut" in warnings[0]
    # metadata.jsonl: text may be a list of caption variants
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "rotated.jpg", "text": ["sks one", "sks two"]}))
    assert [e.caption for e in script.collect_examples(args, 16)] == ["sks one", "sks two"]


def test_skip_bad_images_skips_a_truncated_dataset_image_with_a_warning(tmp_path, monkeypatch, caplog):
    """The dataset that is a bad input in tests/test_bad_inputs.py, with --skip_bad_images: its truncated image is
    skipped with a warning, also before accelerate's state exists (as in a command-line run, where the data scan comes
    first)."""
    data = TRUNCATED_ROW(tmp_path)
    args = script.parse_args(["--pretrained_model_name_or_path", str(TINY_ZIMAGE), "--teacher_vlm_name_or_path",
                              str(TINY_VLM), "--dataset_name", str(data), "--caption_column", "text",
                              "--skip_bad_images", "--resolution", "64", "--output_dir", str(tmp_path / "out")])
    monkeypatch.setattr(script.PartialState, "_shared_state", {})
    with caplog.at_level(logging.WARNING):
        assert [e.source for e in script.collect_examples(args, 16)] == ["dataset:0"]
    assert "skipping dataset:1: cannot read the image of dataset row 1" in caplog.text


@pytest.mark.parametrize("source", ["folder", "dataset"])
def test_duplicate_photos_and_captions_share_one_context_and_all_train(tmp_path, accelerator, klein, monkeypatch,
                                                                       source):
    """Real data has duplicates: two byte-identical photos with the same caption (a folder, or a dataset's rows),
    and a caption file that repeats a line. Each distinct (image, caption) is cached once; every photo still trains."""
    data = tmp_path / "data"
    data.mkdir()
    photo = (CONCEPT / "chelsea-1.jpg").read_bytes()
    for name in ("a.jpg", "a-copy.jpg"):
        (data / name).write_bytes(photo)
    if source == "folder":
        for name in ("a.txt", "a-copy.txt"):
            (data / name).write_text("sks cat\nsks cat\n")  # and the line repeated
        flags = ["--instance_data_dir", data]
    else:
        (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "sks cat"}) + "\n"
                                                     for n in ("a.jpg", "a-copy.jpg")))
        flags = ["--dataset_name", data, "--caption_column", "text"]
    argv = script_args(tmp_path / "out", TINY_KLEIN)
    at = argv.index("--instance_data_dir")
    argv[at:at + 2] = map(str, flags)
    args = script.parse_args(argv)
    monkeypatch.setattr(klein, "args", args)
    examples = script.collect_examples(args, klein.resolution_multiple)
    assert [e.caption for e in examples] == ["sks cat", "sks cat"]  # each photo once, its caption once
    assert examples[0].image_key == examples[1].image_key and examples[0].image_index != examples[1].image_index
    store = script.ContextStore(klein, examples, accelerator, args.output_dir, targets=True)
    store.fill()
    expected = sorted(store.path(examples[0], role).name for role in store.roles)  # one file per role
    assert sorted(p.name for p in store.folder.iterdir()) == expected
    batches = [store[i] for i in range(2)]
    torch.testing.assert_close(batches[0]["teacher"]["image_latents"], batches[1]["teacher"]["image_latents"])
