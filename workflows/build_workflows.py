"""Writes the example workflows of this folder (ComfyUI's UI graph format: nodes, links, version).

Run ``python workflows/build_workflows.py`` after changing a node's inputs; ComfyUI lists the .json files of
this folder in its template browser. Widget values follow each node's widget order as the frontend makes it (a
seed widget with "control after generate" takes one extra value: "fixed" / "randomize"). Then check the layout in
the real frontend: ``docs/screenshots/take.py`` (no node may cover another; sizes at least the frontend's).
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
POSITIVE = "a painting of a starry night over a village, by Van Gogh"

# Output slots of the nodes used below: name, type.
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "ESDTrainErasure": [("MODEL", "MODEL"), ("ERASURE", "ERASURE"), ("loss_curve", "IMAGE")],
    "ESDErasureOptions": [("options", "ESD_OPTIONS")],
    "ESDSaveErasure": [("path", "STRING")],
    "ESDApplyErasure": [("MODEL", "MODEL"), ("ERASURE", "ERASURE")],
    "ESDLoadErasedUNet": [("MODEL", "MODEL"), ("report", "STRING")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "ImageStitch": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewImage": [],
    "PreviewAny": [],
    "Note": [],
}
# Link inputs, in slot order: name, type.
INPUTS = {
    "CheckpointLoaderSimple": [],
    "ESDTrainErasure": [("model", "MODEL"), ("clip", "CLIP"), ("options", "ESD_OPTIONS")],
    "ESDErasureOptions": [],
    "ESDSaveErasure": [("erasure", "ERASURE")],
    "ESDApplyErasure": [("model", "MODEL"), ("erasure", "ERASURE")],
    "ESDLoadErasedUNet": [("model", "MODEL")],
    "CLIPTextEncode": [("clip", "CLIP")],
    "EmptyLatentImage": [],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "ImageStitch": [("image1", "IMAGE"), ("image2", "IMAGE")],
    "SaveImage": [("images", "IMAGE")],
    "PreviewImage": [("images", "IMAGE")],
    "PreviewAny": [("source", "*")],
    "Note": [],
}
OPTIONAL_LINKS = ("options", "erasure", "image2")  # left out of a node's inputs when unconnected, as before
# Node sizes (width, height of the body, without the 30-pixel title bar): at least what ComfyUI's frontend
# computes for the node's widgets (it grows a smaller node on load, over its neighbours), checked with
# docs/screenshots/take.py.
SIZES = {
    "CheckpointLoaderSimple": [360, 100], "ESDTrainErasure": [380, 350], "ESDErasureOptions": [340, 330],
    "ESDSaveErasure": [340, 160], "ESDApplyErasure": [380, 110], "ESDLoadErasedUNet": [420, 80],
    "CLIPTextEncode": [380, 160], "EmptyLatentImage": [380, 110], "KSampler": [320, 270], "VAEDecode": [220, 50],
    "ImageStitch": [320, 150], "SaveImage": [420, 360], "PreviewImage": [340, 280], "PreviewAny": [340, 120],
    "Note": [360, 300],
}
# ComfyUI's frontend gives an INT input named "seed" a "control after generate" widget (one more value in
# widgets_values, after the seed's) unless the node declares control_after_generate=False, as ESDTrainErasure does:
# a second run reuses the trained erasure instead of training again with a new seed. So its seed takes one value.
TITLE = 30  # LiteGraph's title bar, drawn above a node's pos
GAP = 40  # between a node's body and the next node's title bar


def below(node, gap=GAP):
    """The y of a node placed under ``node`` (its title bar clear of ``node``'s body)."""
    return node["pos"][1] + node["size"][1] + TITLE + gap


def right_of(node, gap=GAP):
    return node["pos"][0] + node["size"][0] + gap


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, node_type, pos, widgets=(), title=None, size=None):
        node = {
            "id": len(self.nodes) + 1, "type": node_type, "pos": list(pos), "size": list(size or SIZES[node_type]),
            "flags": {}, "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in INPUTS[node_type]],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(OUTPUTS[node_type])],
            "properties": {"Node name for S&R": node_type}, "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, source, output_name, target, input_name):
        slot = [o["name"] for o in source["outputs"]].index(output_name)
        target_slot = [i["name"] for i in target["inputs"]].index(input_name)
        link_id = len(self.links) + 1
        kind = source["outputs"][slot]["type"]
        self.links.append([link_id, source["id"], slot, target["id"], target_slot, kind])
        source["outputs"][slot]["links"].append(link_id)
        target["inputs"][target_slot]["link"] = link_id

    def write(self, name, note):
        for node in self.nodes:  # optional link inputs left unconnected are dropped, as the UI saves them
            node["inputs"] = [i for i in node["inputs"] if i["link"] is not None or i["name"] not in OPTIONAL_LINKS]
        graph = {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links,
            "groups": [], "config": {}, "extra": {"info": note}, "version": 0.4,
        }
        with open(os.path.join(HERE, name), "w") as handle:
            json.dump(graph, handle, indent=1)
            handle.write("\n")


def note(graph, pos, text, size=None):
    """A UI-only Note node (the frontend draws it; it never reaches the server)."""
    node = graph.node("Note", pos, [text], title="Read me", size=size)
    node["color"], node["bgcolor"] = "#432", "#653"
    return node


def prompt_nodes(graph, clip_source, x, y):
    positive = graph.node("CLIPTextEncode", (x, y), [POSITIVE], title="Positive")
    negative = graph.node("CLIPTextEncode", (x, below(positive)), ["blurry, low quality"], title="Negative")
    latent = graph.node("EmptyLatentImage", (x, below(negative)), [512, 512, 1])
    for node in (positive, negative):
        graph.link(clip_source, "CLIP", node, "clip")
    return positive, negative, latent


def sampler(graph, model_source, positive, negative, latent, vae_source, pos, title):
    """KSampler and its VAE Decode to the right of it; returns both."""
    ksampler = graph.node("KSampler", pos, [1234, "fixed", 20, 7.0, "euler", "normal", 1.0], title=f"KSampler ({title})")
    graph.link(model_source, "MODEL", ksampler, "model")
    graph.link(positive, "CONDITIONING", ksampler, "positive")
    graph.link(negative, "CONDITIONING", ksampler, "negative")
    graph.link(latent, "LATENT", ksampler, "latent_image")
    decode = graph.node("VAEDecode", (right_of(ksampler), pos[1]), title=f"Decode ({title})")
    graph.link(ksampler, "LATENT", decode, "samples")
    graph.link(vae_source, "VAE", decode, "vae")
    return ksampler, decode


def erase_and_compare():
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (20, 60), [CHECKPOINT])
    erase = g.node("ESDTrainErasure", (right_of(ckpt), 60), [
        "Van Gogh", "", "", "esd-x", 1000, 1e-5, 1.0, 0, 0,
    ])
    g.link(ckpt, "MODEL", erase, "model")
    g.link(ckpt, "CLIP", erase, "clip")
    note(g, (20, below(ckpt)), "1. Pick your SD1.x / SD2.x / SDXL checkpoint.\n2. Type the concept to erase (esd-x for "
         "styles and artists, esd-u for objects and nudity); texts in preserve are kept as they were.\n3. Run. "
         "Training shows its progress on the node and can be cancelled; the erasure is saved as a LoRA to models/erasures "
         "(load it later with Apply Erasure or LoraLoaderModelOnly; A1111, Forge and diffusers load it too).\nBoth samplers use the same seed: left "
         "the original, right the erased model.\n\nMore settings (sampling steps, rank, preservation, memory): add "
         "an 'Erasure Options (ESD)' node and connect it to the options input. Without it the defaults "
         "apply.", size=[360, 230])
    save = g.node("ESDSaveErasure", (right_of(erase), 60), ["esd/van_gogh", "fp16", "lora", 64, "erasures"])
    g.link(erase, "ERASURE", save, "erasure")
    curve = g.node("PreviewImage", (right_of(erase), below(save)), title="Loss curve")
    g.link(erase, "loss_curve", curve, "images")
    positive, negative, latent = prompt_nodes(g, ckpt, erase["pos"][0], below(erase))
    sampler_x = right_of(erase)
    original, decode_original = sampler(g, ckpt, positive, negative, latent, ckpt, (sampler_x, below(curve)), "original")
    erased, decode_erased = sampler(g, erase, positive, negative, latent, ckpt, (sampler_x, below(original)), "erased")
    stitch_x = right_of(decode_original)
    stitch = g.node("ImageStitch", (stitch_x, original["pos"][1]), ["right", True, 16, "white"], title="Original | Erased")
    g.link(decode_original, "IMAGE", stitch, "image1")
    g.link(decode_erased, "IMAGE", stitch, "image2")
    save_image = g.node("SaveImage", (stitch_x, below(stitch)), ["esd/compare"])
    g.link(stitch, "IMAGE", save_image, "images")
    g.write("erase-and-compare.json", "Erase a concept (ESD), save the erasure to models/erasures, and sample the "
            "original and the erased model with the same seed, side by side.")


