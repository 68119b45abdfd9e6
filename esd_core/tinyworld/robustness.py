"""The attack on the tiny world, judged: how often a learned token brings an erased concept back.

Groups of images, all drawn with the benchmark's sampler (``evaluate``) and judged for the concept:
  - erased, synonym: the concept's own prompts and its synonym's, under the erased model (as ``esd-erase eval``);
  - attack: the templates with the token learned against the erased model, under the erased model;
  - random token: the templates with a random token, under the erased model (the floor);
  - base attack: a token learned the same way against the base model, under the base model (the attack works).
"""

import time

import torch
from tqdm.auto import tqdm

from esd_core.apply import applied_delta, load_for
from esd_core.attack import InversionSettings, TOKEN, check_attackable, concept_latents, encode_templates, invert_token, random_vectors
from esd_core.diffusers_host import DiffusersHost

from . import judge as judge_lib
from . import world
from .evaluate import GUIDANCE_SCALE, STEPS, concept_prompts, load_pipeline, run_groups, save_grid


def attack_templates(concept: str) -> list[str]:
    """The prompts the concept appears in, with ``{}`` where its name was: "a {}", "a red {}", ... for a shape."""
    return concept_prompts(concept, "{}")


def inverted(host, latents, templates, settings: InversionSettings, generator, against: str, snapshot_steps=()):
    """``invert_token`` with a progress bar naming the model attacked."""
    with tqdm(total=settings.steps, desc=f"learning a token against the {against} model", unit="step") as bar:
        def progress(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4g}")
            bar.update(1)

        return invert_token(host, latents, templates, settings, generator, snapshot_steps, progress)


def attack_erasure(model_dir, concept: str, delta_path: str, settings: InversionSettings, n: int = 64, seed: int = 0,
                   controls: bool = True, snapshot_steps: tuple[int, ...] = (), grid_path=None) -> tuple[dict, list[torch.Tensor]]:
    """Run the attack on an erasure of ``concept`` and judge it; returns (a JSON-serialisable result, the learned
    token's vectors). ``controls``: also the base-model attack; ``snapshot_steps``: also judge the token as it was
    at these steps (the success curve)."""
    concept = world.canonical(concept)
    pipe, judge = load_pipeline(model_dir), judge_lib.load_judge()
    check_attackable(pipe)
    erasure = load_for(pipe.unet, delta_path)  # refuses a misfit before anything runs
    host = DiffusersHost(pipe)
    generator = torch.Generator().manual_seed(seed)
    templates = attack_templates(concept)
    times = {}

    start = time.perf_counter()
    latents = concept_latents(host, concept_prompts(concept), settings.images, generator, STEPS, GUIDANCE_SCALE)
    times["base_images_s"] = time.perf_counter() - start

    def token_group(name, model, vectors):
        encoded = [embeds for embeds, _ in encode_templates(host, templates, vectors)]
        return {"name": name, "model": model, "concept": concept, "prompts": [t.format(TOKEN) for t in templates], "encoded": encoded}

    def text_group(name, model, prompts):
        return {"name": name, "model": model, "concept": concept, "prompts": prompts, "encoded": [host.encode(p)[0] for p in prompts]}

    groups_by_model = {"base": [], "erased": []}
    if controls:
        start = time.perf_counter()
        base_token = inverted(host, latents, templates, settings, generator, "base")
        times["base_attack_s"] = time.perf_counter() - start
        groups_by_model["base"] += [text_group("base", "base", concept_prompts(concept)),
                                    token_group("base attack", "base", base_token.vectors)]
    with applied_delta(pipe.unet, erasure):
        start = time.perf_counter()
        token = inverted(host, latents, templates, settings, generator, "erased", snapshot_steps)
        times["attack_s"] = time.perf_counter() - start
        groups_by_model["erased"] += [
            text_group("erased", "erased", concept_prompts(concept)),
            text_group("synonym", "erased", concept_prompts(concept, world.SYNONYMS[concept])),
            token_group("attack", "erased", token.vectors),
            token_group("random token", "erased", random_vectors(host, generator)),
            *(token_group(f"attack@{step}", "erased", vectors) for step, vectors in sorted(token.snapshots.items())),
        ]
        start = time.perf_counter()
        judged = {"erased": run_groups(pipe, judge, groups_by_model["erased"], n, seed)}
    if controls:
        judged["base"] = run_groups(pipe, judge, groups_by_model["base"], n, seed)
    times["judging_s"] = time.perf_counter() - start

    groups, images = [], []
    for model in ("base", "erased"):
        if model not in judged:
            continue
        rates, per_group = judged[model]
        for group, rate in zip(groups_by_model[model], rates):
            groups.append({key: value for key, value in group.items() if key != "encoded"} | rate)
        images += per_group
    if grid_path is not None:
        save_grid(grid_path, groups, images, titles=("images judged (the group's model and prompts: left)", ""))
    result = {
        "concept": concept, "delta_path": str(delta_path), "n": n, "seed": seed,
        "settings": {"steps": settings.steps, "lr": settings.lr, "batch_size": settings.batch_size, "images": settings.images},
        "templates": templates, "times": times, "losses": token.losses, "groups": groups,
        "summary": {group["name"]: group["rate"] for group in groups},
    }
    return result, token.vectors


def format_attack(result: dict) -> str:
    """A plain-text table of ``attack_erasure``'s result, one line per group."""
    settings = result["settings"]
    lines = [f"attack on the erasure of {result['concept']!r}: a token learned in {settings['steps']} steps on "
             f"{settings['images']} base-model images; {result['n']} images per group, seed {result['seed']}",
             f"{'group':<16}{'model':<8}{'shows ' + result['concept']:<22}example prompt"]
    for group in result["groups"]:
        cell = f"{100 * group['rate']:5.1f}% [{100 * group['ci95'][0]:3.0f}-{100 * group['ci95'][1]:3.0f}]"
        lines.append(f"{group['name']:<16}{group['model']:<8}{cell:<22}{group['prompts'][-1]!r}")
    lines.append("attack: the learned token under the erased model (its success rate); random token: the floor; base attack: "
                 "the same attack on the base model. Intervals 95% (Wilson).")
    times = ", ".join(f"{key[:-2].replace('_', ' ')} {value:.0f} s" for key, value in result["times"].items())
    lines.append(f"times: {times}")
    return "\n".join(lines)
