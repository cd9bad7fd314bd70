"""
The demo's picture, beside its table: for a few long test captions (one German), the top five of
the 500 test grids under the base CLIP, LLM2CLIP and ProCLIP (the right grid in a green frame),
and the table's main columns as bars. demo.sh runs it last:
    python data/fashion/results_png.py --demo=out/demo [--data=data/fashion/out] [--out=...]
In:  the demo's base_clip, llm2clip and proclip models (each through encoder.load_encoder: the
     base CLIP reads the caption with its own 10-token text tower), test.jsonl's grids and
     captions, and results.json (the bars). The captions shown: `examples`, fixed grids of the
     test set (the first ones; not picked for how the models do on them).
Out: `out` (default <demo>/results.png), a palette PNG drawn with Pillow alone (an existing file
     is replaced only if this script wrote it: filecheck.check_out_file).
"""
import json
import os
import sys

import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from encoder import load_encoder  # noqa: E402
from filecheck import check_out_file, record_out_file  # noqa: E402
from manifest import Manifest  # noqa: E402
from search import font, wrap  # noqa: E402  (the contact sheet's text helpers)

demo = "out/demo"                    # the demo's output folder (demo.sh's $out)
data = "data/fashion/out"            # its data: test.jsonl and the images
out = ""                             # "" = <demo>/results.png
examples = "0:long,1:long,2:de"      # grid:caption field, each grid's first caption of that field
dtype = ""                           # the LLM's compute dtype ("" = encoder's default)
colors = 128                         # the PNG's palette size
overwrite = False                    # replace `out` even if this script did not write it

COMMAND = "data/fashion/results_png.py"  # in written.json beside `out` (filecheck.py)
MODELS = (("base_clip", "base CLIP"), ("llm2clip", "LLM2CLIP"), ("proclip", "ProCLIP"))
BARS = (("base_clip", "base CLIP", (150, 150, 150)),
        ("llm2clip_no_stage1", "LLM2CLIP without stage 1", (170, 190, 215)),
        ("llm2clip", "LLM2CLIP", (40, 100, 190)), ("proclip", "ProCLIP", (230, 130, 30)))
COLUMNS = (("long_i2t_r1", "long i2t"), ("long_t2i_r1", "long t2i"),
           ("multilingual_i2t_r1", "de i2t"), ("multilingual_t2i_r1", "de t2i"),
           ("c2c_top1", "c2c"), ("zeroshot_top1", "zero-shot"))
LANGUAGE = {"long": "English", "de": "German", "fr": "French", "short": "English, short"}
THUMB, PAD, LABEL_W = 80, 6, 112
GREEN, GREY = (0, 170, 70), (225, 225, 225)

def parse_examples(setting):
    """"0:long,2:de" -> [(0, "long"), (2, "de")]."""
    out = []
    for item in setting.split(","):
        grid, _, field = item.partition(":")
        if not grid.strip().isdigit() or not field:
            raise ValueError(f"examples={setting!r}: {item!r} is not grid:field (e.g. 0:long)")
        out.append((int(grid), field.strip()))
    return out

def retrieve(man, shown):
    """{model: [(top-5 grids, their scores, rank of the right grid (1 = first)) per example]}."""
    captions = [man[i]["captions"][f][0] for i, f in shown]
    res = {}
    for name, _ in MODELS:
        enc = load_encoder(os.path.join(demo, name, "model"), dtype=dtype or None)
        sim = enc.encode_texts(captions) @ enc.encode_images(man).T  # (examples, images)
        res[name] = []
        for (i, _), s in zip(shown, sim):
            top = s.topk(5)
            rank = int((s >= s[i]).sum())  # ties count against the right grid, as evaluate.py
            res[name].append((top.indices.tolist(), top.values.tolist(), rank))
        del enc
    return captions, res

def thumb(man, i):
    img, _ = man.open_image(i)
    with img:
        return img.convert("RGB").resize((THUMB, THUMB), Image.Resampling.NEAREST)

