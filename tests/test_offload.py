"""--offload: the frozen base's weights live in host RAM and each layer's come to the accelerator only while it runs.

On this CPU-only machine the hooks run with the host as both places (diffusers' group offloading allows it), so what
is tested is what the trainer controls: which weights the hooks manage (every frozen base weight, never a LoRA
weight, so the optimizer, the gradients and the EMA teacher's storage swap never see an offloaded tensor), that they
run, and that an offloaded step, its optimizer step and its EMA update equal a resident one exactly. The command-line
flag itself needs a CUDA GPU and says so.
"""

import importlib.util
import shutil

import pytest
import torch
from accelerate import Accelerator
from conftest import CONCEPT, TINY_ZIMAGE, lora_script as script, script_args

from diffusers.hooks import group_offloading


def offloaded_parameters(transformer):
    """Every parameter a group-offloading hook of the transformer moves."""
    managed = set()
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(group_offloading._GROUP_OFFLOADING) if registry is not None else None
        if hook is not None:
            group = hook.group
            managed.update(p for m in group.modules for p in m.parameters())
            managed.update(group.parameters)
    return managed


def one_step(tmp_path, quantize_base, offload, onloads):
    """One D-OPSD iteration, AdamW step and EMA update on the tiny Z-Image-Turbo, from a non-zero LoRA and a teacher
    that differs from it; returns (loss, gradients, LoRA weights, EMA shadow, transformer, LoRA parameters)."""
    data = tmp_path / "data"
    data.mkdir(parents=True)
    for name in ("chelsea-1.jpg", "chelsea-1.txt"):
        shutil.copy(CONCEPT / name, data / name)
    args = script.parse_args(script_args(tmp_path / "out", TINY_ZIMAGE, "--rollout_steps", 2, "--rank", 4,
                                         "--gradient_checkpointing", "--quantize_base", quantize_base, data=data))
    script.ZImageTurbo.apply_defaults(args, script.TRAINING)
    family = script.ZImageTurbo(args, torch.float32, torch.device("cpu"))
    args.offload = offload  # the flag refuses a machine without CUDA; the function under it runs anywhere
    accelerator = Accelerator(cpu=True)
    examples = script.collect_examples(args, family.resolution_multiple)
    store = script.ContextStore(family, examples, accelerator, args.output_dir)
    store.fill()
    torch.manual_seed(0)  # the LoRA's initial A
    targets = script.resolve_lora_targets(family.transformer_layout, args.lora_layers)
    transformer, lora = script.prepare_student(args, family, accelerator, targets)
    transformer.train()  # as the training loop runs it: gradient checkpointing recomputes each block in the backward
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in lora:
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    ema = script.EMATeacher(lora, 0.5)
    with torch.no_grad():
        for shadow in ema.shadow:
            shadow.add_(0.02 * torch.randn(shadow.shape, generator=generator))
    optimizer = torch.optim.AdamW([p for _, p in lora], lr=1e-2)
    batch = script.collate_examples([store[0]])
    onloads.clear()
    loss, _ = script.dopsd_step(family, transformer, transformer, ema, batch, accelerator, args.rollout_steps,
                                args.loss_space, torch.Generator().manual_seed(1))
    gradients = [p.grad.clone() for _, p in lora]
    optimizer.step()
    ema.update()
    return (loss, gradients, [p.detach().clone() for _, p in lora], [s.clone() for s in ema.shadow], transformer,
            lora)


@pytest.mark.parametrize("quantize_base", ["none", pytest.param("nf4", marks=pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="nf4 needs bitsandbytes")), pytest.param(
    "fp8", marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="fp8 needs torchao"))])
def test_an_offloaded_step_equals_a_resident_one_and_the_lora_is_never_offloaded(tmp_path, monkeypatch,
                                                                                 quantize_base):
    """With a full-precision base, an nf4 one (bitsandbytes' 4-bit layers under the hooks, peft's LoRA around them)
    and an fp8 one (torchao's weight tensors)."""
    onloads = []
    onload = group_offloading.ModuleGroup.onload_

    def counted_onload(group):
        onloads.append(group)
        return onload(group)

    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", counted_onload)
    resident = one_step(tmp_path / "resident", quantize_base, False, onloads)
    assert onloads == []
    offloaded = one_step(tmp_path / "offloaded", quantize_base, True, onloads)
    transformer, lora = offloaded[4], offloaded[5]

    managed = offloaded_parameters(transformer)
    lora_parameters = {p for _, p in lora}
    frozen = {p for p in transformer.parameters() if not p.requires_grad}
    assert managed == frozen  # every base weight is offloaded ...
    assert not managed & lora_parameters  # ... and no LoRA weight: the teacher's storage swap is untouched
    assert not [name for name, m in transformer.named_modules() if "lora_" in name and hasattr(m, "_diffusers_hook")]
    # the hooks ran in the step: every base linear layer was brought in (once per pass at least)
    base_linears = [m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
                    and "lora_" not in name]
    assert {id(m) for g in onloads for m in g.modules} >= {id(m) for m in base_linears}

    loss, gradients, weights, shadow = resident[:4]
    torch.testing.assert_close(offloaded[0], loss, rtol=0, atol=0)
    assert loss > 0
    for expected, got in zip(gradients + weights + shadow, offloaded[1] + offloaded[2] + offloaded[3]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert any(g.abs().max() > 0 for g in gradients)



@pytest.mark.parametrize("flags, expected", [
    ("--quantize_base int8", "--offload cannot offload --quantize_base int8: bitsandbytes' int8 layers keep their own"
     " copy of the weights on the GPU; use --quantize_base nf4 or fp8"),
    ("--compile", "--compile gains nothing with --offload: the hook around every offloaded layer splits each block"
     " into one graph per layer, and most stay eager; drop --compile (off by default with --offload)"),
])
def test_combinations_that_cannot_work_are_refused_on_a_cuda_machine(tmp_path, monkeypatch, capsys, flags,
                                                                     expected):
    """(The machine without CUDA is refused first: tests/test_bad_inputs.py.) int8 keeps a GPU copy of its weights,
    so nothing would be offloaded; compiling offloaded layers splits every block into per-layer graphs that mostly
    stay eager (checked on the CPU: 58 graphs and dynamo's recompile limit hit within three steps)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if flags == "--quantize_base int8" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("--quantize_base int8 needs bitsandbytes")
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(script_args(tmp_path / "out", TINY_ZIMAGE, "--offload", *flags.split()))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(expected)
    assert not (tmp_path / "out").exists()
