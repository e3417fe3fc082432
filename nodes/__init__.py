"""BiasMap's ComfyUI nodes (V3 schema); thin wrappers over :mod:`biasmap_engine`."""

from .attribution_map import BiasMapAttributionMap
from .entanglement_iou import BiasMapEntanglementIoU
from .guided_ksampler import BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced

NODES = [BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced, BiasMapAttributionMap, BiasMapEntanglementIoU]

__all__ = ["NODES", "BiasMapAttributionMap", "BiasMapEntanglementIoU", "BiasMapGuidedKSampler",
           "BiasMapGuidedKSamplerAdvanced"]
