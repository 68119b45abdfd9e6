"""The pack's nodes inside a real ComfyUI (in-process, CPU, tiny SD1.5-shaped checkpoint), next to stock nodes.

Needs ComfyUI (COMFYUI_PATH); skips otherwise.
"""

import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_env  # noqa: E402

comfy_env.require_comfyui()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from comfy_env.one_torch_thread()


@pytest.fixture(scope="module")
def env():
    env = comfy_env.with_erasures_as_loras(comfy_env.in_process_comfy())
    env["ckpt_name"] = comfy_env.install_checkpoint(env["base"])
    return env


@pytest.fixture(scope="module")
def loaded(env):
    with torch.inference_mode():
        model, clip, vae = env["nodes"].CheckpointLoaderSimple().load_checkpoint(env["ckpt_name"])
    return model, clip


def sample(env, model, clip, seed=11) -> torch.Tensor:
    nodes = env["nodes"]
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, "a cat on a mat")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        out = nodes.common_ksampler(model, seed, 3, 4.0, "euler", "normal", positive, negative, latent)[0]
    return out["samples"].clone()


@pytest.fixture(scope="module")
def trained(env, loaded):
    model, clip = loaded
    before = sample(env, model, clip)
    with torch.inference_mode():
        erased, erasure, curve = env["node"]["ESDTrainErasure"].execute(
            model=model, clip=clip, concept="cat", method="esd-x", iterations=3, learning_rate=2e-3,
            negative_guidance=1.0, seed=1, resolution=64, options={"sample_steps": 4},
        ).args
    return before, erased, erasure


def test_display_names_categories_and_tooltips(env):
    expected = {  # ComfyUI's own trainer sits under "training", its LoRA loading and saving under "loaders"
        "ESDTrainErasure": ("Train Concept Erasure (ESD)", "training"), "ESDErasureOptions": ("Erasure Options (ESD)", "training"),
        "ESDEraseConcept": ("Erase Concept (Train, old)", "training"), "ESDSaveErasure": ("Save Erasure", "loaders"),
        "ESDApplyErasure": ("Apply Erasure", "loaders"), "ESDLoadErasedUNet": ("Load Erased UNet", "loaders"),
    }
    assert set(env["node"]) == set(expected)
    for node_id, (name, category) in expected.items():
        assert env["nodes"].NODE_DISPLAY_NAME_MAPPINGS[node_id] == name
        info = env["node"][node_id].GET_NODE_INFO_V1()
        assert info["category"] == category
        assert info["deprecated"] == (node_id == "ESDEraseConcept")  # the old node: hidden from the menu, loads old workflows
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{input_name} has no tooltip"


def node_inputs(env, node_id) -> dict:
    info = env["node"][node_id].GET_NODE_INFO_V1()
    return {name: spec for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()}


def assert_widget_follows_option(spec, option, node_id):
    kind, settings = spec[0], spec[1]
    where = f"{node_id}.{option.input_name}"
    assert settings["default"] == option.default, where
    assert settings["tooltip"] == option.help, where
    if option.kind is int:  # a training node must not change its seed after each run: said outright, or the frontend adds it
        assert settings["control_after_generate"] is False, where
    if option.choices:
        assert kind == "COMBO" and settings["options"] == list(option.choices), where
    else:
        assert kind == {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}[option.kind], where
    if option.minimum is not None:
        assert (settings["min"], settings["max"]) == (option.minimum, option.maximum), where


def test_the_nodes_inputs_are_the_option_specs(env):
    """Each node input is an option of the spec, with its default, range and help; the training node shows at most
    12 inputs, the options node the rest, the save node the file's format, rank and precision (old workflows' saved
    widgets, the prefix and the precision, come first)."""
    options = comfy_env.pack_module("esd_core.options")
    train, more, save = (node_inputs(env, n) for n in ("ESDTrainErasure", "ESDErasureOptions", "ESDSaveErasure"))
    assert len(train) <= 12
    assert list(train) == ["model", "clip", *(o.input_name for o in options.shown_on(options.ERASE_NODE)), "options"]
    assert list(more) == [o.input_name for o in options.shown_on(options.OPTIONS_NODE)]
    assert list(save) == ["erasure", "filename_prefix", *(o.input_name for o in options.shown_on(options.SAVE_NODE)), "folder"]
    for node_id, inputs, place in (("ESDTrainErasure", train, options.ERASE_NODE), ("ESDErasureOptions", more, options.OPTIONS_NODE),
                                   ("ESDSaveErasure", save, options.SAVE_NODE)):
        for option in options.shown_on(place):
            assert_widget_follows_option(inputs[option.input_name], option, node_id)
    # every option the command line has is on a node, but for the device and precision, which ComfyUI chooses
    on_nodes = {option.name for place in (options.ERASE_NODE, options.OPTIONS_NODE, options.SAVE_NODE) for option in options.shown_on(place)}
    assert {o.name for o in options.OPTIONS} - on_nodes == {o.name for o in options.shown_on(options.COMMAND_LINE)} == {"device", "dtype"}


