"""The exported LoRA means the same in every loader, carries its description in the header, and the model card and
Hub upload say what a user needs: both families, on the tiny models, without training (a random LoRA is exported)."""

import ast
import hashlib
import json
import re
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY_KLEIN, TINY_ZIMAGE, add_random_lora, load_family, load_lora_into_pipeline
from conftest import lora_script as script
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_dopsd_full as full_script


# ComfyUI's rules for a diffusers-named LoRA (learned from its comfy/lora.py, comfy/utils.py key maps and
# comfy/weight_adapter/lora.py; no code taken): a key "transformer.<diffusers module>.lora_{A,B}.weight" patches the
# native weight that the model's diffusers->native key map gives for "<diffusers module>.weight" (a row slice of a
# fused weight for q/k/v), with ΔW = strength · s · (B @ A), s = alpha / rank if "<module>.alpha" is in the file,
# else 1. Forge applies the same rule. The tables below are those key maps, for the modules this trainer adapts.
def comfy_target(family_name, module, hidden):
    """(native weight name, first row, rows) that ComfyUI patches for a diffusers module, or None if unmapped."""
    if family_name == "Z-Image-Turbo":
        match = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)", module)
        if match is None:
            return None
        block, leaf = match.groups()
        fused = {"attention.to_q": 0, "attention.to_k": 1, "attention.to_v": 2}
        if leaf in fused:
            return f"{block}.attention.qkv.weight", fused[leaf] * hidden, hidden
        renamed = {"attention.to_out.0": "attention.out", "feed_forward.w1": "feed_forward.w1",
                   "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3"}
        return (f"{block}.{renamed[leaf]}.weight", 0, None) if leaf in renamed else None
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if match is None:
        return None
    kind, index, leaf = match.groups()
    if kind == "transformer_blocks":
        fused = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                 "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                 "attn.add_v_proj": ("txt_attn.qkv", 2)}
        if leaf in fused:
            name, part = fused[leaf]
            return f"double_blocks.{index}.{name}.weight", part * hidden, hidden
        renamed = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
                   "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0",
                   "ff_context.linear_out": "txt_mlp.2"}
        return (f"double_blocks.{index}.{renamed[leaf]}.weight", 0, None) if leaf in renamed else None
    renamed = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
    return (f"single_blocks.{index}.{renamed[leaf]}.weight", 0, None) if leaf in renamed else None


def comfy_weight_changes(state, family_name, hidden):
    """Apply the file as ComfyUI does at strength 1: {native weight: {first row: ΔW}}; every key must be used."""
    used, changes = set(), {}
    modules = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in state if ".lora_A." in key}
    for module in modules:
        target = comfy_target(family_name, module, hidden)
        assert target is not None, f"ComfyUI has no target for {module}"
        name, first_row, _ = target
        down, up = state[f"transformer.{module}.lora_A.weight"], state[f"transformer.{module}.lora_B.weight"]
        alpha_key = f"transformer.{module}.alpha"
        scale = state[alpha_key].item() / down.shape[0] if alpha_key in state else 1.0
        used |= {f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight"} | (
            {alpha_key} if alpha_key in state else set())
        assert first_row not in changes.get(name, {}), f"two modules patch the same rows of {name}"
        changes.setdefault(name, {})[first_row] = scale * up.float() @ down.float()
    assert used == set(state), f"keys ComfyUI would not load: {sorted(set(state) - used)[:5]}"
    return changes


def trained_weight_changes(transformer):
    """diffusers module -> the weight change the trained LoRA applies (scaling · B @ A)."""
    changes = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            up, down = module.lora_B["default"].weight, module.lora_A["default"].weight
            changes[name] = (module.scaling["default"] * up @ down).detach()
    return changes


def hidden_size(family):
    config = family.transformer.config
    return config.dim if family.name == "Z-Image-Turbo" else config.num_attention_heads * config.attention_head_dim


@pytest.fixture(scope="module", params=[TINY_ZIMAGE, TINY_KLEIN], ids=["z-image", "klein"])
def exported(request, tmp_path_factory):
    """A random rank-4, alpha-8 LoRA (scale 2) on the family's default layers, exported in bf16 and checkpointed."""
    output_dir = tmp_path_factory.mktemp("export")
    args, family = load_family(output_dir, request.param, "--trigger_word", "sks")
    add_random_lora(family.transformer, args)
    script.export_lora(args, family, family.transformer, output_dir, num_images=4)
    script.save_lora(family, family.transformer, output_dir / "checkpoint")
    return args, family, output_dir


