"""Measure the central claim in the miniature world: teach the held-out concept with D-OPSD, SFT and off-policy
distillation, and compare what each keeps.

Every run fine-tunes the world's 4-step model on the six photos in world/concept/ ("a photo of sks shape") with
`train_dopsd_lora.py` itself (`main(parse_args(argv))`, one subprocess per run), under each `--objective` the trainer
offers, with the same settings and three seeds. The trained student is then sampled in 4 steps, from the same noise
for every run, and scored:

- concept accuracy: samples of the concept prompt that show the concept (the world's classifier names a heart; in a
  world built with --reference_task style, most pixels are in the held-out colour scheme);
- prior accuracy: samples of "a photo of a <shape>" (the eight pretrained shapes) named as their shape, and bleed:
  prior samples that show the concept;
- prior drift: RMS distance of those samples' latents from the base model's, same noise;
- palette share: pixels within 0.08 of a palette colour (the domain is flat colours; blur and smudges lower it),
  the few-step quality measure;
- detail: mean absolute difference of each pixel from its 3x3 neighbourhood's mean (sharp edges and fine detail
  raise it, blur lowers it); in a speckled world also the share of speckle-grey pixels (detail only the noise
  decides, which few-step sampling without distillation blurs away);
- memorisation: RMS pixel distance of each concept sample to its nearest training photo, and the share of near
  copies (distance < 0.12);
- diversity: mean pairwise RMS pixel distance between concept samples.

    python examples/miniature/run_experiment.py        # writes examples/miniature/results/
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build_world as world_lib  # noqa: E402
from build_world import trainer  # noqa: E402


# Set once for every objective, from the method's defaults (docs/method.md §5) where they apply at this size:
# K = 4, EMA decay 0.9999, 1 image x 4 accumulation steps, AdamW, constant rate, clipping 1.0. The world's layers are
# 96 wide, so the LoRA has rank 16 (alpha/r = 2, as the default 128/64), and a 0.9 M-parameter model needs a larger
# rate than klein's 2e-5 to move in 200 steps. With decay 0.9999 over 200 steps the teacher stays within 2 % of the
# base model: in effect a frozen teacher.
FINE_TUNE = {
    "max_train_steps": 200,
    "learning_rate": 1e-3,
    "rank": 16,
    "lora_alpha": 32,
    "rollout_steps": 4,
    "ema_decay": 0.9999,
    "gradient_accumulation_steps": 4,
}
SEEDS = (0, 1, 2)
CONCEPT_SAMPLES = 32
PRIOR_SAMPLES_PER_SHAPE = 8
NEAR_COPY = 0.12
EVAL_NOISE_SEED = 1234
GRID_PRIOR_SHAPES = ("circle", "star", "square", "ring")


def quiet_parse(argv):
    """trainer.parse_args, or None where the trainer refuses the arguments (its error line is swallowed)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return trainer.parse_args(argv)
        except SystemExit:
            return None


def available_objectives(world):
    """The trainer's --objective values among dopsd, sft, offpolicy (only dopsd where it has no such flag)."""
    base = ["--pretrained_model_name_or_path", str(world / "model"), "--instance_data_dir", str(world / "concept")]
    return [o for o in ("dopsd", "sft", "offpolicy")
            if o == "dopsd" or quiet_parse([*base, "--objective", o]) is not None]


def training_argv(world, output_dir, objective, seed, settings=FINE_TUNE):
    argv = ["--pretrained_model_name_or_path", str(world / "model"), "--instance_data_dir", str(world / "concept"),
            "--output_dir", str(output_dir), "--resolution", "64", "--report_to", "none", "--seed", str(seed),
            "--checkpointing_steps", "1000000", "--validation_steps", "1000000", "--overwrite_output_dir",
            "--max_sequence_length", str(world_lib.text_tokens(world))]
    for flag, value in settings.items():
        argv += [f"--{flag}", str(value)]
    if objective != "dopsd":
        argv += ["--objective", objective]
    return argv