def test_the_old_training_node_keeps_its_widgets_in_their_order(env):
    """Saved workflows fill widgets by position: the old node's must stay as they were (the seed with its
    control-after-generate value), whatever the spec's order."""
    assert list(node_inputs(env, "ESDEraseConcept")) == [
        "model", "clip", "concept", "erase_from", "method", "iterations", "learning_rate", "negative_guidance", "sample_steps",
        "sample_guidance", "sample_with", "mode", "reuse", "rank", "seed", "resolution", "preserve", "preserve_weight",
        "trajectories", "batch_size", "repair_fraction", "orthogonal_push", "preserve_guidance", "hold_unconditional",
    ]
    assert node_inputs(env, "ESDEraseConcept")["seed"][1]["control_after_generate"]


def test_the_old_training_node_trains_what_the_new_one_trains_and_refuses_removed_settings(env, loaded):
    model, clip = loaded
    shared = dict(model=model, clip=clip, concept="cat", erase_from="", method="esd-u", iterations=2, learning_rate=1e-3,
                  negative_guidance=1.0, seed=4, resolution=64, preserve="")
    old_widgets = dict(sample_steps=3, sample_guidance=3.0, sample_with="trained", mode="fast", reuse=0, rank=0)
    with torch.inference_mode():
        old = env["node"]["ESDEraseConcept"].execute(**shared, **old_widgets, repair_fraction=0.0, orthogonal_push=False).args[1]
        new = env["node"]["ESDTrainErasure"].execute(**shared, options=old_widgets).args[1]
    assert old.deltas.keys() == new.deltas.keys() and old.metadata["rank"] == "0"
    assert all(torch.equal(old.deltas[name], new.deltas[name]) for name in old.deltas)
    for removed, value in (("repair_fraction", 0.5), ("orthogonal_push", True)):
        with pytest.raises(ValueError, match=f"{removed} was removed"):
            env["node"]["ESDEraseConcept"].execute(**shared, **old_widgets, **{removed: value})


def test_sampling_the_original_after_training_is_bit_identical(env, loaded, trained):
    model, clip = loaded
    before, erased, erasure = trained
    assert torch.equal(sample(env, model, clip), before)
    assert not torch.equal(sample(env, erased, clip), before), "the erased model samples exactly like the original"
    assert torch.equal(sample(env, model, clip), before)  # and again after the erased clone was loaded


def test_saved_delta_applies_like_the_stock_lora_loader(env, loaded, trained):
    model, clip = loaded
    before, erased, erasure = trained
    path = env["node"]["ESDSaveErasure"].execute(erasure=erasure, filename_prefix="tests/cat", dtype="fp32", save_format="delta").args[0]
    assert os.path.dirname(path) == os.path.join(env["erasures"], "tests") and path.endswith("_00001.safetensors")
    name = os.path.relpath(path, env["erasures"]).replace(os.sep, "/")
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".partial")]

    saved = type(erasure).load(path)
    assert saved.metadata["concept"] == "cat" and saved.metadata["base_family"] == "sd1"
    assert set(saved.deltas) == set(erasure.deltas)

    with torch.inference_mode():
        applied = env["node"]["ESDApplyErasure"].execute(model=model, erasure_file=name, strength=1.0).args[0]
        stock = env["nodes"].LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
        zero = env["node"]["ESDApplyErasure"].execute(model=model, erasure_file=name, strength=0.0).args[0]
    with_ours = sample(env, applied, clip)
    assert torch.equal(with_ours, sample(env, stock, clip))
    assert torch.equal(with_ours, sample(env, erased, clip))  # fp32 file = the trained model exactly
    assert not torch.equal(with_ours, before)
    assert torch.equal(sample(env, zero, clip), before)
    assert torch.equal(sample(env, model, clip), before)

    second = env["node"]["ESDSaveErasure"].execute(erasure=erasure, filename_prefix="tests/cat", dtype="fp16", save_format="delta").args[0]
    assert second.endswith("_00002.safetensors")
    assert type(erasure).load(second).deltas.keys() == erasure.deltas.keys()
    for bad_prefix in ("../outside", "/etc/evil", "tests/"):
        with pytest.raises(ValueError, match="filename_prefix"):
            env["node"]["ESDSaveErasure"].execute(erasure=erasure, filename_prefix=bad_prefix, dtype="fp32")
    assert not os.path.exists(os.path.join(env["base"], "models", "outside_00001.safetensors"))


