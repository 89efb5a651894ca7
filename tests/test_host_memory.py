"""Host RAM: the pipeline's large models (text encoder, teacher VLM, transformer) are loaded when needed and freed
after, so that no two of them hold memory at once (README, "What machine do I need").

A run of the LoRA script on the tiny models records, when each phase starts, every such model alive in the process
(found by the garbage collector, not asked of the script) and the storage of its weights. On this CPU-only machine
everything is in host RAM, so what is alive is what is resident. The transformer's layout (its modules on the meta
device, for the checks before it is loaded) holds no memory and does not count.
"""

import gc
import shutil
import weakref

import pytest
import torch
from conftest import CONCEPT, TINY_KLEIN, TINY_ZIMAGE, lora_script as script, run_in_process, script_args


LARGE = {"Qwen3Model": "text encoder", "Qwen3ForCausalLM": "text encoder",
         "Qwen3VLForConditionalGeneration": "teacher VLM",
         "ZImageTransformer2DModel": "transformer", "Flux2Transformer2DModel": "transformer"}


def resident(earlier):
    """{model: {storage address: bytes}} of the large models alive now, leaving out those in `earlier` (alive before
    the run: other tests' objects) and meta-device layouts."""
    gc.collect()
    models = {}
    for obj in gc.get_objects():
        if type(obj).__name__ in LARGE and isinstance(obj, torch.nn.Module) and obj not in earlier:
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                        for t in obj.parameters() if t.device.type != "meta"}
            if storages:
                models.setdefault(LARGE[type(obj).__name__], {}).update(storages)
    return models


@pytest.mark.parametrize("model", [TINY_ZIMAGE, TINY_KLEIN], ids=["z-image", "klein"])
def test_one_large_model_in_memory_at_a_time(tmp_path, monkeypatch, model):
    """Z-Image-Turbo: the text encoder alone for the student contexts; the grafted VLM alone for the teacher
    contexts, holding the text encoder's own weights (shared, not copied); the transformer alone for training.
    FLUX.2-klein's edit teacher: the text encoder for both contexts, then the transformer alone."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("chelsea-1.jpg", "chelsea-1.txt"):
        shutil.copy(CONCEPT / name, data / name)
    earlier = weakref.WeakSet(o for o in gc.get_objects() if type(o).__name__ in LARGE)
    phases = {}

    def record(phase, function):
        def recorded(*args, **kwargs):
            phases.setdefault(phase, resident(earlier))
            return function(*args, **kwargs)
        return recorded

    family = script.ZImageTurbo if model == TINY_ZIMAGE else script.Flux2Klein
    for phase, owner, name in (("student contexts", family, "encode_student_context"),
                               ("teacher contexts", family, "build_teacher_context"),
                               ("training", script, "dopsd_step")):
        monkeypatch.setattr(owner, name, record(phase, getattr(owner, name)))
    run_in_process(script_args(tmp_path / "out", model, "--max_train_steps", 1, "--gradient_accumulation_steps", 1,
                               "--rollout_steps", 1, "--validation_inference_steps", 1, "--prior_prompts",
                               data=data))

    teacher = "teacher VLM" if model == TINY_ZIMAGE else "text encoder"
    assert {phase: sorted(models) for phase, models in phases.items()} == {
        "student contexts": ["text encoder"], "teacher contexts": [teacher], "training": ["transformer"]}
    encoder = phases["student contexts"]["text encoder"]
    assert set(encoder) <= set(phases["teacher contexts"][teacher])  # the VLM's language model is the encoder's
    for phase, models in phases.items():
        print(f"{phase}: " + ", ".join(f"{name} {sum(storages.values()) / 2**20:.2f} MiB"
                                       for name, storages in models.items()))
