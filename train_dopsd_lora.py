#!/usr/bin/env python
"""D-OPSD LoRA training: on-policy self-distillation for step-distilled diffusion models (arXiv 2605.05204).

Teach Z-Image-Turbo or FLUX.2-klein a new concept or style without losing its few-step sampling.
Each iteration the student (the model with its LoRA, conditioned on the caption) rolls out its own few-step
trajectory from fresh noise, on exactly the schedule that inference uses. At every state of that trajectory an
EMA teacher (the same network with the EMA of the LoRA, conditioned on the caption *and* the training image)
predicts a velocity, and the student is pulled toward it. No reward model, no ground-truth velocity; inference
afterwards is the unchanged text-only pipeline.

    accelerate launch train_dopsd_lora.py --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo \
        --instance_data_dir my_concept/ --instance_prompt "a photo of sks dog" --output_dir sks-dog-lora

The file reads top to bottom in the order data flows: arguments -> model family -> data -> contexts cache ->
D-OPSD step -> validation -> saving/Hub -> run safety -> setup -> training loop -> main. Everything that differs
between model families lives in one small class per family. docs/method.md describes the method as this code
implements it; "docs/method.md §N" in comments points there.

train_dopsd_full.py shares this file's code under "# Copied from train_dopsd_lora.NAME" markers: edit it here, then
run `python utils/check_copies.py --fix`.
"""

import argparse
import fcntl
import hashlib
import importlib
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
import unicodedata
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
MIN_IMAGE_SIDE = 64  # smaller photos carry too little detail for a ~1 MP teacher context
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRAINING = "lora"  # what this script trains (family defaults differ for full fine-tuning)
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
QUANTIZATION_BACKENDS = {"none": None, "int8": "bitsandbytes", "nf4": "bitsandbytes", "fp8": "torchao",
                         "fp8_compute": "torchao"}
PRIOR_PROMPTS = ["a photo of a dog in a park", "a portrait of an old man", "a city street at night",
                 "a bowl of fruit on a wooden table"]  # --prior_prompts: everyday subjects a concept LoRA should leave
OBJECTIVES = {  # --objective: D-OPSD, and the two baselines it is measured against (docs/method.md §2.5)
    "dopsd": "the teacher's predictions on the student's own roll-out (D-OPSD)",
    "sft": "plain fine-tuning, the training image noised to a random sigma with the caption only (DreamBooth)",
    "offpolicy": "the teacher's predictions on states noised from the training image (the paper's off-policy"
                 " ablation)",
}
PIPELINE_MAX_SEQUENCE_LENGTH = 512  # caption tokens both pipelines encode by default (--max_sequence_length)
SAVE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # torch dtype names


class UserError(Exception):
    """A mistake the user can fix (bad path, bad data, bad flag). Printed as one line, exit status 2."""


# ---- Arguments -------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, except where there is none to show or the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or "").lower():
            return action.help  # (not `in (None, False)`: a default of 0 equals False and would be hidden)
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """A flag error is one line saying what to fix, without the usage block before it. Exit status 2, as argparse's."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """A flag type: the text as `kind` (int or float) within its bounds (open ones exclude the bound; never NaN)."""
    if low is not None and high is not None:
        rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        rule = f"{'greater than' if low_open else 'at least'} {low}"
    else:
        rule = f"{'less than' if high_open else 'at most'} {high}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'a whole number' if kind is int else 'a number'}"
                                             ) from None
        within = value == value  # False for NaN
        if low is not None:
            within = within and (value > low if low_open else value >= low)
        if high is not None:
            within = within and (value < high if high_open else value <= high)
        if not within:
            raise argparse.ArgumentTypeError(f"must be {rule} (got {text})")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


def has_visible(text):
    """Whether the text holds a character that is not a space, a control or a format one (zero-width space, BOM)."""
    return any(unicodedata.category(character)[0] not in "CZ" for character in text)


def one_line(text):
    """A flag type for a word or prompt: visible, and on one line."""
    if not has_visible(text):
        raise argparse.ArgumentTypeError("is empty or shows no visible character")
    if len(text.splitlines()) > 1:
        raise argparse.ArgumentTypeError("must be one line (it holds a line break)")
    return text.strip()


def name_list(text):
    """A flag type for comma-separated module names: at least one name; blanks around names are dropped."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one comma-separated module name")
    return ",".join(names)


MAX_RESOLUTION = 4096  # 16 MP: four times the area both families were trained at


def resolution(text):
    """A flag type for a training side: a multiple of 16 from MIN_IMAGE_SIDE to MAX_RESOLUTION."""
    value = number(int, MIN_IMAGE_SIDE, MAX_RESOLUTION)(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 (got {text})")
    return value


def parse_args(input_args=None):
    parser = ArgumentParser(description="D-OPSD LoRA training for Z-Image-Turbo and FLUX.2-klein.",
                            formatter_class=HelpFormatter)
    add_common_arguments(parser)
    group = parser.add_argument_group("LoRA")
    group.add_argument("--rank", type=number(int, 1), default=64, help="LoRA rank r.")
    group.add_argument("--lora_alpha", type=number(int, 1), default=128, help="LoRA alpha: training scales by alpha/r.")
    group.add_argument("--save_dtype", type=str, default="bf16", choices=sorted(SAVE_DTYPES),
                       help="Precision of the exported LoRA file.")
    group.add_argument("--lora_layers", type=name_list, default=None, help="Comma-separated module-name suffixes to"
                       " adapt (default: the family's attention and feed-forward projections).")
    group = parser.add_argument_group("low memory")
    group.add_argument("--offload", action="store_true", help="Keep the frozen base in host RAM, each layer brought to"
                       " the GPU while it runs.")
    parser.set_defaults(output_dir="dopsd-lora")
    args = parser.parse_args(input_args)
    check_args(parser, args)
    if args.offload:
        import torch
        if not torch.cuda.is_available():
            parser.error("--offload needs a CUDA GPU: it keeps the base in host RAM and brings each layer to the GPU;"
                         " without a GPU the run is on the CPU anyway, so drop the flag")
        if args.quantize_base == "int8":
            parser.error("--offload cannot offload --quantize_base int8: bitsandbytes' int8 layers keep their own copy"
                         " of the weights on the GPU; use --quantize_base nf4 or fp8")
        if args.compile:
            parser.error("--compile gains nothing with --offload: the hook around every offloaded layer splits each"
                         " block into one graph per layer, and most stay eager; drop --compile (off by default with"
                         " --offload)")
    return args


def add_common_arguments(parser):
    """The flags both scripts share (the README's Flags section has the detail); each script adds its own."""
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="Hub id or local folder of a"
                       f" diffusers pipeline: {' or '.join(f.name for f in MODEL_FAMILIES.values())}.")
    group.add_argument("--revision", type=str, default=None, help="Hub revision of the pipeline.")
    group.add_argument("--variant", type=str, default=None, help="Weight variant of the pipeline, e.g. fp16.")
    group.add_argument("--teacher_context", type=str, default=None,
                       choices=sorted({c for family in MODEL_FAMILIES.values() for c in family.teacher_contexts}),
                       help="What the teacher sees besides the caption. Default: "
                       + per_family("default_teacher_context") + ".")
    group.add_argument("--teacher_vlm_name_or_path", type=str, default=None, help="VLM teacher: the Qwen3-VL that"
                       " takes the text encoder as its language model (default: the one of the encoder's size).")
    group.add_argument("--teacher_vlm_rope_theta", type=str, default="text_encoder", choices=["text_encoder", "vlm"],
                       help="VLM teacher: whose RoPE base its language model keeps.")
    group.add_argument("--quantize_base", type=str, default="none", choices=list(QUANTIZATION_BACKENDS),
                       help="Store the frozen transformer's block weights quantised (QLoRA)." if TRAINING == "lora"
                       else argparse.SUPPRESS)  # full fine-tuning trains those weights: refused, not listed
    group.add_argument("--quantize_encoders", type=str, default="none", choices=["none", "int8", "nf4"],
                       help="Quantise the text encoder and teacher VLM while they compute the contexts.")
    for family in MODEL_FAMILIES.values():
        family.add_arguments(parser.add_argument_group(f"{family.name} only"))

    group = parser.add_argument_group("data")
    group.add_argument("--instance_data_dir", type=str, default=None, help="Folder of images with same-name .txt"
                       " captions or a metadata.jsonl.")
    group.add_argument("--dataset_name", type=str, default=None, help="Hugging Face dataset id or local folder.")
    group.add_argument("--dataset_config_name", type=str, default=None, help="Configuration of --dataset_name.")
    group.add_argument("--image_column", type=str, default="image", help="Dataset column with images.")
    group.add_argument("--caption_column", type=str, default=None, help="Dataset column with captions.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    group.add_argument("--instance_prompt", type=one_line, default=None, help="Caption for images that have none.")
    group.add_argument("--resolution", type=resolution, default=1024,
                       help="Training area is resolution^2 pixels, in aspect-ratio buckets.")
    group.add_argument("--max_sequence_length", type=number(int, 32, PIPELINE_MAX_SEQUENCE_LENGTH),
                       default=PIPELINE_MAX_SEQUENCE_LENGTH, help="Caption tokens the text encoder pads or cuts to.")
    group.add_argument("--repeats", type=number(int, 1), default=1, help="Visits of each image per epoch.")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="Skip unreadable or too-small images with a warning instead of stopping.")
    group.add_argument("--random_flip", action="store_true",
                       help="On a random half of the visits the teacher sees the image mirrored.")
    group.add_argument("--bucket_no_upscale", action="store_true",
                       help="Train images smaller than their bucket at their own size (kohya's option).")
    group.add_argument("--trigger_word", type=one_line, default=None, help="Word put before each caption lacking it.")

    group = parser.add_argument_group("D-OPSD")
    group.add_argument("--rollout_steps", type=number(int, 1), default=4, help="K: steps of the on-policy roll-out.")
    group.add_argument("--loss_space", type=str, default="x0", choices=["x0", "v"],
                       help="x0: match x0-predictions (released code); v: match velocities (the paper's equation).")
    group.add_argument("--objective", type=str, default="dopsd", choices=list(OBJECTIVES),
                       help="What the student learns from: D-OPSD, or a baseline.")
    group.add_argument("--ema_decay", type=number(float, 0.0, 1.0), default=0.9999,
                       help="Teacher = EMA of the student with this decay.")
    group.add_argument("--cache_contexts", action=argparse.BooleanOptionalAction, default=True,
                       help="Compute the contexts once, then free the encoders during training.")

    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, default=None, help="Where outputs, checkpoints and caches go.")
    group.add_argument("--seed", type=number(int, 0, 2**31, high_open=True), default=0, help="Random seed.")
    group.add_argument("--train_batch_size", type=number(int, 1), default=1, help="Images per device per step.")
    group.add_argument("--gradient_accumulation_steps", type=number(int, 1), default=4, help="Batches per update.")
    group.add_argument("--max_train_steps", type=number(int, 1), default=2000, help="Optimizer steps to train.")
    group.add_argument("--learning_rate", type=number(float, 0.0, low_open=True), default=None, help="LoRA default: "
                       + per_family("default_learning_rate") + "; full fine-tuning: a tenth of that.")
    group.add_argument("--scale_lr", action="store_true", help="Multiply the lr by accumulation x batch x GPUs.")
    group.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS, help="The lr schedule.")
    group.add_argument("--lr_warmup_steps", type=number(int, 0), default=0, help="Warm-up steps of the lr schedule.")
    group.add_argument("--lr_num_cycles", type=number(int, 1), default=1, help="Cycles of cosine_with_restarts.")
    group.add_argument("--lr_power", type=number(float, 0.0, low_open=True), default=1.0,
                       help="Power of the polynomial schedule.")
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    group.add_argument("--adam_beta1", type=number(float, 0.0, 1.0, high_open=True), default=0.9, help="AdamW beta1.")
    group.add_argument("--adam_beta2", type=number(float, 0.0, 1.0, high_open=True), default=0.999, help="AdamW beta2.")
    group.add_argument("--adam_weight_decay", type=number(float, 0.0), default=0.0, help="AdamW weight decay.")
    group.add_argument("--adam_epsilon", type=number(float, 0.0), default=1e-8, help="AdamW epsilon.")
    group.add_argument("--max_grad_norm", type=number(float, 0.0, low_open=True), default=1.0, help="Clipping norm.")
    group.add_argument("--max_bad_steps", type=number(int, 1), default=10,
                       help="Stop (with a checkpoint) after this many consecutive non-finite steps.")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass: far less memory, more compute.")
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Compute precision (default: accelerate launch's, else bf16 where the GPU has it).")
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere or newer GPUs.")
    group.add_argument("--attention_backend", type=str, default=None,
                       help="diffusers attention backend, e.g. flash, _flash_3, native (default: PyTorch SDPA).")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the transformer's repeated blocks (default: on with CUDA and triton).")

    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=number(int, 1), default=500, help="Checkpoint every N steps.")
    group.add_argument("--checkpoints_total_limit", type=number(int, 1), default=None, help="Newest checkpoints kept.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="Start a new run in an --output_dir that holds another run's results.")

    group = parser.add_argument_group("validation and logging")
    group.add_argument("--validation_prompt", type=str, action="append", default=None, help="Repeatable.")
    group.add_argument("--validation_steps", type=number(int, 1), default=100, help="Validate every N steps.")
    group.add_argument("--validation_inference_steps", type=number(int, 1), default=None,
                       help="Default: the family's few-step sampling, " + per_family("default_inference_steps") + ".")
    group.add_argument("--num_validation_images", type=number(int, 1), default=1, help="Images per validation prompt.")
    group.add_argument("--prior_prompts", type=str, nargs="*", default=PRIOR_PROMPTS,
                       help="Prompts without the concept, for the prior drift; the flag alone turns it off.")
    group.add_argument("--report_to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "none"],
                       help="Where to log losses and validation images.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")

    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true",
                       help="Upload the output folder (no checkpoints, caches or logs) at the end.")
    group.add_argument("--hub_model_id", type=str, default=None,
                       help="Repository: name or user/name (default: the output folder's name).")
    group.add_argument("--hub_private", action="store_true", help="Create the Hub repository as private.")


def per_family(attribute):
    """A family default for --help: "8 (Z-Image-Turbo), 4 (FLUX.2-klein)"."""
    return ", ".join(f"{getattr(family, attribute)} ({family.name})" for family in MODEL_FAMILIES.values())


