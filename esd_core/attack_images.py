"""The attack on any diffusers model, for a person to judge: a grid of what the learned token draws under the
erased model, beside what the concept's own prompts draw there (and, as the control, the token learned against the
base model, under the base model). The tiny world judges its attacks itself (``tinyworld.robustness``)."""

import torch
from PIL import Image, ImageDraw

from .apply import applied_delta
from .attack import GENERIC_TEMPLATES, InversionSettings, concept_latents, encode_templates, invert_token
from .diffusers_host import DiffusersHost
from .erasure_file import ErasureDelta, write_atomically

SAMPLE_STEPS = 30  # the base model's images of the concept, and the grid's
GUIDANCE = 7.5  # Stable Diffusion's usual guidance


def attack_images(host: DiffusersHost, erasure: ErasureDelta, concept: str, settings: InversionSettings, seed: int,
                  per_row: int, grid_path: str, controls: bool = True, progress=None) -> list[torch.Tensor]:
    """Learn a token for ``concept`` against the erased model and write the grid; returns the token's vectors.
    Row i of the grid uses seeds seed..seed+per_row-1 and the templates in turn."""
    pipeline = host.pipeline
    generator = torch.Generator().manual_seed(seed)
    prompts = [template.format(concept) for template in GENERIC_TEMPLATES]
    latents = concept_latents(host, prompts, settings.images, generator, SAMPLE_STEPS, GUIDANCE)
    rows = []
    if controls:
        base = invert_token(host, latents, list(GENERIC_TEMPLATES), settings, generator, progress=progress)
        rows += [("base model, concept", draw(host, [host.encode(p) for p in prompts], seed, per_row)),
                 ("base model, token", draw(host, encode_templates(host, list(GENERIC_TEMPLATES), base.vectors), seed, per_row))]
    with applied_delta(pipeline.unet, erasure):
        token = invert_token(host, latents, list(GENERIC_TEMPLATES), settings, generator, progress=progress)
        rows += [("erased, concept", draw(host, [host.encode(p) for p in prompts], seed, per_row)),
                 ("erased, token", draw(host, encode_templates(host, list(GENERIC_TEMPLATES), token.vectors), seed, per_row))]
    save_rows(grid_path, rows)
    return token.vectors


@torch.no_grad()
def draw(host: DiffusersHost, conds: list, seed: int, count: int) -> list[Image.Image]:
    """``count`` images by the pipeline, image i from conditioning i (taken in turn) and seed + i."""
    images = []
    for i in range(count):
        embeds, pooled = conds[i % len(conds)]
        extra = {} if pooled is None else {"pooled_prompt_embeds": pooled}
        height, width = (size * host.vae_scale_factor for size in host.latent_shape[1:])
        images += host.pipeline(prompt_embeds=embeds, **extra, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                                height=height, width=width, generator=torch.Generator().manual_seed(seed + i)).images
    return images


def save_rows(path: str, rows: list[tuple[str, list[Image.Image]]], label_width: int = 150) -> None:
    """A PNG with one labelled row of images per entry."""
    width, height = rows[0][1][0].size
    sheet = Image.new("RGB", (label_width + width * len(rows[0][1]), height * len(rows)), "white")
    for r, (label, images) in enumerate(rows):
        ImageDraw.Draw(sheet).text((4, r * height + height // 2), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image, (label_width + c * width, r * height))
    write_atomically(path, lambda temp: sheet.save(temp, format="PNG"))
