"""Which card fits which model: peak memory of a D-OPSD iteration per --quantize_base option, and a real fit test.

For each model (full-size random-weight transformers, as in bench_dopsd.py; or the tiny committed ones on CPU) and
each --quantize_base option (none = the bf16 base), with the trainer's own functions:
  - peak accelerator memory (GiB, everything this process holds: weights, LoRA, optimizer state, activations) and
    seconds of one D-OPSD iteration at each resolution;
  - the relative difference of the student's prediction (no LoRA) against the bf16 base on the same random weights;
  - whether the iteration fits a 16 GB and a 12 GB card: it is run again with the allocator capped by
    torch.cuda.set_per_process_memory_fraction at the card's size minus 0.5 GiB for the CUDA context (which the
    cap does not count), an out-of-memory error caught and reported as "no";
  - with --fp16_check N: N iterations with fp16 weights under fp16 autocast and accelerate's gradient scaler (what
    --mixed_precision fp16 does on cards without bf16), counting non-finite losses and gradients and recording the
    largest activation magnitude at the output of any transformer block (fp16 overflows above 65504).
One JSON line per row goes to OUTPUT_DIR/memory.jsonl, a markdown table to OUTPUT_DIR/memory.md (default:
outputs/benchmarks/memory/, which git ignores).

    python benchmarks/bench_memory.py --models z-image klein-4b klein-9b --quantize_base none nf4 int8 fp8
    python benchmarks/bench_memory.py --models z-image klein-4b klein-9b --fp16_check 20
    python benchmarks/bench_memory.py --models tiny-z-image --resolutions 64 --quantize_base none nf4   # CPU
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_dopsd_lora as trainer  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from benchmarks.bench_dopsd import FULL_SIZE, TINY, build_family, synchronize, synthetic_batch  # noqa: E402


CONTEXT_RESERVE_GIB = 0.5  # the CUDA context and libraries, outside what the allocator cap counts


def relative_difference(prediction, reference):
    return ((prediction.float() - reference.float()).norm() / reference.float().norm()).item()


class Run:
    """A full-size (or tiny) transformer with the trainer's LoRA, EMA teacher and optimizer, ready to iterate."""

    def __init__(self, name, method, args, accelerator):
        self.device = device = accelerator.device
        self.accelerator = accelerator
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
        torch.manual_seed(0)  # the same random weights for every option
        self.family, self.train_args = build_family(name, args, weight_dtype, device)
        self.train_args.rollout_steps = args.rollout_steps
        self.transformer = transformer = self.family.transformer.to(device)
        probe = synthetic_batch(self.family, 512 if device.type == "cuda" else 64,
                                512 if device.type == "cuda" else 64, args.student_tokens, args.teacher_tokens)
        self.reference = self.predict(probe)
        self.prediction_difference = 0.0
        if method != "none":
            trainer.quantize_linear_layers(transformer, method, device, weight_dtype)
            self.prediction_difference = relative_difference(self.predict(probe), self.reference)
        targets = trainer.resolve_lora_targets(transformer, self.train_args.lora_layers)
        transformer.add_adapter(trainer.LoraConfig(r=args.rank, lora_alpha=args.lora_alpha,
                                                   init_lora_weights="gaussian", target_modules=targets))
        trainer.cast_training_params(transformer, torch.float32)
        if args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.lora = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
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
    run = Run(name, method, args, accelerator)
    rows = []
    for resolution in args.resolutions:
        batch = synthetic_batch(run.family, resolution, resolution, args.student_tokens, args.teacher_tokens)
        seconds, peak = run.measure(batch, args.repeats)
        row = {
            "model": name, "quantize_base": method, "resolution": resolution, "K": args.rollout_steps,
            "lora_rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "iteration_s": round(seconds, 3), "peak_GiB": None if peak is None else round(peak, 2),
            "prediction_rel_diff_vs_bf16": round(run.prediction_difference, 4),
            **{f"fits_{gb}GB": run.fits(batch, gb) for gb in args.cards_gb},
        }
        print(json.dumps(row), flush=True)
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
        print(json.dumps(row), flush=True)
        rows.append(row)
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows, fp16_rows, cards_gb):
    fits = " | ".join(f"fits {gb} GB" for gb in cards_gb)
    lines = []
    if rows:
        lines += [f"| model | --quantize_base | device | res | K | peak GiB | iteration s | prediction vs bf16"
                  f" | {fits} |", "|---|---|---|---|---|---|---|---|" + "---|" * len(cards_gb)]
    for r in rows:
        peak = "n/a" if r["peak_GiB"] is None else r["peak_GiB"]
        answers = " | ".join({True: "yes", False: "no", None: "n/a"}[r[f"fits_{gb}GB"]] for gb in cards_gb)
        lines.append(f"| {r['model']} | {r['quantize_base']} | {r['device']} | {r['resolution']}² | {r['K']} | "
                     f"{peak} | {r['iteration_s']} | {r['prediction_rel_diff_vs_bf16']:.2%} | {answers} |")
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
    parser.add_argument("--attention_backend", type=str, default=None)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "benchmarks" / "memory")
    args = parser.parse_args(argv)
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
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with open(args.output_dir / "memory.jsonl", "a") as f:
        for row in rows + fp16_rows:
            f.write(json.dumps(row) + "\n")
    table = markdown(rows, fp16_rows, args.cards_gb)
    (args.output_dir / "memory.md").write_text(table)
    print(table)
    return rows, fp16_rows


if __name__ == "__main__":
    main()
