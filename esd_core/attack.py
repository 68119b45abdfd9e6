"""Concept Inversion (Pham et al., ICLR 2024): does an erased concept come back under a new word for it?

The attack learns one new token by textual inversion. Images of the concept are drawn by the base model; at
every step some of them are noised at random timesteps, and the token's vector (one per text encoder) is
trained so that the erased model, prompted with templates in which the token stands for the concept, predicts
that noise. An erasure that only cut the concept's words loose from the concept is undone by such a token; one
that removed what the model can draw is not. Runs on any host that can encode a prompt with a learned token.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .erasure_file import write_atomically
from .host import ErasureHost
from .sampling import guided_trajectory

def check_attackable(pipeline) -> None:
    """Refuse a pipeline the attack cannot run on: it learns its token through a Stable Diffusion UNet's host."""
    if getattr(pipeline, "unet", None) is None:
        raise ValueError("The learned-token attack runs on Stable Diffusion UNets (SD1.x, SD2.x, SDXL, the sd tiny world) for "
                         "now, not on flow-matching transformers (Flux.1, SD3.x, the flow tiny world).")


TOKEN = "<erased-concept>"  # the new word; a template marks its place with "{}"
# Prompts a concept of a real model appears in, for a model without its own (the tiny world has them).
GENERIC_TEMPLATES = ("{}", "a picture of {}", "a painting of {}", "a photo of {}", "an image in the style of {}")
ROWS_PER_PASS = 16  # latents sampled together


@dataclass(frozen=True)
class InversionSettings:
    """How hard the attack tries: ``steps`` Adam steps at ``lr`` on ``batch_size`` noised images each, drawn from
    ``images`` images of the concept."""

    steps: int = 300
    lr: float = 5e-3
    batch_size: int = 8
    images: int = 32


@dataclass
class LearnedToken:
    """A token found by the attack: one vector per text encoder, the loss of every step, and the vectors as they
    were at the steps asked for (``snapshots``), to show how the attack's success grows with its steps."""

    vectors: list[torch.Tensor]
    losses: list[float] = field(default_factory=list)
    snapshots: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@torch.no_grad()
def concept_latents(host: ErasureHost, prompts: list[str], count: int, generator: torch.Generator, steps: int, guidance: float) -> torch.Tensor:
    """``count`` clean latents drawn by the host's model (whole guided DDIM trajectories), the prompts taken in turn."""
    scheduler = host.sampling_scheduler(steps)
    unconditional = host.encode("")
    latents = []
    for start in range(0, count, ROWS_PER_PASS):
        conds = [host.encode(prompts[i % len(prompts)]) for i in range(start, min(count, start + ROWS_PER_PASS))]
        latents.append(guided_trajectory(host, scheduler, steps, conds, unconditional, guidance, generator)[-1].latents)
    return torch.cat(latents)


def neutral_vectors(host: ErasureHost) -> list[torch.Tensor]:
    """The mean of each text encoder's vocabulary: where the attack starts, a word that means nothing in particular."""
    return [table.detach().float().mean(0) for table in host.token_tables()]


def random_vectors(host: ErasureHost, generator: torch.Generator) -> list[torch.Tensor]:
    """A random token: each vector drawn per dimension from the vocabulary's mean and spread (the attack's floor)."""
    tables = [table.detach().float().cpu() for table in host.token_tables()]
    return [(t.mean(0) + t.std(0) * torch.randn(t.shape[1], generator=generator)).to(host.device) for t in tables]


def denoising_loss(host: ErasureHost, latents: torch.Tensor, conds: list, generator: torch.Generator) -> torch.Tensor:
    """The diffusion training loss of the host's model under ``conds``, one row each: random latents of ``latents``
    noised at random timesteps, and the MSE of the predicted noise. Low where the conditioning draws those images."""
    rows = torch.randint(len(latents), (len(conds),), generator=generator)
    timesteps = torch.randint(len(host.alphas_cumprod), (len(conds),), generator=generator)
    noise = torch.randn(latents[rows].shape, generator=generator).to(latents.device)
    alpha = host.alphas_cumprod[timesteps].to(latents.device).view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * latents[rows] + (1 - alpha).sqrt() * noise
    return F.mse_loss(host.predict(x_t, timesteps, conds), noise)


def invert_token(host: ErasureHost, latents: torch.Tensor, templates: list[str], settings: InversionSettings,
                 generator: torch.Generator, snapshot_steps: tuple[int, ...] = (), progress: Callable[[float], None] | None = None) -> LearnedToken:
    """Textual inversion against the host's model as it is now: the vectors of ``TOKEN`` that make the model,
    prompted with ``templates`` (``{}`` marks the token), predict the noise added to ``latents``. ``progress`` is
    called with the loss after every step."""
    vectors = [vector.clone().requires_grad_(True) for vector in neutral_vectors(host)]
    optimizer = torch.optim.Adam(vectors, lr=settings.lr)
    token = LearnedToken(vectors)
    for step in range(1, settings.steps + 1):
        chosen = torch.randint(len(templates), (settings.batch_size,), generator=generator).tolist()
        encoded = {i: host.encode_with_token(templates[i].format(TOKEN), TOKEN, vectors) for i in set(chosen)}
        loss = denoising_loss(host, latents, [encoded[i] for i in chosen], generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        token.losses.append(loss.item())
        if progress is not None:
            progress(token.losses[-1])
        if step in snapshot_steps:
            token.snapshots[step] = [vector.detach().clone() for vector in vectors]
    token.vectors = [vector.detach() for vector in vectors]
    return token


@torch.no_grad()
def encode_templates(host: ErasureHost, templates: list[str], vectors: list[torch.Tensor]) -> list:
    """Each template's conditioning with the token read as ``vectors``."""
    return [host.encode_with_token(template.format(TOKEN), TOKEN, vectors) for template in templates]


def save_token(path: str, vectors: list[torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a learned token as an embedding file ComfyUI and A1111 load: ``emb_params`` for one text encoder,
    ``clip_l``/``clip_g`` for SDXL's two."""
    names = ["emb_params"] if len(vectors) == 1 else ["clip_l", "clip_g"]
    tensors = {name: vector.detach().float().cpu().reshape(1, -1).contiguous() for name, vector in zip(names, vectors, strict=True)}
    write_atomically(path, lambda temp: save_file(tensors, temp, metadata=metadata))
