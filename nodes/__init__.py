"""BiasMap's ComfyUI nodes (V3 schema); thin wrappers over :mod:`biasmap_engine`."""

from .attribution_map import BiasMapAttributionMap
from .audit_log import BiasMapAuditLog
from .audit_prompts import BiasMapAuditPrompts
from .entanglement_iou import BiasMapEntanglementIoU
from .guided_ksampler import BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced
from .trace_files import BiasMapLoadTrace, BiasMapSaveTrace

NODES = [BiasMapGuidedKSampler, BiasMapGuidedKSamplerAdvanced, BiasMapAttributionMap, BiasMapEntanglementIoU,
         BiasMapSaveTrace, BiasMapLoadTrace, BiasMapAuditPrompts, BiasMapAuditLog]

__all__ = ["NODES", "BiasMapAttributionMap", "BiasMapAuditLog", "BiasMapAuditPrompts", "BiasMapEntanglementIoU",
           "BiasMapGuidedKSampler", "BiasMapGuidedKSamplerAdvanced", "BiasMapLoadTrace", "BiasMapSaveTrace"]
