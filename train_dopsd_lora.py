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
D-OPSD step -> validation -> saving/Hub -> main. Everything that differs between model families lives in one
small class per family; the rest of the file only calls its methods.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# bitsandbytes' CPU backend warns about an optional kernel package on import; it is irrelevant here. Its int8
# matmul warns on every call that it computes in fp16, which --quantize_base int8 asks for.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

import diffusers  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, set_seed  # noqa: E402
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, ZImagePipeline  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu  # noqa: E402
from diffusers.pipelines.z_image.pipeline_z_image import (  # noqa: E402
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)
from diffusers.training_utils import (  # noqa: E402
    _collate_lora_metadata,
    cast_training_params,
    find_nearest_bucket,
    free_memory,
    generate_aspect_ratio_buckets,
)
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card  # noqa: E402
from peft import LoraConfig, set_peft_model_state_dict  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoConfig, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration  # noqa: E402


logger = get_logger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
MIN_IMAGE_SIDE = 64  # smaller photos carry too little detail for a ~1 MP teacher context
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class UserError(Exception):
    """A mistake the user can fix (bad path, bad data, bad flag). Printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="D-OPSD LoRA training for Z-Image-Turbo and FLUX.2-klein.")
    add_common_arguments(parser)

    group = parser.add_argument_group("LoRA")
    group.add_argument("--rank", type=int, default=64)
    group.add_argument("--lora_alpha", type=int, default=128)
    group.add_argument("--lora_layers", type=str, default=None, help="Comma-separated module-name suffixes to adapt"
                       " (default: the family's attention and feed-forward projections).")

    parser.set_defaults(output_dir="dopsd-lora")

    args = parser.parse_args(input_args)
    check_args(parser, args)
    if args.rank < 1:
        parser.error(f"--rank must be at least 1 (got {args.rank})")
    return args


def add_common_arguments(parser):
    """The flags both D-OPSD scripts share; each script adds its own (LoRA, full fine-tuning)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a Z-Image-Turbo or FLUX.2-klein diffusers pipeline.",
    )
    group.add_argument("--revision", type=str, default=None, help="Hub revision of the pipeline.")
    group.add_argument("--variant", type=str, default=None, help="Weight variant of the pipeline, e.g. fp16.")
    group.add_argument(
        "--teacher_context",
        type=str,
        default=None,
        choices=["vlm", "edit"],
        help="What the teacher sees besides the caption. vlm: Qwen3-VL features of [image, caption] (Z-Image's only"
        " option). edit: the image's VAE tokens appended as a reference image (FLUX.2-klein's default).",
    )
    group.add_argument(
        "--teacher_vlm_name_or_path",
        type=str,
        default=None,
        help="Qwen3-VL whose language model is replaced by the pipeline's text encoder (default: Qwen3-VL-4B-Instruct;"
        " Qwen3-VL-8B-Instruct for FLUX.2-klein-9B).",
    )
    group.add_argument(
        "--teacher_prompt_suffix",
        type=str,
        default="Make the main subject (facial/ip details), background, and overall composition consistent with the"
        " reference image.",
        help="FLUX.2-klein edit teacher: sentence appended to the teacher's caption.",
    )
    group.add_argument(
        "--quantize_base",
        type=str,
        default="none",
        choices=list(QUANTIZATION_BACKENDS),
        help="Store the frozen transformer's block weights quantised (the LoRA stays full precision and trains as"
        " usual): int8 (bitsandbytes LLM.int8), nf4 (bitsandbytes 4-bit, QLoRA), fp8 (torchao float8 weight-only).",
    )
    group.add_argument(
        "--quantize_encoders",
        type=str,
        default="none",
        choices=["none", "int8", "nf4"],
        help="Quantise the text encoder and teacher VLM while they compute the contexts (for small cards); the"
        " contexts then differ slightly from full-precision ones.",
    )
    group.add_argument(
        "--text_encoder_out_layers",
        type=int,
        nargs="+",
        default=[9, 18, 27],
        help="FLUX.2-klein: text-encoder hidden layers stacked into the prompt embedding (the pipeline's default).",
    )

    group = parser.add_argument_group("data")
    group.add_argument("--instance_data_dir", type=str, default=None, help="Folder of images with same-name .txt"
                       " captions (one caption variant per line) or a metadata.jsonl with file_name/text.")
    group.add_argument("--dataset_name", type=str, default=None, help="Hugging Face dataset id or local folder.")
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--image_column", type=str, default="image")
    group.add_argument("--caption_column", type=str, default=None, help="Dataset column with captions.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    group.add_argument("--instance_prompt", type=str, default=None, help="Caption for images that have none.")
    group.add_argument("--resolution", type=int, default=1024, help="Training area is resolution^2 pixels, in"
                       " aspect-ratio buckets.")
    group.add_argument("--repeats", type=int, default=1, help="How many times each image is repeated per epoch.")
    group.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable or too-small images with a"
                       " warning instead of stopping.")

    group = parser.add_argument_group("D-OPSD")
    group.add_argument("--rollout_steps", type=int, default=4, help="K: steps of the student's on-policy roll-out,"
                       " on the inference schedule for K steps.")
    group.add_argument("--loss_space", type=str, default="x0", choices=["x0", "v"], help="x0: match x0-predictions"
                       " (released code; sigma^2-weighted velocity MSE). v: match velocities (the paper's equation).")
    group.add_argument("--ema_decay", type=float, default=0.9999, help="Teacher = EMA of the student with this decay"
                       " (1.0 keeps the teacher frozen at the base model).")
    group.add_argument("--cache_contexts", action=argparse.BooleanOptionalAction, default=True, help="Compute the"
                       " student and teacher contexts once, then free the text encoder, VLM and VAE from the"
                       " accelerator during training.")

    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, default=None, help="Where outputs, checkpoints and caches go.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--train_batch_size", type=int, default=1)
    group.add_argument("--gradient_accumulation_steps", type=int, default=4)
    group.add_argument("--max_train_steps", type=int, default=2000)
    group.add_argument("--learning_rate", type=float, default=None, help="LoRA default: 1e-4 (Z-Image), 2e-5"
                       " (FLUX.2-klein); full fine-tuning: a tenth of that.")
    group.add_argument("--scale_lr", action="store_true", help="Multiply the learning rate by accumulation x"
                       " batch x GPUs.")
    group.add_argument("--lr_scheduler", type=str, default="constant", help="linear, cosine, cosine_with_restarts,"
                       " polynomial, constant or constant_with_warmup.")
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--lr_num_cycles", type=int, default=1)
    group.add_argument("--lr_power", type=float, default=1.0)
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--max_bad_steps", type=int, default=10, help="Stop (with a checkpoint) after this many"
                       " consecutive steps with non-finite loss or gradients; each one is skipped.")
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    group.add_argument("--allow_tf32", action="store_true")
    group.add_argument("--attention_backend", type=str, default=None, help="diffusers attention backend, e.g."
                       " flash, _flash_3, native (default: PyTorch SDPA).")
    group.add_argument("--compile", action="store_true", help="torch.compile the transformer's repeated blocks"
                       " (the teacher's weight swap does not cause recompiles).")

    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')

    group = parser.add_argument_group("validation and logging")
    group.add_argument("--validation_prompt", type=str, action="append", default=None, help="Repeatable.")
    group.add_argument("--validation_steps", type=int, default=100)
    group.add_argument("--validation_inference_steps", type=int, default=None, help="Default: 8 (Z-Image-Turbo),"
                       " 4 (FLUX.2-klein).")
    group.add_argument("--num_validation_images", type=int, default=1)
    group.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb" or "none".')
    group.add_argument("--logging_dir", type=str, default="logs")

    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repository name (default: output folder name).")


