"""The option spec is the single source of the erase settings: EraseConfig's fields and checks and the command
line's flags are made from it (the ComfyUI nodes' inputs are checked in tests/test_comfy_nodes.py)."""

import argparse
import dataclasses

import pytest

from esd_core.cli import build_parser
from esd_core.config import EraseConfig
from esd_core.options import BY_NAME, COMMAND_LINE, CONFIG_OPTIONS, OPTIONS

# Arguments of the commands that are not erase settings: paths and what to do with them.
COMMAND_ARGUMENTS = {"--help", "--model", "--world", "--config", "--out", "--overwrite", "--n", "--out-dir"}


def flags_of(command: str) -> dict[str, argparse.Action]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in subparsers.choices[command]._actions for flag in action.option_strings
            if flag.startswith("--") and not flag.startswith("--no-")}


def test_every_config_field_is_an_option_of_the_spec_with_its_default():
    fields = {f.name: f.default for f in dataclasses.fields(EraseConfig)}
    assert fields == {option.name: option.default for option in CONFIG_OPTIONS}


@pytest.mark.parametrize("command", ["erase", "demo"])
def test_every_flag_of_the_erasing_commands_is_an_option_of_the_spec_and_every_option_has_one(command):
    flags = flags_of(command)
    assert set(flags) - COMMAND_ARGUMENTS == {option.flag for option in OPTIONS}
    for option in OPTIONS:
        action = flags[option.flag]
        # left out, a setting takes the model's default (None here), except the command line's own ones
        expected_default = option.default if option.shown_on == COMMAND_LINE else None
        if option.name == "concept":
            continue  # the demo's has its own default and help
        assert action.default == expected_default, option.name
        if option.choices:
            assert set(option.choices) <= set(action.choices), option.name
        assert option.help.split(".")[0] in action.help


def test_the_spec_is_well_formed():
    assert len(BY_NAME) == len(OPTIONS)
    for option in OPTIONS:
        assert option.help and option.help.endswith((".", ")")), option.name
        if option.choices:
            assert option.default in option.choices, option.name
        else:
            option.check(option.default)  # the default is a valid value


@pytest.mark.parametrize("option", [o for o in CONFIG_OPTIONS if o.minimum is not None], ids=lambda o: o.name)
def test_a_config_refuses_a_number_outside_its_option_range_naming_the_option(option):
    concept = {"concept": "x"} if option.name != "concept" else {}
    EraseConfig(**concept, **{option.name: option.kind(option.minimum)})
    below = option.minimum - (1 if option.kind is int else abs(option.minimum) * 0.5 or 1.0)
    with pytest.raises(ValueError, match=f"^{option.name} must be"):
        EraseConfig(**concept, **{option.name: option.kind(below)})
    with pytest.raises(ValueError, match=f"^{option.name} must be"):
        EraseConfig(**concept, **{option.name: option.kind(option.maximum) + (1 if option.kind is int else option.maximum)})
    if option.kind is int:
        with pytest.raises(ValueError, match=f"^{option.name} must be a whole number"):
            EraseConfig(**concept, **{option.name: option.minimum + 0.5})
    else:
        with pytest.raises(ValueError, match=f"^{option.name} must be a finite number"):
            EraseConfig(**concept, **{option.name: float("nan")})


@pytest.mark.parametrize("option", [o for o in CONFIG_OPTIONS if o.choices], ids=lambda o: o.name)
def test_a_config_refuses_a_choice_the_option_does_not_offer(option):
    with pytest.raises(ValueError, match=option.name if option.name != "method" else "Unknown train method"):
        EraseConfig(concept="x", **{option.name: "no such choice"})


def test_rank_minus_one_stands_for_low_rank_on_whole_unet_methods_and_full_rank_elsewhere():
    assert EraseConfig(concept="x", method="esd-u").rank == 8
    assert EraseConfig(concept="x", method="full").rank == 8
    assert EraseConfig(concept="x", method="esd-x").rank == 0
    assert EraseConfig(concept="x", method="esd-u", rank=0).rank == 0


def test_every_input_a_node_shows_names_one_option():
    names = [option.input_name for option in OPTIONS if option.shown_on != COMMAND_LINE]
    assert len(names) == len(set(names))


def test_config_fields_are_keyword_only():
    with pytest.raises(TypeError):
        EraseConfig("x")


@pytest.mark.parametrize("concept, expected", [
    ("circle", dict(method="esd-u", iterations=300, lr=1e-3, batch_size=8, eta=4.0, sample_with="mixed", preserve_weight=2.0,
                    preserve_guidance=3.0, hold_unconditional=1.0, rank=8, preserve="square, triangle, star")),
    ("red", dict(method="esd-x", iterations=300, lr=1e-3, batch_size=8, eta=1.0, sample_with="trained", preserve_weight=1.0,
                 preserve_guidance=1.0, hold_unconditional=0.0, rank=0,
                 preserve="circle, square, triangle, star, green, blue, yellow")),
])
def test_the_demo_trains_the_tiny_worlds_validated_settings(concept, expected):
    """The settings the tiny world's measured results were obtained with, as ``esd-erase demo`` resolves them."""
    from esd_core.cli import settings
    from esd_core.presets import tiny_world_method

    args = build_parser().parse_args(["demo", "--concept", concept])
    chosen = settings(args, concept, tiny_world_method(concept))
    config = EraseConfig.from_settings(chosen)
    assert {name: getattr(config, name) for name in expected} == expected
    assert (config.sample_steps, config.sample_guidance, config.mode, config.trajectories, config.reuse) == (50, 3.0, "fast", 8, 0)
    assert (chosen["gradient_checkpointing"], chosen["resolution"], chosen["save_dtype"]) == (False, 0, "fp16")
