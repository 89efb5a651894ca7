"""Shared helpers for the tests: paths of the committed tiny models and in-process construction of the pieces.

Everything runs on the CPU in float32 on the tiny random models under examples/tiny (no network, no downloads).
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_dopsd_lora as lora_script  # noqa: E402


TINY = ROOT / "examples" / "tiny"
TINY_ZIMAGE = TINY / "z-image-turbo"
TINY_KLEIN = TINY / "flux2-klein"
TINY_VLM = TINY / "qwen3-vl"
CONCEPT = ROOT / "examples" / "data" / "chelsea-cat"
TINY_RESOLUTION = 64


def uses_vlm_teacher(model, extra):
    """Whether a run of `model` with these flags has the VLM teacher (the scripts refuse a VLM named for another):
    Z-Image-Turbo's default, or klein with --teacher_context vlm."""
    flags = [str(a) for a in extra]
    if "--teacher_context" in flags:
        return flags[len(flags) - 1 - flags[::-1].index("--teacher_context") + 1] == "vlm"
    index = Path(model) / "model_index.json"
    return not (index.is_file() and '"Flux2KleinPipeline"' in index.read_text())  # a damaged index is not klein


def script_args(output_dir, model=TINY_ZIMAGE, *extra, data=CONCEPT):
    """The argument list of a short tiny-model run; `extra` flags override the defaults (argparse keeps the last).
    The tiny teacher VLM is named where the run uses it."""
    return [
        "--pretrained_model_name_or_path", str(model),
        *(["--teacher_vlm_name_or_path", str(TINY_VLM)] if uses_vlm_teacher(model, extra) else []),
        "--instance_data_dir", str(data),
        "--output_dir", str(output_dir),
        "--resolution", str(TINY_RESOLUTION),
        "--report_to", "none",
        "--seed", "0",
        *map(str, extra),
    ]


def load_family(output_dir, model=TINY_ZIMAGE, *extra, script=lora_script):
    """Parsed args and the model family, loaded in float32 on the CPU as the script would."""
    args = script.parse_args(script_args(output_dir, model, *extra))
    family_class = script.detect_family(args)
    family_class.apply_defaults(args, script.TRAINING)
    family = family_class(args, torch.float32, torch.device("cpu"))
    family.prepare_teacher_contexts(keep_text_encoder=True)
    return args, family


def add_random_lora(transformer, args, script=lora_script, seed=0):
    """The script's LoRA, with B made non-zero so the student differs from the base model."""
    targets = script.resolve_lora_targets(transformer, args.lora_layers)
    transformer.add_adapter(script.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return [p for p in transformer.parameters() if p.requires_grad]


def load_lora_into_pipeline(pipe, folder):
    """Load a trained LoRA the way users do; assert diffusers warned about nothing and every saved key was applied."""
    from safetensors.torch import load_file

    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(folder)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    saved = load_file(Path(folder) / lora_script.LORA_WEIGHT_NAME)
    loaded = lora_script.get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.get_active_adapters()[0])
    assert {k.removeprefix("transformer.") for k in saved} == set(loaded)
    return saved


def student_and_differing_teacher(family, args, accelerator):
    """Cached contexts, a non-zero LoRA student and an EMA teacher nudged away from it (so the loss is not ~0)."""
    examples = lora_script.collect_examples(args, family.resolution_multiple)
    store = lora_script.ContextStore(family, examples, accelerator, args.output_dir)
    store.fill()
    lora = add_random_lora(family.transformer, args)
    ema = lora_script.EMATeacher([(n, p) for n, p in family.transformer.named_parameters() if p.requires_grad],
                                 0.9999)
    with torch.no_grad():
        for shadow in ema.shadow:
            shadow.add_(0.02 * torch.randn_like(shadow))
    return store, lora, ema


def train_in_process(family, args, examples, accelerator, steps, learning_rate, script=lora_script,
                     after_step=None, **ema_options):
    """A short D-OPSD run with the script's own pieces (its student: a LoRA or the whole transformer; the step; the
    EMA teacher, with `ema_options` such as dtype), for claims about learning. after_step(named_parameters) runs
    after every EMA update."""
    trained = (script.resolve_lora_targets(family.transformer_layout, args.lora_layers) if script is lora_script
               else set(script.resolve_trainable(family.transformer_layout, args.train_layers)))
    transformer, named = script.prepare_student(args, family, accelerator, trained)
    ema = script.EMATeacher(named, args.ema_decay, **ema_options)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=learning_rate)
    store = script.ContextStore(family, examples, accelerator, args.output_dir)
    store.fill()
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch = script.collate_examples([store[step % len(store)]])
        script.dopsd_step(family, transformer, transformer, ema, batch, accelerator, args.rollout_steps,
                          args.loss_space, generator)
        torch.nn.utils.clip_grad_norm_([p for _, p in named], args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        if after_step is not None:
            after_step(named)
    return ema, store  # the store, as a dataset: item i is example i's contexts and bucket


def run_in_process(argv, script=lora_script):
    """A training run in this process, as the command line would start it (no interpreter start-up, no imports:
    seconds faster than run_script); returns the trained transformer."""
    return script.main(script.parse_args([str(a) for a in argv]))


def run_script(argv, script="train_dopsd_lora.py", launcher=None, check=True, env=None, timeout=600):
    """Run a training script in a subprocess, as a user would; returns the CompletedProcess."""
    command = [sys.executable, str(ROOT / script), *map(str, argv)]
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                   str(ROOT / script), *map(str, argv)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