def check_args(parser, args):
    """Reject inconsistent flags before anything is loaded or written."""
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one of --instance_data_dir or --dataset_name")
    if args.rollout_steps < 1:
        parser.error(f"--rollout_steps must be at least 1 (got {args.rollout_steps})")
    if not 0.0 <= args.ema_decay <= 1.0:
        parser.error(f"--ema_decay must lie in [0, 1] (got {args.ema_decay})")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "repeats", "max_bad_steps",
                 "checkpointing_steps", "validation_steps", "num_validation_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.validation_inference_steps is not None and args.validation_inference_steps < 1:
        parser.error("--validation_inference_steps must be at least 1")
    if args.resolution < MIN_IMAGE_SIDE:
        parser.error(f"--resolution {args.resolution} is too small: use at least {MIN_IMAGE_SIDE}")
    if os.path.isfile(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} is a file; give a folder")
    for flag in ("quantize_base", "quantize_encoders"):
        method = getattr(args, flag)
        if method != "none":
            try:
                quantization_backend(method)
            except ImportError as error:
                parser.error(f"--{flag} {method} needs {QUANTIZATION_BACKENDS[method]} ({error}); install it or"
                             f" drop the flag")


# ----------------------------------------------------------------------------------------------------------------
# Model families: everything that differs between Z-Image-Turbo and FLUX.2-klein (SPEC §3-§5)
# ----------------------------------------------------------------------------------------------------------------


def image_to_tensor(image):
    """PIL RGB -> float tensor (1, 3, H, W) in [-1, 1], the VAE's input convention."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


# What stores the quantised weights. All three keep the matmul in the activations' dtype (weight-only for fp8),
# so they run on any CUDA card and on the CPU; LoRA layers wrap the quantised linears unchanged.
QUANTIZATION_BACKENDS = {"none": None, "int8": "bitsandbytes", "nf4": "bitsandbytes", "fp8": "torchao"}


def quantization_backend(method):
    """The imported library that quantises with `method` (ImportError when it is missing)."""
    if QUANTIZATION_BACKENDS[method] == "bitsandbytes":
        import bitsandbytes

        return bitsandbytes
    import torchao.quantization

    return torchao.quantization


def repeated_block_linears(model):
    """{name: nn.Linear} inside the model's repeated blocks (diffusers' _repeated_blocks, transformers'
    _no_split_modules). Embedders, final layers and norms outside them stay in full precision."""
    block_types = set(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or [])
    linears = {}
    for block_name, block in model.named_modules():
        if type(block).__name__ in block_types:
            for name, module in block.named_modules():
                if type(module) is torch.nn.Linear:
                    linears[f"{block_name}.{name}"] = module
    return linears


def quantize_linear_layers(model, method, device, compute_dtype):
    """Quantise the frozen linear weights of the model's repeated blocks in place, on `device`.

    int8 and nf4 replace each nn.Linear by bitsandbytes' Linear8bitLt / Linear4bit (they quantise when moved to the
    device); fp8 converts the weights with torchao's float8 weight-only config. Returns how many layers changed.
    """
    backend = quantization_backend(method)
    linears = repeated_block_linears(model)
    if method == "fp8":
        backend.quantize_(model, backend.Float8WeightOnlyConfig(set_inductor_config=False),
                          filter_fn=lambda module, name: name in linears, device=device)
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
        if has_bias:
            quantized.bias = linear.bias
        setattr(model.get_submodule(parent_name), child_name, quantized.to(device).requires_grad_(False))
    return len(linears)


def full_precision_state(model):
    """The model's state dict on the CPU, quantised linear weights dequantised one at a time (what the graft
    copies; the accelerator never holds a full-precision copy)."""
    buffers = dict(model.named_buffers())
    full = {name: value.cpu() for name, value in model.state_dict().items() if name in buffers}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            if hasattr(parameter, "quant_state"):  # bitsandbytes 4-bit
                import bitsandbytes

                parameter = bitsandbytes.functional.dequantize_4bit(parameter.data, parameter.quant_state)
            elif parameter.dtype == torch.int8 and getattr(module, "state", None) is not None:  # bitsandbytes int8
                import bitsandbytes

                parameter = bitsandbytes.functional.int8_vectorwise_dequant(parameter.data, module.state.SCB)
            full[key] = parameter.detach().cpu()
    return full


class GraftedVLM:
    """Qwen3-VL whose language model is replaced by the pipeline's Qwen3 text encoder (SPEC §3).

    The vision tower and mergers stay Qwen3-VL's. Text-only, the grafted model reproduces the text encoder's
    features exactly, so whatever differs in the teacher's context comes from the image tokens.
    """

    MIN_PIXELS, MAX_PIXELS = 512 * 512, 768 * 768

    def __init__(self, vlm_path, text_encoder, tokenizer, dtype, cache_dir=None):
        try:
            config = AutoConfig.from_pretrained(vlm_path, cache_dir=cache_dir)
        except Exception as error:
            raise UserError(f"cannot load the teacher VLM from {vlm_path}: {error}") from None
        if config.model_type != "qwen3_vl":
            raise UserError(f"--teacher_vlm_name_or_path {vlm_path} is a {config.model_type}, not a Qwen3-VL model")
        # The language model becomes the text encoder, positional base included.
        text_rope = getattr(text_encoder.config, "rope_parameters", None) or {}
        if "rope_theta" in text_rope:
            config.text_config.rope_parameters["rope_theta"] = text_rope["rope_theta"]
        self.vlm = Qwen3VLForConditionalGeneration.from_pretrained(
            vlm_path, config=config, dtype=dtype, cache_dir=cache_dir
        )
        language_model = self.vlm.model.language_model
        encoder_state = {
            key.removeprefix("model."): value
            for key, value in full_precision_state(text_encoder).items()
            if not key.startswith("lm_head.")
        }
        target_state = language_model.state_dict()
        missing = sorted(set(target_state) - set(encoder_state))
        unexpected = sorted(set(encoder_state) - set(target_state))
        mismatched = sorted(k for k in set(target_state) & set(encoder_state)
                            if target_state[k].shape != encoder_state[k].shape)
        if missing or unexpected or mismatched:
            example = (missing or unexpected or mismatched)[0]
            raise UserError(
                f"the teacher VLM {vlm_path} does not match the pipeline's text encoder: {len(missing)} missing,"
                f" {len(unexpected)} unexpected, {len(mismatched)} mismatched weights (first: {example}); use the"
                " Qwen3-VL whose language model has the text encoder's size (4B for Qwen3-4B, 8B for Qwen3-8B)"
            )
        language_model.load_state_dict(encoder_state)
        self.vlm.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(vlm_path, cache_dir=cache_dir)
        self.image_token_id = config.image_token_id
        for token, token_id in (("<|image_pad|>", config.image_token_id),
                                ("<|vision_start|>", config.vision_start_token_id),
                                ("<|vision_end|>", config.vision_end_token_id)):
            if tokenizer.convert_tokens_to_ids(token) != token_id:
                raise UserError(f"the teacher VLM's {token} id {token_id} differs from the pipeline tokenizer's")

    def to(self, device, quantize="none"):
        """Move the VLM to `device`, its repeated blocks quantised there when asked (--quantize_encoders)."""
        if quantize != "none":
            quantize_linear_layers(self.vlm, quantize, device, self.vlm.dtype)
        self.vlm.to(device)

    def vision_inputs(self, image):
        """Pixel patches and the number of image tokens for one PIL image."""
        processed = self.image_processor(
            images=[image],
            size={"shortest_edge": self.MIN_PIXELS, "longest_edge": self.MAX_PIXELS},
            return_tensors="pt",
        )
        merge = self.image_processor.merge_size
        num_tokens = int(processed["image_grid_thw"].prod()) // (merge * merge)
        return processed, num_tokens

    @staticmethod
    def user_content(caption, num_image_tokens):
        """[image, caption]: the image's placeholder tokens first, then the caption (SPEC §3)."""
        return "<|vision_start|>" + "<|image_pad|>" * num_image_tokens + "<|vision_end|>" + caption

    @torch.no_grad()
    def hidden_states(self, text, vision=None, max_length=None):
        """All hidden states for one chat text; `vision` (from vision_inputs) fills its `<|image_pad|>` tokens."""
        device = self.vlm.device
        padding = {"padding": "max_length", "max_length": max_length, "truncation": True} if max_length else {}
        tokens = self.tokenizer([text], return_tensors="pt", **padding)
        input_ids = tokens.input_ids.to(device)
        attention_mask = tokens.attention_mask.to(device)
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


