"""Time and size one D-OPSD iteration against a plain SFT LoRA step, exactly as the trainer runs them.

Full-size transformers are built from their configs with random weights (no download): Z-Image-Turbo (6.15 B),
FLUX.2-klein-4B and -9B. Contexts are synthetic but of realistic length: the student's caption (256 tokens for
Z-Image, the 512 padded tokens klein always uses), the teacher's caption plus image tokens (VLM context: ~600 tokens
for Z-Image; klein's edit teacher: the reference image's tokens appended to the noisy ones, at
--reference_resolutions).

The model is prepared with the trainer's own functions (train_dopsd_lora.prepare_student, accelerate's
autocast, CompiledBlocks), and each configuration measures, in one process:
  (a) a vanilla-SFT LoRA step (same LoRA, same checkpointing): noise a latent, predict, MSE to the velocity, backward;
  (b) one D-OPSD iteration (train_dopsd_lora.dopsd_step) for each K;
in each of --modes eager / compiled. Compiled mode first warms up on three aspect buckets and reports the time of
those first calls (the compile) and how many graphs the later buckets and the timed runs added (recompiles).
FLOPs are counted with torch's FlopCounterMode, eagerly and before any compile, over the student's forward + backward
(without checkpointing's recomputation: model FLOPs) and the teacher's forward; an iteration is K of each. MFU is
achieved FLOP/s over two peaks, each labelled: the card's dense bf16 peak from its spec sheet (SPEC_PEAK_TFLOPS; n/a
for other cards) and what one large matmul in the training dtype measures on this device at the start of the run.
Between models everything the last one held is freed (on a GPU the run stops if anything is left allocated), so
each model's peak memory is its own. One JSON line per configuration goes to --output, a markdown table to
--markdown (default: outputs/benchmarks/, which git ignores; measured rows worth keeping go to benchmarks/results/).

    python benchmarks/bench_dopsd.py --models z-image klein-4b --resolutions 1024 --gradient_checkpointing \
        --modes eager compiled
    python benchmarks/bench_dopsd.py --models tiny-z-image tiny-klein --resolutions 64   # CPU, seconds
"""

import argparse
import gc
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = ROOT / "outputs" / "benchmarks"  # ignored by git: a run never changes the repository's files
sys.path.insert(0, str(ROOT))

import train_dopsd_lora as trainer  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)


# Full-size configs (docs/method.md §8). klein-9B: 32 heads x 128 = 4096, which with 8 double and 24 single blocks
# gives 9.1 B.
FULL_SIZE = {
    "z-image": ("z-image", {}),
    "klein-4b": ("klein", dict(num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128,
                               in_channels=128, joint_attention_dim=3 * 2560, guidance_embeds=False)),
    "klein-9b": ("klein", dict(num_layers=8, num_single_layers=24, num_attention_heads=32, attention_head_dim=128,
                               in_channels=128, joint_attention_dim=3 * 4096, guidance_embeds=False)),
}
TINY = {"tiny-z-image": ROOT / "examples/tiny/z-image-turbo", "tiny-klein": ROOT / "examples/tiny/flux2-klein"}


@contextmanager
def default_dtype_and_device(dtype, device):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def small_vae(kind):
    """A VAE with the real one's downsampling (8x) and latent channels: the family only reads its shape config."""
    if kind == "z-image":
        return AutoencoderKL(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
                             up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, norm_num_groups=4)
    return AutoencoderKLFlux2(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
                              up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=32, norm_num_groups=4)


