"""
Text-to-image search over your own images with any model this project can evaluate
(encoder.load_encoder: a stage-2 folder of either method, or an HF CLIP folder). The images are
embedded once into an index folder; then each query is one text (or image) embedding and a scan.

    python search.py --model=out/demo/llm2clip/model --images=data/fashion/out/images/test \
        --index=out/index/test --query="Top left: a red dress; bottom right: a bag." --out=hits.png
    python search.py --model=out/demo/llm2clip/model --index=out/index/test --queries=q.txt --k=10
    python search.py --model=out/demo/llm2clip/model --index=out/index/test \
        --query_image=data/fashion/out/images/test/00007.png --out=hits.html

In:  model        a stage-2 folder (its LLM as text.json says, or --llm) or an HF CLIP folder
     images       a folder, searched recursively for EXTENSIONS, or a manifest .jsonl (its images,
                  in its order); "" = an index made before
     query        one text; queries: a file of texts, one per line; query_image: an image file
Out: the top k paths and cosine scores per query on stdout; `out` (optional): a contact sheet of
     each query and its k thumbnails with scores, a .png (Pillow) or a small .html page.

The index folder (`index`):
  meta.json       what made it (the model's path and fingerprint, train_common.model_fingerprint;
                  the images' source), the count N and width D, the rows done, the images skipped,
                  and the bytes/dtype/shape of each file (filecheck.py), checked on every open
  paths.jsonl     N lines, each the JSON string of an image's path relative to meta.json's "root"
  embeddings.npy  (N, D) float16, L2-normalised rows, preallocated, written through a memory map
It is made in chunks of `chunk` images: a chunk's rows are written and flushed, then meta.json's
"done" advances (swapped in whole), so a kill loses one chunk at most and the same command
resumes. Refused, before any work: an index made by another model or from another list of
images, a file that differs from its record, a folder that is not an index, an output file that
search.py did not write (filecheck.check_out_file; overwrite=True allows it).

Search reads `block` rows at a time (fp16 -> fp32, one matmul with the queries, torch.topk) and
merges each block's top k into the running top k: memory is O(block x D), flat in the index size.
"""

import html
import json
import os
import pathlib
import sys
import time
import urllib.parse

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from encoder import default_device, load_encoder, load_pixels, model_kind
from filecheck import check_out_dir, check_out_file, npy_layout, npy_record, record_out_file
from filecheck import record_files, verify_files
from train_common import model_fingerprint, write_json

# -----------------------------------------------------------------------------
model = ""                 # a stage-2 folder or an HF CLIP folder
llm = ""                   # stage 2: the LLM folder, if not where text.json says
images = ""                # a folder (recursive) or a manifest .jsonl; "" = use the index as made
index = ""                 # the index folder: made, resumed or read
query = ""                 # a text query
queries = ""               # a file of text queries, one per line
query_image = ""           # an image file: image-to-image search
k = 5                      # hits per query
out = ""                   # a contact sheet: <file>.png or <file>.html ("" = none)
skip_bad = False           # unreadable images: skipped, counted and named (else the first stops it)
batch_size = 64            # images (or texts) per forward
num_workers = 0            # DataLoader processes decoding images (0 = in this process)
chunk = 4096               # images per resumable unit of the index
block = 65536              # index rows per step of the scan
thumb = 96                 # contact-sheet thumbnail side, pixels
device = default_device()
dtype = ""                 # the LLM's compute dtype ("" = encoder's default: as it was trained)
overwrite = False          # replace an `out` file or write into an `index` folder not ours
# -----------------------------------------------------------------------------

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KIND, VERSION = "search index", 1  # meta.json's "kind" and "version"
OWNS = ["meta.json", "paths.jsonl", "embeddings.npy"]

# -----------------------------------------------------------------------------
# the images: a folder or a manifest

