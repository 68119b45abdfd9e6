"""Tests of the tiny world: drawing, tokenizer, shipped pipeline and the erasure benchmark."""
import json
import os
import threading

import numpy as np
import pytest
import torch

from esd_core import threads
from esd_core.tinyworld import evaluate, judge, world

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def shipped_judge():
    return judge.load_judge()


def test_drawn_images_show_what_was_asked(shipped_judge):
    rng = np.random.default_rng(2024)
    asked = [(s, c, world.TEXTURES[(i + j) % 2]) for i, s in enumerate(world.SHAPES)
             for j, c in enumerate(world.COLOURS)]
    images = torch.from_numpy(np.stack([world.draw(s, c, t, rng) for s, c, t in asked])).permute(0, 3, 1, 2)
    assert images.shape == (16, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    judged = judge.classify(shipped_judge, images)
    assert judged["shape"] == [s for s, _, _ in asked]
    assert judged["colour"] == [c for _, c, _ in asked]
    assert judged["texture"] == [t for _, _, t in asked]


def test_judge_rejects_blobs_and_empty_backgrounds(shipped_judge):
    rng = np.random.default_rng(7)
    images = [world.draw_blob(world.RGB["red"], "plain", rng) for _ in range(4)]
    images += [world.draw_background(rng) for _ in range(4)]
    judged = judge.classify(shipped_judge, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    assert judged["shape"] == ["none"] * 8
    assert judged["colour"] == ["red"] * 4 + ["none"] * 4


def test_every_vocabulary_word_is_one_token():
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(world.DEFAULT_MODEL_DIR / "tokenizer")
    ids = set()
    for word in world.VOCABULARY:
        tokens = tokenizer(word).input_ids
        assert len(tokens) == 3 and tokens[0] == tokenizer.bos_token_id and tokens[2] == tokenizer.eos_token_id
        assert tokenizer.convert_ids_to_tokens(tokens[1]) == word + "</w>"
        ids.add(tokens[1])
    assert len(ids) == len(world.VOCABULARY)


def test_captions_use_only_the_vocabulary():
    rng = np.random.default_rng(0)
    words = {w for _ in range(500) for w in world.caption("star", "blue", "striped", rng).split()}
    assert words <= set(world.VOCABULARY)
    assert {"star", "pentagram", "blue", "azure", "striped"} <= words


def test_shipped_pipeline_loads_offline_and_generates():
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(world.DEFAULT_MODEL_DIR)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.unet.dtype == torch.float32
    names = [n for n, _ in pipe.unet.named_modules()]
    for level in ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"):
        assert any(n.startswith(level) and n.endswith("attn1") for n in names)
        assert any(n.startswith(level) and n.endswith("attn2") for n in names)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    assert np.isfinite(out.images).all()


needs_two_threads = pytest.mark.skipif(torch.get_num_threads() < threads.WORKERS, reason="the evaluation splits its batches only with 2+ CPU threads")


@needs_two_threads
def test_generation_split_between_threads_gives_each_seed_the_image_one_call_gives(monkeypatch):
    """The evaluation samples each batch as two threads on part of its images (each with its own scheduler);
    an image depends only on its prompt and seed, not on the batch or thread it was drawn in."""
    monkeypatch.setattr(evaluate, "STEPS", 3)
    monkeypatch.setattr(evaluate, "BATCH_SIZE", 3)
    pipe = evaluate.load_pipeline()
    prompts, seeds = ["a red circle", "a disc", "a blue star", "a green shape", "a yellow square"], [0, 1, 2, 3, 4]
    split = evaluate.generate(pipe, prompts, seeds)  # batches of 3 and 2, each split in two
    assert split.shape == (5, 3, 32, 32)
    for i in (0, 4):
        alone = evaluate._images(pipe, slice(i, i + 1), prompts, seeds, threading.Event()).float()
        assert torch.allclose(split[i : i + 1], alone, atol=1e-5)
    assert not torch.allclose(split[0], split[1], atol=1e-2)
    calls = []
    images = evaluate._images
    monkeypatch.setattr(evaluate, "_images", lambda pipe, rows, *rest: calls.append((id(pipe), rows)) or images(pipe, rows, *rest))
    evaluate.generate(pipe, prompts, seeds)
    assert sorted((rows.start, rows.stop) for _, rows in calls) == [(0, 2), (2, 3), (3, 4), (4, 5)]  # threads finish in any order
    assert len({pipe_id for pipe_id, _ in calls}) == threads.WORKERS


def test_a_failing_part_stops_the_parts_still_running_whichever_it_is():
    stop, part_0_stopped = threading.Event(), []

    def part(i):
        if i == 1:
            raise RuntimeError("part 1 fails")
        part_0_stopped.append(stop.wait(timeout=30))  # a long part that ends early once told to

    with pytest.raises(RuntimeError, match="part 1 fails"):
        threads.map_in_threads(part, [0, 1], stop)
    assert part_0_stopped == [True]


@needs_two_threads
def test_when_one_thread_of_a_generation_fails_the_other_stops_within_a_step(monkeypatch):
    """So that Ctrl-C during an evaluation ends it in about a step, not after the other thread's whole batch."""
    monkeypatch.setattr(evaluate, "STEPS", 400)
    pipe = evaluate.load_pipeline()
    unet_calls, sampling_started = [], threading.Event()
    forward = pipe.unet.forward

    def counted_forward(*args, **kwargs):
        unet_calls.append(1)
        sampling_started.set()
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counted_forward)
    images = evaluate._images

    def first_part_fails(pipe, rows, *rest):
        if rows.start == 0:
            sampling_started.wait(timeout=60)  # the other part is sampling by now
            raise RuntimeError("stand-in for Ctrl-C")
        return images(pipe, rows, *rest)

    monkeypatch.setattr(evaluate, "_images", first_part_fails)
    with pytest.raises(RuntimeError, match="stand-in"):
        evaluate.generate(pipe, ["a red circle", "a blue star"], [0, 1])
    assert 1 <= len(unet_calls) <= 3  # without the stop flag: all 400 steps


def test_prompt_groups_avoid_the_erased_concept():
    groups = evaluate.prompt_groups("red")
    assert [g["role"] for g in groups] == ["erased", "synonym"] + ["other"] * 7 + ["neutral"]
    assert all("crimson" in p for p in groups[1]["prompts"])
    assert not any("red" in p.split() for g in groups[2:] for p in g["prompts"])
    assert groups[-1]["prompts"] == ["a circle", "a square", "a triangle", "a star"]  # no colour named


def test_prompt_groups_of_several_concepts_count_any_erased_one():
    groups = evaluate.prompt_groups("circle, pentagram, red")
    assert [(g["name"], g["role"]) for g in groups[:6]] == [
        ("circle", "erased"), ("star", "erased"), ("red", "erased"), ("disc", "synonym"), ("pentagram", "synonym"), ("crimson", "synonym")]
    assert all(g["shows"] == ["circle", "star", "red"] for g in groups if g["role"] != "other")
    assert [g["name"] for g in groups if g["role"] == "other"] == ["square", "triangle", "green", "blue", "yellow"]
    assert all(g["shows"] == [g["concept"]] for g in groups if g["role"] == "other")
    erased_words = {"circle", "disc", "star", "pentagram", "red", "crimson"}
    for g in groups:
        named = {w for p in g["prompts"] for w in p.split()} & erased_words
        assert named <= ({g["name"]} if g["role"] in ("erased", "synonym") else set()), (g["name"], named)
    neutral = {g["name"]: g["prompts"] for g in groups if g["role"] == "neutral"}
    assert neutral == {"no shape": ["a green shape", "a blue shape", "a yellow shape"], "no colour": ["a square", "a triangle"]}
    with pytest.raises(ValueError, match="unknown concept 'cube'"):
        evaluate.prompt_groups("circle, cube")
    with pytest.raises(ValueError, match="No concept given"):
        evaluate.prompt_groups(" , ")


def test_rate_counts_an_image_showing_any_erased_concept():
    judged = {"shape": ["circle", "star", "square", "star"], "colour": ["red", "green", "red", "blue"],
              "texture": ["plain", "striped", "plain", "plain"]}
    rate = evaluate._rate(judged, ["square"], erased=["circle", "red"])
    assert rate["hits"] == [0, 0, 1, 0] and rate["erased"]["hits"] == [1, 0, 1, 0] and rate["erased"]["rate"] == 0.5
    assert rate["striped"]["hits"] == [0, 1, 0, 0] and "erased" not in evaluate._rate(judged, ["star"])


def test_wilson_interval():
    low, high = evaluate.wilson_interval(10, 10)
    assert high == 1.0 and 0.70 < low < 0.73
    low, high = evaluate.wilson_interval(0, 4)
    assert low == 0.0 and 0.45 < high < 0.5


@pytest.fixture
def blinding_delta(tmp_path):
    """An erasure file (the engine's format) that zeroes every cross-attention value projection
    of the shipped UNet: the prompt then no longer reaches the image at all."""
    from diffusers import UNet2DConditionModel
    from esd_core.erasure_file import ErasureDelta
    from esd_core.keys import diffusers_to_ldm_names
    unet = UNet2DConditionModel.from_pretrained(world.DEFAULT_MODEL_DIR / "unet")
    names = diffusers_to_ldm_names(unet.state_dict().keys(), dict(unet.config))
    deltas = {names[n]: -p.detach() for n, p in unet.named_parameters() if "attn2.to_v" in n}
    path = tmp_path / "blind.safetensors"
    ErasureDelta(deltas, {"concept": "everything", "method": "test"}).save(str(path), dtype=torch.float32)
    return path


def test_evaluate_structure_before_and_after(blinding_delta, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "STEPS", 5)  # structure only: keep the test fast
    grid = tmp_path / "grid.png"
    result = evaluate.evaluate(None, "circle", delta_path=blinding_delta, n=4, grid_path=grid)
    json.dumps(result)
    assert result["concepts"] == ["circle"] and result["synonyms"] == ["disc"] and result["n"] == 4
    assert [g["name"] for g in result["groups"]] == ["circle", "disc", "square", "triangle", "star",
                                                     "red", "green", "blue", "yellow", "no shape"]
    for g in result["groups"]:
        for when in ("before", "after"):
            r = g[when]
            assert r["n"] == 4 and 0 <= r["count"] <= 4 and r["rate"] == r["count"] / 4
            assert r["ci95"][0] <= r["rate"] <= r["ci95"][1] and sum(r["hits"]) == r["count"]
            assert r["striped"]["rate"] == sum(r["striped"]["hits"]) / 4 == r["striped"]["count"] / 4
            assert r["erased"]["ci95"][0] <= r["erased"]["rate"] == r["erased"]["count"] / 4 <= r["erased"]["ci95"][1]
            if g["role"] != "other":  # these count the erased concept itself
                assert r["erased"]["hits"] == r["hits"]
        for change, counts in (("change", lambda r: r["count"]), ("erased_change", lambda r: r["erased"]["count"]),
                               ("striped_change", lambda r: r["striped"]["count"])):
            c = g[change]
            assert c["change"] == (counts(g["after"]) - counts(g["before"])) / 4
            assert c["ci95"][0] <= c["change"] <= c["ci95"][1]
    assert set(result["summary"]) == {"before", "after", "largest_erased_rise"}
    rise = result["summary"]["largest_erased_rise"]
    assert rise["change"] == max(g["erased_change"]["change"] for g in result["groups"])
    # Blind, seed i gives the same image whatever the shape prompt: at most one group can win it.
    shape_groups = [g for g in result["groups"] if g["name"] in world.SHAPES]
    assert sum(g["after"]["count"] for g in shape_groups) <= 4
    from PIL import Image
    width, height = Image.open(grid).size  # 10 rows of 34-px cells (x3), before and after side by side
    assert height == 20 + 10 * 34 * 3 and width > 2 * 4 * 34 * 3  # a header row names the halves, then a row per group
    table = evaluate.format_table(result)
    assert "circle" in table and "disc" in table and "any erased" in table and len(table.splitlines()) == 4 + 10
    star = next(g for g in result["groups"] if g["name"] == "star")
    shares = f"{100 * star['before']['striped']['rate']:.0f} -> {100 * star['after']['striped']['rate']:.0f}%"
    assert shares in next(line for line in table.splitlines() if line.startswith("star "))


def test_paired_change_interval_narrows_with_more_images_and_stays_open_when_none_moved():
    none_moved = evaluate.paired_change([1] * 64, [1] * 64)
    assert none_moved["change"] == 0.0 and none_moved["ci95"][0] < -0.02 and none_moved["ci95"][1] > 0.02
    all_lost = evaluate.paired_change([1] * 64, [0] * 64)
    assert all_lost["change"] == -1.0 and all_lost["ci95"][0] == -1.0 and all_lost["ci95"][1] < -0.9
    few = evaluate.paired_change([1] * 64, [0] * 4 + [1] * 60)  # 4 of 64 lost: 6.25 points
    many = evaluate.paired_change([1] * 256, [0] * 16 + [1] * 240)  # the same share of 256
    assert few["change"] == many["change"] == -4 / 64
    assert few["ci95"][0] < many["ci95"][0] < -4 / 64 < many["ci95"][1] < few["ci95"][1]


def test_evaluate_without_delta_has_no_after(monkeypatch):
    monkeypatch.setattr(evaluate, "STEPS", 5)
    result = evaluate.evaluate(None, "crimson", n=4)
    assert result["concepts"] == ["red"] and result["synonyms"] == ["crimson"]
    assert all(g["after"] is None and g[c] is None for g in result["groups"] for c in evaluate.CHANGES)
    assert "->" not in evaluate.format_table(result)
    assert set(result["summary"]) == {"before"}


def test_tiny_world_preserves_the_concepts_at_risk_that_the_erased_texts_do_not_name():
    from esd_core.presets import defaults_for

    assert defaults_for(None, "esd-u", "circle")["preserve"] == "square, triangle, star"  # shapes put only shapes at risk
    assert defaults_for(None, "esd-x", "red")["preserve"] == "circle, square, triangle, star, green, blue, yellow"
    assert defaults_for(None, "esd-u", "circle, red")["preserve"] == "square, triangle, star, green, blue, yellow"
    assert "circle" not in defaults_for(None, "esd-x", "disc")["preserve"]  # a synonym names its concept
    kept = defaults_for(None, "esd-x", "crimson star, blue")["preserve"].split(", ")
    assert kept == ["circle", "square", "triangle", "green", "yellow"]
    assert defaults_for("/some/other/model", "esd-x", "circle")["preserve"] == ""  # elsewhere: the paper's, none


def test_erase_without_a_method_trains_the_benchmarks_method_on_the_tiny_world(monkeypatch):
    import esd_core.cli as cli
    from esd_core.presets import default_method

    assert default_method(None, "circle") == "esd-u" and default_method(None, "disc, star") == "esd-u"
    assert default_method(None, "red") == "esd-x" and default_method(None, "a red circle") == "esd-x"  # names a colour
    assert default_method(None, "a cat") == "esd-x"  # names nothing of the world
    assert default_method("/some/other/model", "circle") == "esd-x"  # elsewhere: the paper's esd-x

    class Trained(Exception):
        pass

    def capture(args, config, chosen):
        raise Trained(config.method)

    monkeypatch.setattr(cli, "train_with_progress", capture)
    for flags, method in (([], "esd-u"), (["--method", "esd-x"], "esd-x")):  # an explicit method wins
        with pytest.raises(Trained, match=f"^{method}$"):
            cli.run_erase(erase_arguments(*flags))


def erase_arguments(*extra):
    """Parsed ``esd-erase erase`` arguments for the circle, plus ``extra`` flags."""
    from esd_core.cli import build_parser

    return build_parser().parse_args(["erase", "--concept", "circle", "--out", "x.safetensors", *extra])


def test_whole_unet_methods_get_low_rank_deltas_on_every_model_and_an_explicit_rank_wins():
    from esd_core.cli import erase_config

    for model_flags in ([], ["--model", "/some/other/model"]):
        assert erase_config(erase_arguments(*model_flags), "circle", "esd-u").rank == 8
        assert erase_config(erase_arguments(*model_flags), "circle", "esd-all").rank == 8
        assert erase_config(erase_arguments(*model_flags), "circle", "esd-x").rank == 0
        assert erase_config(erase_arguments(*model_flags, "--rank", "0"), "circle", "esd-u").rank == 0
        assert erase_config(erase_arguments(*model_flags, "--rank", "4"), "circle", "esd-x").rank == 4


def other_value(option, preset_value):
    """A valid value of ``option`` other than ``preset_value``, and the command-line words that give it."""
    if option.kind is bool:
        return (not preset_value), [option.flag if not preset_value else "--no-" + option.flag[2:]]
    if option.choices:
        value = next(choice for choice in option.choices if choice != preset_value)
    elif option.kind is str:
        value = "dog"
    else:
        value = option.kind(option.minimum if preset_value != option.minimum else option.minimum + 1)
    return value, [option.flag, str(value)]


def test_every_setting_comes_from_the_model_preset_unless_given_on_the_command_line():
    from esd_core.cli import settings
    from esd_core.options import OPTIONS
    from esd_core.presets import PAPER, defaults_for

    chosen_by_user = [option for option in OPTIONS if option.name not in ("concept", "method")]
    for model_flags, preset in (([], defaults_for(None, "esd-u", "circle")), (["--model", "/some/other/model"], PAPER)):
        left_out = settings(erase_arguments(*model_flags), "circle", "esd-u")
        assert {o.name: left_out[o.name] for o in chosen_by_user} == {o.name: preset[o.name] for o in chosen_by_user}
        overrides = {option.name: other_value(option, preset[option.name]) for option in chosen_by_user}
        flags = [word for _, words in overrides.values() for word in words]
        given = settings(erase_arguments(*model_flags, *flags), "circle", "esd-u")
        assert {name: given[name] for name in overrides} == {name: value for name, (value, _) in overrides.items()}