def draw_examples(man, shown, captions, res, width):
    """The example panels, stacked: caption, then a row of five thumbnails per model."""
    f, fb, fs = font(13), font(14), font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    panels = []
    for e, ((i, field), cap) in enumerate(zip(shown, captions)):
        lines = wrap(probe, f"\u201c{cap}\u201d", f, width - 2 * PAD)
        head = 22 + 18 * len(lines) + 6
        row_h = THUMB + 22
        im = Image.new("RGB", (width, head + len(MODELS) * row_h + PAD), "white")
        d = ImageDraw.Draw(im)
        d.text((PAD, 2), f"Test grid {i}, its {LANGUAGE.get(field, field)} caption:",
               fill="black", font=fb)
        d.multiline_text((PAD, 22), "\n".join(lines), fill=(40, 40, 40), font=f, spacing=4)
        for m, (name, label) in enumerate(MODELS):
            y = head + m * row_h
            grids, scores, rank = res[name][e]
            d.text((PAD, y + THUMB // 2 - 22), label, fill="black", font=fb)
            d.multiline_text((PAD, y + THUMB // 2), f"right grid\nat rank {rank}", spacing=2,
                             fill=GREEN if rank <= 5 else (160, 0, 0), font=fs)
            for j, (g, s) in enumerate(zip(grids, scores)):
                x = LABEL_W + j * (THUMB + 3 * PAD)
                frame = GREEN if g == i else GREY
                d.rectangle((x - 4, y - 4, x + THUMB + 3, y + THUMB + 3), fill=frame)
                im.paste(thumb(man, g), (x, y))
                d.text((x, y + THUMB + 5), f"{j + 1}. {s:.2f}", fill=(60, 60, 60), font=fs)
        panels.append(im)
    return panels

def draw_bars(rows, width, seed):
    """Grouped bars: a group per column of the table, a bar per model, the value above it."""
    f, fs, fb = font(12), font(11), font(14)
    h, top, base = 250, 58, 210
    im = Image.new("RGB", (width, h), "white")
    d = ImageDraw.Draw(im)
    d.text((PAD, 4), f"The demo's table, seed {seed} (percent)", fill="black", font=fb)
    d.text((PAD + d.textlength(f"The demo's table, seed {seed} (percent)", font=fb) + 8, 6),
           "R@1 of 500 grids; c2c, zero-shot: top-1", fill=(60, 60, 60), font=fs)
    x = PAD
    for _, label, color in BARS:  # the legend
        d.rectangle((x, 30, x + 12, 42), fill=color)
        d.text((x + 16, 29), label, fill="black", font=f)
        x += 16 + int(d.textlength(label, font=f)) + 14
    group = (width - 2 * PAD) / len(COLUMNS)
    bar = (group - 14) / len(BARS)
    scale = (base - top - 14) / 100.0
    d.line((PAD, base, width - PAD, base), fill=(120, 120, 120))
    for c, (key, label) in enumerate(COLUMNS):
        x0 = PAD + c * group + 7
        for b, (name, _, color) in enumerate(BARS):
            v = rows.get(name, {}).get(key)
            x = x0 + b * bar
            if v is None:  # not measured (the raw LLM's test cache is English only)
                d.text((x + bar / 2, base - 8), "-", fill=(120, 120, 120), font=fs, anchor="ms")
                continue
            d.rectangle((x + 1, base - v * scale, x + bar - 2, base), fill=color)
            d.text((x + bar / 2, base - v * scale - 3), f"{v:.0f}", fill="black", font=fs,
                   anchor="ms")
        d.text((x0 + len(BARS) * bar / 2, base + 18), label, fill="black", font=f, anchor="ms")
    return im

def main():
    path = out or os.path.join(demo, "results.png")
    check_out_file(path, COMMAND, overwrite)
    with open(os.path.join(demo, "results.json")) as fh:
        table = json.load(fh)
    man = Manifest(os.path.join(data, "test.jsonl")).check()
    shown = parse_examples(examples)
    for i, f in shown:
        if not 0 <= i < len(man) or not man[i]["captions"].get(f):
            raise ValueError(f"examples: grid {i} has no {f!r} caption in {man.path}")
    with torch.no_grad():
        captions, res = retrieve(man, shown)
    width = LABEL_W + 5 * THUMB + 4 * 3 * PAD + PAD
    head = Image.new("RGB", (width, 62), "white")
    d = ImageDraw.Draw(head)
    d.text((PAD, 4), f"What each model retrieves (demo, seed {table.get('seed', '?')})",
           fill="black", font=font(17))
    d.multiline_text((PAD, 26), f"The top 5 of the {len(man)} test grids for a caption; green "
                     "frame: the caption's own grid.\nThe base CLIP reads the first 10 tokens "
                     "only, which the English captions here share.", fill=(60, 60, 60),
                     font=font(12), spacing=3)
    parts = [head] + draw_examples(man, shown, captions, res, width) + \
        [draw_bars(table["rows"], width, table.get("seed", "?"))]
    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), "white")
    y = 0
    for p in parts:
        sheet.paste(p, (0, y))
        y += p.height
    sheet.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    record_out_file(path, COMMAND)
    print(f"wrote {path} ({sheet.width}x{sheet.height}, {os.path.getsize(path) // 1024} KB)")
    return res

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    main()