def list_images(source):
    """(kind, root, relative paths): a folder's image files (recursive, sorted), or a manifest's
    images in its order (relative to its folder, as its records name them)."""
    if source.endswith(".jsonl"):
        from manifest import Manifest
        man = Manifest(source).check(images="ignore")
        if not len(man):
            raise ValueError(f"images={source!r}: the manifest has no records")
        return "manifest", os.path.dirname(os.path.abspath(source)), \
            [man[i]["image"] for i in range(len(man))]
    if not os.path.isdir(source):
        raise ValueError(f"images={source!r}: not a folder or a manifest (.jsonl)")
    root, found = os.path.abspath(source), []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        found += [os.path.relpath(os.path.join(d, f), root) for f in files
                  if f.lower().endswith(EXTENSIONS)]
    if not found:
        raise ValueError(f"images={source!r}: no image files ({' '.join(EXTENSIONS)}) in it or "
                         f"below")
    return "folder", root, sorted(found)

class Decoded(torch.utils.data.Dataset):
    """Image i of the list as the tower's pixels: (pixels, i, "") or (zeros, i, why unreadable)."""

    def __init__(self, root, paths, preprocess):
        self.root, self.paths, self.preprocess = root, paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return load_pixels(os.path.join(self.root, self.paths[i]), self.preprocess), i, ""
        except ValueError as e:
            side = self.preprocess.crop_size
            return torch.zeros(3, side, side), i, str(e)

# -----------------------------------------------------------------------------
# the index: made in chunks, resumed, checked