def build_family(name, args, weight_dtype, device):
    """The trainer's model family around a full-size random transformer, or a tiny committed pipeline."""
    train_args = trainer.parse_args(["--pretrained_model_name_or_path", str(TINY.get(name, "random")),
                                     "--instance_data_dir", ".", "--output_dir", "/tmp/dopsd-bench",
                                     "--rank", str(args.rank), "--lora_alpha", str(args.lora_alpha),
                                     *(["--attention_backend", args.attention_backend] if args.attention_backend
                                       else [])])
    if name in TINY:
        family_class = trainer.detect_family(train_args)
        family_class.apply_defaults(train_args, trainer.TRAINING)
        family = family_class(train_args, weight_dtype, device)
    else:
        kind, config = FULL_SIZE[name]
        with default_dtype_and_device(weight_dtype, device):
            if kind == "z-image":
                transformer = ZImageTransformer2DModel(**config)
                pipeline = ZImagePipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), small_vae(kind), None, None,
                                          transformer)
            else:
                transformer = Flux2Transformer2DModel(**config)
                pipeline = Flux2KleinPipeline(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                                              small_vae(kind), None, None, transformer, is_distilled=True)
        family_class = trainer.ZImageTurbo if kind == "z-image" else trainer.Flux2Klein
        family_class.apply_defaults(train_args, trainer.TRAINING)
        family = family_class(train_args, weight_dtype, device, pipeline=pipeline)
    return family, train_args


def synthetic_batch(family, height, width, student_tokens, teacher_tokens, reference_size=None):
    """Cached contexts of realistic length for one sample, as the context store returns them. klein's edit teacher
    gets a reference image of `reference_size` (height, width; default: the bucket), as --reference_resolution
    gives."""
    transformer = family.transformer
    if isinstance(family, trainer.ZImageTurbo):
        width_features = transformer.config.cap_feat_dim
        student = {"prompt_embeds": torch.randn(student_tokens, width_features)}
        teacher = {"prompt_embeds": torch.randn(teacher_tokens, width_features)}
    else:
        joint = transformer.config.joint_attention_dim
        student = {"prompt_embeds": torch.randn(512, joint)}
        # (1, C, h, w), like an encoded image
        reference = family.initial_noise(1, *(reference_size or (height, width))).float().cpu()
        tokens = family.pipeline._pack_latents(reference)[0]
        teacher = {"prompt_embeds": torch.randn(512, joint), "image_latents": tokens,
                   "image_latent_ids": family.pipeline._prepare_image_ids([reference])[0]}
    return {"student": [student], "teacher": [teacher], "bucket": (height, width)}


# Dense (no sparsity) bf16 tensor-core peak of a card from NVIDIA's spec sheets, TFLOP/s; the first name contained in
# the device's name wins, so the PCIe/NVL variants come before the SXM ones.
SPEC_PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H200 NVL": 835, "H100": 989, "H200": 989, "A100": 312}


def spec_peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for card, peak in SPEC_PEAK_TFLOPS.items() if card in name), None)


def matmul_peak_tflops(device, dtype, repeats=10):
    """TFLOP/s of one large square matmul in `dtype` on this device: the practical ceiling for the model's matmuls."""
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def release_models(accelerator, device):
    """Free everything the last model held, so the next model's peak memory is its own. accelerate's free_memory()
    drops its references but leaves the model in a reference cycle, which only the garbage collector breaks."""
    accelerator.free_memory()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch._C._cuda_clearCublasWorkspaces()  # allocated through the caching allocator, counted as allocated
        allocated = torch.cuda.memory_allocated(device)
        assert allocated == 0, f"{allocated / 2**30:.2f} GiB still allocated after freeing the last model"


def mfu(flops, seconds, peak_tflops):
    return None if peak_tflops is None else round(flops / seconds / 1e12 / peak_tflops, 3)


def sft_step(family, transformer, batch, accelerator, generator):
    """A vanilla flow-matching SFT step: x_t = (1 - s) x0 + s eps, target v = eps - x0, one forward and backward."""
    height, width = batch["bucket"]
    data = family.initial_noise(1, height, width, generator)
    noise = family.initial_noise(1, height, width, generator)
    timesteps, sigmas = family.rollout_schedule(4, height, width)
    sigma, timestep = sigmas[1], timesteps[1]
    noisy = ((1 - sigma) * data.float() + sigma * noise.float()).to(data.dtype)
    velocity = family.predict(transformer, noisy, timestep, family.collate(batch["student"]))
    loss = torch.nn.functional.mse_loss(velocity.float(), (noise.float() - data.float()))
    accelerator.backward(loss)
    return loss.detach()


