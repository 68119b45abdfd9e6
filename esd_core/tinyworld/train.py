"""Retrain the whole tiny world from scratch with fixed seeds: judge, VAE, text encoder + UNet.

Order matters: the judge comes first so the VAE can be checked by judging its reconstructions;
the VAE comes next so the UNet trains on cached latents (16x16x4) instead of 32x32 images.
The result is a StableDiffusionPipeline directory that diffusers loads offline.
"""
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from . import judge as judge_lib
from . import world
from .tokenizer import build_tokenizer

# The SD 1.5 noise schedule, shared by training (DDPM) and sampling (DDIM).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", prediction_type="epsilon")


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults are the shipped run (about an hour on 2 cores)."""
    seed: int = 0
    n_images: int = 24000
    judge_steps: int = 1500
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 150
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0


def build_vae():
    """32x32x3 <-> 16x16x4: two encoder levels, so one 2x downsampling. Narrow and without
    mid-block attention: full-resolution convolutions dominate the cost on a CPU."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=world.SIZE,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                         mid_block_add_attention=False)


def build_text_encoder(tokenizer):
    """A 2-layer, 64-wide CLIP text transformer over our word-level vocabulary."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def build_unet():
    """SD-style UNet on 16x16x4 latents with cross-attention (attn1/attn2) at every level."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4)


