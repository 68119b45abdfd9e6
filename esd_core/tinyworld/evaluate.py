"""Benchmark an erasure on the tiny world: generate fixed-seed images before and after, judge them.

For an erased concept C (a shape or a colour) the prompt groups are:
  - C by its name: "a circle", "a red circle", ... (share still judged C: lower is better after)
  - C by its synonym: "a disc", "a red disc", ... (leakage through the other name)
  - every other concept of C's kind and every concept of the other kind, in prompts that do not
    mention C ("a square", "a green square", "a blue shape", "a blue star", ...): accuracy, which
    should stay as it was before.
Image i of every group uses seed + i, before and after alike, so the grid shows the same noise.
Sampling: DDIM, 25 steps, classifier-free guidance 5.0 (strong enough for a 2-layer text encoder
to steer reliably, low enough not to saturate colours).
"""
import copy
import math
import threading
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw

from esd_core import threads
from esd_core.apply import applied_delta, load_for
from esd_core.options import MAX_SEED
from esd_core.diffusers_host import load_pipeline as load_diffusers_pipeline

from . import judge as judge_lib
from . import world

STEPS = 25
GUIDANCE_SCALE = 5.0
BATCH_SIZE = 64


def load_pipeline(model_dir=None):
    """The world's StableDiffusionPipeline (the shipped one for None) with a DDIM scheduler."""
    pipe = load_diffusers_pipeline(str(model_dir or world.DEFAULT_MODEL_DIR))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts, seeds):
    """Images (N, 3, 32, 32) in [0, 1], one per (prompt, seed); a seed fixes its image's noise. The prompts are texts,
    or a tensor of encoded prompts (one row each). With two or more CPU threads, each batch runs as two threads on
    half its images each (``esd_core.threads``)."""
    workers = threads.WORKERS if torch.get_num_threads() >= threads.WORKERS else 1
    pipes = [pipe] + [_twin(pipe) for _ in range(workers - 1)]
    stop = threading.Event()
    out = []
    for start in range(0, len(prompts), BATCH_SIZE):
        batch = slice(start, min(start + BATCH_SIZE, len(prompts)))
        parts = [slice(batch.start + rows.start, batch.start + rows.stop) for rows in threads.split_rows(batch.stop - batch.start, workers)]
        out += threads.map_in_threads(lambda job: _images(*job, prompts, seeds, stop), list(zip(pipes, parts)), stop)
    return torch.cat(out).float()


def _images(pipe, rows: slice, prompts, seeds, stop: threading.Event) -> torch.Tensor:
    """One sampling call for the prompts and seeds of ``rows``: images (n, 3, 32, 32). Once ``stop`` is set (Ctrl-C
    in the main thread), the call skips its remaining steps, as diffusers' interrupt flag does."""

    def stop_if_asked(pipeline, step, timestep, outputs):
        pipeline._interrupt = stop.is_set()
        return outputs

    generators = [torch.Generator().manual_seed(s) for s in seeds[rows]]
    prompt = {"prompt_embeds": prompts[rows]} if torch.is_tensor(prompts) else {"prompt": list(prompts[rows])}
    images = pipe(**prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE,
                  generator=generators, output_type="np", callback_on_step_end=stop_if_asked).images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _twin(pipe):
    """A pipeline sharing ``pipe``'s models (so also a delta applied to its UNet) with a scheduler and a tokenizer of
    its own, since a sampling call changes its scheduler's state and sets its fast tokenizer's padding mode."""
    components = {**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config),
                  "tokenizer": copy.deepcopy(pipe.tokenizer)}
    twin = StableDiffusionPipeline(**components, requires_safety_checker=False)
    twin.set_progress_bar_config(disable=True)
    return twin


def concept_prompts(concept, name=None, avoid=None):
    """Prompts naming a concept (by 'name', default its own name), never mentioning 'avoid'.

    A shape gets "a {shape}" and "a {colour} {shape}"; a colour gets "a {colour} shape" and
    "a {colour} {shape}", over the attributes of the other kind except 'avoid'.
    """
    name = name or concept
    if world.kind_of(concept) == "shape":
        return [f"a {name}"] + [f"a {c} {name}" for c in world.COLOURS if c != avoid]
    return [f"a {name} shape"] + [f"a {name} {s}" for s in world.SHAPES if s != avoid]


def prompt_groups(concept):
    """The groups of an erasure benchmark for 'concept' (see the module docstring)."""
    kind = world.kind_of(concept)
    same = world.SHAPES if kind == "shape" else world.COLOURS
    other = world.COLOURS if kind == "shape" else world.SHAPES
    groups = [{"name": concept, "role": "erased", "concept": concept,
               "prompts": concept_prompts(concept)},
              {"name": world.SYNONYMS[concept], "role": "synonym", "concept": concept,
               "prompts": concept_prompts(concept, world.SYNONYMS[concept])}]
    for c in [c for c in same if c != concept] + other:
        groups.append({"name": c, "role": "other", "concept": c,
                       "prompts": concept_prompts(c, avoid=concept)})
    return groups


