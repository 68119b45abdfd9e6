"""A real ComfyUI server (main.py --cpu on 127.0.0.1) with the pack: node list, example workflows, workflows
saved before the training node was redesigned (tests/workflows_before), cancel.

Needs ComfyUI (COMFYUI_PATH); skips otherwise.
"""

import asyncio
import json
import os
import sys
import time
import urllib.request

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_env  # noqa: E402
import comfy_workflows  # noqa: E402

comfy_env.require_comfyui()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from comfy_env.one_torch_thread()

# Training settings by input name; set_training puts each on the node that has it (sample_steps and mode live on
# the Erasure Options node now, on the old node itself).
FAST = {"iterations": 2, "sample_steps": 3, "learning_rate": 1e-3, "resolution": 64}
SMALL_SAMPLING = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}}
WORKFLOW_FILES = ("erase-and-compare.json", "erase-flux.json", "apply-delta.json", "load-erased-unet.json")
# erase-and-compare first: apply-delta applies the erasure it writes
BEFORE_FILES = tuple(sorted(os.listdir(comfy_workflows.WORKFLOWS_BEFORE), key=lambda name: name != "erase-and-compare.json"))


@pytest.fixture(scope="module")
def server():
    base = comfy_env.base_directory()
    checkpoint = comfy_env.install_checkpoint(base)
    running = comfy_env.ComfyServer(base).start()
    running.checkpoint = checkpoint
    running.erasures = os.path.join(base, "models", "erasures")
    running.object_info = running.get("/object_info")
    yield running
    running.stop()


def overrides(server, **extra):
    values = {"CheckpointLoaderSimple": {"ckpt_name": server.checkpoint}, **SMALL_SAMPLING}
    for key, inputs in extra.items():
        values[key] = {**values.get(key, {}), **inputs}
    return values


def training_prompt(server, workflow, training: dict, **extra) -> dict:
    prompt = comfy_workflows.to_api(workflow, server.object_info, overrides(server, **extra))
    return comfy_workflows.set_training(prompt, server.object_info, {**FAST, **training})


def saved_images(server, result, prefix: str) -> list:
    from PIL import Image

    images = [image for output in result["outputs"].values() for image in output.get("images", [])]
    chosen = [image for image in images if image["type"] == "output" and image["filename"].startswith(prefix)]
    folder = os.path.join(server.base, "output")
    return [Image.open(os.path.join(folder, image["subfolder"], image["filename"])).convert("RGB") for image in chosen]


def assert_erased_half_differs(server, result, prefix: str) -> None:
    """The comparison image: the original model's sample left, the erased one's right (same seed), 16 px apart.
    Different halves: the erasure changed the model the right sampler ran."""
    import numpy as np

    (image,) = saved_images(server, result, prefix)
    pixels = np.asarray(image).astype(int)
    width = (pixels.shape[1] - 16) // 2
    left, right = pixels[:, :width], pixels[:, width + 16:]
    assert left.shape == right.shape and (pixels[:, width:width + 16] == 255).all(), pixels.shape  # the white gap
    assert (left != right).any(), "the erased model sampled the same image as the original"


def run(server, prompt) -> dict:
    result = server.wait(server.queue(prompt))
    assert result["status"]["status_str"] == "success", json.dumps(result["status"], indent=1)[:4000]
    return result


def test_nodes_are_listed_with_display_names(server):
    info = server.object_info
    names = {k: info[k]["display_name"] for k in info if k.startswith("ESD")}
    assert names == {
        "ESDTrainErasure": "Train Concept Erasure (ESD)", "ESDErasureOptions": "Erasure Options (ESD)",
        "ESDEraseConcept": "Erase Concept (Train, old)", "ESDSaveErasure": "Save Erasure",
        "ESDApplyErasure": "Apply Erasure", "ESDLoadErasedUNet": "Load Erased UNet",
    }
    import_lines = [line for line in server.log().splitlines() if line.rstrip().endswith(f"custom_nodes/{comfy_env.PACK_NAME}")]
    assert import_lines and not any("IMPORT FAILED" in line for line in import_lines), import_lines
    categories = {k: info[k]["category"] for k in names}
    assert categories == {"ESDTrainErasure": "training", "ESDErasureOptions": "training", "ESDEraseConcept": "training",
                          "ESDSaveErasure": "loaders", "ESDApplyErasure": "loaders", "ESDLoadErasedUNet": "loaders"}
    assert [k for k in names if info[k].get("deprecated")] == ["ESDEraseConcept"]  # kept for old workflows, off the menu
    assert info["ESDTrainErasure"]["output"] == info["ESDEraseConcept"]["output"] == ["MODEL", "ERASURE", "IMAGE"]
    assert info["ESDErasureOptions"]["output"] == ["ESD_OPTIONS"]
    assert info["ESDTrainErasure"]["input"]["optional"]["options"][0] == "ESD_OPTIONS"
    assert info["ESDSaveErasure"]["input"]["required"]["dtype"][1]["default"] == "fp16"


