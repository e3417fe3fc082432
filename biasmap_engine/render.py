"""Turn attribution maps into pictures: colour maps, heat overlays and the entanglement picture.

Images follow ComfyUI: float tensors [B, H, W, 3] in 0..1, channels last; maps and masks are
[B, H, W]. Everything stays on the input's device; only the small text label goes through Pillow.
"""

import ctypes
import math

import torch
from PIL import Image
from torch import Tensor

from .labels import LABEL_BOX, LABEL_TEXT, fits, label_font_px, label_patch
from .ovam import resampled, varies

__all__ = ["A_COLOR", "B_COLOR", "COLORMAPS", "colorize", "entanglement_picture", "label_heatmaps", "normalize_maps",
           "overlay", "resize_maps", "to_pil"]

# 17 evenly spaced samples (index round(k * 255 / 16)) of the published 256-colour tables,
# as shipped in bokeh.palettes (matplotlib's maps at 8 bits). Linear interpolation between
# them stays within ~7/255 of the full tables, invisible in a heat map, and keeps this file
# free of four 256-row literals. jet is MATLAB's piecewise-linear definition, exact at 9 knots.
_ANCHORS: dict[str, tuple[str, ...]] = {
    "inferno": (
        "#000003", "#0a0723", "#200c4a", "#3c0965", "#570f6d", "#70196e", "#892269", "#a32b61", "#bb3754",
        "#d04544", "#e35832", "#f0701e", "#f98c09", "#fbaa0e", "#f8c931", "#f1e864", "#fcfea4",
    ),
    "viridis": (
        "#440154", "#47186a", "#472c7b", "#424085", "#3a528b", "#32628d", "#2c728e", "#26818e", "#20908c",
        "#1e9e88", "#27ad80", "#3dbb74", "#5bc862", "#81d34c", "#aadb32", "#d4e11a", "#fde724",
    ),
    "magma": (
        "#000003", "#0a0722", "#1c1046", "#350f6a", "#50127b", "#691c80", "#822581", "#9c2e7f", "#b63679",
        "#ce4070", "#e55063", "#f4685b", "#fb8660", "#fda470", "#fec286", "#fddfa1", "#fbfcbf",
    ),
    "turbo": (
        "#30123b", "#4040a1", "#466be3", "#4193fe", "#28bbeb", "#17dcc2", "#32f197", "#6dfd62", "#a4fc3b",
        "#caed33", "#ecd139", "#fcae34", "#fb8022", "#ec520e", "#d23005", "#ac1601", "#7a0402",
    ),
    "jet": ("#000080", "#0000ff", "#0080ff", "#00ffff", "#80ff80", "#ffff00", "#ff8000", "#ff0000", "#800000"),
    "gray": ("#000000", "#ffffff"),
}

COLORMAPS: tuple[str, ...] = tuple(_ANCHORS)

# Region colours of the entanglement picture: Okabe and Ito's sky blue and vermillion. Under simulated protanopia,
# deuteranopia and tritanopia (Machado 2009) the two and what lies under them (black; skin, grey, white or a dark
# picture at the default opacity) stay ≥ 20 CIELAB units apart. The overlap the IoU measures is striped with both:
# no third colour keeps that distance from the two and from every picture (white vanished over white coats).
A_COLOR: tuple[float, float, float] = (86 / 255, 180 / 255, 233 / 255)
B_COLOR: tuple[float, float, float] = (213 / 255, 94 / 255, 0.0)
_OUTLINE = tuple(c / 255 for c in LABEL_BOX)  # the masks' outline: the label's dark, which every colour reads on


def _hex_rgb(code: str) -> tuple[float, float, float]:
    """Parse '#rrggbb' into an RGB triple in 0..1."""
    return tuple(int(code[i : i + 2], 16) / 255 for i in (1, 3, 5))


def _lut_from_anchors(anchors: tuple[str, ...], size: int = 256) -> Tensor:
    """Linearly interpolate evenly spaced anchor colours into a [size, 3] float32 lookup table."""
    knots = torch.tensor([_hex_rgb(code) for code in anchors], dtype=torch.float64)
    pos = torch.linspace(0, len(anchors) - 1, size, dtype=torch.float64)
    left = pos.floor().long().clamp(max=len(anchors) - 2)
    return torch.lerp(knots[left], knots[left + 1], (pos - left).unsqueeze(-1)).float()


