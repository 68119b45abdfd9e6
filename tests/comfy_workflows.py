"""Turning a UI-format workflow (what the template browser opens) into the API form that POST /prompt takes."""

import json
import os

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
UI_ONLY_NODES = ("Note", "MarkdownNote")  # drawn by the frontend, never sent to the server


def load(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name)) as handle:
        return json.load(handle)


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _widget_names(info: dict) -> list[tuple[str, bool]]:
    """(input name, takes an extra 'control after generate' value) for each widget, in the UI's order."""
    names = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []) if "input_order" in info else info["input"].get(section, {}):
            spec = info["input"][section][name]
            if _is_widget(spec):
                options = spec[1] if len(spec) > 1 else {}
                names.append((name, bool(options.get("control_after_generate"))))
    return names


def check_graph(workflow: dict, object_info: dict) -> None:
    """The structural checks the UI relies on: known node types, consistent links, widget counts."""
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
        assert len(node.get("widgets_values", [])) == expected, (node["type"], node.get("widgets_values"), widgets)
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
            inputs[name] = values.pop(0)
            if extra:
                values.pop(0)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, _, _, _ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        for key in (node["type"], node.get("title")):
            inputs.update(overrides.get(key, {}))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
