r"""
img2dataset webdataset shards -> a manifest (dataset.py format) whose images stay inside their shards.

    python data/webdataset/prepare.py --shards=/data/cc3m --out=/data/cc3m/train.jsonl
    python data/webdataset/prepare.py --shards='/data/cc3m/*.tar' --out=/data/cc3m/train.jsonl \
        --long_captions=/data/dreamlip/cc3m_3long_3short_1raw_captions_url.csv

In:  tar shards as img2dataset writes them (`--output_format webdataset`): NNNNN.tar holding, per image,
     KEY.jpg (or .jpeg, .png, .webp), KEY.txt (its alt-text) and KEY.json (metadata: url, key, caption,
     status, width, height, ...), read in place (headers and the small .txt/.json members only; images are
     not decoded: `manifest.Manifest(out).check(decode=True)` does that in parallel if wanted).
     `shards`: a folder (every *.tar in it), a glob, or a comma-separated list; sorted by path.
     `long_captions` (optional): a sidecar of recaptions keyed by image, in one of these formats (what we
     assume; checked against their published descriptions, not against the full files):
       * DreamLIP (HF dataset qidouxiong619/dreamlip_long_captions, cc3m_/cc12m_/yfcc15m_3long_3short_1raw_
         captions_url.csv): CSV with the header "Image Path,raw_caption,shortIB_captions,longIB_captions,
         shortSV_captions,longSV_captions,shortLLA_captions,longLLA_captions"; "Image Path" is the image's
         URL, each caption column one string (InstructBLIP, ShareGPT4V and LLaVA recaptions). -> one field
         per column, named without "_captions": shortIB, longIB, shortSV, longSV, shortLLA, longLLA (the
         official LLM2CLIP run trains on shortSV and longSV: `fields=shortSV,longSV`); raw_caption is the
         alt-text, already "short".
       * ShareGPT4V (share-captioner_coco_lcs_sam_1246k_1107.json, sharegpt4v_instruct_gpt4-vision_
         cap100k.json): a JSON array of {"id", "image": "<path in its own layout>", "conversations":
         [{"from": "human", ...}, {"from": "gpt", "value": caption}]}. -> long: the first gpt turn. Its
         "image" is matched by file name without extension (see below): that matches shards only if their
         keys (or URLs' file names) are those names, which holds for images re-packed from ShareGPT4V's
         own folders, not for a fresh CC3M download.
       * generic JSONL (or a JSON array) of {"key" | "url" | "image": ..., "long": str or [str]}
         ("caption" or "captions" are read as "long" too).
     An entry's key: "key" matches the shard member's key; "url" / "Image Path" the url in KEY.json;
     "image" the file name without extension, against the member key or the URL's file name.
Out: <out>             one line per image, shards in path order and members in tar order:
                         {"image": "<shard, relative to out's folder>/KEY.jpg",
                          "captions": {"short": [alt-text], "long": [...]}}   (DreamLIP: longSV etc.)
                       (manifest.py resolves "<shard>.tar/<member>" through the index of member offsets)
     <out>.skipped.jsonl  every image left out, with its shard, key and why: no image member, no caption
                       at all, no long caption (when a sidecar is given and require_long), or a damaged
                       shard (skip_bad) -- nothing is dropped without a line here and a count on stdout
     <out>.index/      the manifest's index (manifest.Manifest), built at the end: training starts at once
Shards are read in parallel (`workers` processes, a progress bar); each finished shard is kept in
<out>.parts/ (with the settings), so a killed run resumes where it stopped; <out> appears whole at the end.
A truncated or corrupt shard stops the run naming the shard and the last member read (skip_bad=True:
its readable members are kept, the rest counted and listed as skipped).

Memory: the sidecar is spooled once to <out>.parts/sidecar.jsonl (one normalised line per entry) with a
sorted table of 64-bit key hashes and line offsets (16 bytes per entry); each shard looks its keys up in
that table and reads the few matching lines. A JSON-array sidecar is parsed incrementally, so neither
DreamLIP's 23 GB CSV nor ShareGPT4V's 1.2M-entry JSON is ever held in memory.
"""
import csv
import glob
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from manifest import Manifest, scan_tar  # noqa: E402

