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
CONCEPT = "Van Gogh"
# KSampler widgets: seed, its "control after generate", steps, cfg, sampler, scheduler, denoise. Flux.1-dev is
# guidance-distilled: cfg 1 (the negative is never evaluated) and its guidance comes from FluxGuidance instead.
SD_SAMPLING = [1234, "fixed", 20, 7.0, "euler", "normal", 1.0]
FLUX_SAMPLING = [1234, "fixed", 20, 1.0, "euler", "simple", 1.0]
FLUX_GUIDANCE = 3.5  # Flux.1-dev's usual distilled guidance, for the samplers and the training alike

# Output slots of the nodes used below: name, type.
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "UNETLoader": [("MODEL", "MODEL")],
    "DualCLIPLoader": [("CLIP", "CLIP")],
    "VAELoader": [("VAE", "VAE")],
    "ESDTrainErasure": [("MODEL", "MODEL"), ("ERASURE", "ERASURE"), ("loss_curve", "IMAGE")],
    "ESDErasureOptions": [("options", "ESD_OPTIONS")],
    "ESDSaveErasure": [("path", "STRING")],
    "ESDApplyErasure": [("MODEL", "MODEL"), ("ERASURE", "ERASURE")],
    "ESDLoadErasedUNet": [("MODEL", "MODEL"), ("report", "STRING")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "FluxGuidance": [("CONDITIONING", "CONDITIONING")],
    "ConditioningZeroOut": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "EmptySD3LatentImage": [("LATENT", "LATENT")],
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
    "UNETLoader": [],
    "DualCLIPLoader": [],
    "VAELoader": [],
    "ESDTrainErasure": [("model", "MODEL"), ("clip", "CLIP"), ("options", "ESD_OPTIONS")],
    "ESDErasureOptions": [],
    "ESDSaveErasure": [("erasure", "ERASURE")],
    "ESDApplyErasure": [("model", "MODEL"), ("erasure", "ERASURE")],
    "ESDLoadErasedUNet": [("model", "MODEL")],
    "CLIPTextEncode": [("clip", "CLIP")],
    "FluxGuidance": [("conditioning", "CONDITIONING")],
    "ConditioningZeroOut": [("conditioning", "CONDITIONING")],
    "EmptyLatentImage": [],
    "EmptySD3LatentImage": [],
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
    "CheckpointLoaderSimple": [360, 100], "UNETLoader": [360, 90], "DualCLIPLoader": [360, 130], "VAELoader": [360, 60],
    "ESDTrainErasure": [380, 350], "ESDErasureOptions": [340, 450],
    "ESDSaveErasure": [340, 160], "ESDApplyErasure": [380, 110], "ESDLoadErasedUNet": [420, 80],
    "CLIPTextEncode": [380, 160], "FluxGuidance": [380, 60], "ConditioningZeroOut": [380, 30],
    "EmptyLatentImage": [380, 110], "EmptySD3LatentImage": [380, 110], "KSampler": [320, 270], "VAEDecode": [220, 50],
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


def flux_prompt_nodes(graph, clip_source, x, y):
    """Flux.1-dev's conditioning, as ComfyUI's Flux examples make it: the prompt through FluxGuidance, a zeroed
    negative (at cfg 1 the sampler never evaluates it) and an SD3-style 16-channel latent."""
    text = graph.node("CLIPTextEncode", (x, y), [POSITIVE], title="Positive")
    graph.link(clip_source, "CLIP", text, "clip")
    positive = graph.node("FluxGuidance", (x, below(text)), [FLUX_GUIDANCE])
    graph.link(text, "CONDITIONING", positive, "conditioning")
    negative = graph.node("ConditioningZeroOut", (x, below(positive)), title="Negative (none at cfg 1)")
    graph.link(text, "CONDITIONING", negative, "conditioning")
    latent = graph.node("EmptySD3LatentImage", (x, below(negative)), [1024, 1024, 1])
    return positive, negative, latent


def sampler(graph, model_source, positive, negative, latent, vae_source, pos, title, settings=SD_SAMPLING):
    """KSampler (``settings``: its widget values) and its VAE Decode to the right of it; returns both."""
    ksampler = graph.node("KSampler", pos, settings, title=f"KSampler ({title})")
    graph.link(model_source, "MODEL", ksampler, "model")
    graph.link(positive, "CONDITIONING", ksampler, "positive")
    graph.link(negative, "CONDITIONING", ksampler, "negative")
    graph.link(latent, "LATENT", ksampler, "latent_image")
    decode = graph.node("VAEDecode", (right_of(ksampler), pos[1]), title=f"Decode ({title})")
    graph.link(ksampler, "LATENT", decode, "samples")
    graph.link(vae_source, "VAE", decode, "vae")
    return ksampler, decode


def train_erasure(graph, model_source, clip_source, pos, resolution=0, options=None):
    """Train Concept Erasure of CONCEPT with esd-x at its other defaults (``options``: an Erasure Options node)."""
    erase = graph.node("ESDTrainErasure", pos, [CONCEPT, "", "", "esd-x", 1000, 1e-5, 1.0, 0, resolution])
    graph.link(model_source, "MODEL", erase, "model")
    graph.link(clip_source, "CLIP", erase, "clip")
    if options is not None:
        graph.link(options, "options", erase, "options")
    return erase


def save_erasure(graph, erase, filename_prefix):
    """Save Erasure (a LoRA in models/erasures) right of the training node, the loss curve's preview under it;
    returns the preview."""
    save = graph.node("ESDSaveErasure", (right_of(erase), erase["pos"][1]),
                      [filename_prefix, "fp16", "lora", 64, "erasures"])
    graph.link(erase, "ERASURE", save, "erasure")
    curve = graph.node("PreviewImage", (right_of(erase), below(save)), title="Loss curve")
    graph.link(erase, "loss_curve", curve, "images")
    return curve


def compare_samples(graph, original_model, erased_model, prompts, vae_source, pos, settings, filename_prefix):
    """The original and the erased model sampled with the same seed (one KSampler above the other from ``pos``,
    each decoded to its right), stitched side by side, original left, and saved."""
    positive, negative, latent = prompts
    original, decode_original = sampler(graph, original_model, positive, negative, latent, vae_source, pos, "original",
                                        settings)
    erased, decode_erased = sampler(graph, erased_model, positive, negative, latent, vae_source,
                                    (pos[0], below(original)), "erased", settings)
    stitch_x = right_of(decode_original)
    stitch = graph.node("ImageStitch", (stitch_x, original["pos"][1]), ["right", True, 16, "white"], title="Original | Erased")
    graph.link(decode_original, "IMAGE", stitch, "image1")
    graph.link(decode_erased, "IMAGE", stitch, "image2")
    save_image = graph.node("SaveImage", (stitch_x, below(stitch)), [filename_prefix])
    graph.link(stitch, "IMAGE", save_image, "images")


def erase_and_compare():
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", (20, 60), [CHECKPOINT])
    erase = train_erasure(g, ckpt, ckpt, (right_of(ckpt), 60))
    note(g, (20, below(ckpt)), "1. Pick your SD1.x / SD2.x / SDXL checkpoint.\n2. Type the concept to erase (esd-x for "
         "styles and artists, esd-u for objects and nudity); texts in preserve are kept as they were.\n3. Run. "
         "Training shows its progress on the node and can be cancelled; the erasure is saved as a LoRA to models/erasures "
         "(load it later with Apply Erasure or LoraLoaderModelOnly; A1111, Forge and diffusers load it too).\nBoth samplers use the same seed: left "
         "the original, right the erased model.\n\nMore settings (sampling steps, rank, preservation, memory): add "
         "an 'Erasure Options (ESD)' node and connect it to the options input. Without it the defaults "
         "apply.", size=[360, 230])
    curve = save_erasure(g, erase, "esd/van_gogh")
    prompts = prompt_nodes(g, ckpt, erase["pos"][0], below(erase))
    compare_samples(g, ckpt, erase, prompts, ckpt, (right_of(erase), below(curve)), SD_SAMPLING, "esd/compare")
    g.write("erase-and-compare.json", "Erase a concept (ESD), save the erasure to models/erasures, and sample the "
            "original and the erased model with the same seed, side by side.")


def erase_flux():
    """erase_and_compare for Flux.1-dev: its stock loaders, and options sized for a 24 GB card."""
    g = Graph()
    read_me = note(g, (20, 60), "Erase a style from Flux.1-dev.\n\n1. Put the files where the loaders look: "
                   "flux1-dev.safetensors in models/diffusion_models, clip_l.safetensors and "
                   "t5xxl_fp8_e4m3fn.safetensors in models/text_encoders, ae.safetensors in models/vae.\n2. Type the "
                   "concept and run. esd-x trains the text stream's attention projections, Flux's counterpart of "
                   "cross-attention. The erasure is saved as a LoRA to models/erasures.\n\nMemory: the settings aim at "
                   "a 24 GB card: the model loaded in fp8 (the loader's weight_dtype), rank 8 and gradient "
                   "checkpointing on the options node, 512 px on the training node. On a 16 GB card it may need "
                   "ComfyUI started with --lowvram. These follow from arithmetic: nothing here has been run on a real "
                   "Flux model yet.\n\nsample_guidance 3.5 on the options node is Flux.1-dev's guidance input while "
                   "training, the value FluxGuidance gives the samplers.\n\nThe samplers draw at 1024 px, Flux.1-dev's "
                   "usual size, though the erasure trains at 512 px: the comparison shows the images you would make "
                   "with it (set 512 for quicker ones). Same seed: left the original, right the erased model. cfg 1 and "
                   "a zeroed negative, as Flux.1-dev is guidance-distilled.\n\nFlux.1-schnell: pick its file and "
                   "sample with 4 steps.", size=[360, 400])
    loaders_x = right_of(read_me)
    unet = g.node("UNETLoader", (loaders_x, 60), ["flux1-dev.safetensors", "fp8_e4m3fn"])
    clip = g.node("DualCLIPLoader", (loaders_x, below(unet)),
                  ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "flux", "default"])
    vae = g.node("VAELoader", (loaders_x, below(clip)), ["ae.safetensors"])
    # rank 8, sample_guidance at Flux.1-dev's usual 3.5 and gradient checkpointing on; the other widgets at their defaults
    options = g.node("ESDErasureOptions", (loaders_x, below(vae)), [
        8, 50, FLUX_GUIDANCE, "trained", 1, 1.0, 1.0, 0.0, True, "fast", 8, 0, False, 10, 10, "all", 0.0,
    ])
    erase = train_erasure(g, unet, clip, (right_of(unet), 60), resolution=512, options=options)
    curve = save_erasure(g, erase, "esd/flux_van_gogh")
    prompts = flux_prompt_nodes(g, clip, erase["pos"][0], below(erase))
    compare_samples(g, unet, erase, prompts, vae, (right_of(erase), below(curve)), FLUX_SAMPLING, "esd/flux_compare")
    g.write("erase-flux.json", "Erase a style from Flux.1-dev (ESD, rank-8 LoRA, fp8 weights), save the erasure to "
            "models/erasures, and sample the original and the erased model with the same seed, side by side.")


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
    erase_flux()
    apply_delta()
    load_erased_unet()