def wilson_interval(count, n, z=1.96):
    """95% Wilson score interval of a proportion count/n."""
    if n == 0:
        return [0.0, 1.0]
    p = count / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired_change(hits_before, hits_after, z=1.96):
    """The change in rate (after - before) of images judged one by one on the same seeds, with a 95%
    interval for paired proportions (Agresti-Min: half an image added to each cell of the before/after
    table, then Wald), which stays wide when few or no images moved."""
    lost = sum(b and not a for b, a in zip(hits_before, hits_after))
    gained = sum(a and not b for b, a in zip(hits_before, hits_after))
    lost_adjusted, gained_adjusted, n_adjusted = lost + 0.5, gained + 0.5, len(hits_before) + 2
    centre = (gained_adjusted - lost_adjusted) / n_adjusted
    spread = (lost_adjusted + gained_adjusted) - (gained_adjusted - lost_adjusted) ** 2 / n_adjusted
    half = z * math.sqrt(max(0.0, spread)) / n_adjusted
    return {"change": (gained - lost) / len(hits_before), "ci95": [max(-1.0, centre - half), min(1.0, centre + half)]}


def _share(hits):
    """Per-image verdicts (1: yes), with how many say yes and their share."""
    return {"rate": sum(hits) / len(hits), "count": sum(hits), "n": len(hits), "hits": hits}


def _rate(judged, concept):
    """How many judged images show 'concept' (in its own attribute), with rate, interval and the
    per-image verdicts; and how many the judge reads as striped, since no prompt names a texture and an
    erasure may still change it (the circle's turned plain stars striped)."""
    shows = _share([int(label == concept) for label in judged[world.kind_of(concept)]])
    striped = _share([int(label == "striped") for label in judged["texture"]])
    return {**shows, "ci95": wilson_interval(shows["count"], shows["n"]), "striped": striped}


def run_groups(pipe, judge, groups, n, seed):
    """Generate and judge n images per group, image i of a group from its prompt i (taken in turn) and seed + i;
    returns (per-group rates, per-group images). A group's prompts are texts, or with "encoded" the prompts'
    encodings, one row each (a learned token's, which no text names)."""
    prompts = [(g.get("encoded", g["prompts"]))[i % len(g["prompts"])] for g in groups for i in range(n)]
    if "encoded" in groups[0]:
        prompts = torch.cat(prompts)
    seeds = [seed + i for _ in groups for i in range(n)]
    images = generate(pipe, prompts, seeds)
    rates, per_group = [], []
    for k, group in enumerate(groups):
        chunk = images[k * n:(k + 1) * n]
        rates.append(_rate(judge_lib.classify(judge, chunk), group["concept"]))
        per_group.append(chunk)
    return rates, per_group


def evaluate(model_dir, concept, delta_path=None, n=64, seed=0, grid_path=None, strength=1.0):
    """Benchmark the erasure of 'concept' stored in delta_path (None: the base model only).

    Returns a JSON-serialisable dict: settings, and per prompt group its role ("erased",
    "synonym" or "other"), prompts, and "before"/"after" = {rate, count, n, ci95, hits, striped} where
    rate is the share of images the judge assigns to the group's concept and striped the share it
    reads as striped ("after" is None without a delta), "change" and "striped_change" (paired, with
    intervals), plus a "summary" of the erased, synonym and mean other rates.
    """
    concept = world.canonical(concept)
    if n < 1:
        raise ValueError(f"n (images per prompt group) must be at least 1, got {n}.")
    if not 0 <= seed <= MAX_SEED - (n - 1):
        raise ValueError(f"seed must be from 0 to {MAX_SEED - (n - 1)} (image i takes seed + i, at most 2**64 - 1), got {seed}.")
    pipe, judge = load_pipeline(model_dir), judge_lib.load_judge()
    delta = None if delta_path is None else load_for(pipe.unet, delta_path)  # refuses a misfit before any image is drawn
    groups = prompt_groups(concept)
    before, images_before = run_groups(pipe, judge, groups, n, seed)
    after, images_after = [None] * len(groups), None
    if delta is not None:
        with applied_delta(pipe.unet, delta, strength=strength):
            after, images_after = run_groups(pipe, judge, groups, n, seed)
    result = {
        "model_dir": str(model_dir or world.DEFAULT_MODEL_DIR), "concept": concept,
        "kind": world.kind_of(concept), "synonym": world.SYNONYMS[concept],
        "delta_path": None if delta_path is None else str(delta_path), "strength": strength,
        "n": n, "seed": seed, "steps": STEPS, "guidance_scale": GUIDANCE_SCALE,
        "groups": [{**g, "before": b, "after": a,
                    "change": None if a is None else paired_change(b["hits"], a["hits"]),
                    "striped_change": None if a is None else paired_change(b["striped"]["hits"], a["striped"]["hits"])}
                   for g, b, a in zip(groups, before, after)],
    }
    result["summary"] = _summary(result["groups"])
    if grid_path is not None:
        save_grid(grid_path, groups, images_before, images_after)
    return result