def count_flops(family, transformer, ema_teacher, batch, accelerator):
    """(student forward + backward, teacher forward) FLOPs of one roll-out step, counted eagerly.

    The student's pass is counted without gradient checkpointing (its recomputation is not model work); if that
    does not fit in memory, with it, and the row says so."""
    height, width = batch["bucket"]
    latents = family.initial_noise(1, height, width)
    timesteps, sigmas = family.rollout_schedule(4, height, width)
    model = accelerator.unwrap_model(transformer)
    checkpointing = model.is_gradient_checkpointing
    with torch.no_grad(), ema_teacher.swapped_in(), FlopCounterMode(display=False) as counter:
        teacher_velocity = family.predict(transformer, latents, timesteps[0], family.collate(batch["teacher"]))
    teacher_flops = counter.get_total_flops()

    def student_pass():
        with FlopCounterMode(display=False) as counter:
            velocity = family.predict(transformer, latents, timesteps[0], family.collate(batch["student"]))
            accelerator.backward(trainer.dopsd_loss(velocity, teacher_velocity, latents, sigmas[0], "x0"))
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    student_flops, recompute_counted = None, False
    if checkpointing:
        model.disable_gradient_checkpointing()
        try:
            student_flops = student_pass()
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
        finally:
            model.enable_gradient_checkpointing()
    if student_flops is None:
        recompute_counted = checkpointing
        student_flops = student_pass()
    return student_flops, teacher_flops, recompute_counted


def timed(fn, device, repeats):
    """Mean seconds of fn() over `repeats` calls after one warm-up, and the peak memory of the timed calls (GiB)."""
    fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def training_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit(row, path):
    """Print a row and append it to the JSON-lines file at once, so a run cut short keeps what it measured."""
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def compiled_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def three_buckets(resolution):
    """The square bucket and the ones nearest 3:4 and 4:3 at this area, as a dataset of mixed photos gives."""
    buckets = trainer.generate_aspect_ratio_buckets(resolution, divisibility=16)
    return [min(buckets, key=lambda b: abs(b[0] / b[1] - ratio)) for ratio in (1.0, 4 / 3, 3 / 4)]


