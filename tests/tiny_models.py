"""Tiny random-weight pipelines for tests, seconds to build: Stable Diffusion (SD1-, SD2- and SDXL-shaped) and
flow-matching transformers (Flux.1-dev-, Flux.1-schnell- and SD3-shaped)."""

import json
import os
import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

FAMILIES = ("sd1", "sd2", "sdxl")
FLOW_KINDS = ("flux-dev", "flux-schnell", "sd3")


def tiny_tokenizer(folder: str, max_length: int = 16) -> CLIPTokenizer:
    """A character-level CLIP tokenizer: every letter is a token, so any lowercase prompt encodes."""
    os.makedirs(folder, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.'-!")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    with open(os.path.join(folder, "vocab.json"), "w") as handle:
        json.dump({token: index for index, token in enumerate(tokens)}, handle)
    with open(os.path.join(folder, "merges.txt"), "w") as handle:
        handle.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>")


def _text_config(tokenizer, hidden: int, projection: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def tiny_unet(family: str) -> UNet2DConditionModel:
    common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    if family == "sd1":
        return UNet2DConditionModel(cross_attention_dim=32, **common)
    if family == "sd2":
        return UNet2DConditionModel(cross_attention_dim=32, use_linear_projection=True, **common)
    return UNet2DConditionModel(
        cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, **common
    )


def tiny_pipeline(family: str, folder: str, seed: int = 0):
    """Build a tiny pipeline of one family with random weights and save it to ``folder``; return it."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(os.path.join(folder, "_tokenizer_files"))
    vae = AutoencoderKL(
        block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="v_prediction" if family == "sd2" else "epsilon",
    )
    unet = tiny_unet(family)
    if family == "sdxl":
        pipeline = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer,
            text_encoder=CLIPTextModel(_text_config(tokenizer, 32)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, 32)),
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer,
            text_encoder=CLIPTextModel(_text_config(tokenizer, 32)),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipeline.save_pretrained(folder)
    return pipeline


def tiny_flow_pipeline(kind: str, folder: str, seed: int = 0):
    """A tiny Flux.1-dev-, Flux.1-schnell- or SD3-shaped pipeline with random weights, saved to ``folder``. The T5
    encoder reads the character-level tokenizer's ids (its own tokenizer needs files we cannot make here)."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(os.path.join(folder, "_tokenizer_files"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 pad_token_id=1, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(
        block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=16, shift_factor=0.1, scaling_factor=1.5,
    )
    if kind.startswith("flux"):
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=kind == "flux-dev", axes_dims_rope=(2, 2, 4),
        )
        pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_text_config(tokenizer, 32)),
                                tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
        )
        pipeline = StableDiffusion3Pipeline(
            scheduler=scheduler, vae=vae, transformer=transformer,
            text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, 16)), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, 16)), tokenizer_2=tokenizer,
            text_encoder_3=t5, tokenizer_3=tokenizer,
        )
    pipeline.save_pretrained(folder)
    return pipeline
