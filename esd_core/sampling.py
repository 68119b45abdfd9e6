"""Producing x_t the way ESD does: a partial trajectory from noise, under guidance as the model is used.

Stable Diffusion UNets step with DDIM on their own noise schedule and classifier-free guidance. Flow-matching
transformers (Flux.1, SD3.x) step with Euler on their own shifted sigma schedule (diffusers'
FlowMatchEulerDiscreteScheduler); the host says how a sampler combines the two predictions of a step
(``ErasureHost.sampler_prediction``): true classifier-free guidance (SD, SD3), or the conditional prediction
alone when the guidance is an input of the model (Flux.1-dev) or absent (Flux.1-schnell).
"""

import copy
from typing import TYPE_CHECKING, NamedTuple

import torch
from diffusers import DDIMScheduler

if TYPE_CHECKING:  # the host's own module imports this one
    from .host import ErasureHost


class TrajectoryState(NamedTuple):
    """The latents after k steps (one row per trajectory) and the scheduler timestep of their noise level (an int on
    SD's 1000-step schedule, a float sigma * 1000 for flow matching); with ``predictions``, the model's p(uncond) and
    p(cond) there, stacked on dim 0, which the next step was taken with (None after the last step, or when not asked for)."""

    latents: torch.Tensor
    timestep: int | float
    predictions: torch.Tensor | None = None


def ddim_scheduler(alphas_cumprod: torch.Tensor, sample_steps: int) -> DDIMScheduler:
    """A DDIM scheduler on the host's own noise schedule, with SD's step placement (981, 961, ..., 1 for 50 steps)."""
    if sample_steps >= len(alphas_cumprod):  # SD's placement starts at timestep 1, so 1000 steps would need timestep 1000
        raise ValueError(f"sample_steps must be below the model's {len(alphas_cumprod)} training timesteps, got {sample_steps}. Try 50.")
    alphas_cumprod = alphas_cumprod.double().cpu()
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    betas = 1.0 - alphas_cumprod / previous
    scheduler = DDIMScheduler(
        num_train_timesteps=len(alphas_cumprod),
        trained_betas=betas.numpy(),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(sample_steps)
    return scheduler


@torch.no_grad()
def guided_trajectory(
    host: "ErasureHost",
    scheduler,
    steps: int,
    conds: list,
    uncond,
    guidance: float,
    generator: torch.Generator,
    keep_predictions: bool = False,
) -> list[TrajectoryState]:
    """Run ``steps`` guided steps of ``scheduler`` (the host's ``sampling_scheduler``) from Gaussian noise, one
    trajectory per cond, all in one batch; return every state, 0..steps, with the predictions each step was taken
    with if ``keep_predictions``.

    What "right" means: the noise starts at ``scheduler.timesteps[0]`` and each step moves the latent from
    ``timesteps[i]`` to ``timesteps[i + 1]``. So state k (after k steps) carries the noise level of
    ``timesteps[k]``, and that is the timestep the loss must be computed at. (The reference code maps the
    step index to the 1000-step schedule one step late.)
    """
    scheduler = copy.deepcopy(scheduler)  # a flow-matching scheduler counts its steps; each trajectory starts afresh
    rows = len(conds)
    noise = torch.randn((rows, *host.latent_shape), generator=generator, dtype=torch.float32)
    x = noise.to(host.device) * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at pure noise
    states = []
    for step in range(steps):
        timestep = scheduler.timesteps[step].item()
        predictions = host.predict(torch.cat([x, x]), timestep, [uncond] * rows + conds).unflatten(0, (2, rows))
        states.append(TrajectoryState(x, timestep, predictions if keep_predictions else None))
        unconditional, conditional = predictions
        x = scheduler.step(host.sampler_prediction(unconditional, conditional, guidance), timestep, x).prev_sample
    clean = steps == len(scheduler.timesteps)  # a whole trajectory ends at noise level 0
    states.append(TrajectoryState(x, 0 if clean else scheduler.timesteps[steps].item()))
    return states
