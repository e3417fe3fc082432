"""Calling the pack's nodes as ComfyUI does, for host tests."""


def defaults(node) -> dict:
    """A node's inputs at their schema's defaults (those that have one)."""
    return {i.id: i.default for i in node.define_schema().inputs if getattr(i, "default", None) is not None}