def check_args(parser, args):
    """Reject inconsistent flags before anything is loaded or written (each flag's own bounds are on the flag)."""
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one of --instance_data_dir or --dataset_name")
    if os.path.isfile(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is a file; give a folder")
    data = args.instance_data_dir or args.dataset_name
    output_dir = Path(args.output_dir).resolve()
    if os.path.isdir(data) and Path(data).resolve() in (output_dir, *output_dir.parents):
        parser.error(f"--output_dir {args.output_dir} lies inside the training data {data}: the run's sample images"
                     " would become training photos; choose an --output_dir outside it")
    if args.report_to == "tensorboard" and not is_tensorboard_available():
        parser.error("--report_to tensorboard needs the tensorboard package: pip install tensorboard, or pass"
                     " --report_to none")
    if args.report_to == "wandb" and not is_wandb_available():
        parser.error("--report_to wandb needs the wandb package: pip install wandb, or pass --report_to none")
    if args.quantize_base == "fp8_compute" and not has_fp8_tensor_cores():
        parser.error("--quantize_base fp8_compute needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+:"
                     " RTX 40xx, L4, H100 or newer); use --quantize_base fp8 (weight-only) here")
    for flag in ("quantize_base", "quantize_encoders"):
        method = getattr(args, flag)
        if method != "none":
            try:
                quantization_backend(method)
            except ImportError as error:
                parser.error(f"--{flag} {method} needs {QUANTIZATION_BACKENDS[method]} ({error}); install or repair"
                             " it, or drop the flag")


# ---- Model families: everything that differs between Z-Image-Turbo and FLUX.2-klein (docs/method.md §3-§5) -----
# These come before the slow imports below (their methods use them only when called), so --help lists their flags fast.


class ModelFamily:
    """What differs between model families; the rest of the file calls only these attributes and methods. Latents
    are (batch, channels, height, width) in the scheduler's space; a context is a dict of CPU tensors for ONE sample,
    which `collate` batches for `predict`."""

    name = None
    pipeline_class_name = None  # the _class_name in the pipeline's model_index.json: this family's MODEL_FAMILIES key
    modelspec_architecture = None  # the model's name for LoRA managers (modelspec.architecture)
    hub_tags = ()
    licenses = {}  # {model name, lower case: its model card's license fields}, for when the card cannot be read
    guidance_scale = None  # what the stock pipeline is called with; the step-distilled models use no CFG
    default_inference_steps = None  # the few-step sampling the model was distilled for (validation, model card)
    default_learning_rate = None  # of a LoRA; full fine-tuning takes a tenth
    default_lora_layers = None  # comma-separated suffixes of the linear layers a LoRA adapts
    default_teacher_context = None
    teacher_contexts = ()  # which --teacher_context values the family offers
    resolution_multiple = 16

    @classmethod
    def add_arguments(cls, group):
        """The family's own flags, in its own --help group; a run may set only its own family's (apply_defaults)."""

    @classmethod
    def apply_defaults(cls, args, training):
        """Set every family default in place (the one place they are set); refuse flags of another family."""
        for other in [family for family in MODEL_FAMILIES.values() if family is not cls]:
            own_flags = argparse.ArgumentParser(add_help=False)
            other.add_arguments(own_flags)
            for flag, default in vars(own_flags.parse_args([])).items():
                if getattr(args, flag) != default:
                    raise UserError(f"--{flag} applies to {other.name} only, not to {cls.name}")
        args.teacher_context = args.teacher_context or cls.default_teacher_context
        if args.teacher_context not in cls.teacher_contexts:
            raise UserError(f"--teacher_context {args.teacher_context} is not available for {cls.name}"
                            f" (choose from {', '.join(cls.teacher_contexts)})")
        if args.teacher_vlm_rope_theta != "text_encoder" and args.teacher_context != "vlm":
            raise UserError(f"--teacher_vlm_rope_theta applies to the vlm teacher only, not to {cls.name}'s"
                            f" {args.teacher_context} teacher")
        if args.teacher_vlm_name_or_path is not None and args.teacher_context != "vlm":
            raise UserError(f"--teacher_vlm_name_or_path applies to the vlm teacher only, not to {cls.name}'s"
                            f" {args.teacher_context} teacher: add --teacher_context vlm to use that VLM, or drop it")
        if args.learning_rate is None:
            args.learning_rate = cls.default_learning_rate if training == "lora" else cls.default_learning_rate / 10
        args.validation_inference_steps = args.validation_inference_steps or cls.default_inference_steps
        if training == "lora":
            args.lora_layers = args.lora_layers or cls.default_lora_layers

    @classmethod
    def base_model_license(cls, base_model):
        """The base model's license fields: from its model card if readable, else `licenses`, else "other"."""
        from huggingface_hub import ModelCard
        readme = Path(base_model) / "README.md"
        if readme.is_file() or not (Path(base_model).exists() or hub_offline()):
            try:
                with quiet_logger("huggingface_hub"):
                    data = ModelCard.load(readme if readme.is_file() else base_model).data
                fields = {k: getattr(data, k) for k in ("license", "license_name", "license_link") if getattr(data, k)}
                if data.license:
                    return fields
            except Exception:
                pass
        return dict(cls.licenses.get(Path(base_model.rstrip("/")).name.lower(), {"license": "other"}))

    def __init__(self, args, weight_dtype, device, pipeline=None):
        """Load the pipeline without its transformer (or wrap one built in code), the text encoder straight onto the
        accelerator. The transformer loads on first use, so the host never holds two large components at once;
        until then `transformer_layout` (its modules on the meta device) stands in for it."""
        assert args.teacher_context in self.teacher_contexts, "apply_defaults(args) comes first"
        self.args = args
        self.weight_dtype = weight_dtype
        self.device = device
        self.teacher_context = args.teacher_context
        self._transformer = None
        if pipeline is None:
            quantize = args.quantize_encoders != "none"
            try:
                text_encoder = self.load_component("text_encoder", "cpu" if quantize else device)
                pipeline = self.pipeline_class.from_pretrained(
                    args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                    dtype=weight_dtype, cache_dir=args.cache_dir, transformer=None, text_encoder=text_encoder)
                transformer_class = self.component_class("transformer")
                config = transformer_class.load_config(args.pretrained_model_name_or_path, subfolder="transformer",
                                                       revision=args.revision, cache_dir=args.cache_dir)
                with torch.device("meta"):  # its modules without weights: config and layer names for the checks
                    self.transformer_layout = transformer_class.from_config(config)
            except Exception as error:
                raise UserError(f"cannot load {args.pretrained_model_name_or_path} as {self.name}: {error}") from None
            if quantize:
                quantize_linear_layers(text_encoder, args.quantize_encoders, device, weight_dtype)
        else:
            self._transformer = self.transformer_layout = pipeline.transformer
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.scheduler = self.pipeline.scheduler
        self.vlm = None
        for module in (self.pipeline.text_encoder, self.pipeline.vae):
            if module is not None:
                module.to(device).requires_grad_(False).eval()
        if args.attention_backend is not None:  # checked on the layout: a bad name fails before anything is written
            try:
                self.transformer_layout.set_attention_backend(args.attention_backend)
            except Exception as error:
                raise UserError(f"--attention_backend {args.attention_backend}: {error}") from None

    def component_class(self, name):
        """The class of one of the pipeline's components, as its model_index.json names it."""
        library, class_name = DiffusionPipeline.load_config(
            self.args.pretrained_model_name_or_path, revision=self.args.revision, cache_dir=self.args.cache_dir)[name]
        return getattr(importlib.import_module(library), class_name)

    def load_component(self, name, device):
        """One of the pipeline's models in the training dtype, read onto `device` tensor by tensor ("cpu": mmapped)."""
        args = self.args
        return self.component_class(name).from_pretrained(
            args.pretrained_model_name_or_path, subfolder=name, revision=args.revision, variant=args.variant,
            dtype=self.weight_dtype, cache_dir=args.cache_dir, device_map={"": device})

    @property
    def transformer(self):
        """The denoising transformer, loaded on first use (see load_transformer)."""
        return self._transformer if self._transformer is not None else self.load_transformer()

    def load_transformer(self, device=None):
        """Load the frozen transformer once, onto `device` (default: the accelerator; "cpu": moved layer by layer)."""
        if self._transformer is None:
            try:
                transformer = self.load_component("transformer", device or self.device)
            except Exception as error:
                raise UserError(f"cannot load the transformer of {self.args.pretrained_model_name_or_path}:"
                                f" {error}") from None
            transformer.requires_grad_(False)
            if self.args.attention_backend is not None:
                transformer.set_attention_backend(self.args.attention_backend)
            self.pipeline.register_modules(transformer=transformer)  # in its config too: save_pretrained writes it
            self._transformer = self.transformer_layout = transformer
        return self._transformer

    @property
    def pipeline_class(self):
        """The diffusers pipeline class (looked up when used: the family classes are defined before the imports)."""
        return getattr(diffusers, self.pipeline_class_name)

    def prepare_teacher_contexts(self, keep_text_encoder=False):
        """Ready the teacher's encoder once the student contexts are done: the VLM teacher's VLM is grafted onto the
        text encoder, whose rest then goes unless kept (--no-cache_contexts encodes every batch)."""
        if self.teacher_context == "vlm" and self.vlm is None:
            self.vlm = GraftedVLM(self.args.teacher_vlm_name_or_path or self.default_teacher_vlm(),
                                  self.pipeline.text_encoder, self.pipeline.tokenizer, self.weight_dtype,
                                  cache_dir=self.args.cache_dir, rope_theta=self.args.teacher_vlm_rope_theta)
            if not keep_text_encoder:
                self.pipeline.text_encoder = None
                free_memory()
            self.vlm.to(self.device, self.args.quantize_encoders)

    def default_teacher_vlm(self):
        return "Qwen/Qwen3-VL-4B-Instruct"

    def check_teacher(self):
        """Refuse a teacher that cannot work before anything is written: the VLM teacher's VLM must fit."""
        if self.teacher_context == "vlm":
            GraftedVLM.check(self.args.teacher_vlm_name_or_path or self.default_teacher_vlm(),
                             self.pipeline.text_encoder, self.pipeline.tokenizer, self.args.cache_dir)

    def free_encoders(self):
        """Drop the text encoder and VLM and park the VAE on the CPU: the loop only needs the transformer."""
        self.pipeline.text_encoder = None
        self.vlm = None
        self.pipeline.vae.to("cpu")
        free_memory()

    def context_fingerprint(self):
        """What the contexts depend on besides the example: part of every context cache file's name."""
        args = self.args
        uses_vlm = self.teacher_context == "vlm"
        return {
            "model": model_fingerprint(args.pretrained_model_name_or_path, args.revision, args.cache_dir),
            "variant": args.variant, "teacher": self.teacher_context, "dtype": str(self.weight_dtype),
            "vlm": model_fingerprint(args.teacher_vlm_name_or_path or self.default_teacher_vlm(),
                                     cache_dir=args.cache_dir) if uses_vlm else None,
            "vlm_rope_theta": args.teacher_vlm_rope_theta if uses_vlm else None,
            "quantize_encoders": args.quantize_encoders, "max_sequence_length": args.max_sequence_length,
        }

    def encode_student_context(self, caption):
        raise NotImplementedError

    def build_teacher_context(self, image, caption):
        raise NotImplementedError

    def collate(self, contexts):
        raise NotImplementedError

    def encode_target(self, image):
        """The training image as a clean latent x0 (one sample), for the objectives that noise it."""
        raise NotImplementedError

    def to_model(self, tensor):
        """A context tensor on the accelerator, floating point in the transformer's dtype (as the pipeline feeds it)."""
        return tensor.to(self.device, self.transformer.dtype if tensor.is_floating_point() else None)

    def initial_noise(self, batch_size, height, width, generator=None):
        raise NotImplementedError

    def rollout_schedule(self, num_steps, height, width, sigmas=None):
        """(timesteps, sigmas) as the pipeline sets them at this size, or shifts given `sigmas` (docs/method.md §4)."""
        raise NotImplementedError

    def training_sigmas(self, batch_size, height, width, generator=None):
        """Random noise levels for the objectives that noise the image: uniform, shifted as the pipeline's schedule."""
        uniform = torch.rand(batch_size, generator=generator, device=self.device, dtype=torch.float64)
        uniform = 1 - uniform * (1 - 1e-3)  # (0.001, 1]: never the clean image itself
        _, sigmas = self.rollout_schedule(self.default_inference_steps, height, width, sigmas=uniform.tolist())
        return sigmas[:batch_size].float()

    def predict(self, transformer, latents, timestep, context):
        """Velocity in the scheduler's convention and the pipeline's dtype: x_{k-1} = x_k + (s_{k-1} - s_k) v."""
        raise NotImplementedError

    def unnormalize(self, latents):
        """Latents in the scheduler's space -> the VAE's latent space (what output_type='latent' gives)."""
        raise NotImplementedError

    def decode(self, latents):
        vae = self.pipeline.vae
        latents = self.unnormalize(latents.to(vae.device, vae.dtype))
        return self.pipeline.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")

    def generate(self, transformer, context, height, width, num_steps, generator):
        """Images from the stock pipeline for a cached student context."""
        self.pipeline.transformer = transformer
        return self.pipeline(prompt_embeds=self.collate([context])["prompt_embeds"], height=height, width=width,
                             num_inference_steps=num_steps, guidance_scale=self.guidance_scale,
                             generator=generator).images


class ZImageTurbo(ModelFamily):
    """Z-Image-Turbo: 8-step distilled, Qwen3-4B text encoder, teacher context from a grafted Qwen3-VL."""

    name = "Z-Image-Turbo"
    pipeline_class_name = "ZImagePipeline"
    modelspec_architecture = "Z-Image"  # the name musubi-tuner and LoRA managers use
    hub_tags = ("z-image", "z-image-turbo")
    licenses = {"z-image-turbo": {"license": "apache-2.0"}}
    guidance_scale = 0.0
    default_inference_steps = 8
    default_learning_rate = 1e-4
    # The released code lost w1/w2 to a missing comma; all three feed-forward projections are meant (docs/method.md §6).
    default_lora_layers = "to_q,to_k,to_v,to_out.0,feed_forward.w1,feed_forward.w2,feed_forward.w3"
    default_teacher_context = "vlm"
    teacher_contexts = ("vlm",)

    def __init__(self, args, weight_dtype, device, pipeline=None):
        super().__init__(args, weight_dtype, device, pipeline)
        # Caption positions come first on the image's RoPE axis, so the teacher context is capped below the
        # transformer's first axis length, and at 1024 (docs/method.md §3.1).
        axis_length = self.transformer_layout.config.axes_lens[0]
        self.max_teacher_tokens = min(1024, (axis_length - 2) // 32 * 32)

    def encode_student_context(self, caption):
        embeds = self.pipeline._encode_prompt([caption], device=self.device,
                                              max_sequence_length=self.args.max_sequence_length)
        return {"prompt_embeds": embeds[0].to("cpu", self.weight_dtype)}

    def build_teacher_context(self, image, caption):
        vision, num_image_tokens = self.vlm.vision_inputs(image)
        text = self.pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": self.vlm.user_content(caption, num_image_tokens)}],
            tokenize=False, add_generation_prompt=True, enable_thinking=True)
        hidden_states, mask = self.vlm.hidden_states(text, vision)
        features = hidden_states[-2][0][mask][: self.max_teacher_tokens]
        return {"prompt_embeds": features.to("cpu", self.weight_dtype)}

    def collate(self, contexts):
        return {"prompt_embeds": [self.to_model(c["prompt_embeds"]) for c in contexts]}

    def encode_target(self, image):
        vae = self.pipeline.vae
        latents = vae.encode(image_to_tensor(image).to(vae.device, vae.dtype)).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return {"latents": latents[0].to("cpu", torch.float32)}

    def initial_noise(self, batch_size, height, width, generator=None):
        vae_scale = self.pipeline.vae_scale_factor
        shape = (batch_size, self.transformer_layout.config.in_channels, 2 * (height // (vae_scale * 2)),
                 2 * (width // (vae_scale * 2)))
        return diffusers.utils.torch_utils.randn_tensor(shape, generator=generator, device=self.device,
                                                        dtype=torch.float32)

    def rollout_schedule(self, num_steps, height, width, sigmas=None):
        vae_scale = self.pipeline.vae_scale_factor
        image_seq_len = (height // (vae_scale * 2)) * (width // (vae_scale * 2))
        config = self.scheduler.config
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        sigmas = get_default_z_image_sigmas(num_steps) if sigmas is None else sigmas
        retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        return scheduler.timesteps, scheduler.sigmas

    def predict(self, transformer, latents, timestep, context):
        # It takes t = 1 - sigma and returns the negative of the scheduler's velocity (docs/method.md §3.1).
        t = ((1000 - timestep) / 1000).expand(latents.shape[0])
        model_input = list(latents.to(self.transformer.dtype).unsqueeze(2).unbind(0))
        output = transformer(model_input, t, context["prompt_embeds"], return_dict=False)[0]
        return -torch.stack([o.float() for o in output]).squeeze(2)

    def unnormalize(self, latents):
        return latents / self.pipeline.vae.config.scaling_factor + self.pipeline.vae.config.shift_factor


class Flux2Klein(ModelFamily):
    """FLUX.2-klein 4B/9B: 4-step distilled, Qwen3 text encoder; edit (reference image) or VLM teacher."""

    name = "FLUX.2-klein"
    pipeline_class_name = "Flux2KleinPipeline"
    hub_tags = ("flux2", "flux2-klein")
    licenses = {
        "flux.2-klein-4b": {"license": "apache-2.0"},
        "flux.2-klein-9b": {"license": "other", "license_name": "flux-non-commercial-license",
                            "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B/blob/main/LICENSE.md"},
    }
    guidance_scale = 1.0  # distilled guidance: 1.0 is the pipeline's "no CFG"
    default_inference_steps = 4
    default_learning_rate = 2e-5
    # Module names that exist in diffusers' Flux2 transformer (the released code named ff.net.*, which do not).
    default_lora_layers = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,"
                           "to_qkv_mlp_proj,attn.to_out,ff.linear_in,ff.linear_out,ff_context.linear_in,"
                           "ff_context.linear_out")
    default_teacher_context = "edit"
    teacher_contexts = ("edit", "vlm")

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--teacher_prompt_suffix", type=str, default="Make the main subject (facial/ip details),"
                           " background, and overall composition consistent with the reference image.",
                           help="Edit teacher: sentence appended to the teacher's caption.")
        group.add_argument("--reference_resolution", type=resolution, default=None,
                           help="Edit teacher: encode the reference image at this area resolution^2 (default:"
                           " --resolution).")
        group.add_argument("--text_encoder_out_layers", type=int, nargs="+", default=[9, 18, 27],
                           help="Text-encoder hidden layers stacked into the prompt embedding.")

    @classmethod
    def apply_defaults(cls, args, training):
        super().apply_defaults(args, training)
        if args.reference_resolution is not None and args.teacher_context != "edit":
            raise UserError(f"--reference_resolution applies to {cls.name}'s edit teacher only, not to its"
                            f" {args.teacher_context} teacher")

    def context_fingerprint(self):
        return {**super().context_fingerprint(), "layers": self.args.text_encoder_out_layers,
                "suffix": self.args.teacher_prompt_suffix if self.teacher_context == "edit" else None,
                "reference_resolution": self.args.reference_resolution}

    @property
    def modelspec_architecture(self):
        config = self.transformer_layout.config
        return "Flux.2-klein-9b" if config.num_attention_heads * config.attention_head_dim > 3072 else "Flux.2-klein-4b"

    def default_teacher_vlm(self):
        hidden = self.pipeline.text_encoder.config.hidden_size
        return "Qwen/Qwen3-VL-8B-Instruct" if hidden >= 4096 else "Qwen/Qwen3-VL-4B-Instruct"

    def encode_caption(self, caption):
        embeds = self.pipeline._get_qwen3_prompt_embeds(
            self.pipeline.text_encoder, self.pipeline.tokenizer, [caption], dtype=self.weight_dtype,
            device=self.device, max_sequence_length=self.args.max_sequence_length,
            hidden_states_layers=tuple(self.args.text_encoder_out_layers))
        return embeds[0].to("cpu")

    def encode_student_context(self, caption):
        return {"prompt_embeds": self.encode_caption(caption)}

    def build_teacher_context(self, image, caption):
        if self.teacher_context == "vlm":
            return self.vlm_teacher_context(image, caption)
        # Edit teacher: the target as the pipeline's reference image, with the instruction suffix (docs/method.md §3.2).
        image_latents, image_latent_ids = self.pipeline.prepare_image_latents(
            [self.reference_pixels(image)], batch_size=1, generator=None, device=self.device,
            dtype=self.pipeline.vae.dtype)
        return {
            "prompt_embeds": self.encode_caption(f"{caption} {self.args.teacher_prompt_suffix}".strip()),
            "image_latents": image_latents[0].to("cpu", self.weight_dtype),
            "image_latent_ids": image_latent_ids[0].to("cpu"),
        }

    def reference_pixels(self, image):
        """The training image in [-1, 1] as the pipeline prepares an `image=` reference (at --reference_resolution)."""
        reference_height, reference_width = self.reference_size(image.height, image.width)
        if (reference_height, reference_width) != (image.height, image.width):
            image = image.resize((reference_width, reference_height), Image.Resampling.LANCZOS)
        processor = self.pipeline.image_processor
        if image.width * image.height > 1024 * 1024:
            image = processor._resize_to_target_area(image, 1024 * 1024)
        multiple = self.pipeline.vae_scale_factor * 2
        return processor.preprocess(image, height=image.height // multiple * multiple,
                                    width=image.width // multiple * multiple, resize_mode="crop")

    def reference_size(self, height, width):
        """The edit teacher's reference (height, width) for a bucket: its own, or at --reference_resolution^2 pixels."""
        if self.args.reference_resolution is None:
            return height, width
        scale = self.args.reference_resolution / math.sqrt(height * width)
        multiple = self.resolution_multiple
        return (max(multiple, round(height * scale / multiple) * multiple),
                max(multiple, round(width * scale / multiple) * multiple))

    def vlm_teacher_context(self, image, caption):
        vision, num_image_tokens = self.vlm.vision_inputs(image)
        text = self.pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": self.vlm.user_content(caption, num_image_tokens)}],
            tokenize=False, add_generation_prompt=True, enable_thinking=False)
        # Padded like the student's prompt (the caption keeps its token budget after the image tokens).
        hidden_states, _ = self.vlm.hidden_states(text, vision, self.args.max_sequence_length + num_image_tokens)
        stacked = torch.stack([hidden_states[k] for k in self.args.text_encoder_out_layers], dim=1)[0]
        return {"prompt_embeds": stacked.permute(1, 0, 2).flatten(1).to("cpu", self.weight_dtype)}

    def collate(self, contexts):
        return {key: self.to_model(torch.stack([c[key] for c in contexts])) for key in contexts[0]}

    def encode_target(self, image):
        vae = self.pipeline.vae
        latents = self.pipeline._encode_vae_image(image_to_tensor(image).to(vae.device, vae.dtype), generator=None)
        return {"latents": latents[0].to("cpu", torch.float32)}

    def initial_noise(self, batch_size, height, width, generator=None):
        vae_scale = self.pipeline.vae_scale_factor
        shape = (batch_size, self.transformer_layout.config.in_channels, height // (vae_scale * 2),
                 width // (vae_scale * 2))
        # The pipeline samples its noise in the prompt embeddings' dtype.
        return diffusers.utils.torch_utils.randn_tensor(shape, generator=generator, device=self.device,
                                                        dtype=self.weight_dtype)

    def rollout_schedule(self, num_steps, height, width, sigmas=None):
        vae_scale = self.pipeline.vae_scale_factor
        image_seq_len = (height // (vae_scale * 2)) * (width // (vae_scale * 2))
        if sigmas is None and not getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        return scheduler.timesteps, scheduler.sigmas

    def predict(self, transformer, latents, timestep, context):
        batch_size, channels, height, width = latents.shape
        tokens = self.pipeline._pack_latents(latents)
        token_ids = self.pipeline._prepare_latent_ids(latents).to(self.device)
        num_tokens = tokens.shape[1]
        if "image_latents" in context:  # edit teacher: reference tokens after the noisy ones
            tokens = torch.cat([tokens, context["image_latents"].to(tokens.dtype)], dim=1)
            token_ids = torch.cat([token_ids, context["image_latent_ids"]], dim=1)
        prompt_embeds = context["prompt_embeds"]
        output = transformer(
            hidden_states=tokens.to(self.transformer.dtype),
            timestep=timestep.expand(batch_size).to(latents.dtype) / 1000,
            guidance=None,
            encoder_hidden_states=prompt_embeds,
            txt_ids=self.pipeline._prepare_text_ids(prompt_embeds).to(self.device),
            img_ids=token_ids,
            return_dict=False,
        )[0][:, :num_tokens]
        velocity = output.permute(0, 2, 1).reshape(batch_size, channels, height, width)
        return velocity.to(self.transformer.dtype)

    def unnormalize(self, latents):
        """Patchified, batch-norm-normalised latents -> the VAE's latent space."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                              latents.dtype)
        return self.pipeline._unpatchify_latents(latents * std + mean)


# The registry: a new family is one class above and one entry here (README, "Adding a model family").
MODEL_FAMILIES = {family.pipeline_class_name: family for family in (ZImageTurbo, Flux2Klein)}


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    parse_args()  # --help answers here, before the imports below, which take seconds

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

# bitsandbytes' CPU backend warns about an optional kernel package on import; it is irrelevant here. Its int8
# matmul warns on every call that it computes in fp16, which --quantize_base int8 asks for.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def hide_broken_optional_libraries():
    """Hide bitsandbytes or torchao where installed but failing to import with other than ImportError (diffusers and
    peft would import it and break); the flags that need it say why. Returns {name: why it is hidden}."""
    broken = {}
    for name in ("bitsandbytes", "torchao"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        except Exception as error:
            broken[name] = f"it is installed but fails to import: {type(error).__name__}: " + (
                str(error).strip().splitlines() or [""])[0][:200]
            for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[module]
            sys.modules[name] = None  # `import name` now raises ImportError and find_spec finds nothing
    return broken


BROKEN_LIBRARIES = hide_broken_optional_libraries()

import diffusers  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import (DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType,  # noqa: E402
                               GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration,
                               is_tensorboard_available, is_wandb_available, set_seed)
from accelerate.utils.deepspeed import HfDeepSpeedConfig  # noqa: E402
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu  # noqa: E402
from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,  # noqa: E402
                                                           retrieve_timesteps)
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, _pack_dict_with_prefix  # noqa: E402
from diffusers.training_utils import (_collate_lora_metadata, cast_training_params, find_nearest_bucket,  # noqa: E402
                                      free_memory, generate_aspect_ratio_buckets)
from peft import LoraConfig, set_peft_model_state_dict  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.torch import load_file, save_file, save as serialize_tensors  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoConfig, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration  # noqa: E402


logger = get_logger(__name__)


# ---- What the families load with: quantised layers, the grafted teacher VLM, the pipeline's family -------------


def image_to_tensor(image):
    """PIL RGB -> (1, 3, H, W) in [-1, 1], bit-equal to diffusers' image processor (x / 255, then 2x - 1)."""
    array = 2.0 * (np.asarray(image, dtype=np.float32) / 255.0) - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def has_fp8_tensor_cores():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def quantization_backend(method):
    """The imported library that quantises with `method` (ImportError when it is missing or broken)."""
    if QUANTIZATION_BACKENDS[method] in BROKEN_LIBRARIES:
        raise ImportError(BROKEN_LIBRARIES[QUANTIZATION_BACKENDS[method]])
    if QUANTIZATION_BACKENDS[method] == "bitsandbytes":
        import bitsandbytes
        return bitsandbytes
    import torchao.quantization
    return torchao.quantization


def repeated_block_linears(model):
    """{name: nn.Linear} in the model's repeated blocks, the layers --quantize_base quantises; modulation layers stay
    in full precision (Z-Image's adaLN_modulation: benchmarks/bench_nf4_modulation.py measures why)."""
    block_types = set(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or [])
    linears = {}
    for block_name, block in model.named_modules():
        if type(block).__name__ in block_types:
            for name, module in block.named_modules():
                if type(module) is torch.nn.Linear and "adaLN_modulation" not in name:
                    linears[f"{block_name}.{name}"] = module
    return linears


def quantize_linear_layers(model, method, device, compute_dtype):
    """Quantise the frozen linears of the model's repeated blocks in place on `device`; returns how many."""
    backend = quantization_backend(method)
    linears = repeated_block_linears(model)
    if method in ("fp8", "fp8_compute"):
        config = (backend.Float8WeightOnlyConfig(set_inductor_config=False) if method == "fp8" else
                  backend.Float8DynamicActivationFloat8WeightConfig(granularity=backend.PerRow(),
                                                                    set_inductor_config=False))
        backend.quantize_(model, config, filter_fn=lambda module, name: name in linears, device=device)
        if method == "fp8_compute":
            for linear in linears.values():  # still nn.Linear, so the LoRA wraps it as before
                linear.forward = fp8_compute_forward.__get__(linear)
        return len(linears)
    for name, linear in linears.items():
        parent_name, _, child_name = name.rpartition(".")
        has_bias = linear.bias is not None
        if method == "int8":
            quantized = backend.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                                has_fp16_weights=False, threshold=6.0, device="meta")
            quantized.weight = backend.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            quantized = backend.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                              compute_dtype=compute_dtype, compress_statistics=True,
                                              quant_type="nf4", device="meta")
            quantized.weight = backend.nn.Params4bit(linear.weight.data, requires_grad=False,
                                                     compress_statistics=True, quant_type="nf4")
            # bitsandbytes' AVX512-BF16 repacking (a CPU inference speed-up) fails for narrow layers and breaks the
            # training passes: off, so every CPU computes alike.
            quantized.support_avx512bf16_for_cpu = False
        if has_bias:
            quantized.bias = linear.bias
        setattr(model.get_submodule(parent_name), child_name, quantized.to(device).requires_grad_(False))
    return len(linears)


class Float8ComputeLinear(torch.autograd.Function):
    """A frozen fp8_compute linear: forward on fp8 tensor cores; backward through the dequantised weight, since the
    LoRA layers before it need the input's gradient and torchao's fp8 matmul has no derivative."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        return grad_output @ weight.dequantize().to(grad_output.dtype), None, None


def fp8_compute_forward(linear, input):
    """The forward of an fp8_compute nn.Linear (bound to each by quantize_linear_layers)."""
    return Float8ComputeLinear.apply(input, linear.weight, linear.bias)


class GraftedVLM:
    """Qwen3-VL with the pipeline's text encoder as its language model (docs/method.md §3.1): text-only it gives the
    encoder's features exactly, so what differs in the teacher's context comes from the image tokens."""

    MIN_PIXELS, MAX_PIXELS = 512 * 512, 768 * 768

    @staticmethod
    def check(vlm_path, text_encoder, tokenizer, cache_dir=None):
        """The VLM's config if the text encoder fits it (compared on the meta device), else a UserError."""
        try:
            config = AutoConfig.from_pretrained(vlm_path, cache_dir=cache_dir)
        except Exception as error:
            raise UserError(f"cannot load the teacher VLM from {vlm_path}: {error}") from None
        if config.model_type != "qwen3_vl":
            raise UserError(f"--teacher_vlm_name_or_path {vlm_path} is a {config.model_type}, not a Qwen3-VL model")
        with torch.device("meta"):
            target = Qwen3VLForConditionalGeneration._from_config(config).model.language_model.state_dict()
            encoder = type(text_encoder)._from_config(text_encoder.config).state_dict()
        encoder = {key.removeprefix("model."): value for key, value in encoder.items()
                   if not key.startswith("lm_head.")}
        missing = sorted(set(target) - set(encoder))
        unexpected = sorted(set(encoder) - set(target))
        mismatched = sorted(k for k in set(target) & set(encoder) if target[k].shape != encoder[k].shape)
        if missing or unexpected or mismatched:
            example = (missing or unexpected or mismatched)[0]
            raise UserError(f"the teacher VLM {vlm_path} does not match the pipeline's text encoder: {len(missing)}"
                            f" missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched weights (first:"
                            f" {example}); use the Qwen3-VL whose language model has the text encoder's size (4B for"
                            " Qwen3-4B, 8B for Qwen3-8B)")
        for token, token_id in (("<|image_pad|>", config.image_token_id),
                                ("<|vision_start|>", config.vision_start_token_id),
                                ("<|vision_end|>", config.vision_end_token_id)):
            if tokenizer.convert_tokens_to_ids(token) != token_id:
                raise UserError(f"the teacher VLM's {token} id {token_id} differs from the pipeline tokenizer's")
        return config

    def __init__(self, vlm_path, text_encoder, tokenizer, dtype, cache_dir=None, rope_theta="text_encoder"):
        config = self.check(vlm_path, text_encoder, tokenizer, cache_dir)
        # The text encoder's RoPE base (1e6), which its weights were trained with: only then do text-only teacher
        # features equal the student's. rope_theta="vlm" keeps Qwen3-VL's (5e6), as the authors' graft did.
        text_rope = getattr(text_encoder.config, "rope_parameters", None) or {}
        if rope_theta == "text_encoder" and "rope_theta" in text_rope:
            config.text_config.rope_parameters["rope_theta"] = text_rope["rope_theta"]
        self.vlm = Qwen3VLForConditionalGeneration.from_pretrained(vlm_path, config=config, dtype=dtype,
                                                                   cache_dir=cache_dir)
        # The graft shares, not copies: the language model's linears become the encoder's modules (quantised ones
        # too), its other weights the encoder's tensors; its own (mmapped) and its output head are dropped unread.
        language_model, encoder = self.vlm.model.language_model, text_encoder.base_model
        for name, module in list(language_model.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(language_model.get_submodule(parent), child, encoder.get_submodule(name))
        for name, parameter in encoder.named_parameters():
            owner_name, _, parameter_name = name.rpartition(".")
            owner = language_model.get_submodule(owner_name)
            if not isinstance(owner, torch.nn.Linear):
                setattr(owner, parameter_name, parameter)
        del self.vlm.lm_head
        self.vlm.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(vlm_path, cache_dir=cache_dir)
        self.image_token_id = config.image_token_id

    def to(self, device, quantize="none"):
        """Move the VLM to `device`, its repeated blocks quantised there if asked (--quantize_encoders)."""
        if quantize != "none":
            quantize_linear_layers(self.vlm, quantize, device, self.vlm.dtype)
        self.vlm.to(device)

    def vision_inputs(self, image):
        """Pixel patches and the number of image tokens for one PIL image."""
        processed = self.image_processor(images=[image], return_tensors="pt",
                                         size={"shortest_edge": self.MIN_PIXELS, "longest_edge": self.MAX_PIXELS})
        merge = self.image_processor.merge_size
        return processed, int(processed["image_grid_thw"].prod()) // (merge * merge)

    @staticmethod
    def user_content(caption, num_image_tokens):
        """[image, caption]: the image's placeholder tokens first, then the caption (docs/method.md §3.1)."""
        return "<|vision_start|>" + "<|image_pad|>" * num_image_tokens + "<|vision_end|>" + caption

    @torch.no_grad()
    def hidden_states(self, text, vision=None, max_length=None):
        """All hidden states for one chat text; `vision` (from vision_inputs) fills its `<|image_pad|>` tokens."""
        device = self.vlm.device
        padding = {"padding": "max_length", "max_length": max_length, "truncation": True} if max_length else {}
        tokens = self.tokenizer([text], return_tensors="pt", **padding)
        input_ids, attention_mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        image_inputs = {}
        if vision is not None:
            image_inputs = {
                "pixel_values": vision["pixel_values"].to(device, self.vlm.dtype),
                "image_grid_thw": vision["image_grid_thw"].to(device),
                "mm_token_type_ids": (input_ids == self.image_token_id).int(),
            }
        output = self.vlm.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                use_cache=False, **image_inputs)
        return output.hidden_states, attention_mask[0].bool()


def hub_offline():
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set since."""
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@contextmanager
def quiet_logger(name, level=logging.ERROR):
    """Hold back a library's log records below `level` around a call whose failure the caller words in one line."""
    library_logger = logging.getLogger(name)
    previous = library_logger.level
    library_logger.setLevel(level)
    try:
        yield
    finally:
        library_logger.setLevel(previous)


def pipeline_load_error(args, error):
    """Why model_index.json could not be read, in words the user can act on (the Hub's error is the __context__)."""
    from huggingface_hub import errors
    name = args.pretrained_model_name_or_path
    path = Path(name).expanduser()
    if path.is_dir():
        return f"{name} has no model_index.json: give the folder of a diffusers pipeline (the one holding it)"
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return f"{name} does not exist: check the path"
    not_cached = (f"{name} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE): unset"
                  " HF_HUB_OFFLINE to download it, or give a local folder" if hub_offline() else
                  f"cannot reach the Hugging Face Hub to download {name} (no network?), and it is not in the local"
                  " cache")
    reasons = {  # the first class the Hub's error is an instance of (GatedRepoError is a RepositoryNotFoundError)
        errors.GatedRepoError: f"{name} is gated: accept its terms at https://huggingface.co/{name}, then log in"
                               " (`hf auth login` or HF_TOKEN)",
        errors.RepositoryNotFoundError: f"{name} is neither a local folder nor a model on the Hub: check the spelling"
                                        " (a private model also needs `hf auth login`)",
        errors.RevisionNotFoundError: f"--revision {args.revision} does not exist for {name}",
        errors.LocalEntryNotFoundError: not_cached,
        errors.EntryNotFoundError: f"{name} has no model_index.json on the Hub: it is not a diffusers pipeline",
    }
    cause = error.__context__ or error
    return next((reason for kind, reason in reasons.items() if isinstance(cause, kind)),
                f"cannot read the pipeline {name}: {first_line(error)}")


def detect_family(args):
    """The family class named by the pipeline folder's model_index.json."""
    try:
        with quiet_logger("huggingface_hub"):
            config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision,
                                                   cache_dir=args.cache_dir)
    except Exception as error:
        raise UserError(pipeline_load_error(args, error)) from None
    pipeline_class = config.get("_class_name")
    if pipeline_class not in MODEL_FAMILIES:
        supported = ", ".join(cls.name for cls in MODEL_FAMILIES.values())
        raise UserError(f"{args.pretrained_model_name_or_path} is a {pipeline_class}; D-OPSD supports {supported}")
    return MODEL_FAMILIES[pipeline_class]


# ---- Data: (image, caption) pairs in aspect-ratio buckets ------------------------------------------------------


@dataclass
class Example:
    """One (image, caption variant, mirrored or not) triple, with its own cached contexts."""

    source: str  # a file path, or "dataset:<row>"
    caption: str
    bucket: tuple  # (height, width)
    image_key: str  # hash of the decoded image
    image_index: int  # which training image (0, 1, ...)
    flip: bool = False  # the teacher sees the image mirrored left-right (--random_flip)
    load: object = field(default=None, repr=False)  # () -> PIL RGB image at its original size


class BadData(ValueError):
    """An unreadable image or caption, named in the message; --skip_bad_images skips it with a warning."""


def warn_early(message):
    """A warning from the main process, also before the Accelerator exists (the launcher's RANK then tells it)."""
    if PartialState._shared_state != {}:
        logger.warning(message)
    elif os.environ.get("RANK", "0") == "0":
        logger.logger.warning(message)


def load_rgb(image, name):
    """Any PIL image as 8-bit RGB, turned upright per its EXIF orientation, transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if image.mode == "F" and (array.min() < 0 or array.max() > 1):  # float images are in [0, 1] by convention
            array = (array - array.min()) / max(array.max() - array.min(), 1e-12)
        scale = {"F": 255.0, "I": 255.0 / max(array.max(), 1.0)}.get(image.mode, 1 / 257)
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    if min(image.size) < MIN_IMAGE_SIDE:
        raise BadData(f"{name} is only {image.size[0]}x{image.size[1]} pixels (need at least {MIN_IMAGE_SIDE})")
    return image


def read_image(open_image, name, failure):
    """open_image() as 8-bit RGB (load_rgb); an image that cannot be read is BadData("{failure}: {error}")."""
    try:
        with open_image() as image:
            image.load()
            return load_rgb(image, name)
    except BadData:
        raise
    except Exception as error:
        raise BadData(f"{failure}: {error}") from None


def read_image_file(path):
    return read_image(lambda: Image.open(path), path, f"cannot read image {path}")


def read_dataset_image(images, row, column):
    name = f"dataset row {row}"
    return read_image(lambda: images[row][column], name, f"cannot read the image of {name}")


def resize_to_bucket(image, bucket):
    """Scale to cover the bucket, then center-crop to it."""
    height, width = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def training_image(example):
    """The image exactly as the teacher sees it: in its bucket, mirrored for a flipped example."""
    image = resize_to_bucket(example.load(), example.bucket)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if example.flip else image


def choose_bucket(image, buckets, multiple, no_upscale):
    """The bucket nearest the image's aspect ratio; with no_upscale, one of its own size if it would be enlarged."""
    height, width = buckets[find_nearest_bucket(image.height, image.width, buckets)]
    if no_upscale and (height > image.height or width > image.width):
        return image.height // multiple * multiple, image.width // multiple * multiple
    return height, width


MAX_CAPTION_CHARS = 8192  # ~2000 English tokens: far above what is encoded (512 tokens; 1024 for the Z-Image teacher)


def caption_variants(value, source):
    """Caption variants from a text (one per line) or a list of texts; None when there is no caption."""
    if isinstance(value, str):
        value = value.splitlines()
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise UserError(f"{source}: a caption must be a text or a list of texts, not {value!r:.60}")
    # Each variant once (a caption file that repeats a line trains it no more often); invisible lines are no caption.
    captions = list(dict.fromkeys(line.strip() for line in value or [] if has_visible(line)))
    return captions or None


def read_caption_file(path, image_path):
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not caption text
    except UnicodeDecodeError as error:
        raise BadData(f"caption file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset"
                      f" {error.start}): save it as UTF-8") from None
    except OSError as error:
        raise BadData(f"cannot read caption file {path}: {error.strerror or error}") from None
    captions = caption_variants(text, path)
    if captions is None:
        raise BadData(f"caption file for {image_path} is empty")
    return captions


def scan_instance_data_dir(folder):
    """(path, captions reader, image loader) for every image in --instance_data_dir (hidden files are no images)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--instance_data_dir {root} does not exist or is not a folder")
    metadata = root / "metadata.jsonl"
    entries = []
    if metadata.exists():
        try:
            lines = metadata.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read {metadata} ({error}); it must be UTF-8, one JSON object a line") from None
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                path, text = root / record["file_name"], record.get("text")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{metadata}:{line_number} is not a JSON object with file_name (and text)") from None
            if not path.is_file():
                raise UserError(f"{metadata}:{line_number} names {record['file_name']}, which does not exist")
            captions = caption_variants(text, f"{metadata}:{line_number} text")
            entries.append((path, lambda captions=captions: captions))
    else:
        for path in sorted(root.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or path.is_dir():
                continue
            caption_file = path.with_suffix(".txt")
            entries.append((path, lambda path=path, caption_file=caption_file: (
                read_caption_file(caption_file, path) if caption_file.exists() else None)))
    if not entries:
        raise UserError(f"--instance_data_dir {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return [(str(path), captions, lambda path=path: read_image_file(path)) for path, captions in entries]


def scan_dataset(args):
    """(row, captions reader, image loader) for every row of a Hugging Face dataset (hub id or local folder)."""
    import datasets
    try:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir,
                                        split="train")
    except Exception as error:
        raise UserError(f"cannot load dataset {args.dataset_name}: {error}") from None
    for column in (args.image_column, args.caption_column):
        if column is not None and column not in dataset.column_names:
            raise UserError(f"dataset {args.dataset_name} has no column '{column}' (columns: "
                            f"{', '.join(dataset.column_names)}); set --image_column/--caption_column")
    if not isinstance(dataset.features[args.image_column], datasets.Image):
        image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
        raise UserError(f"dataset column '{args.image_column}' holds no images; set --image_column to"
                        f" {' or '.join(image_columns) if image_columns else 'a column of images'}")
    captions = [None] * len(dataset)
    if args.caption_column is not None:
        for row, value in enumerate(dataset[args.caption_column]):
            captions[row] = caption_variants(value, f"dataset row {row}, column '{args.caption_column}'")
    images = dataset.select_columns([args.image_column])  # reading an image decodes no other column
    return [(f"dataset:{row}", lambda row=row: captions[row],
             lambda row=row: read_dataset_image(images, row, args.image_column)) for row in range(len(dataset))]


def with_trigger_word(caption, trigger_word):
    """The caption with the trigger word in front, unless it already holds it as a word (any case)."""
    if not trigger_word or re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption, re.IGNORECASE):
        return caption
    return f"{trigger_word}, {caption}"


def collect_examples(args, resolution_multiple):
    """Scan and check the whole dataset up front: bad input stops here, before any model is loaded."""
    entries = (scan_instance_data_dir(args.instance_data_dir) if args.instance_data_dir is not None
               else scan_dataset(args))
    buckets = generate_aspect_ratio_buckets(args.resolution, divisibility=resolution_multiple)
    flips = (False, True) if args.random_flip else (False,)
    examples, long_captions = [], []
    for source, read_captions, load in entries:
        try:
            captions = read_captions()
            image = load()
        except BadData as error:
            if not args.skip_bad_images:
                raise UserError(f"{error} (pass --skip_bad_images to skip such images)") from None
            warn_early(f"skipping {source}: {error}")
            continue
        if captions is None:
            if args.instance_prompt is None:
                raise UserError(f"{source} has no caption: add a .txt caption or pass --instance_prompt")
            captions = [args.instance_prompt]
        captions = [with_trigger_word(caption, args.trigger_word) for caption in captions]
        if any(len(caption) > MAX_CAPTION_CHARS for caption in captions):
            long_captions.append(source)
            captions = [caption[:MAX_CAPTION_CHARS] for caption in captions]
        bucket = choose_bucket(image, buckets, resolution_multiple, args.bucket_no_upscale)
        image_key = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        image_index = examples[-1].image_index + 1 if examples else 0
        examples += [Example(source, caption, bucket, image_key, image_index, flip, load)
                     for caption in captions for flip in flips]
    if long_captions:
        warn_early(f"the captions of {len(long_captions)} image(s) (first: {long_captions[0]}) are longer than"
                   f" {MAX_CAPTION_CHARS} characters and were cut to that length: only their first 512 tokens"
                   " are encoded (1024 for the Z-Image teacher)")
    if not examples:
        raise UserError("no usable training images left after skipping bad ones")
    return examples


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of example indices from one bucket each, reshuffled every epoch from (seed, epoch). Each image is
    visited `repeats` times per epoch however many caption variants it has (every image weighs the same, as in the
    authors' code), each visit with one of its variants."""

    def __init__(self, examples, batch_size, repeats, seed):
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.variants = {}  # image_index -> indices of its examples
        self.groups = {}  # bucket -> image indices, each `repeats` times
        for index, example in enumerate(examples):
            if example.image_index not in self.variants:
                self.groups.setdefault(example.bucket, []).extend([example.image_index] * repeats)
            self.variants.setdefault(example.image_index, []).append(index)

    def start_epoch(self, epoch):
        # Not named set_epoch: accelerate would call that with its own per-loader iteration count, which restarts
        # at 0 for the loader of a resumed run and would change the order.
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(self.seed * 100003 + self.epoch)
        batches = []
        for bucket in sorted(self.groups):
            images = self.groups[bucket][:]
            rng.shuffle(images)
            batches += [images[i: i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        rng.shuffle(batches)
        # Variants come from a stream of their own: the visit order does not depend on how many variants there are.
        variant_rng = random.Random(f"variants {self.seed} {self.epoch}")
        yield from ([variant_rng.choice(self.variants[image]) for image in batch] for batch in batches)

    def __len__(self):
        return sum(math.ceil(len(group) / self.batch_size) for group in self.groups.values())


# ---- Contexts: student c_s (caption) and teacher c_t (caption + image), computed once per example and cached ---


CONTEXT_FORMAT_VERSION = 4  # raise it whenever the code computes or stores a context differently


def model_fingerprint(name_or_path, revision=None, cache_dir=None):
    """A model's contents without reading its weights: its files' names, sizes and times (a Hub id: those of its
    cached snapshot); anything else (a pipeline built in code) by its name."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir,
                                            local_files_only=True))
        except Exception:
            return f"{name_or_path}@{revision}"
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            stat = path.stat()
            files.append((relative.as_posix(), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha1(json.dumps(files).encode()).hexdigest()


class ContextStore(torch.utils.data.Dataset):
    """Per-example contexts in output_dir/context_cache, one file per role (student, teacher, and with `targets` the
    clean latents), named by a hash of all they depend on, so a resumed run reuses them and any change computes new
    ones. Not `enabled` (--no-cache_contexts): computed for every batch. Item i: example i's contexts and bucket."""

    def __init__(self, family, examples, accelerator, output_dir, enabled=True, targets=False):
        self.family = family
        self.examples = examples
        self.roles = ("student", "teacher", "target") if targets else ("student", "teacher")
        self.accelerator = accelerator
        self.folder = Path(output_dir) / "context_cache"
        self.enabled = enabled
        self.fingerprint = json.dumps({"format": CONTEXT_FORMAT_VERSION, **family.context_fingerprint()},
                                      sort_keys=True)

    def path(self, example, role):
        key = hashlib.sha1(f"{self.fingerprint}|{example.image_key}|{example.caption}|{example.bucket}"
                           f"|{'flipped' if example.flip else ''}".encode())
        return self.folder / f"{key.hexdigest()}.{role}.safetensors"

    @torch.no_grad()
    def compute(self, example, roles=None):
        """{role: {name: tensor}} of one example, for `roles` (default: the store's)."""
        roles = self.roles if roles is None else roles
        image = training_image(example) if set(roles) - {"student"} else None
        encode = {"student": lambda: self.family.encode_student_context(example.caption),
                  "teacher": lambda: self.family.build_teacher_context(image, example.caption),
                  "target": lambda: self.family.encode_target(image)}
        return {role: encode[role]() for role in roles}

    def fill(self):
        """Compute every missing context, each process its share: all student contexts first, then the teacher's, so
        one large encoder at a time is on the accelerator (docs/method.md §3.1)."""
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        accelerator = self.accelerator
        todo = {}  # one entry per key: duplicate photos with the same caption share their contexts
        for example in self.examples:
            lacking = [role for role in self.roles if not self.readable(self.path(example, role))]
            if lacking:
                todo[self.path(example, "student")] = example, lacking
        accelerator.wait_for_everyone()  # every process splits the same list before any of them writes
        mine = list(todo.values())[accelerator.process_index:: accelerator.num_processes]
        quiet = not accelerator.is_local_main_process
        for example, lacking in tqdm(mine, desc="caching student contexts", disable=quiet):
            self.write(example, self.compute(example, [role for role in lacking if role == "student"]))
        if mine:
            self.family.prepare_teacher_contexts()
        for example, lacking in tqdm(mine, desc="caching teacher contexts", disable=quiet):
            self.write(example, self.compute(example, [role for role in lacking if role != "student"]))
        accelerator.wait_for_everyone()
        logger.info(f"contexts cached for {len(self.examples)} examples ({len(todo)} new, computed by"
                    f" {accelerator.num_processes} process(es)) in {self.folder}")

    def write(self, example, contexts):
        """One cache file per role; a full disk stops with one line and keeps what is cached so far."""
        for role, tensors in contexts.items():
            write_output(self.path(example, role), lambda temporary: save_file(
                {k: v.contiguous() for k, v in tensors.items()}, temporary), self.folder.parent)

    @staticmethod
    def readable(path):
        """Whether a cache file holds a whole context; a damaged one is named in one warning (and computed again)."""
        if not path.exists():
            return False
        try:
            with safe_open(path, "pt"):
                return True
        except Exception as error:
            logger.warning(f"context cache file {path} is unreadable ({first_line(error)}); computing it again")
            return False

    def get(self, example):
        if not self.enabled:
            return self.compute(example)
        contexts = {}
        for role in self.roles:
            path = self.path(example, role)
            try:
                contexts[role] = load_file(path)
            except Exception as error:  # damaged during the run (the encoders are gone by now)
                raise UserError(f"context cache file {path} cannot be read ({error}): delete it and resume with"
                                " --resume_from_checkpoint latest") from None
        return contexts

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return {**self.get(self.examples[index]), "bucket": self.examples[index].bucket}


def collate_examples(items):
    """A batch: per role (student, teacher, target) the list of the items' tensors; the items' common bucket."""
    assert len({item["bucket"] for item in items}) == 1, "a batch mixes buckets"
    roles = [role for role in ("student", "teacher", "target") if role in items[0]]
    return {**{role: [item[role] for item in items] for role in roles}, "bucket": items[0]["bucket"]}


# ---- The D-OPSD step: roll out, ask the teacher, pull the student (docs/method.md §2) --------------------------


class EMATeacher:
    """The teacher's weights, theta_bar <- d * theta_bar + (1 - d) * theta after every optimizer step, as an fp32
    shadow of the student's trainable parameters that a teacher pass swaps in (docs/method.md §2.4)."""

    FILE_NAME = "ema_teacher.safetensors"

    def __init__(self, named_parameters, decay):
        self.decay = decay
        self.start(named_parameters)

    def follow(self, network):
        """Start over as the EMA of `network`'s trainable parameters (as prepared: process 0's on every process)."""
        self.start([(name, p) for name, p in network.named_parameters() if p.requires_grad])

    def start(self, named_parameters):
        named = list(named_parameters)
        self.names, self.parameters = tuple(n for n, _ in named), tuple(p for _, p in named)
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.parameters]
        self.stash = None  # the student's values while the teacher is copied in, allocated on first use

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.parameters], 1.0 - self.decay)

    @contextmanager
    def swapped_in(self):
        """Inside the block the student's parameters hold the teacher's weights: fp32 ones swap storages with the
        shadow, others (DeepSpeed's bf16) are copied via a stash. Through `.data`, which autograd does not version, so
        a student graph kept across the teacher pass passes its version check: sound, as the block runs no backward
        and the student's values are back, bit for bit, before any backward reads them."""
        if all(p.dtype == s.dtype for p, s in zip(self.parameters, self.shadow)):
            stash = [p.data for p in self.parameters]
            for parameter, shadow in zip(self.parameters, self.shadow):
                parameter.data = shadow
            try:
                yield
            finally:
                for parameter, data in zip(self.parameters, stash):
                    parameter.data = data
            return
        if self.stash is None:
            self.stash = [torch.empty_like(p) for p in self.parameters]
        with torch.no_grad():
            for parameter, shadow, stash in zip(self.parameters, self.shadow, self.stash):
                stash.copy_(parameter.data)
                parameter.data.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, stash in zip(self.parameters, self.stash):
                    parameter.data.copy_(stash)

    def save(self, folder):
        save_file({name: s.detach().cpu().contiguous() for name, s in zip(self.names, self.shadow)},
                  Path(folder) / self.FILE_NAME)

    @torch.no_grad()
    def load(self, folder):
        saved = load_file(Path(folder) / self.FILE_NAME)
        if set(saved) != set(self.names) or any(saved[n].shape != s.shape for n, s in zip(self.names, self.shadow)):
            raise UserError(f"the EMA teacher in {folder} does not fit this model/LoRA configuration")
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(saved[name])


def to_x0(latents, velocity, sigma):
    """x0-prediction of a flow-matching velocity in the scheduler's convention: x0 = x_t - sigma * v."""
    return latents.float() - sigma * velocity.float()


def dopsd_loss(student_velocity, teacher_velocity, latents, sigma, loss_space):
    """mean((f(u_s) - f(u_t))^2), f = x0-prediction (sigma^2-weighted v MSE) or identity (docs/method.md §2.2)."""
    if loss_space == "x0":
        return F.mse_loss(to_x0(latents, student_velocity, sigma), to_x0(latents, teacher_velocity, sigma))
    return F.mse_loss(student_velocity.float(), teacher_velocity.float())


def rollout_step(latents, velocity, sigma, sigma_next):
    """One Euler step exactly as FlowMatchEulerDiscreteScheduler.step computes it (fp32, back to v's dtype)."""
    return (latents.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


def dopsd_step(family, student, network, ema_teacher, batch, accelerator, rollout_steps, loss_space, generator=None,
               backward_per_step=True, objective="dopsd"):
    """One D-OPSD iteration on a batch; returns the mean loss over the K roll-out steps and the final latents.
    `network` plays both roles (the teacher while swapped in); `student` is it as prepared, for the passes with grad.

    The student's forward with grad at x_k *is* the roll-out step. Each step's loss is backpropagated at once, so
    only one step's graph is alive (docs/method.md §2.3); backward_per_step=False keeps the K graphs for one backward
    at the end, as DeepSpeed needs. "offpolicy" asks the teacher at states noised from the training image instead."""
    height, width = batch["bucket"]
    student_context = family.collate(batch["student"])
    teacher_context = family.collate(batch["teacher"])
    timesteps, sigmas = family.rollout_schedule(rollout_steps, height, width)
    latents = family.initial_noise(len(batch["student"]), height, width, generator)  # fresh noise: on-policy
    noise = latents
    clean = target_latents(batch, noise.device) if objective == "offpolicy" else None
    total_loss = torch.zeros((), device=latents.device)
    for k in range(rollout_steps):
        if objective == "offpolicy":
            latents = noised_target(clean, noise, sigmas[k])
        with torch.no_grad(), ema_teacher.swapped_in(), accelerator.autocast():
            teacher_velocity = family.predict(network, latents, timesteps[k], teacher_context)
        # Gradients of all but the last step stay local; DDP averages them once, at the last backward. (FSDP2
        # reduce-scatters every backward: local gradients would be whole, unsharded ones.)
        sync = k == rollout_steps - 1 or not backward_per_step or accelerator.is_fsdp2
        with nullcontext() if sync else accelerator.no_sync(student):
            student_velocity = family.predict(student, latents, timesteps[k], student_context)
            loss = dopsd_loss(student_velocity, teacher_velocity, latents, sigmas[k], loss_space)
            if backward_per_step:
                accelerator.backward(loss / rollout_steps)
        total_loss = total_loss + (loss.detach() if backward_per_step else loss) / rollout_steps
        latents = rollout_step(latents, student_velocity.detach(), sigmas[k], sigmas[k + 1])
    if not backward_per_step:
        accelerator.backward(total_loss)
    return total_loss.detach(), latents


def target_latents(batch, device):
    """The batch's clean training-image latents x0 (fp32)."""
    return torch.stack([target["latents"] for target in batch["target"]]).to(device, torch.float32)


def noised_target(clean, noise, sigma):
    """(1 - sigma) x0 + sigma noise, in the noise's dtype, for one sigma or one per sample."""
    sigma = sigma.view(-1, 1, 1, 1) if sigma.dim() else sigma
    return ((1 - sigma) * clean + sigma * noise.float()).to(noise.dtype)


def sft_step(family, student, batch, accelerator, generator=None):
    """One step of plain fine-tuning (--objective sft, DreamBooth's): the image noised to a random sigma, the caption
    alone as context, the target velocity noise - x0. Returns the loss."""
    height, width = batch["bucket"]
    noise = family.initial_noise(len(batch["student"]), height, width, generator)
    sigmas = family.training_sigmas(len(batch["student"]), height, width, generator)
    clean = target_latents(batch, noise.device)
    latents = noised_target(clean, noise, sigmas)
    velocity = family.predict(student, latents, sigmas * 1000, family.collate(batch["student"]))
    loss = F.mse_loss(velocity.float(), noise.float() - clean)
    accelerator.backward(loss)
    return loss.detach()


# ---- Validation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(family, transformer, context, height, width, num_steps, generator):
    """A plain few-step roll-out with any model and context (used for the teacher's view)."""
    timesteps, sigmas = family.rollout_schedule(num_steps, height, width)
    latents = family.initial_noise(1, height, width, generator)
    context = family.collate([context])
    for k in range(num_steps):
        latents = rollout_step(latents, family.predict(transformer, latents, timesteps[k], context), sigmas[k],
                               sigmas[k + 1])
    return latents


@torch.no_grad()
def heldout_teacher_gap(family, transformer, ema_teacher, batch, num_steps, seeds):
    """Mean squared x0 gap between student and teacher along the student's own roll-outs from held-out seeds."""
    height, width = batch["bucket"]
    timesteps, sigmas = family.rollout_schedule(num_steps, height, width)
    student_context, teacher_context = family.collate(batch["student"]), family.collate(batch["teacher"])
    gaps = []
    for seed in seeds:
        generator = torch.Generator(family.device).manual_seed(seed)
        latents = family.initial_noise(len(batch["student"]), height, width, generator)
        for k in range(num_steps):
            student_velocity = family.predict(transformer, latents, timesteps[k], student_context)
            with ema_teacher.swapped_in():
                teacher_velocity = family.predict(transformer, latents, timesteps[k], teacher_context)
            gaps.append(dopsd_loss(student_velocity, teacher_velocity, latents, sigmas[k], "x0"))
            latents = rollout_step(latents, student_velocity, sigmas[k], sigmas[k + 1])
    return torch.stack(gaps).mean().item()


@torch.no_grad()
def prior_samples(family, transformer, prior, args):
    """{prompt index: latents} of the validation roll-out for each prior prompt, each from its own fixed noise."""
    return {f"prompt{p}": sample(family, transformer, context, args.resolution, args.resolution,
                                 args.validation_inference_steps,
                                 torch.Generator(family.device).manual_seed(args.seed + p)).float().cpu()
            for p, (_, context) in enumerate(prior)}


PRIOR_REFERENCE_FILE = "prior_reference.safetensors"


def base_prior_samples(family, transformer, validation, args, resumed, write=True):
    """The base model's samples of the prior prompts, made before the first step and kept for resumed runs."""
    if not validation["prior"]:
        return None
    path = Path(args.output_dir) / PRIOR_REFERENCE_FILE
    key = json.dumps([[prompt for prompt, _ in validation["prior"]], args.resolution,
                      args.validation_inference_steps, args.seed])
    if path.exists():
        try:
            with safe_open(path, "pt") as file:
                if (file.metadata() or {}).get("key") == key:
                    return load_file(path)
        except Exception:
            pass
    if resumed:
        logger.warning(f"prior drift is not measured: {path} is missing, damaged or made with other prior prompts,"
                       " resolution, sampling steps or seed, and a resumed run no longer holds the base model")
        return None
    reference = prior_samples(family, transformer, validation["prior"], args)
    if write:
        write_output(path, lambda temporary: save_file(reference, temporary, metadata={"key": key}),
                     args.output_dir, optional=True)
    return reference


def prior_drift(family, transformer, validation, args):
    """Mean |x - x_base| / |x_base| of the prior prompts' sample latents from the same noise (0: unchanged)."""
    reference = validation["prior_reference"]
    current = prior_samples(family, transformer, validation["prior"], args)
    return float(np.mean([((current[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference]))


METRICS_FILE = "validation_metrics.jsonl"


def log_validation(family, transformer, ema_teacher, validation, args, accelerator, step):
    """Student images, the teacher's view of the first example, concept gap and prior drift (docs/method.md §2.6)."""
    transformer.eval()
    family.pipeline.vae.to(accelerator.device)
    samples = Path(args.output_dir) / "samples"
    # The main process writes, until a write fails (a full disk): one warning, and the run goes on without samples.
    saving = accelerator.is_main_process

    def save(image, name):
        nonlocal saving
        saving = saving and write_output(samples / name, lambda path: image.save(path, format="PNG"),
                                         args.output_dir, optional=True)

    height = width = args.resolution
    num_steps = args.validation_inference_steps
    logged = {}
    for p, (prompt, context) in enumerate(validation["prompts"]):
        generator = torch.Generator(accelerator.device).manual_seed(args.seed)
        images = []
        for _ in range(args.num_validation_images):
            images += family.generate(transformer, context, height, width, num_steps, generator)
        for i, image in enumerate(images):
            save(image, f"step-{step:06d}-prompt{p}-{i}.png")
        logged[prompt] = images
    first = validation["teacher_view"]
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    with ema_teacher.swapped_in():
        latents = sample(family, transformer, first["teacher"], *first["bucket"], num_steps, generator)
    teacher_image = family.decode(latents)[0]
    save(teacher_image, f"step-{step:06d}-teacher-view.png")
    logged[f"teacher view: {first['caption']}"] = [teacher_image]
    metrics = {"step": step, "concept_gap": heldout_teacher_gap(
        family, transformer, ema_teacher, collate_examples([first]), args.rollout_steps, seeds=range(10_000, 10_004))}
    if validation["prior_reference"] is not None:
        metrics["prior_drift"] = prior_drift(family, transformer, validation, args)
    logger.info(f"validation at step {step}: concept gap {metrics['concept_gap']:.4g} (student vs teacher on held-out"
                " noise; falls as the concept is learned)" + (f", prior drift {metrics['prior_drift']:.4f} (prior"
                " prompts vs the base model; 0 = unchanged)" if "prior_drift" in metrics else ""))

    def append(path):
        with open(path, "a") as file:
            file.write(json.dumps(metrics) + "\n")

    if accelerator.is_main_process:
        write_output(Path(args.output_dir) / METRICS_FILE, append, args.output_dir, optional=True, in_place=True)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, images in logged.items():
                tracker.writer.add_images(name, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb
            # the teacher's view has its training bucket's size: a panel of its own (one panel warns of mixed sizes)
            panels = {"validation": [], "teacher view": []}
            for name, images in logged.items():
                panel = "teacher view" if name.startswith("teacher view") else "validation"
                panels[panel] += [wandb.Image(image, caption=name) for image in images]
            tracker.log(panels, step=step)
    accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
    family.pipeline.vae.to("cpu" if args.cache_contexts else accelerator.device)
    transformer.train()
    free_memory()
    return logged, metrics


# ---- Saving and the Hub ----------------------------------------------------------------------------------------


def resolve_lora_targets(transformer, lora_layers):
    """Full names of the nn.Linear modules whose names end in one of the suffixes; each suffix must match."""
    linear_names = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    targets = []
    for suffix in lora_layers.split(","):
        matched = [name for name in linear_names if name == suffix or name.endswith("." + suffix)]
        if not matched:
            raise UserError(f"--lora_layers entry '{suffix}' matches no linear layer of this transformer")
        targets += matched
    return sorted(set(targets))


def save_lora(family, transformer, output_dir, weight_name=LORA_WEIGHT_NAME):
    """pytorch_lora_weights.safetensors in diffusers format, with the adapter config (rank, alpha) as metadata."""
    family.pipeline_class.save_lora_weights(output_dir, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                            weight_name=weight_name,
                                            **_collate_lora_metadata({"transformer": transformer}))


def export_lora(args, family, transformer, output_dir, weight_name=LORA_WEIGHT_NAME, *, num_images):
    """The final LoRA file, in --save_dtype, with one meaning in every loader: alpha / r is folded into lora_B and
    alpha recorded as r (diffusers scales by the metadata's alpha / r, ComfyUI and Forge by 1 without `.alpha`
    tensors). The header holds the keys LoRA managers read (modelspec, kohya's for the trigger word)."""
    config = transformer.peft_config["default"]
    scaling = config.lora_alpha / config.r
    dtype = getattr(torch, SAVE_DTYPES[args.save_dtype])
    state = {key: ((value.float() * scaling) if ".lora_B." in key else value).to(dtype).contiguous()
             for key, value in get_peft_model_state_dict(transformer).items()}
    adapter = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    adapter["lora_alpha"] = config.r
    header = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": hub_repo_id(args),
        "modelspec.description": f"D-OPSD LoRA (on-policy self-distillation, arXiv 2605.05204) for {family.name}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{args.resolution}x{args.resolution}",
        "modelspec.base_model": args.pretrained_model_name_or_path,
        "modelspec.training_method": "D-OPSD",
        "modelspec.network_rank": str(config.r),
        "modelspec.network_alpha": str(config.r),
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(config.r),
        "ss_base_model_version": family.modelspec_architecture,
        "ss_num_train_images": str(num_images),
    }
    usage = (f"{args.validation_inference_steps} steps, guidance {family.guidance_scale}, LoRA strength 1.0"
             f" on {family.name}")
    if args.trigger_word:
        # modelspec's trigger phrase, and where ComfyUI's LoRA managers and A1111 look for it: kohya's tag
        # frequencies ({dataset: {tag: images}}) and a trained-words list
        dataset = Path(args.instance_data_dir or args.dataset_name).name
        header["modelspec.trigger_phrase"] = args.trigger_word
        header["ss_tag_frequency"] = json.dumps({dataset: {args.trigger_word: num_images}})
        header["trained_words"] = json.dumps([args.trigger_word])
        usage = f"Trigger word: {args.trigger_word}. {usage}"
    header["modelspec.usage_hint"] = usage

    def save_with_header(tensors, filename):
        # modelspec.hash_sha256: the tensor data (the file after its header), which the header does not change
        data = serialize_tensors(tensors)
        tensor_bytes = memoryview(data)[8 + int.from_bytes(data[:8], "little"):]
        metadata = {"format": "pt", **header, "modelspec.hash_sha256": "0x" + hashlib.sha256(tensor_bytes).hexdigest(),
                    LORA_ADAPTER_METADATA_KEY: json.dumps(_pack_dict_with_prefix(adapter, "transformer"), indent=2,
                                                          sort_keys=True)}
        save_file(tensors, filename, metadata=metadata)

    family.pipeline_class.save_lora_weights(output_dir, transformer_lora_layers=state, weight_name=weight_name,
                                            save_function=save_with_header)


def card_gallery(output_dir, images):
    """Save the final validation images beside the card; the widget entries that its <Gallery /> shows."""
    widget = []
    for i, (prompt, image_list) in enumerate(images.items()):
        if prompt.startswith("teacher view"):
            continue
        name = f"image_{i}.png"
        if write_output(Path(output_dir) / name, lambda path: image_list[0].save(path, format="PNG"), output_dir,
                        optional=True):
            widget.append({"text": prompt, "output": {"url": name}})
    return widget


def metrics_table(output_dir, rows=12):
    """The card's table of the validation measures, at most `rows` evenly spread steps, or "" without any."""
    records = {}
    try:
        for line in (Path(output_dir) / METRICS_FILE).read_text().splitlines():
            record = json.loads(line)
            records[record["step"]] = record
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    steps = sorted(records)
    if not steps:
        return ""
    count = min(rows, len(steps))
    shown = sorted({steps[round(i * (len(steps) - 1) / max(count - 1, 1))] for i in range(count)})
    lines = ["## Validation measures", "",
             "Concept gap: the student's distance from the teacher (which sees the training image) on held-out noise;"
             " it falls as the concept is learned. Prior drift: how far few-step samples of prompts without the"
             " concept moved from the base model's, from the same noise (0: unchanged); growth means the concept"
             " bleeds into other prompts or the model forgets.", "",
             "| step | concept gap | prior drift |", "|---|---|---|"]
    for step in shown:
        drift = records[step].get("prior_drift")
        lines.append(f"| {step} | {records[step]['concept_gap']:.4g} | {'-' if drift is None else f'{drift:.4f}'} |")
    return "\n".join(lines) + "\n"


def hub_id(name_or_path):
    """The name if it is a Hub repository id, None for a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if Path(name_or_path).exists():
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def base_model_reference(name_or_path):
    """The base model in the card's text: a link to its Hub page; a local folder by its name, no link."""
    repo = hub_id(name_or_path)
    if repo is None:
        return f"a local pipeline folder (`{Path(name_or_path).name}`)"
    return f"[{repo}](https://huggingface.co/{repo})"


def card_prompt(args):
    """The card's example prompt: the first validation prompt, else the instance prompt, else the trigger word."""
    if args.validation_prompt:
        return args.validation_prompt[0]
    if args.instance_prompt:
        return with_trigger_word(args.instance_prompt, args.trigger_word)
    return args.trigger_word or "your prompt"


def write_model_card(args, family, description, widget, tags):
    """README.md in output_dir: the Hub's metadata (base model, license, gallery, tags), then the description."""
    from huggingface_hub import ModelCard, ModelCardData
    data = ModelCardData(library_name="diffusers", base_model=hub_id(args.pretrained_model_name_or_path),
                         instance_prompt=args.trigger_word, widget=widget or None, tags=tags,
                         **family.base_model_license(args.pretrained_model_name_or_path))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{description}")
    write_output(Path(args.output_dir) / "README.md", card.save, args.output_dir)


CARD_OBJECTIVE = {  # how the weights were trained, per --objective: the model card's "... trained with <this>"
    "dopsd": "**D-OPSD** (on-policy self-distillation, arXiv 2605.05204): the student rolled out its own {k}-step"
             " trajectories and was pulled toward an EMA teacher that also saw the training image, so the base model's"
             " few-step sampling is kept.",
    "sft": "**plain fine-tuning** (`--objective sft`: DreamBooth's flow-matching loss), the baseline D-OPSD is measured"
           " against: its few-step sampling may be weaker than a D-OPSD run's.",
    "offpolicy": "**off-policy self-distillation** (`--objective offpolicy`, the D-OPSD paper's ablation): the EMA"
                 " teacher's predictions on states noised from the training images instead of the student's own"
                 " roll-out.",
}


def save_model_card(args, family, repo_id, images):
    """README.md for the Hub: what was trained, how, and how to load it in diffusers, ComfyUI and Forge."""
    widget = card_gallery(args.output_dir, images)
    pipeline_class = family.pipeline_class.__name__
    trigger = (f"Use `{args.trigger_word}` in the prompt to trigger the concept." if args.trigger_word else
               f"Instance prompt: `{args.instance_prompt}`." if args.instance_prompt else
               "No trigger word: the captions of the training data were used.")
    weights = repo_id if "/" in repo_id else args.output_dir  # the Hub repository once its owner is known
    download = (f"[{LORA_WEIGHT_NAME}](https://huggingface.co/{repo_id}/resolve/main/{LORA_WEIGHT_NAME})"
                f" ({args.save_dtype}, rank {args.rank}), also under *Files and versions*." if weights == repo_id else
                f"`{LORA_WEIGHT_NAME}` ({args.save_dtype}, rank {args.rank}), beside this card.")
    prompt = json.dumps(card_prompt(args), ensure_ascii=False)
    if args.max_sequence_length != PIPELINE_MAX_SEQUENCE_LENGTH:  # trained on other caption lengths: sample alike
        prompt += f", max_sequence_length={args.max_sequence_length}"
    gallery = "\n<Gallery />\n" if widget else ""  # (no samples without a validation prompt)
    description = f"""
# {repo_id}: D-OPSD LoRA for {family.name}
{gallery}
## Model description

A LoRA for {base_model_reference(args.pretrained_model_name_or_path)}
trained with {CARD_OBJECTIVE[args.objective].format(k=args.rollout_steps)}

## Trigger words

{trigger}

## Download model

{download}

## Use it with diffusers

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{args.pretrained_model_name_or_path}", dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{weights}")
image = pipe({prompt}, num_inference_steps={args.validation_inference_steps},
             guidance_scale={family.guidance_scale}).images[0]
```

## Use it in ComfyUI / Forge

Put `{LORA_WEIGHT_NAME}` in `ComfyUI/models/loras/` (Forge builds that support {family.name}: `models/Lora/`) and
load it with *LoraLoaderModelOnly* (Forge: `<lora:name:1>`) on the {family.name} model at strength **1.0**. The
LoRA's alpha / rank scale is folded into its weights, so strength 1.0 applies exactly the trained change in ComfyUI,
Forge and diffusers alike.

## Training settings

| setting | value |
|---|---|
| objective | {args.objective}: {OBJECTIVES[args.objective]} |
| roll-out steps K | {args.rollout_steps} |
| teacher context | {family.teacher_context} |
| loss space | {args.loss_space} |
| EMA decay | {args.ema_decay} |
| LoRA rank / alpha (trained) | {args.rank} / {args.lora_alpha} |
| learning rate | {args.learning_rate} |
| steps x batch x accumulation | {args.max_train_steps} x {args.train_batch_size} x {args.gradient_accumulation_steps} |
| resolution | {args.resolution} |

{metrics_table(args.output_dir)}"""
    tags = ["text-to-image", "diffusers", "lora", "template:sd-lora", "d-opsd", "diffusers-training", *family.hub_tags]
    write_model_card(args, family, description, widget, tags)


HUB_IGNORE = ["checkpoint-*", "checkpoint-*/*", "context_cache/*", "logs/*", "*.tmp", ".dopsd.lock"]


def hub_repo_id(args):
    return args.hub_model_id or Path(args.output_dir).resolve().name


def push_to_hub(args, family, images):
    """Create the repository, write the card with its id (user/name) and upload; on failure print the retry command."""
    from huggingface_hub import create_repo, upload_folder
    repo_id, error = hub_repo_id(args), None
    try:
        repo_id = create_repo(repo_id, exist_ok=True, private=args.hub_private).repo_id
    except Exception as failure:
        error = failure
    save_model_card(args, family, repo_id, images)  # the card is written once, when the id is known
    if error is None:
        try:
            upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="D-OPSD training",
                          ignore_patterns=HUB_IGNORE)
            logger.info(f"uploaded to https://huggingface.co/{repo_id}")
            return True
        except Exception as failure:
            error = failure
    excludes = " ".join(f"--exclude '{p}'" for p in HUB_IGNORE)
    logger.error(f"upload to the Hub failed ({type(error).__name__}: {first_line(error)}). Your results are intact"
                 f" in {args.output_dir}. Retry with:\n  hf upload {repo_id} {args.output_dir} . {excludes}")
    return False


# ---- Run safety: atomic writes, checkpoints and resume, the output folder, signals -----------------------------


def remove_path(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first (a checkpoint-N.tmp being written is not one)."""
    return sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()),
                  key=lambda p: int(p.name.split("-", 1)[1]))


def first_line(error):
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def last_checkpoint(output_dir):
    """Where the trained weights are, in words, for messages that stop a run."""
    checkpoints = list_checkpoints(output_dir)
    return f"{checkpoints[-1].name} is the last checkpoint" if checkpoints else "no checkpoint is saved yet"


LOW_DISK_SPACE = 1 << 20  # bytes; less than this left after a failed write means the disk is full


def write_failure(error, path):
    """Why a write under `path` failed, if `error` is a failed write (full disk, quota, I/O error), else None. torch
    and safetensors raise errors without an errno: a full disk is recognised by the free space left."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if not isinstance(error, (RuntimeError, SafetensorError)):
        return None
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    if shutil.disk_usage(folder).free < LOW_DISK_SPACE:
        return "No space left on device"
    message = str(error)
    if "os error" in message:  # safetensors: "Error while serializing: I/O error: <reason> (os error N)"
        return message.rsplit("I/O error: ", 1)[-1]
    return None


def write_output(path, write, output_dir, optional=False, accelerator=None, in_place=False):
    """The one way every output is written: write(temporary) under a `.tmp` name (or `in_place`), renamed into place
    once whole, with a new file's mode. A failed write leaves nothing half-written: an `optional` output costs one
    warning (returns False), any other stops the run in one line. With `accelerator` all write, the main renames."""
    path = Path(path)
    temporary = path if in_place else path.with_name(path.name + ".tmp")
    staged = not in_place and (accelerator is None or accelerator.is_main_process)  # this process renames it
    reason = None
    try:
        if staged:
            temporary.parent.mkdir(parents=True, exist_ok=True)
            remove_path(temporary)
            temporary.touch()
            mode = temporary.stat().st_mode & 0o666
            temporary.unlink()
        if accelerator is not None:
            accelerator.wait_for_everyone()
        write(temporary)
    except BaseException as error:
        reason = write_failure(error, temporary) if isinstance(error, Exception) else None
        if reason is None:
            if staged:
                remove_path(temporary)
            raise
    if accelerator is not None and accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(float(reason is not None), device=accelerator.device), "max")
        reason = reason or ("failed on another process" if failed.item() else None)
    if reason is not None:
        if staged:
            remove_path(temporary)
        if optional:
            logger.warning(f"could not write {path} ({reason}); going on without it")
            return False
        raise UserError(f"could not write {path} ({reason}); {last_checkpoint(output_dir)}. Free disk space and rerun"
                        " with --resume_from_checkpoint latest")
    if staged:
        for file in [temporary, *temporary.rglob("*")]:
            if file.is_file() and not file.is_symlink():
                os.chmod(file, mode)
        previous = path.with_name(path.name + ".old")
        remove_path(previous)
        if path.is_dir() and not path.is_symlink():  # a folder cannot be renamed over another
            os.replace(path, previous)
        os.replace(temporary, path)
        remove_path(previous)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return True


def save_checkpoint(accelerator, output_dir, global_step, noise_generator, total_limit=None):
    """accelerate's state and the roll-out noise generator as checkpoint-N; then prune beyond `total_limit`."""
    def write(folder):
        accelerator.save_state(str(folder))
        save_file({"state": noise_generator.get_state()},
                  folder / f"rollout_noise_{accelerator.process_index}.safetensors")

    write_output(Path(output_dir) / f"checkpoint-{global_step}", write, output_dir, accelerator=accelerator)
    if accelerator.is_main_process and total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            logger.info(f"removing old checkpoint {old}")
            shutil.rmtree(old)
    logger.info(f"saved checkpoint-{global_step} in {output_dir}")


def damaged_file(folder, required=()):
    """'FILE is damaged (why)' for the first file in `folder` not whole, or a missing `required` one; None if intact.
    Cheap for tens of GB: safetensors by its header's length, zips by their central directory, JSON by parsing."""
    for name in required:
        if not (Path(folder) / name).is_file():
            return f"{Path(folder) / name} is missing"
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and "/." not in f"/{p.relative_to(folder)}"):
        try:
            if path.suffix == ".safetensors":
                with open(path, "rb") as file:
                    size = os.fstat(file.fileno()).st_size
                    length = int.from_bytes(file.read(8), "little")
                    header = json.loads(file.read(length)) if 0 < length <= size - 8 else {}
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                if not header or size != 8 + length + max(ends, default=0):
                    raise ValueError(f"{size} bytes, not the size its header gives")
            elif path.suffix in (".bin", ".pkl", ".pt"):
                zipfile.ZipFile(path).close()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, zipfile.BadZipFile) as error:
            return f"{path} is damaged ({first_line(error)})"
    return None


def find_resume_checkpoint(resume_from_checkpoint, output_dir):
    """The checkpoint folder --resume_from_checkpoint names, its files checked (None: nothing to resume). A damaged
    one is refused naming the newest intact checkpoint, which "latest" takes instead, with a warning."""
    checkpoints = list_checkpoints(output_dir)
    if resume_from_checkpoint is None or resume_from_checkpoint == "latest" and not checkpoints:
        return None
    if resume_from_checkpoint == "latest":
        path = checkpoints[-1]
    else:
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            path = Path(output_dir) / resume_from_checkpoint
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist")
    required = (EMATeacher.FILE_NAME, "rollout_noise_0.safetensors")
    damage = damaged_file(path, required)
    if damage is None:
        return path
    intact = next((c for c in reversed(checkpoints) if c != path and damaged_file(c, required) is None), None)
    if resume_from_checkpoint == "latest" and intact is not None:
        warn_early(f"{damage}: resuming from {intact.name}, the newest intact checkpoint")
        return intact
    advice = (f"{intact.name} is the newest intact checkpoint: resume with --resume_from_checkpoint {intact}" if intact
              else f"no intact checkpoint is left in {output_dir}: start over with --overwrite_output_dir")
    raise UserError(f"cannot resume from {path}: {damage}; {advice}")


def load_checkpoint(accelerator, path, noise_generator):
    """Restore what save_checkpoint wrote; a checkpoint that does not fit or is damaged is a user error."""
    try:
        accelerator.load_state(str(path))
        noise_generator.set_state(load_file(Path(path) / f"rollout_noise_{accelerator.process_index}.safetensors")
                                  ["state"])
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"cannot resume from {path} ({first_line(error)}): it is damaged or does not fit this model,"
                        " LoRA or number of processes") from None


# What a resume may change: not what the saved weights, teacher or optimizer state mean, nor where the step count puts
# the run in its data order, noise and lr schedule. Every other flag is refused, also one added later.
MAY_CHANGE_ON_RESUME = (
    "instance_data_dir", "dataset_name", "dataset_config_name", "image_column", "caption_column", "cache_dir",
    "instance_prompt", "resolution", "repeats", "skip_bad_images", "random_flip", "bucket_no_upscale", "trigger_word",
    "cache_contexts", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "max_train_steps",
    "max_bad_steps", "mixed_precision", "allow_tf32", "attention_backend", "compile", "gradient_checkpointing",
    "ema_device", "output_dir", "checkpointing_steps", "checkpoints_total_limit", "validation_prompt",
    "validation_steps", "validation_inference_steps", "num_validation_images", "prior_prompts", "report_to",
    "logging_dir", "hub_private", "save_dtype", "save_ema", "offload",
)
SETTINGS_FILE = "run_settings.json"
NOT_SETTINGS = ("resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "hub_model_id")


def run_settings(args, accelerator, family):
    """The run's flags as used (defaults resolved, local paths absolute), for checkpoints and resume."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    settings["num_processes"] = accelerator.num_processes
    settings["teacher_vlm_name_or_path"] = (  # the VLM it uses, by name: naming the default is no change
        args.teacher_vlm_name_or_path or family.default_teacher_vlm() if family.teacher_context == "vlm" else None)
    for name in ("pretrained_model_name_or_path", "teacher_vlm_name_or_path", "instance_data_dir", "dataset_name"):
        if settings.get(name) and os.path.exists(settings[name]):
            settings[name] = os.path.abspath(settings[name])
    return json.loads(json.dumps(settings))


def check_resume_settings(resume_path, settings):
    """Refuse a resume that changes what the checkpoint means (all such flags in one line); log other changes."""
    saved_file = Path(resume_path) / SETTINGS_FILE
    if not saved_file.is_file():
        logger.warning(f"{resume_path} records no settings (an older checkpoint): resuming without checking them")
        return
    saved = json.loads(saved_file.read_text())
    if saved.get("teacher_vlm_name_or_path", "") is None:  # older checkpoints recorded the default VLM as None
        saved["teacher_vlm_name_or_path"] = settings["teacher_vlm_name_or_path"]
    changed = [name for name in settings if name in saved and saved[name] != settings[name]]
    refused = [name for name in changed if name not in MAY_CHANGE_ON_RESUME]
    if refused:
        listing = ", ".join(f"--{name} {saved[name]} (now {settings[name]})" for name in refused)
        raise UserError(f"cannot resume from {resume_path}: it was trained with {listing}; resume with the"
                        " checkpoint's values, or start a new run in another --output_dir")
    if changed:
        listing = ", ".join(f"--{name} {saved[name]} -> {settings[name]}" for name in changed)
        logger.info(f"resuming with changed settings: {listing}")


RUN_RESULTS = ("pytorch_lora_weights.safetensors", "transformer", "transformer_ema")  # either script's final outputs
LOCK_FILE = ".dopsd.lock"
output_dir_locks = {}  # resolved output_dir -> the open lock file this process holds


def check_output_dir_is_free(args):
    """Refuse a new run in a folder with another run's results (overwritten outputs, another run's `latest`)."""
    if args.resume_from_checkpoint is not None:
        return
    output_dir = Path(args.output_dir)
    found = [name for name in RUN_RESULTS if (output_dir / name).exists()] + [p.name for p in
                                                                             list_checkpoints(output_dir)]
    if found and not args.overwrite_output_dir:
        raise UserError(f"--output_dir {output_dir} holds another run's results ({', '.join(found[:3])}): continue it"
                        " with --resume_from_checkpoint latest, start over with --overwrite_output_dir, or choose"
                        " another --output_dir")


def lock_output_dir(output_dir):
    """Make output_dir and hold an exclusive lock on it until the process ends (an earlier in-process run's is taken
    over), so two runs never write into one folder; writing the lock file proves the folder writable."""
    release_output_dir(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = open(Path(output_dir) / LOCK_FILE, "w")
        print(os.getpid(), file=lock, flush=True)
    except OSError as error:
        raise UserError(f"cannot write to --output_dir {output_dir}: {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"another run is using --output_dir {output_dir}: wait for it to end, or choose another"
                        " --output_dir") from None
    except OSError as error:  # a filesystem without locks (some network mounts): run unprotected, and say so
        logger.warning(f"cannot lock {lock.name} ({error.strerror}); make sure no other run uses this folder")
    output_dir_locks[Path(output_dir).resolve()] = lock


def release_output_dir(output_dir):
    lock = output_dir_locks.pop(Path(output_dir).resolve(), None)
    if lock is not None:
        lock.close()


def claim_output_dir(args, accelerator):
    """The run's first write, after every check: lock output_dir; --overwrite_output_dir deletes old checkpoints."""
    if accelerator.is_main_process:
        lock_output_dir(args.output_dir)
        if args.overwrite_output_dir and args.resume_from_checkpoint is None:
            for checkpoint in list_checkpoints(args.output_dir):
                logger.info(f"removing the previous run's {checkpoint.name} (--overwrite_output_dir)")
                shutil.rmtree(checkpoint)
    accelerator.wait_for_everyone()


def resume_command():
    """The command line that continues this run from its latest checkpoint."""
    argv = sys.argv[1:]
    if "--resume_from_checkpoint" in argv:
        index = argv.index("--resume_from_checkpoint")
        argv = argv[:index] + argv[index + 2:]
    argv = [a for a in argv if not a.startswith("--resume_from_checkpoint=")]
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"
    return shlex.join([*launcher.split(), sys.argv[0], *argv, "--resume_from_checkpoint", "latest"])


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM ending the run at once: one line (what stopped, how to go on), exit status 128 + signal."""

    def __init__(self, signum=signal.SIGINT, message="interrupted before training started; rerun the same command"
                 " (contexts cached so far are kept)"):
        super().__init__(message)
        self.signum = signum


def interrupt(signum, frame):  # outside the training loop (loading, caching, saving): stop at once
    raise Interrupted(signum)


class StopRequest:
    """In the loop, SIGINT / SIGTERM stop it after this step, with a checkpoint; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self.previous[signum])
        logger.warning(f"{signal.Signals(signum).name} received: stopping with a checkpoint after this step"
                       " (send it again to stop at once)", main_process_only=False)

    def agreed(self, accelerator):
        """True on every process once any process was asked to stop."""
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, "max").item() > 0

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---- Setup: the machine, the engine, the model family, the contexts, the student -------------------------------


