"""train_dopsd_full.py: full fine-tuning on both tiny families, EMA of all weights, two processes, resume, and the
copy check that keeps its shared blocks identical to the LoRA script's."""

import logging
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, TINY_KLEIN, TINY_ZIMAGE, load_family, run_in_process, script_args, train_in_process
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import train_dopsd_full as full_script
import train_dopsd_lora as lora_script
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, ZImagePipeline, ZImageTransformer2DModel
from utils.check_copies import check_copies


FAMILIES = {
    "z-image": (TINY_ZIMAGE, ZImagePipeline, ZImageTransformer2DModel, {"guidance_scale": 0.0}),
    "klein": (TINY_KLEIN, Flux2KleinPipeline, Flux2Transformer2DModel, {"guidance_scale": 1.0}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tune_loads_into_the_stock_pipeline_and_changes_its_images(tmp_path, family):
    model, pipeline_class, transformer_class, call = FAMILIES[family]
    run_in_process(script_args(tmp_path, model, "--max_train_steps", 2, "--learning_rate", 1e-3, "--save_ema",
                               "--ema_decay", 0.9, "--validation_prompt", "sks cat", "--validation_steps", 2),
                   full_script)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step-000002-prompt0-0.png", "step-000002-teacher-view.png"]

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a photo of sks cat", height=64, width=64, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0), **call).images

    base = generate(pipeline_class.from_pretrained(model))
    trained = transformer_class.from_pretrained(tmp_path / "transformer")
    tuned = generate(pipeline_class.from_pretrained(model, transformer=trained))
    assert abs(tuned - base).max() > 1e-3
    # the EMA teacher (decay 0.9 over 2 steps) lies strictly between base and student
    ema = transformer_class.from_pretrained(tmp_path / "transformer_ema")
    original = transformer_class.from_pretrained(model, subfolder="transformer")
    name, student = next((n, p) for n, p in trained.named_parameters() if n.endswith("weight") and p.dim() == 2)
    teacher, start = dict(ema.named_parameters())[name], dict(original.named_parameters())[name]
    assert 0 < (teacher - start).abs().max() < (student - start).abs().max()


def test_full_ema_is_the_closed_form_and_cpu_or_other_dtype_ema_trains_the_same(tmp_path):
    """Three steps with the teacher held alike (storage swap) or apart (fp64 EMA: copy-in/copy-out swap)."""
    accelerator = Accelerator(cpu=True)
    results = []
    for ema_dtype in (None, torch.float64):
        args, family = load_family(tmp_path, TINY_ZIMAGE, "--ema_decay", 0.9, script=full_script)
        examples = full_script.collect_examples(args, family.resolution_multiple)
        history = [[p.detach().clone() for p in family.transformer.parameters()]]  # the student before step 1
        ema, _ = train_in_process(family, args, examples, accelerator, 3, 1e-3, script=full_script, dtype=ema_dtype,
                                  after_step=lambda named: history.append([p.detach().clone() for _, p in named]))
        for i, shadow in enumerate(ema.shadow[:20]):
            # d = 0.9: a swapped d and 1 - d would fail
            expected = 0.9 ** 3 * history[0][i] + sum(0.1 * 0.9 ** (3 - j) * history[j][i] for j in (1, 2, 3))
            torch.testing.assert_close(shadow.float(), expected, rtol=1e-5, atol=1e-6)
        results.append(history[-1])
    for alike, apart in zip(*results):
        torch.testing.assert_close(alike, apart, rtol=1e-5, atol=1e-6)


def trained_weights(train_layers="layers,noise_refiner,context_refiner"):
    """The tiny Z-Image transformer's trained (name, parameter) pairs under --train_layers: many tensors of similar
    size, so one tensor's scratch is small beside a copy of them all."""
    transformer = ZImageTransformer2DModel.from_pretrained(TINY_ZIMAGE, subfolder="transformer")
    names = set(full_script.resolve_trainable(transformer, train_layers))
    return [(n, p) for n, p in transformer.named_parameters() if n in names]


def held_bytes(ema):
    """Bytes of the storages an EMA object references, the student's parameters not counted."""
    students = {p.untyped_storage().data_ptr() for p in ema.parameters}
    storages = {}

    def visit(value):
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in students:
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for value in vars(ema).values():
        visit(value)
    return sum(storages.values())


class NewTensorBytes(TorchDispatchMode):
    """The most bytes that tensors created inside the block hold at one time (tensors that existed before, and
    views of them, not counted)."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {key: (ref, size) for key, (ref, size) in self.live.items() if ref() is not None}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.existing:
                self.live.setdefault(tensor.untyped_storage().data_ptr(),
                                     (weakref.ref(tensor), tensor.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def test_a_bf16_ema_costs_half_an_fp32_one_and_the_fp32_one_computes_what_the_lora_scripts_does():
    """Held between passes, built by an update and held during a teacher pass: a bf16 EMA of the trained weights
    holds half the bytes of an fp32 one, and neither its update nor its teacher pass builds an fp32 copy of the
    weights. The full script's own fp32 EMA gives the LoRA script's shadow and teacher, bit for bit, on the same
    weights."""
    named = trained_weights()
    parameters = [p for _, p in named]
    weights_fp32 = sum(4 * p.numel() for p in parameters)
    emas = {"full fp32": full_script.EMATeacher(named, 0.9, dtype=torch.float32, seed=3),
            "full bf16": full_script.EMATeacher(named, 0.9, dtype=torch.bfloat16, seed=3),
            "lora": lora_script.EMATeacher(named, 0.9)}
    generator = torch.Generator().manual_seed(0)
    updates, swaps = {}, {}
    for step in range(3):
        with torch.no_grad():
            for parameter in parameters:
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        students = [p.detach().clone() for p in parameters]
        for kind, ema in emas.items():
            with NewTensorBytes(parameters + ema.shadow) as update:
                ema.update()
            teacher = [s.float() for s in ema.shadow]
            with NewTensorBytes(parameters + ema.shadow + teacher) as swap, ema.swapped_in():
                assert all(torch.equal(p, t) for p, t in zip(parameters, teacher))  # the teacher, exactly
            updates[kind], swaps[kind] = update.peak, swap.peak
            assert all(torch.equal(p, s) for p, s in zip(parameters, students))  # the student is back, exactly
        for own, lora in zip(emas["full fp32"].shadow, emas["lora"].shadow):
            assert torch.equal(own, lora)
    fp32, bf16 = emas["full fp32"], emas["full bf16"]
    assert held_bytes(fp32) == held_bytes(emas["lora"]) == weights_fp32 and held_bytes(bf16) == weights_fp32 // 2
    assert updates["full fp32"] == 0 and swaps["full fp32"] == 0 and swaps["lora"] == 0
    assert updates["full bf16"] < weights_fp32 / 2  # less than a bf16 copy of the weights
    assert swaps["full bf16"] < weights_fp32  # the student's bottom halves and one tensor's scratch


def test_a_resumed_bf16_ema_draws_the_rounding_noise_of_an_uninterrupted_one(tmp_path):
    """The stochastic rounding's noise follows the update count, which the checkpoint saves and a resume restores:
    after a save and a load, the next update is the uninterrupted one's, bit for bit (decay 0.9, so the rounding
    decides many weights)."""
    named = trained_weights()
    uninterrupted = full_script.EMATeacher(named, 0.9, dtype=torch.bfloat16, seed=3)
    generator = torch.Generator().manual_seed(0)

    def step(*emas):
        with torch.no_grad():
            for _, parameter in named:
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        for ema in emas:
            ema.update()

    for _ in range(3):
        step(uninterrupted)
    uninterrupted.save(tmp_path)
    resumed = full_script.EMATeacher(named, 0.9, dtype=torch.bfloat16, seed=3)
    resumed.load(tmp_path)
    fresh = full_script.EMATeacher(named, 0.9, dtype=torch.bfloat16, seed=3)
    fresh.load(tmp_path)
    fresh.num_updates = 0  # what a resume that forgot the count would do
    step(uninterrupted, resumed, fresh)
    assert resumed.num_updates == uninterrupted.num_updates == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed.shadow, uninterrupted.shadow))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.shadow, uninterrupted.shadow))


def test_two_processes_train_and_end_with_identical_weights(tmp_path):
    # accelerate's --cpu flag runs one process; multi-process CPU (gloo) is --multi_gpu with ACCELERATE_USE_CPU
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "29533", str(ROOT / "tests" / "ddp_worker.py"), "train_dopsd_full",
               *script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", 2, "--learning_rate", 1e-3,
                            "--gradient_accumulation_steps", 2)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    base = ZImageTransformer2DModel.from_pretrained(TINY_ZIMAGE, subfolder="transformer").state_dict()
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any((rank0[k] - base[k]).abs().max() > 0 for k in rank0)


def test_full_resume_ends_with_the_uninterrupted_runs_weights(tmp_path, caplog):
    """A copy of a 3-step run without its last checkpoint, resumed from checkpoint-2 (mid-epoch: 4 images, one per
    step), ends with the uninterrupted run's student and teacher: the same batch, noise, optimizer state and EMA."""
    def argv(output_dir):
        return script_args(output_dir, TINY_ZIMAGE, "--learning_rate", 1e-3, "--ema_decay", 0.9,
                           "--checkpointing_steps", 1, "--gradient_accumulation_steps", 1, "--validation_steps", 100,
                           "--max_train_steps", 3)

    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_in_process(argv(uninterrupted), full_script)
    shutil.copytree(uninterrupted, resumed)
    shutil.rmtree(resumed / "checkpoint-3")
    with caplog.at_level(logging.INFO):
        run_in_process([*argv(resumed), "--resume_from_checkpoint", "latest"], full_script)
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    for name in ("transformer/diffusion_pytorch_model.safetensors", "ema_teacher.safetensors"):
        got, expected = load_file(resumed / "checkpoint-3" / name), load_file(uninterrupted / "checkpoint-3" / name)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7, msg=key)
    old_teacher = load_file(resumed / "checkpoint-2" / "ema_teacher.safetensors")
    teacher = load_file(resumed / "checkpoint-3" / "ema_teacher.safetensors")
    student = load_file(resumed / "checkpoint-3" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name, value in student.items():
        torch.testing.assert_close(teacher[name], 0.9 * old_teacher[name] + 0.1 * value)
    assert (resumed / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_train_layers_trains_only_those_layers(tmp_path):
    run_in_process(script_args(tmp_path, TINY_ZIMAGE, "--max_train_steps", 1, "--learning_rate", 1e-3,
                               "--train_layers", "layers.1,all_final_layer"), full_script)
    tuned = ZImageTransformer2DModel.from_pretrained(tmp_path / "transformer").state_dict()
    base = ZImageTransformer2DModel.from_pretrained(TINY_ZIMAGE, subfolder="transformer").state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith(("layers.1.", "all_final_layer.")) for k in changed)
    assert any(k.startswith("layers.1.") for k in changed) and any(k.startswith("all_final_layer") for k in changed)


def test_copy_check_passes_and_catches_a_drifted_copy(tmp_path):
    assert check_copies(ROOT / "train_dopsd_full.py") == []
    drifted = tmp_path / "train_dopsd_full.py"
    text = (ROOT / "train_dopsd_full.py").read_text()
    drifted.write_text(text.replace("return F.mse_loss(student_velocity.float(), teacher_velocity.float())",
                                    "return F.l1_loss(student_velocity.float(), teacher_velocity.float())"))
    problems = check_copies(drifted)
    assert len(problems) == 1 and "dopsd_loss differs from train_dopsd_lora.dopsd_loss" in problems[0]
    assert check_copies(drifted, fix=True) and check_copies(drifted) == []
    assert drifted.read_text() == text
    cli = subprocess.run([sys.executable, str(ROOT / "utils" / "check_copies.py")], capture_output=True, text=True)
    assert cli.returncode == 0 and "all copies match" in cli.stdout


@pytest.mark.parametrize("old, new, expected", [
    # a shared constant that lost its marker
    ("# Copied from train_dopsd_lora.MIN_IMAGE_SIDE\n", "",
     "MIN_IMAGE_SIDE is also defined in train_dopsd_lora.py: mark it '# Copied from"),
    # an import that differs from the source's
    ("import numpy as np  # noqa: E402", "import numpy as npy  # noqa: E402",
     "'import numpy' (as npy) is not imported so by train_dopsd_lora.py"),
    ("from safetensors.torch import load_file, save_file", "from torch import load as load_file\nfrom safetensors.torch"
     " import save_file", "'from torch import load' (as load_file) is not imported so"),
    # a statement outside any block that drifted
    ('warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")',
     'warnings.filterwarnings("ignore", message="MatMul8bitLt")', "this statement is not in train_dopsd_lora.py"),
])
def test_copy_check_covers_constants_imports_and_statements(tmp_path, old, new, expected):
    text = (ROOT / "train_dopsd_full.py").read_text()
    assert text.count(old) == 1
    drifted = tmp_path / "train_dopsd_full.py"
    drifted.write_text(text.replace(old, new))
    problems = check_copies(drifted)
    assert len(problems) == 1 and expected in problems[0], problems


def test_an_own_version_may_differ_but_must_be_declared(tmp_path):
    text = (ROOT / "train_dopsd_full.py").read_text()
    assert "# Own version of train_dopsd_lora.main\ndef main(args):" in text  # main differs from the LoRA script's
    drifted = tmp_path / "train_dopsd_full.py"
    drifted.write_text(text.replace("# Own version of train_dopsd_lora.main\n", ""))
    assert [p.split(": ", 1)[1] for p in check_copies(drifted)] == [
        "main is also defined in train_dopsd_lora.py: mark it '# Copied from train_dopsd_lora.main' or '# Own version"
        " of train_dopsd_lora.main'"]
