"""BiasMap for ComfyUI: discover and mitigate demographic–semantic entanglement in cross-attention.

Implements BiasMap (Chakraborty et al., arXiv 2509.13496). ComfyUI loads this folder from ``custom_nodes/`` and
calls :func:`comfy_entrypoint`.
"""

from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class BiasMapExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> BiasMapExtension:
    return BiasMapExtension()