class ModelFamily:
    """What differs between model families. Subclasses fill in the same handful of methods.

    Latent states have the shape (batch, channels, height, width) in the space the pipeline's scheduler steps in.
    Contexts are dicts of CPU-storable tensors for ONE sample; `collate` batches them for `predict`.
    """

    name = None
    pipeline_class = None
    default_learning_rate = None
    default_validation_steps = None
    default_lora_layers = None
    default_teacher_context = None
    teacher_contexts = ()
    resolution_multiple = 16

    def __init__(self, args, weight_dtype, device, pipeline=None):
        """Load the pipeline named by the arguments, or wrap one built in code (the benchmark's random weights)."""
        self.args = args
        self.weight_dtype = weight_dtype
        self.device = device
        self.teacher_context = args.teacher_context or self.default_teacher_context
        if self.teacher_context not in self.teacher_contexts:
            raise UserError(f"--teacher_context {self.teacher_context} is not available for {self.name}"
                            f" (choose from {', '.join(self.teacher_contexts)})")
        if pipeline is None:
            try:
                pipeline = self.pipeline_class.from_pretrained(
                    args.pretrained_model_name_or_path,
                    revision=args.revision,
                    variant=args.variant,
                    dtype=weight_dtype,
                    cache_dir=args.cache_dir,
                )
            except Exception as error:
                raise UserError(f"cannot load {args.pretrained_model_name_or_path} as {self.name}: {error}") from None
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.transformer = self.pipeline.transformer
        self.scheduler = self.pipeline.scheduler
        self.vlm = None
        if args.quantize_encoders != "none" and self.pipeline.text_encoder is not None:
            quantize_linear_layers(self.pipeline.text_encoder, args.quantize_encoders, device, weight_dtype)
        for module in (self.pipeline.text_encoder, self.pipeline.vae):
            if module is not None:
                module.to(device).requires_grad_(False).eval()
        self.transformer.requires_grad_(False)
        if args.attention_backend is not None:
            try:
                self.transformer.set_attention_backend(args.attention_backend)
            except Exception as error:
                raise UserError(f"--attention_backend {args.attention_backend}: {error}") from None

    # -- loading -------------------------------------------------------------------------------------------------
    def load_teacher_vlm(self, drop_text_encoder=False):
        """The grafted Qwen3-VL on the accelerator. With `drop_text_encoder` (the student contexts are done) the text
        encoder goes once its weights are grafted, before the VLM arrives: one large encoder on the device at a time."""
        vlm_path = self.args.teacher_vlm_name_or_path or self.default_teacher_vlm()
        self.vlm = GraftedVLM(vlm_path, self.pipeline.text_encoder, self.pipeline.tokenizer, self.weight_dtype,
                              cache_dir=self.args.cache_dir)
        if drop_text_encoder:
            self.pipeline.text_encoder = None
            free_memory()
        self.vlm.to(self.device, self.args.quantize_encoders)

    def prepare_teacher_contexts(self):
        """Called between the student and the teacher contexts of the cache: the VLM teacher needs its VLM."""
        if self.teacher_context == "vlm" and self.vlm is None:
            self.load_teacher_vlm(drop_text_encoder=True)

    def default_teacher_vlm(self):
        return "Qwen/Qwen3-VL-4B-Instruct"

    def free_encoders(self):
        """Drop the text encoder and VLM and park the VAE on the CPU: the loop only needs the transformer."""
        self.pipeline.text_encoder = None
        self.vlm = None
        self.pipeline.vae.to("cpu")
        free_memory()

    # -- contexts ------------------------------------------------------------------------------------------------
    def encode_student_context(self, caption):
        raise NotImplementedError

    def build_teacher_context(self, image, caption):
        raise NotImplementedError

    def collate(self, contexts):
        raise NotImplementedError

    def to_model(self, tensor):
        """A context tensor on the accelerator, floating point in the transformer's dtype (as the pipeline feeds it)."""
        return tensor.to(self.device, self.transformer.dtype if tensor.is_floating_point() else None)

    # -- roll-out ------------------------------------------------------------------------------------------------
    def initial_noise(self, batch_size, height, width, generator=None):
        raise NotImplementedError

    def rollout_schedule(self, num_steps, height, width):
        """(timesteps, sigmas) exactly as the pipeline sets them for `num_steps` at this size (SPEC §4)."""
        raise NotImplementedError

    def predict(self, transformer, latents, timestep, context):
        """Velocity in the scheduler's convention and the pipeline's dtype: x_{k-1} = x_k + (s_{k-1} - s_k) v."""
        raise NotImplementedError

    # -- images --------------------------------------------------------------------------------------------------
    def decode(self, latents):
        raise NotImplementedError

    def generate(self, transformer, context, height, width, num_steps, generator):
        """Images from the stock pipeline for a cached student context."""
        raise NotImplementedError


