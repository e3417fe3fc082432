"""Calling the pack's nodes as ComfyUI does, for host tests."""

import sys
import types


def defaults(node) -> dict:
    """A node's inputs at their schema's defaults (those that have one)."""
    return {i.id: i.default for i in node.define_schema().inputs if getattr(i, "default", None) is not None}


def as_comfy_runs(node, prompt=None, node_id=None):
    """The class clone ComfyUI's executor makes, with the hidden inputs an output node gets."""
    from comfy_api.latest import io

    return node.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.prompt: prompt, io.Hidden.extra_pnginfo: None,
                                                       io.Hidden.unique_id: node_id}})


def page_texts(monkeypatch) -> list[str]:
    """The texts the nodes write on themselves on ComfyUI's page (``show_on_node``), in order, from a stand-in for
    the server ComfyUI runs."""
    texts = []
    page = types.SimpleNamespace(client_id="page", send_progress_text=lambda text, node, client: texts.append(text))
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=page)))
    return texts
