"""Behaviour of biasmap_engine.render: map scaling, colour maps, overlays and the entanglement picture."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from biasmap_engine import labels, render
from biasmap_engine.render import (
    A_COLOR,
    B_COLOR,
    COLORMAPS,
    colorize,
    entanglement_picture,
    normalize_maps,
    overlay,
    resize_maps,
    to_pil,
)

# First and last colours of the published tables (8-bit, as in bokeh.palettes / MATLAB jet).
COLORMAP_ENDS = {
    "inferno": ("#000003", "#fcfea4"),
    "viridis": ("#440154", "#fde724"),
    "magma": ("#000003", "#fbfcbf"),
    "turbo": ("#30123b", "#7a0402"),
    "jet": ("#000080", "#800000"),
    "gray": ("#000000", "#ffffff"),
}


def rgb(code):
    return torch.tensor([int(code[i : i + 2], 16) / 255 for i in (1, 3, 5)])


def luminance(colours):
    return colours @ torch.tensor([0.2126, 0.7152, 0.0722])


def label_box(picture):
    """Height and width of the non-black area of a picture that is black apart from its label."""
    lit = picture.amax(dim=-1) > 0
    rows = lit.any(dim=1).nonzero()
    cols = lit.any(dim=0).nonzero()
    return int(rows.max()) + 1, int(cols.max()) + 1


def quadrant_masks(size=128):
    """Masks over [1, size, size]: A only, B only and both in the bottom half, far from the label."""
    a = torch.zeros(1, size, size, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[:, 80:100, 10:50] = True  # cols 10..29 A only, 30..49 both
    b[:, 80:100, 30:70] = True  # cols 50..69 B only
    return a, b


# ---------------------------------------------------------------- normalize_maps


def test_normalize_maps_scales_each_map_to_zero_one_independently():
    maps = torch.rand(2, 3, 6, 5) * torch.tensor([1.0, 50.0, 1e-3]).view(1, 3, 1, 1) - 7.0
    out = normalize_maps(maps)
    assert out.shape == maps.shape and out.dtype == torch.float32
    assert torch.allclose(out.amin(dim=(-2, -1)), torch.zeros(2, 3))
    assert torch.allclose(out.amax(dim=(-2, -1)), torch.ones(2, 3))
    low = maps.amin(dim=(-2, -1), keepdim=True)
    expected = (maps - low) / (maps.amax(dim=(-2, -1), keepdim=True) - low)
    assert torch.allclose(out, expected, atol=1e-5)


def test_normalize_maps_turns_a_constant_map_into_zeros_without_touching_its_neighbours():
    maps = torch.stack([torch.full((4, 4), 3.5), torch.arange(16.0).view(4, 4)])
    out = normalize_maps(maps)
    assert torch.equal(out[0], torch.zeros(4, 4))
    assert out[1].min() == 0 and out[1].max() == 1


def test_normalize_maps_turns_a_map_constant_but_for_resamplings_rounding_into_zeros():
    # A 1×1 stage brought to 512² comes back with a few units in the last place of spread, which min-max scaling had
    # stretched into a full-range pattern of noise.
    one_pixel = resize_maps(torch.full((1, 1, 1), 0.3137), (8, 8))
    rounded = resize_maps(one_pixel, (512, 512))
    assert rounded.amax() > rounded.amin()  # the rounding this is about
    assert torch.equal(normalize_maps(rounded), torch.zeros(1, 512, 512))
    varied = torch.tensor([[[0.3137, 0.3138]]])  # a real difference of 3e-4 is still drawn
    assert torch.equal(normalize_maps(varied), torch.tensor([[[0.0, 1.0]]]))


def test_normalize_maps_shared_puts_a_batch_on_one_scale_so_a_weaker_map_reads_darker():
    strong = torch.arange(16.0).view(4, 4)
    maps = torch.stack([strong, strong / 4])
    out = normalize_maps(maps, shared=True)
    assert out.min() == 0 and out.max() == 1
    assert torch.allclose(out[1], out[0] / 4)  # on its own each would span 0..1
    assert torch.equal(normalize_maps(torch.full((2, 3, 3), 2.0), shared=True), torch.zeros(2, 3, 3))


# ---------------------------------------------------------------- resize_maps


def test_resize_maps_keeps_leading_dims_and_dtype():
    maps = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = resize_maps(maps, (16, 12))
    assert out.shape == (2, 3, 16, 12) and out.dtype == torch.float64
    assert resize_maps(torch.rand(8, 8), (4, 4)).shape == (4, 4)


def test_resize_maps_is_plain_bilinear_without_antialiasing():
    maps = torch.rand(3, 16, 16)
    expected = F.interpolate(maps[:, None], size=(5, 7), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(resize_maps(maps, (5, 7)), expected, atol=1e-6)


def test_resize_maps_keeps_a_constant_map_constant():
    maps = torch.full((2, 7, 9), 0.7)
    out = resize_maps(maps, (64, 48))
    assert torch.allclose(out, torch.full((2, 64, 48), 0.7), atol=1e-6)


# ---------------------------------------------------------------- colorize


@pytest.mark.parametrize("name", COLORMAPS)
def test_colorize_maps_zero_and_one_to_the_colormap_ends(name):
    out = colorize(torch.tensor([[[0.0, 1.0]]]), name)
    low, high = COLORMAP_ENDS[name]
    assert torch.allclose(out[0, 0, 0], rgb(low), atol=1e-6)
    assert torch.allclose(out[0, 0, 1], rgb(high), atol=1e-6)


@pytest.mark.parametrize("name", ["inferno", "viridis", "magma", "gray"])
def test_colorize_luminance_rises_monotonically_for_sequential_maps(name):
    ramp = luminance(colorize(torch.linspace(0, 1, 2001).view(1, 1, -1), name)[0, 0])
    assert (ramp.diff() >= -1e-6).all()
    assert ramp[-1] - ramp[0] > 0.5


def test_colorize_returns_float32_rgb_channels_last_in_unit_range():
    out = colorize(torch.rand(2, 5, 7, dtype=torch.float64), "turbo")
    assert out.shape == (2, 5, 7, 3) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_colorize_interpolates_between_table_entries():
    # Gray is linear end to end, so interpolating between LUT entries gives back the input exactly;
    # picking the nearest of 256 entries would be off by up to 1/510.
    values = torch.rand(1, 50, 50)
    assert torch.allclose(colorize(values, "gray"), values.unsqueeze(-1).expand(-1, -1, -1, 3), atol=1e-6)


def test_colorize_clamps_out_of_range_and_nan_values():
    out = colorize(torch.tensor([[[-3.0, 7.0, float("nan")]]]), "viridis")[0, 0]
    low, high = (rgb(code) for code in COLORMAP_ENDS["viridis"])
    assert torch.allclose(out[0], low, atol=1e-6)
    assert torch.allclose(out[1], high, atol=1e-6)
    assert torch.allclose(out[2], low, atol=1e-6)


def test_colorize_rejects_an_unknown_colormap_listing_the_choices():
    with pytest.raises(ValueError) as error:
        colorize(torch.rand(1, 2, 2), "rainbow-unicorn")
    assert "rainbow-unicorn" in str(error.value)
    assert all(name in str(error.value) for name in COLORMAPS)


# ---------------------------------------------------------------- overlay


def test_overlay_with_opacity_zero_returns_the_image_and_one_returns_the_heat():
    image, heat = torch.rand(2, 8, 8, 3), torch.rand(2, 8, 8, 3)
    assert torch.equal(overlay(image, heat, 0.0), image)
    assert torch.equal(overlay(image, heat, 1.0), heat)
    assert torch.allclose(overlay(image, heat, 0.5), (image + heat) / 2, atol=1e-6)


def test_eight_bit_pixels_as_pil_and_numpy_load_them_are_drawn_as_the_same_picture_in_0_to_1():
    pixels = torch.randint(0, 256, (1, 128, 128, 3), dtype=torch.uint8)
    heat = torch.rand(1, 128, 128, 3)
    assert torch.equal(overlay(pixels, heat, 0.25), overlay(pixels.float() / 255, heat, 0.25))
    deep = torch.randint(0, 65536, (1, 128, 128, 3), dtype=torch.int32).to(torch.uint16)  # a 16-bit PNG's
    assert torch.equal(overlay(deep, heat, 0.25), overlay(deep.float() / 65535, heat, 0.25))
    a, b = quadrant_masks()
    labels = ("woman", "doctor")
    assert torch.equal(entanglement_picture(a, b, torch.tensor([0.33]), labels, image=pixels),
                       entanglement_picture(a, b, torch.tensor([0.33]), labels, image=pixels.float() / 255))


def test_overlay_takes_a_per_pixel_opacity_mask():
    image, heat = torch.zeros(2, 4, 4, 3), torch.ones(2, 4, 4, 3)
    opacity = torch.rand(2, 4, 4)
    out = overlay(image, heat, opacity)
    assert torch.allclose(out, opacity.unsqueeze(-1).expand(-1, -1, -1, 3), atol=1e-6)


def test_overlay_broadcasts_a_single_image_over_a_batch_of_heat_maps():
    image, heat = torch.rand(1, 6, 6, 3), torch.rand(3, 6, 6, 3)
    out = overlay(image, heat, 0.25)
    assert out.shape == (3, 6, 6, 3)
    for index in range(3):
        assert torch.allclose(out[index], overlay(image, heat[index : index + 1], 0.25)[0])


def test_overlay_refuses_mismatched_sizes_and_says_to_resize():
    with pytest.raises(ValueError, match="resize"):
        overlay(torch.rand(1, 8, 8, 3), torch.rand(1, 4, 4, 3))
    with pytest.raises(ValueError, match="batch"):
        overlay(torch.rand(2, 8, 8, 3), torch.rand(3, 8, 8, 3))
    with pytest.raises(ValueError, match="opacity"):
        overlay(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3), torch.rand(1, 4, 4))


# ---------------------------------------------------------------- entanglement_picture


def test_entanglement_picture_colours_a_only_b_only_both_and_neither():
    image = torch.full((1, 128, 128, 3), 0.5)
    a, b = quadrant_masks()
    out = entanglement_picture(a, b, torch.tensor([0.33]), ("woman", "doctor"), image, opacity=0.6)
    assert out.shape == (1, 128, 128, 3) and out.dtype == torch.float32

    def blended(colour):
        return 0.5 + 0.6 * (torch.tensor(colour) - 0.5)

    assert torch.allclose(out[0, 90, 20], blended(A_COLOR), atol=1e-6)
    assert_striped(out[0, 80:100, 30:50], blended(A_COLOR), blended(B_COLOR))
    assert torch.allclose(out[0, 90, 60], blended(B_COLOR), atol=1e-6)
    assert torch.equal(out[0, 110:, :], image[0, 110:, :])  # neither: the image, untouched


def test_over_a_picture_the_masks_are_outlined_in_dark_around_them_so_a_sky_blue_mask_shows_over_a_sky():
    sky = torch.tensor((0.49, 0.69, 0.89)).expand(1, 512, 512, 3)  # A's colour, blended, all but vanishes here
    a, b = quadrant_masks(512)  # rows 80..99; A cols 10..49, B cols 30..69
    out = entanglement_picture(a, b, torch.tensor([0.33]), ("woman", "doctor"), sky)
    dark = out[0].amax(-1) < 0.1
    around = torch.zeros(512, 512, dtype=torch.bool)
    around[78:102, 8:72] = True  # within 2 (= 512 / 256) of the masks' union, outside it
    around[80:100, 10:70] = False
    assert torch.equal(dark[40:], around[40:])  # below the label
    assert not dark[(a | b)[0]].any()  # every pixel the IoU counts keeps its colour
    whole = torch.ones(1, 512, 512, dtype=torch.bool)
    covered = entanglement_picture(whole, ~whole, torch.tensor([0.0]), ("woman", "doctor"), sky)
    assert not (covered[0, 40:].amax(-1) < 0.1).any()  # the picture's border has nothing beyond it to outline
    bare = entanglement_picture(a, b, torch.tensor([0.33]), ("woman", "doctor"))  # on black: no outline needed
    assert torch.equal(bare[0, 40:].amax(-1) < 0.1, ~(a | b)[0, 40:])


@pytest.mark.parametrize("height, width, reach", [(128, 256, 1), (1024, 512, 2), (1024, 1024, 4)])
def test_the_outline_grows_with_the_pictures_short_side_and_leaves_a_two_pixel_overlap_striped(height, width, reach):
    grey = torch.full((1, height, width, 3), 0.5)
    a = torch.zeros(1, height, width, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[:, 60:100, 20:42] = True
    b[:, 60:100, 40:60] = True  # overlapping A in columns 40 and 41 only
    out = entanglement_picture(a, b, torch.tensor([0.05]), ("woman", "doctor"), grey)
    dark = out[0].amax(-1) < 0.1
    assert dark[80, 20 - reach:20].all() and not dark[80, 20 - reach - 1]  # the outline's width, left of A
    blended = [0.5 + 0.6 * (torch.tensor(c) - 0.5) for c in (A_COLOR, B_COLOR)]
    sliver = out[0, 60:100, 40:42]  # the overlap, two columns wide: in both colours, as stripes are
    is_a, is_b = ((sliver - colour).abs().amax(-1) < 1e-6 for colour in blended)
    assert (is_a | is_b).all() and is_a.any() and is_b.any()


def assert_striped(region, colour_a, colour_b):
    """The overlap: every pixel in A's or B's colour, in diagonal stripes (both along a row and down a column)."""
    is_a = (region - colour_a).abs().amax(-1) < 1e-6
    is_b = (region - colour_b).abs().amax(-1) < 1e-6
    assert (is_a | is_b).all() and is_a.any(dim=0).all() and is_b.any(dim=0).all() and is_a.any(dim=1).all()


# Machado, Oliveira and Fernandes (2009), severity 1, on linear RGB.
_DEFICIENCIES = {
    "protanopia": ((0.152286, 1.052583, -0.204868), (0.114503, 0.786281, 0.099216), (-0.003882, -0.048116, 1.051998)),
    "deuteranopia": ((0.367322, 0.860646, -0.227968), (0.280085, 0.672501, 0.047413), (-0.011820, 0.042940, 0.968881)),
    "tritanopia": ((1.255528, -0.076749, -0.178779), (-0.078411, 0.930809, 0.147602), (0.004733, 0.691367, 0.303900)),
}


def _linear(srgb):
    return torch.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _lab(linear):
    """CIELAB (D65) of linear RGB colours [..., 3]."""
    xyz = linear @ torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                                dtype=linear.dtype).T / torch.tensor([0.95047, 1.0, 1.08883], dtype=linear.dtype)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


@pytest.mark.parametrize("vision", ["typical", *_DEFICIENCIES])
@pytest.mark.parametrize("under", ["black", "skin", "grey", "white", "dark"])
def test_entanglement_picture_regions_stay_apart_for_colour_blind_viewers(vision, under):
    # A only, B only (the overlap is striped with both) and what lies under them, as drawn: full colours on black,
    # or blended at the default opacity over a picture, bright (a white coat) or dark.
    base = {"black": (0.0, 0.0, 0.0), "skin": (0.85, 0.65, 0.55), "grey": (0.5, 0.5, 0.5), "white": (0.95,) * 3,
            "dark": (0.1,) * 3}[under]
    shown = torch.tensor([A_COLOR, B_COLOR, base], dtype=torch.float64)
    if under != "black":
        shown[:2] = torch.lerp(shown[2].expand(2, 3), shown[:2], 0.6)
    seen = _linear(shown)
    if vision != "typical":
        seen = (seen @ torch.tensor(_DEFICIENCIES[vision], dtype=torch.float64).T).clamp(0, 1)
    lab = _lab(seen)
    assert torch.cdist(lab, lab).add(torch.eye(3, dtype=torch.float64) * 1e3).min() >= 20  # CIELAB ΔE76


def test_entanglement_picture_writes_a_label_box_in_the_top_left_corner():
    image = torch.full((1, 128, 128, 3), 0.5)
    a, b = quadrant_masks()
    out = entanglement_picture(a, b, torch.tensor([0.33]), ("woman", "doctor"), image)
    corner = out[0, :12, :40]
    assert (corner - 0.5).abs().amax() > 0.3  # dark box and coloured text, not the grey image
    assert torch.equal(out[0, :12, -8:], image[0, :12, -8:])  # the box stops short of the far edge


def test_a_label_with_letters_the_default_font_lacks_is_drawn_in_a_system_font_that_has_them(monkeypatch, caplog):
    # Pillow's default font draws ASCII only: 'médecin' came out as 'm□decin'.
    word = "médecin"
    if not any(labels._draws(font, word) for font in labels._fonts(14)):
        pytest.skip(f"NO SYSTEM FONT HERE DRAWS {word!r} (none of {labels._FALLBACK_FONTS}): fallback untested")
    assert not labels._draws(labels._fonts(14)[0], word)  # the default font lacks é
    assert labels._draws(labels._font_for(f"b={word}", 14), f"b={word}")
    assert labels._font_for("b=doctor", 14) is labels._fonts(14)[0]  # ASCII labels keep the default font
    assert all(font.size == 14 for font in labels._fonts(14))
    labels._fonts.cache_clear()
    monkeypatch.setattr(labels, "_FALLBACK_FONTS", ("NoSuchFont.ttf", *labels._FALLBACK_FONTS))
    try:
        assert len(labels._fonts(14)) > 1  # a font not installed is passed over, not the end of the search
    finally:
        labels._fonts.cache_clear()
    a, b = quadrant_masks()
    drawn = entanglement_picture(a, b, torch.tensor([0.33]), ("woman", word))
    labels._fonts.cache_clear()
    labels._say_undrawn.cache_clear()
    monkeypatch.setattr(labels, "_FALLBACK_FONTS", ("NoSuchFont.ttf",))  # none that draws é
    try:
        assert "no font here draws" not in caplog.text
        boxed = entanglement_picture(a, b, torch.tensor([0.33]), ("woman", word))
    finally:
        labels._fonts.cache_clear()
    assert not torch.equal(drawn, boxed)
    assert "no font here draws é, which a picture's label shows as boxes" in caplog.text
    assert "under one of the file names Pillow looks for, NoSuchFont.ttf, then restart ComfyUI" in caplog.text
    caplog.clear()
    try:
        entanglement_picture(a, b, torch.tensor([0.5]), ("woman", word))  # another label, the same letter
    finally:
        labels._fonts.cache_clear()
    assert "no font here draws" not in caplog.text  # said once


def test_a_nodes_note_names_the_letters_its_label_draws_as_boxes_and_none_where_each_is_drawn(monkeypatch):
    assert labels.undrawn_note("a=woman b=doctor") is None  # ASCII: the default font
    labels._fonts.cache_clear()
    monkeypatch.setattr(labels, "_FALLBACK_FONTS", ("NoSuchFont.ttf",))  # the default font alone: ASCII only
    try:
        note = labels.undrawn_note("a=infirmière b=医生 医")
    finally:
        labels._fonts.cache_clear()
    assert note.startswith("the picture's label draws è医生 as boxes: no font found here has them all; install one")


def test_the_font_warning_names_only_the_letters_no_font_here_draws_once_whatever_their_order(caplog):
    if not any(labels._draws(font, "é") for font in labels._fonts(14)) or any(
            labels._draws(font, "医生") for font in labels._fonts(14)):
        pytest.skip("NEEDS A SYSTEM FONT THAT DRAWS é AND NONE THAT DRAWS 医生 (as DejaVu alone): warning untested")
    labels._say_undrawn.cache_clear()
    a, b = quadrant_masks()
    entanglement_picture(a, b, torch.tensor([0.33]), ("é", "医生"))
    entanglement_picture(a, b, torch.tensor([0.33]), ("生医", "é"))
    said = [r.getMessage() for r in caplog.records if "no font here draws" in r.getMessage()]
    assert len(said) == 1 and "no font here draws 医生," in said[0], said  # not é, which DejaVu draws


def test_entanglement_picture_without_image_uses_full_colours_on_black():
    a, b = quadrant_masks()
    out = entanglement_picture(a, b, torch.tensor([0.33]), ("woman", "doctor"))
    assert torch.allclose(out[0, 90, 20], torch.tensor(A_COLOR))
    assert_striped(out[0, 80:100, 30:50], torch.tensor(A_COLOR), torch.tensor(B_COLOR))
    assert torch.allclose(out[0, 90, 60], torch.tensor(B_COLOR))
    assert torch.equal(out[0, 110:], torch.zeros(18, 128, 3))


def test_entanglement_picture_labels_each_image_with_its_own_iou():
    a, b = (mask.expand(2, -1, -1) for mask in quadrant_masks())
    image = torch.full((1, 128, 128, 3), 0.5)
    differ = entanglement_picture(a, b, torch.tensor([0.12, 0.87]), ("woman", "doctor"), image)
    same = entanglement_picture(a, b, torch.tensor([0.5, 0.5]), ("woman", "doctor"), image)
    assert not torch.equal(differ[0, :40, :100], differ[1, :40, :100])
    assert torch.equal(same[0], same[1])
    assert torch.equal(differ[0, 40:], differ[1, 40:])  # only the label differs


def test_entanglement_label_wraps_on_small_images_gives_the_iou_alone_on_tiny_ones_and_grows_on_large_ones():
    def box(size):
        empty = torch.zeros(1, size, size, dtype=torch.bool)
        return label_box(entanglement_picture(empty, empty, torch.tensor([0.42]), ("woman", "doctor"))[0])

    one_line_rows, one_line_cols = box(256)
    wrapped_rows, wrapped_cols = box(128)
    assert wrapped_cols < 128 and 1.5 * one_line_rows < wrapped_rows <= 128 // 4  # on two lines, names kept
    tiny_rows, tiny_cols = box(64)  # wrapped, the names would cover most of it
    assert tiny_rows == one_line_rows and tiny_cols < one_line_cols / 2
    large_rows, large_cols = box(1024)
    assert large_rows > 2 * one_line_rows and large_cols < 1024


def test_entanglement_label_gives_the_iou_alone_once_its_wrapped_lines_would_cover_a_quarter_of_the_picture():
    def box(size):
        empty = torch.zeros(1, size, size, dtype=torch.bool)
        return label_box(entanglement_picture(empty, empty, torch.tensor([0.42]), ("woman", "doctor"))[0])

    one_line_rows, _ = box(256)
    wrapped_rows, _ = box(128)  # two lines, within a quarter of 128
    assert wrapped_rows > 96 // 4 and box(96)[0] == one_line_rows  # the same two lines would cover over 96 // 4


def test_a_word_too_long_for_the_picture_is_shortened_with_an_ellipsis_not_cut_at_its_edge():
    word = "a=pneumonoultramicroscopicsilicovolcanoconiosis"
    patch = labels.label_patch([(word, A_COLOR)], 10, 128)
    assert patch.shape[1] <= 128  # drawn whole within the picture, not past its edge
    font = labels._font_for(word, 10)
    text = labels._shortened(word, font, 100)
    assert text.endswith("\u2026") and word.startswith(text[:-1]) and font.getlength(text) <= 100
    assert font.getlength(word[:len(text)] + "\u2026") > 100  # as much of the word as fits
    assert labels._shortened("a=woman", font, 100) == "a=woman"


def test_a_picture_too_narrow_for_the_iou_label_shows_the_bare_figure():
    empty = torch.zeros(1, 40, 40, dtype=torch.bool)
    picture = entanglement_picture(empty, empty, torch.tensor([0.42]), ("woman", "doctor"))[0]
    figure = labels.label_patch([("0.42", (1.0, 1.0, 1.0))], 10, 40)
    assert torch.equal(picture[:figure.shape[0], :figure.shape[1]], figure)
    roomy = entanglement_picture(*(torch.zeros(1, 64, 64, dtype=torch.bool),) * 2, torch.tensor([0.42]), ("a", "b"))
    assert label_box(roomy[0])[1] > figure.shape[1] + 20  # where "a&b IoU 0.42" fits, it is written


def test_a_label_is_left_off_a_picture_it_would_mostly_cover_and_never_shows_a_shortened_figure():
    empty = torch.zeros(1, 16, 16, dtype=torch.bool)
    tiny = entanglement_picture(empty, empty, torch.tensor([0.42]), ("woman", "doctor"))
    assert torch.equal(tiny, torch.zeros(1, 16, 16, 3))  # all label, the figure cut: none
    heat = colorize(torch.rand(1, 16, 16), "inferno")
    assert torch.equal(render.label_heatmaps(heat, "doctor", "inferno"), heat)
    tall = entanglement_picture(*(torch.zeros(1, 200, 40, dtype=torch.bool),) * 2, torch.tensor([0.42]),
                                ("woman", "doctor"))[0]  # room for three lines, each part shortened: the figure
    figure = labels.label_patch([("0.42", (1.0, 1.0, 1.0))], 10, 40)
    assert torch.equal(tall[:figure.shape[0], :figure.shape[1]], figure) and label_box(tall)[0] == figure.shape[0]


def test_pictures_over_an_image_outside_0_to_1_stay_within_it():
    masks = quadrant_masks()
    image = torch.linspace(-0.3, 1.5, 128 * 128 * 3).reshape(1, 128, 128, 3)  # an upscaler's overshoot
    for picture in (entanglement_picture(*masks, torch.tensor([0.3]), ("a", "b"), image),
                    overlay(image, colorize(torch.rand(1, 128, 128), "inferno"), 0.6)):
        assert picture.min() >= 0 and picture.max() <= 1


def holds_row(picture, row):
    """Whether some row of a [H, W, 3] picture holds ``row`` ([n, 3]) as a run of pixels."""
    runs = picture.unfold(1, row.shape[0], 1)  # [H, W - n + 1, 3, n]
    return bool((runs == row.T).all(dim=-1).all(dim=-1).any())


@pytest.mark.parametrize("colormap", ["inferno", "turbo"])
def test_a_heatmap_legend_writes_the_word_and_the_colormaps_own_low_to_high_bar_in_the_corner(colormap):
    heat = colorize(torch.rand(2, 384, 512), colormap)
    labelled = render.label_heatmaps(heat, "doctor", colormap)
    bar = colorize(torch.linspace(0, 1, 4 * 12 - 2)[None, None], colormap)[0, 0]  # 12 px text at 384: a 48 px bar
    rows, cols = label_box(torch.where(labelled == heat, 0.0, 1.0)[0])  # where it differs from the heatmap
    assert holds_row(labelled[0, :rows, :cols], bar) and not holds_row(heat[0], bar)
    assert holds_row(labelled[0, :rows, :cols], bar[:-1]) and not holds_row(labelled[0, :rows, :cols], bar.flip(0))
    assert torch.equal(labelled[1, :rows, :cols], labelled[0, :rows, :cols])  # every picture of the batch
    assert torch.equal(labelled[:, rows:], heat[:, rows:]) and torch.equal(labelled[:, :, cols:], heat[:, :, cols:])
    assert rows <= 384 // 4 and cols < 512 // 2
    word = labels.label_patch([("doctor", (1.0, 1.0, 1.0))], 12, 512)
    assert torch.equal(labelled[0, :word.shape[0], :word.shape[1]], word)  # the word on the first line


def test_a_label_exactly_as_wide_as_its_room_is_drawn_whole_and_fits_says_so():
    white = (1.0, 1.0, 1.0)
    font = labels._font_for("a=woman", 10)
    exact = font.getlength("a=woman")
    assert labels._shortened("a=woman", font, exact) == "a=woman"
    room = math.ceil(exact) + 2 * labels._pad(10)
    assert labels.fits("a=woman", 10, room) and not labels.fits("a=woman", 10, room - 1)
    whole = labels.label_patch([("a=woman", white)], 10, 1000)
    assert torch.equal(labels.label_patch([("a=woman", white)], 10, room), whole)
    assert not torch.equal(labels.label_patch([("a=woman", white)], 10, room - 1), whole)


def test_the_legend_is_the_word_over_low_a_framed_bar_and_high_each_in_its_place():
    white = (1.0, 1.0, 1.0)
    heat = colorize(torch.rand(1, 384, 512), "inferno")
    out = render.label_heatmaps(heat, "doctor", "inferno")[0]
    box = torch.tensor(labels.LABEL_BOX) / 255
    word, low, high = (labels.label_patch([(text, white)], 12, 512) for text in ("doctor", "low", "high"))
    top, tall, margin, bar = word.shape[0], low.shape[0], low.shape[0] // 4, 48
    end = low.shape[1] + bar + high.shape[1]
    assert torch.equal(out[top:top + tall, :low.shape[1]], low)
    assert torch.equal(out[top:top + tall, low.shape[1] + bar:end], high)
    cols = slice(low.shape[1], low.shape[1] + bar)
    assert (out[top:top + margin, cols] == box).all() and (out[top + tall - margin:top + tall, cols] == box).all()
    rows = slice(top + margin, top + tall - margin)
    rim = torch.cat([out[rows.start, cols], out[rows.stop - 1, cols], out[rows, cols.start], out[rows, cols.stop - 1]])
    assert (rim == 0.5).all()  # outlined in grey: inferno's dark end would run into the box
    inside = slice(cols.start + 1, cols.stop - 1)
    colours = colorize(torch.linspace(0, 1, bar - 2)[None, None], "inferno")[0, 0]
    assert torch.equal(out[rows.start + 1, inside], colours)
    assert (out[:top, word.shape[1]:end] == box).all()  # the word's line filled out with the box's colour


def test_the_legends_bar_narrows_to_keep_high_on_a_narrow_picture_and_is_left_out_where_too_narrow_or_short():
    white = (1.0, 1.0, 1.0)
    px = labels.label_font_px(384, 70)
    word, low, high = (labels.label_patch([(text, white)], px, 70) for text in ("doctor", "low", "high"))
    narrow = render.label_heatmaps(colorize(torch.rand(1, 384, 70)), "doctor", "inferno")[0]
    assert torch.equal(narrow[word.shape[0]:word.shape[0] + high.shape[0], 70 - high.shape[1]:], high)
    for height, width in ((384, low.shape[1] + high.shape[1] + px - 1), (100, 512)):  # a bar < font_px; too short
        heat = colorize(torch.rand(1, height, width))
        out = render.label_heatmaps(heat, "doctor", "inferno")[0]
        assert torch.equal(out[word.shape[0]:], heat[0, word.shape[0]:])  # the word alone


def test_a_heatmap_too_small_for_the_bar_gets_the_word_alone_and_its_input_is_left_as_it_was():
    heat = colorize(torch.rand(1, 64, 64))
    before = heat.clone()
    labelled = render.label_heatmaps(heat, "nurse", "inferno")
    word = labels.label_patch([("nurse", (1.0, 1.0, 1.0))], 10, 64)
    assert torch.equal(labelled[0, :word.shape[0], :word.shape[1]], word)
    assert torch.equal(labelled[0, word.shape[0]:], heat[0, word.shape[0]:])  # no second line
    assert torch.equal(heat, before)


def test_labels_with_pillow_before_10_1_are_drawn_in_its_bitmap_font_and_shortened_with_three_dots(monkeypatch):
    # Before 10.1, load_default takes no size and gives the small bitmap font, which draws Latin-1 only (no "…").
    from PIL import ImageFont

    def old_load_default(**size):
        if size:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return ImageFont.load_default_imagefont()

    monkeypatch.setattr(labels.ImageFont, "load_default", old_load_default)
    monkeypatch.setattr(labels, "_FALLBACK_FONTS", ())
    labels._fonts.cache_clear()
    try:
        font = labels._fonts(12)[0]
        assert isinstance(font, ImageFont.ImageFont)  # not a FreeType font
        word = "a=pneumonoultramicroscopicsilicovolcanoconiosis"
        assert labels._shortened(word, font, 100).endswith("...") and labels.label_patch([(word, A_COLOR)], 12,
                                                                                          128).shape[1] <= 128
        a, b = quadrant_masks()
        picture = entanglement_picture(a, b, torch.tensor([0.33]), ("woman", "doctor"))
        assert label_box(picture[0, :40])[1] > 40  # a label drawn (the masks lie below row 80)
        assert render.label_heatmaps(colorize(torch.rand(1, 384, 512)), "doctor", "inferno").shape == (1, 384, 512, 3)
    finally:
        labels._fonts.cache_clear()


def test_entanglement_picture_rejects_mismatched_inputs():
    a, b = quadrant_masks()
    with pytest.raises(ValueError, match="masks"):
        entanglement_picture(a, b[:, :64], torch.tensor([0.1]), ("a", "b"))
    with pytest.raises(ValueError, match="IoU"):
        entanglement_picture(a, b, torch.tensor([0.1, 0.2]), ("a", "b"))
    with pytest.raises(ValueError, match="image"):
        entanglement_picture(a, b, torch.tensor([0.1]), ("a", "b"), torch.rand(1, 64, 64, 3))


# ---------------------------------------------------------------- to_pil, dtypes, devices


def test_to_pil_makes_one_rounded_rgb_image_per_batch_entry():
    images = torch.zeros(2, 3, 5, 3)
    images[0, 0, 0] = torch.tensor([0.5, 1.7, -0.2])
    images[1, 2, 4] = torch.tensor([1.0, 0.25, 0.0])
    pictures = to_pil(images)
    assert [p.size for p in pictures] == [(5, 3), (5, 3)] and {p.mode for p in pictures} == {"RGB"}
    assert pictures[0].getpixel((0, 0)) == (128, 255, 0)
    assert pictures[1].getpixel((4, 2)) == (255, 64, 0)
    assert pictures[1].getpixel((0, 0)) == (0, 0, 0)


def test_everything_works_on_float16_maps():
    maps = torch.rand(2, 16, 16, dtype=torch.float16)
    normalized = normalize_maps(maps)
    assert normalized.dtype == torch.float32 and normalized.max() == 1
    resized = resize_maps(maps, (32, 32))
    assert resized.dtype == torch.float16 and resized.shape == (2, 32, 32)
    heat = colorize(normalize_maps(resized), "magma")
    assert heat.dtype == torch.float32 and torch.isfinite(heat).all()
    image = torch.rand(1, 32, 32, 3, dtype=torch.float16)
    mixed = overlay(image, heat.half(), resized.clamp(0, 1))
    assert mixed.shape == (2, 32, 32, 3) and torch.isfinite(mixed).all()
    picture = entanglement_picture(resized > 0.5, resized > 0.3, torch.tensor([0.2, 0.4], dtype=torch.float16), ("x", "y"), image)
    assert picture.shape == (2, 32, 32, 3) and picture.dtype == torch.float32
    assert len(to_pil(picture)) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rendering_on_cuda_matches_cpu():
    maps = torch.rand(2, 16, 16)
    a, b = quadrant_masks()
    image = torch.rand(1, 128, 128, 3)
    on_cpu = overlay(image, colorize(normalize_maps(resize_maps(maps, (128, 128)))), 0.5)
    on_gpu = overlay(image.cuda(), colorize(normalize_maps(resize_maps(maps.cuda(), (128, 128)))), 0.5)
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-5)
    picture = entanglement_picture(a.cuda(), b.cuda(), torch.tensor([0.3]).cuda(), ("a", "b"), image)
    assert picture.is_cuda
    assert torch.allclose(picture.cpu(), entanglement_picture(a, b, torch.tensor([0.3]), ("a", "b"), image), atol=1e-6)


def test_lookup_tables_have_256_entries_for_every_colormap():
    assert set(render._LUTS) == set(COLORMAPS)
    assert all(lut.shape == (256, 3) and lut.dtype == torch.float32 for lut in render._LUTS.values())


def test_an_image_of_another_size_than_the_masks_is_refused_with_the_fix():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[1 or 1, 8, 8, 3\].*measure_entanglement's size="):
        entanglement_picture(masks, masks, torch.tensor([0.0]), ("a", "b"), torch.zeros(1, 64, 64, 3))


def test_overlay_clamps_an_opacity_above_one():
    image, heat = torch.zeros(1, 2, 2, 3), torch.full((1, 2, 2, 3), 0.5)
    assert torch.equal(overlay(image, heat, 2.0), heat)


def test_overlap_stripes_stay_two_pixels_wide_on_small_pictures():
    # One-pixel stripes blur into a third colour once the picture is scaled down.
    both = torch.ones(1, 64, 64, dtype=torch.bool)
    out = entanglement_picture(both, both, torch.tensor([1.0]), ("a", "b"))
    is_a = ((out[0, 63] - torch.tensor(A_COLOR)).abs().amax(-1) < 1e-6).tolist()
    runs = [len(list(group)) for _, group in itertools.groupby(is_a)]
    assert set(runs[1:-1]) == {2}


def test_the_entanglement_label_gives_the_iou_to_two_decimals():
    empty = torch.zeros(1, 128, 128, dtype=torch.bool)
    one, other, rounded = (entanglement_picture(empty, empty, torch.tensor([v]), ("a", "b")) for v in (0.33, 0.34,
                                                                                                      0.334))
    assert not torch.equal(one, other) and torch.equal(one, rounded)


@pytest.mark.parametrize("iou, text", [(math.nan, "n/a"), (0.0, "0.00"), (0.001, "<0.01"), (0.00499, "<0.01"),
                                       (0.005, "0.01"), (0.33, "0.33"), (0.99499, "0.99"), (0.99501, ">0.99"),
                                       (1.0, "1.00")])
def test_the_label_writes_an_iou_to_two_decimals_but_never_rounds_a_sliver_to_none_or_all(iou, text):
    assert render._iou_text(iou) == text


def test_the_entanglement_label_says_a_sliver_of_overlap_is_below_one_hundredth_not_none():
    empty = torch.zeros(1, 128, 128, dtype=torch.bool)

    def label(value):
        return entanglement_picture(empty, empty, torch.tensor([value]), ("a", "b"))

    assert torch.equal(label(0.004), label(0.001)) and not torch.equal(label(0.004), label(0.0))  # <0.01, not 0.00
    assert torch.equal(label(0.996), label(0.999)) and not torch.equal(label(0.996), label(1.0))  # >0.99, not 1.00
    assert not torch.equal(label(0.004), label(0.01)) and not torch.equal(label(0.996), label(0.99))


def test_the_entanglement_picture_refuses_an_image_batch_of_neither_one_nor_one_per_mask():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"image must be \[1 or 2, 16, 16, 3\]"):
        entanglement_picture(masks, masks, torch.zeros(2), ("a", "b"), torch.zeros(3, 16, 16, 3))


def test_normalize_maps_scales_over_the_finite_values_so_one_nan_pixel_blanks_no_other_map():
    maps = torch.rand(2, 4, 4)
    maps[1, 0, 0] = float("nan")
    for shared in (False, True):
        out = normalize_maps(maps, shared=shared)
        assert out[0].isfinite().all() and out[1].isnan().sum() == 1
    finite = maps[maps.isfinite()]
    expected = (maps[0] - finite.min()) / (finite.max() - finite.min())
    assert torch.allclose(normalize_maps(maps, shared=True)[0], expected)


def test_normalize_maps_keeps_a_nan_or_inf_pixel_of_a_flat_map_as_it_is():
    out = normalize_maps(torch.tensor([[[2.0, 2.0], [2.0, float("nan")]], [[2.0, 2.0], [2.0, float("inf")]]]))
    assert out[0, 1, 1].isnan() and out[1, 1, 1] == float("inf")
    assert (out[:, 0] == 0).all() and out[0, 1, 0] == 0


def test_an_iou_of_exactly_0_995_is_labelled_above_0_99():
    assert render._iou_text(0.995) == ">0.99"