# ----------------------------------------------------------------------------------------------------------------
# Sampling and scores
# ----------------------------------------------------------------------------------------------------------------


class Evaluation:
    """The fixed prompts, noise, classifier and training photos every run is scored with."""

    def __init__(self, world, scratch, concept_samples=CONCEPT_SAMPLES, prior_per_shape=PRIOR_SAMPLES_PER_SHAPE):
        world = Path(world)
        self.family = world_lib.load_family(world / "model", 64, scratch, world_lib.text_tokens(world))
        self.table = world_lib.CaptionTable(self.family)
        self.classifier = world_lib.load_classifier(world)
        built = json.loads((world / "build.json").read_text())["sizes"]
        self.reference_task = built.get("reference_task", "copy")
        self.speckled = built.get("speckle", 0) > 0
        photos = sorted((world / "concept").glob("*.png"))
        self.photos = (world_lib.to_pixels([Image.open(p).convert("RGB") for p in photos]) + 1) / 2
        self.prior_labels = torch.arange(len(world_lib.PRIOR_SHAPES)).repeat_interleave(prior_per_shape)
        prompts = world_lib.prior_prompts()
        self.prior_context = {"prompt_embeds": self.table.stack([self.table(prompts[i]) for i in self.prior_labels])}
        self.concept_context = {"prompt_embeds": self.table.stack([self.table(world_lib.CONCEPT_CAPTION)]
                                                                  * concept_samples)}
        generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        self.concept_noise = self.family.initial_noise(concept_samples, 64, 64, generator)
        self.prior_noise = self.family.initial_noise(len(self.prior_labels), 64, 64, generator)

    @torch.no_grad()
    def samples(self, transformer, num_steps=4):
        """Latents and images of the concept prompt and the prior prompts."""
        transformer.eval()
        concept = world_lib.sample_latents(self.family, transformer, self.concept_context, self.concept_noise,
                                           num_steps)
        prior = world_lib.sample_latents(self.family, transformer, self.prior_context, self.prior_noise, num_steps)
        return {"concept_latents": concept, "prior_latents": prior,
                "concept_pixels": world_lib.decode_pixels(self.family, concept),
                "prior_pixels": world_lib.decode_pixels(self.family, prior)}

    @torch.no_grad()
    def palette_ceiling(self):
        """Palette share of the training photos themselves and after a round trip through the VAE: what a perfect
        sampler could reach in pixel space."""
        latents = world_lib.encode_latents(self.family, [to_image(p) for p in self.photos])
        round_trip = world_lib.decode_pixels(self.family, latents)
        return {"photos": world_lib.palette_share(self.photos, self.speckled).mean().item(),
                "photos_through_vae": world_lib.palette_share(round_trip, self.speckled).mean().item(),
                "photos_detail": world_lib.detail(self.photos).mean().item()}

    @torch.no_grad()
    def scores(self, samples, base=None):
        concept, prior = samples["concept_pixels"], samples["prior_pixels"]
        prior_classes = self.classifier(prior).argmax(1)
        nearest = rms(concept.unsqueeze(1), self.photos.unsqueeze(0)).amin(1)
        pairwise = rms(concept.unsqueeze(1), concept.unsqueeze(0))
        count = len(concept)
        result = {
            "concept_accuracy": self.shows_concept(concept).float().mean().item(),
            "prior_accuracy": (prior_classes == self.prior_labels).float().mean().item(),
            "prior_bleed": self.shows_concept(prior).float().mean().item(),
            "palette_concept": world_lib.palette_share(concept, self.speckled).mean().item(),
            "palette_prior": world_lib.palette_share(prior, self.speckled).mean().item(),
            "detail_concept": world_lib.detail(concept).mean().item(),
            "detail_prior": world_lib.detail(prior).mean().item(),
            "nearest_photo_rms": nearest.mean().item(),
            "near_copies": (nearest < NEAR_COPY).float().mean().item(),
            "diversity_rms": (pairwise.sum() / (count * (count - 1))).item(),
        }
        if self.speckled:
            result["speckles_concept"] = world_lib.share_near(concept, world_lib.SPECKLE_TENSOR).mean().item()
            result["speckles_prior"] = world_lib.share_near(prior, world_lib.SPECKLE_TENSOR).mean().item()
        if base is not None:
            result["prior_drift"] = rms(samples["prior_latents"], base["prior_latents"]).mean().item()
        return result


    def shows_concept(self, pixels):
        return world_lib.shows_concept(pixels, self.classifier, self.reference_task)


