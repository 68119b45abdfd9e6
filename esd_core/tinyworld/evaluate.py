"""Benchmark an erasure on the tiny world: generate fixed-seed images before and after, judge them.

For the erased concepts (shapes or colours, one or several) the prompt groups are:
  - each erased concept C by its name: "a circle", "a red circle", ... and by its synonym: "a disc",
    "a red disc", ...: the share of images that show ANY erased concept (lower is better after: an
    erased circle must not turn into an erased star);
  - every concept not erased, in prompts that mention no erased one ("a square", "a green square",
    "a blue shape", "a blue star", ...): accuracy, which should stay as it was before;
  - for each kind that is erased, prompts that name no concept of that kind ("a red shape" ... when
    shapes are erased, "a circle" ... when colours are): the share showing an erased concept, which
    the erasure must not raise.
Every group also reports the share of images showing any erased concept (an erasure must not move
the concept into prompts that do not ask for it) and the share drawn striped (no prompt names a
texture, so it should stay too).
Image i of every group uses seed + i, before and after alike, so the grid shows the same noise.
Sampling: 25 steps (DDIM for the SD world, Euler on its own sigmas for the flow world), classifier-free guidance 5.0
(strong enough for a 2-layer text encoder to steer reliably, low enough not to saturate colours).
"""
import copy
import math
import threading
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image, ImageDraw

from esd_core import threads
from esd_core.apply import applied_delta, denoiser_of, load_for
from esd_core.options import MAX_SEED
from esd_core.diffusers_host import load_pipeline as load_diffusers_pipeline
from esd_core.flow_host import prompt_length

from . import judge as judge_lib
from . import world

STEPS = 25
GUIDANCE_SCALE = 5.0
BATCH_SIZE = 64


