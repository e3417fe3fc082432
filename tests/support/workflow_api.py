"""UI-format ComfyUI workflows → API format, for tests that run the shipped workflows on a real server.

The frontend saves *UI-format* graphs (``nodes`` with positional ``widgets_values`` and a ``links`` table); the
server's ``POST /prompt`` takes the *API format* (``{"<id>": {"class_type", "inputs"}}``). The backend has no
converter (the frontend's "Export (API)" does it), so this module redoes the frontend's mapping from the live
``GET /object_info``:

* a node's widget inputs are its required, then optional, inputs whose type is a widget type (INT, FLOAT, STRING,
  BOOLEAN, COMBO or a list of options) and that are not ``forceInput``, in ``input_order``;
* ``widgets_values`` holds one value per widget input in that order, plus one UI-only value (``"fixed"``,
  ``"randomize"``, …) right after every INT input declared with ``control_after_generate``; those are skipped;
* a linked input becomes ``[str(source_node_id), source_slot]``; a widget input that was turned into a socket and
  linked to a frontend-only ``PrimitiveNode`` takes the primitive's value (the frontend copies it into the widget);
  ``Reroute`` nodes are followed.

Frontend-only nodes (notes, reroutes, primitives) are left out; muted nodes (mode 2) too. Every other node must be
known to ``object_info`` (an unknown type raises, so a pack that failed to load is noticed).
"""

from __future__ import annotations

import copy

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MODE_MUTED, MODE_BYPASSED = 2, 4


def is_widget(spec: list) -> bool:
    """Whether an ``object_info`` input spec (``[type, options?]``) is drawn as a widget."""
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_inputs(node_info: dict) -> list[tuple[str, bool]]:
    """``(name, has_control_value)`` for each widget input of a node class, in ``widgets_values`` order."""
    declared = node_info.get("input", {})
    order = node_info.get("input_order") or {section: list(declared.get(section, {})) for section in declared}
    widgets = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = declared.get(section, {}).get(name)
            if spec is None or not is_widget(spec):
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            widgets.append((name, spec[0] == "INT" and bool(options.get("control_after_generate"))))
    return widgets


def widget_values(node: dict, node_info: dict) -> dict:
    """Map a UI node's ``widgets_values`` to input names (skipping the control_after_generate values)."""
    values = node.get("widgets_values")
    widgets = widget_inputs(node_info)
    if values is None:
        values = []
    if isinstance(values, dict):  # some frontends/packs save widgets by name
        return {name: values[name] for name, _ in widgets if name in values}
    where = f"node {node.get('id')} ({node.get('type')})"
    result, index = {}, 0
    for name, has_control in widgets:
        if index >= len(values):
            raise ValueError(f"{where}: widgets_values {values!r} has no value for widget {name!r}; widget order "
                             f"is {[n for n, _ in widgets]}")
        result[name] = values[index]
        index += 1
        if has_control:
            if index >= len(values) or values[index] not in CONTROL_VALUES:
                got = values[index] if index < len(values) else "nothing"
                raise ValueError(f"{where}: expected a control_after_generate value "
                                 f"({', '.join(sorted(CONTROL_VALUES))}) after {name!r}, got {got!r}")
            index += 1
    if index != len(values):
        raise ValueError(f"{where}: {len(values) - index} widgets_values left over after the widgets "
                         f"{[n for n, _ in widgets]}: {values[index:]!r}")
    return result


def _links_by_id(ui_workflow: dict) -> dict:
    links = {}
    for link in ui_workflow.get("links", []):
        if isinstance(link, dict):  # workflow schema 1.0
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:  # [id, from_node, from_slot, to_node, to_slot, type]
            links[link[0]] = (link[1], link[2])
    return links


def ui_to_api(ui_workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow into the API format ``POST /prompt`` takes.

    ``object_info`` is the server's ``GET /object_info`` answer (it fixes each class's widget order).
    Returns ``{"<id>": {"class_type": ..., "inputs": {...}, "_meta": {"title": ...}}}``.
    """
    nodes = {node["id"]: node for node in ui_workflow["nodes"]}
    links = _links_by_id(ui_workflow)

    def source(link_id, seen=()):
        """The (node, slot) a link comes from, following reroutes; None for a frontend-only source."""
        node_id, slot = links[link_id]
        node = nodes[node_id]
        if node["type"] == "Reroute":
            if node_id in seen:
                raise ValueError(f"reroute loop through node {node_id}")
            upstream = next((i.get("link") for i in node.get("inputs", []) if i.get("link") is not None), None)
            return None if upstream is None else source(upstream, seen + (node_id,))
        if node["type"] in FRONTEND_ONLY or node.get("mode") == MODE_MUTED:
            return None
        if node.get("mode") == MODE_BYPASSED:
            raise NotImplementedError(f"node {node_id} ({node['type']}) is bypassed; un-bypass or remove it")
        return [str(node_id), slot]

    api = {}
    for node_id, node in sorted(nodes.items(), key=lambda item: item[0]):
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") == MODE_MUTED:
            continue
        if node.get("mode") == MODE_BYPASSED:
            raise NotImplementedError(f"node {node_id} ({kind}) is bypassed; un-bypass or remove it")
        if kind not in object_info:
            raise KeyError(f"node {node_id}: class {kind!r} is not in /object_info (did its pack fail to load?)")
        inputs = widget_values(node, object_info[kind])
        for socket in node.get("inputs", []):
            if socket.get("link") is None:
                continue
            origin = source(socket["link"])
            primitive = nodes[links[socket["link"]][0]]
            if origin is not None:
                inputs[socket["name"]] = origin
            elif primitive["type"] == "PrimitiveNode" and primitive.get("widgets_values"):
                inputs[socket["name"]] = primitive["widgets_values"][0]
            elif socket["name"] not in inputs:
                raise ValueError(f"node {node_id} ({kind}): input {socket['name']!r} is linked to a frontend-only "
                                 "node and has no widget value")
        api[str(node_id)] = {"class_type": kind, "inputs": inputs,
                             "_meta": {"title": node.get("title") or object_info[kind].get("display_name") or kind}}
    return api


def override(api: dict, class_type: str, **inputs) -> dict:
    """Set widget ``inputs`` on every node of ``class_type`` in an API-format graph, in place; return ``api``.

    A class absent from the graph is a no-op; an input name the node does not have raises KeyError (typos and
    renamed inputs show up instead of being silently added).
    """
    for node_id, node in api.items():
        if node["class_type"] != class_type:
            continue
        for name, value in inputs.items():
            if name not in node["inputs"]:
                raise KeyError(f"node {node_id} ({class_type}) has no input {name!r}; it has "
                               f"{sorted(node['inputs'])}")
            if isinstance(node["inputs"][name], list) and not isinstance(value, list):
                raise KeyError(f"node {node_id} ({class_type}): input {name!r} is linked, not a widget")
            node["inputs"][name] = copy.deepcopy(value)
    return api
