"""Which card fits which model: peak memory of a D-OPSD iteration per --quantize_base option, and a real fit test.

For each model (full-size random-weight transformers, as in bench_dopsd.py; or the tiny committed ones on CPU) and
each --quantize_base option (none = the bf16 base), with the trainer's own functions:
  - peak accelerator memory (GiB, everything this process holds: weights, LoRA, optimizer state, activations) and
    seconds of one D-OPSD iteration at each resolution;
  - the relative difference of the student's prediction (no LoRA) against the bf16 base on the same random weights;
  - whether the iteration fits a card of each --cards_gb size (16 and 12 GB by default): it is run again with the
    allocator capped by torch.cuda.set_per_process_memory_fraction at the card's size minus 0.5 GiB for the CUDA
    context (which the cap does not count), an out-of-memory error caught and reported as "no";
  - with --fp16_check N: N iterations with fp16 weights under fp16 autocast and accelerate's gradient scaler (what
    --mixed_precision fp16 does on cards without bf16), counting non-finite losses and gradients and recording the
    largest activation magnitude at the output of any transformer block (fp16 overflows above 65504).
With --offload the same rows with the frozen base offloaded to host RAM (the trainer's --offload).

With --whole_run the trainer itself runs (one step, K roll-out steps, one training image) on pipeline folders: the
tiny ones, or for the full-size models random-weight pipelines of the real sizes (transformer, text encoder, VAE;
for Z-Image-Turbo also a Qwen3-VL of the real size as the teacher VLM), written to the system's temporary folder and
deleted after; once per set of --run_options. A thread samples the process's memory; for each phase of the run
(load: the text encoder and VAE; student contexts; teacher contexts; load transformer: loading, quantising,
offloading, the LoRA; training; outputs) it reports the peak resident host memory (RSS, which counts the pages of
memory-mapped model files that the OS can drop again), the peak anonymous host memory (what it cannot drop: heap,
pinned memory) and the peak accelerator memory.

One JSON line per row goes to OUTPUT_DIR/memory.jsonl (phases.jsonl for --whole_run), a markdown table to
OUTPUT_DIR/memory.md (phases.md); default OUTPUT_DIR: outputs/benchmarks/memory/, which git ignores.

    python benchmarks/bench_memory.py --models z-image klein-4b klein-9b --quantize_base none nf4 int8 fp8
    python benchmarks/bench_memory.py --models z-image klein-4b klein-9b --quantize_base none nf4 --offload \
        --cards_gb 16 12 8
    python benchmarks/bench_memory.py --models z-image klein-4b klein-9b --fp16_check 20
    python benchmarks/bench_memory.py --models z-image klein-4b klein-9b --whole_run --resolutions 1024 \
        --run_options "" "--quantize_encoders nf4 --quantize_base nf4 --offload"
    python benchmarks/bench_memory.py --models tiny-z-image --resolutions 64 --quantize_base none nf4   # CPU
    python benchmarks/bench_memory.py --models tiny-z-image tiny-klein --resolutions 64 --whole_run   # CPU
"""

import argparse
import gc
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_dopsd_lora as trainer  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from benchmarks.bench_dopsd import (  # noqa: E402
    FULL_SIZE,
    TINY,
    build_family,
    default_dtype_and_device,
    emit,
    synchronize,
    synthetic_batch,
)


CONTEXT_RESERVE_GIB = 0.5  # the CUDA context and libraries, outside what the allocator cap counts


def relative_difference(prediction, reference):
    return ((prediction.float() - reference.float()).norm() / reference.float().norm()).item()