_LUTS: dict[str, Tensor] = {name: _lut_from_anchors(anchors) for name, anchors in _ANCHORS.items()}


def normalize_maps(maps: Tensor, shared: bool = False) -> Tensor:
    """Min-max scale each [H, W] map of [..., H, W] to 0..1 on its own (a constant map becomes 0, also one constant
    but for resampling's rounding); ``shared``: all the maps on one scale, so that a batch's images compare (a weaker
    map reads darker)."""
    maps = maps.float()
    dims = tuple(range(maps.dim())) if shared else (-2, -1)
    # Over the finite values: a NaN or inf pixel stays one and scales nothing else, in its map or, shared, in the
    # batch's other maps.
    finite = maps.isfinite()
    low = torch.where(finite, maps, math.inf).amin(dim=dims, keepdim=True)
    high = torch.where(finite, maps, -math.inf).amax(dim=dims, keepdim=True)
    # A constant map has nothing to show: it becomes 0 (dividing by 1 keeps its zeros instead of NaN).
    flat = ~varies(low, high)
    return torch.where(flat & finite, 0.0, maps - low) / torch.where(flat, 1.0, high - low)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize [..., H, W] maps to [..., h, w], keeping the leading dims and float dtype."""
    # Interpolate in at least float32 so float16/bfloat16 maps keep their small differences, then
    # hand back the caller's dtype (non-float input, e.g. bool masks, comes back float32).
    out = resampled(maps.to(torch.promote_types(maps.dtype, torch.float32)), size)
    out = out.to(maps.dtype if maps.is_floating_point() else out.dtype)
    return out.clone() if out is maps else out  # a new tensor always, which callers may write into


def colorize(maps01: Tensor, colormap: str = "inferno") -> Tensor:
    """Map [B, H, W] values in 0..1 to [B, H, W, 3] float32 RGB through a 256-entry colour table."""
    if colormap not in _LUTS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of: {', '.join(COLORMAPS)}")
    lut = _LUTS[colormap].to(maps01.device)
    # NaN would turn into a garbage table index (a device-side assert on CUDA), so it reads as 0.
    pos = torch.nan_to_num(maps01.float(), nan=0.0).clamp(0, 1) * (len(lut) - 1)
    left = pos.floor().long().clamp(max=len(lut) - 2)
    return torch.lerp(lut[left], lut[left + 1], (pos - left).unsqueeze(-1))


def overlay(image: Tensor, heat_rgb: Tensor, opacity: float | Tensor = 0.5) -> Tensor:
    """Alpha-blend [B, H, W, 3] heat colours over [B, H, W, 3] images with scalar or per-pixel opacity."""
    for name, t in (("image", image), ("heat_rgb", heat_rgb)):
        if t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"overlay: {name} must be [B, H, W, 3], got {tuple(t.shape)}")
    if image.shape[1:3] != heat_rgb.shape[1:3]:
        raise ValueError(
            f"overlay: image is {tuple(image.shape[1:3])} (H, W) but heat_rgb is {tuple(heat_rgb.shape[1:3])}; "
            "resize the maps to the image size (resize_maps) before colorize"
        )
    # One image against a batch of maps (one map per word) is the usual ComfyUI wiring, so a
    # batch of 1 on either side broadcasts.
    if image.shape[0] != heat_rgb.shape[0] and 1 not in (image.shape[0], heat_rgb.shape[0]):
        raise ValueError(f"overlay: batch sizes differ ({image.shape[0]} images, {heat_rgb.shape[0]} heat maps)")
    alpha = torch.as_tensor(opacity, dtype=torch.float32, device=heat_rgb.device).clamp(0, 1)
    if alpha.ndim:
        if alpha.shape[-2:] != image.shape[1:3]:
            raise ValueError(
                f"overlay: opacity must be a scalar or [B, H, W] matching the image, got {tuple(alpha.shape)}"
            )
        alpha = alpha.unsqueeze(-1)  # a channel axis so one opacity covers R, G and B
    return torch.lerp(_unit_floats(image).to(heat_rgb.device), heat_rgb.float(), alpha)


def _unit_floats(image: Tensor) -> Tensor:
    """An image as float32 in 0..1, as ComfyUI's IMAGE is (clamped): integer pixels (8-bit as PIL and numpy load
    them, 16-bit PNGs) divided by their type's largest value, where taken as they are they would all read as white."""
    if image.is_floating_point() or image.dtype == torch.bool:
        return image.float().clamp(0, 1)  # an upscaler's overshoot, say: the nodes after expect 0..1
    return image.float() / torch.iinfo(image.dtype).max


