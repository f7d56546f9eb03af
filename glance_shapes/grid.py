"""The comparison picture: one row per held-out (caption, seed), one column per sampling variant."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

SCALE = 4  # 32 px pictures shown at 128 px, nearest neighbour (pixels stay visible)


def _tile(img):
    a = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(a).resize((a.shape[1] * SCALE, a.shape[0] * SCALE), Image.NEAREST)


FONT_PX, LINE = 16, 20  # legible at 100 % zoom


def _font():
    try:  # Pillow >= 10.1 embeds a scalable font: the same glyphs on every machine
        return ImageFont.load_default(size=FONT_PX)
    except TypeError:  # older Pillow: only its small bitmap font exists
        return ImageFont.load_default()


def comparison_grid(columns, captions, title=None, training=None):
    """PIL image. columns: [(label, pictures [B, 3, 32, 32] in [0, 1])]; captions: B row labels;
    training: optional (label, picture [3, 32, 32]) shown left of the grid (the one training sample)."""
    font = _font()
    cell, pad, label_w = 32 * SCALE, 10, 250
    head = 3 * LINE + pad
    left = (cell + 2 * pad) if training is not None else 0
    w = left + label_w + len(columns) * (cell + pad) + pad
    title_lines = _wrap(font, title, w - 2 * pad) if title else []
    top = head + (LINE * len(title_lines) + pad if title else 0)
    h = top + len(captions) * (cell + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def lines(x, y, text, width, most=3):
        for k, line in enumerate(_wrap(font, text, width)[:most]):
            draw.text((x, y + LINE * k), line, fill=(0, 0, 0), font=font)

    for k, line in enumerate(title_lines):
        draw.text((pad, pad // 2 + LINE * k), line, fill=(0, 0, 0), font=font)
    if training is not None:
        label, pic = training
        lines(pad, top - head + pad // 2, label, cell + pad)
        canvas.paste(_tile(pic), (pad, top))
    for j, (label, _) in enumerate(columns):
        lines(left + label_w + j * (cell + pad), top - head + pad // 2, label, cell + pad // 2)
    for i, caption in enumerate(captions):
        y = top + i * (cell + pad)
        lines(left + pad, y + cell // 2 - LINE * 3 // 2, str(caption), label_w - 2 * pad)
        for j, (_, pics) in enumerate(columns):
            canvas.paste(_tile(pics[i]), (left + label_w + j * (cell + pad), y))
    return canvas


def _wrap(font, text, width):
    """Words of text in lines no wider than width pixels (a longer single word gets a line of its own)."""
    lines, cur = [], ""
    for word in text.split():
        if cur and font.getlength(f"{cur} {word}") > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + ([cur] if cur else [])