def test_apply_refuses_a_delta_for_another_family_or_shape(env, loaded, trained):
    model, _ = loaded
    _, _, erasure = trained
    apply = env["node"]["ESDApplyErasure"]
    other_family = type(erasure)(dict(erasure.deltas), {**erasure.metadata, "base_family": "sdxl"})
    with pytest.raises(ValueError, match="sdxl"):
        apply.execute(model=model, erasure_file="none", strength=1.0, erasure=other_family)
    name = next(iter(erasure.deltas))
    wrong_shape = type(erasure)({name: torch.zeros(3, 3)}, dict(erasure.metadata))
    with pytest.raises(ValueError, match="Shape mismatch"):
        apply.execute(model=model, erasure_file="none", strength=1.0, erasure=wrong_shape)
    with pytest.raises(ValueError, match="erasure_file"):
        apply.execute(model=model, erasure_file="none", strength=1.0)
    save_file({"input_blocks.1.1.proj_in.weight": torch.zeros(1)}, os.path.join(env["erasures"], "a-unet-file.safetensors"))
    with pytest.raises(ValueError, match="Load Erased UNet"):
        apply.execute(model=model, erasure_file="a-unet-file.safetensors", strength=1.0)
    save_file({"diffusion_model.out.2.diff": torch.tensor([float("nan")])}, os.path.join(env["erasures"], "damaged.safetensors"))
    with pytest.raises(ValueError, match="is damaged") as refused:
        apply.execute(model=model, erasure_file="damaged.safetensors", strength=1.0)
    assert "Load Erased UNet" not in str(refused.value)


def test_bad_training_inputs_give_clear_errors(env, loaded):
    model, clip = loaded
    erase = env["node"]["ESDTrainErasure"]
    common = dict(model=model, clip=clip, method="esd-x", iterations=1, learning_rate=1e-5, negative_guidance=1.0,
                  seed=0, resolution=64, options={"sample_steps": 2})
    with pytest.raises(ValueError, match="concept is empty"):
        erase.execute(concept=" , ", **common)
    with pytest.raises(ValueError, match="erase_from"):
        erase.execute(concept="a, b, c", erase_from="x, y", **common)
    with pytest.raises(ValueError, match="multiple of 8"):
        erase.execute(concept="cat", **{**common, "resolution": 60})
    with pytest.raises(ValueError, match="both erased and preserved"):
        erase.execute(concept="cat", preserve="dog, cat", **common)


def test_preservation_and_batches_train_inside_comfyui(env, loaded):
    """The training node's preserve input and the options node's preserve_weight / batch_size / trajectories /
    preserve_guidance / hold_unconditional / rank reach the loop, and the file records them."""
    model, clip = loaded
    options = dict(sample_steps=4, preserve_weight=2.0, trajectories=2, batch_size=2, preserve_guidance=2.5,
                   hold_unconditional=1.5, rank=2)
    with torch.inference_mode():
        _, erasure, curve = env["node"]["ESDTrainErasure"].execute(
            model=model, clip=clip, concept="cat", method="esd-x", iterations=2, learning_rate=1e-3,
            negative_guidance=1.0, seed=1, resolution=64, preserve="dog, a bird", options=options,
        ).args
    settings = erasure.metadata
    assert (settings["preserve"], settings["preserve_weight"], settings["batch_size"]) == ("dog, a bird", "2.0", "2")
    assert (settings["trajectories"], settings["preserve_guidance"], settings["hold_unconditional"]) == ("2", "2.5", "1.5")
    assert (settings["rank"], settings["sample_steps"]) == ("2", "4")
    assert any(erasure.full(name).abs().max() > 0 for name in erasure.deltas)


