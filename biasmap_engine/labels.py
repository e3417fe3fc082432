"""Text labels on BiasMap's pictures: coloured words on a dark box, in a font that has their letters, wrapped and
shortened to fit the picture; [h, w, 3] float32 patches on the CPU for the pictures to paste."""

import functools
import logging
import math

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["LABEL_BOX", "LABEL_TEXT", "fits", "label_font_px", "label_patch", "undrawn_note"]

LABEL_TEXT = (1.0, 1.0, 1.0)
LABEL_BOX = (20, 20, 20)  # 8-bit RGB: dark enough for every colour of the pictures to read on it
_LABEL_GAP = "  "


def label_font_px(height: int, width: int) -> int:
    """Text grows with the picture (about 1/32 of its short side) but never below the 10 px that the default font
    needs to stay legible."""
    return max(10, min(height, width) // 32)


# Pillow's default font draws ASCII only (a box for é, ж or 医). For a label with other letters, the first of these
# that draws them all, which Pillow looks for in the system's font folders (Linux, Windows, macOS).
_FALLBACK_FONTS = ("DejaVuSans.ttf", "arial.ttf", "Arial Unicode.ttf", "NotoSans-Regular.ttf",
                   "NotoSansCJK-Regular.ttc", "wqy-microhei.ttc", "wqy-zenhei.ttc", "DroidSansFallbackFull.ttf",
                   "msyh.ttc", "PingFang.ttc", "meiryo.ttc", "YuGothM.ttc", "malgun.ttf", "AppleSDGothicNeo.ttc",
                   "Nirmala.ttf", "NotoSansDevanagari-Regular.ttf", "Kohinoor.ttc", "NotoSansArabic-Regular.ttf",
                   "NotoSansHebrew-Regular.ttf")


@functools.lru_cache(maxsize=8)
def _fonts(size: int) -> tuple:
    """Pillow's default font at a pixel size (the fixed bitmap font where it cannot scale), then the fallbacks found."""
    try:
        fonts = [ImageFont.load_default(size=size)]
    except TypeError:  # Pillow < 10.1 has no size argument, only the small bitmap font
        fonts = [ImageFont.load_default()]
    for name in _FALLBACK_FONTS:
        try:
            fonts.append(ImageFont.truetype(name, size))
        except OSError:  # not installed here
            continue
    return tuple(fonts)


def _font_for(text: str, size: int):
    """The first font that draws every character of ``text``; the default font where none does (boxes, said)."""
    fonts = _fonts(size)
    font = next((font for font in fonts if _draws(font, text)), None)
    if font is None:
        _say_undrawn("".join(ch for ch in sorted(set(text)) if not any(_draws(f, ch) for f in fonts)))
    return font or fonts[0]


def undrawn_note(text: str, font_px: int = 16) -> str | None:
    """For a node's text: the letters of a label of ``text`` drawn as boxes (no font found here has them, or no one
    font all of them), and how to have them drawn; None where every letter is drawn."""
    font = _font_for(text, font_px)
    letters = "".join(ch for ch in dict.fromkeys(text) if not ch.isspace() and not _draws(font, ch))
    if not letters:
        return None
    return (f"the picture's label draws {letters} as boxes: no font found here has them all; install one that does "
            f"(Noto Sans CJK for Chinese, Japanese and Korean, say), then restart ComfyUI (the console names the font "
            f"files BiasMap looks for)")


@functools.lru_cache(maxsize=64)
def _say_undrawn(letters: str) -> None:
    """Tell once a process, for each set of ``letters`` that no font here draws (empty: each has a font, but no
    font all of a label's), how to have them drawn."""
    logging.warning("BiasMap: %s, which a picture's label shows as boxes (the node's text has them): "
                    "install a font that has them under one of the file names Pillow looks for, %s, then restart "
                    "ComfyUI", f"no font here draws {letters}" if letters else "no one font here draws all the "
                    "letters of a label", ", ".join(_FALLBACK_FONTS))


def _draws(font, text: str) -> bool:
    """Whether ``font`` has a glyph for every character of ``text``: a missing one is drawn as the font's box, the
    glyph of a code point no font has."""
    try:
        missing = _missing_glyph(font)
        return all(ch.isspace() or _bitmap(font, ch) != missing for ch in set(text))
    except UnicodeEncodeError:  # the bitmap font: Latin-1 only
        return False


@functools.lru_cache(maxsize=16)
def _missing_glyph(font) -> tuple:
    """The box ``font`` draws for a code point it has no glyph for, drawn once per font (every label asks)."""
    return _bitmap(font, "\U0010fffd")


def _bitmap(font, text: str) -> tuple:
    """``text`` drawn in ``font``, as bytes to compare."""
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("L", (max(1, right - left), max(1, bottom - top)))
    ImageDraw.Draw(image).text((-left, -top), text, font=font, fill=255)
    return image.size, image.tobytes()


def label_patch(segments: list[tuple[str, tuple[float, float, float]]], font_px: int, max_width: int) -> Tensor:
    """Draw coloured text segments on a dark box, wrapping them to fit max_width and shortening a segment that
    fits on no line; [h, w, 3] float32 on CPU."""
    font = _font_for(" ".join(text for text, _ in segments), font_px)
    pad = _pad(font_px)
    gap = font.getlength(_LABEL_GAP)
    line_height = font.getbbox("Ay")[3] + max(1, font_px // 8)
    # Greedy wrap: one line on large images, a segment per line on tiny ones.
    lines: list[list[tuple[str, tuple[float, float, float], float]]] = [[]]
    line_width = 0.0
    for text, colour in segments:
        text = _shortened(text, font, max_width - pad * 2)
        width = font.getlength(text)
        if lines[-1] and pad * 2 + line_width + gap + width > max_width:
            lines.append([])
        line_width = width if not lines[-1] else line_width + gap + width
        lines[-1].append((text, colour, width))
    box_width = pad * 2 + max(sum(w for *_, w in line) + gap * (len(line) - 1) for line in lines)
    box = Image.new("RGB", (math.ceil(box_width), pad * 2 + line_height * len(lines)), LABEL_BOX)
    draw = ImageDraw.Draw(box)
    for row, line in enumerate(lines):
        x = float(pad)
        for text, colour, width in line:
            draw.text((x, pad + row * line_height), text, fill=tuple(round(c * 255) for c in colour), font=font)
            x += width + gap
    pixels = torch.frombuffer(bytearray(box.tobytes()), dtype=torch.uint8)
    return pixels.reshape(box.height, box.width, 3).float() / 255


def _pad(font_px: int) -> int:
    """The label box's margin around its text."""
    return max(2, font_px // 4)


@functools.lru_cache(maxsize=16)
def _ellipsis(font) -> str:
    """An ellipsis as ``font`` draws one: the character, or three dots (Pillow's bitmap font is Latin-1 only)."""
    return "\u2026" if _draws(font, "\u2026") else "..."


def fits(text: str, font_px: int, width: int) -> bool:
    """Whether a label of ``text`` alone fits ``width`` pixels whole."""
    return _font_for(text, font_px).getlength(text) + 2 * _pad(font_px) <= width


def _shortened(text: str, font, width: float) -> str:
    """``text`` as it fits ``width`` pixels in ``font``: whole, or its end given up for an ellipsis (a long word on a
    narrow picture, which Pillow would draw past the edge, cut mid-letter)."""
    if font.getlength(text) <= width:
        return text
    ellipsis = _ellipsis(font)
    while text and font.getlength(text + ellipsis) > width:
        text = text[:-1]
    return text + ellipsis
