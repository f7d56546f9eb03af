"""Draw a workflow's graph (nodes, titles, links) as the JPEG thumbnail ComfyUI shows in Browse Templates.

    python tools/render_workflow_thumbnail.py example_workflows/*.json
"""
import json
import sys

from PIL import Image, ImageDraw, ImageFont

W, H, PAD, TITLE_H = 768, 432, 24, 22
BG, LINK, BOX, GLANCE, TEXT = (32, 33, 38), (150, 160, 175), (58, 60, 68), (46, 110, 160), (235, 235, 240)
NOTE_BOX, NOTE_TITLE = (102, 85, 51), (68, 51, 34)  # ComfyUI's note colours (#653 body, #432 title)
NOTES = ("Note", "MarkdownNote")
LINK_COLORS = {"MODEL": (178, 160, 255), "CLIP": (255, 214, 80), "VAE": (255, 110, 110), "LATENT": (255, 150, 210),
               "CONDITIONING": (255, 170, 100), "IMAGE": (100, 180, 230)}


def render(workflow, out_path):
    nodes = {n["id"]: n for n in workflow["nodes"]}
    xs = [n["pos"][0] for n in nodes.values()] + [n["pos"][0] + n["size"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()] + [n["pos"][1] + n["size"][1] for n in nodes.values()]
    x0, y0 = min(xs), min(ys)
    s = min((W - 2 * PAD) / (max(xs) - x0), (H - 2 * PAD) / (max(ys) - y0))

    def pt(x, y):
        return PAD + (x - x0) * s, PAD + (y - y0) * s

    img = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", max(9, int(11 * s / 0.45)))
    except OSError:
        font = ImageFont.load_default()
    for _, src, sslot, dst, dslot, typ in workflow["links"]:
        a, b = nodes[src], nodes[dst]
        p = pt(a["pos"][0] + a["size"][0], a["pos"][1] + 30 + 20 * sslot)
        q = pt(b["pos"][0], b["pos"][1] + 30 + 20 * dslot)
        mid = (p[0] + q[0]) / 2
        curve = [(p[0] + (mid - p[0]) * t * 2 if t < 0.5 else mid + (q[0] - mid) * (t - 0.5) * 2,
                  p[1] + (q[1] - p[1]) * (3 * t * t - 2 * t * t * t)) for t in [i / 24 for i in range(25)]]
        d.line(curve, fill=LINK_COLORS.get(typ, LINK), width=3)
    for n in nodes.values():
        (ax, ay), (bx, by) = pt(*n["pos"]), pt(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        glance, note = n["type"].startswith("Glance"), n["type"] in NOTES
        d.rounded_rectangle([ax, ay, bx, by], radius=6, fill=NOTE_BOX if note else BOX,
                            outline=GLANCE if glance else (80, 82, 92), width=2)
        title_fill = GLANCE if glance else NOTE_TITLE if note else (70, 72, 82)
        d.rounded_rectangle([ax, ay, bx, ay + TITLE_H * s / 0.45 * 0.5], radius=6, fill=title_fill)
        d.text((ax + 6, ay + 3), n.get("title") or n["type"], fill=TEXT, font=font)
    img.save(out_path, "JPEG", quality=88)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as fh:
            render(json.load(fh), path[:-5] + ".jpg")
        print("wrote", path[:-5] + ".jpg")