class Run:
    """A full-size (or tiny) transformer prepared by the trainer's own prepare_student (LoRA, EMA teacher, optimizer;
    --quantize_base, --offload), ready to iterate."""

    def __init__(self, name, method, args, accelerator, offload=False):
        self.device = device = accelerator.device
        self.accelerator = accelerator
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
        torch.manual_seed(0)  # the same random weights for every option
        self.family, self.train_args = build_family(name, args, weight_dtype, device)
        train_args = self.train_args
        train_args.rollout_steps, train_args.quantize_base, train_args.offload = args.rollout_steps, method, offload
        train_args.gradient_checkpointing = args.gradient_checkpointing
        self.transformer = self.family.transformer.to(device)
        probe = synthetic_batch(self.family, 512 if device.type == "cuda" else 64,
                                512 if device.type == "cuda" else 64, args.student_tokens, args.teacher_tokens)
        reference = self.predict(probe)
        # The LoRA starts at zero, so the prepared student predicts what its (quantised, offloaded) base does.
        targets = trainer.resolve_lora_targets(self.family.transformer_layout, train_args.lora_layers)
        self.transformer, self.lora = trainer.prepare_student(train_args, self.family, accelerator, targets)
        self.prediction_difference = relative_difference(self.predict(probe), reference)
        self.ema_teacher = trainer.EMATeacher(self.lora, 0.9999)
        self.optimizer = torch.optim.AdamW([p for _, p in self.lora], lr=1e-6)
        self.generator = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def predict(self, batch):
        """The student's velocity (caption context) at the second roll-out step, from a fixed noise."""
        height, width = batch["bucket"]
        latents = self.family.initial_noise(1, height, width, torch.Generator(self.device).manual_seed(1))
        timesteps, _ = self.family.rollout_schedule(4, height, width)
        with self.accelerator.autocast():
            velocity = self.family.predict(self.transformer, latents, timesteps[1],
                                           self.family.collate(batch["student"]))
        return velocity.float().cpu()

    def iteration(self, batch):
        """One D-OPSD iteration and optimizer step; returns (loss, gradients finite)."""
        with self.accelerator.autocast():
            loss, _ = trainer.dopsd_step(self.family, self.transformer, self.transformer, self.ema_teacher, batch,
                                         self.accelerator, self.train_args.rollout_steps, self.train_args.loss_space,
                                         self.generator)
        parameters = [p for _, p in self.lora]
        finite = all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None)
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.step(self.optimizer)  # skips the update when the scaled gradients overflowed
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema_teacher.update()
        return loss.item(), finite

    def measure(self, batch, repeats):
        """(seconds per iteration, peak GiB) after a warm-up iteration."""
        self.iteration(batch)
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        for _ in range(repeats):
            self.iteration(batch)
        synchronize(self.device)
        seconds = (time.perf_counter() - start) / repeats
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return seconds, peak

    def fits(self, batch, card_gb):
        """Whether an iteration runs with the allocator capped to a card of `card_gb` GB (None on CPU)."""
        if self.device.type != "cuda":
            return None
        total = torch.cuda.get_device_properties(self.device).total_memory
        cap = card_gb * 1e9 - CONTEXT_RESERVE_GIB * 2**30
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.device.index)
        try:
            self.iteration(batch)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.set_per_process_memory_fraction(1.0, self.device.index)
            torch.cuda.empty_cache()

    def fp16_check(self, batch, iterations):
        """Non-finite losses / gradients over `iterations` fp16 iterations, and the largest block output."""
        largest = []
        block_types = set(self.transformer._repeated_blocks)

        def record(module, inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            largest.append(output.detach().abs().float().max())

        hooks = [m.register_forward_hook(record) for m in self.transformer.modules()
                 if type(m).__name__ in block_types]
        bad_losses = bad_gradients = 0
        try:
            for _ in range(iterations):
                loss, finite = self.iteration(batch)
                bad_losses += not torch.isfinite(torch.tensor(loss))
                bad_gradients += not finite
        finally:
            for hook in hooks:
                hook.remove()
        return {"fp16_iterations": iterations, "fp16_nonfinite_losses": int(bad_losses),
                "fp16_nonfinite_gradient_steps": int(bad_gradients),
                "fp16_max_block_output": round(torch.stack(largest).max().item(), 1) if largest else None,
                "fp16_scale": None if self.accelerator.scaler is None else self.accelerator.scaler.get_scale()}


def bench(name, method, args, accelerator):
    device = accelerator.device
    run = Run(name, method, args, accelerator, offload=args.offload)
    rows = []
    for resolution in args.resolutions:
        batch = synthetic_batch(run.family, resolution, resolution, args.student_tokens, args.teacher_tokens)
        seconds, peak = run.measure(batch, args.repeats)
        row = {
            "model": name, "quantize_base": method, "offload": args.offload, "resolution": resolution,
            "K": args.rollout_steps,
            "lora_rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "iteration_s": round(seconds, 3), "peak_GiB": None if peak is None else round(peak, 2),
            "prediction_rel_diff_vs_bf16": round(run.prediction_difference, 4),
            **{f"fits_{gb}GB": run.fits(batch, gb) for gb in args.cards_gb},
        }
        emit(row, args.output_dir / "memory.jsonl")
        rows.append(row)
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_fp16(name, args, accelerator):
    """fp16 weights, fp16 autocast and a gradient scaler, as --mixed_precision fp16 trains."""
    device = accelerator.device
    run = Run(name, "none", args, accelerator)
    rows = []
    for resolution in args.resolutions:
        batch = synthetic_batch(run.family, resolution, resolution, args.student_tokens, args.teacher_tokens)
        row = {"model": name, "precision": accelerator.mixed_precision,
               "resolution": resolution, "K": args.rollout_steps, **run.fp16_check(batch, args.fp16_check)}
        emit(row, args.output_dir / "memory.jsonl")
        rows.append(row)
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# -- the whole run: host and accelerator memory per phase of the trainer itself ---------------------------------------

# The real text encoders' and teacher VLMs' sizes (their published configs), for random-weight stand-ins.
QWEN3 = {
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}
QWEN3_VL_VISION = {
    "4b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
               deepstack_visual_indexes=[5, 11, 17]),
    "8b": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
               deepstack_visual_indexes=[8, 16, 24]),
}
LAYERS = {"num_hidden_layers": 36, "max_window_layers": 36, "layer_types": ["full_attention"] * 36}
TEXT_ENCODER_SIZE = {"z-image": "4b", "klein-4b": "4b", "klein-9b": "8b"}
FLUX_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=16,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def write_random_pipeline(name, folder, device):
    """A pipeline folder of the real model's sizes with random bf16 weights (tokenizer, scheduler and image
    processor from the tiny folders); for Z-Image-Turbo also folder/teacher-vlm, a Qwen3-VL of the real size whose
    token ids are the tiny tokenizer's. Returns (pipeline folder, VLM folder or None)."""
    import diffusers
    import transformers

    kind, config = FULL_SIZE[name]
    tiny = TINY["tiny-z-image" if kind == "z-image" else "tiny-klein"]
    shutil.copytree(tiny, folder, ignore=lambda path, names: [n for n in names if n.endswith(".safetensors")])
    text = QWEN3[TEXT_ENCODER_SIZE[name]]
    tiny_text = {**transformers.AutoConfig.from_pretrained(tiny / "text_encoder").to_dict(), "dtype": "bfloat16"}
    with default_dtype_and_device(torch.bfloat16, device):
        parts = {
            "transformer": (diffusers.ZImageTransformer2DModel if kind == "z-image"
                            else diffusers.Flux2Transformer2DModel)(**config),
            "text_encoder": (transformers.Qwen3Model if kind == "z-image" else transformers.Qwen3ForCausalLM)(
                transformers.Qwen3Config(**{**tiny_text, **text, **LAYERS})),
            "vae": diffusers.AutoencoderKL(**FLUX_VAE) if kind == "z-image" else diffusers.AutoencoderKLFlux2(),
        }
    for part, model in parts.items():
        shutil.rmtree(folder / part)
        model.save_pretrained(folder / part, max_shard_size="5GB")
    del parts, model
    release(device)
    if kind != "z-image":
        return folder, None
    vlm_folder = folder / "teacher-vlm"
    shutil.copytree(TINY["tiny-z-image"].parent / "qwen3-vl", vlm_folder,
                    ignore=lambda path, names: [n for n in names if n.endswith(".safetensors")])
    vlm_config = transformers.AutoConfig.from_pretrained(vlm_folder).to_dict()
    vlm_config["text_config"] = {**vlm_config["text_config"], **text, **LAYERS,
                                 "rope_parameters": {**vlm_config["text_config"]["rope_parameters"],
                                                     "mrope_section": [24, 20, 20]}}  # of head_dim 128
    vlm_config["vision_config"] = {**vlm_config["vision_config"], **QWEN3_VL_VISION[TEXT_ENCODER_SIZE[name]]}
    with default_dtype_and_device(torch.bfloat16, device):
        vlm = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**vlm_config))
    vlm.save_pretrained(vlm_folder, max_shard_size="5GB")
    del vlm
    release(device)
    return folder, vlm_folder


