"""The flow tiny world: the shipped SD3-architecture pipeline, and eval/erase/demo on it from the command line."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from esd_core.cli import main
from esd_core.diffusers_host import load_pipeline
from esd_core.erasure_file import ErasureDelta
from esd_core.flow_host import prompt_length
from esd_core.methods import text_stream_attention
from esd_core.tinyworld import evaluate, world

os.environ["HF_HUB_OFFLINE"] = "1"


def test_shipped_flow_pipeline_loads_offline_without_t5_and_generates():
    pipe = load_pipeline(str(world.DEFAULT_FLOW_MODEL_DIR))
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.transformer.dtype == torch.float32
    assert prompt_length(pipe) == pipe.tokenizer.model_max_length == 8  # the zero block standing in for T5's prompt
    shipped = sum(f.stat().st_size for f in world.DEFAULT_FLOW_MODEL_DIR.rglob("*") if f.is_file())
    assert shipped <= 20e6
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=3, max_sequence_length=prompt_length(pipe),
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_erase_and_eval_on_the_flow_world(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "STEPS", 5)  # structure only: keep the test fast
    delta_path, json_path = tmp_path / "red.safetensors", tmp_path / "red.json"
    assert main(["erase", "--world", "flow", "--concept", "red", "--iterations", "2", "--sample-steps", "4",
                 "--out", str(delta_path)]) == 0
    erasure = ErasureDelta.load(str(delta_path))
    assert erasure.metadata["base_family"] == "custom-sd3(width=128)" and erasure.metadata["base_prediction"] == "flow"
    assert erasure.metadata["method"] == "esd-x"  # a colour: the tiny world's method for styles
    assert erasure.deltas and all(text_stream_attention(name.rsplit(".", 1)[0]) for name in erasure.deltas)
    assert main(["eval", "--world", "flow", "--delta", str(delta_path), "--concept", "red", "--n", "2",
                 "--json", str(json_path)]) == 0
    result = json.loads(json_path.read_text())
    assert result["model_dir"] == str(world.DEFAULT_FLOW_MODEL_DIR) and result["n"] == 2
    assert all(group["after"]["n"] == 2 for group in result["groups"])
    assert "red" in capsys.readouterr().out


def test_the_world_flag_names_a_shipped_world_and_excludes_a_model(capsys):
    assert main(["eval", "--world", "flow", "--model", "elsewhere", "--concept", "red"]) == 2
    assert "--model or --world, not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--world", "xl", "--concept", "red"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_attack_says_it_needs_a_unet(tmp_path, capsys):
    delta_path = tmp_path / "red.safetensors"
    assert main(["erase", "--world", "flow", "--concept", "red", "--iterations", "1", "--sample-steps", "2",
                 "--out", str(delta_path)]) == 0
    assert main(["attack", "--world", "flow", "--delta", str(delta_path), "--concept", "red", "--out-dir", str(tmp_path)]) == 2
    assert "Stable Diffusion UNets" in capsys.readouterr().err


def test_the_flow_worlds_loras_keep_its_esd_x_deltas_exact():
    from esd_core.presets import defaults_for

    flow = defaults_for(str(world.DEFAULT_FLOW_MODEL_DIR), "esd-x", "red")
    assert flow["lora_rank"] == 128 and defaults_for(None, "esd-x", "red")["lora_rank"] == 64
    assert {k: v for k, v in flow.items() if k != "lora_rank"} == {k: v for k, v in defaults_for(None, "esd-x", "red").items() if k != "lora_rank"}