def read_meta(folder):
    """The index's meta.json, or None if the folder has none; a meta.json of something else:
    ValueError."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: does not parse ({e}); delete {folder} and index again") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ValueError(f"index={folder!r}: {path} is not a search index's (no \"kind\": "
                         f"\"{KIND}\"); choose another index folder")
    return meta

def check_index(folder, meta, fingerprint, source=None, paths=None):
    """Refuse an index another model made, one from another list of images, or damaged files."""
    if meta["model_sha256"] != fingerprint:
        raise ValueError(f"index={folder!r}: made by another model ({meta['model']}, fingerprint "
                         f"{meta['model_sha256'][:12]}); this model's is {fingerprint[:12]}: use "
                         f"that model, or another index folder")
    verify_files(folder, meta["files"], fix=f"delete {folder} and index again")
    if source is None:
        return
    old = read_paths(folder)
    if os.path.abspath(source) != meta["source"] or old != paths:
        diff = next((f"{a!r} then, {b!r} now" for a, b in zip(old, paths) if a != b),
                    f"{len(old)} images then, {len(paths)} now")
        raise ValueError(f"index={folder!r}: made from {meta['source']} ({len(old)} images); "
                         f"images={source!r} lists others ({diff}): use another index folder "
                         f"(or leave out --images to search this one as it is)")

def read_paths(folder):
    with open(os.path.join(folder, "paths.jsonl")) as f:
        return [json.loads(line) for line in f]

def new_index(folder, enc, fingerprint, source, kind, root, paths):
    """paths.jsonl, a preallocated embeddings.npy and meta.json (done 0) in `folder`."""
    check_out_dir(folder, "search.py", OWNS, overwrite)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "paths.jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in paths)
    os.replace(tmp, os.path.join(folder, "paths.jsonl"))
    rows = os.path.join(folder, "embeddings.npy")
    tmp = rows + ".tmp.npy"  # a sparse file: blocks are allocated as rows are written
    np.lib.format.open_memmap(tmp, "w+", np.float16, (len(paths), enc.dim)).flush()
    os.replace(tmp, rows)
    meta = {"kind": KIND, "version": VERSION, "model": os.path.abspath(enc.path),
            "model_sha256": fingerprint, "source": os.path.abspath(source), "source_kind": kind,
            "root": root, "count": len(paths), "dim": enc.dim, "done": 0, "skipped": {},
            "files": {**record_files(folder, ["paths.jsonl"], digest=True),
                      "embeddings.npy": npy_record("float16", (len(paths), enc.dim))}}
    write_json(os.path.join(folder, "meta.json"), meta)
    return meta

def write_rows(path, start, rows):
    """rows (n, D) float16 into rows start.. of the .npy at path, through a map of those rows."""
    _, _, offset = npy_layout(path)
    m = np.memmap(path, np.float16, "r+", offset + start * rows.shape[1] * 2, rows.shape)
    m[:] = rows
    m.flush()
    del m

def fill_index(folder, meta, enc):
    """Embed the rows from meta["done"] on, a chunk at a time; returns the updated meta."""
    paths, n = read_paths(folder), meta["count"]
    ds = Decoded(meta["root"], paths, enc.preprocess)
    bar = tqdm(total=n, initial=meta["done"], desc="indexing", unit="img", smoothing=0.1)
    while meta["done"] < n:
        start, stop = meta["done"], min(meta["done"] + chunk, n)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(start, stop)),
                                             batch_size=batch_size, num_workers=num_workers)
        rows, skipped = np.zeros((stop - start, meta["dim"]), np.float16), {}
        for pixels, idx, why in loader:
            for i, w in zip(idx.tolist(), why):
                if w and not skip_bad:
                    raise ValueError(f"{w}; pass --skip_bad=True to skip unreadable images "
                                     f"(counted, and named in {folder}/meta.json); the "
                                     f"{start} rows done are kept")
                if w:
                    skipped[str(i)] = w
            e = enc.encode_pixels(pixels).numpy().astype(np.float16)
            rows[idx.numpy() - start] = e
            bar.update(len(idx))
        for i in skipped:  # an unreadable image's row stays zero and is never a hit
            rows[int(i) - start] = 0
        write_rows(os.path.join(folder, "embeddings.npy"), start, rows)
        meta = {**meta, "done": stop, "skipped": {**meta["skipped"], **skipped}}
        write_json(os.path.join(folder, "meta.json"), meta)  # after the rows: a kill redoes them
    bar.close()
    if meta["skipped"]:
        shown = "; ".join(list(meta["skipped"].values())[:3])
        print(f"skipped {len(meta['skipped'])} unreadable image(s) of {n} ({shown}"
              f"{' ...' if len(meta['skipped']) > 3 else ''}); all listed in {folder}/meta.json",
              file=sys.stderr)
    return meta

def open_index(enc, folder, source=""):
    """The index of `folder` for this model: made from `source` if new, resumed if unfinished,
    checked either way. Returns its meta.json."""
    fp = model_fingerprint(enc.path)
    meta = read_meta(folder)
    if meta is None:
        if not source:
            raise ValueError(f"index={folder!r}: no index there; pass --images=<folder or "
                             f"manifest .jsonl> to make one")
        kind, root, paths = list_images(source)
        meta = new_index(folder, enc, fp, source, kind, root, paths)
    else:
        paths = list_images(source)[2] if source else None
        check_index(folder, meta, fp, source or None, paths)
    if meta["done"] < meta["count"]:
        meta = fill_index(folder, meta, enc)
    return meta

# -----------------------------------------------------------------------------
# the scan: blocks of rows, a running top k

def top_k(rows_path, q, k, block, skipped=()):
    """(scores (Q, k'), rows (Q, k')) of the k best index rows for each query q (Q, D) float32,
    best first, k' = min(k, readable rows). Reads `block` rows at a time into buffers made once
    (fp16 as read, fp32 to multiply, the scores): no map of the whole file and no allocation per
    block, so resident memory stays O(block x (D + Q)) however large the index."""
    shape, _, offset = npy_layout(rows_path)
    n, d = shape
    bad = torch.as_tensor(sorted(int(i) for i in skipped), dtype=torch.long)
    best_s, best_i = q.new_empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
    rows = min(block, n)
    raw, x32 = torch.empty(rows, d, dtype=torch.float16), torch.empty(rows, d)
    scores = torch.empty(q.shape[0] * rows)
    into = memoryview(raw.numpy()).cast("B")
    with open(rows_path, "rb") as f:
        f.seek(offset)
        for s in range(0, n, block):
            b = min(block, n - s)
            if f.readinto(into[:b * d * 2]) != b * d * 2:
                raise ValueError(f"{rows_path}: ends before row {s + b} of {n}")
            sim = scores[:q.shape[0] * b].view(q.shape[0], b)  # (Q, b)
            torch.mm(q, x32[:b].copy_(raw[:b]).T, out=sim)  # fp16 rows -> fp32
            here = bad[(bad >= s) & (bad < s + b)] - s
            sim[:, here] = float("-inf")
            ts, ti = sim.topk(min(k, b), dim=1)
            best_s, j = torch.cat([best_s, ts], 1).topk(min(k, best_s.shape[1] + ti.shape[1]), 1)
            best_i = torch.cat([best_i, ti + s], 1).gather(1, j)
    keep = min(k, n - len(bad))
    return best_s[:, :keep], best_i[:, :keep]

# -----------------------------------------------------------------------------
# the contact sheet

def font(size):
    """DejaVu Sans where the system has it (Pillow's built-in font draws ASCII only: no umlauts),
    else Pillow's default at that size, else its bitmap font (Pillow without FreeType)."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()

def wrap(draw, text, fnt, width):
    """text's lines, broken at spaces to fit `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        cand = f"{line} {word}".strip()
        if line and draw.textlength(cand, font=fnt) > width:
            lines.append(line)
            line = word
        else:
            line = cand
    return lines + [line] if line else lines

def open_thumb(path, side):
    """The image at `path` fitted into side x side (a grey square if it does not read)."""
    try:
        with Image.open(path) as img:
            from images import to_rgb
            img = to_rgb(img).copy()
        img.thumbnail((side, side), Image.Resampling.BICUBIC if min(img.size) > side
                      else Image.Resampling.NEAREST)
        if max(img.size) < side:  # tiny images (the demo's 64 px grids): scaled up, blocky
            r = side / max(img.size)
            img = img.resize((round(img.width * r), round(img.height * r)),
                             Image.Resampling.NEAREST)
        return img
    except Exception:
        return Image.new("RGB", (side, side), (200, 200, 200))

def sheet_png(path, results, side):
    """One row per query: its text (or image), then its hits with rank and score."""
    fnt, pad, label_w = font(13), 8, 2 * side
    kmax = max(len(hits) for _, _, hits in results)
    row_h = side + 24
    im = Image.new("RGB", (pad + label_w + pad + kmax * (side + pad), pad + len(results) * row_h),
                   "white")
    draw = ImageDraw.Draw(im)
    for r, (q, qimg, hits) in enumerate(results):
        y = pad + r * row_h
        if qimg:
            im.paste(open_thumb(qimg, side), (pad, y))
            draw.text((pad, y + side + 4), "query image", fill="black", font=fnt)
        else:
            lines = wrap(draw, q, fnt, label_w)
            draw.multiline_text((pad, y), "\n".join(lines[:side // 15]), fill="black", font=fnt)
        for j, (score, p) in enumerate(hits):
            x = pad + label_w + pad + j * (side + pad)
            t = open_thumb(p, side)
            im.paste(t, (x + (side - t.width) // 2, y + (side - t.height) // 2))
            draw.text((x, y + side + 4), f"{j + 1}. {score:.3f}", fill="black", font=fnt)
    im.save(path)

def sheet_html(path, results):
    """A small HTML page: a table row per query, the hits as images (addresses relative to the
    page for images below its folder, else file:// ones), every text escaped."""
    here = os.path.dirname(os.path.abspath(path))
    def src(p):  # below the page: a relative address; elsewhere a file:// one
        rel = os.path.relpath(p, here)
        url = (pathlib.Path(os.path.abspath(p)).as_uri() if rel.startswith("..")
               else urllib.parse.quote(rel.replace(os.sep, "/")))
        return html.escape(url, quote=True)
    rows = []
    for q, qimg, hits in results:
        head = (f'<img src="{src(qimg)}" width="{thumb}"><br>query image' if qimg
                else html.escape(q))
        cells = "".join(f'<td><img src="{src(p)}" width="{thumb}" title="{html.escape(p)}"><br>'
                        f'{j + 1}. {s:.3f}</td>' for j, (s, p) in enumerate(hits))
        rows.append(f"<tr><td class=q>{head}</td>{cells}</tr>")
    page = ('<!doctype html>\n<html><head><meta charset="utf-8"><meta name="generator" '
            'content="search.py"><title>search</title><style>td{vertical-align:top;'
            'font:13px sans-serif;padding:4px}td.q{max-width:260px}img{image-rendering:'
            'pixelated}</style></head><body><table>\n' + "\n".join(rows) +
            "\n</table></body></html>\n")
    with open(path, "w") as f:
        f.write(page)

# -----------------------------------------------------------------------------

def read_queries():
    texts = [query] if query else []
    if queries:
        with open(queries) as f:
            texts += [line.strip() for line in f if line.strip()]
    return texts

def main(config):
    from configurator import check
    check(config, positive=("k", "batch_size", "chunk", "block", "thumb"),
          nonnegative=("num_workers",), files=("out",) if out else (),
          rules=[(model != "", "model='': name a stage-2 folder or an HF CLIP folder"),
                 (index != "", "index='': name the index folder (made if new)"),
                 (not out or out.endswith((".png", ".html")),
                  f"out={out!r}: a contact sheet is a .png or an .html file"),
                 (not queries or os.path.isfile(queries), f"queries={queries!r}: no such file"),
                 (not query_image or os.path.isfile(query_image),
                  f"query_image={query_image!r}: no such file")])
    if out:
        check_out_file(out, "search.py", overwrite)
    model_kind(model)  # a folder of another kind: refused before anything loads
    texts = read_queries()
    enc = load_encoder(model, llm or None, device, dtype or None, batch_size, num_workers)
    t0 = time.time()
    meta = open_index(enc, index, images)
    if not texts and not query_image:
        print(f"index {index}: {meta['count']} images, {meta['dim']}-wide ({time.time() - t0:.1f}s)"
              f"; nothing to search (--query, --queries or --query_image)")
        return meta
    t1 = time.time()
    q = [enc.encode_texts(texts)] if texts else []
    if query_image:
        q.append(enc.encode_images([query_image]))
    q = torch.cat(q).cpu()
    t2 = time.time()
    scores, rows = top_k(os.path.join(index, "embeddings.npy"), q, k, block, meta["skipped"])
    t3 = time.time()
    paths = read_paths(index)
    results = [(t, None, []) for t in texts] + ([("", query_image, [])] if query_image else [])
    for (t, qi, hits), s, r in zip(results, scores.tolist(), rows.tolist()):
        hits += [(sc, os.path.join(meta["root"], paths[i])) for sc, i in zip(s, r)]
        print(f"\n{'image ' + qi if qi else repr(t)}")
        for j, (sc, p) in enumerate(hits):
            print(f"  {j + 1:>3}  {sc:.4f}  {p}")
    n = len(results)
    print(f"\n{n} quer{'y' if n == 1 else 'ies'} over {meta['count']} images: "
          f"embedding {1000 * (t2 - t1):.0f} ms, search {1000 * (t3 - t2):.0f} ms")
    if out:
        (sheet_png(out, results, thumb) if out.endswith(".png") else sheet_html(out, results))
        record_out_file(out, "search.py")
        print(f"wrote {out}")
    return results

if __name__ == "__main__":
    from configurator import configure
    try:
        main(configure(globals()))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"search.py: {e}")
