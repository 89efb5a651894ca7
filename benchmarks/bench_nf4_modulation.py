"""How much of the nf4 base's prediction error comes from quantising the adaLN modulation layers.

--quantize_base nf4 quantises every nn.Linear inside the transformer's repeated blocks
(train_dopsd_lora.repeated_block_linears). For Z-Image-Turbo that includes each block's `adaLN_modulation`
linear (256 -> 4 x 3840: the scale and gate of the block's attention and feed-forward branches); FLUX.2-klein's
modulation layers sit outside its blocks and stay in full precision. This measures, on the CPU, the relative
difference ||v - v_ref|| / ||v_ref|| of the transformer's velocity (called as the trainer's family.predict calls it)
for these choices of which linears are quantised to nf4 (with the trainer's own quantize_linear_layers):

  a      all repeated-block linears, the modulation linears included (what --quantize_base nf4 did before)
  b      as a, but the modulation linears kept in full precision (what --quantize_base nf4 does: closer, below)
  c      only the modulation linears inside the blocks (the difference between a and b)
  d      as a, plus every modulation linear outside the blocks (klein's shared ones; Z-Image's final layer)

The reference is the same random weights unquantised in float32 (nf4 computing in float32, so that only the
quantisation differs); the "bf16" rows put the weights in bfloat16 and compute nf4 in bfloat16 as the trainer does
with --mixed_precision bf16, and are also compared with the unquantised bf16 model. The transformers have the real
models' width but few blocks (--z_layers / --z_refiner_layers, --klein_double / --klein_single) so they fit in a
few GiB: the errors of the full 30-block model are larger, the comparison between a, b, c and d is the point.
Weights are random with a fixed seed, with two initialisations (--inits): the classes' own (PyTorch's
kaiming-uniform nn.Linear default; diffusers adds no init for these models) and `normal`: every linear's weight
N(0, --normal_std), its bias zero.

It also counts, on the meta device (no weights), the parameters the modulation linears hold in the full-size
Z-Image-Turbo transformer (ZImageTransformer2DModel() defaults, 6.15 B) and what keeping them in bf16 costs next
to nf4 (the nf4 bytes per parameter are taken from the layers quantised here).

    python benchmarks/bench_nf4_modulation.py               # both models, both inits: ~26 min on 2 shared CPUs, 7 GiB
    python benchmarks/bench_nf4_modulation.py --models z-image --inits default
"""

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_dopsd_lora as trainer  # noqa: E402
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, ZImageTransformer2DModel  # noqa: E402


CPU = torch.device("cpu")
VARIANTS = {
    "a": "all repeated-block linears, modulation included",
    "b": "a, modulation linears kept full precision (what --quantize_base nf4 does)",
    "c": "only the modulation linears in the blocks",
    "d": "a + modulation linears outside the blocks",
}


def is_modulation(name):
    """Z-Image: each block's and the final layer's adaLN_modulation; FLUX.2: the double/single-stream modulations
    shared by all blocks, and the final layer's norm_out.linear."""
    return "modulation" in name or name == "norm_out.linear"


def build(kind, args, init):
    """A full-width, reduced-depth transformer in float32, the same weights for the same (kind, init)."""
    torch.manual_seed(0)
    if kind == "z-image":
        model = ZImageTransformer2DModel(n_layers=args.z_layers, n_refiner_layers=args.z_refiner_layers)
    else:  # FLUX.2-klein-4B's width (benchmarks/bench_dopsd.py FULL_SIZE)
        model = Flux2Transformer2DModel(num_layers=args.klein_double, num_single_layers=args.klein_single,
                                        num_attention_heads=24, attention_head_dim=128, in_channels=128,
                                        joint_attention_dim=3 * 2560, guidance_embeds=False)
    if init == "normal":
        generator = torch.Generator().manual_seed(0)
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.weight.data.normal_(0, args.normal_std, generator=generator)
                if module.bias is not None:
                    module.bias.data.zero_()
    return model.eval().requires_grad_(False)


def family_for(kind, model):
    """The trainer's model family around `model`, without loading a pipeline: predict and collate only read the
    transformer, the device and (klein) the pipeline's static packing helpers."""
    family = object.__new__(trainer.ZImageTurbo if kind == "z-image" else trainer.Flux2Klein)
    family.transformer = model
    family.device = CPU
    family.pipeline = Flux2KleinPipeline
    return family


def probe(kind, args):
    """A fixed noise latent at --resolution and a caption context of --caption_tokens tokens, as cached contexts."""
    generator = torch.Generator().manual_seed(1)
    if kind == "z-image":  # 16 latent channels at 1/8 of the image
        side = args.resolution // 8
        latents = torch.randn(1, 16, side, side, generator=generator)
        context = {"prompt_embeds": torch.randn(args.caption_tokens, 2560, generator=generator)}
    else:  # 32 channels at 1/8, patchified 2 x 2: 128 channels at 1/16
        side = args.resolution // 16
        latents = torch.randn(1, 128, side, side, generator=generator)
        context = {"prompt_embeds": torch.randn(args.caption_tokens, 3 * 2560, generator=generator)}
    return latents, context


