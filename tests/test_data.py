"""Data (both scripts share this code): every image weighs the same whatever its caption variants, augmentation and
buckets as diffusers/kohya users expect, the context cache keyed on what determines a context, and bad data as one
line naming the file."""

import collections
import logging
import shutil

import pytest
import torch
from accelerate import Accelerator
from conftest import CONCEPT, TINY_KLEIN, TINY_ZIMAGE, load_family, lora_script as script, script_args
from safetensors.torch import load_file, save_file


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


def test_a_model_replaced_at_the_same_path_gets_new_contexts(tmp_path, accelerator):
    model = tmp_path / "model"
    shutil.copytree(TINY_KLEIN, model)
    args, family = load_family(tmp_path / "out", model)
    example = script.collect_examples(args, family.resolution_multiple)[0]
    store = script.ContextStore(family, args, [example], accelerator)
    store.fill()
    before = store.get(example)
    weights = model / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 1.5
    save_file(state, weights)  # same path, same size, new contents

    args, family = load_family(tmp_path / "out", model)
    replaced = script.ContextStore(family, args, [example], accelerator)
    assert replaced.path(example) != store.path(example) and not replaced.path(example).exists()
    replaced.fill()
    after = replaced.get(example)
    assert (after[0]["prompt_embeds"] - before[0]["prompt_embeds"]).abs().max() > 1e-3
    # and every setting that shapes a context is part of the key
    args.text_encoder_out_layers = [9, 18, 26]
    assert script.ContextStore(family, args, [example], accelerator).path(example) != replaced.path(example)


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


def test_an_unreadable_cache_file_is_computed_again_with_one_warning(tmp_path, accelerator, caplog):
    args, family = load_family(tmp_path, TINY_KLEIN)
    examples = script.collect_examples(args, family.resolution_multiple)[:2]
    store = script.ContextStore(family, args, examples, accelerator)
    store.fill()
    good = [{k: v.clone() for k, v in load_file(store.path(e)).items()} for e in examples]  # not mmapped
    truncated, empty = (store.path(e) for e in examples)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        script.ContextStore(family, args, examples, accelerator).fill()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and str(truncated) in warnings[0] and str(empty) in warnings[1]
    for example, expected in zip(examples, good):
        recomputed = load_file(store.path(example))
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
