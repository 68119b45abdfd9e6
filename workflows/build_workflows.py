"""Writes the example workflows of this folder (ComfyUI's UI graph format: nodes, links, version).

Run ``python workflows/build_workflows.py`` after changing a node's inputs; ComfyUI lists the .json files of
this folder in its template browser. Widget values follow each node's widget order (a seed widget with
"control after generate" takes one extra value: "fixed" / "randomize").
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
POSITIVE = "a painting of a starry night over a village, by Van Gogh"

# Output slots of the nodes used below: name, type.
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "ESDEraseConcept": [("MODEL", "MODEL"), ("ERASURE", "ERASURE"), ("loss_curve", "IMAGE")],
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
    "ESDEraseConcept": [("model", "MODEL"), ("clip", "CLIP")],
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
SIZES = {
    "CLIPTextEncode": [400, 160], "ESDEraseConcept": [340, 440], "KSampler": [315, 262], "SaveImage": [420, 360],
    "Note": [360, 220], "ImageStitch": [320, 170], "PreviewImage": [300, 260],
}


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, node_type, pos, widgets=(), title=None):
        node = {
            "id": len(self.nodes) + 1, "type": node_type, "pos": list(pos), "size": SIZES.get(node_type, [315, 110]),
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
            node["inputs"] = [i for i in node["inputs"] if i["link"] is not None or i["name"] not in ("erasure", "image2")]
        graph = {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links,
            "groups": [], "config": {}, "extra": {"info": note}, "version": 0.4,
        }
        with open(os.path.join(HERE, name), "w") as handle:
            json.dump(graph, handle, indent=1)
            handle.write("\n")


def note(graph, pos, text):
    """A UI-only Note node (the frontend draws it; it never reaches the server)."""
    node = graph.node("Note", pos, [text], title="Read me")
    node["color"], node["bgcolor"] = "#432", "#653"
    return node


def prompt_nodes(graph, clip_source, x=420, y=420):
    positive = graph.node("CLIPTextEncode", (x, y), [POSITIVE], title="Positive")
    negative = graph.node("CLIPTextEncode", (x, y + 200), ["blurry, low quality"], title="Negative")
    latent = graph.node("EmptyLatentImage", (x, y + 400), [512, 512, 1])
    for node in (positive, negative):
        graph.link(clip_source, "CLIP", node, "clip")
    return positive, negative, latent


def sampler(graph, model_source, positive, negative, latent, vae_source, pos, title):
    ksampler = graph.node("KSampler", pos, [1234, "fixed", 20, 7.0, "euler", "normal", 1.0], title=f"KSampler ({title})")
    graph.link(model_source, "MODEL", ksampler, "model")
    graph.link(positive, "CONDITIONING", ksampler, "positive")
    graph.link(negative, "CONDITIONING", ksampler, "negative")
    graph.link(latent, "LATENT", ksampler, "latent_image")
    decode = graph.node("VAEDecode", (pos[0] + 340, pos[1]), title=f"Decode ({title})")
    graph.link(ksampler, "LATENT", decode, "samples")
    graph.link(vae_source, "VAE", decode, "vae")
    return decode


def erase_and_compare():
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (20, 120), [CHECKPOINT])
    erase = g.node("ESDEraseConcept", (420, 20), [
        "Van Gogh", "", "esd-x", 1000, 1e-5, 1.0, 50, 3.0, "trained", "fast", 0, 0, 0, "fixed", 0, "", 1.0, 8, 1,
        0.0, False, 1.0, 0.0,
    ])
    g.link(ckpt, "MODEL", erase, "model")
    g.link(ckpt, "CLIP", erase, "clip")
    save = g.node("ESDSaveErasure", (820, 20), ["esd/van_gogh", "fp32"])
    g.link(erase, "ERASURE", save, "erasure")
    curve = g.node("PreviewImage", (820, 180), title="Loss curve")
    g.link(erase, "loss_curve", curve, "images")
    note(g, (20, 300), "1. Pick your SD1.x / SD2.x / SDXL checkpoint.\n2. Type the concept to erase (esd-x for styles "
         "and artists, esd-u for objects and nudity).\n3. Run. Training shows its progress on the node and can be "
         "cancelled; the erasure is saved to models/erasures (load it later with Apply Erasure Delta or "
         "LoraLoaderModelOnly).\nBoth samplers use the same seed: left the original, right the erased model.")
    positive, negative, latent = prompt_nodes(g, ckpt, y=560)
    original = sampler(g, ckpt, positive, negative, latent, ckpt, (880, 560), "original")
    erased = sampler(g, erase, positive, negative, latent, ckpt, (880, 860), "erased")
    stitch = g.node("ImageStitch", (1580, 560), ["right", True, 16, "white"], title="Original | Erased")
    g.link(original, "IMAGE", stitch, "image1")
    g.link(erased, "IMAGE", stitch, "image2")
    save_image = g.node("SaveImage", (1580, 780), ["esd/compare"])
    g.link(stitch, "IMAGE", save_image, "images")
    g.write("erase-and-compare.json", "Erase a concept (ESD), save the erasure to models/erasures, and sample the "
            "original and the erased model with the same seed, side by side.")


def apply_delta():
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (20, 120), [CHECKPOINT])
    apply = g.node("ESDApplyErasure", (420, 20), ["esd/van_gogh_00001.safetensors", 1.0])
    g.link(ckpt, "MODEL", apply, "model")
    note(g, (20, 300), "Pick a delta file from models/erasures (written by Save Erasure Delta). Strength 1 applies "
         "the erasure as trained, 0 leaves the model unchanged. The delta is a patch: it composes with LoRAs and "
         "never changes the loaded checkpoint.")
    positive, negative, latent = prompt_nodes(g, ckpt, y=260)
    decode = sampler(g, apply, positive, negative, latent, ckpt, (880, 260), "erased")
    save_image = g.node("SaveImage", (1580, 260), ["esd/applied"])
    g.link(decode, "IMAGE", save_image, "images")
    g.write("apply-delta.json", "Apply a saved erasure (models/erasures) to a checkpoint at a strength, then sample.")


def load_erased_unet():
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (20, 120), [CHECKPOINT])
    load = g.node("ESDLoadErasedUNet", (420, 20), ["erasures/diffusers-VanGogh-ESDx1-UNET.pt"])
    g.link(ckpt, "MODEL", load, "model")
    report = g.node("PreviewAny", (820, 20), title="What was replaced")
    g.link(load, "report", report, "source")
    note(g, (1240, 20), "Put the published erased weights in models/erasures or models/diffusion_models: full "
         "diffusers-named .pt (e.g. diffusers-VanGogh-ESDx1-UNET.pt), CompVis .ckpt, or partial .safetensors. "
         "The base checkpoint must be the model they were erased from (SD1.4/1.5 for the original ESD files). "
         "Pickle files are read with weights_only=True only.")
    positive, negative, latent = prompt_nodes(g, ckpt, y=280)
    decode = sampler(g, load, positive, negative, latent, ckpt, (880, 280), "erased UNet")
    save_image = g.node("SaveImage", (1580, 280), ["esd/erased_unet"])
    g.link(decode, "IMAGE", save_image, "images")
    g.write("load-erased-unet.json", "Replace a checkpoint's UNet with published erased weights (ESD .pt, CompVis "
            ".ckpt or partial .safetensors), then sample.")


if __name__ == "__main__":
    erase_and_compare()
    apply_delta()
    load_erased_unet()