@torch.no_grad()
def predict(kind, model, args):
    family = family_for(kind, model)
    latents, context = probe(kind, args)
    timestep = torch.tensor(1000.0 * (1 - args.t))  # scheduler timestep; both families turn it into t = args.t
    return family.predict(model, latents, timestep, family.collate([context])).float()


def linear_sets(model):
    """{variant: {name: nn.Linear}} of the layers each variant quantises."""
    every = {name: module for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    blocks = [name for name, block in model.named_modules() if type(block).__name__ in model._repeated_blocks]
    repeated = {name: m for name, m in every.items() if any(name.startswith(block + ".") for block in blocks)}
    assert set(trainer.repeated_block_linears(model)) == {name for name in repeated if not is_modulation(name)}
    return {
        "a": repeated,
        "b": {name: m for name, m in repeated.items() if not is_modulation(name)},
        "c": {name: m for name, m in repeated.items() if is_modulation(name)},
        "d": {**repeated, **{name: m for name, m in every.items() if is_modulation(name)}},
    }


def quantize(model, variant, compute_dtype):
    """nf4 with the trainer's quantize_linear_layers, over the variant's layers."""
    chosen = linear_sets(model)[variant]
    if not chosen:
        return 0
    original = trainer.repeated_block_linears
    trainer.repeated_block_linears = lambda _model: chosen
    try:
        count = trainer.quantize_linear_layers(model, "nf4", CPU, compute_dtype)
    finally:
        trainer.repeated_block_linears = original
    assert count == len(chosen)
    return count


def nf4_bytes_per_parameter(model):
    """Bytes per weight of the quantised modulation linears: packed 4-bit weight plus its quantisation statistics."""
    total_bytes = total_params = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if is_modulation(name) and getattr(weight, "quant_state", None) is not None:
            state = weight.quant_state
            stats = state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                stats += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + offset
            total_bytes += weight.numel() * weight.element_size() + stats
            total_params += module.in_features * module.out_features
    return total_bytes / total_params if total_params else None


def release_memory():
    """Collect and hand freed heap back to the system, so rebuilding a model for each row does not pile up RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def relative(prediction, reference):
    return ((prediction - reference).norm() / reference.norm()).item()


def modulation_diagnostics(kind, model):
    """RMS of the first block's modulation output (the scale - 1 and gate pre-activation) at the probe's t, and
    of its input: how far the random weights' modulation is from 1 / 0."""
    if kind != "z-image":
        return ""
    with torch.no_grad():
        t_emb = model.t_embedder(torch.tensor([0.5]) * model.t_scale)
        block = (model.noise_refiner or model.layers)[0]
        modulation = block.adaLN_modulation(t_emb)
    return f"adaLN input RMS {t_emb.pow(2).mean().sqrt():.3g}, output RMS {modulation.pow(2).mean().sqrt():.3g}"


def measure(kind, init, args, rows):
    print(f"\n## {kind}, init {init}", flush=True)
    started = time.time()
    model = build(kind, args, init)
    sets = linear_sets(model)
    counts = {variant: (len(layers), sum(m.weight.numel() for m in layers.values()))
              for variant, layers in sets.items()}
    print(f"layers (count, weights) per variant: {counts}; {modulation_diagnostics(kind, model)}", flush=True)
    reference = predict(kind, model, args)
    print(f"fp32 reference: ||v|| = {reference.norm():.4g}, RMS {reference.pow(2).mean().sqrt():.4g}"
          f" ({time.time() - started:.0f} s)", flush=True)
    del model
    release_memory()
    bytes_per_param = None

    def row(label, variant, dtype, compute, value, versus_bf16=None, layers=None):
        rows.append(dict(model=kind, init=init, label=label, variant=variant, dtype=dtype, compute=compute,
                         layers=layers, rel=value, rel_bf16=versus_bf16))
        extra = f", vs bf16 {versus_bf16:.4f}" if versus_bf16 is not None else ""
        print(f"  {label:<48} rel diff vs fp32 {value:.4f}{extra} ({time.time() - started:.0f} s)", flush=True)

    bf16_model = build(kind, args, init).to(torch.bfloat16)
    bf16_reference = predict(kind, bf16_model, args)
    del bf16_model
    release_memory()
    row("bf16, unquantised", "-", "bf16", "bf16", relative(bf16_reference, reference))

    for variant in args.variants:
        if counts[variant][0] == 0:
            print(f"  {variant}: no such layers -> skipped", flush=True)
            rows.append(dict(model=kind, init=init, label=f"nf4 {variant}: {VARIANTS[variant]}", variant=variant,
                             dtype="fp32", compute="fp32", layers=0, rel=None, rel_bf16=None, note="no such layers"))
            continue
        model = build(kind, args, init)
        quantize(model, variant, torch.float32)
        if variant == "c":
            bytes_per_param = nf4_bytes_per_parameter(model)
        row(f"nf4 {variant}: {VARIANTS[variant]}", variant, "fp32", "fp32", relative(predict(kind, model, args),
                                                                                     reference),
            layers=counts[variant][0])
        del model
        release_memory()

    for variant in args.bf16_variants:
        if counts[variant][0] == 0 or (variant != "a" and sets[variant].keys() == sets["a"].keys()):
            continue
        model = build(kind, args, init).to(torch.bfloat16)
        quantize(model, variant, torch.bfloat16)
        prediction = predict(kind, model, args)
        row(f"nf4 {variant}, bf16 weights + compute", variant, "bf16", "bf16", relative(prediction, reference),
            relative(prediction, bf16_reference), layers=counts[variant][0])
        del model
        release_memory()
    return bytes_per_param


def full_size_modulation_cost(bytes_per_param):
    """Parameters of the full Z-Image-Turbo transformer (meta device) and what the modulation linears in its blocks
    cost kept in bf16 instead of nf4."""
    with torch.device("meta"):
        model = ZImageTransformer2DModel()
    total = sum(p.numel() for p in model.parameters())
    sets = linear_sets(model)
    quantised_a = sum(m.weight.numel() for m in sets["a"].values())
    modulation = sets["c"]
    modulation_weights = sum(m.weight.numel() for m in modulation.values())
    modulation_all = sum(p.numel() for m in modulation.values() for p in m.parameters())  # + biases (kept anyway)
    gib = 2 ** 30
    bf16_total = 2 * total
    nf4_total = 2 * (total - quantised_a) + bytes_per_param * quantised_a  # the --quantize_base nf4 base
    extra = (2 - bytes_per_param) * modulation_weights
    lines = [
        "",
        "## Full-size Z-Image-Turbo transformer (ZImageTransformer2DModel() on the meta device)",
        f"parameters: {total / 1e9:.3f} B; in repeated-block linears (quantised by nf4): {quantised_a / 1e9:.3f} B",
        f"adaLN_modulation linears in the blocks: {len(modulation)} layers, {modulation_all / 1e6:.1f} M parameters "
        f"({modulation_weights / 1e6:.1f} M weights) = {100 * modulation_all / total:.2f} % of the transformer",
        f"  in bf16: {2 * modulation_all / gib:.3f} GiB; as nf4 ({bytes_per_param:.4f} bytes/weight, measured): "
        f"{(bytes_per_param * modulation_weights + 2 * (modulation_all - modulation_weights)) / gib:.3f} GiB",
        f"  keeping them in bf16 adds {extra / gib:.3f} GiB: the nf4 base grows from {nf4_total / gib:.2f} GiB to "
        f"{(nf4_total + extra) / gib:.2f} GiB (+{100 * extra / nf4_total:.1f} %); the bf16 base is "
        f"{bf16_total / gib:.2f} GiB",
    ]
    return "\n".join(lines)


def table(rows):
    lines = ["| model | init | quantised to nf4 | weights / compute | layers | rel. diff vs fp32 | vs bf16 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['rel']:.4f}" if r["rel"] is not None else f"n/a ({r.get('note')})"
        rel_bf16 = f"{r['rel_bf16']:.4f}" if r["rel_bf16"] is not None else ""
        layers = r["layers"] if r["layers"] is not None else ""
        lines.append(f"| {r['model']} | {r['init']} | {r['label']} | {r['dtype']} / {r['compute']} | {layers}"
                     f" | {rel} | {rel_bf16} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["z-image", "klein-4b"], choices=["z-image", "klein-4b"])
    parser.add_argument("--inits", nargs="+", default=["default", "normal"], choices=["default", "normal"])
    parser.add_argument("--normal_std", type=float, default=0.02)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--bf16_variants", nargs="*", default=["a", "b"], choices=list(VARIANTS),
                        help="variants also run with bf16 weights and compute (as the trainer runs)")
    parser.add_argument("--z_layers", type=int, default=2)
    parser.add_argument("--z_refiner_layers", type=int, default=1)
    parser.add_argument("--klein_double", type=int, default=1)
    parser.add_argument("--klein_single", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256, help="image side; the latent is 1/8 of it")
    parser.add_argument("--caption_tokens", type=int, default=64)
    parser.add_argument("--t", type=float, default=0.5, help="the model's time t = 1 - sigma")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; Z-Image {args.z_layers} layers + {args.z_refiner_layers} refiner layers each, "
          f"klein {args.klein_double} double + {args.klein_single} single blocks; {args.resolution}^2 image, "
          f"{args.caption_tokens} caption tokens, t = {args.t}")
    rows = []
    bytes_per_param = None
    for kind in args.models:
        for init in args.inits:
            measured = measure(kind, init, args, rows)
            bytes_per_param = bytes_per_param or measured
    print("\n" + table(rows))
    if "z-image" in args.models:
        print(full_size_modulation_cost(bytes_per_param or (0.5 + 1 / 64 + 4 / (64 * 256))))


if __name__ == "__main__":
    main()
