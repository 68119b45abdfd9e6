"""Train the tiny flow world: an SD3-architecture text-to-image model on the same shapes, trained with flow matching.

Why SD3 and not Flux: SD3.x is sampled with true classifier-free guidance, which a model trained with caption
dropout supports as it is; a Flux.1-dev-shaped model would need a second, guidance-distillation stage to learn its
guidance input, and Flux.1-schnell is step-distilled. The ESD loop, hosts and file formats are the same code for
both (``esd_core.flow_host``).

The pipeline reuses the SD world's VAE (same latent space, so the judge and the cached latents carry over) and its
word-level tokenizer for both CLIP encoders. There is no T5 encoder: an SD3 pipeline without one feeds a block of
zeros in its place, here as long as the CLIP prompt (``MAX_SEQUENCE_LENGTH``), which sampling must pass.
"""
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from . import world
from .train import LoopSettings, encode, make_images, train_on_captions

# The length of the zero block that stands for the absent T5 prompt: the CLIP prompt's own length.
MAX_SEQUENCE_LENGTH = 8


@dataclass
class FlowTrainConfig:
    """Every knob of the flow world's training run; the defaults are the shipped run."""
    seed: int = 0
    n_images: int = 24000
    steps: int = 8000
    batch: int = 32
    lr: float = 1e-3
    warmup_steps: int = 150
    caption_dropout: float = 0.1
    ema_decay: float = 0.999


def build_text_encoder(tokenizer, projection_dim=32):
    """A 3-layer, 32-wide CLIP text transformer with a projection (SD3 reads the penultimate layer and the
    projected pooled output, so a third layer gives the sequence two layers of context)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, projection_dim=projection_dim,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config)


def build_transformer():
    """SD3.5's MMDiT (RMS-normed queries and keys) on 16x16x4 latents: 2x2 patches (64 image tokens), 4 joint
    blocks 128 wide."""
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                 caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=8,
                                 qk_norm="rms_norm")


def build_scheduler():
    """Euler on unshifted sigmas: at 16x16 latents there are few pixels to hide, so no shift towards noise."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_vae(sd_world_dir):
    """The SD world's VAE with SD3's latent convention (``shift_factor``) spelled out: zero."""
    vae = AutoencoderKL.from_pretrained(Path(sd_world_dir) / "vae")
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def build_pipeline(sd_world_dir, transformer=None, text_encoder=None, text_encoder_2=None):
    """The flow world's StableDiffusion3Pipeline around the given (or freshly built) trainable parts."""
    tokenizer = CLIPTokenizer.from_pretrained(Path(sd_world_dir) / "tokenizer")
    return StableDiffusion3Pipeline(
        transformer=transformer or build_transformer(), scheduler=build_scheduler(), vae=build_vae(sd_world_dir),
        text_encoder=text_encoder or build_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2 or build_text_encoder(tokenizer), tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None, tokenizer_3=None)


def train_flow(pipeline, latents, attrs, cfg, log):
    """Train the transformer and both text encoders jointly, by flow matching: x_sigma = (1 - sigma) x0 + sigma noise,
    the model predicts the velocity noise - x0 at timestep 1000 sigma, sigma drawn logit-normal (SD3's choice: most
    steps where the image is decided). Captions are dropped to "" at ``caption_dropout`` for guidance."""

    def batch_loss(x0, captions, generator):
        embeds, _, pooled, _ = pipeline.encode_prompt(captions, captions, None, device="cpu", do_classifier_free_guidance=False,
                                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))
        x_sigma = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        velocity = pipeline.transformer(hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                        pooled_projections=pooled, return_dict=False)[0]
        return F.mse_loss(velocity, noise - x0)

    settings = LoopSettings(cfg.seed, cfg.steps, cfg.batch, cfg.lr, cfg.warmup_steps, cfg.caption_dropout, cfg.ema_decay)
    train_on_captions([pipeline.transformer, pipeline.text_encoder, pipeline.text_encoder_2], latents, attrs, settings,
                      batch_loss, log, "flow")
    return pipeline


def train_flow_world(out_dir=world.DEFAULT_FLOW_MODEL_DIR, sd_world_dir=world.DEFAULT_MODEL_DIR, cfg=None, log=print):
    """Cache the world's latents through the SD world's VAE, train, and write the pipeline (transformer in fp16 to
    keep it small; diffusers loads it back as fp32). Returns the report's timings."""
    cfg = cfg or FlowTrainConfig()
    torch.set_num_threads(2)
    clock = time.time()
    pipeline = build_pipeline(sd_world_dir)
    images, attrs = make_images(cfg.n_images, cfg.seed + 1)
    latents = encode(pipeline.vae, images) * pipeline.vae.config.scaling_factor
    seconds = {"latents": round(time.time() - clock, 1)}
    clock = time.time()
    train_flow(pipeline, latents, attrs, cfg, log)
    seconds["transformer+text_encoders"] = round(time.time() - clock, 1)
    pipeline.transformer.half()
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    pipeline.transformer.float()
    return seconds
