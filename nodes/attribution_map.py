"""Attribution Map: a word's BiasMap/OVAM map from a trace, as a heatmap or overlay IMAGE and a MASK."""

import logging

from comfy_api.latest import io, ui

from ..biasmap_engine import (COLORMAPS, NOT_FINITE_CAUSE, colorize, hard_mask, label_heatmaps, normalize_maps,
                              overlay, undrawn_note)
from .common import (ADVANCED, CATEGORY, Trace, check_images, check_stage_names, plain_errors, rgb, show_on_node,
                     stages_in, step_inputs, step_window, where_hidden, window_text)
from .concepts import check_single, first_concept, one_concept, require

__all__ = ["BiasMapAttributionMap"]

_ONE_WORD = "give one word (one Attribution Map node per word)"
_SCALES = ("each image", "whole batch")
_BLENDS = ("uniform", "by map")


class BiasMapAttributionMap(io.ComfyNode):
    """Render one word's attribution map over a chosen stage and step window."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BiasMapAttributionMap",
            display_name="BiasMap Attribution Map",
            category=CATEGORY,
            is_output_node=True,  # its picture shows on the node: it runs with nothing linked to its outputs
            description="Where the model put a word: its cross-attention attribution map from a BiasMap trace "
                        "(any word of the attribution prompt, also words absent from the generation prompt), "
                        "upsampled to the image, as a heatmap or an overlay, plus a MASK.",
            inputs=[
                Trace.Input("trace", tooltip="From a BiasMap Guided KSampler or Load Trace."),
                io.String.Input("word", default="",
                                tooltip="A word of the attribution prompt (any, also one the generation prompt lacks); "
                                        "empty = the trace's first demographic concept. One word (or phrase) per "
                                        "node, read as the sampler's concepts (case, emphasis and the punctuation "
                                        "around it aside). A word of several tokens uses the mean of their maps."),
                io.Image.Input("image", optional=True,
                               tooltip="The decoded image to draw the map over (one image or one per latent)."),
                io.String.Input("stages", default="all", extra_dict=ADVANCED,
                                tooltip="'all' or stage ids, e.g. 'down_1, up_1' (block-wise maps; SDXL's "
                                        "begin at down_2)."),
                *step_inputs(),
                io.Combo.Input("colormap", options=list(COLORMAPS), default="inferno",
                               tooltip="Heatmap colours, low to high: inferno, magma, viridis and gray run from dark "
                                       "to bright, for every viewer also with colour blindness; turbo and jet from "
                                       "dark blue to dark red, whose peaks read darker than the middle to red-green "
                                       "colour-blind viewers."),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="Heatmap opacity over the image."),
                io.Combo.Input("mask", options=["normalized", "thresholded"], default="normalized",
                               tooltip="MASK output: the map scaled to 0–1, or its top 1 − q pixels."),
                io.Float.Input("q", default=0.70, min=0.01, max=0.99, step=0.01, extra_dict=ADVANCED,
                               tooltip="Quantile for the thresholded mask (0.70 keeps the top 30 %, as the paper)."),
                # Optional and last: workflows saved before it (UI or API format) load and run as they did.
                io.Combo.Input("scale", options=list(_SCALES), default=_SCALES[0], optional=True, extra_dict=ADVANCED,
                               tooltip="Heatmap and normalised mask: each image's map stretched over the whole "
                                       "colour range (OVAM's: a map that barely varies looks as vivid as a peaked "
                                       "one), or one range for the whole batch, so that an image where the word "
                                       "weighs less reads darker."),
                io.Boolean.Input("legend", default=False, optional=True,
                                 tooltip="Write the word and a low-to-high bar of the colormap in the picture's "
                                         "top-left corner, for pictures shared away from this node (the MASK has "
                                         "none; 'low' and 'high' are as the scale input stretches them)."),
                io.Combo.Input("blend", options=list(_BLENDS), default=_BLENDS[0], optional=True, extra_dict=ADVANCED,
                               tooltip="Overlay: the heatmap at the opacity everywhere, or at the opacity times the "
                                       "map (as the scale input stretches it), so that the image shows through "
                                       "where the word weighs little and the colour marks where it weighs most."),
            ],
            outputs=[io.Image.Output("image", tooltip="Heatmap, or overlay when an image is given; one per image."),
                     io.Mask.Output("mask", tooltip="The map at image size, normalised or thresholded.")],
            hidden=[io.Hidden.unique_id],  # to write on the node what it drew, and what it could not
        )

    @classmethod
    def validate_inputs(cls, word=None, stages=None):
        # Before the graph runs: this node runs after the sampler, whose run a typo here would waste.
        ok = check_single(_ONE_WORD, word=word)
        if ok is not True:
            return ok
        ok = check_stage_names("stages", stages)
        return ok if ok is True else ok + where_hidden(cls, ok)

    @classmethod
    @plain_errors
    def execute(cls, trace, word, stages, first_step, last_step, colormap, opacity, mask, q,
                scale=_SCALES[0], legend=False, blend=_BLENDS[0], image=None) -> io.NodeOutput:
        require(check_single(_ONE_WORD, word=word))
        word = one_concept(word) or first_concept(trace.demographic, "demographic", "word")
        warnings = [check_images(image, trace, "Attribution Map")]
        size = tuple(image.shape[1:3]) if image is not None else trace.image_size
        stages, steps = stages_in("stages", stages), step_window(trace, first_step, last_step)
        maps = trace.concept_map(word, stages, steps, size)
        unmeasured = ~trace.finite(trace.positions(word), stages, steps).to(maps.device)
        if unmeasured.any():  # min-max scaling would spread one NaN over the whole heatmap and mask, unexplained
            images = ", ".join(str(i) for i in unmeasured.nonzero().flatten().tolist())
            warnings.append(f"image(s) {images} of the batch hold NaN or inf in the maps of '{word}' "
                            f"({NOT_FINITE_CAUSE}): drawn empty, with an empty mask")
            logging.warning("BiasMap Attribution Map: %s", warnings[-1])
            maps = maps.masked_fill(unmeasured.view(-1, 1, 1), 0.0)
        if legend:  # letters no font here has are boxes in the legend (the console says once)
            warnings.append(undrawn_note(word))
        said = f"the map of '{word}': {', '.join(stages) if stages else 'all stages'}, {window_text(trace, steps)}"
        show_on_node(cls, "\n".join([said, *filter(None, warnings)]))
        # Those images left out of the scale (their zeros would be the batch's minimum), then drawn as 0.
        shown = maps.masked_fill(unmeasured.view(-1, 1, 1), float("nan"))
        maps01 = normalize_maps(shown, shared=scale == _SCALES[1]).nan_to_num(0.0)
        heat = colorize(maps01, colormap)
        alpha = opacity * maps01 if blend == _BLENDS[1] else opacity
        picture = heat if image is None else overlay(rgb(image).to(heat), heat, alpha)
        if legend:
            picture = label_heatmaps(picture, word, colormap)
        out_mask = hard_mask(maps, q).float() if mask == "thresholded" else maps01
        return io.NodeOutput(picture, out_mask, ui=ui.PreviewImage(picture, cls=cls))  # shown on the node