def test_a_lora_erasure_in_models_loras_applies_as_the_stock_lora_loader_applies_it(env, loaded):
    """A low-rank erasure saved as a LoRA into models/loras: the stock LoraLoaderModelOnly and Apply Erasure on the
    same file give the same latents, which are those of the trained erasure without its bias deltas (a LoRA cannot
    carry them) up to the rounding of its rebalanced factors."""
    model, clip = loaded
    before = sample(env, model, clip)
    with torch.inference_mode():
        erased, erasure, _ = env["node"]["ESDTrainErasure"].execute(
            model=model, clip=clip, concept="cat", method="esd-u", iterations=2, learning_rate=2e-3, negative_guidance=1.0,
            seed=2, resolution=64, options={"sample_steps": 4, "rank": 4},
        ).args
    save = env["node"]["ESDSaveErasure"]
    path = save.execute(erasure=erasure, filename_prefix="tests/cat-lora", dtype="fp32", folder="loras").args[0]
    loras = env["folder_paths"].get_folder_paths("loras")[0]
    assert os.path.dirname(path) == os.path.join(loras, "tests")
    with safe_open(path, framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert metadata["format"] == "esd-erasure-lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(".lora_down.weight") for k in keys)
    assert not any(k.endswith((".diff", ".diff_b")) for k in keys)
    name = os.path.relpath(path, loras).replace(os.sep, "/")
    shutil.copy(path, os.path.join(env["erasures"], "cat-lora.safetensors"))
    with torch.inference_mode():
        stock = env["nodes"].LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
        ours, read = env["node"]["ESDApplyErasure"].execute(model=model, erasure_file="cat-lora.safetensors", strength=1.0).args
    with_stock = sample(env, stock, clip)
    assert torch.equal(sample(env, ours, clip), with_stock)
    assert not torch.equal(with_stock, before)
    weights_only = type(erasure)({n: d for n, d in erasure.deltas.items() if n.endswith(".weight")}, erasure.metadata)
    assert len(weights_only.deltas) == len(read.deltas) < len(erasure.deltas)
    with torch.inference_mode():
        in_memory = env["node"]["ESDApplyErasure"].execute(model=model, erasure_file="none", strength=1.0, erasure=weights_only).args[0]
    assert torch.allclose(with_stock, sample(env, in_memory, clip), rtol=1e-4, atol=1e-3)
    assert torch.equal(sample(env, model, clip), before)


def test_interrupt_stops_training_and_leaves_everything_as_it_was(env, loaded):
    import threading

    import comfy.model_management

    model, clip = loaded
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    host_module = comfy_env.pack_module("nodes.comfy_host")
    original_predict = host_module.ComfyErasureHost.predict
    calls = []

    def counting_predict(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # a few iterations in: the user presses Cancel
            threading.Thread(target=comfy.model_management.interrupt_current_processing, args=(True,)).start()
        return original_predict(self, *args, **kwargs)

    host_module.ComfyErasureHost.predict = counting_predict
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            env["node"]["ESDTrainErasure"].execute(
                model=model, clip=clip, concept="cat", method="esd-x", iterations=100000, learning_rate=1e-3,
                negative_guidance=1.0, seed=2, resolution=64, options={"sample_steps": 4, "mode": "reference"},
            )
    finally:
        host_module.ComfyErasureHost.predict = original_predict
        comfy.model_management.interrupt_current_processing(False)
    assert len(calls) < 20, f"training went on for {len(calls)} UNet calls after the interrupt"
    import gc

    gc.collect()  # the training state is gone: no trainable delta (nor its optimizer state) survives the cancel
    assert not [o for o in gc.get_objects() if type(o).__name__ in ("TrainableDelta", "ComfyErasureHost")]
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.weight_wrapper_patches and not model.patches
    for module in model.model.modules():
        for attribute in ("weight_function", "bias_function"):
            assert not any(type(f).__name__ == "_Wrapper" for f in module.__dict__.get(attribute, []))
    assert not any(type(f).__name__ == "_Wrapper"
                   for loaded_model in comfy.model_management.current_loaded_models if loaded_model.model is not None
                   for fs in loaded_model.model.weight_wrapper_patches.values() for f in fs)


# --- Load Erased UNet ----------------------------------------------------------------------------------------

def _unet_in_both_namings():
    """The checkpoint's UNet as (diffusers state dict, {diffusers name: ldm name})."""
    unet = comfy_env.tiny_diffusers_unet()
    keys = comfy_env.pack_module("esd_core.keys")
    state = unet.state_dict()
    return state, keys.diffusers_to_ldm_names(state.keys(), dict(unet.config))


def _write_layouts(folder: str) -> dict:
    """Every published ESD layout, built from the tiny UNet with changed values; file -> {ldm name: expected}."""
    state, to_ldm = _unet_in_both_namings()
    changed = {k: v + 0.25 for k, v in state.items()}
    attn2 = [k for k in state if "attn2" in k]
    kv = [k for k in attn2 if ".to_k." in k or ".to_v." in k]
    expected = {}

    torch.save(changed, os.path.join(folder, "diffusers-cat-ESDx1-UNET.pt"))  # full, diffusers names
    expected["diffusers-cat-ESDx1-UNET.pt"] = {to_ldm[k]: changed[k] for k in state}

    compvis = {f"model.diffusion_model.{to_ldm[k]}": changed[k] for k in state}
    compvis["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    compvis["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(768)
    torch.save({"state_dict": compvis, "global_step": 1000}, os.path.join(folder, "compvis-cat.ckpt"))
    expected["compvis-cat.ckpt"] = {to_ldm[k]: changed[k] for k in state}

    partial = {k: changed[k].to(torch.bfloat16).contiguous() for k in kv}  # 2025 script: partial, bf16, no prefix
    save_file(partial, os.path.join(folder, "esd-cat-from-cat-esdx.safetensors"))
    expected["esd-cat-from-cat-esdx.safetensors"] = {to_ldm[k]: partial[k].float() for k in kv}

    nested = {}
    for k in attn2:  # older script: {'unet.<module>': {'weight': ..., 'bias': ...}}
        module, kind = k.rsplit(".", 1)
        nested.setdefault(f"unet.{module}", {})[kind] = changed[k]
    torch.save(nested, os.path.join(folder, "nested-cat.pt"))
    expected["nested-cat.pt"] = {to_ldm[k]: changed[k] for k in attn2}

    prefixed = {f"diffusion_model.{to_ldm[k]}": changed[k] for k in kv}
    save_file(prefixed, os.path.join(folder, "ldm-prefixed.safetensors"))
    expected["ldm-prefixed.safetensors"] = {to_ldm[k]: changed[k] for k in kv}
    return expected


def _weights_after_load(patcher) -> dict:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def test_load_erased_unet_reads_every_published_layout(env, loaded):
    model, clip = loaded
    expected_by_file = _write_layouts(env["erasures"])
    original = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    before = sample(env, model, clip)
    loader = env["node"]["ESDLoadErasedUNet"]
    for file_name, expected in expected_by_file.items():
        with torch.inference_mode():
            patched, report = loader.execute(model=model, unet_file=f"erasures/{file_name}").args
        assert f"Replaced {len(expected)} of {len(original)}" in report, report
        weights = _weights_after_load(patched)
        for name, tensor in weights.items():
            if name in expected:
                assert torch.equal(tensor, expected[name].to(tensor.dtype).reshape(tensor.shape)), (file_name, name)
            else:
                assert torch.equal(tensor, original[name]), (file_name, name)
    assert torch.equal(sample(env, model, clip), before)  # the input MODEL is untouched


def test_load_erased_unet_refuses_bad_files(env, loaded):
    model, _ = loaded
    folder = env["erasures"]
    loader = env["node"]["ESDLoadErasedUNet"]
    with open(os.path.join(folder, "broken.safetensors"), "wb") as handle:
        handle.write(b"this is not a safetensors file")
    state, to_ldm = _unet_in_both_namings()
    wrong = {k: torch.zeros(7, 7) for k in list(state)[:3]}
    first_wrong = sorted(to_ldm[k] for k in wrong)[0]
    save_file(wrong, os.path.join(folder, "wrong-shapes.safetensors"))
    save_file({"diffusion_model.input_blocks.1.1.proj_in.diff": torch.zeros(1)}, os.path.join(folder, "a-delta.safetensors"))
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)}, os.path.join(folder, "not-a-unet.safetensors"))
    cases = {
        "broken.safetensors": "not a readable safetensors",
        "wrong-shapes.safetensors": f"Shape mismatch at '{first_wrong}'",
        "a-delta.safetensors": "Apply Erasure",
        "not-a-unet.safetensors": "No UNet tensors found",
    }
    for file_name, message in cases.items():
        with pytest.raises(ValueError, match=message.replace(".", r"\.")), torch.inference_mode():
            loader.execute(model=model, unet_file=f"erasures/{file_name}")
    with pytest.raises(ValueError, match="Pick a file"):
        loader.execute(model=model, unet_file="elsewhere/x.safetensors")