def rms(a, b):
    """Root-mean-square difference over the last three dimensions (broadcast over the leading ones)."""
    return (a - b).pow(2).mean(dim=(-3, -2, -1)).sqrt()


# ----------------------------------------------------------------------------------------------------------------
# One run (a subprocess), and the table
# ----------------------------------------------------------------------------------------------------------------


def run_one(world, run_dir, objective, seed, settings=FINE_TUNE, **evaluation_sizes):
    """Train with the trainer's main() in this process ("base": no training), then sample; writes
    run_dir/samples.pt (latents, images and the training time)."""
    world, run_dir = Path(world), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if objective == "base":
        transformer = world_lib.load_family(world / "model", 64, run_dir, world_lib.text_tokens(world)).transformer
    else:
        transformer = trainer.main(trainer.parse_args(training_argv(world, run_dir, objective, seed, settings)))
    train_seconds = time.time() - started
    samples = Evaluation(world, run_dir, **evaluation_sizes).samples(transformer)
    torch.save({**samples, "train_s": train_seconds}, run_dir / "samples.pt")
    return samples


def launch(world, runs_dir, objective, seed, settings_file):
    run_dir = runs_dir / f"{objective}-{seed}"
    if (run_dir / "samples.pt").exists():  # finished earlier (delete results/runs to redo every run)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--world", str(world), "--one_run", objective,
               str(seed), str(run_dir), "--settings", str(settings_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    (run_dir / "log.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{objective} seed {seed} failed:\n{result.stderr[-3000:]}")
    return run_dir


def summarise(per_run):
    """{objective: {metric: (mean, std over seeds)}}."""
    table = {}
    for objective, runs in per_run.items():
        metrics = runs[0].keys()
        table[objective] = {m: (float(np.mean([r[m] for r in runs])), float(np.std([r[m] for r in runs])))
                            for m in metrics}
    return table


COLUMNS = [
    ("concept_accuracy", "concept acc. ↑"),
    ("prior_accuracy", "prior acc. ↑"),
    ("prior_bleed", "bleed ↓"),
    ("prior_drift", "prior drift ↓"),
    ("palette_prior", "palette, prior ↑"),
    ("palette_concept", "palette, concept ↑"),
    ("detail_prior", "detail, prior"),
    ("detail_concept", "detail, concept"),
    ("speckles_prior", "speckles, prior"),
    ("speckles_concept", "speckles, concept"),
    ("nearest_photo_rms", "NN dist. to photos"),
    ("near_copies", "near copies ↓"),
    ("diversity_rms", "diversity ↑"),
    ("train_s", "train s"),
]


def markdown_table(table, seeds):
    columns = [(key, title) for key, title in COLUMNS if any(key in metrics for metrics in table.values())]
    lines = ["| model | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for objective, metrics in table.items():
        cells = []
        for key, _ in columns:
            if key not in metrics:
                cells.append("–")
            elif objective == "base" or key == "train_s":
                cells.append(f"{metrics[key][0]:.3g}" if key != "train_s" else f"{metrics[key][0]:.0f}")
            else:
                cells.append(f"{metrics[key][0]:.3f} ± {metrics[key][1]:.3f}")
        name = objective if objective == "base" else f"{objective} ({len(seeds)} seeds)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_grid(path, rows, photos):
    """One row per model: 4 concept samples, then one sample of each GRID_PRIOR_SHAPES prompt; photos on top."""
    cell, label = 64, 88
    per_shape = len(next(iter(rows.values()))["prior_pixels"]) // len(world_lib.PRIOR_SHAPES)
    prior_columns = [world_lib.PRIOR_SHAPES.index(s) * per_shape for s in GRID_PRIOR_SHAPES]
    grid = Image.new("RGB", (label + 8 * cell, (len(rows) + 2) * cell), "white")
    draw = ImageDraw.Draw(grid)
    headers = ["sks"] * 4 + list(GRID_PRIOR_SHAPES)
    for c, header in enumerate(headers):
        draw.text((label + c * cell + 4, 26), header, fill="black")
    draw.text((4, 26), "prompt", fill="black")
    draw.text((4, cell + 26), "training photos", fill="black")
    for c, photo in enumerate(photos[:8]):
        grid.paste(to_image(photo), (label + c * cell, cell))
    for r, (name, samples) in enumerate(rows.items()):
        top = (r + 2) * cell
        draw.text((4, top + 26), name, fill="black")
        images = [samples["concept_pixels"][i] for i in range(4)] + [samples["prior_pixels"][i] for i in prior_columns]
        for c, image in enumerate(images):
            grid.paste(to_image(image), (label + c * cell, top))
    grid.save(path)


def to_image(pixels):
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def experiment(world, output_dir, objectives=None, seeds=SEEDS, settings=FINE_TUNE, workers=2, log=print):
    world, output_dir = Path(world), Path(output_dir)
    started = time.time()
    objectives = objectives or available_objectives(world)
    runs_dir = output_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    settings_file = runs_dir / "settings.json"
    settings_file.write_text(json.dumps(settings))
    jobs = [("base", 0)] + [(o, s) for o in objectives for s in seeds]
    with ThreadPoolExecutor(workers) as pool:
        run_dirs = list(pool.map(lambda job: launch(world, runs_dir, *job, settings_file), jobs))
    torch.set_num_threads(1)
    evaluation = Evaluation(world, output_dir)
    loaded = {job: torch.load(d / "samples.pt", weights_only=True) for job, d in zip(jobs, run_dirs)}
    base = loaded[("base", 0)]
    per_run = {}
    for (objective, seed), samples in loaded.items():
        scores = evaluation.scores(samples, base)
        scores["train_s"] = float(samples["train_s"])
        per_run.setdefault(objective, []).append(scores)
        log(f"{objective} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    table = summarise(per_run)
    ceiling = evaluation.palette_ceiling()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "table.md").write_text(markdown_table(table, seeds) + f"\nPalette share of the training photos:"
                                         f" {ceiling['photos']:.3f}; after a VAE round trip:"
                                         f" {ceiling['photos_through_vae']:.3f}. Detail of the training photos:"
                                         f" {ceiling['photos_detail']:.4f}.\n")
    record = {"settings": settings, "seeds": list(seeds), "objectives": objectives, "per_run": per_run,
              "palette_ceiling": ceiling,
              "summary": {o: {m: {"mean": v[0], "std": v[1]} for m, v in ms.items()} for o, ms in table.items()},
              "wall_s": round(time.time() - started, 1), "workers": workers}
    (output_dir / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    rows = {"base": base, **{o: loaded[(o, seeds[0])] for o in objectives}}
    write_grid(output_dir / "grid.png", rows, evaluation.photos)
    log(markdown_table(table, seeds))
    log(f"wrote {output_dir} in {record['wall_s']} s")
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=HERE / "world")
    parser.add_argument("--output_dir", type=Path, default=HERE / "results")
    parser.add_argument("--objectives", nargs="+", default=None, help="Default: every one the trainer offers.")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=2, help="Runs at a time, one CPU thread each.")
    parser.add_argument("--one_run", nargs=3, metavar=("OBJECTIVE", "SEED", "RUN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = json.loads(args.settings.read_text()) if args.settings else FINE_TUNE
    if args.one_run:
        objective, seed, run_dir = args.one_run
        run_one(args.world, Path(run_dir), objective, int(seed), settings)
        return
    experiment(args.world, args.output_dir, args.objectives, tuple(args.seeds), settings, args.workers)


if __name__ == "__main__":
    main()
