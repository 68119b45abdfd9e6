"""Turning a UI-format workflow (what the template browser opens) into the API form that POST /prompt takes."""

import json
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKFLOWS = os.path.join(os.path.dirname(TESTS), "workflows")
WORKFLOWS_BEFORE = os.path.join(TESTS, "workflows_before")  # as shipped before the training node was redesigned
UI_ONLY_NODES = ("Note", "MarkdownNote")  # drawn by the frontend, never sent to the server
SEED_NAMES = ("seed", "noise_seed")  # INT inputs the frontend gives a "control after generate" widget unless told not to
TRAINING_NODES = ("ESDTrainErasure", "ESDEraseConcept")
OPTIONS_NODE = "ESDErasureOptions"


def load(name: str, folder: str = WORKFLOWS) -> dict:
    with open(os.path.join(folder, name)) as handle:
        return json.load(handle)


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _has_control(name: str, spec) -> bool:
    """Whether the frontend adds a 'control after generate' widget: as the input says, or, when it says nothing,
    for an INT input named seed or noise_seed (the frontend's legacy rule)."""
    options = spec[1] if len(spec) > 1 else {}
    control = options.get("control_after_generate")
    if control is None:
        return spec[0] == "INT" and name in SEED_NAMES
    return bool(control)


def _widget_names(info: dict) -> list[tuple[str, bool]]:
    """(input name, takes an extra 'control after generate' value) for each widget, in the UI's order."""
    names = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []) if "input_order" in info else info["input"].get(section, {}):
            spec = info["input"][section][name]
            if _is_widget(spec):
                names.append((name, _has_control(name, spec)))
    return names


def widget_defaults(info: dict) -> dict:
    """{input name: default} of a node's widgets, as a node fresh from the menu has them."""
    defaults = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            if _is_widget(spec):
                options = spec[1] if len(spec) > 1 else {}
                choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
                defaults[name] = options["default"] if "default" in options else choices[0]
    return defaults


def has_input(info: dict, name: str) -> bool:
    return any(name in info["input"].get(section, {}) for section in ("required", "optional"))


def check_graph(workflow: dict, object_info: dict, saved_before: bool = False) -> None:
    """The structural checks the UI relies on: known node types, consistent links, widget counts (``saved_before``: a
    workflow saved before widgets were added to a node may hold fewer values, and the frontend gives the new widgets
    their defaults)."""
    assert workflow.get("version") is not None and isinstance(workflow["nodes"], list) and isinstance(workflow["links"], list)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[source]["outputs"][slot]["links"], link_id
        assert nodes[target]["inputs"][target_slot]["link"] == link_id, link_id
        assert kind == nodes[source]["outputs"][slot]["type"]
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES:
            assert node["widgets_values"] and isinstance(node["widgets_values"][0], str)
            continue
        assert node["type"] in object_info, f"unknown node type {node['type']}"
        info = object_info[node["type"]]
        widgets = _widget_names(info)
        expected = len(widgets) + sum(extra for _, extra in widgets)
        saved = len(node.get("widgets_values", []))
        assert saved == expected or (saved_before and saved < expected), (node["type"], node.get("widgets_values"), widgets)
        for output, (name, kind) in zip(node["outputs"], zip(info["output_name"], info["output"])):
            assert output["type"] == kind, (node["type"], output, kind)


def to_api(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """API prompt {id: {class_type, inputs}}; ``overrides``: {node title or type: {input: value}}."""
    overrides = overrides or {}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in UI_ONLY_NODES:
            continue
        info = object_info[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values", []))
        for name, extra in _widget_names(info):
            inputs[name] = values.pop(0) if values else widget_defaults(info)[name]  # a widget added after the workflow was saved
            if extra and values:
                values.pop(0)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, _, _, _ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        for key in (node["type"], node.get("title")):
            inputs.update(overrides.get(key, {}))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def set_training(prompt: dict, object_info: dict, settings: dict) -> dict:
    """Training settings (by input name) into an API prompt, each on the node that has the input: the training node
    (new or old), or the Erasure Options node. A setting only the options node takes, in a prompt without one, goes
    into a new options node (its other inputs at their defaults) connected to each new training node. Returns the
    prompt."""
    trainers = [k for k, v in prompt.items() if v["class_type"] in TRAINING_NODES]
    assert trainers, "no training node in the prompt"
    options = [k for k, v in prompt.items() if v["class_type"] == OPTIONS_NODE]
    for name, value in settings.items():
        placed = False
        for key in trainers + options:
            if has_input(object_info[prompt[key]["class_type"]], name):
                prompt[key]["inputs"][name] = value
                placed = True
        if not placed:
            new = [k for k in trainers if prompt[k]["class_type"] == "ESDTrainErasure"]
            assert new and has_input(object_info[OPTIONS_NODE], name), f"no node of the prompt takes {name}"
            key = str(max(int(k) for k in prompt) + 1)
            prompt[key] = {"class_type": OPTIONS_NODE, "inputs": widget_defaults(object_info[OPTIONS_NODE])}
            prompt[key]["inputs"][name] = value
            for trainer in new:
                prompt[trainer]["inputs"]["options"] = [key, 0]
            options.append(key)
    return prompt
