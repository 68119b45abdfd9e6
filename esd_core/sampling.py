"""Producing x_t the way ESD does: a partial DDIM trajectory from noise, with classifier-free guidance."""

from typing import NamedTuple

import torch
from diffusers import DDIMScheduler

from .host import ErasureHost


class TrajectoryState(NamedTuple):
    """The latents after k DDIM steps (one row per trajectory) and the 1000-step timestep of their noise level;
    with ``predictions``, the model's e(uncond) and e(cond) there, stacked on dim 0, which the next step was taken
    with (None after the last step, or when not asked for)."""

    latents: torch.Tensor
    timestep: int
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
def ddim_trajectory(
    host: ErasureHost,
    scheduler: DDIMScheduler,
    steps: int,
    conds: list,
    uncond,
    guidance: float,
    generator: torch.Generator,
    keep_predictions: bool = False,
) -> list[TrajectoryState]:
    """Run ``steps`` guided DDIM steps from Gaussian noise, one trajectory per cond, all in one batch; return
    every state, 0..steps, with the predictions each step was taken with if ``keep_predictions``.

    What "right" means: the noise starts at ``scheduler.timesteps[0]`` and each DDIM step moves the latent
    from ``timesteps[i]`` to ``timesteps[i + 1]``. So state k (after k steps) carries the noise level of
    ``timesteps[k]``, and that is the timestep the loss must be computed at. (The reference code maps the
    step index to the 1000-step schedule one step late.)
    """
    rows = len(conds)
    noise = torch.randn((rows, *host.latent_shape), generator=generator, dtype=torch.float32)
    x = noise.to(host.device) * scheduler.init_noise_sigma
    states = []
    for step in range(steps):
        timestep = int(scheduler.timesteps[step])
        predictions = host.predict_eps(torch.cat([x, x]), timestep, [uncond] * rows + conds).unflatten(0, (2, rows))
        states.append(TrajectoryState(x, timestep, predictions if keep_predictions else None))
        eps_uncond, eps_cond = predictions
        x = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), timestep, x).prev_sample
    clean = steps == len(scheduler.timesteps)  # a whole trajectory ends at the schedule's first timestep
    states.append(TrajectoryState(x, 0 if clean else int(scheduler.timesteps[steps])))
    return states
