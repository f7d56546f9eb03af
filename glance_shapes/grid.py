"""The comparison picture: one row per held-out (caption, seed), one column per sampling variant."""
import numpy as np
from PIL import Image, ImageDraw

SCALE = 4  # 32 px pictures shown at 128 px, nearest neighbour (pixels stay visible)


def _tile(img):
    a = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(a).resize((a.shape[1] * SCALE, a.shape[0] * SCALE), Image.NEAREST)


def comparison_grid(columns, captions, title=None, training=None):
    """PIL image. columns: [(label, pictures [B, 3, 32, 32] in [0, 1])]; captions: B row labels;
    training: optional (label, picture [3, 32, 32]) shown left of the grid (the one training sample)."""
    cell, pad, label_w, head = 32 * SCALE, 8, 200, 56
    left = (cell + 2 * pad) if training is not None else 0
    top = head + (24 if title else 0)
    w = left + label_w + len(columns) * (cell + pad) + pad
    h = top + len(captions) * (cell + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 6), title, fill=(0, 0, 0))
    if training is not None:
        label, pic = training
        for k, line in enumerate(_wrap(label, 22)[:3]):
            draw.text((pad, top - 46 + 13 * k), line, fill=(0, 0, 0))
        canvas.paste(_tile(pic), (pad, top))
    for j, (label, _) in enumerate(columns):
        x = left + label_w + j * (cell + pad)
        for k, line in enumerate(_wrap(label, 22)[:3]):
            draw.text((x, top - 46 + 13 * k), line, fill=(0, 0, 0))
    for i, caption in enumerate(captions):
        y = top + i * (cell + pad)
        for k, line in enumerate(_wrap(str(caption), 30)[:3]):
            draw.text((left + pad, y + cell // 2 - 20 + 13 * k), line, fill=(0, 0, 0))
        for j, (_, pics) in enumerate(columns):
            canvas.paste(_tile(pics[i]), (left + label_w + j * (cell + pad), y))
    return canvas


def _wrap(text, width):
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + ([cur] if cur else [])