def test_comfyui_and_diffusers_apply_the_trained_weight_change(exported):
    args, family, output_dir = exported
    state = load_file(output_dir / script.LORA_WEIGHT_NAME)
    trained = trained_weight_changes(family.transformer)
    comfy = comfy_weight_changes(state, family.name, hidden_size(family))
    assert sum(len(rows) for rows in comfy.values()) == len(trained) > 0
    for module, expected in trained.items():
        name, first_row, _ = comfy_target(family.name, module, hidden_size(family))
        tolerance = 1e-2 * expected.abs().max().item()  # bf16 file
        torch.testing.assert_close(comfy[name][first_row], expected, rtol=1e-2, atol=tolerance)

    pipe = family.pipeline_class.from_pretrained(TINY_ZIMAGE if family.name == "Z-Image-Turbo" else TINY_KLEIN)
    load_lora_into_pipeline(pipe, output_dir)
    adapter = pipe.get_active_adapters()[0]
    loaded = dict(pipe.transformer.named_modules())
    for module, expected in trained.items():
        layer = loaded[module]
        applied = layer.scaling[adapter] * layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
        torch.testing.assert_close(applied, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_checkpoints_keep_the_training_representation(exported):
    args, family, output_dir = exported
    checkpoint = load_file(output_dir / "checkpoint" / script.LORA_WEIGHT_NAME)
    parameters = dict(family.transformer.named_parameters())
    assert len(checkpoint) > 0
    for key, value in checkpoint.items():
        parameter = parameters[key.removeprefix("transformer.").replace(".weight", ".default.weight")]
        assert value.dtype == torch.float32 and torch.equal(value, parameter.detach())
    with safe_open(output_dir / "checkpoint" / script.LORA_WEIGHT_NAME, "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 8


def test_header_describes_the_lora_for_lora_managers(exported):
    args, family, output_dir = exported
    with safe_open(output_dir / script.LORA_WEIGHT_NAME, "pt") as f:
        header = f.metadata()
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes == {"BF16"}
    adapter = json.loads(header["lora_adapter_metadata"])
    assert (adapter["transformer.r"], adapter["transformer.lora_alpha"]) == (4, 4)
    architecture = "Z-Image/lora" if family.name == "Z-Image-Turbo" else "Flux.2-klein-4b/lora"
    assert header["modelspec.sai_model_spec"] == "1.0.0" and header["modelspec.architecture"] == architecture
    assert header["modelspec.trigger_phrase"] == "sks" and header["modelspec.resolution"] == "64x64"
    assert header["modelspec.base_model"] == args.pretrained_model_name_or_path
    assert header["modelspec.training_method"] == "D-OPSD" and header["modelspec.title"] == output_dir.name
    assert header["ss_network_dim"] == header["ss_network_alpha"] == "4"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", header["modelspec.date"])
    # the trigger word where ComfyUI's LoRA managers and A1111 read it: kohya's tag frequencies ({data folder: {tag:
    # images}}) and a trained-words list; and modelspec's usage hint with the few-step settings
    assert json.loads(header["ss_tag_frequency"]) == {"chelsea-cat": {"sks": 4}}
    assert header["ss_num_train_images"] == "4"
    assert json.loads(header["trained_words"]) == ["sks"]
    steps, guidance = (8, 0.0) if family.name == "Z-Image-Turbo" else (4, 1.0)
    assert header["modelspec.usage_hint"] == (f"Trigger word: sks. {steps} steps, guidance {guidance}, LoRA strength"
                                              f" 1.0 on {family.name}")
    # modelspec's hash: sha256 of the tensor data, everything after the header
    data = (output_dir / script.LORA_WEIGHT_NAME).read_bytes()
    tensor_data = data[8 + int.from_bytes(data[:8], "little"):]
    assert header["modelspec.hash_sha256"] == "0x" + hashlib.sha256(tensor_data).hexdigest()


def test_a_lora_without_trigger_word_names_none(exported, tmp_path):
    args, family, _ = exported
    if family.name != "Z-Image-Turbo":
        pytest.skip("one family is enough")
    script.export_lora(SimpleNamespace(**{**vars(args), "trigger_word": None}), family, family.transformer, tmp_path,
                       num_images=4)
    with safe_open(tmp_path / script.LORA_WEIGHT_NAME, "pt") as f:
        header = f.metadata()
    assert not {"modelspec.trigger_phrase", "ss_tag_frequency", "trained_words"} & set(header)
    assert header["modelspec.usage_hint"] == "8 steps, guidance 0.0, LoRA strength 1.0 on Z-Image-Turbo"


@pytest.mark.parametrize("save_dtype, expected", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_save_dtype_sets_the_precision_and_the_pipeline_loads_it(exported, tmp_path, save_dtype, expected):
    args, family, _ = exported
    if family.name != "Z-Image-Turbo":
        pytest.skip("one family is enough for the dtype flag")
    args.save_dtype = save_dtype
    try:
        script.export_lora(args, family, family.transformer, tmp_path, num_images=4)
    finally:
        args.save_dtype = "bf16"
    state = load_file(tmp_path / script.LORA_WEIGHT_NAME)
    assert {value.dtype for value in state.values()} == {expected}
    pipe = family.pipeline_class.from_pretrained(TINY_ZIMAGE)
    assert load_lora_into_pipeline(pipe, tmp_path).keys() == state.keys()


def test_trigger_word_is_put_in_front_of_captions_that_lack_it():
    assert script.with_trigger_word("a cat on a sofa", "sks") == "sks, a cat on a sofa"
    assert script.with_trigger_word("a photo of SKS cat", "sks") == "a photo of SKS cat"
    assert script.with_trigger_word("she asks a cat", "sks") == "sks, she asks a cat"
    assert script.with_trigger_word("a cat", None) == "a cat"


def read_card(folder):
    text = (folder / "README.md").read_text()
    front, body = text.split("---\n", 2)[1:]
    return front, body


def card_example(body):
    """The card's Python example, parsed: (the prompt it samples, the string the trained weights load from)."""
    code = ast.parse(body.split("```python\n")[1].split("```")[0])
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id: node
             for node in ast.walk(code) if isinstance(node, ast.Call)}
    loads = calls["load_lora_weights"] if "load_lora_weights" in calls else next(
        c for c in ast.walk(code) if isinstance(c, ast.Call) and any(k.arg == "subfolder" for k in c.keywords))
    return calls["pipe"].args[0].value, loads.args[0].value


def card_args(args, output_dir, **changes):
    """The exported run's arguments as either script's card reads them."""
    return SimpleNamespace(**{**vars(args), "output_dir": str(output_dir), "save_ema": False, "ema_dtype": "fp32",
                              "ema_device": "cpu", "train_layers": None, **changes})


@pytest.mark.parametrize("script_module", [script, full_script], ids=["lora", "full"])
def test_model_card_names_license_gallery_trigger_and_usage(exported, tmp_path, script_module):
    args, family, _ = exported
    prompt = 'a photo of sks cat on the beach, "golden hour"'
    images = {prompt: [Image.new("RGB", (64, 64))], "teacher view: x": [Image.new("RGB", (64, 64))]}
    script_module.save_model_card(card_args(args, tmp_path, validation_prompt=[prompt]), family, "alice/sks-cat",
                                  images)
    front, body = read_card(tmp_path)
    # local tiny models without a card: the folder name decides (z-image-turbo is known, flux2-klein is not)
    assert f"license: {'apache-2.0' if family.name == 'Z-Image-Turbo' else 'other'}" in front
    assert yaml.safe_load(front)["widget"] == [{"text": prompt, "output": {"url": "image_0.png"}}]
    assert (tmp_path / "image_0.png").is_file()
    assert "instance_prompt: sks" in front
    for tag in ["diffusers", "d-opsd", *family.hub_tags]:
        assert f"- {tag}\n" in front
    assert "<Gallery />" in body and "## Trigger words" in body and "`sks`" in body
    assert "## Download model" in body and "https://huggingface.co/alice/sks-cat/" in body
    assert "dtype=torch.bfloat16" in body and "torch_dtype" not in body
    assert "TODO" not in front + body  # diffusers' template leaves "How to use: TODO" sections; this card has none
    # the example prompts with the validation prompt (the gallery's), quoted so that the code runs as written
    assert card_example(body) == (prompt, "alice/sks-cat") and "max_sequence_length" not in body
    # the base model is a local folder: named, not linked, and not the card's base_model (the Hub links that)
    assert "base_model" not in front and f"huggingface.co/{args.pretrained_model_name_or_path}" not in body
    folder = TINY_ZIMAGE.name if family.name == "Z-Image-Turbo" else TINY_KLEIN.name
    assert f"a local pipeline folder (`{folder}`)" in body
    if script_module is script:
        assert "- template:sd-lora\n" in front and "- lora\n" in front
        assert "## Use it in ComfyUI / Forge" in body and "strength **1.0**" in body


@pytest.mark.parametrize("script_module", [script, full_script], ids=["lora", "full"])
def test_a_card_written_without_the_hub_links_nothing_it_cannot_name(exported, tmp_path, script_module):
    """Without --push_to_hub the repository has no owner yet (a bare name): the card links no repository and its
    example loads this folder; without a validation prompt there are no samples, so no gallery either."""
    args, family, _ = exported
    script_module.save_model_card(card_args(args, tmp_path, validation_prompt=None, max_sequence_length=64), family,
                                  "sks-cat", {"teacher view: x": [Image.new("RGB", (64, 64))]})
    front, body = read_card(tmp_path)
    assert "huggingface.co/sks-cat" not in body and "<Gallery />" not in body and "widget" not in front
    assert not list(tmp_path.glob("image_*.png"))
    assert card_example(body) == ("sks", str(tmp_path))  # no validation prompt: the trigger word
    # trained on 64-token captions: the example samples with the same length (the default 512 is not written)
    call = next(node for node in ast.walk(ast.parse(body.split("```python\n")[1].split("```")[0]))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "pipe")
    assert {k.arg: k.value.value for k in call.keywords}["max_sequence_length"] == 64


def test_a_hub_base_model_is_linked_and_named_in_the_card_data(exported, tmp_path, monkeypatch):
    args, family, _ = exported
    monkeypatch.setattr(family, "base_model_license", lambda name: {"license": "apache-2.0"})  # offline
    script.save_model_card(card_args(args, tmp_path, pretrained_model_name_or_path="Tongyi-MAI/Z-Image-Turbo"),
                           family, "alice/sks-cat", {})
    front, body = read_card(tmp_path)
    assert "base_model: Tongyi-MAI/Z-Image-Turbo" in front
    assert "[Tongyi-MAI/Z-Image-Turbo](https://huggingface.co/Tongyi-MAI/Z-Image-Turbo)" in body


def test_license_of_known_base_models_when_their_card_cannot_be_read():
    # offline (conftest): the card cannot be downloaded, so the family's table answers
    assert script.ZImageTurbo.base_model_license("Tongyi-MAI/Z-Image-Turbo") == {"license": "apache-2.0"}
    assert script.Flux2Klein.base_model_license("black-forest-labs/FLUX.2-klein-4B") == {"license": "apache-2.0"}
    nine = script.Flux2Klein.base_model_license("black-forest-labs/FLUX.2-klein-9B")
    assert nine["license"] == "other" and nine["license_name"] == "flux-non-commercial-license"
    assert script.ZImageTurbo.base_model_license("someone/unknown-model") == {"license": "other"}


def test_license_is_read_from_a_local_base_models_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert script.Flux2Klein.base_model_license(str(tmp_path)) == {"license": "mit"}


def test_bare_hub_model_id_uploads_to_the_namespaced_repo(exported, tmp_path, monkeypatch):
    """A stand-in for the Hub (no network here): create_repo answers with the id in the user's namespace, as the
    real Hub does for a bare name; the upload and the card must use that id."""
    import huggingface_hub
    from accelerate import PartialState

    PartialState()  # the script's logger needs accelerate's state, as in a run
    args, family, _ = exported
    uploads, created = [], []

    def create_repo(repo_id, exist_ok, private):
        created.append((repo_id, private))
        return SimpleNamespace(repo_id=f"alice/{repo_id}")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: uploads.append(kwargs))
    push_args = SimpleNamespace(**{**vars(args), "output_dir": str(tmp_path), "hub_model_id": "sks-cat",
                                   "hub_private": True})
    assert script.push_to_hub(push_args, family, {})
    assert created == [("sks-cat", True)] and [u["repo_id"] for u in uploads] == ["alice/sks-cat"]
    front, body = read_card(tmp_path)
    assert "alice/sks-cat" in body and '"sks-cat"' not in body