class ZImageTurbo(ModelFamily):
    """Z-Image-Turbo: 8-step distilled, Qwen3-4B text encoder, teacher context from a grafted Qwen3-VL."""

    name = "Z-Image-Turbo"
    pipeline_class = ZImagePipeline
    default_learning_rate = 1e-4
    default_validation_steps = 8
    # The released code lost w1/w2 to a missing comma; all three feed-forward projections are meant (SPEC §5).
    default_lora_layers = "to_q,to_k,to_v,to_out.0,feed_forward.w1,feed_forward.w2,feed_forward.w3"
    default_teacher_context = "vlm"
    teacher_contexts = ("vlm",)
    max_sequence_length = 512

    def __init__(self, args, weight_dtype, device, pipeline=None):
        super().__init__(args, weight_dtype, device, pipeline)
        # Caption positions run 1..padded length and the image starts after them on the same RoPE axis, so the
        # teacher context is capped below the transformer's first axis length (1024 -> 992), and at 1024 (SPEC §3).
        axis_length = self.transformer.config.axes_lens[0]
        self.max_teacher_tokens = min(1024, (axis_length - 2) // 32 * 32)

    def encode_student_context(self, caption):
        embeds = self.pipeline._encode_prompt([caption], device=self.device,
                                              max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds[0].to("cpu", self.weight_dtype)}

    def build_teacher_context(self, image, caption):
        vision, num_image_tokens = self.vlm.vision_inputs(image)
        text = self.pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": self.vlm.user_content(caption, num_image_tokens)}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        hidden_states, mask = self.vlm.hidden_states(text, vision)
        features = hidden_states[-2][0][mask][: self.max_teacher_tokens]
        return {"prompt_embeds": features.to("cpu", self.weight_dtype)}

    def collate(self, contexts):
        return {"prompt_embeds": [self.to_model(c["prompt_embeds"]) for c in contexts]}

    def initial_noise(self, batch_size, height, width, generator=None):
        vae_scale = self.pipeline.vae_scale_factor
        shape = (batch_size, self.transformer.config.in_channels, 2 * (height // (vae_scale * 2)),
                 2 * (width // (vae_scale * 2)))
        return diffusers.utils.torch_utils.randn_tensor(shape, generator=generator, device=self.device,
                                                        dtype=torch.float32)

    def rollout_schedule(self, num_steps, height, width):
        vae_scale = self.pipeline.vae_scale_factor
        image_seq_len = (height // (vae_scale * 2)) * (width // (vae_scale * 2))
        config = self.scheduler.config
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        retrieve_timesteps(scheduler, num_steps, self.device, sigmas=get_default_z_image_sigmas(num_steps), mu=mu)
        return scheduler.timesteps, scheduler.sigmas

    def predict(self, transformer, latents, timestep, context):
        # The transformer takes t = 1 - sigma and returns the negative of the scheduler's velocity (SPEC §3).
        t = ((1000 - timestep) / 1000).expand(latents.shape[0])
        model_input = list(latents.to(self.transformer.dtype).unsqueeze(2).unbind(0))
        output = transformer(model_input, t, context["prompt_embeds"], return_dict=False)[0]
        return -torch.stack([o.float() for o in output]).squeeze(2)

    def decode(self, latents):
        vae = self.pipeline.vae
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return self.pipeline.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")

    def generate(self, transformer, context, height, width, num_steps, generator):
        self.pipeline.transformer = transformer
        return self.pipeline(
            prompt_embeds=[self.to_model(context["prompt_embeds"])],
            height=height, width=width, num_inference_steps=num_steps, guidance_scale=0.0, generator=generator,
        ).images


class Flux2Klein(ModelFamily):
    """FLUX.2-klein 4B/9B: 4-step distilled, Qwen3 text encoder; edit (reference image) or VLM teacher."""

    name = "FLUX.2-klein"
    pipeline_class = Flux2KleinPipeline
    default_learning_rate = 2e-5
    default_validation_steps = 4
    # Module names that exist in diffusers' Flux2 transformer (the released code named ff.net.*, which do not).
    default_lora_layers = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,"
                           "to_qkv_mlp_proj,attn.to_out,ff.linear_in,ff.linear_out,ff_context.linear_in,"
                           "ff_context.linear_out")
    default_teacher_context = "edit"
    teacher_contexts = ("edit", "vlm")
    max_sequence_length = 512

    def default_teacher_vlm(self):
        hidden = self.pipeline.text_encoder.config.hidden_size
        return "Qwen/Qwen3-VL-8B-Instruct" if hidden >= 4096 else "Qwen/Qwen3-VL-4B-Instruct"

    def encode_caption(self, caption):
        embeds = self.pipeline._get_qwen3_prompt_embeds(
            self.pipeline.text_encoder, self.pipeline.tokenizer, [caption], dtype=self.weight_dtype,
            device=self.device, max_sequence_length=self.max_sequence_length,
            hidden_states_layers=tuple(self.args.text_encoder_out_layers),
        )
        return embeds[0].to("cpu")

    def encode_student_context(self, caption):
        return {"prompt_embeds": self.encode_caption(caption)}

    def build_teacher_context(self, image, caption):
        if self.teacher_context == "vlm":
            return self.vlm_teacher_context(image, caption)
        # Edit teacher: the target as the pipeline's reference image, with the instruction suffix (SPEC §3).
        pixels = image_to_tensor(image)
        image_latents, image_latent_ids = self.pipeline.prepare_image_latents(
            [pixels], batch_size=1, generator=None, device=self.device, dtype=self.pipeline.vae.dtype
        )
        teacher_caption = f"{caption} {self.args.teacher_prompt_suffix}".strip()
        return {
            "prompt_embeds": self.encode_caption(teacher_caption),
            "image_latents": image_latents[0].to("cpu", self.weight_dtype),
            "image_latent_ids": image_latent_ids[0].to("cpu"),
        }

    def vlm_teacher_context(self, image, caption):
        vision, num_image_tokens = self.vlm.vision_inputs(image)
        text = self.pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": self.vlm.user_content(caption, num_image_tokens)}],
            tokenize=False, add_generation_prompt=True, enable_thinking=False,
        )
        # Padded like the student's prompt (the caption keeps its 512-token budget after the image tokens).
        hidden_states, _ = self.vlm.hidden_states(text, vision, self.max_sequence_length + num_image_tokens)
        stacked = torch.stack([hidden_states[k] for k in self.args.text_encoder_out_layers], dim=1)[0]
        return {"prompt_embeds": stacked.permute(1, 0, 2).flatten(1).to("cpu", self.weight_dtype)}

    def collate(self, contexts):
        return {key: self.to_model(torch.stack([c[key] for c in contexts])) for key in contexts[0]}

    def initial_noise(self, batch_size, height, width, generator=None):
        vae_scale = self.pipeline.vae_scale_factor
        shape = (batch_size, self.transformer.config.in_channels, height // (vae_scale * 2),
                 width // (vae_scale * 2))
        # The pipeline samples its noise in the prompt embeddings' dtype.
        return diffusers.utils.torch_utils.randn_tensor(shape, generator=generator, device=self.device,
                                                        dtype=self.weight_dtype)

    def rollout_schedule(self, num_steps, height, width):
        vae_scale = self.pipeline.vae_scale_factor
        image_seq_len = (height // (vae_scale * 2)) * (width // (vae_scale * 2))
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
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
        """Patchified, batch-norm-normalised latents -> the VAE's latent space (what output_type='latent' gives)."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                              latents.dtype)
        return self.pipeline._unpatchify_latents(latents * std + mean)

    def decode(self, latents):
        vae = self.pipeline.vae
        latents = self.unnormalize(latents.to(vae.device, vae.dtype))
        return self.pipeline.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")

    def generate(self, transformer, context, height, width, num_steps, generator):
        self.pipeline.transformer = transformer
        return self.pipeline(
            prompt_embeds=self.to_model(context["prompt_embeds"].unsqueeze(0)),
            height=height, width=width, num_inference_steps=num_steps, guidance_scale=1.0, generator=generator,
        ).images


MODEL_FAMILIES = {"ZImagePipeline": ZImageTurbo, "Flux2KleinPipeline": Flux2Klein}


def detect_family(args):
    """The family class named by the pipeline folder's model_index.json."""
    try:
        config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision,
                                               cache_dir=args.cache_dir)
    except Exception:
        raise UserError(f"cannot find a diffusers pipeline (model_index.json) at {args.pretrained_model_name_or_path}")
    pipeline_class = config.get("_class_name")
    if pipeline_class not in MODEL_FAMILIES:
        supported = ", ".join(cls.name for cls in MODEL_FAMILIES.values())
        raise UserError(f"{args.pretrained_model_name_or_path} is a {pipeline_class}; D-OPSD supports {supported}")
    return MODEL_FAMILIES[pipeline_class]


# ----------------------------------------------------------------------------------------------------------------
# Data: (image, caption) pairs in aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training pair. Caption variants of one image are separate examples sharing the image."""

    source: str  # a file path, or "dataset:<row>"
    caption: str
    bucket: tuple  # (height, width)
    image_key: str = ""
    load: object = field(default=None, repr=False)  # () -> PIL RGB image at its original size


def load_rgb(image, name):
    """Any PIL image (grayscale, palette, RGBA, 16-bit) as 8-bit RGB; transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(array.max(), 1.0) if image.mode == "I" else 1 / 257
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name} is only {image.size[0]}x{image.size[1]} pixels (need at least {MIN_IMAGE_SIDE})")
    return image


def read_image_file(path):
    try:
        with Image.open(path) as image:
            image.load()
            return load_rgb(image, path)
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def resize_to_bucket(image, bucket):
    """Scale to cover the bucket, then center-crop to it."""
    height, width = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def read_captions(text, source):
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise UserError(f"caption file for {source} is empty")
    return captions


def scan_instance_data_dir(args):
    """(path, captions) for every image in --instance_data_dir, from .txt files or metadata.jsonl."""
    root = Path(args.instance_data_dir)
    if not root.is_dir():
        raise UserError(f"--instance_data_dir {root} does not exist or is not a folder")
    metadata = root / "metadata.jsonl"
    entries = []
    if metadata.exists():
        for line_number, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                path, text = root / record["file_name"], record.get("text")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{metadata}:{line_number} is not a JSON object with file_name (and text)") from None
            if not path.is_file():
                raise UserError(f"{metadata}:{line_number} names {record['file_name']}, which does not exist")
            entries.append((path, read_captions(text, path) if text else None))
    else:
        for path in sorted(root.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            caption_file = path.with_suffix(".txt")
            entries.append((path, read_captions(caption_file.read_text(), path) if caption_file.exists() else None))
    if not entries:
        raise UserError(f"--instance_data_dir {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return [(str(path), captions) for path, captions in entries]


def scan_dataset(args):
    """(row, captions, loader) for every row of a Hugging Face dataset (hub id or local folder)."""
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
    entries = []
    for row in range(len(dataset)):
        captions = None
        if args.caption_column is not None:
            value = dataset[row][args.caption_column]
            captions = read_captions(value, f"dataset row {row}") if isinstance(value, str) and value.strip() else None
        entries.append((f"dataset:{row}", captions,
                        lambda row=row: load_rgb(dataset[row][args.image_column], f"dataset row {row}")))
    return entries


def collect_examples(args, resolution_multiple):
    """Scan and check the whole dataset up front: bad input stops here, before any model is loaded."""
    if args.instance_data_dir is not None:
        entries = [(path, captions, lambda path=path: read_image_file(path))
                   for path, captions in scan_instance_data_dir(args)]
    else:
        entries = scan_dataset(args)
    buckets = generate_aspect_ratio_buckets(args.resolution, divisibility=resolution_multiple)
    examples = []
    for source, captions, load in entries:
        try:
            image = load()
        except ValueError as error:
            if not args.skip_bad_images:
                raise UserError(f"{error} (pass --skip_bad_images to skip such images)") from None
            logger.warning(f"skipping {source}: {error}")
            continue
        if captions is None:
            if args.instance_prompt is None:
                raise UserError(f"{source} has no caption: add a .txt caption or pass --instance_prompt")
            captions = [args.instance_prompt]
        bucket = buckets[find_nearest_bucket(image.height, image.width, buckets)]
        image_key = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        examples += [Example(source, caption, bucket, image_key, load) for caption in captions]
    if not examples:
        raise UserError("no usable training images left after skipping bad ones")
    return examples


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of example indices from one bucket each, reshuffled every epoch from (seed, epoch)."""

    def __init__(self, examples, batch_size, repeats, seed):
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.groups = {}
        for index, example in enumerate(examples):
            self.groups.setdefault(example.bucket, []).extend([index] * repeats)

    def start_epoch(self, epoch):
        # Not named set_epoch: accelerate would call that with its own per-loader iteration count, which restarts
        # at 0 for the loader of a resumed run and would change the order.
        self.epoch = epoch

    def batches(self):
        rng = random.Random(self.seed * 100003 + self.epoch)
        batches = []
        for bucket in sorted(self.groups):
            indices = self.groups[bucket][:]
            rng.shuffle(indices)
            batches += [indices[i: i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        yield from self.batches()

    def __len__(self):
        return sum(math.ceil(len(group) / self.batch_size) for group in self.groups.values())


# ----------------------------------------------------------------------------------------------------------------
# Contexts: student c_s (caption) and teacher c_t (caption + image), computed once per example and cached
# ----------------------------------------------------------------------------------------------------------------


class ContextStore:
    """Per-example student and teacher contexts, as safetensors files under output_dir/context_cache.

    The file name hashes everything the contexts depend on, so a resumed or repeated run reuses them and a change
    of model, teacher, caption or bucket computes new ones. With --no-cache_contexts nothing is stored and the
    encoders stay on the accelerator to compute contexts for every batch.
    """

    def __init__(self, family, args, examples, accelerator):
        self.family = family
        self.examples = examples
        self.enabled = args.cache_contexts
        self.folder = Path(args.output_dir) / "context_cache"
        fingerprint = {
            "model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
            "teacher": family.teacher_context, "vlm": args.teacher_vlm_name_or_path,
            "suffix": args.teacher_prompt_suffix if family.teacher_context == "edit" else None,
            "layers": args.text_encoder_out_layers, "dtype": str(family.weight_dtype),
            "quantize_encoders": args.quantize_encoders,
        }
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.accelerator = accelerator

    def path(self, example):
        key = hashlib.sha1(f"{self.fingerprint}|{example.image_key}|{example.caption}|{example.bucket}".encode())
        return self.folder / f"{key.hexdigest()}.safetensors"

    @torch.no_grad()
    def compute(self, example):
        image = resize_to_bucket(example.load(), example.bucket)
        student = self.family.encode_student_context(example.caption)
        teacher = self.family.build_teacher_context(image, example.caption)
        return student, teacher

    def fill(self):
        """Compute every missing context; each process takes its share and writes each file atomically.

        Two passes, so that one large encoder at a time is on the accelerator: every student context first (text
        encoder), kept in a `.student` file, then the family prepares the teacher (the VLM replaces the text
        encoder) and every teacher context completes its file.
        """
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        accelerator = self.accelerator
        todo = [e for e in self.examples if not self.path(e).exists()]
        mine = todo[accelerator.process_index:: accelerator.num_processes]
        quiet = not accelerator.is_local_main_process
        with torch.no_grad():
            for example in tqdm(mine, desc="caching student contexts", disable=quiet):
                student_path = f"{self.path(example)}.student"
                if not os.path.exists(student_path):
                    student = self.family.encode_student_context(example.caption)
                    save_file({k: v.contiguous() for k, v in student.items()}, f"{student_path}.tmp")
                    os.replace(f"{student_path}.tmp", student_path)
            if mine:
                self.family.prepare_teacher_contexts()
            for example in tqdm(mine, desc="caching teacher contexts", disable=quiet):
                path = self.path(example)
                image = resize_to_bucket(example.load(), example.bucket)
                teacher = self.family.build_teacher_context(image, example.caption)
                tensors = {f"student.{k}": v for k, v in load_file(f"{path}.student").items()}
                tensors.update({f"teacher.{k}": v.contiguous() for k, v in teacher.items()})
                save_file(tensors, f"{path}.tmp")
                os.replace(f"{path}.tmp", path)
                os.remove(f"{path}.student")
        accelerator.wait_for_everyone()
        logger.info(f"contexts cached for {len(self.examples)} examples ({len(todo)} new, computed by"
                    f" {accelerator.num_processes} process(es)) in {self.folder}")

    def get(self, example):
        if not self.enabled:
            return self.compute(example)
        tensors = load_file(self.path(example))
        split = ({}, {})
        for key, value in tensors.items():
            role, name = key.split(".", 1)
            split[role == "teacher"][name] = value
        return split


class ContextDataset(torch.utils.data.Dataset):
    def __init__(self, examples, store):
        self.examples = examples
        self.store = store

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        student, teacher = self.store.get(self.examples[index])
        return {"student": student, "teacher": teacher, "bucket": self.examples[index].bucket}


def collate_examples(items):
    assert len({item["bucket"] for item in items}) == 1, "a batch mixes buckets"
    return {"student": [i["student"] for i in items], "teacher": [i["teacher"] for i in items],
            "bucket": items[0]["bucket"]}


# ----------------------------------------------------------------------------------------------------------------
# The D-OPSD step: roll out, ask the teacher, pull the student (SPEC §2)
# ----------------------------------------------------------------------------------------------------------------


class EMATeacher:
    """The teacher's weights: theta_bar <- d * theta_bar + (1 - d) * theta after every optimizer step.

    It holds a shadow copy of the student's trainable parameters and starts equal to them (zero-initialised LoRA B:
    the teacher starts as the base model). For a teacher pass the shadow is swapped into the student's parameters,
    so one network with one set of modules plays both roles.
    """

    FILE_NAME = "ema_teacher.safetensors"

    def __init__(self, named_parameters, decay, device=None, dtype=None):
        self.names, self.parameters = zip(*named_parameters)
        self.decay = decay
        self.shadow = [p.detach().to(device=device or p.device, dtype=dtype or p.dtype, copy=True)
                       for p in self.parameters]
        self.stash = None  # student copies for the copy-in/copy-out swap, allocated on first use

    @torch.no_grad()
    def update(self):
        students = [p.detach().to(s.device, s.dtype) for p, s in zip(self.parameters, self.shadow)]
        torch._foreach_lerp_(self.shadow, students, 1.0 - self.decay)

    @contextmanager
    def swapped_in(self):
        """Inside the block the student's parameters hold the teacher's weights.

        Where the shadow has the parameters' device and dtype, the storages are swapped (no copy). Otherwise (a CPU
        or fp32 EMA) the student is copied out beside the shadow and the teacher copied in, in place, so the
        accelerator never holds a second copy of the weights.
        """
        if all(p.device == s.device and p.dtype == s.dtype for p, s in zip(self.parameters, self.shadow)):
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
            self.stash = [torch.empty_like(p, device=s.device) for p, s in zip(self.parameters, self.shadow)]
        with torch.no_grad():
            for parameter, shadow, stash in zip(self.parameters, self.shadow, self.stash):
                stash.copy_(parameter)
                parameter.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, stash in zip(self.parameters, self.stash):
                    parameter.copy_(stash)

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
    """mean((f(u_s) - f(u_t))^2); f = x0-prediction (== sigma^2-weighted velocity MSE) or identity (SPEC §2)."""
    if loss_space == "x0":
        return F.mse_loss(to_x0(latents, student_velocity, sigma), to_x0(latents, teacher_velocity, sigma))
    return F.mse_loss(student_velocity.float(), teacher_velocity.float())


def rollout_step(latents, velocity, sigma, sigma_next):
    """One Euler step exactly as FlowMatchEulerDiscreteScheduler.step computes it (fp32, back to v's dtype)."""
    return (latents.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


def dopsd_step(family, student, teacher_model, ema_teacher, batch, args, accelerator, generator=None,
               backward_per_step=True):
    """One D-OPSD iteration on a batch; returns the mean loss over the K roll-out steps and the final latents.

    The student's forward with grad at x_k *is* the roll-out step: its velocity moves the state to x_{k-1}
    (detached: no backprop through the trajectory). Each step's loss is backpropagated at once, so only one
    step's graph is alive; the gradient equals that of the mean over the K steps (SPEC §2.3). With
    backward_per_step=False the K graphs are kept and one backward runs at the end (same gradient, memory O(K)):
    what DeepSpeed needs, which allows one backward per micro-batch.
    """
    height, width = batch["bucket"]
    student_context = family.collate(batch["student"])
    teacher_context = family.collate(batch["teacher"])
    timesteps, sigmas = family.rollout_schedule(args.rollout_steps, height, width)
    latents = family.initial_noise(len(batch["student"]), height, width, generator)  # fresh noise: on-policy
    total_loss = torch.zeros((), device=latents.device)
    for k in range(args.rollout_steps):
        with torch.no_grad(), ema_teacher.swapped_in(), accelerator.autocast():
            teacher_velocity = family.predict(teacher_model, latents, timesteps[k], teacher_context)
        # Gradients of all but the last step stay local; DDP averages them once, at the last backward.
        last = k == args.rollout_steps - 1
        with nullcontext() if last or not backward_per_step else accelerator.no_sync(student):
            student_velocity = family.predict(student, latents, timesteps[k], student_context)
            loss = dopsd_loss(student_velocity, teacher_velocity, latents, sigmas[k], args.loss_space)
            if backward_per_step:
                accelerator.backward(loss / args.rollout_steps)
        total_loss = total_loss + (loss.detach() if backward_per_step else loss) / args.rollout_steps
        latents = rollout_step(latents, student_velocity.detach(), sigmas[k], sigmas[k + 1])
    if not backward_per_step:
        accelerator.backward(total_loss)
    return total_loss.detach(), latents


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


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


def log_validation(family, transformer, ema_teacher, validation, args, accelerator, step):
    """Student images from the stock pipeline, and the teacher's view of the first training example."""
    logger.info(f"validation at step {step}")
    transformer.eval()
    family.pipeline.vae.to(accelerator.device)
    samples = Path(args.output_dir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    height = width = args.resolution
    num_steps = args.validation_inference_steps
    logged = {}
    for p, (prompt, context) in enumerate(validation["prompts"]):
        generator = torch.Generator(accelerator.device).manual_seed(args.seed)
        images = []
        for _ in range(args.num_validation_images):
            images += family.generate(transformer, context, height, width, num_steps, generator)
        for i, image in enumerate(images):
            image.save(samples / f"step-{step:06d}-prompt{p}-{i}.png")
        logged[prompt] = images
    first = validation["teacher_view"]
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    with ema_teacher.swapped_in():
        latents = sample(family, transformer, first["teacher"], *first["bucket"], num_steps, generator)
    teacher_image = family.decode(latents)[0]
    teacher_image.save(samples / f"step-{step:06d}-teacher-view.png")
    logged[f"teacher view: {first['caption']}"] = [teacher_image]
    gap = heldout_teacher_gap(family, transformer, ema_teacher, collate_examples([first]), args.rollout_steps,
                              seeds=range(10_000, 10_004))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, images in logged.items():
                tracker.writer.add_images(name, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(i, caption=n) for n, imgs in logged.items() for i in imgs]},
                        step=step)
    accelerator.log({"heldout_teacher_gap": gap}, step=step)
    family.pipeline.vae.to("cpu" if args.cache_contexts else accelerator.device)
    transformer.train()
    free_memory()
    return logged, gap


# ----------------------------------------------------------------------------------------------------------------
# Saving and the Hub
# ----------------------------------------------------------------------------------------------------------------


def resolve_lora_targets(transformer, lora_layers):
    """Full names of the nn.Linear modules whose names end in one of the given suffixes; each suffix must match."""
    suffixes = [s.strip() for s in lora_layers.split(",") if s.strip()]
    linear_names = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    targets = []
    for suffix in suffixes:
        matched = [name for name in linear_names if name == suffix or name.endswith("." + suffix)]
        if not matched:
            raise UserError(f"--lora_layers entry '{suffix}' matches no linear layer of this transformer")
        targets += matched
    return sorted(set(targets))


def save_lora(family, transformer, output_dir, weight_name=LORA_WEIGHT_NAME):
    """pytorch_lora_weights.safetensors in diffusers format, with the adapter config (rank, alpha) as metadata."""
    family.pipeline_class.save_lora_weights(
        output_dir,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name=weight_name,
        **_collate_lora_metadata({"transformer": transformer}),
    )


def save_model_card(args, family, repo_id, images):
    """README.md for the Hub: what was trained, how, and how to load it."""
    samples = []
    for i, (prompt, image_list) in enumerate(images.items()):
        if prompt.startswith("teacher view"):
            continue
        name = f"image_{i}.png"
        image_list[0].save(Path(args.output_dir) / name)
        samples.append({"text": prompt, "output": {"url": name}})
    trigger = args.instance_prompt or "(captions from the dataset)"
    pipeline_class = family.pipeline_class.__name__
    guidance = 0.0 if family.name == "Z-Image-Turbo" else 1.0
    description = f"""
# {repo_id}: D-OPSD LoRA for {family.name}

A LoRA for [{args.pretrained_model_name_or_path}](https://huggingface.co/{args.pretrained_model_name_or_path})
trained with **D-OPSD** (on-policy self-distillation, arXiv 2605.05204): the student rolled out its own
{args.rollout_steps}-step trajectories and was pulled toward an EMA teacher that also saw the training image, so the
base model's few-step sampling is kept.

Trigger / instance prompt: `{trigger}`

## Use it

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{args.pretrained_model_name_or_path}", torch_dtype=torch.bfloat16)
pipe.to("cuda")
pipe.load_lora_weights("{repo_id}")
prompt = "{args.instance_prompt or 'your prompt'}"
image = pipe(prompt, num_inference_steps={args.validation_inference_steps}, guidance_scale={guidance}).images[0]
```

## Training settings
| setting | value |
|---|---|
| roll-out steps K | {args.rollout_steps} |
| teacher context | {family.teacher_context} |
| loss space | {args.loss_space} |
| EMA decay | {args.ema_decay} |
| LoRA rank / alpha | {args.rank} / {args.lora_alpha} |
| learning rate | {args.learning_rate} |
| steps x batch x accumulation | {args.max_train_steps} x {args.train_batch_size} x {args.gradient_accumulation_steps} |
| resolution | {args.resolution} |
"""
    card = load_or_create_model_card(repo_id_or_path=repo_id, from_training=True, license="apache-2.0",
                                     base_model=args.pretrained_model_name_or_path, prompt=args.instance_prompt,
                                     model_description=description, widget=samples or None)
    tags = ["text-to-image", "diffusers", "lora", "d-opsd", "diffusers-training", family.name.lower()]
    with atomic_output(Path(args.output_dir) / "README.md") as temporary:
        populate_model_card(card, tags=tags).save(temporary)


HUB_IGNORE = ["checkpoint-*", "checkpoint-*/*", "context_cache/*", "logs/*", "*.tmp"]


def push_to_hub(args, repo_id):
    """Upload the output folder. On failure everything stays local and the retry command is printed."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="D-OPSD LoRA",
                      ignore_patterns=HUB_IGNORE)
    except Exception as error:
        excludes = " ".join(f"--exclude '{p}'" for p in HUB_IGNORE)
        logger.error(
            f"upload to the Hub failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"Your results are intact in {args.output_dir}. Retry with:\n"
            f"  hf upload {repo_id} {args.output_dir} . {excludes}"
        )
        return False
    logger.info(f"uploaded to https://huggingface.co/{repo_id}")
    return True


def hub_repo_id(args):
    return args.hub_model_id or Path(args.output_dir).resolve().name


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def remove_path(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(path):
    """Write a file or folder under a temporary name and rename it into place once complete: a crash or a full disk
    never leaves a half-written output, and the previous complete one stays until the new one is whole."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    remove_path(temporary)
    try:
        yield temporary
    except BaseException:
        remove_path(temporary)
        raise
    if path.is_dir() and not path.is_symlink():
        previous = path.with_name(path.name + ".old")
        remove_path(previous)
        os.replace(path, previous)
        os.replace(temporary, path)
        remove_path(previous)
    else:
        os.replace(temporary, path)


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first (a checkpoint-N.tmp being written is not one)."""
    return sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()),
                  key=lambda p: int(p.name.split("-", 1)[1]))


def prune_checkpoints(output_dir, limit):
    """Keep the newest `limit` checkpoints."""
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - limit)]:
        logger.info(f"removing old checkpoint {old}")
        shutil.rmtree(old)


def save_checkpoint(accelerator, args, global_step, noise_generator):
    """accelerate state (model hooks, optimizer, lr scheduler, RNGs) + the roll-out noise generator, written to
    checkpoint-N.tmp and renamed when every process is done. Old checkpoints are pruned only after that."""
    final = Path(args.output_dir) / f"checkpoint-{global_step}"
    temporary = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        remove_path(temporary)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(temporary))
        save_file({"state": noise_generator.get_state()},
                  temporary / f"rollout_noise_{accelerator.process_index}.safetensors")
    except OSError as caught:
        error = caught
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "max")
    if failed.item() > 0:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(args.output_dir)
        kept = f"{previous[-1].name} is intact" if previous else "no earlier checkpoint exists"
        reason = error.strerror if error is not None and error.strerror else "on another process"
        raise UserError(f"could not write {final.name} ({reason}); {kept}. Free disk space and resume with"
                        " --resume_from_checkpoint latest")
    if accelerator.is_main_process:
        remove_path(final)
        os.replace(temporary, final)
        if args.checkpoints_total_limit is not None:
            prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    logger.info(f"saved {final}")


def load_checkpoint(accelerator, path, noise_generator):
    """Restore everything save_checkpoint wrote; a checkpoint of another model or LoRA shape is a user error."""
    try:
        accelerator.load_state(str(path))
        saved_noise = load_file(Path(path) / f"rollout_noise_{accelerator.process_index}.safetensors")
    except UserError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot resume from {path}: it does not fit this model, LoRA or number of processes"
                        f" ({first_line[:200]})") from None
    noise_generator.set_state(saved_noise["state"])


def resume_command():
    """The command line that continues this run from its latest checkpoint."""
    argv = sys.argv[1:]
    if "--resume_from_checkpoint" in argv:
        index = argv.index("--resume_from_checkpoint")
        argv = argv[:index] + argv[index + 2:]
    argv = [a for a in argv if not a.startswith("--resume_from_checkpoint=")]
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"
    return shlex.join([*launcher.split(), sys.argv[0], *argv, "--resume_from_checkpoint", "latest"])


class StopRequest:
    """SIGINT / SIGTERM (Ctrl-C, a notebook's stop button, preemption) ask the loop to stop at the next step
    boundary with a checkpoint. A second signal stops at once."""

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
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, "max").item() > 0

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def find_resume_checkpoint(args):
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            path = Path(args.output_dir) / args.resume_from_checkpoint
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {args.resume_from_checkpoint} does not exist")
        return path
    checkpoints = list_checkpoints(args.output_dir)
    if not checkpoints:
        logger.info("no checkpoint to resume from: starting a new run")
        return None
    return checkpoints[-1]


def setup(args):
    """Check inputs, start accelerate, load the model family. Bad input fails here, before any long work."""
    if args.push_to_hub:
        from huggingface_hub import get_token

        if get_token() is None:
            raise UserError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    family_class = detect_family(args)
    examples = collect_examples(args, family_class.resolution_multiple)
    resume_path = find_resume_checkpoint(args)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=Path(args.output_dir, args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    cuda = accelerator.device.type == "cuda"
    if accelerator.mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16: use --mixed_precision fp16 (trained with a gradient scaler)")

    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("FSDP shards the parameters that the EMA teacher swaps in; use DDP or DeepSpeed ZeRO-2"
                        " (examples/accelerate/)")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    family = family_class(args, weight_dtype, accelerator.device)
    args.validation_inference_steps = args.validation_inference_steps or family.default_validation_steps
    if args.resolution % family.resolution_multiple:
        raise UserError(f"--resolution must be a multiple of {family.resolution_multiple} for {family.name}")
    if accelerator.is_main_process:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(Path(args.output_dir) / ".write-test", "w") as probe:
                probe.write("ok")
            os.remove(Path(args.output_dir) / ".write-test")
        except OSError as error:
            raise UserError(f"cannot write to --output_dir {args.output_dir}: {error.strerror}") from None
    accelerator.wait_for_everyone()
    return accelerator, family, examples, resume_path


def cache_contexts(args, family, examples, accelerator):
    """Student and teacher contexts for every example (and the validation prompts), computed once; then the text
    encoder, VLM and VAE leave the accelerator. The validation prompts go first, while the text encoder is there.
    With --no-cache_contexts the text encoder and the VLM both stay, to compute contexts for every batch."""
    with torch.no_grad():
        prompts = [(prompt, family.encode_student_context(prompt)) for prompt in args.validation_prompt or []]
    if family.teacher_context == "vlm" and not args.cache_contexts:
        family.load_teacher_vlm()
    store = ContextStore(family, args, examples, accelerator)
    store.fill()
    validation = {
        "prompts": prompts,
        "teacher_view": {**dict(zip(("student", "teacher"), store.get(examples[0]))),
                         "bucket": examples[0].bucket, "caption": examples[0].caption},
    }
    if args.cache_contexts:
        family.free_encoders()
    return store, validation


def make_optimizer(args, parameters, accelerator):
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            optimizer_class = bnb.optim.AdamW8bit
        except Exception as error:
            raise UserError(f"--use_8bit_adam needs a working bitsandbytes ({error}); drop the flag") from None
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


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
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
        # fp16's gradient scaler skips overflowing steps itself; DeepSpeed returns no norm.
        if grad_norm is not None and accelerator.scaler is None:
            if not (torch.isfinite(grad_norm) and torch.isfinite(loss)):
                optimizer.zero_grad(set_to_none=True)
                return False
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def train(args, accelerator, family, transformer, optimizer, ema_teacher, examples, store, validation, resume_path,
          project_name):
    """The D-OPSD loop: step, clip, optimizer step, EMA update; checkpoints and validation on schedule.

    Returns the prepared transformer and the last validation images."""
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    batch_sampler = BucketBatchSampler(examples, args.train_batch_size, args.repeats, args.seed)
    dataloader = torch.utils.data.DataLoader(ContextDataset(examples, store), batch_sampler=batch_sampler,
                                             collate_fn=collate_examples)
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, dataloader,
                                                                           lr_scheduler)
    teacher_model = accelerator.unwrap_model(transformer)
    if args.compile:
        teacher_model.compile_repeated_blocks()
    backward_per_step = accelerator.distributed_type != DistributedType.DEEPSPEED

    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(project_name, config=config)

    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    # Roll-out noise has its own generator, saved in every checkpoint, so a resumed run draws the same noise.
    noise_generator = torch.Generator(accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)
    global_step = 0
    if resume_path is not None:
        logger.info(f"resuming from {resume_path}")
        load_checkpoint(accelerator, resume_path, noise_generator)
        global_step = int(resume_path.name.split("-")[1])
    batches = epoch_batches(dataloader, batch_sampler, accelerator, global_step // updates_per_epoch, num_epochs,
                            (global_step % updates_per_epoch) * args.gradient_accumulation_steps)

    logger.info(f"{family.name}: {len(examples)} examples, {args.max_train_steps} steps, K={args.rollout_steps},"
                f" teacher={family.teacher_context}, loss={args.loss_space}, lr={args.learning_rate}")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    transformer.train()
    images, bad_steps, stop = {}, 0, StopRequest()
    try:
        for batch in batches:
            with accelerator.accumulate(transformer):
                loss, _ = dopsd_step(family, transformer, teacher_model, ema_teacher, batch, args, accelerator,
                                     noise_generator, backward_per_step)
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
                save_checkpoint(accelerator, args, global_step, noise_generator)
            if bad_steps >= args.max_bad_steps:
                raise UserError(f"stopped at step {global_step} after {bad_steps} consecutive non-finite steps:"
                                " lower --learning_rate, or use --mixed_precision bf16 instead of fp16."
                                f" checkpoint-{global_step} holds the last good weights")
            if accelerator.is_main_process and (global_step % args.validation_steps == 0 or last):
                images, _ = log_validation(family, teacher_model, ema_teacher, validation, args, accelerator,
                                           global_step)
            if last:
                break
            if stop.agreed(accelerator):
                if global_step % args.checkpointing_steps:
                    save_checkpoint(accelerator, args, global_step, noise_generator)
                logger.warning(f"stopped at step {global_step}; checkpoint-{global_step} is saved. To continue:\n"
                               f"  {resume_command()}")
                accelerator.end_training()
                sys.exit(0)
    finally:
        progress.close()
        stop.restore()
    accelerator.wait_for_everyone()
    return transformer, images


def finish(args, accelerator, save_outputs):
    """Write the final outputs on the main process and push them; exit 1 if the upload failed."""
    uploaded = True
    if accelerator.is_main_process:
        repo_id = save_outputs()
        if args.push_to_hub:
            uploaded = push_to_hub(args, repo_id)
    accelerator.end_training()
    if not uploaded:
        sys.exit(1)


def main(args):
    """Train a LoRA with D-OPSD; returns the trained transformer (with its LoRA)."""
    accelerator, family, examples, resume_path = setup(args)
    args.learning_rate = args.learning_rate or family.default_learning_rate
    args.lora_layers = args.lora_layers or family.default_lora_layers
    lora_targets = resolve_lora_targets(family.transformer, args.lora_layers)
    store, validation = cache_contexts(args, family, examples, accelerator)

    # The student: a LoRA on the transformer. The teacher: the EMA of that LoRA (SPEC §2.4). A quantised base is
    # shared by both: only the LoRA weights swap.
    if args.quantize_base != "none":
        count = quantize_linear_layers(family.transformer, args.quantize_base, accelerator.device, family.weight_dtype)
        logger.info(f"base transformer: {count} linear layers quantised to {args.quantize_base}")
    transformer = family.transformer.to(accelerator.device)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                       target_modules=lora_targets))
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(transformer, dtype=torch.float32)
    lora = [(name, p) for name, p in transformer.named_parameters() if p.requires_grad]
    ema_teacher = EMATeacher(lora, args.ema_decay)
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

    optimizer = make_optimizer(args, [p for _, p in lora], accelerator)
    transformer, images = train(args, accelerator, family, transformer, optimizer, ema_teacher, examples, store,
                                validation, resume_path, "dopsd-lora")

    def save_outputs():
        with atomic_output(Path(args.output_dir) / LORA_WEIGHT_NAME) as temporary:
            save_lora(family, accelerator.unwrap_model(transformer), temporary.parent, temporary.name)
        logger.info(f"saved {Path(args.output_dir) / LORA_WEIGHT_NAME}")
        repo_id = hub_repo_id(args)
        if args.push_to_hub:
            save_model_card(args, family, repo_id, images)
        return repo_id

    finish(args, accelerator, save_outputs)
    return accelerator.unwrap_model(transformer)


def run():
    try:
        main(parse_args())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
