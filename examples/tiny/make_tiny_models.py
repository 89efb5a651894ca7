"""Build the tiny, randomly initialised model folders that the quick-start, the tests and CI train on.

Every folder is written with `save_pretrained` and read back by the training scripts with `from_pretrained`,
exactly like a real checkpoint: there is no "tiny" code path anywhere in the trainer.

    python examples/tiny/make_tiny_models.py            # rewrites examples/tiny/{z-image-turbo,flux2-klein,qwen3-vl}

Shapes follow the real models where the trainer depends on them (docs/method.md §7):
- one byte-level Qwen2 tokenizer with the Qwen3 / Qwen3-VL special tokens and a Qwen3-style chat template;
- text encoders with 28 layers, so that FLUX.2-klein's default hidden layers (9, 18, 27) and Z-Image's
  `hidden_states[-2]` both exist;
- one Qwen3-VL whose language model has exactly the text encoders' shapes, so it can be grafted onto either;
- Z-Image: cap_feat_dim = text hidden size, sum(axes_dims) = dim // n_heads, axes_lens[0] = 1024 as in the real model;
- FLUX.2-klein: in_channels = 4 x VAE latent channels, joint_attention_dim = 3 x text hidden size, is_distilled.
"""

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)


HERE = Path(__file__).resolve().parent
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]
# A Qwen3-style template: one turn per message; `enable_thinking=False` adds the empty think block (FLUX.2-klein),
# `enable_thinking=True` adds nothing (Z-Image-Turbo).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
TEXT_HIDDEN = 32
TEXT_LAYERS = 28


def byte_level_alphabet():
    """The GPT-2 byte -> printable unicode map: 256 symbols, one per byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return [chr(codepoints[printable.index(byte)]) for byte in range(256)]


def make_tokenizer():
    vocab = {symbol: index for index, symbol in enumerate(byte_level_alphabet())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 131072
    return tokenizer


def text_config(tokenizer):
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def make_z_image_turbo(tokenizer, out):
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=TEXT_HIDDEN,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    text_encoder = Qwen3Model(text_config(tokenizer))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipeline = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipeline.save_pretrained(out)


def make_flux2_klein(tokenizer, out):
    torch.manual_seed(1)
    latent_channels = 8
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=False,
    )
    # Non-trivial batch-norm statistics, so that tests see the pipeline's latent normalisation at work.
    generator = torch.Generator().manual_seed(2)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    text_encoder = Qwen3ForCausalLM(text_config(tokenizer))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipeline = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    pipeline.save_pretrained(out)


def make_qwen3_vl(tokenizer, out):
    torch.manual_seed(3)
    text = text_config(tokenizer).to_dict()
    for key in ("architectures", "model_type", "transformers_version", "tie_word_embeddings", "dtype"):
        text.pop(key, None)
    text["rope_parameters"] = {  # Qwen3-VL's own base, 5x the text encoder's (as in the real models)
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = Qwen3VLForConditionalGeneration(config)
    model.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2).save_pretrained(out)
    tokenizer.save_pretrained(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=HERE)
    args = parser.parse_args()
    tokenizer = make_tokenizer()
    builders = {"z-image-turbo": make_z_image_turbo, "flux2-klein": make_flux2_klein, "qwen3-vl": make_qwen3_vl}
    for name, build in builders.items():
        out = args.output_dir / name
        shutil.rmtree(out, ignore_errors=True)
        build(tokenizer, out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