def bench_model(name, args, device, accelerator, peaks):
    """The rows of one model; `peaks`: {"spec": TFLOP/s or None, "matmul": TFLOP/s}, the two peaks of MFU."""
    weight_dtype = training_dtype(device)
    family, train_args = build_family(name, args, weight_dtype, device)
    train_args.gradient_checkpointing = args.gradient_checkpointing
    # The student exactly as training prepares it: LoRA, checkpointing, fp32 LoRA computed under autocast.
    targets = trainer.resolve_lora_targets(family.transformer_layout, train_args.lora_layers)
    transformer, lora = trainer.prepare_student(train_args, family, accelerator, targets)
    transformer = accelerator.prepare(transformer)
    transformer.train()
    ema_teacher = trainer.EMATeacher(lora, 0.9999)
    # lr 0: the optimizer does all its work but the weights stay put, so eager and compiled losses are comparable.
    optimizer = torch.optim.AdamW([p for _, p in lora], lr=0.0)
    is_klein = isinstance(family, trainer.Flux2Klein)
    configs = []
    for resolution in args.resolutions:
        for reference in (args.reference_resolutions if is_klein else [None]):
            train_args.reference_resolution = reference
            reference_size = family.reference_size(resolution, resolution) if is_klein else None
            batch = synthetic_batch(family, resolution, resolution, args.student_tokens, args.teacher_tokens,
                                    reference_size)
            configs.append((resolution, reference, batch, count_flops(family, transformer, ema_teacher, batch,
                                                                     accelerator)))
    rows, eager_losses = [], {}
    for mode in args.modes:
        warmup = {}
        if mode == "compiled":
            torch._dynamo.reset()
            compiled = trainer.CompiledBlocks(accelerator.unwrap_model(transformer), enabled=True)
            warmup = compile_warmup(family, transformer, ema_teacher, train_args, accelerator, args, compiled)
            graphs_after_warmup = compiled_graphs()
        for resolution, reference, batch, (student_flops, teacher_flops, recompute_counted) in configs:
            def check_loss(steps):
                train_args.rollout_steps = steps
                loss, _ = trainer.dopsd_step(family, transformer, transformer, ema_teacher, batch, accelerator, steps,
                                             train_args.loss_space, torch.Generator(device).manual_seed(0))
                optimizer.zero_grad(set_to_none=True)
                return loss.item()

            generator = torch.Generator(device).manual_seed(0)

            def sft():
                sft_step(family, transformer, batch, accelerator, generator)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            sft_seconds, sft_peak = timed(sft, device, args.repeats)
            for steps in args.rollout_steps:
                loss = check_loss(steps)
                key = (resolution, reference, steps)
                if mode == "eager":
                    eager_losses[key] = loss

                def iteration():
                    trainer.dopsd_step(family, transformer, transformer, ema_teacher, batch, accelerator,
                                       train_args.rollout_steps, train_args.loss_space, generator)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    ema_teacher.update()

                seconds, peak = timed(iteration, device, args.repeats)
                flops = steps * (student_flops + teacher_flops)
                row = {
                    "model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "mode": mode, "resolution": resolution, "reference_resolution": reference, "K": steps,
                    "gradient_checkpointing": args.gradient_checkpointing, "lora_rank": args.rank,
                    "parameters_B": round(sum(p.numel() for n, p in transformer.named_parameters()
                                              if "lora_" not in n) / 1e9, 3),
                    "sft_step_s": round(sft_seconds, 4), "iteration_s": round(seconds, 4),
                    "ratio": round(seconds / sft_seconds, 2), "ratio_target": round(1.25 * steps, 2),
                    "flop_student_fwd_bwd": student_flops, "flop_teacher_fwd": teacher_flops,
                    "flop_includes_recompute": recompute_counted,
                    "tflops_per_s": round(flops / seconds / 1e12, 4),
                    "spec_peak_tflops": peaks["spec"], "matmul_peak_tflops": round(peaks["matmul"], 4),
                    "mfu_vs_spec_peak": mfu(flops, seconds, peaks["spec"]),
                    "mfu_vs_matmul_peak": mfu(flops, seconds, peaks["matmul"]),
                    "sft_mfu_vs_spec_peak": mfu(student_flops, sft_seconds, peaks["spec"]),
                    "sft_mfu_vs_matmul_peak": mfu(student_flops, sft_seconds, peaks["matmul"]),
                    "peak_memory_GiB": None if peak is None else round(peak, 2),
                    "sft_peak_memory_GiB": None if sft_peak is None else round(sft_peak, 2),
                    "loss": loss, "loss_vs_eager": (None if key not in eager_losses
                                                    else abs(loss - eager_losses[key])),
                    "torch": torch.__version__, "attention_backend": args.attention_backend, **warmup,
                }
                if mode == "compiled":
                    row["recompiles_after_warmup"] = compiled_graphs() - graphs_after_warmup
                emit(row, args.output)
                rows.append(row)
        if mode == "compiled":
            compiled.undo()
            torch._dynamo.reset()
    return rows


def compile_warmup(family, transformer, ema_teacher, train_args, accelerator, args, compiled):
    """The first D-OPSD iteration on three aspect buckets: the first compiles (its time is the compile time), the
    others show what new buckets cost (with dynamic shapes: no new graphs)."""
    device = accelerator.device
    resolution = max(args.resolutions)
    train_args.reference_resolution = None
    train_args.rollout_steps = min(args.rollout_steps)
    report = {"compile_buckets": [], "compile_first_call_s": [], "compile_new_graphs": []}
    for height, width in three_buckets(resolution):
        batch = synthetic_batch(family, height, width, args.student_tokens, args.teacher_tokens,
                                family.reference_size(height, width) if isinstance(family, trainer.Flux2Klein)
                                else None)
        graphs = compiled_graphs()
        start = time.perf_counter()
        trainer.dopsd_step(family, transformer, transformer, ema_teacher, batch, accelerator, train_args.rollout_steps,
                           train_args.loss_space, torch.Generator(device).manual_seed(0))
        synchronize(device)
        accelerator.unwrap_model(transformer).zero_grad(set_to_none=True)
        report["compile_buckets"].append(f"{height}x{width}")
        report["compile_first_call_s"].append(round(time.perf_counter() - start, 2))
        report["compile_new_graphs"].append(compiled_graphs() - graphs)
    assert compiled.enabled, "the compile failed (see the warning above)"
    return report


