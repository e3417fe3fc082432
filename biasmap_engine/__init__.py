"""BiasMap engine: the method of arXiv 2509.13496 as plain, device-agnostic torch.

Everything here imports nothing from ComfyUI except :mod:`biasmap_engine.host`, the one adapter layer that
hooks ComfyUI's U-Net cross-attention and sampling loop.

Docstrings cite the method by the sections of the project's method notes: BiasMap §1 the paper's results and audit
protocol, §2 attribution maps (OVAM), §3 measuring entanglement (hard masks, IoU), §4 soft top-k and SoftIoU, §5
energy-guided sampling.
"""

from .audit import (OlderFileError, append_csv, audit_rows, check_appendable, csv_text, file_on_the_way,
                    is_reductions_table, logged_before, read_csv, write_csv)
from .audit_plan import AUDIT_ORDERS, PAPER_PROFESSIONS, AuditRun, audit_run, check_plan
from .guidance import GATES, STATUS, entanglement_energy, guidance_step, z_grad_norm
from .labels import undrawn_note
from .masks import hard_mask, iou
from .ovam import (concept_map, prepare_keys, prepared_token_softmax_maps, sum_upsampled, summed_token_softmax_maps,
                   token_softmax_maps)
from .recorder import TraceRecorder
from .audit_summary import reductions, reductions_report, reductions_table, reductions_text
from .render import (COLORMAPS, colorize, entanglement_picture, label_heatmaps, normalize_maps, overlay, resize_maps,
                     to_pil)
from .report import EntanglementResult, guidance_line, measure_entanglement
from .settings import BRANCHES, BiasMapSettings
from .soft_masks import MODES, soft_iou, soft_topk
from .stages import STAGE_ORDER, parse_stages, stage_label, stage_of
from .tokens import (ConceptNotFoundError, clip_words, covered_words, find_word_positions, is_ideographic, listed_twice,
                     listed_words, prompt_words, quote_forms, readable, require_distinct_concepts, split_concepts,
                     typed_concepts, typed_form)
from .trace import NOT_FINITE_CAUSE, BiasMapTrace, TraceFormatError, TraceHeader

__all__ = [
    "AUDIT_ORDERS", "AuditRun", "BRANCHES", "BiasMapSettings", "BiasMapTrace", "COLORMAPS", "ConceptNotFoundError",
    "EntanglementResult", "GATES", "MODES", "NOT_FINITE_CAUSE", "OlderFileError", "PAPER_PROFESSIONS", "STAGE_ORDER",
    "STATUS", "TraceFormatError", "TraceHeader", "TraceRecorder", "append_csv", "audit_rows", "audit_run",
    "check_appendable", "check_plan", "clip_words", "colorize", "concept_map", "covered_words", "csv_text",
    "entanglement_energy", "entanglement_picture", "file_on_the_way", "find_word_positions", "guidance_line",
    "guidance_step", "hard_mask", "iou", "is_ideographic", "is_reductions_table", "label_heatmaps", "listed_twice",
    "listed_words", "logged_before", "measure_entanglement", "normalize_maps", "overlay", "parse_stages",
    "prepare_keys", "prepared_token_softmax_maps", "prompt_words", "quote_forms", "read_csv", "readable", "reductions",
    "reductions_report", "reductions_table", "reductions_text", "require_distinct_concepts", "resize_maps", "soft_iou",
    "soft_topk", "split_concepts", "stage_label", "stage_of", "sum_upsampled", "summed_token_softmax_maps", "to_pil",
    "token_softmax_maps", "typed_concepts", "typed_form", "undrawn_note", "write_csv", "z_grad_norm",
]