def release(device):
    """Give the accelerator memory of deleted models back, so that the trainer's process can use it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def memory_now():
    """(resident, anonymous) host memory of this process in bytes, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon"))


class PhaseMemory:
    """Peak host and accelerator memory per phase of a training run: a thread samples /proc every 5 ms; phase()
    closes the current phase and opens the next."""

    def __init__(self):
        self.phases, self.name, self.peak = [], "load", [0, 0]
        self.lock, self.done = threading.Lock(), False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.done:
            resident, anonymous = memory_now()
            with self.lock:
                self.peak = [max(self.peak[0], resident), max(self.peak[1], anonymous)]
            time.sleep(0.005)

    def phase(self, name):
        resident, anonymous = memory_now()
        with self.lock:
            peak = [max(self.peak[0], resident), max(self.peak[1], anonymous)]
            self.peak = [0, 0]
        gpu = None
        if torch.cuda.is_available():
            gpu = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        self.phases.append({"phase": self.name, "peak_rss_GiB": round(peak[0] / 2**30, 2),
                            "peak_anonymous_GiB": round(peak[1] / 2**30, 2), "peak_gpu_GiB": gpu})
        self.name = name
        if name is None:
            self.done = True


def whole_run_child(argv):
    """In a fresh process: train with the trainer's `argv`, print the per-phase peaks as one JSON line."""
    memory = PhaseMemory()

    def at_first_call(owner, attribute, phase):
        function = getattr(owner, attribute)

        def call(*args, **kwargs):
            if phase not in [p["phase"] for p in memory.phases] and memory.name != phase:
                memory.phase(phase)
            return function(*args, **kwargs)
        setattr(owner, attribute, call)

    for family in trainer.MODEL_FAMILIES.values():
        at_first_call(family, "encode_student_context", "student contexts")
        at_first_call(family, "build_teacher_context", "teacher contexts")
    at_first_call(trainer, "prepare_student", "load transformer")
    at_first_call(trainer, "dopsd_step", "training")
    at_first_call(trainer, "finish", "outputs")
    trainer.main(trainer.parse_args(argv))
    memory.phase(None)
    print("PHASES " + json.dumps(memory.phases), flush=True)