def markdown(rows):
    lines = ["| model | device | mode | res | ref | K | ckpt | SFT step s | iteration s | ratio (target ≤ 1.25K)"
             " | TFLOP/s | MFU (spec peak) | MFU (measured matmul peak) | peak GiB | compile s (3 buckets) |"
             " recompiles |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def mfu_cell(value, peak_tflops):
        return "n/a" if value is None else f"{100 * value:.0f} % of {peak_tflops:.4g}"

    for r in rows:
        peak = "n/a" if r["peak_memory_GiB"] is None else r["peak_memory_GiB"]
        mfu_spec = mfu_cell(r["mfu_vs_spec_peak"], r["spec_peak_tflops"])
        mfu_matmul = mfu_cell(r["mfu_vs_matmul_peak"], r["matmul_peak_tflops"])
        compile_s = " / ".join(map(str, r.get("compile_first_call_s", []))) or "–"
        recompiles = "–" if "recompiles_after_warmup" not in r else (
            sum(r["compile_new_graphs"][1:]) + r["recompiles_after_warmup"])
        reference = f"{r['reference_resolution']}²" if r["reference_resolution"] else "–"
        lines.append(f"| {r['model']} | {r['device']} | {r['mode']} | {r['resolution']}² | {reference} | {r['K']} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['sft_step_s']} | {r['iteration_s']} | "
                     f"{r['ratio']} ({r['ratio_target']}) | {r['tflops_per_s']} | {mfu_spec} | {mfu_matmul} | {peak} | "
                     f"{compile_s} | {recompiles} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["z-image"], choices=[*FULL_SIZE, *TINY])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--rollout_steps", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--modes", nargs="+", default=None, choices=["eager", "compiled"], help="Default: compiled"
                        " where the trainer compiles by default (CUDA with triton), else eager.")
    parser.add_argument("--reference_resolutions", nargs="+", type=int, default=[None], help="klein edit teacher:"
                        " rows per reference resolution (the trainer's --reference_resolution); default: the"
                        " training resolution.")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the compiled mode"
                        " (aot_eager: a quick check of the compiled path on a CPU).")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lora_alpha", type=int, default=128)
    parser.add_argument("--student_tokens", type=int, default=256)
    parser.add_argument("--teacher_tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention_backend", type=str, default=None)
    parser.add_argument("--memory_fraction", type=float, default=None, help="Cap the GPU memory (e.g. 16/80 to"
                        " check that a run fits a 16 GB card).")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR / "bench.jsonl", help="JSON lines, appended.")
    parser.add_argument("--markdown", type=Path, default=OUTPUT_DIR / "bench.md", help="The markdown table.")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    trainer.CompiledBlocks.backend = args.compile_backend
    args.modes = args.modes or (["compiled"] if trainer.compile_by_default(device) else ["eager"])
    if args.memory_fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device.index)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    peaks = {"spec": spec_peak_tflops(device), "matmul": matmul_peak_tflops(device, training_dtype(device))}
    print(f"peak TFLOP/s for MFU: spec sheet {peaks['spec'] or 'n/a (unknown card)'}, measured matmul"
          f" {peaks['matmul']:.4g}", flush=True)
    rows = []
    for name in args.models:
        release_models(accelerator, device)  # nothing of the previous model (or the matmul) counts in this peak
        rows += bench_model(name, args, device, accelerator, peaks)
    release_models(accelerator, device)
    table = markdown(rows)
    args.markdown.write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
