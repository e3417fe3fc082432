"""Entanglement IoU: how much a demographic and a semantic concept overlap, as numbers and as a picture."""

from comfy_api.latest import io, ui

from ..biasmap_engine import (entanglement_picture, find_word_positions, guidance_line, measure_entanglement,
                              resize_maps, undrawn_note)
from .common import (ADVANCED, CATEGORY, Trace, check_images, mask_size, plain_errors, rgb, show_on_node, step_inputs,
                     step_window, window_text)
from .concepts import check_apart, check_single, check_stood_for, first_concept, one_concept, require

__all__ = ["BiasMapEntanglementIoU"]

_ONE_PAIR = "give one word each, or use BiasMap Audit Log, which measures every pair of two lists"


class BiasMapEntanglementIoU(io.ComfyNode):
    """IoU at the q-quantile, mBIoU and a picture of two concepts' masks, their overlap striped with both colours
    (BiasMap §3)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BiasMapEntanglementIoU",
            display_name="BiasMap Entanglement IoU",
            category=CATEGORY,
            description="Spatial entanglement of two concepts in a BiasMap trace: IoU of their top-(1 − q) masks, "
                        "30 % by default (mean over the batch), block-wise mBIoU, a per-image report with the "
                        "guidance accounting, a picture of A, B and their intersection, and the three as masks.",
            inputs=[
                Trace.Input("trace", tooltip="From a BiasMap Guided KSampler or Load Trace."),
                io.String.Input("concept_a", default="",
                                tooltip="First word (demographic); empty = the trace's first demographic concept."),
                io.String.Input("concept_b", default="",
                                tooltip="Second word (semantic); empty = the trace's first semantic concept."),
                io.Float.Input("q", default=0.70, min=0.01, max=0.99, step=0.01, extra_dict=ADVANCED,
                               tooltip="Masks keep pixels above this quantile (paper: 0.70, the top 30 %)."),
                io.Combo.Input("resolution", options=["image", "latent"], default="image", extra_dict=ADVANCED,
                               tooltip="Threshold at image size (the reference) or at latent size."),
                io.Image.Input("image", optional=True, tooltip="Decoded image to draw the masks over."),
                Trace.Input("baseline", optional=True,
                            tooltip="Another run's trace to compare with, e.g. the same seed at λ = 0: the report "
                                    "adds the change in mIoU and mBIoU from it, and what else differs."),
                *step_inputs(),
            ],
            outputs=[io.Float.Output("iou", tooltip="IoU, mean over the batch (images without finite maps left out)."),
                     io.Float.Output("mbiou", tooltip="Mean block-wise IoU, mean over the batch."),
                     io.String.Output("report",
                                      tooltip="Per image and per stage figures, token pieces, guidance counts."),
                     io.Image.Output("picture", tooltip="A only (sky blue), B only (vermillion) and A∧B (striped with "
                                                        "both), the IoU written on it."),
                     # After the first four, so that links saved in workflows keep their slots.
                     io.Mask.Output("mask_a", tooltip="Concept A's top (1 − q) mask, as the picture draws it (at the "
                                                      "image's size); empty for an image without finite maps."),
                     io.Mask.Output("mask_b", tooltip="Concept B's top (1 − q) mask, as the picture draws it."),
                     io.Mask.Output("overlap", tooltip="A∧B, the entangled region (the IoU's numerator), e.g. to "
                                                       "inpaint or inspect it.")],
            is_output_node=True,
            hidden=[io.Hidden.unique_id],  # to write the figures on the node
        )

    @classmethod
    def validate_inputs(cls, concept_a=None, concept_b=None):
        ok = check_single(_ONE_PAIR, concept_a=concept_a, concept_b=concept_b)
        return ok if ok is not True else check_apart(concept_a, concept_b)

    @classmethod
    @plain_errors
    def execute(cls, trace, concept_a, concept_b, q, resolution, first_step, last_step, image=None,
                baseline=None) -> io.NodeOutput:
        require(check_single(_ONE_PAIR, concept_a=concept_a, concept_b=concept_b))
        require(check_apart(concept_a, concept_b))
        drawn_on = check_images(image, trace, "Entanglement IoU")
        word_a = one_concept(concept_a) or first_concept(trace.demographic, "demographic", "concept_a")
        word_b = one_concept(concept_b) or first_concept(trace.semantic, "semantic", "concept_b")
        check_stood_for(trace, [(word_a, word_b)], concept_a, concept_b, every=False)
        size = mask_size(trace, resolution)
        steps = step_window(trace, first_step, last_step)
        result = measure_entanglement(trace, word_a, word_b, q, size=size, steps=steps)
        picture_note = f"picture: {drawn_on}" if drawn_on else None  # report and node: the page shows no console
        report = "\n".join(filter(None, [result.report, picture_note]))
        # On the node: the figures; the whole report is for Preview as Text.
        window = f" ({window_text(trace, steps)})" if steps else ""
        said = [f"'{word_a}' and '{word_b}'{window}: {result.headline}"]
        if baseline is not None:  # measured as this trace is, each at its own size and over its own steps
            try:
                for word in (word_a, word_b):  # this trace has them: the fix is a word of both, or another baseline
                    find_word_positions(baseline.tokens, word, "Measure a word that both traces have, or connect a "
                                                               "baseline whose attribution prompt has it")
                check_stood_for(trace, [(word_a, word_b)], concept_a, concept_b, every=False, baseline=baseline)
                before = measure_entanglement(baseline, word_a, word_b, q, size=mask_size(baseline, resolution),
                                              steps=step_window(baseline, first_step, last_step))
            except ValueError as err:  # which of the two traces it is about
                raise ValueError(f"the baseline trace: {err}") from err
            report += "\n" + result.against(before)
            said.append(f"against the baseline: {result.change_from(before)}")
            said += [f"note: {note}" for note in result.baseline_notes(before)]  # the page shows no report
        # The picture is labelled with the words: letters no font here has are boxes there (the console says once).
        said += filter(None, [guidance_line(trace), picture_note, undrawn_note(f"a={word_a} b={word_b}")])
        show_on_node(cls, "\n".join(said))
        # Drawn at the image's size (the decoded image's when none is given: masks at latent size would leave the
        # label no room), the masks thresholded where they were measured.
        shown = tuple(image.shape[1:3]) if image is not None else trace.image_size
        masks = [m if tuple(m.shape[1:]) == shown else resize_maps(m.float(), shown) > 0.5 for m in result.masks]
        # An image whose IoU is n/a (a map not finite, or flat) has no masks to draw or to hand on.
        measured = result.ious.isfinite().view(-1, 1, 1).to(masks[0].device)
        mask_a, mask_b = (m & measured for m in masks)
        picture = entanglement_picture(mask_a, mask_b, result.ious, (word_a, word_b), rgb(image))
        mask_a, mask_b = mask_a.float(), mask_b.float()
        # The picture on the node itself; the report in the run's outputs too, for API clients.
        shown_on_node = ui.PreviewImage(picture, cls=cls).as_dict() | ui.PreviewText(report).as_dict()
        return io.NodeOutput(float(result.ious.nanmean()), float(result.mbiou.nanmean()), report, picture,
                             mask_a, mask_b, mask_a * mask_b, ui=shown_on_node)