def test_example_workflows_are_in_the_template_browser_and_well_formed(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates[comfy_env.PACK_NAME]) == sorted(name[:-5] for name in WORKFLOW_FILES)
    for name in WORKFLOW_FILES:
        served = server.get(f"/api/workflow_templates/{comfy_env.PACK_NAME}/{name}")
        assert served == comfy_workflows.load(name)
        comfy_workflows.check_graph(served, server.object_info)
        thumbnail = f"{server.url}/api/workflow_templates/{comfy_env.PACK_NAME}/{name[:-5]}.jpg"
        with urllib.request.urlopen(thumbnail, timeout=30) as response:  # the template browser's thumbnail
            assert response.status == 200 and response.read(3) == b"\xff\xd8\xff"


def test_erase_and_compare_workflow_runs(server):
    workflow = comfy_workflows.load("erase-and-compare.json")
    assert {node["type"] for node in workflow["nodes"]} >= {"ESDTrainErasure", "ESDSaveErasure"}
    prompt = training_prompt(server, workflow, {"concept": "cat"}, ESDSaveErasure={"filename_prefix": "server/cat"})
    assert [v["class_type"] for v in prompt.values()].count("ESDErasureOptions") == 1  # sample_steps went there
    result = run(server, prompt)
    files = sorted(os.listdir(os.path.join(server.erasures, "server")))
    assert files == ["cat_00001.safetensors"]
    images = [image for output in result["outputs"].values() for image in output.get("images", [])]
    assert any(image["filename"].startswith("compare") for image in images), result["outputs"]
    assert len(images) >= 2  # the side-by-side comparison and the loss curve
    assert_erased_half_differs(server, result, "compare")


@pytest.mark.parametrize("name", BEFORE_FILES)
def test_workflows_saved_before_the_change_load_and_run(server, name):
    """The workflows shipped before the training node was redesigned (tests/workflows_before, as the frontend saved
    them: positional widget values, the old ESDEraseConcept with its seed control and removed settings) pass the
    frontend's checks against today's node list, and run, with the erasure applied."""
    workflow = comfy_workflows.load(name, comfy_workflows.WORKFLOWS_BEFORE)
    comfy_workflows.check_graph(workflow, server.object_info, saved_before=True)
    stem = name[:-5]
    if name == "erase-and-compare.json":
        assert "ESDEraseConcept" in {node["type"] for node in workflow["nodes"]}
        prompt = training_prompt(server, workflow, {"concept": "cat"},
                                 ESDSaveErasure={"filename_prefix": "before/cat"}, SaveImage={"filename_prefix": "before/compare"})
        assert "ESDErasureOptions" not in [v["class_type"] for v in prompt.values()]  # the old node has every input
        erase = next(v["inputs"] for v in prompt.values() if v["class_type"] == "ESDEraseConcept")
        assert (erase["repair_fraction"], erase["orthogonal_push"], erase["seed"]) == (0.0, False, 0)
        result = run(server, prompt)
        assert os.listdir(os.path.join(server.erasures, "before")) == ["cat_00001.safetensors"]
        assert_erased_half_differs(server, result, "compare")
    elif name == "apply-delta.json":
        delta = "before/cat_00001.safetensors"
        if not os.path.isfile(os.path.join(server.erasures, delta)):
            pytest.skip("needs the erasure written by the erase-and-compare case")
        samples = []
        for strength in (1.0, 0.0):  # the delta applied, then not: different samples
            prompt = comfy_workflows.to_api(workflow, server.object_info, overrides(
                server, ESDApplyErasure={"erasure_file": delta, "strength": strength},
                SaveImage={"filename_prefix": f"before/{stem}_{strength}"},
            ))
            (image,) = saved_images(server, run(server, prompt), f"{stem}_{strength}")
            samples.append(image)
        assert samples[0].tobytes() != samples[1].tobytes(), "applying the delta did not change the sample"
    else:
        assert name == "load-erased-unet.json", f"no case for {name}"
        unet = {f"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.{part}.weight": torch.full((320, 768), 0.02)
                for part in ("to_k", "to_v")}
        save_file(unet, os.path.join(server.erasures, "before-partial-unet.safetensors"))
        prompt = comfy_workflows.to_api(workflow, server.object_info, overrides(
            server, ESDLoadErasedUNet={"unet_file": "erasures/before-partial-unet.safetensors"},
            SaveImage={"filename_prefix": f"before/{stem}"},
        ))
        result = run(server, prompt)
        texts = [t for output in result["outputs"].values() for t in output.get("text", [])]
        assert any(t.startswith("Replaced 2 of ") for t in texts), result["outputs"]


