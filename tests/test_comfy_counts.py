"""On ComfyUI's own full-size UNets (built on the meta device: no memory, no weights), the tensors the host
trains per method are the published counts (SD1.x esd-x: 80 tensors, 43,962,560 values; ...).

Needs ComfyUI (COMFYUI_PATH); skips otherwise.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_env  # noqa: E402

comfy_env.require_comfyui()

COMMON = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False, "in_channels": 4,
    "out_channels": 4, "model_channels": 320, "use_temporal_resblock": False, "use_temporal_attention": False,
    "dtype": torch.float32,
}
SD1 = {**COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
       "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
       "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
       "num_head_channels": -1}
SD2 = {**SD1, "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": -1, "num_head_channels": 64}
SDXL = {**COMMON, "adm_in_channels": 2816, "num_classes": "sequential", "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
        "use_linear_in_transformer": True, "context_dim": 2048, "num_heads": -1, "num_head_channels": 64}

# (family, method) -> (tensors, values); values as the ESD paper's reference code counts them
EXPECTED = {
    ("sd1", "esd-x"): (80, 43_962_560),
    ("sd1", "esd-x-strict"): (32, 19_169_280),
    ("sd2", "esd-x"): (None, 50_352_320),
    ("sd2", "esd-x-strict"): (None, 25_559_040),
    ("sdxl", "esd-x"): (None, 545_670_400),
    ("sdxl", "esd-x-strict"): (None, 340_787_200),
}


@pytest.fixture(scope="module")
def unets():
    comfy_env.in_process_comfy()
    import comfy.supported_models

    built = {}
    for family, config_class, unet_config in (
        ("sd1", comfy.supported_models.SD15, SD1), ("sd2", comfy.supported_models.SD20, SD2),
        ("sdxl", comfy.supported_models.SDXL, SDXL),
    ):
        config = config_class(unet_config)
        config.unet_config.update({k: unet_config[k] for k in ("num_heads", "num_head_channels")})
        built[family] = config.get_model({}, device=torch.device("meta"))
    return built


@pytest.mark.parametrize("family, method", sorted(EXPECTED))
def test_trained_tensor_counts_match_the_published_ones(unets, family, method):
    methods = comfy_env.pack_module("esd_core.methods")
    model = unets[family]
    selected = methods.select_parameters(methods.layer_tensors(model.diffusion_model), method)
    tensors, values = EXPECTED[(family, method)]
    assert sum(t.numel() for t in selected.values()) == values
    if tensors is not None:
        assert len(selected) == tensors
    assert all(not name.startswith("diffusion_model.") for name in selected)  # ldm names, as deltas store them


def test_families_are_named_like_the_engine_names_them(unets):
    host = comfy_env.pack_module("nodes.comfy_host")

    class Patcher:  # family_of only reads model.model
        def __init__(self, model):
            self.model = model

    assert {f: host.family_of(Patcher(m)) for f, m in unets.items()} == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
