"""The diffusers host for flow-matching transformers: Flux.1 (dev, schnell) and SD3.x pipelines.

These models predict a velocity v = noise - x0 along the straight path x_sigma = (1 - sigma) x0 + sigma noise, and
a sampler steps with Euler on a shifted sigma schedule. ESD's target is the paper's negative guidance taken in that
velocity space, at the exact sigma of x_t: guidance combines velocities as it combines epsilons (both are affine in
the score at a fixed x_t and sigma), so ``v0 - eta (vc - v0)`` is the model's own guided prediction with scale -eta.

How each model is guided, as its pipeline samples it: SD3.x with true classifier-free guidance (the empty prompt as
the unconditional input); Flux.1-dev with its distilled guidance, an input of the model, fixed for every prediction
(sampling and targets alike; its "unconditional" prediction is the empty prompt at the same guidance); Flux.1-schnell
with none. Latents are kept unpacked, (channels, height, width), as the VAE sees them; Flux's 2x2 packing into
tokens happens inside ``predict``.
"""

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch.nn.utils import parametrize

from .apply import transformer_family
from .diffusers_host import PipelineHost
from .keys import TransformerLayout


def prompt_length(pipeline: DiffusionPipeline) -> int:
    """The T5 prompt length a pipeline uses by default (Flux.1-dev 512, schnell and SD3 256), at most its last
    tokenizer's: without a T5 encoder (the tiny flow world) SD3 puts zeros in its place, as long as the CLIP prompt."""
    transformer = pipeline.transformer
    distilled = isinstance(transformer, FluxTransformer2DModel) and transformer.config.guidance_embeds
    last_tokenizer = pipeline.tokenizer_3 if getattr(pipeline, "tokenizer_3", None) is not None else pipeline.tokenizer_2
    return min(512 if distilled else 256, last_tokenizer.model_max_length)


def euler_scheduler(config: dict, steps: int, device, mu: float | None = None, sigmas: list[float] | None = None) -> FlowMatchEulerDiscreteScheduler:
    """Euler on a flow model's sigma schedule in ``steps`` steps, shifted as the model is sampled: with dynamic
    shifting (Flux) sigmas 1 .. 1/steps moved by ``mu``, else (SD3) by the config's fixed shift; or on the given
    ``sigmas``, which the config's shift then moves (none at shift 1)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    if scheduler.config.use_dynamic_shifting:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
    else:
        scheduler.set_timesteps(steps, device=device, sigmas=sigmas)
    return scheduler


class FlowMatching:
    """What the flow-matching hosts (diffusers and ComfyUI) share: the layers methods select, the prediction, and
    how a sampler combines its predictions."""

    architecture = "mmdit"
    prediction = "flow"
    is_flux: bool

    def sampler_prediction(self, unconditional: torch.Tensor, conditional: torch.Tensor, guidance: float) -> torch.Tensor:
        """SD3.x: classifier-free guidance. Flux.1: the conditional prediction, whose guidance (if any) is an input."""
        return conditional if self.is_flux else unconditional + guidance * (conditional - unconditional)


class FlowDiffusersHost(FlowMatching, PipelineHost):
    """One diffusers Flux.1 or SD3.x pipeline: its transformer and text encoders. ``guidance`` is Flux.1-dev's
    distilled guidance, used for every prediction; other models take their guidance from the sampler."""

    def __init__(self, pipeline: DiffusionPipeline, device="cpu", resolution: int | None = None,
                 gradient_checkpointing: bool = False, guidance: float = 3.5):
        if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"The pipeline's scheduler is {type(pipeline.scheduler).__name__}; a flow-matching model needs its "
                             "FlowMatchEulerDiscreteScheduler config (scheduler/scheduler_config.json of the model folder).")
        super().__init__(pipeline, pipeline.transformer, device, gradient_checkpointing)
        self.transformer = self.denoiser
        config = self.transformer.config
        self.is_flux = isinstance(self.transformer, FluxTransformer2DModel)
        self.family = transformer_family(self.transformer)
        self.distilled_guidance = guidance if self.is_flux and config.guidance_embeds else None
        if self.is_flux:  # 2x2 latent patches become tokens; the pipeline's default is 1024 px (128 latents)
            channels, multiple, native = config.in_channels // 4, 2 * self.vae_scale_factor, pipeline.default_sample_size
        else:
            channels, multiple, native = config.in_channels, config.patch_size * self.vae_scale_factor, config.sample_size
        latent_size = self.latent_size(resolution, multiple, native)
        self.latent_shape = (channels, latent_size, latent_size)
        self.max_sequence_length = prompt_length(pipeline)
        self.scheduler_config = pipeline.scheduler.config

    def ldm_name(self, name: str) -> str:
        return name  # erasure files name a transformer's layers as diffusers does (``TransformerLayout``)

    @property
    def layout(self) -> TransformerLayout:
        return TransformerLayout(self.layer_tensors())

    def sampling_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        """Euler on the model's own sigma schedule, set as its pipeline sets it: Flux's shift by mu from the token
        count, SD3's fixed shift."""
        config, mu = self.scheduler_config, None
        if config.use_dynamic_shifting:
            tokens = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
            mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
        return euler_scheduler(config, steps, self.device, mu)

    def _encode_prompt(self, text: str):
        """The pipeline's own encoding: (sequence embeddings, pooled embedding)."""
        if self.is_flux:
            embeds, pooled, _ = self.pipeline.encode_prompt(text, text, self.device, max_sequence_length=self.max_sequence_length)
        else:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(text, text, text, device=self.device, do_classifier_free_guidance=False,
                                                               max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    def predict(self, x_t: torch.Tensor, timestep, conds: list) -> torch.Tensor:
        """The velocity, fp32, (len(conds), C, H, W); ``timestep`` is sigma * 1000, as the scheduler counts."""
        batch = len(conds)
        sample = x_t.to(self.device, self.dtype).expand(batch, -1, -1, -1)
        timesteps = torch.as_tensor(timestep, device=self.device, dtype=torch.float32).expand(batch)
        embeds = torch.cat([embeds for embeds, _ in conds]).to(self.dtype)
        pooled = torch.cat([pooled for _, pooled in conds]).to(self.dtype)
        with parametrize.cached():  # a weight the delta is added to is computed once per pass, not at every read
            if self.is_flux:
                output = self._predict_flux(sample, timesteps, embeds, pooled)
            else:
                output = self.transformer(hidden_states=sample, timestep=timesteps.to(self.dtype), encoder_hidden_states=embeds,
                                          pooled_projections=pooled, return_dict=False)[0]
        return output.float()

    def _predict_flux(self, sample, timesteps, embeds, pooled) -> torch.Tensor:
        """Flux takes 2x2 latent patches as tokens with their positions, sigma itself as the timestep, and (dev) the guidance."""
        batch, channels, height, width = sample.shape
        tokens = FluxPipeline._pack_latents(sample, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.distilled_guidance is not None:
            guidance = torch.full((batch,), self.distilled_guidance, device=self.device, dtype=self.dtype)
        output = self.transformer(hidden_states=tokens, timestep=(timesteps / 1000).to(self.dtype), guidance=guidance,
                                  pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
                                  return_dict=False)[0]
        pixels = self.vae_scale_factor
        return FluxPipeline._unpack_latents(output, height * pixels, width * pixels, pixels)
