"""Build the miniature world: a procedural image domain of flat shapes and a step-distilled model of it.

The model is a FLUX.2-klein pipeline folder (Flux2Transformer2DModel, AutoencoderKLFlux2, Qwen3 text encoder,
byte-level tokenizer, FlowMatchEulerDiscreteScheduler with dynamic shifting) that `train_dopsd_lora.py` loads like the
real checkpoint. It is made in the order the real model was:

1. an autoencoder (the VAE) trained on the domain, its batch-norm statistics measured on the data;
2. a transformer pretrained with flow matching, for text-to-image ("a photo of a star") and for generation from a
   reference image (its VAE tokens appended after the noisy ones, with the trainer's edit-teacher suffix: the
   trainer's own `Flux2Klein.predict` and contexts). The target shows the reference's subject (outline and size) in
   its place, in colours drawn again from the domain's (with the default single colour scheme: the reference itself).
   Reference pairs include many random polygons, so the ability carries over to outlines never seen in pretraining;
3. step distillation to the trainer's 4-step klein schedule, by regressing 4-step jumps onto the pretrained model's
   32-step ODE paths.

One shape, the heart, is held out of all of this: it is the new concept that run_experiment.py teaches. A small CNN
classifier, trained on every shape (heart included), scores samples.

With --reference_task style the reference task carries a colour scheme instead, and the concept is the held-out
scheme CONCEPT_COLOURS; with --speckle, backgrounds carry random grey cells, detail that a few-step sampler without
distillation blurs (examples/miniature/README.md has the worlds built so).

    python examples/miniature/build_world.py            # writes examples/miniature/world/
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "tiny"))

import train_dopsd_lora as trainer  # noqa: E402
from make_tiny_models import make_tokenizer, text_config  # noqa: E402

from diffusers import (  # noqa: E402
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from transformers import Qwen3ForCausalLM  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# The image domain
# ----------------------------------------------------------------------------------------------------------------

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = list(PALETTE)
PRIOR_SHAPES = ["circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring"]
CONCEPT_SHAPE = "heart"  # held out of the VAE-free parts of pretraining: the new concept
CONCEPT_COLOURS = ("yellow", "purple")  # held out of the reference task "style": the new concept there
CLASSES = PRIOR_SHAPES + [CONCEPT_SHAPE]  # what the evaluation classifier tells apart
CONCEPT_CAPTION = "a photo of sks shape"
SUPERSAMPLE = 4
SPECKLE = (120, 120, 120)  # the colour of background speckles (WorldSizes.speckle), in no caption
SPECKLE_CELL = 4  # pixels: one latent pixel of the autoencoder


def regular_polygon(sides, rotation=-math.pi / 2, radius=1.0):
    angles = [rotation + 2 * math.pi * i / sides for i in range(sides)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def star_outline(points=5, inner=0.45):
    return [((1.0 if i % 2 == 0 else inner) * math.cos(-math.pi / 2 + math.pi * i / points),
             (1.0 if i % 2 == 0 else inner) * math.sin(-math.pi / 2 + math.pi * i / points)) for i in range(2 * points)]


def cross_outline(arm=0.34):
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def heart_outline(points=48):
    outline = []
    for i in range(points):
        t = 2 * math.pi * i / points
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        outline.append((x / 16.5, -(y + 2.5) / 15.5))
    return outline


def random_polygon(rng):
    """A random star-shaped polygon: 5-9 vertices at sorted random angles, radii in [0.45, 1]."""
    sides = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * math.pi, sides))
    radii = rng.uniform(0.45, 1.0, sides)
    return [(r * math.cos(a), r * math.sin(a)) for a, r in zip(angles, radii)]


OUTLINES = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": regular_polygon(3, radius=1.0),
    "diamond": regular_polygon(4, radius=1.0),
    "hexagon": regular_polygon(6, rotation=0.0),
    "star": star_outline(),
    "cross": cross_outline(),
    "heart": heart_outline(),
}


@dataclass
class Layout:
    """Where a subject sits and what it is: everything but its colours."""

    shape: str  # a CLASSES name, or "polygon" (outline given)
    cx: float
    cy: float
    radius: float
    outline: list = None
    speckles: np.ndarray = None  # background cells drawn in SPECKLE (boolean, one per SPECKLE_CELL square)


def random_layout(rng, shape, size, jitter=0.125, radius=(0.22, 0.36), speckle=0.0):
    """A subject near the centre (jitter: fraction of the side), radius a fraction of the side; with `speckle`, that
    share of the background's cells, drawn at random, is speckled."""
    outline = random_polygon(rng) if shape == "polygon" else None
    layout = Layout(shape, size / 2 + rng.uniform(-jitter, jitter) * size,
                    size / 2 + rng.uniform(-jitter, jitter) * size, rng.uniform(*radius) * size, outline)
    if speckle:
        layout.speckles = rng.random((size // SPECKLE_CELL,) * 2) < speckle
    return layout


def render(layout, foreground, background, size):
    """An anti-aliased RGB image (PIL): drawn at SUPERSAMPLE x the size, box-filtered down."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[background])
    draw = ImageDraw.Draw(image)
    if layout.speckles is not None:
        cell = SPECKLE_CELL * SUPERSAMPLE
        for y, x in zip(*np.nonzero(layout.speckles)):
            draw.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1], fill=SPECKLE)
    cx, cy, r = layout.cx * SUPERSAMPLE, layout.cy * SUPERSAMPLE, layout.radius * SUPERSAMPLE
    fill = PALETTE[foreground]
    if layout.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        if layout.shape == "ring":
            inner = 0.55 * r
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=PALETTE[background])
    else:
        outline = layout.outline if layout.shape == "polygon" else OUTLINES[layout.shape]
        draw.polygon([(cx + r * x, cy + r * y) for x, y in outline], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def two_colours(rng, foregrounds=COLOURS, backgrounds=COLOURS):
    """A foreground colour and a different background colour."""
    while True:
        foreground = foregrounds[int(rng.integers(len(foregrounds)))]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        if foreground != background:
            return foreground, background


def to_pixels(images):
    """PIL list -> (N, 3, H, W) float in [-1, 1], the VAE's convention (trainer.image_to_tensor, batched)."""
    return torch.cat([trainer.image_to_tensor(image) for image in images])


def nonce_word(rng):
    while True:
        word = "".join(chr(ord("a") + int(i)) for i in rng.integers(0, 26, 3))
        if word != "sks":
            return word


# Captions. Text-to-image: the colours are named, or not ("a photo of a star"). Reference task: the subject's word is
# a name, the word "shape" or a nonce word; colours as above.
def text_caption(shape, foreground, background, named_colours):
    return f"a {foreground} {shape} on a {background} background" if named_colours else f"a photo of a {shape}"


# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class WorldSizes:
    resolution: int = 64
    vae_channels: tuple = (16, 32, 32)  # three blocks: 4x down-sampling, 64 px -> 16x16 latents -> 8x8 tokens
    latent_channels: int = 4
    vae_steps: int = 900
    vae_batch: int = 16
    # The domain the transformer learns: its colours, and how far shapes move and scale (the autoencoder and the
    # classifier see all eight colours in any pair, and wider layouts). One colour scheme: with the eight colours in
    # any pair, the transformer's samples stayed blurred blends of colours and no shapes formed in 3000 steps.
    foregrounds: tuple = ("white",)
    backgrounds: tuple = ("black",)
    # The reference task, which makes the edit teacher: "copy" draws the reference's subject in its place (the
    # teacher ignores the noise); "move" draws it at a new place (3000 more steps of it did not learn to move an
    # outline it had never seen); "style" draws a prior shape of its own, chosen by the caption or the noise, in the
    # reference's two colours (any pair but CONCEPT_COLOURS). The concept is the heart for the first two, the
    # colour scheme CONCEPT_COLOURS for "style".
    reference_task: str = "copy"
    jitter: float = 0.125
    radius: tuple = (0.22, 0.36)
    # Share of the background's 4-pixel cells drawn grey, at random: fine detail that only the noise decides, which
    # a few-step sampler without distillation blurs (0: flat backgrounds).
    speckle: float = 0.0
    text_tokens: int = 64  # the trainer's --max_sequence_length: short captions, and a quarter of the cost of 512
    hidden: int = 96
    heads: int = 2
    # Rotary dimensions per position axis (frame, height, width, token), summing to the head width. The noisy image
    # varies only in height and width: with an even split of a narrow head (6 each), one usable frequency is left
    # per axis and the samples were shapeless blobs.
    rope_axes: tuple = (4, 16, 16, 12)
    double_layers: int = 2
    single_layers: int = 2
    pool_size: int = 6000  # rendered training pairs per task
    nonce_words: int = 150
    pretrain_steps: int = 4000
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    ode_substeps: tuple = (2, 4, 6, 20)  # Euler steps of the 32-step ODE inside each of the 4 student steps
    distill_paths: int = 384
    distill_steps: int = 400
    distill_batch: int = 16
    distill_lr: float = 2e-4
    classifier_steps: int = 400
    check_images: int = 512  # images for the batch-norm statistics and the classifier's check
    eval_per_shape: int = 16
    eval_every: int = 1000  # pretraining steps between progress checks (shape accuracy at 32 steps)
    seed: int = 0

    def colours(self, rng):
        return two_colours(rng, self.foregrounds, self.backgrounds)

    def layout(self, rng, shape, jitter=None, radius=None):
        """random_layout at this world's resolution, speckle and (unless given) placement."""
        return random_layout(rng, shape, self.resolution, self.jitter if jitter is None else jitter,
                             radius or self.radius, self.speckle)


SMOKE_SIZES = WorldSizes(vae_channels=(8, 8, 8), vae_steps=20, vae_batch=8, hidden=32, heads=2, rope_axes=(4, 4, 4, 4),
                         single_layers=1,
                         pool_size=48, nonce_words=4, pretrain_steps=6, pretrain_batch=8, distill_paths=8,
                         ode_substeps=(1, 1, 1, 2), distill_steps=4, distill_batch=8, classifier_steps=8,
                         check_images=32, eval_per_shape=1)


def warmup_cosine(optimizer, total_steps, warmup=0.05):
    """Linear warm-up over the first `warmup` of the steps, then cosine decay to a tenth."""
    warmup_steps = max(1, int(warmup * total_steps))

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------------------------


def random_images(rng, count, sizes, shapes):
    images = []
    for _ in range(count):
        shape = shapes[int(rng.integers(len(shapes)))]
        images.append(render(sizes.layout(rng, shape), *two_colours(rng), sizes.resolution))
    return images


def train_vae(sizes, rng, log):
    """A small AutoencoderKLFlux2 trained to reconstruct the domain (posterior samples, a weak KL term)."""
    torch.manual_seed(sizes.seed)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(sizes.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(sizes.vae_channels),
        block_out_channels=list(sizes.vae_channels), layers_per_block=1, latent_channels=sizes.latent_channels,
        norm_num_groups=8, sample_size=sizes.resolution, mid_block_add_attention=False,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = warmup_cosine(optimizer, sizes.vae_steps)
    shapes = CLASSES + ["polygon"]  # the VAE is the domain's image codec: it sees every outline
    crop = sizes.resolution // 2
    for step in range(sizes.vae_steps):
        # The autoencoder is convolutional: it trains on half-size crops (a quarter of the cost), placed on its
        # down-sampling grid.
        pixels = to_pixels(random_images(rng, sizes.vae_batch, sizes, shapes))
        top, left = (int(v) * 4 for v in rng.integers(0, (sizes.resolution - crop) // 4 + 1, 2))
        pixels = pixels[:, :, top:top + crop, left:left + crop]
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == sizes.vae_steps - 1:
            log(f"vae step {step}: reconstruction mse {F.mse_loss(reconstruction, pixels).item():.5f}")
    vae.eval().requires_grad_(False)
    # The klein latents are the patchified VAE means, normalised by vae.bn's running statistics: measure them.
    with torch.no_grad():
        pixels = to_pixels(random_images(rng, sizes.check_images, sizes, shapes))
        patches = Flux2KleinPipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
        vae.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(patches.var(dim=(0, 2, 3)))
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return vae, F.mse_loss(reconstruction, pixels).item()


# ----------------------------------------------------------------------------------------------------------------
# The pipeline and the trainer's klein family on it
# ----------------------------------------------------------------------------------------------------------------


def make_transformer(sizes, latent_channels):
    torch.manual_seed(sizes.seed + 1)
    head_dim = sizes.hidden // sizes.heads
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=sizes.double_layers,
        num_single_layers=sizes.single_layers, attention_head_dim=head_dim, num_attention_heads=sizes.heads,
        joint_attention_dim=3 * text_config(make_tokenizer()).hidden_size, timestep_guidance_channels=256,
        axes_dims_rope=sizes.rope_axes, guidance_embeds=False,
    )


def save_pipeline(vae, transformer, folder, seed):
    tokenizer = make_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(text_config(tokenizer))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipeline = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=True)
    pipeline.save_pretrained(folder)


def text_tokens(world):
    """The caption length a built world was made with (the trainer's --max_sequence_length)."""
    record = json.loads((Path(world) / "build.json").read_text())
    return record["sizes"].get("text_tokens", 512)


def load_family(model_folder, resolution, scratch, max_sequence_length):
    """The trainer's klein family on the model folder, as `train_dopsd_lora.py` builds it (float32, CPU)."""
    scratch = Path(scratch)  # the family reads no data; the folders only satisfy the argument checks
    args = trainer.parse_args(["--pretrained_model_name_or_path", str(model_folder), "--instance_data_dir",
                               str(scratch / "data"), "--output_dir", str(scratch / "out"), "--resolution",
                               str(resolution), "--max_sequence_length", str(max_sequence_length)])
    family_class = trainer.detect_family(args)
    family_class.apply_defaults(args, trainer.TRAINING)
    return family_class(args, torch.float32, torch.device("cpu"))


class CaptionTable:
    """Student contexts of captions, encoded once with the trainer's family; the teacher's caption is the caption
    plus the family's edit suffix, exactly as `Flux2Klein.build_teacher_context` writes it."""

    def __init__(self, family):
        self.family = family
        self.index = {}
        self.embeds = []

    def __call__(self, caption):
        if caption not in self.index:
            with torch.no_grad():
                self.index[caption] = len(self.embeds)
                self.embeds.append(self.family.encode_student_context(caption)["prompt_embeds"])
        return self.index[caption]

    def teacher(self, caption):
        return self(f"{caption} {self.family.args.teacher_prompt_suffix}".strip())

    def stack(self, indices):
        return torch.stack([self.embeds[i] for i in indices])


def family_pixels(family, images):
    """Images as the trainer's family prepares a reference image for the VAE, batched."""
    return torch.cat([family.reference_pixels(image) for image in images])


@torch.no_grad()
def encode_latents(family, images):
    """Latent states of images in the space the scheduler steps in (patchified, batch-norm normalised)."""
    return family.pipeline._encode_vae_image(family_pixels(family, images), generator=None)


@torch.no_grad()
def reference_tokens(family, images):
    """The edit teacher's reference tokens and ids for a batch of images (what build_teacher_context stores)."""
    latents = encode_latents(family, images)
    _, ids = family.pipeline.prepare_image_latents([family_pixels(family, images[:1])], batch_size=1,
                                                   generator=None, device=family.device,
                                                   dtype=family.pipeline.vae.dtype)
    return family.pipeline._pack_latents(latents), ids[0]


def check_teacher_context(family, table, image, caption):
    """The batched contexts used here equal the trainer's build_teacher_context for the same image and caption."""
    with torch.no_grad():
        expected = family.build_teacher_context(image, caption)
    tokens, ids = reference_tokens(family, [image])
    assert torch.allclose(expected["image_latents"], tokens[0], atol=1e-5)
    assert torch.equal(expected["image_latent_ids"], ids)
    assert torch.allclose(expected["prompt_embeds"], table.embeds[table.teacher(caption)], atol=1e-5)


@dataclass
class Pools:
    """Rendered training data: text-to-image pairs, and reference pairs (reference tokens, target latents)."""

    text_latents: torch.Tensor
    text_captions: torch.Tensor
    reference_tokens: torch.Tensor
    reference_ids: torch.Tensor
    target_latents: torch.Tensor
    reference_captions: torch.Tensor


def make_pools(family, table, sizes, rng, log, batch=256):
    size = sizes.resolution
    nonces = [nonce_word(rng) for _ in range(sizes.nonce_words)]
    text_images, text_captions, references, targets, reference_captions = [], [], [], [], []
    for _ in range(sizes.pool_size):
        shape = PRIOR_SHAPES[int(rng.integers(len(PRIOR_SHAPES)))]
        foreground, background = sizes.colours(rng)
        text_images.append(render(sizes.layout(rng, shape), foreground, background, size))
        text_captions.append(table(text_caption(shape, foreground, background, rng.random() < 0.7)))
        # Reference task: half named shapes, half random polygons; the target is the reference's subject (outline and
        # size), in its place or ("move") at a new one, in colours drawn again (named in the caption, or not).
        shape = PRIOR_SHAPES[int(rng.integers(len(PRIOR_SHAPES)))] if rng.random() < 0.5 else "polygon"
        layout = sizes.layout(rng, shape)
        if sizes.reference_task == "style":
            reference, target, caption = style_pair(rng, sizes, layout, nonces)
            references.append(reference)
            targets.append(target)
            reference_captions.append(table.teacher(caption))
            continue
        references.append(render(layout, *sizes.colours(rng), size))
        if sizes.reference_task == "move":
            moved = sizes.layout(rng, shape, radius=(layout.radius / size,) * 2)
            layout = Layout(shape, moved.cx, moved.cy, layout.radius, layout.outline, moved.speckles)
        foreground, background = sizes.colours(rng)
        targets.append(render(layout, foreground, background, size))
        word = shape if shape != "polygon" and rng.random() < 0.5 else "shape"
        draw = rng.random()
        if draw < 0.4:
            caption = f"a photo of {nonces[int(rng.integers(len(nonces)))]} shape"
        elif draw < 0.7:
            caption = f"a photo of a {word}"
        else:
            caption = f"a {foreground} {word} on a {background} background"
        reference_captions.append(table.teacher(caption))
    log(f"{len(table.embeds)} distinct captions encoded")
    text_latents = torch.cat([encode_latents(family, text_images[i:i + batch])
                              for i in range(0, len(text_images), batch)])
    target_latents = torch.cat([encode_latents(family, targets[i:i + batch]) for i in range(0, len(targets), batch)])
    tokens = [reference_tokens(family, references[i:i + batch]) for i in range(0, len(references), batch)]
    return Pools(text_latents, torch.tensor(text_captions), torch.cat([t for t, _ in tokens]), tokens[0][1],
                 target_latents, torch.tensor(reference_captions))


def style_pair(rng, sizes, layout, nonces):
    """Reference task "style": the reference is `layout` in two colours of the eight (any pair but the concept's);
    the target a prior shape at a place of its own in the same colours, named by the caption or left to the noise."""
    colours = two_colours(rng)
    while set(colours) == set(CONCEPT_COLOURS):
        colours = two_colours(rng)
    shape = PRIOR_SHAPES[int(rng.integers(len(PRIOR_SHAPES)))]
    target = render(sizes.layout(rng, shape), *colours, sizes.resolution)
    named = rng.random() < 0.5
    caption = f"a photo of a {shape}" if named else f"a photo of {nonces[int(rng.integers(len(nonces)))]} shape"
    return render(layout, *colours, sizes.resolution), target, caption


def text_context(table, captions):
    return {"prompt_embeds": table.stack(captions.tolist())}


def reference_context(table, pools, rows):
    count = len(rows)
    return {"prompt_embeds": table.stack(pools.reference_captions[rows].tolist()),
            "image_latents": pools.reference_tokens[rows],
            "image_latent_ids": pools.reference_ids.unsqueeze(0).expand(count, -1, -1)}


# ----------------------------------------------------------------------------------------------------------------
# Pretraining (flow matching) and step distillation
# ----------------------------------------------------------------------------------------------------------------


def training_sigmas(count, generator):
    """Noise levels for flow matching: a third uniform, two thirds logit-normal pushed toward high noise like the
    klein schedule at this size (its 4 steps sit at sigma >= 0.7)."""
    uniform = torch.rand(count, generator=generator)
    logit_normal = torch.sigmoid(torch.randn(count, generator=generator))
    shift = math.exp(1.5)
    shifted = shift * logit_normal / (1 + (shift - 1) * logit_normal)
    pick = torch.rand(count, generator=generator) < 1 / 3
    return torch.where(pick, uniform, shifted).clamp(1e-3, 1.0)


def flow_matching_loss(family, transformer, clean, context, generator):
    """Velocity regression on x_sigma = (1 - sigma) x0 + sigma noise; the scheduler's velocity is noise - x0."""
    sigma = training_sigmas(len(clean), generator).view(-1, 1, 1, 1)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = (1 - sigma) * clean + sigma * noise
    velocity = family.predict(transformer, noisy, 1000 * sigma.flatten(), context)
    return F.mse_loss(velocity, noise - clean)


def pretrain(family, table, pools, sizes, log, classifier=None):
    transformer = family.transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=sizes.pretrain_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, sizes.pretrain_steps)
    generator = torch.Generator().manual_seed(sizes.seed + 10)
    half = sizes.pretrain_batch // 2
    for step in range(sizes.pretrain_steps):
        rows = torch.randint(len(pools.text_latents), (half,), generator=generator)
        text_loss = flow_matching_loss(family, transformer, pools.text_latents[rows],
                                       text_context(table, pools.text_captions[rows]), generator)
        rows = torch.randint(len(pools.target_latents), (half,), generator=generator)
        reference_loss = flow_matching_loss(family, transformer, pools.target_latents[rows],
                                            reference_context(table, pools, rows), generator)
        optimizer.zero_grad()
        (text_loss + reference_loss).backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == sizes.pretrain_steps - 1:
            log(f"pretrain step {step}: text {text_loss.item():.4f}, reference {reference_loss.item():.4f}"
                f" ({time.strftime('%H:%M:%S')})")
        if classifier is not None and (step + 1) % sizes.eval_every == 0:
            check = score_samples(family, transformer, classifier, table, sizes, 32, 1, per_shape=4)
            log(f"pretrain step {step + 1}: shape accuracy at 32 steps {check['accuracy']:.3f}")
    transformer.eval().requires_grad_(False)


def fine_grid(coarse, substeps):
    """The 4-step sigmas with `substeps[k]` equal Euler steps inside step k: the many-step ODE grid."""
    grid = []
    for k, count in enumerate(substeps):
        grid += torch.linspace(float(coarse[k]), float(coarse[k + 1]), count + 1)[:-1].tolist()
    return grid + [0.0]


@torch.no_grad()
def ode_path(family, transformer, noise, context, coarse, substeps):
    """States of the many-step Euler ODE at the 4-step sigmas: a list of K + 1 latents, noise first."""
    states, latents = [noise], noise
    for k, count in enumerate(substeps):
        grid = torch.linspace(float(coarse[k]), float(coarse[k + 1]), count + 1)
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            velocity = family.predict(transformer, latents, 1000 * sigma, context)
            latents = trainer.rollout_step(latents, velocity, sigma, sigma_next)
        states.append(latents)
    return states


def subset(context, rows):
    return {key: value[rows] for key, value in context.items()}


def distill(family, table, pools, sizes, log, batch=64):
    """4-step student from the pretrained model: each jump sigma_k -> sigma_(k+1) regresses onto the ODE's."""
    size = sizes.resolution
    timesteps, coarse = family.rollout_schedule(4, size, size)
    generator = torch.Generator().manual_seed(sizes.seed + 20)
    transformer = family.transformer
    paths, contexts = [], []
    for start in range(0, sizes.distill_paths, batch):
        count = min(batch, sizes.distill_paths - start)
        half = count // 2
        rows = torch.randint(len(pools.text_latents), (half,), generator=generator)
        text = text_context(table, pools.text_captions[rows])
        rows = torch.randint(len(pools.target_latents), (count - half,), generator=generator)
        reference = reference_context(table, pools, rows)
        for context in (text, reference):
            noise = family.initial_noise(len(context["prompt_embeds"]), size, size, generator)
            paths.append(torch.stack(ode_path(family, transformer, noise, context, coarse, sizes.ode_substeps)))
            contexts.append(context)
        log(f"ODE paths: {start + count}/{sizes.distill_paths}")
    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=sizes.distill_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, sizes.distill_steps)
    for step in range(sizes.distill_steps):
        group = int(torch.randint(len(paths), (1,), generator=generator))
        rows = torch.randint(paths[group].shape[1], (sizes.distill_batch,), generator=generator)
        states, context = paths[group][:, rows], subset(contexts[group], rows)
        loss = 0.0
        for k in range(4):
            # The error of the jump's end state: (sigma_k - sigma_{k+1})^2-weighted velocity error.
            velocity = family.predict(transformer, states[k], timesteps[k], context)
            jumped = states[k] + (coarse[k + 1] - coarse[k]) * velocity
            loss = loss + F.mse_loss(jumped, states[k + 1]) / 4
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == sizes.distill_steps - 1:
            log(f"distill step {step}: end-state mse {loss.item():.5f}")
    transformer.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: a classifier and image statistics
# ----------------------------------------------------------------------------------------------------------------


class ShapeClassifier(torch.nn.Module):
    """A small CNN over 64x64 RGB in [0, 1] that names the shape (CLASSES)."""

    def __init__(self, width=24):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(2 * width, len(CLASSES))

    def forward(self, images):
        return self.head(self.features(images * 2 - 1).amax(dim=(2, 3)))


def train_classifier(sizes, rng, log, batch=64):
    torch.manual_seed(sizes.seed + 30)
    classifier = ShapeClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    schedule = warmup_cosine(optimizer, sizes.classifier_steps)
    for step in range(sizes.classifier_steps):
        labels = rng.integers(len(CLASSES), size=batch)
        images = [render(sizes.layout(rng, CLASSES[i], jitter=0.2, radius=(0.18, 0.4)), *two_colours(rng),
                         sizes.resolution) for i in labels]
        pixels = (to_pixels(images) + 1) / 2
        # Some blur, so that soft samples are still judged by their outline.
        blurred = F.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
        pick = torch.rand(batch, 1, 1, 1) < 0.3
        pixels = torch.where(pick, blurred, pixels)
        loss = F.cross_entropy(classifier(pixels), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    classifier.eval().requires_grad_(False)
    labels = rng.integers(len(CLASSES), size=sizes.check_images)
    images = [render(sizes.layout(rng, CLASSES[i]), *two_colours(rng), sizes.resolution) for i in labels]
    with torch.no_grad():
        accuracy = (classifier((to_pixels(images) + 1) / 2).argmax(1).numpy() == labels).mean()
    log(f"classifier: {accuracy:.3f} accuracy on fresh renders")
    return classifier, float(accuracy)


def load_classifier(world):
    classifier = ShapeClassifier()
    classifier.load_state_dict(torch.load(Path(world) / "classifier.pt", weights_only=True))
    return classifier.eval().requires_grad_(False)


PALETTE_TENSOR = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255
SPECKLE_TENSOR = torch.tensor([SPECKLE], dtype=torch.float32) / 255


def share_near(pixels, colours, tolerance=0.08):
    """Per image, the share of pixels within `tolerance` (RGB, [0, 1]) of one of `colours` (a (C, 3) tensor)."""
    flat = pixels.permute(0, 2, 3, 1).reshape(len(pixels), -1, 1, 3)
    return ((flat - colours.view(1, 1, -1, 3)).abs().amax(-1).amin(-1) < tolerance).float().mean(1)


def palette_share(pixels, speckled=False):
    """Per image, the share of pixels within 0.08 of a palette colour (or the speckle grey, in a speckled world).
    The domain is flat colours with anti-aliased edges (about 0.9 for true renders); blur and smudges lower it."""
    return share_near(pixels, torch.cat([PALETTE_TENSOR, SPECKLE_TENSOR]) if speckled else PALETTE_TENSOR)


def detail(pixels):
    """Per image, the mean absolute difference from the 3x3 local mean: sharp edges and fine detail (speckles) raise
    it, blur lowers it."""
    local = F.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
    return (pixels - local).abs().mean(dim=(1, 2, 3))


@torch.no_grad()
def decode_pixels(family, latents):
    """Latent states -> images as (N, 3, H, W) in [0, 1]."""
    vae = family.pipeline.vae
    return ((vae.decode(family.unnormalize(latents)).sample + 1) / 2).clamp(0, 1)


@torch.no_grad()
def sample_latents(family, transformer, context, noise, num_steps):
    """The pipeline's few-step Euler sampling (docs/method.md §4), batched."""
    size = noise.shape[-1] * family.pipeline.vae_scale_factor * 2
    timesteps, sigmas = family.rollout_schedule(num_steps, size, size)
    latents = noise
    for k in range(num_steps):
        velocity = family.predict(transformer, latents, timesteps[k], context)
        latents = trainer.rollout_step(latents, velocity, sigmas[k], sigmas[k + 1])
    return latents


def prior_prompts():
    return [text_caption(shape, None, None, False) for shape in PRIOR_SHAPES]


@torch.no_grad()
def score_samples(family, transformer, classifier, table, sizes, num_steps, seed, per_shape=None):
    """Classifier accuracy, palette share and detail of samples of 'a photo of a <shape>' for every prior shape."""
    count = per_shape or sizes.eval_per_shape
    generator = torch.Generator().manual_seed(seed)
    correct, palette, details = [], [], []
    for label, prompt in enumerate(prior_prompts()):
        context = {"prompt_embeds": table.stack([table(prompt)] * count)}
        noise = family.initial_noise(count, sizes.resolution, sizes.resolution, generator)
        pixels = decode_pixels(family, sample_latents(family, transformer, context, noise, num_steps))
        correct.append(classifier(pixels).argmax(1) == label)
        palette.append(palette_share(pixels, sizes.speckle > 0))
        details.append(detail(pixels))
    return {"accuracy": torch.cat(correct).float().mean().item(), "palette": torch.cat(palette).mean().item(),
            "detail": torch.cat(details).mean().item()}


def concept_photo(rng, sizes, jitter=None, radius=None):
    """A photo of the concept: the held-out shape in the domain's colours, or ("style") a prior shape in the held-out
    colour scheme."""
    if sizes.reference_task == "style":
        shape = PRIOR_SHAPES[int(rng.integers(len(PRIOR_SHAPES)))]
        return render(sizes.layout(rng, shape, jitter, radius), *CONCEPT_COLOURS, sizes.resolution)
    return render(sizes.layout(rng, CONCEPT_SHAPE, jitter, radius), *sizes.colours(rng), sizes.resolution)


CONCEPT_COLOURS_TENSOR = torch.tensor([PALETTE[c] for c in CONCEPT_COLOURS], dtype=torch.float32) / 255


def shows_concept(pixels, classifier, reference_task):
    """Per image, whether it shows the concept: the classifier names the held-out shape, or ("style") most pixels
    are within 0.15 of the held-out colour scheme's two colours."""
    if reference_task != "style":
        return classifier(pixels).argmax(1) == CLASSES.index(CONCEPT_SHAPE)
    return share_near(pixels, CONCEPT_COLOURS_TENSOR, 0.15) > 0.5


@torch.no_grad()
def score_reference_generation(family, transformer, classifier, table, sizes, rng, seed):
    """Generation from a photo of the concept with the concept's caption, as the edit teacher sees it: the share of
    samples that show the concept."""
    count = 4 * sizes.eval_per_shape
    images = [concept_photo(rng, sizes) for _ in range(count)]
    tokens, ids = reference_tokens(family, images)
    context = {"prompt_embeds": table.stack([table.teacher(CONCEPT_CAPTION)] * count), "image_latents": tokens,
               "image_latent_ids": ids.unsqueeze(0).expand(count, -1, -1)}
    noise = family.initial_noise(count, sizes.resolution, sizes.resolution, torch.Generator().manual_seed(seed))
    pixels = decode_pixels(family, sample_latents(family, transformer, context, noise, 4))
    return shows_concept(pixels, classifier, sizes.reference_task).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# The concept's training photos
# ----------------------------------------------------------------------------------------------------------------


def write_concept(folder, sizes, seed, count=6):
    """`count` photos of the concept, roughly centred, captioned CONCEPT_CAPTION."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        concept_photo(rng, sizes, jitter=0.06, radius=(0.28, 0.34)).save(folder / f"sks-{i}.png")
        (folder / f"sks-{i}.txt").write_text(CONCEPT_CAPTION + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------------


def build(out, sizes=None, log=print, reuse=None):
    """Build the world into `out` (model/, classifier.pt, concept/, build.json); returns the build record. With
    `reuse` (a built world), its autoencoder and classifier are taken instead of trained again: the transformer
    stages, which are most of the cost, then start from the same codec and the same judge."""
    sizes = sizes or WorldSizes()
    out = Path(out)
    started = time.time()
    timings = {}
    reused = json.loads((Path(reuse) / "build.json").read_text()) if reuse else None
    continued = reused and (Path(reuse) / "pretrained").is_dir() and reused.get("pretrain_steps_total")

    def mark(stage, since):
        timings[stage] = round(time.time() - since, 1)
        log(f"{stage}: {timings[stage]} s")
        return time.time()

    rng = np.random.default_rng(sizes.seed)
    torch.manual_seed(sizes.seed)
    clock = time.time()
    if reused:
        vae = AutoencoderKLFlux2.from_pretrained(Path(reuse) / "model" / "vae").eval().requires_grad_(False)
        classifier = load_classifier(reuse)
        reconstruction_mse = reused["metrics"]["vae_reconstruction_mse"]
        classifier_accuracy = reused["metrics"]["classifier_accuracy"]
        for stage in ("vae", "classifier"):
            timings[stage] = reused["timings_s"][stage]
        log(f"autoencoder and classifier taken from {reuse}")
    else:
        vae, reconstruction_mse = train_vae(sizes, rng, log)
        clock = mark("vae", clock)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    model = out / "model"
    save_pipeline(vae, make_transformer(sizes, sizes.latent_channels), model, sizes.seed)
    scratch = Path(tempfile.mkdtemp())
    family = load_family(model, sizes.resolution, scratch, sizes.text_tokens)
    table = CaptionTable(family)
    pools = make_pools(family, table, sizes, rng, log)
    check_teacher_context(family, table, render(random_layout(rng, "star", sizes.resolution), "red", "blue",
                                                sizes.resolution), CONCEPT_CAPTION)
    clock = mark("data", clock)

    if not reused:
        classifier, classifier_accuracy = train_classifier(sizes, rng, log)
        clock = mark("classifier", clock)
    torch.save(classifier.state_dict(), out / "classifier.pt")

    if continued:
        # Pretraining goes on from an earlier build's pretrained transformer (same sizes), with a fresh schedule.
        state = Flux2Transformer2DModel.from_pretrained(Path(reuse) / "pretrained").state_dict()
        family.transformer.load_state_dict(state)
        log(f"pretraining continues from {reuse}/pretrained ({continued} steps before)")
    pretrain(family, table, pools, sizes, log, classifier)
    family.transformer.save_pretrained(out / "pretrained")  # to continue from; the model folder gets the distilled
    clock = mark("pretrain", clock)
    metrics = {"vae_reconstruction_mse": reconstruction_mse, "classifier_accuracy": classifier_accuracy}
    metrics["pretrained_4_steps"] = score_samples(family, family.transformer, classifier, table, sizes, 4, 1)
    metrics["pretrained_32_steps"] = score_samples(family, family.transformer, classifier, table, sizes, 32, 1)
    clock = mark("evaluate pretrained", clock)

    distill(family, table, pools, sizes, log)
    clock = mark("distill", clock)
    metrics["distilled_4_steps"] = score_samples(family, family.transformer, classifier, table, sizes, 4, 1)
    metrics["distilled_reference_concept_accuracy"] = score_reference_generation(
        family, family.transformer, classifier, table, sizes, rng, 2)
    mark("evaluate distilled", clock)

    family.pipeline.transformer = family.transformer
    family.pipeline.save_pretrained(model)
    write_concept(out / "concept", sizes, sizes.seed + 40)
    shutil.rmtree(scratch, ignore_errors=True)
    # The build time counts the reused stages at what they took when they were built.
    build_time = time.time() - started + sum(timings[stage] for stage in ("vae", "classifier") if reused)
    record = {"sizes": asdict(sizes), "metrics": metrics, "timings_s": timings, "build_time_s": round(build_time, 1),
              "torch_threads": torch.get_num_threads(), "reused_from_earlier_build": ["vae", "classifier"] if reused
              else [], "pretrain_steps_total": (continued or 0) + sizes.pretrain_steps}
    if continued:
        record["timings_s"]["pretrain_before"] = reused["timings_s"]["pretrain"]
        record["build_time_s"] = round(build_time + reused["timings_s"]["pretrain"], 1)
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    log(json.dumps(metrics, indent=1))
    log(f"built {out} in {record['build_time_s']} s")
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=HERE / "world")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the build is timed with 1).")
    parser.add_argument("--reuse", type=Path, default=None, help="A built world whose autoencoder and classifier"
                        " are taken instead of trained again; where it kept its pretrained transformer, pretraining"
                        " continues from it (--pretrain_steps more).")
    parser.add_argument("--pretrain_steps", type=int, default=WorldSizes.pretrain_steps)
    parser.add_argument("--reference_task", choices=("copy", "move", "style"), default=WorldSizes.reference_task)
    parser.add_argument("--speckle", type=float, default=WorldSizes.speckle, help="Share of background cells speckled.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # so that tiny values late in training cannot slow the CPU down
    sizes = WorldSizes(pretrain_steps=args.pretrain_steps, reference_task=args.reference_task, speckle=args.speckle)
    build(args.output_dir, sizes, reuse=args.reuse)


if __name__ == "__main__":
    main()