def test_apply_delta_workflow_runs(server):
    name = "server/cat_00001.safetensors"
    if not os.path.isfile(os.path.join(server.erasures, name)):
        pytest.skip("needs the erasure written by test_erase_and_compare_workflow_runs")
    prompt = comfy_workflows.to_api(comfy_workflows.load("apply-delta.json"), server.object_info, overrides(
        server, ESDApplyErasure={"erasure_file": name, "strength": 0.8},
    ))
    result = run(server, prompt)
    assert any(output.get("images") for output in result["outputs"].values())


def test_load_erased_unet_workflow_runs(server):
    unet = {  # a partial, diffusion_model.-prefixed file: attn2 keys and values of the first block
        f"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.{part}.weight": torch.full((320, 768), 0.01)
        for part in ("to_k", "to_v")
    }
    save_file(unet, os.path.join(server.erasures, "server-partial-unet.safetensors"))
    prompt = comfy_workflows.to_api(comfy_workflows.load("load-erased-unet.json"), server.object_info, overrides(
        server, ESDLoadErasedUNet={"unet_file": "erasures/server-partial-unet.safetensors"},
    ))
    result = run(server, prompt)
    texts = [t for output in result["outputs"].values() for t in output.get("text", [])]
    assert any(t.startswith("Replaced 2 of ") for t in texts), result["outputs"]


def test_cancel_stops_training_writes_nothing_and_the_server_goes_on(server):
    import aiohttp

    workflow = comfy_workflows.load("erase-and-compare.json")
    prompt = training_prompt(server, workflow, {"iterations": 100000, "concept": "dog", "mode": "reference"},
                             ESDSaveErasure={"filename_prefix": "cancelled/dog"})
    erase_id = next(k for k, v in prompt.items() if v["class_type"] == "ESDTrainErasure")

    async def cancel_during_training():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url.replace('http', 'ws')}/ws?clientId=esd-tests") as ws:
                prompt_id = server.queue(prompt)
                progressed, interrupted_at = None, time.time()
                deadline = time.time() + 180
                async for message in ws:
                    if time.time() > deadline:
                        raise AssertionError("no progress / interruption seen in time")
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(message.data)
                    data = event.get("data", {})
                    if event["type"] == "progress" and data.get("node") == erase_id and progressed is None:
                        progressed = data["value"]
                        interrupted_at = time.time()
                        server.post("/interrupt")
                    if event["type"] in ("execution_interrupted", "execution_error", "execution_success") and \
                            data.get("prompt_id") == prompt_id:
                        return event["type"], progressed, time.time() - interrupted_at, data
        raise AssertionError("websocket closed")

    kind, progressed, seconds, data = asyncio.run(cancel_during_training())
    assert kind == "execution_interrupted", data
    assert data.get("node_id") == erase_id
    assert progressed is not None and progressed < 100000
    assert seconds < 30, f"cancel took {seconds:.1f} s"
    assert not os.path.exists(os.path.join(server.erasures, "cancelled"))

    # the server serves the next prompt
    prompt = training_prompt(server, workflow, {"concept": "bird", "iterations": 1}, ESDSaveErasure={"filename_prefix": "after/bird"})
    run(server, prompt)
    assert os.listdir(os.path.join(server.erasures, "after")) == ["bird_00001.safetensors"]