def _summary(groups):
    """Erased-concept rate on its own and synonym prompts, and the mean accuracy on the others."""
    summary = {}
    for when in ("before", "after"):
        if groups[0][when] is None:
            continue
        others = [g[when]["rate"] for g in groups if g["role"] == "other"]
        summary[when] = {"erased": groups[0][when]["rate"], "synonym": groups[1][when]["rate"],
                         "others_mean": sum(others) / len(others)}
    return summary


def format_table(result):
    """A plain-text table of an evaluate() result, one line per prompt group."""
    def cell(r):
        return "-" if r is None else f"{100 * r['rate']:5.1f}% [{100 * r['ci95'][0]:3.0f}-{100 * r['ci95'][1]:3.0f}]"
    def change(c):
        return "-" if c is None else f"{100 * c['change']:+6.1f} [{100 * c['ci95'][0]:+4.0f},{100 * c['ci95'][1]:+4.0f}]"
    def striped(g):
        shares = [f"{100 * g[when]['striped']['rate']:.0f}" for when in ("before", "after") if g[when] is not None]
        return " -> ".join(shares) + "%"
    lines = [f"erasing {result['concept']!r} ({result['kind']}, synonym {result['synonym']!r}), "
             f"{result['n']} images per group, seed {result['seed']}, strength {result['strength']}",
             f"{'group':<12}{'role':<9}{'before':<20}{'after':<20}{'change (points)':<20}{'striped':<12}example prompt"]
    for g in result["groups"]:
        lines.append(f"{g['name']:<12}{g['role']:<9}{cell(g['before']):<20}{cell(g['after']):<20}"
                     f"{change(g['change']):<20}{striped(g):<12}{g['prompts'][-1]!r}")
    lines.append("erased/synonym: share still showing the erased concept (lower is better after); "
                 "other: accuracy (should stay). Intervals 95%; the change's is for paired images (the same seeds).")
    lines.append("striped: share of the images drawn striped; no prompt names a texture, so for the other groups "
                 "it should stay too (JSON: striped_change).")
    return "\n".join(lines)


GRID_TITLES = ("before (original model)", "after (erased model, same seeds)")


def save_grid(path, groups, images_before, images_after=None, per_row=8, scale=3, titles=GRID_TITLES):
    """PNG grid, one row per prompt group (named on the left) under a header: "before" (the original model's
    images), then on the right "after" (the erased model's, for the same seeds); ``titles`` name the halves."""
    def row(images):
        return np.concatenate([np.pad(img.permute(1, 2, 0).numpy(), ((1, 1), (1, 1), (0, 0)), constant_values=1)
                               for img in images[:per_row]], axis=1)
    gap = 6  # white columns between the halves
    rows = []
    for k in range(len(groups)):
        halves = [row(images_before[k])]
        if images_after is not None:
            halves += [np.ones((halves[0].shape[0], gap, 3)), row(images_after[k])]
        rows.append(np.concatenate(halves, axis=1))
    grid = Image.fromarray(world.to_uint8(np.concatenate(rows, axis=0)))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    left, top = 70, 20
    labelled = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    labelled.paste(grid, (left, top))
    draw = ImageDraw.Draw(labelled)
    draw.text((left + 4, 4), titles[0], fill="black")
    if images_after is not None:
        after_starts = (row(images_before[0]).shape[1] + gap) * scale
        draw.text((left + after_starts + 4, 4), titles[1], fill="black")
    row_height = grid.height // len(groups)
    for k, group in enumerate(groups):
        draw.text((4, top + k * row_height + row_height // 2 - 5), group["name"], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    labelled.save(path)


def base_quality(model_dir=None, n=32, seed=0, judge_path=world.DEFAULT_JUDGE_PATH):
    """Quality of the unedited model: for every shape and colour, the share of images judged to
    show it, on prompts naming it by name and by synonym. Returns {concept: {"name": rate-dict,
    "synonym": rate-dict}}."""
    pipe, judge = load_pipeline(model_dir), judge_lib.load_judge(judge_path)
    concepts = world.SHAPES + world.COLOURS
    groups = [{"concept": c, "prompts": concept_prompts(c, name)}
              for c in concepts for name in (c, world.SYNONYMS[c])]
    rates, _ = run_groups(pipe, judge, groups, n, seed)
    return {c: {"name": rates[2 * i], "synonym": rates[2 * i + 1]} for i, c in enumerate(concepts)}


def format_quality(table):
    """A plain-text table of base_quality()."""
    lines = [f"{'concept':<10}{'by name':>10}{'by synonym':>12}"]
    for concept, rates in table.items():
        lines.append(f"{concept:<10}{100 * rates['name']['rate']:9.1f}%{100 * rates['synonym']['rate']:11.1f}%"
                     f"  ({world.SYNONYMS[concept]}, n={rates['name']['n']})")
    return "\n".join(lines)