def load_pipeline(model_dir=None):
    """A world's pipeline (the shipped SD world for None) with its sampling scheduler (``sampling_scheduler``)."""
    pipe = load_diffusers_pipeline(str(model_dir or world.DEFAULT_MODEL_DIR))
    pipe.scheduler = sampling_scheduler(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_scheduler(pipe):
    """A fresh scheduler for one sampling call: the flow world's own Euler, DDIM for the SD world."""
    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return DDIMScheduler.from_config(pipe.scheduler.config)


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
    if isinstance(pipe, StableDiffusion3Pipeline):  # its prompt length, as the erasure host encodes prompts
        prompt["max_sequence_length"] = prompt_length(pipe)
    images = pipe(**prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE,
                  generator=generators, output_type="np", callback_on_step_end=stop_if_asked).images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _twin(pipe):
    """A pipeline sharing ``pipe``'s models (so also a delta applied to its denoiser) with a scheduler and tokenizers
    of its own, since a sampling call changes its scheduler's state and sets its fast tokenizers' padding mode."""
    tokenizers = {name: copy.deepcopy(part) for name, part in pipe.components.items() if name.startswith("tokenizer") and part}
    components = {**pipe.components, **tokenizers, "scheduler": sampling_scheduler(pipe)}
    extra = {} if isinstance(pipe, StableDiffusion3Pipeline) else {"requires_safety_checker": False}
    twin = type(pipe)(**components, **extra)
    twin.set_progress_bar_config(disable=True)
    return twin


def erased_concepts(concepts):
    """The erased concepts of a comma-separated text or a list: each a known shape or colour (a synonym counts as
    its concept), in the order given, each once."""
    names = [part.strip() for part in concepts.split(",")] if isinstance(concepts, str) else list(concepts)
    erased = list(dict.fromkeys(world.canonical(name) for name in names if name))
    if not erased:
        raise ValueError("No concept given: name the erased shapes or colours, e.g. --concept circle or --concept 'circle, star'.")
    for concept in erased:
        world.kind_of(concept)  # raises for an unknown concept, naming the known ones
    return erased


def concept_prompts(concept, name=None, avoid=()):
    """Prompts naming a concept (by 'name', default its own name), never mentioning a concept of 'avoid'.

    A shape gets "a {shape}" and "a {colour} {shape}"; a colour gets "a {colour} shape" and
    "a {colour} {shape}", over the attributes of the other kind except those avoided.
    """
    name = name or concept
    if world.kind_of(concept) == "shape":
        return [f"a {name}"] + [f"a {c} {name}" for c in world.COLOURS if c not in avoid]
    return [f"a {name} shape"] + [f"a {name} {s}" for s in world.SHAPES if s not in avoid]


def neutral_prompts(kind, avoid=()):
    """Prompts that name no concept of 'kind' and none of 'avoid': "a red shape", ... for shapes; "a circle", ... for colours."""
    if kind == "shape":
        return [f"a {c} shape" for c in world.COLOURS if c not in avoid]
    return [f"a {s}" for s in world.SHAPES if s not in avoid]


def prompt_groups(concepts):
    """The groups of an erasure benchmark for the erased 'concepts' (see the module docstring). Each names the
    concepts its rate counts ("shows"): any erased one for the erased, synonym and neutral groups, its own for the others."""
    erased = erased_concepts(concepts)
    kinds = list(dict.fromkeys(world.kind_of(c) for c in erased))
    by_kind = {"shape": world.SHAPES, "colour": world.COLOURS}
    groups = []
    for role, naming in (("erased", lambda c: c), ("synonym", lambda c: world.SYNONYMS[c])):
        for c in erased:
            others = [e for e in erased if e != c]
            groups.append({"name": naming(c), "role": role, "concept": c, "shows": erased,
                           "prompts": concept_prompts(c, naming(c), avoid=others)})
    for kind in kinds + [k for k in by_kind if k not in kinds]:
        for c in by_kind[kind]:
            if c not in erased:
                groups.append({"name": c, "role": "other", "concept": c, "shows": [c], "prompts": concept_prompts(c, avoid=erased)})
    for kind in kinds:
        groups.append({"name": f"no {kind}", "role": "neutral", "concept": None, "shows": erased,
                       "prompts": neutral_prompts(kind, avoid=erased)})
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


def _showing(judged, concepts):
    """Per judged image: 1 if the judge reads any of 'concepts' in it (each in its own attribute), else 0."""
    return [int(any(judged[world.kind_of(c)][i] == c for c in concepts)) for i in range(len(judged["texture"]))]


def _with_interval(hits):
    share = _share(hits)
    return {**share, "ci95": wilson_interval(share["count"], share["n"])}


def _rate(judged, shows, erased=None):
    """How many judged images show one of the concepts of 'shows', with rate, interval and the per-image verdicts;
    how many show one of the 'erased' concepts (when given); and how many the judge reads as striped, since no prompt
    names a texture and an erasure may still change it (the circle's turned plain stars striped)."""
    rate = {**_with_interval(_showing(judged, shows)), "striped": _share([int(label == "striped") for label in judged["texture"]])}
    if erased is not None:
        rate["erased"] = _with_interval(_showing(judged, erased))
    return rate


def run_groups(pipe, judge, groups, n, seed, erased=None):
    """Generate and judge n images per group, image i of a group from its prompt i (taken in turn) and seed + i;
    returns (per-group rates, per-group images). A group's rate counts the concepts of its "shows" (default: its
    "concept"), and with 'erased' the share showing any erased concept too. A group's prompts are texts, or with
    "encoded" the prompts' encodings, one row each (a learned token's, which no text names)."""
    prompts = [(g.get("encoded", g["prompts"]))[i % len(g["prompts"])] for g in groups for i in range(n)]
    if "encoded" in groups[0]:
        prompts = torch.cat(prompts)
    seeds = [seed + i for _ in groups for i in range(n)]
    images = generate(pipe, prompts, seeds)
    rates, per_group = [], []
    for k, group in enumerate(groups):
        chunk = images[k * n:(k + 1) * n]
        rates.append(_rate(judge_lib.classify(judge, chunk), group.get("shows", [group["concept"]]), erased))
        per_group.append(chunk)
    return rates, per_group


# The per-image verdicts each change compares: the group's rate, the share showing an erased concept, the striped share.
CHANGES = {"change": lambda r: r["hits"], "erased_change": lambda r: r["erased"]["hits"],
           "striped_change": lambda r: r["striped"]["hits"]}


def evaluate(model_dir, concepts, delta_path=None, n=64, seed=0, grid_path=None, strength=1.0):
    """Benchmark the erasure of 'concepts' (a shape or colour, or several, comma-separated) stored in delta_path
    (None: the base model only).

    Returns a JSON-serialisable dict: settings, and per prompt group its role ("erased", "synonym", "other" or
    "neutral"), prompts, and "before"/"after" = {rate, count, n, ci95, hits, erased, striped} where rate is the share
    of images showing what the group's "shows" names (see ``prompt_groups``), erased the share showing any erased
    concept and striped the share the judge reads as striped ("after" is None without a delta); "change",
    "erased_change" and "striped_change" (paired, with intervals); and a "summary".
    """
    erased = erased_concepts(concepts)
    if n < 1:
        raise ValueError(f"n (images per prompt group) must be at least 1, got {n}.")
    if not 0 <= seed <= MAX_SEED - (n - 1):
        raise ValueError(f"seed must be from 0 to {MAX_SEED - (n - 1)} (image i takes seed + i, at most 2**64 - 1), got {seed}.")
    pipe, judge = load_pipeline(model_dir), judge_lib.load_judge()
    delta = None if delta_path is None else load_for(denoiser_of(pipe), delta_path)  # refuses a misfit before any image is drawn
    groups = prompt_groups(erased)
    before, images_before = run_groups(pipe, judge, groups, n, seed, erased)
    after, images_after = [None] * len(groups), None
    if delta is not None:
        with applied_delta(denoiser_of(pipe), delta, strength=strength):
            after, images_after = run_groups(pipe, judge, groups, n, seed, erased)
    result = {
        "model_dir": str(model_dir or world.DEFAULT_MODEL_DIR), "concept": ", ".join(erased), "concepts": erased,
        "synonyms": [world.SYNONYMS[c] for c in erased],
        "delta_path": None if delta_path is None else str(delta_path), "strength": strength,
        "n": n, "seed": seed, "steps": STEPS, "guidance_scale": GUIDANCE_SCALE, **compared(groups, before, after),
    }
    if grid_path is not None:
        save_grid(grid_path, groups, images_before, images_after)
    return result


def compared(groups, before, after):
    """The groups with their rates before and after (``run_groups``'s; after: Nones without an erasure) and the
    paired changes between them, and their summary."""
    groups = [{**g, "before": b, "after": a,
               **{name: None if a is None else paired_change(hits(b), hits(a)) for name, hits in CHANGES.items()}}
              for g, b, a in zip(groups, before, after)]
    return {"groups": groups, "summary": summary_of(groups)}


def summary_of(groups):
    """The largest share still showing an erased concept on the erased concepts' own and synonym prompts, the mean
    accuracy on the others, and after an erasure the largest rise of the erased share on any group."""
    summary = {}
    for when in ("before", "after"):
        if groups[0][when] is None:
            continue
        by_role = {role: [g[when]["rate"] for g in groups if g["role"] == role] for role in ("erased", "synonym", "other")}
        summary[when] = {"erased": max(by_role["erased"]), "synonym": max(by_role["synonym"]),
                         "others_mean": sum(by_role["other"]) / len(by_role["other"])}
    if groups[0]["after"] is not None:
        rises = {g["name"]: g["erased_change"]["change"] for g in groups}
        summary["largest_erased_rise"] = {"group": max(rises, key=rises.get), "change": max(rises.values())}
    return summary


def format_table(result):
    """A plain-text table of an evaluate() result, one line per prompt group."""
    def cell(r):
        return "-" if r is None else f"{100 * r['rate']:5.1f}% [{100 * r['ci95'][0]:3.0f}-{100 * r['ci95'][1]:3.0f}]"
    def change(c):
        return "-" if c is None else f"{100 * c['change']:+6.1f} [{100 * c['ci95'][0]:+4.0f},{100 * c['ci95'][1]:+4.0f}]"
    def shares(g, key):
        return " -> ".join(f"{100 * g[when][key]['rate']:.0f}" for when in ("before", "after") if g[when] is not None) + "%"
    synonyms = ", ".join(result["synonyms"])
    lines = [f"erasing {result['concept']!r} (synonym{'s' if len(result['concepts']) > 1 else ''} {synonyms}), "
             f"{result['n']} images per group, seed {result['seed']}, strength {result['strength']}",
             f"{'group':<12}{'role':<9}{'before':<20}{'after':<20}{'change (points)':<20}{'any erased':<12}{'striped':<12}example prompt"]
    for g in result["groups"]:
        lines.append(f"{g['name']:<12}{g['role']:<9}{cell(g['before']):<20}{cell(g['after']):<20}"
                     f"{change(g['change']):<20}{shares(g, 'erased'):<12}{shares(g, 'striped'):<12}{g['prompts'][-1]!r}")
    lines.append("erased/synonym/neutral: share showing any erased concept (lower is better after; neutral prompts name no "
                 "concept of the erased kind, and the erasure must not raise it); other: accuracy (should stay). "
                 "Intervals 95%; the change's is for paired images (the same seeds).")
    lines.append("any erased: share of the group's images that show any erased concept (JSON: erased_change); striped: share "
                 "drawn striped (JSON: striped_change). No prompt names a texture, so it should stay too.")
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