# -----------------------------------------------------------------------------
shards = ""          # a folder of .tar shards, a glob, or a comma-separated list of files
out = ""             # the manifest to write (its folder holds relative paths to the shards)
long_captions = ""   # optional sidecar of long captions keyed by image (see above)
require_long = True  # with a sidecar: leave out (and list) images it has no long caption (long, long*) for
skip_bad = False     # True: a damaged shard keeps its readable members, the rest listed as skipped
workers = 0          # processes reading shards (0: every core)
index = True         # build the manifest's index at the end
# -----------------------------------------------------------------------------
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")
DREAMLIP_COLUMNS = ("shortIB_captions", "longIB_captions", "shortSV_captions", "longSV_captions", "shortLLA_captions",
                    "longLLA_captions")
csv.field_size_limit(1 << 30)


def h64(s):
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")


def stem(path):
    """'https://x/y/abc.jpg?s=1' or 'coco/train2017/abc.jpg' -> 'abc'."""
    name = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name

# -----------------------------------------------------------------------------
# the sidecar: read in any of the formats, spooled as normalised lines, looked up by key hash

def json_array_items(path):
    """The items of a top-level JSON array, parsed incrementally (never the whole file in memory)."""
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos = f.read(1 << 20).lstrip(), 1
        if not buf.startswith("["):
            raise ValueError(f"{path}: expected a JSON array")
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                item, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = f.read(1 << 20)
                if not more:
                    raise ValueError(f"{path}: the JSON array ends early or is malformed near character {pos}") from None
                buf, pos = buf[pos:] + more, 0
                continue
            yield item
            buf, pos = buf[end:], 0