def entanglement_picture(
    mask_a: Tensor,
    mask_b: Tensor,
    ious: Tensor,
    labels: tuple[str, str],
    image: Tensor | None = None,
    opacity: float = 0.6,
) -> Tensor:
    """Paint A-only, B-only and overlap (striped with both colours) pixels of [B, H, W] masks and label each picture
    with its IoU."""
    if mask_a.ndim != 3 or mask_a.shape != mask_b.shape:
        raise ValueError(f"masks must both be [B, H, W], got {tuple(mask_a.shape)} and {tuple(mask_b.shape)}")
    batch, height, width = mask_a.shape
    ious = torch.as_tensor(ious).reshape(-1)
    if ious.numel() != batch:
        raise ValueError(f"need one IoU per mask pair: {batch} pairs, {ious.numel()} IoUs")
    label_a, label_b = labels
    device = mask_a.device
    # 0 = neither, 1 = A only, 2 = B only, 3 = both: one index into a 3-colour table, both taking A's or B's colour
    # in diagonal stripes about 1/64 of the short side wide.
    region = mask_a.to(device, torch.bool).long() + 2 * mask_b.to(device, torch.bool).long()
    stripe = max(2, min(height, width) // 64)
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    b_stripe = ((rows.view(-1, 1) + cols.view(1, -1)) // stripe) % 2 == 1
    region = torch.where((region == 3) & b_stripe, 2, torch.where(region == 3, 1, region))
    palette = torch.tensor([(0.0, 0.0, 0.0), A_COLOR, B_COLOR], device=device)
    paint = palette[region]
    if image is None:
        picture = paint  # nothing to blend under: full-strength colours on black
    else:
        if image.ndim != 4 or image.shape[0] not in (1, batch) or image.shape[1:] != (height, width, 3):
            raise ValueError(f"image must be [1 or {batch}, {height}, {width}, 3] like the masks, got "
                             f"{tuple(image.shape)}: make the masks at the image's size (measure_entanglement's size=)")
        base = _unit_floats(image).to(device).expand(batch, -1, -1, -1)
        painted = region > 0
        picture = torch.where(painted.unsqueeze(-1), torch.lerp(base, paint, opacity), base)
        # Blended, a colour fades into a picture of its own hue (sky blue over a sky or blue scrubs): a dark outline
        # about 1/256 of the short side wide keeps the masks' shape in view on any light picture. Drawn around them,
        # on the picture: inside, it would paint over a thin mask or a sliver of overlap that the IoU counts.
        rim = _outside(painted, max(1, min(height, width) // 256))
        picture = torch.where(rim.unsqueeze(-1), torch.tensor(_OUTLINE, device=device), picture)
    font_px = label_font_px(height, width)
    for index, iou in enumerate(ious.tolist()):
        segments = [(f"a&b IoU {_iou_text(iou)}", LABEL_TEXT), (f"a={label_a}", A_COLOR),
                    (f"b={label_b}", B_COLOR)]
        patch = label_patch(segments, font_px, width)
        if patch.shape[0] > height // 4 or not all(fits(text, font_px, width) for text, _ in segments):
            # Wrapped over a small picture, or a part shortened (the figure cut to 'a&…'): the IoU alone (the report
            # names the words), narrower still the bare figure, and none where even that would not fit whole.
            shorter = (label_patch([(text, LABEL_TEXT)], font_px, width) for text in (segments[0][0], _iou_text(iou))
                       if fits(text, font_px, width))
            patch = next((label for label in shorter if _small_enough(label, height, width)), None)
        if patch is not None:  # a whole label is at most a quarter of the picture's height
            _paste(picture[index], patch)
    return picture


def _small_enough(patch: Tensor, height: int, width: int) -> bool:
    """Whether a label covers at most a third of a picture (a 16×16 one would be all label, hiding what it names)."""
    return patch.shape[0] * patch.shape[1] <= height * width / 3


def label_heatmaps(pictures: Tensor, word: str, colormap: str) -> Tensor:
    """[B, H, W, 3] heatmaps (or overlays) with ``word`` and a low-to-high bar of ``colormap`` written in their top-left
    corner: what the colours mean once a picture is shared away from its node. The bar is left out where the picture
    is too small for both lines, the legend where it would cover more than a third of the picture."""
    height, width = pictures.shape[1:3]
    font_px = label_font_px(height, width)
    legend = label_patch([(word, LABEL_TEXT)], font_px, width)
    low, high = (label_patch([(end, LABEL_TEXT)], font_px, width) for end in ("low", "high"))
    bar_width = min(4 * font_px, width - low.shape[1] - high.shape[1])
    if bar_width >= font_px and legend.shape[0] + low.shape[0] <= height // 4:
        # The bar as tall as the words beside it, within the box's margin, its colours the heatmap's own, outlined in
        # grey: the dark end of inferno or magma would otherwise run into the box unseen.
        margin = low.shape[0] // 4
        bar = colorize(torch.linspace(0, 1, bar_width - 2).expand(1, low.shape[0] - 2 * margin - 2, -1), colormap)[0]
        bar = torch.nn.functional.pad(bar.permute(2, 0, 1), (1, 1, 1, 1), value=0.5).permute(1, 2, 0)
        bar = torch.cat([_box(margin, bar_width), bar, _box(margin, bar_width)])
        scale = torch.cat([low, bar, high], dim=1)
        wide = max(legend.shape[1], scale.shape[1])
        legend = torch.cat([_widened(legend, wide), _widened(scale, wide)])
    labelled = pictures.clone()
    if _small_enough(legend, height, width):
        for picture in labelled:
            _paste(picture, legend)
    return labelled


def _widened(patch: Tensor, width: int) -> Tensor:
    """A label patch filled out to ``width`` with its box's colour."""
    return torch.cat([patch, _box(patch.shape[0], width - patch.shape[1])], dim=1)


def _box(rows: int, cols: int) -> Tensor:
    """[rows, cols, 3] of the label box's colour."""
    return torch.tensor(_OUTLINE).expand(rows, cols, 3)


def _paste(picture: Tensor, patch: Tensor) -> None:
    """``patch`` into the top-left corner of a [H, W, 3] picture, as much of it as the picture holds."""
    rows, cols = min(patch.shape[0], picture.shape[0]), min(patch.shape[1], picture.shape[1])
    picture[:rows, :cols] = patch[:rows, :cols].to(picture.device)


def _iou_text(iou: float) -> str:
    """An IoU for the label: "n/a" for NaN (nothing to measure), and never 0.00 or 1.00 unless it is, so that a
    sliver of overlap drawn is not labelled none."""
    if iou != iou:
        return "n/a"
    if 0 < iou < 0.005:
        return "<0.01"
    return ">0.99" if 0.995 <= iou < 1 else f"{iou:.2f}"


def _outside(masks: Tensor, width: int) -> Tensor:
    """Pixels outside [B, H, W] boolean masks within ``width`` pixels of them (a square's reach, as two 1-D max
    pools: a 2-D one costs a kernel's area per pixel)."""
    near = masks.float().unsqueeze(1)
    near = torch.nn.functional.max_pool2d(near, (2 * width + 1, 1), stride=1, padding=(width, 0))
    near = torch.nn.functional.max_pool2d(near, (1, 2 * width + 1), stride=1, padding=(0, width))
    return (near.squeeze(1) > 0) & ~masks


def to_pil(images: Tensor) -> list[Image.Image]:
    """Convert [B, H, W, 3] images in 0..1 to 8-bit RGB PIL images."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"to_pil: expected [B, H, W, 3], got {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    height, width = pixels.shape[1:3]
    # Copy each image's bytes straight out of the tensor: no numpy round trip, and far faster than
    # iterating a storage.
    return [
        Image.frombytes("RGB", (width, height), ctypes.string_at(img.data_ptr(), img.numel())) for img in pixels
    ]
