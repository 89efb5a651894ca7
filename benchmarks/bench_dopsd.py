"""Time and size one D-OPSD iteration against a plain SFT LoRA step, with the trainer's own functions.

Full-size transformers are built from their configs with random weights (no download): Z-Image-Turbo (6.15 B),
FLUX.2-klein-4B and -9B (SPEC §8). Contexts are synthetic but of realistic length: the student's caption (256
tokens for Z-Image, the 512 padded tokens klein always uses), the teacher's caption plus image tokens (VLM context:
~600 tokens for Z-Image; klein's edit teacher: the reference image's tokens appended to the noisy ones).

For each configuration it measures, in one process:
  (a) a vanilla-SFT LoRA step (same LoRA, same checkpointing): noise a latent, predict, MSE to the velocity, backward;
  (b) one D-OPSD iteration (train_dopsd_lora.dopsd_step) for each K;
and prints (b)/(a), seconds, achieved TFLOP/s against a FLOP count taken with torch's FlopCounterMode on the
model's own forward (iteration = K teacher forwards + K student forwards + 2K backward-forward-equivalents, + K
recomputed forwards with checkpointing), and peak accelerator memory. One JSON line per configuration goes to
--output, a markdown table to --markdown.

    python benchmarks/bench_dopsd.py --models z-image klein-4b --resolutions 512 1024 --gradient_checkpointing
    python benchmarks/bench_dopsd.py --models tiny-z-image tiny-klein --resolutions 64   # CPU, seconds
"""

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


ROOT = Path(__file__).resolve().parents[1]
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


# Full-size configs (SPEC §8). klein-9B: 32 heads x 128 = 4096, which with 8 double and 24 single blocks gives 9.1 B.
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
        family = family_class(train_args, weight_dtype, device, pipeline=pipeline)
    train_args.lora_layers = family.default_lora_layers
    return family, train_args


def synthetic_batch(family, height, width, student_tokens, teacher_tokens):
    """Cached contexts of realistic length for one sample, as the context store returns them."""
    transformer = family.transformer
    if isinstance(family, trainer.ZImageTurbo):
        width_features = transformer.config.cap_feat_dim
        student = {"prompt_embeds": torch.randn(student_tokens, width_features)}
        teacher = {"prompt_embeds": torch.randn(teacher_tokens, width_features)}
    else:
        joint = transformer.config.joint_attention_dim
        student = {"prompt_embeds": torch.randn(512, joint)}
        reference = family.initial_noise(1, height, width).float().cpu()  # (1, C, h, w), like an encoded image
        tokens = family.pipeline._pack_latents(reference)[0]
        teacher = {"prompt_embeds": torch.randn(512, joint), "image_latents": tokens,
                   "image_latent_ids": family.pipeline._prepare_image_ids([reference])[0]}
    return {"student": [student], "teacher": [teacher], "bucket": (height, width)}


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


def forward_flops(family, transformer, batch, context_key):
    height, width = batch["bucket"]
    latents = family.initial_noise(1, height, width)
    timesteps, _ = family.rollout_schedule(4, height, width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        family.predict(transformer, latents, timesteps[0], family.collate(batch[context_key]))
    return counter.get_total_flops()


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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name, args, device, accelerator):
    weight_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    family, train_args = build_family(name, args, weight_dtype, device)
    transformer = family.transformer.to(device)
    targets = trainer.resolve_lora_targets(transformer, train_args.lora_layers)
    transformer.add_adapter(trainer.LoraConfig(r=args.rank, lora_alpha=args.lora_alpha,
                                               init_lora_weights="gaussian", target_modules=targets))
    trainer.cast_training_params(transformer, torch.float32)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.compile:
        transformer.compile_repeated_blocks()
    lora = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    ema_teacher = trainer.EMATeacher(lora, 0.9999)
    optimizer = torch.optim.AdamW([p for _, p in lora], lr=1e-6)
    generator = torch.Generator(device).manual_seed(0)
    rows = []
    for resolution in args.resolutions:
        batch = synthetic_batch(family, resolution, resolution, args.student_tokens, args.teacher_tokens)
        student_flops = forward_flops(family, transformer, batch, "student")
        teacher_flops = forward_flops(family, transformer, batch, "teacher")
        recompute = 1 if args.gradient_checkpointing else 0

        def sft():
            sft_step(family, transformer, batch, accelerator, generator)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        sft_seconds, sft_peak = timed(sft, device, args.repeats)
        sft_flops = (3 + recompute) * student_flops
        for steps in args.rollout_steps:
            train_args.rollout_steps = steps

            def iteration():
                trainer.dopsd_step(family, transformer, transformer, ema_teacher, batch, train_args, accelerator,
                                   generator)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema_teacher.update()

            seconds, peak = timed(iteration, device, args.repeats)
            flops = steps * (teacher_flops + (3 + recompute) * student_flops)
            row = {
                "model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "resolution": resolution, "K": steps, "gradient_checkpointing": args.gradient_checkpointing,
                "lora_rank": args.rank,
                "parameters_B": round(sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)
                                      / 1e9, 3),
                "sft_step_s": round(sft_seconds, 4), "iteration_s": round(seconds, 4),
                "ratio": round(seconds / sft_seconds, 2), "ratio_target": round(1.25 * steps, 2),
                "sft_step_ratio_per_K": round(seconds / sft_seconds / steps, 3),
                "forward_flop_student": student_flops, "forward_flop_teacher": teacher_flops,
                "tflops_per_s": round(flops / seconds / 1e12, 4),
                "sft_tflops_per_s": round(sft_flops / sft_seconds / 1e12, 4),
                "peak_memory_GiB": None if peak is None else round(peak, 2),
                "sft_peak_memory_GiB": None if sft_peak is None else round(sft_peak, 2),
                "torch": torch.__version__, "compile": args.compile, "attention_backend": args.attention_backend,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows):
    lines = ["| model | device | res | K | ckpt | SFT step s | iteration s | ratio (target ≤ 1.25K) | TFLOP/s"
             " | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "n/a" if r["peak_memory_GiB"] is None else r["peak_memory_GiB"]
        lines.append(f"| {r['model']} | {r['device']} | {r['resolution']}² | {r['K']} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['sft_step_s']} | {r['iteration_s']} | "
                     f"{r['ratio']} ({r['ratio_target']}) | {r['tflops_per_s']} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["z-image"], choices=[*FULL_SIZE, *TINY])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--rollout_steps", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--lora_alpha", type=int, default=128)
    parser.add_argument("--student_tokens", type=int, default=256)
    parser.add_argument("--teacher_tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention_backend", type=str, default=None)
    parser.add_argument("--memory_fraction", type=float, default=None, help="Cap the GPU memory (e.g. 16/80 to"
                        " check that a run fits a 16 GB card).")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results.jsonl"))
    parser.add_argument("--markdown", type=Path, default=Path("benchmarks/results.md"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    rows = []
    for name in args.models:
        rows += bench_model(name, args, device, accelerator)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    table = markdown(rows)
    args.markdown.write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