def whole_runs(name, args):
    """Rows of peak memory per phase for one model and each of --run_options."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="dopsd-whole-run-"))  # tens of GB of model files: not in the output folder
    data = work / "data"
    data.mkdir()
    for file in ("chelsea-1.jpg", "chelsea-1.txt"):
        shutil.copy(ROOT / "examples/data/chelsea-cat" / file, data / file)
    try:
        if name in TINY:
            pipeline, vlm = TINY[name], (TINY[name].parent / "qwen3-vl" if name == "tiny-z-image" else None)
        else:
            start = time.perf_counter()
            pipeline, vlm = write_random_pipeline(name, work / "model", device)
            print(f"{name}: random-weight pipeline written in {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for options in args.run_options:
            output = work / "run"
            argv = ["--pretrained_model_name_or_path", str(pipeline), "--instance_data_dir", str(data),
                    "--output_dir", str(output), "--resolution", str(args.resolutions[-1]), "--max_train_steps", "1",
                    "--gradient_accumulation_steps", "1", "--rollout_steps", str(args.rollout_steps),
                    "--rank", str(args.rank), "--lora_alpha", str(args.lora_alpha), "--report_to", "none",
                    "--no-compile", "--prior_prompts", "--validation_inference_steps", "1",
                    *(["--teacher_vlm_name_or_path", str(vlm)] if vlm else []),
                    *(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
                    *(["--mixed_precision", "bf16"] if device == "cuda" else []), *shlex.split(options)]
            result = subprocess.run([sys.executable, __file__, "--whole_run_child", *argv], capture_output=True,
                                    text=True, cwd=ROOT)
            shutil.rmtree(output, ignore_errors=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("PHASES ")]
            base = {"model": name, "options": options, "resolution": args.resolutions[-1], "K": args.rollout_steps,
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
            if result.returncode or not lines:
                failure = (result.stderr.strip().splitlines() or ["no output"])[-1][:300]
                row = {**base, "phase": None, "error": f"exit {result.returncode}: {failure}"}
                emit(row, args.output_dir / "phases.jsonl")
                rows.append(row)
                continue
            for phase in json.loads(lines[-1].removeprefix("PHASES ")):
                row = {**base, **phase}
                emit(row, args.output_dir / "phases.jsonl")
                rows.append(row)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def phases_markdown(rows):
    lines = ["| model | options | res | phase | peak RSS GiB | peak anonymous GiB | peak GPU GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        options = f"`{r['options']}`" if r["options"] else "(defaults)"
        if r.get("error"):
            lines.append(f"| {r['model']} | {options} | {r['resolution']}² | failed: {r['error']} | | | |")
            continue
        gpu = "n/a" if r["peak_gpu_GiB"] is None else r["peak_gpu_GiB"]
        lines.append(f"| {r['model']} | {options} | {r['resolution']}² | {r['phase']} | {r['peak_rss_GiB']} |"
                     f" {r['peak_anonymous_GiB']} | {gpu} |")
    return "\n".join(lines) + "\n"


def markdown(rows, fp16_rows, cards_gb):
    fits = " | ".join(f"fits {gb} GB" for gb in cards_gb)
    lines = []
    if rows:
        lines += [f"| model | --quantize_base | --offload | device | res | K | peak GiB | iteration s | prediction"
                  f" vs bf16 | {fits} |", "|---|---|---|---|---|---|---|---|---|" + "---|" * len(cards_gb)]
    for r in rows:
        peak = "n/a" if r["peak_GiB"] is None else r["peak_GiB"]
        answers = " | ".join({True: "yes", False: "no", None: "n/a"}[r[f"fits_{gb}GB"]] for gb in cards_gb)
        lines.append(f"| {r['model']} | {r['quantize_base']} | {'yes' if r['offload'] else 'no'} | {r['device']} |"
                     f" {r['resolution']}² | {r['K']} | {peak} | {r['iteration_s']} |"
                     f" {r['prediction_rel_diff_vs_bf16']:.2%} | {answers} |")
    if fp16_rows:
        lines += ["| model | precision | res | K | iterations | non-finite losses | non-finite gradient steps"
                  " | max block output | final scale |", "|---|---|---|---|---|---|---|---|---|"]
        for r in fp16_rows:
            lines.append(f"| {r['model']} | {r['precision']} | {r['resolution']}² | {r['K']} | {r['fp16_iterations']}"
                         f" | {r['fp16_nonfinite_losses']} | {r['fp16_nonfinite_gradient_steps']} |"
                         f" {r['fp16_max_block_output']} | {r['fp16_scale']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["z-image", "klein-4b", "klein-9b"],
                        choices=[*FULL_SIZE, *TINY])
    parser.add_argument("--quantize_base", nargs="+", default=["none", "nf4", "int8", "fp8"],
                        choices=[m for m in trainer.QUANTIZATION_BACKENDS])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--rollout_steps", type=int, default=4)
    parser.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lora_alpha", type=int, default=128)
    parser.add_argument("--student_tokens", type=int, default=256)
    parser.add_argument("--teacher_tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cards_gb", nargs="+", type=int, default=[16, 12])
    parser.add_argument("--fp16_check", type=int, default=0, help="Instead of the memory table: run this many fp16"
                        " iterations per model (cards without bf16) and count non-finite steps.")
    parser.add_argument("--offload", action="store_true", help="Offload the frozen base to host RAM (--offload).")
    parser.add_argument("--whole_run", action="store_true", help="Instead of the memory table: run the trainer"
                        " once per --run_options and report host and accelerator memory per phase.")
    parser.add_argument("--run_options", nargs="+", default=[""], help="--whole_run: trainer flags per run, one"
                        " string each (\"\" = the defaults).")
    parser.add_argument("--attention_backend", type=str, default=None)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "benchmarks" / "memory")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.whole_run:
        # A time limit's SIGTERM ends the run through its `finally`, which deletes the written models (and
        # subprocess.run kills the trainer it waits for).
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        rows = [row for name in args.models for row in whole_runs(name, args)]
        table = phases_markdown(rows)
        (args.output_dir / "phases.md").write_text(table)
        print(table)
        return rows
    cuda = torch.cuda.is_available()
    # One mixed precision per process (accelerate's state is global): fp16 for the fp16 check, else bf16.
    accelerator = Accelerator(cpu=not cuda, mixed_precision=("fp16" if args.fp16_check else "bf16") if cuda else "no")
    rows, fp16_rows = [], []
    for name in args.models:
        if args.fp16_check:
            fp16_rows += bench_fp16(name, args, accelerator)
            continue
        for method in args.quantize_base:
            rows += bench(name, method, args, accelerator)
    table = markdown(rows, fp16_rows, args.cards_gb)
    (args.output_dir / "memory.md").write_text(table)
    print(table)
    return rows, fp16_rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--whole_run_child"]:
        whole_run_child(sys.argv[2:])
    else:
        main()