def build_scheduler():
    """DDIM with SD 1.5's settings (also valid for PNDM)."""
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def make_images(n, seed):
    """n random world images as a (n, 3, 32, 32) tensor in [0, 1] and their attribute dicts."""
    rng = np.random.default_rng(seed)
    examples = [world.random_example(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([img for img, _ in examples])).permute(0, 3, 1, 2).contiguous()
    return images, [attrs for _, attrs in examples]


def _lr_lambda(warmup, total):
    """Linear warmup then cosine decay to zero, as a LambdaLR factor."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train_vae(images, cfg, log):
    """Train the autoencoder on pixels in [-1, 1] (L1 + MSE for sharp edges and stripes, plus a
    light KL) and set its latent scale so that the latents have unit standard deviation."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(50, cfg.vae_steps))
    vae.train()
    for step in range(cfg.vae_steps):
        x = images[torch.randint(0, len(images), (cfg.vae_batch,), generator=generator)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(recon, x)
        loss = F.l1_loss(recon, x) + mse + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} mse {mse.item():.5f}")
    vae.eval()
    latents = encode(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, latents * vae.config.scaling_factor


@torch.no_grad()
def encode(vae, images, batch_size=512):
    """Unscaled latent means of images in [0, 1]."""
    return torch.cat([vae.encode(images[i:i + batch_size] * 2 - 1).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def decode(vae, latents, batch_size=512):
    """Images in [0, 1] from scaled latents."""
    return torch.cat([((vae.decode(latents[i:i + batch_size] / vae.config.scaling_factor).sample + 1) / 2)
                      .clamp(0, 1) for i in range(0, len(latents), batch_size)])


class EMA:
    """Exponential moving average of a set of modules' parameters, with the usual warm start."""

    def __init__(self, modules, decay):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_params(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


@dataclass(frozen=True)
class LoopSettings:
    """What the training loop of both worlds takes from a run's config."""
    seed: int
    steps: int
    batch: int
    lr: float
    warmup_steps: int
    caption_dropout: float
    ema_decay: float


def train_on_captions(modules, latents, attrs, settings: LoopSettings, batch_loss, log, label):
    """The training loop both worlds share: each step a batch of cached latents and their captions (dropped to ""
    at ``caption_dropout``, for classifier-free guidance), ``batch_loss(x0, captions, generator)`` the denoiser's
    loss on them; AdamW with weight decay, linear warm-up then cosine, gradients clipped at 1, and an EMA of the
    weights, which the modules take at the end. Random draws come from generators seeded with ``seed``."""
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    params = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings.warmup_steps, settings.steps))
    ema = EMA(modules, settings.ema_decay)
    for module in modules:
        module.train()
    start, running = time.time(), 0.0
    for step in range(settings.steps):
        idx = torch.randint(0, len(latents), (settings.batch,), generator=generator)
        captions = ["" if rng.random() < settings.caption_dropout else
                    world.caption(attrs[i]["shape"], attrs[i]["colour"], attrs[i]["texture"], rng)
                    for i in idx.tolist()]
        loss = batch_loss(latents[idx], captions, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.update()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == settings.steps - 1:
            log(f"{label} step {step}/{settings.steps} loss {running:.4f} ({time.time() - start:.0f} s)")
    ema.copy_to_params()
    for module in modules:
        module.eval()


def train_diffusion(latents, attrs, tokenizer, cfg, log):
    """Train text encoder and UNet jointly to predict the noise, with caption dropout for CFG.

    Loss weighting is min-SNR (gamma 5), which spends the small budget on the noisy timesteps
    where the shape and colour of the image are decided.
    """
    torch.manual_seed(cfg.seed)
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = snr.clamp(max=cfg.min_snr_gamma) / snr

    def batch_loss(x0, captions, generator):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, text_encoder(ids)[0]).sample
        return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * loss_weight[t]).mean()

    settings = LoopSettings(cfg.seed, cfg.unet_steps, cfg.unet_batch, cfg.unet_lr, cfg.warmup_steps, cfg.caption_dropout,
                            cfg.ema_decay)
    train_on_captions([unet, text_encoder], latents, attrs, settings, batch_loss, log, "unet")
    return text_encoder, unet


def save_pipeline(out_dir, vae, text_encoder, tokenizer, unet):
    """Write a StableDiffusionPipeline directory; the UNet is stored in fp16 to keep it small
    (diffusers loads it back as fp32 by default)."""
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=copy.deepcopy(unet).half(), scheduler=build_scheduler(),
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(out_dir, safe_serialization=True)


def train_all(out_dir=world.DEFAULT_MODEL_DIR, judge_path=world.DEFAULT_JUDGE_PATH,
              cfg=None, log=print):
    """Run every stage, write the pipeline and judge, and return a report with timings."""
    cfg = cfg or TrainConfig()
    torch.set_num_threads(2)
    out_dir, judge_path = Path(out_dir), Path(judge_path)
    report = {"config": asdict(cfg), "seconds": {}}
    clock = time.time()

    def lap(stage):
        nonlocal clock
        report["seconds"][stage] = round(time.time() - clock, 1)
        log(f"== {stage} done in {report['seconds'][stage]:.0f} s")
        clock = time.time()

    judge = judge_lib.train_judge(steps=cfg.judge_steps, seed=cfg.seed, log=log)
    judge_path.parent.mkdir(parents=True, exist_ok=True)
    judge_lib.save_judge(judge, judge_path)
    report["judge_accuracy_fresh"] = judge_lib.accuracy_on_fresh_images(judge)
    log(f"judge accuracy on fresh images: {report['judge_accuracy_fresh']}")
    lap("judge")

    images, attrs = make_images(cfg.n_images, cfg.seed + 1)
    vae, latents = train_vae(images, cfg, log)
    report["judge_accuracy_vae_reconstructions"] = _judge_reconstructions(judge, vae, images[:1000], attrs[:1000])
    log(f"judge accuracy on VAE reconstructions: {report['judge_accuracy_vae_reconstructions']}")
    lap("vae")

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir / "tokenizer")
    text_encoder, unet = train_diffusion(latents, attrs, tokenizer, cfg, log)
    save_pipeline(out_dir, vae, text_encoder, tokenizer, unet)
    lap("text_encoder+unet")
    return report


def _judge_reconstructions(judge, vae, images, attrs):
    """Share of VAE reconstructions whose judged shape/colour/texture match the drawn ones."""
    latents = encode(vae, images) * vae.config.scaling_factor
    predicted = judge_lib.classify(judge, decode(vae, latents))
    return {key: float(np.mean([p == a[key] for p, a in zip(predicted[key], attrs)]))
            for key in predicted}