def sidecar_entries(path):
    """(lookup key, {"long": [...], "short_recap": [...]}) of every entry of a sidecar file."""
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for n, row in enumerate(reader, 2):
                url = row.get("Image Path") or row.get("url")
                if not url:
                    raise ValueError(f"{path}:{n}: no 'Image Path' (or url) column value")
                caps = {c.removesuffix("_captions"): [row[c].strip()] for c in DREAMLIP_COLUMNS if (row.get(c) or "").strip()}
                if (row.get("long") or "").strip():
                    caps["long"] = [row["long"].strip()]
                yield "url:" + url, caps
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        items = enumerate(json_array_items(path))
    else:
        items = ((n, json.loads(line)) for n, line in enumerate(open(path, encoding="utf-8")) if line.strip())
    for n, e in items:
        where = f"{path}: entry {n}" if head.startswith("[") else f"{path}:{n + 1}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object, got {type(e).__name__}")
        if "key" in e:
            key = "key:" + str(e["key"])
        elif "url" in e:
            key = "url:" + str(e["url"])
        elif "image" in e:
            key = "stem:" + stem(str(e["image"]))
        else:
            raise ValueError(f"{where}: no 'key', 'url' or 'image' to match it with an image")
        long = e.get("long", e.get("caption", e.get("captions")))
        if long is None and isinstance(e.get("conversations"), list):  # ShareGPT4V
            long = next((t.get("value") for t in e["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"), None)
        if isinstance(long, str):
            long = [long]
        if not isinstance(long, list) or not all(isinstance(t, str) for t in long):
            raise ValueError(f"{where}: no long caption (a 'long' string or list, or a ShareGPT4V gpt turn)")
        long = [t.strip() for t in long if t.strip()]
        yield key, {"long": long}


def spool_sidecar(path, folder):
    """Write sidecar.jsonl (one {"k", "c"} line per entry) and sidecar.npy (sorted [hash, offset] rows)."""
    spool, table = os.path.join(folder, "sidecar.jsonl"), os.path.join(folder, "sidecar.npy")
    if os.path.isfile(table):
        return
    hashes, offsets, at = [], [], 0
    with open(spool + ".tmp", "w", encoding="utf-8") as f:
        for key, caps in tqdm(sidecar_entries(path), desc=f"reading {os.path.basename(path)}", unit=" entries"):
            line = json.dumps({"k": key, "c": caps}, ensure_ascii=False) + "\n"
            hashes.append(h64(key))
            offsets.append(at)
            f.write(line)
            at += len(line.encode("utf-8"))
    rows = np.array([hashes, offsets], dtype=np.uint64).T.copy() if hashes else np.zeros((0, 2), np.uint64)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    os.replace(spool + ".tmp", spool)
    np.save(table + ".tmp.npy", rows)
    os.replace(table + ".tmp.npy", table)


class Sidecar:
    def __init__(self, folder):
        self.rows = np.load(os.path.join(folder, "sidecar.npy"), mmap_mode="r")
        self.path, self.fd = os.path.join(folder, "sidecar.jsonl"), None

    def get(self, keys):
        """The captions of the first of `keys` the sidecar has, else None."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        for key in keys:
            h = np.uint64(h64(key))
            i = int(np.searchsorted(self.rows[:, 0], h))
            while i < len(self.rows) and self.rows[i, 0] == h:
                off = int(self.rows[i, 1])
                line = b""
                while not line.endswith(b"\n"):
                    more = os.pread(self.fd, 1 << 16, off + len(line))
                    if not more:
                        break
                    line += more
                    if b"\n" in line:
                        line = line[:line.index(b"\n") + 1]
                e = json.loads(line)
                if e["k"] == key:
                    return e["c"]
                i += 1
        return None

# -----------------------------------------------------------------------------
# one shard -> its manifest lines

def read_shard(task):
    """(manifest lines, skipped records, counts) of one shard."""
    shard, rel, folder, use_sidecar, need_long, tolerate = task
    members, why = scan_tar(shard)
    if why and not tolerate:
        last = next(reversed(members), None) if members else None
        raise ValueError(f"{shard}: {why}" + (f" (last good member {last})" if last else " (no readable member)") +
                         "; re-download it, or pass --skip_bad=True to keep its readable members")
    side = Sidecar(folder) if use_sidecar else None
    keys = {}
    for name in members:  # group KEY.jpg, KEY.txt, KEY.json by key, in tar order
        key, dot, ext = name.rpartition(".")
        if dot:
            keys.setdefault(key, {})[ext.lower()] = name
    lines, skipped = [], []
    counts = dict(images=0, no_image=0, no_caption=0, no_long=0)
    with open(shard, "rb") as f:
        def read(name):
            off, size = members[name]
            f.seek(off)
            return f.read(size).decode("utf-8", errors="replace")
        for key, files in keys.items():
            img = next((files[e[1:]] for e in IMAGE_EXT if e[1:] in files), None)
            if img is None:
                counts["no_image"] += 1
                skipped.append({"shard": rel, "key": key, "why": f"no image member (has {sorted(files.values())})"})
                continue
            meta = {}
            if "json" in files:
                try:
                    meta = json.loads(read(files["json"]))
                except ValueError:
                    meta = {}
            short = (read(files["txt"]) if "txt" in files else "") or str(meta.get("caption") or "")
            short = " ".join(short.split())
            caps = {"short": [short]} if short else {}
            if side is not None:
                url = str(meta.get("url") or "")
                found = side.get(["key:" + key] + (["url:" + url, "stem:" + stem(url)] if url else []) + ["stem:" + key])
                if found:
                    caps.update({k: v for k, v in found.items() if v})
            if not caps:
                counts["no_caption"] += 1
                skipped.append({"shard": rel, "key": key, "why": "no caption (empty or missing .txt, no caption in .json)"})
                continue
            if need_long and not any(k.startswith("long") for k in caps):
                counts["no_long"] += 1
                skipped.append({"shard": rel, "key": key, "why": "no long caption in the sidecar"})
                continue
            lines.append(json.dumps({"image": f"{rel}/{img}", "captions": caps}, ensure_ascii=False))
            counts["images"] += 1
    if why:
        skipped.append({"shard": rel, "key": None, "why": f"damaged shard: {why}; members after the damage are lost"})
        counts["damaged_shards"] = 1
    return lines, skipped, counts


def list_shards(spec):
    if os.path.isdir(spec):
        found = glob.glob(os.path.join(spec, "*.tar"))
    else:
        found = [p for part in spec.split(",") if part for p in (glob.glob(part) or [part])]
    missing = [p for p in found if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shards: {missing[0]} is not a file ({len(missing)} such)")
    if not found:
        raise FileNotFoundError(f"shards={spec!r}: no .tar files there")
    return sorted(os.path.abspath(p) for p in found)


def main():
    if not shards or not out:
        sys.exit("usage: python data/webdataset/prepare.py --shards=<folder, glob or list> --out=<manifest.jsonl> "
                 "[--long_captions=<sidecar>]")
    t0 = time.time()
    files = list_shards(shards)
    out_path = os.path.abspath(out)
    root = os.path.dirname(out_path)
    parts = out_path + ".parts"
    settings = dict(shards=files, long_captions=os.path.abspath(long_captions) if long_captions else "",
                    require_long=require_long, skip_bad=skip_bad)
    if os.path.isfile(out_path) and not os.path.isdir(parts):
        print(f"{out_path} exists; nothing to do (delete it to prepare again)")
        return
    sp = os.path.join(parts, "settings.json")
    if os.path.isfile(sp) and json.load(open(sp)) != settings:
        if any(n.endswith(".json") and n[:6].isdigit() for n in os.listdir(parts)):
            sys.exit(f"{parts} holds finished shards of a run with other settings; delete it (or pass the same "
                     f"settings to resume)")
        shutil.rmtree(parts)  # nothing finished under the old settings: start over
    os.makedirs(parts, exist_ok=True)
    with open(sp, "w") as f:
        json.dump(settings, f)
    if long_captions:
        spool_sidecar(long_captions, parts)
    todo = [(i, s) for i, s in enumerate(files) if not os.path.isfile(os.path.join(parts, f"{i:06d}.json"))]
    tasks = [(s, os.path.relpath(s, root), parts, bool(long_captions), bool(long_captions) and require_long, skip_bad)
             for _, s in todo]
    n_proc = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    pool = mp.get_context("fork").Pool(n_proc) if n_proc > 1 else None
    try:
        results = pool.imap(read_shard, tasks) if pool else map(read_shard, tasks)
        for (i, s), (lines, skipped, counts) in tqdm(zip(todo, results), total=len(todo), desc="shards", unit="shard",
                                                     initial=len(files) - len(todo)):
            part = os.path.join(parts, f"{i:06d}.json")
            with open(part + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"lines": lines, "skipped": skipped, "counts": counts}, f, ensure_ascii=False)
            os.replace(part + ".tmp", part)  # this shard is done: a rerun after a kill skips it
    finally:
        if pool:
            pool.close()
            pool.join()
    total = {}
    with open(out_path + ".tmp", "w", encoding="utf-8") as f, open(out_path + ".skipped.jsonl", "w", encoding="utf-8") as g:
        for i in range(len(files)):
            with open(os.path.join(parts, f"{i:06d}.json"), encoding="utf-8") as p:
                part = json.load(p)
            f.writelines(line + "\n" for line in part["lines"])
            g.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in part["skipped"])
            for k, v in part["counts"].items():
                total[k] = total.get(k, 0) + v
    os.replace(out_path + ".tmp", out_path)
    shutil.rmtree(parts)
    left = {k: v for k, v in total.items() if k != "images" and v}
    print(f"wrote {out_path}: {total.get('images', 0)} images from {len(files)} shards in {time.time() - t0:.1f}s" +
          (f"; left out ({out_path}.skipped.jsonl): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in left.items())
           if left else ""))
    if index:
        Manifest(out_path).check()  # index (member offsets included) and check now, not at the first training run

if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    from configurator import configure
    configure(globals())
    main()