def gpu_has_bf16():
    """Whether the CUDA GPU computes bf16 natively (8.0+), not emulated as on a T4 or V100."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def default_mixed_precision():
    """--mixed_precision's default: what `accelerate launch` was told, else bf16 on a GPU that has it, else fp32."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or ("bf16" if gpu_has_bf16() else "no")


def compile_by_default(device):
    """--compile's default: on where inductor generates GPU kernels (CUDA with triton); tests on CPU stay eager."""
    from torch.utils._triton import has_triton
    return device.type == "cuda" and has_triton()


def device_and_precision(accelerator):
    """The start-up line naming where the run computes and in which precision."""
    device, precision = accelerator.device, accelerator.mixed_precision
    line = f"training on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    if accelerator.num_processes > 1:
        line += f", {accelerator.num_processes} processes"
    line += " in " + {"no": "fp32", "bf16": "bf16 mixed precision",
                      "fp16": "fp16 mixed precision with a gradient scaler"}.get(precision, precision)
    if device.type == "cuda" and precision == "no":
        line += ("; --mixed_precision bf16 halves the memory" if gpu_has_bf16() else
                 "; --mixed_precision fp16 halves the memory (this GPU has no bf16)")
    return line


class ProgressBarSafeHandler(logging.StreamHandler):
    """Log lines printed above the progress bar (tqdm.write), not glued onto the end of its line."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def engine_options(args):
    """Accelerator options for the DeepSpeed or FSDP setup `accelerate launch` passes, refused where this trainer
    cannot honour it. The flags decide batch size, accumulation, clipping and precision; a DeepSpeed JSON agrees."""
    options = {"gradient_accumulation_plugin": GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps),
               "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=False)]}
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if TRAINING == "lora":
            raise UserError("FSDP is for full fine-tuning (train_dopsd_full.py); a LoRA trains with DDP or DeepSpeed"
                            " ZeRO-2 (examples/accelerate/)")
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise UserError("set fsdp_version: 2 in the accelerate config: the EMA teacher works on FSDP2's"
                            " per-parameter shards (examples/accelerate/fsdp2.yaml)")
        if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            raise UserError("set fsdp_offload_params: false: it keeps the weight shards the EMA teacher swaps on"
                            " the CPU; --ema_device cpu keeps the teacher itself off the GPU")
        if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
            raise UserError("set fsdp_activation_checkpointing: false and pass --gradient_checkpointing instead")
        for flag, given in (("--compile", args.compile), ("--use_8bit_adam", args.use_8bit_adam)):
            if given:
                raise UserError(f"{flag} is not supported with FSDP2: drop it")
        # Every backward reduce-scatters its gradients (the K roll-out steps and the accumulated micro-batches):
        # skipping the sync would hold a whole unsharded gradient on every GPU.
        options["gradient_accumulation_plugin"].sync_each_batch = True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return options
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    try:
        plugin = DeepSpeedPlugin()
        given = plugin.hf_ds_config if config_file == "none" else HfDeepSpeedConfig(config_file)  # as written
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the DeepSpeed config ({first_line(error)})") from None
    if plugin.zero_stage == 3:
        sharded = "use FSDP2 (examples/accelerate/fsdp2.yaml)" if TRAINING == "full" else "use ZeRO-2"
        raise UserError(f"DeepSpeed ZeRO-3 shards the weights the EMA teacher swaps in: {sharded}")
    if plugin.offload_param_device not in (None, "none"):
        raise UserError("DeepSpeed offload_param moves the weights the EMA teacher swaps in to the CPU: remove it"
                        " (offload_optimizer is fine)")
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    flags = {  # DeepSpeed key: (flag, the value the flag gives it)
        "train_micro_batch_size_per_gpu": ("--train_batch_size", args.train_batch_size),
        "gradient_accumulation_steps": ("--gradient_accumulation_steps", args.gradient_accumulation_steps),
        "train_batch_size": ("--train_batch_size x --gradient_accumulation_steps x processes",
                             args.train_batch_size * args.gradient_accumulation_steps * processes),
        "gradient_clipping": ("--max_grad_norm", args.max_grad_norm),
        "bf16.enabled": ("--mixed_precision", mixed_precision == "bf16"),
        "fp16.enabled": ("--mixed_precision", mixed_precision == "fp16"),
    }
    for key, (flag, value) in flags.items():
        setting = given.get_value(key)
        if setting not in (None, "auto") and setting != value and str(setting).lower() != str(value).lower():
            raise UserError(f"the DeepSpeed config sets {key} to {setting}, but {flag} gives {value}: set it to"
                            " \"auto\" (the flag then decides) or to the flag's value")
    # The flags' values, set here because accelerate would not: the DataLoader's batch_sampler hides the batch size,
    # a config without gradient_accumulation_steps gets 1, and DeepSpeed clips inside its own step.
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=args.train_batch_size,
                                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                                   gradient_clipping=args.max_grad_norm)
    options["deepspeed_plugin"] = plugin
    if "LOCAL_RANK" in os.environ and not torch.accelerator.is_available():
        # accelerate picks no process-group backend for DeepSpeed without an accelerator (each process would train
        # alone as rank 0); gloo runs it on CPU processes.
        options["kwargs_handlers"].append(InitProcessGroupKwargs(backend="gloo"))
    return options


def setup(args):
    """Check inputs, start accelerate, load the model family: bad input fails before any long work or write."""
    if args.push_to_hub:
        from huggingface_hub import get_token
        if get_token() is None:
            raise UserError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    for name in (args.pretrained_model_name_or_path, args.teacher_vlm_name_or_path):
        damage = damaged_file(name) if name and Path(name).is_dir() else None
        if damage:
            raise UserError(f"{damage}: copy or download it again")
    family_class = detect_family(args)
    family_class.apply_defaults(args, TRAINING)
    examples = collect_examples(args, family_class.resolution_multiple)
    resume_path = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    check_output_dir_is_free(args)
    args.mixed_precision = args.mixed_precision or default_mixed_precision()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=Path(args.output_dir, args.logging_dir)),
        **engine_options(args),
    )
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if launched != accelerator.num_processes:  # each process would train alone, as process 0
        raise UserError(f"{launched} processes were launched, but accelerate joined them into no process group (a"
                        " machine without GPUs?): on CPUs, launch DDP with ACCELERATE_USE_CPU=true")
    # The defaults that depend on the machine, resolved here once, before the settings are recorded: compiling is
    # on where it makes GPU kernels (not around --offload's per-layer hooks, nor on FSDP2's shards).
    if args.compile is None:
        args.compile = (compile_by_default(accelerator.device) and not getattr(args, "offload", False)
                        and not accelerator.is_fsdp2)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
                        handlers=[ProgressBarSafeHandler()])
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    transformers.utils.logging.set_verbosity(verbosity)
    diffusers.utils.logging.set_verbosity(verbosity)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info(f"no checkpoint in {args.output_dir} to resume from: starting a new run")
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cuda" and not gpu_has_bf16():
        raise UserError("this GPU has no bf16: use --mixed_precision fp16 (trained with a gradient scaler)")
    logger.info(device_and_precision(accelerator))

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    family = family_class(args, weight_dtype, accelerator.device)
    family.check_teacher()
    settings = run_settings(args, accelerator, family)
    if resume_path is not None:
        check_resume_settings(resume_path, settings)

    def save_settings_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            (Path(output_dir) / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))

    accelerator.register_save_state_pre_hook(save_settings_hook)
    return accelerator, family, examples, resume_path


def cache_contexts(args, family, examples, accelerator):
    """The validation prompts' contexts, then every example's (ContextStore.fill); then the encoders leave unless
    --no-cache_contexts computes contexts for every batch."""
    with torch.no_grad():
        prompts = [(prompt, family.encode_student_context(prompt)) for prompt in args.validation_prompt or []]
        prior = [(prompt, family.encode_student_context(prompt)) for prompt in args.prior_prompts]
    if not args.cache_contexts:
        family.prepare_teacher_contexts(keep_text_encoder=True)
    store = ContextStore(family, examples, accelerator, args.output_dir, enabled=args.cache_contexts,
                         targets=args.objective != "dopsd")
    store.fill()
    validation = {
        "prompts": prompts,
        "prior": prior,
        "prior_reference": None,  # the base model's samples of the prior prompts (base_prior_samples)
        "teacher_view": {**store.get(examples[0]), "bucket": examples[0].bucket, "caption": examples[0].caption},
    }
    if args.cache_contexts:
        family.free_encoders()
    return store, validation


def prepare_student(args, family, accelerator, lora_targets):
    """The student (loaded now, quantised or offloaded if asked, with an fp32 LoRA) and the pairs that train."""
    device = accelerator.device
    transformer = family.load_transformer("cpu" if args.quantize_base != "none" or args.offload else device)
    if args.quantize_base != "none":
        count = quantize_linear_layers(transformer, args.quantize_base, device, family.weight_dtype)
        logger.info(f"base transformer: {count} linear layers quantised to {args.quantize_base}")
    if args.offload:
        # Leaf by leaf and before the LoRA exists, so the LoRA never leaves the accelerator (hooks on whole blocks
        # would move it too, and bring blocks back from a copy taken when offloading began, undoing every update).
        cuda = device.type == "cuda"
        transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                         offload_type="leaf_level", use_stream=cuda, record_stream=cuda)
        logger.info("base transformer offloaded: its weights stay in host RAM, each layer's brought to the GPU while"
                    " it runs")
        if not args.gradient_checkpointing:
            logger.warning("--offload without --gradient_checkpointing: the student's backward keeps every layer's"
                           " weights on the GPU until it is done; add --gradient_checkpointing to save GPU memory")
    else:
        transformer.to(device)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                       target_modules=lora_targets))
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(transformer, dtype=torch.float32)
    if accelerator.native_amp:
        # Every pass runs under autocast, which computes the LoRA in bf16/fp16 whatever its input's dtype: peft's
        # cast of each input to the fp32 adapter dtype would only add a round trip through fp32.
        for module in transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    lora = [(name, p) for name, p in transformer.named_parameters() if p.requires_grad]
    for _, parameter in lora:  # peft puts the LoRA beside its base layer's weights: an offloaded one's are on the host
        parameter.data = parameter.data.to(device)
    return transformer, lora


# ---- The training loop: compiled blocks, optimizer, the D-OPSD steps, checkpoints, validation, the final outputs ---


COMPILE_CACHE_FILE = "torch-compile-cache.bin"  # beside the checkpoints: a resumed run loads it, not recompiles


def out_of_memory(error):
    """Whether `error`, or what it wraps, ran out of memory: an eager retry would not help."""
    while error is not None:
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__
    return False


class CompiledBlocks:
    """torch.compile of the transformer's repeated blocks for every pass, with dynamic shapes so buckets, contexts
    and validation sizes share one set of graphs. Compiled work that fails is done again eager after one warning,
    and the blocks stay eager (out of memory and user errors are raised). The cache is kept for resumed runs."""

    backend = "inductor"

    def __init__(self, transformer, enabled, cache_folder=None):
        self.transformer = transformer
        self.enabled = enabled
        self.graphs = 0
        self.window, self.window_noise = [], None  # the accumulation window's micro-batches, its first noise state
        self.loaded_artifacts = set()
        if enabled:
            if cache_folder is not None:
                self.load_cache(Path(cache_folder, COMPILE_CACHE_FILE))
            transformer.compile_repeated_blocks(backend=self.backend, dynamic=True)

    def fall_back(self, error):
        """After `error` in compiled work: whether an eager retry may help; if so, warn and go eager for good."""
        if not self.enabled or isinstance(error, UserError) or out_of_memory(error):
            return False
        cause = getattr(error, "inner_exception", None) or error  # what the compiler backend raised
        logger.warning(f"torch.compile failed ({type(cause).__name__}: {first_line(cause)}); going on eager from the"
                       " same state (--no-compile skips the attempt)")
        self.undo()
        return True

    def undo(self):
        """The blocks eager again, for good."""
        for module in self.transformer.modules():
            module._compiled_call_impl = None  # what nn.Module.compile set
        self.enabled = False

    def call(self, work):
        """work() (no gradients: validation, the base model's samples); done again eager if it fails compiled."""
        try:
            return work()
        except Exception as error:
            if not self.fall_back(error):
                raise
            return work()

    def micro_batch(self, step, batch, accelerator, model, noise_generator, parameters):
        """step(batch) for one micro-batch, inside accelerator.accumulate(model); returns its loss. If it fails
        compiled, the accumulation window runs again eager from its start: noise, gradients, earlier batches."""
        if not self.enabled:
            return step(batch)
        if not self.window:
            self.window_noise = noise_generator.get_state()
        self.window.append(batch)
        try:
            loss = step(batch)
        except Exception as error:
            if not self.fall_back(error):
                raise
            noise_generator.set_state(self.window_noise)
            for parameter in parameters:
                parameter.grad = None
            for earlier in self.window[:-1]:
                with accelerator.no_sync(model):
                    step(earlier)
            loss = step(batch)
        if accelerator.sync_gradients or not self.enabled:
            self.window = []
        return loss

    def log_new_graphs(self, where):
        if not self.enabled:
            return
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        if graphs > self.graphs:
            logger.info(f"torch.compile: {graphs - self.graphs} new graph(s) at {where}, {graphs} in all")
            self.graphs = graphs

    def load_cache(self, path):
        """Hand the compiler the artifacts a previous run saved at `path`; a damaged or foreign file: one warning."""
        if not path.is_file():
            return
        try:
            with quiet_logger("torch.compiler._cache", logging.CRITICAL):  # it logs a traceback for a damaged file
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception:
            info = None
        if info is None:
            logger.warning(f"{path} is damaged or was written by another torch version: compiling anew")
            return
        self.loaded_artifacts = {(kind, key) for kind, keys in info.artifacts.items() for key in keys}
        logger.info(f"torch.compile: {len(self.loaded_artifacts)} cached artifact(s) loaded from {path}")

    def save_cache(self, folder):
        """Write the compiler's artifacts to `folder`, unless they lack loaded ones (torch records only its own)."""
        if not self.enabled:
            return
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        artifacts, info = saved
        if not self.loaded_artifacts <= {(kind, key) for kind, keys in info.artifacts.items() for key in keys}:
            return
        write_output(Path(folder, COMPILE_CACHE_FILE), lambda temporary: temporary.write_bytes(artifacts), folder,
                     optional=True)


def make_optimizer(args, parameters):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
            optimizer_class = bnb.optim.AdamW8bit
        except Exception as error:
            reason = BROKEN_LIBRARIES.get("bitsandbytes", error)
            raise UserError(f"--use_8bit_adam needs a working bitsandbytes ({reason}); drop the flag") from None
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def apply_optimizer_settings(optimizer, lr_scheduler, args):
    """Give a restored optimizer this run's learning rate and Adam settings, the schedule going on from its step."""
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if not hasattr(schedule, "lr_lambdas"):  # DeepSpeed's own scheduler
        return
    previous = schedule.base_lrs[0]
    schedule.base_lrs = [args.learning_rate for _ in schedule.base_lrs]
    for group, lr_lambda in zip(optimizer.param_groups, schedule.lr_lambdas):
        group.update(initial_lr=args.learning_rate, lr=args.learning_rate * lr_lambda(schedule.last_epoch),
                     betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                     weight_decay=args.adam_weight_decay)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    if previous != args.learning_rate:
        logger.info(f"learning rate {previous} -> {args.learning_rate} from the resumed step on")


def epoch_batches(dataloader, batch_sampler, accelerator, first_epoch, num_epochs, skip_batches):
    """Training batches from `first_epoch` on, without the `skip_batches` a resumed run has already trained on."""
    for epoch in range(first_epoch, num_epochs):
        batch_sampler.start_epoch(epoch)
        if epoch == first_epoch and skip_batches:
            yield from accelerator.skip_first_batches(dataloader, skip_batches)
        else:
            yield from dataloader


def optimizer_step(accelerator, optimizer, lr_scheduler, parameters, max_grad_norm, loss):
    """Clip and step. A step whose loss or gradients are not finite is skipped; returns whether it was applied."""
    applied = True
    if accelerator.sync_gradients and accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed has clipped and stepped inside accelerator.backward (the calls below do nothing), skipping a
        # non-finite step; fp16's overflow skips are its loss scaler's business, as under DDP.
        applied = accelerator.mixed_precision == "fp16" or not optimizer.step_was_skipped
    elif accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
        if grad_norm is not None and accelerator.scaler is None:  # fp16's scaler skips overflowing steps itself
            if not (math.isfinite(float(grad_norm)) and math.isfinite(loss.item())):
                optimizer.zero_grad(set_to_none=True)
                return False
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return applied


def train(args, accelerator, family, transformer, optimizer, ema_teacher, examples, store, validation, resume_path,
          project_name):
    """The D-OPSD loop with checkpoints and validation; returns the prepared transformer and last validation images."""
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    batch_sampler = BucketBatchSampler(examples, args.train_batch_size, args.repeats, args.seed)
    dataloader = torch.utils.data.DataLoader(store, batch_sampler=batch_sampler, collate_fn=collate_examples)
    # An offloaded base (--offload) is placed layer by layer by its hooks: accelerate must not move it as a whole.
    placement = [False, None, None, None] if getattr(args, "offload", False) else None
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, dataloader,
                                                                           lr_scheduler, device_placement=placement)
    network = accelerator.unwrap_model(transformer)  # both roles, the teacher's passes and the validation images
    trainable = [p for p in transformer.parameters() if p.requires_grad]  # FSDP2 replaces them while preparing
    ema_teacher.follow(network)
    compiled = CompiledBlocks(network, args.compile, args.output_dir)
    backward_per_step = accelerator.distributed_type != DistributedType.DEEPSPEED

    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}

        def start_trackers(path):  # wandb's run folder goes here too, not into the current directory
            path.mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers(project_name, config=config, init_kwargs={"wandb": {"dir": str(path)}})

        if not write_output(Path(args.output_dir, args.logging_dir), start_trackers, args.output_dir, optional=True,
                            in_place=True):
            accelerator.trackers = []

    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    # Roll-out noise has its own generator, saved in every checkpoint, so a resumed run draws the same noise.
    noise_generator = torch.Generator(accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
    global_step = 0
    if resume_path is not None:
        logger.info(f"resuming from {resume_path}")
        load_checkpoint(accelerator, resume_path, noise_generator)
        apply_optimizer_settings(optimizer, lr_scheduler, args)
        global_step = int(resume_path.name.split("-")[1])
        if global_step >= args.max_train_steps:
            logger.info(f"{resume_path.name} is at step {global_step} of --max_train_steps {args.max_train_steps}:"
                        " nothing left to train; writing the outputs from it")
            return transformer, {}
    batches = epoch_batches(dataloader, batch_sampler, accelerator, global_step // updates_per_epoch, num_epochs,
                            (global_step % updates_per_epoch) * args.gradient_accumulation_steps)

    logger.info(f"{family.name}: {len(examples)} examples, {args.max_train_steps} steps, objective={args.objective},"
                f" K={args.rollout_steps}, teacher={family.teacher_context}, loss={args.loss_space},"
                f" lr={args.learning_rate}")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)

    def checkpoint():
        save_checkpoint(accelerator, args.output_dir, global_step, noise_generator, args.checkpoints_total_limit)
        if accelerator.is_main_process:
            compiled.save_cache(args.output_dir)

    def step(batch):
        if args.objective == "sft":
            return sft_step(family, transformer, batch, accelerator, noise_generator)
        loss, _ = dopsd_step(family, transformer, network, ema_teacher, batch, accelerator, args.rollout_steps,
                             args.loss_space, noise_generator, backward_per_step, args.objective)
        return loss

    # Validation runs on the main process; under FSDP2 on every process (each forward gathers the weights from all
    # of them), and the main one writes.
    validating = accelerator.is_main_process or accelerator.is_fsdp2
    if validating:
        network.eval()
        validation["prior_reference"] = compiled.call(lambda: base_prior_samples(
            family, network, validation, args, resumed=resume_path is not None, write=accelerator.is_main_process))
    transformer.train()
    images, bad_steps, stop = {}, 0, StopRequest()
    try:
        for batch in batches:
            with accelerator.accumulate(transformer):
                loss = compiled.micro_batch(step, batch, accelerator, transformer, noise_generator, trainable)
                compiled.log_new_graphs(f"step {global_step + 1} (bucket {batch['bucket'][0]}x{batch['bucket'][1]})")
                applied = optimizer_step(accelerator, optimizer, lr_scheduler, trainable, args.max_grad_norm, loss)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if applied:
                ema_teacher.update()
                bad_steps = 0
                logs = {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
                progress.set_postfix(**logs)
                accelerator.log(logs, step=global_step)
            else:
                bad_steps += 1
                logger.warning(f"step {global_step}: non-finite loss or gradients (loss {loss.item()}); the update"
                               f" was skipped ({bad_steps} in a row)")
            last = global_step >= args.max_train_steps
            if global_step % args.checkpointing_steps == 0 or last or bad_steps >= args.max_bad_steps:
                checkpoint()
            if bad_steps >= args.max_bad_steps:
                raise UserError(f"stopped at step {global_step} after {bad_steps} consecutive non-finite steps:"
                                " lower --learning_rate, or use --mixed_precision bf16 instead of fp16."
                                f" checkpoint-{global_step} holds the last good weights")
            if validating and (global_step % args.validation_steps == 0 or last):
                images, _ = compiled.call(lambda: log_validation(family, network, ema_teacher, validation, args,
                                                                 accelerator, global_step))
                compiled.log_new_graphs(f"validation at step {global_step}")
            if last:
                break
            if stop.agreed(accelerator):
                if global_step % args.checkpointing_steps:
                    checkpoint()
                logger.warning(f"stopped at step {global_step}; checkpoint-{global_step} is saved. To continue:\n"
                               f"  {resume_command()}")
                accelerator.end_training()
                sys.exit(0)
    except KeyboardInterrupt as error:  # a second signal: at once
        raise Interrupted(getattr(error, "signum", signal.SIGINT), f"interrupted at step {global_step};"
                          f" {last_checkpoint(args.output_dir)}. To continue: {resume_command()}") from None
    finally:
        progress.close()
        stop.restore()
    accelerator.wait_for_everyone()
    return transformer, images


def finish(args, accelerator, family, images, save_outputs):
    """Write the final outputs and the model card on the main process and push them; exit 1 if the upload failed."""
    uploaded = True
    if accelerator.is_main_process:
        try:
            save_outputs()
            if args.push_to_hub:
                uploaded = push_to_hub(args, family, images)
            else:
                save_model_card(args, family, hub_repo_id(args), images)
        except KeyboardInterrupt as error:
            raise Interrupted(getattr(error, "signum", signal.SIGINT), "interrupted while writing the outputs"
                              f" (none is half-written); {last_checkpoint(args.output_dir)}. To write them:"
                              f" {resume_command()}") from None
        release_output_dir(args.output_dir)
    accelerator.end_training()
    if not uploaded:
        sys.exit(1)


# ---- main ------------------------------------------------------------------------------------------------------


def main(args):
    """Train a LoRA with D-OPSD; returns the trained transformer (with its LoRA)."""
    accelerator, family, examples, resume_path = setup(args)
    lora_targets = resolve_lora_targets(family.transformer_layout, args.lora_layers)  # a bad --lora_layers fails now
    if args.offload and accelerator.num_processes > 1:
        raise UserError("--offload is for one GPU: DDP and DeepSpeed expect every weight of the model on the GPU"
                        " (they synchronise them across processes), and --offload keeps the base's in host RAM; train"
                        " on one GPU, or drop --offload")
    claim_output_dir(args, accelerator)
    store, validation = cache_contexts(args, family, examples, accelerator)

    # The student: a LoRA on the transformer. The teacher: the EMA of that LoRA, taken from the prepared student in
    # train() (docs/method.md §2.4).
    transformer, lora = prepare_student(args, family, accelerator, lora_targets)
    ema_teacher = EMATeacher((), args.ema_decay)
    logger.info(f"LoRA on {len(lora_targets)} layers: {sum(p.numel() for _, p in lora) / 1e6:.2f} M parameters")

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_lora(family, accelerator.unwrap_model(model), output_dir)
                if weights:  # empty under DeepSpeed, which saves the engine itself
                    weights.pop()
            ema_teacher.save(output_dir)

    def load_model_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            state = family.pipeline_class.lora_state_dict(input_dir)
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            incompatible = set_peft_model_state_dict(model, state, adapter_name="default")
            if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
                raise UserError(f"checkpoint {input_dir} does not fit this model/LoRA configuration")
            if accelerator.mixed_precision in ("fp16", "bf16"):
                cast_training_params(model, dtype=torch.float32)
        ema_teacher.load(input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = make_optimizer(args, [p for _, p in lora])
    transformer, images = train(args, accelerator, family, transformer, optimizer, ema_teacher, examples, store,
                                validation, resume_path, "dopsd-lora")

    def save_outputs():
        write_output(Path(args.output_dir) / LORA_WEIGHT_NAME, lambda path: export_lora(
            args, family, accelerator.unwrap_model(transformer), path.parent, path.name,
            num_images=examples[-1].image_index + 1), args.output_dir)
        logger.info(f"saved {Path(args.output_dir) / LORA_WEIGHT_NAME}")

    finish(args, accelerator, family, images, save_outputs)
    return accelerator.unwrap_model(transformer)


def run():
    # SIGTERM (a notebook's stop button, preemption) acts as Ctrl-C in every phase; the loop stops with a checkpoint.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        main(parse_args())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:
        print(f"error: {error if isinstance(error, Interrupted) else Interrupted()}", file=sys.stderr)
        sys.exit(128 + getattr(error, "signum", signal.SIGINT))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    run()