def apply_delta():
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (20, 60), [CHECKPOINT])
    apply = g.node("ESDApplyErasure", (right_of(ckpt), 60), ["esd/van_gogh_00001.safetensors", 1.0])
    g.link(ckpt, "MODEL", apply, "model")
    note(g, (20, below(ckpt)), "Pick an erasure file from models/erasures (written by Save Erasure: a LoRA or an exact "
         "delta; LoRA erasures made elsewhere work too). Strength 1 applies the erasure as trained, 0 leaves the model "
         "unchanged. It is a patch: it composes with LoRAs and never changes the loaded checkpoint.", size=[360, 150])
    positive, negative, latent = prompt_nodes(g, ckpt, apply["pos"][0], below(apply))
    _, decode = sampler(g, apply, positive, negative, latent, ckpt, (right_of(positive), positive["pos"][1]), "erased")
    save_image = g.node("SaveImage", (right_of(decode), positive["pos"][1]), ["esd/applied"])
    g.link(decode, "IMAGE", save_image, "images")
    g.write("apply-delta.json", "Apply a saved erasure (models/erasures) to a checkpoint at a strength, then sample.")


def load_erased_unet():
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (20, 60), [CHECKPOINT])
    load = g.node("ESDLoadErasedUNet", (right_of(ckpt), 60), ["erasures/diffusers-VanGogh-ESDx1-UNET.pt"])
    g.link(ckpt, "MODEL", load, "model")
    note(g, (20, below(ckpt)), "Put the published erased weights in models/erasures or models/diffusion_models: "
         "full diffusers-named .pt (e.g. diffusers-VanGogh-ESDx1-UNET.pt), CompVis .ckpt, or partial .safetensors. "
         "The base checkpoint must be the model they were erased from (SD1.4/1.5 for the original ESD files). "
         "Pickle files are read with weights_only=True only.", size=[360, 150])
    report = g.node("PreviewAny", (right_of(load), 60), title="What was replaced")
    g.link(load, "report", report, "source")
    positive, negative, latent = prompt_nodes(g, ckpt, load["pos"][0], below(report))
    _, decode = sampler(g, load, positive, negative, latent, ckpt, (right_of(positive), positive["pos"][1]), "erased UNet")
    save_image = g.node("SaveImage", (right_of(decode), positive["pos"][1]), ["esd/erased_unet"])
    g.link(decode, "IMAGE", save_image, "images")
    g.write("load-erased-unet.json", "Replace a checkpoint's UNet with published erased weights (ESD .pt, CompVis "
            ".ckpt or partial .safetensors), then sample.")


if __name__ == "__main__":
    erase_and_compare()
    apply_delta()
    load_erased_unet()
