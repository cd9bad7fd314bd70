r"""
img2dataset webdataset shards -> a manifest (manifest.py format) whose images stay inside their shards.

    python data/webdataset/prepare.py --shards=/data/cc3m --out=/data/train_cc3m.jsonl
    python data/webdataset/prepare.py --shards=/data/cc3m,/data/cc12m --out=/data/train.jsonl \
        --long_captions=/data/dreamlip/cc3m_3long_3short_1raw_captions_url.csv,/data/dreamlip/cc12m_3long_3short_1raw_captions_url.csv

In:  tar shards as img2dataset writes them (`--output_format webdataset`): NNNNN.tar holding, per image,
     KEY.jpg (or .jpeg, .png, .webp), KEY.txt (the caption column, if one was given) and KEY.json (url,
     key, status, width, height, caption, and every `--save_additional_columns` column), read in place
     (headers and the small .txt/.json members only; images are not decoded: `manifest.Manifest(out)
     .check(decode=True)` does that in parallel if wanted). The .parquet and _stats.json files beside
     the shards are not read. `shards`: comma-separated folders, globs or files; sorted by path.
     The recaptions are read from wherever the download holds them:
       * KEY.json columns: LLM2CLIP's download recipe runs img2dataset over DreamLIP's CSV (as parquet)
         with `--url_col "Image Path" --save_additional_columns '["raw_caption", "shortIB_captions",
         ..., "longLLA_captions"]'`, so each member's KEY.json holds all seven captions;
       * `long_captions`: one sidecar per source (comma-separated), in one of these formats (what we
         assume; checked against their published descriptions, not against the full files):
         - DreamLIP (HF dataset qidouxiong619/dreamlip_long_captions, cc3m_/cc12m_/yfcc15m_3long_3short_
           1raw_captions_url.csv): CSV with the header "Image Path,raw_caption,shortIB_captions,
           longIB_captions,shortSV_captions,longSV_captions,shortLLA_captions,longLLA_captions"; "Image
           Path" is the image's URL, each caption column one string (InstructBLIP, ShareGPT4V and LLaVA
           recaptions). It lists every image of the source, downloaded or not.
         - ShareGPT4V (share-captioner_coco_lcs_sam_1246k_1107.json, ...): a JSON array of {"id",
           "image": "<path in its own layout>", "conversations": [{"from": "human", ...}, {"from":
           "gpt", "value": caption}]} -> long: the first gpt turn. Its "image" is matched by file name
           without extension: that matches shards whose keys (or URLs' file names) are those names.
         - generic JSONL (or a JSON array) of {"key" | "url" | "image": ..., "long": str or [str]}
           ("caption" or "captions" are read as "long" too).
         An entry's key: "key" matches the shard member's key; "url" / "Image Path" the url in
         KEY.json; "image" the file name without extension, against the member key or the URL's file
         name. A sidecar entry wins over the KEY.json columns of the same image.
Out: <out>   one line per image, shards in path order and members in tar order:
               {"image": "<shard, relative to out's folder>/KEY.jpg",
                "captions": {"short": [...], "long": [...], "raw": [alt-text]}}
             short/long: the `recaptions` pair (shortSV/longSV by default; LLM2CLIP trains on these);
             short falls back to the alt-text where the image has no short recaption (the generic and
             ShareGPT4V sidecars give long captions only), and the summary counts how many did;
             keep_all adds the other recaptions under DreamLIP's names (shortIB, ..., longLLA).
             (manifest.py resolves "<shard>.tar/<member>" through the index of member offsets)
     <out>.skipped.jsonl  every image left out, with its shard, key and why: no image member, no caption
             at all, no long caption (require_long), a KEY.json that does not parse or a damaged shard
             (skip_bad) -- nothing is dropped without a line here and a count
     <out>.prepare.json  the settings and the counts: images, where each field came from, skips,
             sidecar entries read, matched and duplicated; a rerun with the same settings does nothing,
             with others it is refused (this file is how prepare.py knows <out> is its own)
     <out>.index/  the manifest's index (manifest.Manifest), built at the end: training starts at once
A sidecar's malformed row stops the run naming the file and line: a missing or extra column, a byte
that is not UTF-8, a line that is not JSON or not an object, no key. A key listed twice: the first
entry wins; the duplicates are counted and the first few named.
Shards are read in parallel (`workers` processes, a progress bar); each finished shard is kept in
<out>.parts/ (with the settings), so a killed run resumes where it stopped; <out> appears whole at the end.
A truncated or corrupt shard stops the run naming the shard and the last member read (skip_bad=True:
its readable members are kept, the rest counted and listed as skipped).

Memory: the sidecars are spooled once to <out>.parts/sidecar.jsonl (one normalised line per entry) with
a sorted table of 64-bit key hashes and line offsets (16 bytes per entry); each shard looks its keys up
in that table and reads the few matching lines. A JSON-array sidecar is parsed incrementally, so neither
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
from array import array
from pathlib import Path

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from manifest import Manifest, scan_tar  # noqa: E402

# -----------------------------------------------------------------------------
shards = ""          # comma-separated folders (every *.tar in each), globs or .tar files
out = ""             # the manifest to write (its folder holds relative paths to the shards)
long_captions = ""   # comma-separated sidecars of recaptions keyed by image, e.g. one DreamLIP CSV per
                     # source (see above); "" = only what the shards' KEY.json hold
recaptions = "SV"    # which DreamLIP captioner's pair becomes "short" and "long": IB, SV (ShareGPT4V,
                     # what LLM2CLIP trains on) or LLA
keep_all = False     # True: also keep the other DreamLIP recaptions (shortIB, longLLA, ...) as fields
require_long = True  # leave out (and list) images with no long caption; False keeps alt-text-only images
skip_bad = False     # True: a damaged shard (or a member's KEY.json that does not parse) keeps its
                     # readable members, the rest listed as skipped and counted
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


def _utf8(text, where):
    """text read with errors="surrogateescape": refuse a byte that was not UTF-8, naming where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"{where}: byte {bad!r} is not UTF-8 (save the file as UTF-8)") from None
    return text


def _captions(text):
    """A caption column's value (a string, or a list of strings) -> its non-empty captions."""
    items = text if isinstance(text, list) else [text]
    return [t.strip() for t in items if isinstance(t, str) and t.strip()]


def csv_entries(path):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty (a CSV with a header line was expected)")
        url_col = next((c for c in ("Image Path", "url") if c in header), None)
        if url_col is None:
            raise ValueError(f"{path}:1: no 'Image Path' (or 'url') column in the header {header}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise ValueError(f"{where}: {len(row)} fields, the header has {len(header)} "
                                 f"(a missing or extra column, or a ragged row)")
            rec = dict(zip(header, (_utf8(v, where) for v in row)))
            if not rec[url_col].strip():
                raise ValueError(f"{where}: no '{url_col}' value")
            caps = {c.removesuffix("_captions"): _captions(rec[c]) for c in DREAMLIP_COLUMNS
                    if c in rec}
            if "long" in rec:
                caps["long"] = _captions(rec["long"])
            yield "url:" + rec[url_col].strip(), {k: v for k, v in caps.items() if v}


def json_entries(path):
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        array = f.read(4096).lstrip().startswith("[")
    if array:
        items = ((f"{path}: entry {n}", e) for n, e in enumerate(json_array_items(path)))
    else:
        def lines():
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                for n, line in enumerate(f, 1):
                    where = f"{path}:{n}"
                    if not line.strip():
                        continue
                    try:
                        yield where, json.loads(_utf8(line, where))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        items = lines()
    for where, e in items:
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
            long = next((t.get("value") for t in e["conversations"]
                         if isinstance(t, dict) and t.get("from") == "gpt"), None)
        if isinstance(long, str):
            long = [long]
        if not isinstance(long, list) or not all(isinstance(t, str) for t in long):
            raise ValueError(f"{where}: no long caption (a 'long' string or list, or a ShareGPT4V "
                             f"gpt turn)")
        yield key, {"long": [t.strip() for t in long if t.strip()]}


def sidecar_entries(path):
    """(lookup key, {field: [captions]}) of every entry of a sidecar file, in file order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"long_captions: {path} is not a file")
    return csv_entries(path) if path.endswith(".csv") else json_entries(path)


def spool_sidecar(paths, folder):
    """Write sidecar.jsonl (one {"k", "c"} line per entry of every file in `paths`) and sidecar.npy
    ([hash, offset] rows sorted by hash, file order kept among equal hashes: the first entry of a key
    wins). Returns the counts: entries, duplicates (the first few named)."""
    spool, table = os.path.join(folder, "sidecar.jsonl"), os.path.join(folder, "sidecar.npy")
    stats_path = os.path.join(folder, "sidecar.json")
    if os.path.isfile(table) and os.path.isfile(stats_path):
        with open(stats_path) as f:
            return json.load(f)
    hashes, offsets, at = array("Q"), array("Q"), 0  # 16 bytes an entry, not Python ints
    with open(spool + ".tmp", "w", encoding="utf-8") as f:
        for path in paths:
            for key, caps in tqdm(sidecar_entries(path), desc=f"reading {os.path.basename(path)}",
                                  unit=" entries"):
                line = json.dumps({"k": key, "c": caps}, ensure_ascii=False) + "\n"
                hashes.append(h64(key))
                offsets.append(at)
                f.write(line)
                at += len(line.encode("utf-8"))
    rows = np.stack([np.frombuffer(hashes, np.uint64), np.frombuffer(offsets, np.uint64)], axis=1)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    dup = np.flatnonzero(rows[1:, 0] == rows[:-1, 0]) + 1 if len(rows) else np.zeros(0, np.int64)
    named = []
    with open(spool + ".tmp", "rb") as f:
        for i in dup[:5]:
            f.seek(int(rows[i, 1]))
            named.append(json.loads(f.readline())["k"])
    stats = dict(entries=len(hashes), duplicates=len(dup), first_duplicates=named)
    os.replace(spool + ".tmp", spool)
    np.save(table + ".tmp.npy", rows)
    os.replace(table + ".tmp.npy", table)
    with open(stats_path, "w") as f:
        json.dump(stats, f)
    return stats


class Sidecar:
    def __init__(self, folder):
        self.rows = np.load(os.path.join(folder, "sidecar.npy"), mmap_mode="r")
        self.path, self.fd = os.path.join(folder, "sidecar.jsonl"), None

    def get(self, keys):
        """The captions of the first of `keys` the sidecar has (its first entry), else None."""
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

def record_captions(alt, found, pair, keep_all):
    """The manifest's captions of one image from its alt-text and the recaptions found (sidecar or
    KEY.json, {field: [captions]}), and where short came from ("recaption", "alt-text" or None)."""
    caps, short = {}, None
    if found.get(f"short{pair}"):
        caps["short"], short = found[f"short{pair}"], "recaption"
    elif alt:
        caps["short"], short = [alt], "alt-text"
    long = found.get(f"long{pair}") or found.get("long")
    if long:
        caps["long"] = long
    if alt:
        caps["raw"] = [alt]
    if keep_all:
        caps.update({k: v for k, v in found.items() if k.startswith(("short", "long")) and v and
                     k not in (f"short{pair}", f"long{pair}", "long")})
    return caps, short


def read_shard(task):
    """(manifest lines, skipped records, counts) of one shard."""
    shard, rel, folder, use_sidecar, pair, keep_all, need_long, tolerate = task
    members, why = scan_tar(shard)
    if why and not tolerate:
        last = next(reversed(members), None) if members else None
        raise ValueError(f"{shard}: {why}" + (f" (last good member {last})" if last else
                                               " (no readable member)") +
                         "; re-download it, or pass --skip_bad=True to keep its readable members")
    side = Sidecar(folder) if use_sidecar else None
    keys = {}
    for name in members:  # group KEY.jpg, KEY.txt, KEY.json by key, in tar order
        key, dot, ext = name.rpartition(".")
        if dot:
            keys.setdefault(key, {})[ext.lower()] = name
    lines, skipped = [], []
    counts = dict(images=0, no_image=0, no_caption=0, no_long=0, bad_json=0, short_recaption=0,
                  short_alt_text=0, from_sidecar=0, from_key_json=0)
    with open(shard, "rb") as f:
        def read(name):
            off, size = members[name]
            f.seek(off)
            return f.read(size).decode("utf-8", errors="replace")
        for key, files in keys.items():
            img = next((files[e[1:]] for e in IMAGE_EXT if e[1:] in files), None)
            if img is None:
                counts["no_image"] += 1
                skipped.append({"shard": rel, "key": key,
                                "why": f"no image member (has {sorted(files.values())})"})
                continue
            meta = {}
            if "json" in files:
                try:
                    meta = json.loads(read(files["json"]))
                    if not isinstance(meta, dict):
                        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
                except ValueError as e:
                    if not tolerate:
                        raise ValueError(f"{shard}: member {files['json']} does not parse ({e}); "
                                         f"re-download the shard, or pass --skip_bad=True to skip "
                                         f"that image") from None
                    counts["bad_json"] += 1
                    skipped.append({"shard": rel, "key": key,
                                    "why": f"{files['json']} does not parse: {e}"})
                    continue
            alt = read(files["txt"]) if "txt" in files else ""
            alt = " ".join((alt or str(meta.get("caption") or meta.get("raw_caption") or "")).split())
            found = {c.removesuffix("_captions"): _captions(meta[c]) for c in DREAMLIP_COLUMNS
                     if c in meta}
            found = {k: v for k, v in found.items() if v}
            source = "from_key_json" if found else None
            if side is not None:
                url = str(meta.get("url") or "")
                hit = side.get(["key:" + key] + (["url:" + url, "stem:" + stem(url)] if url else []) +
                               ["stem:" + key])
                if hit:
                    found, source = hit, "from_sidecar"
            caps, short = record_captions(alt, found, pair, keep_all)
            if not caps:
                counts["no_caption"] += 1
                skipped.append({"shard": rel, "key": key,
                                "why": "no caption (empty or missing .txt, none in .json or sidecar)"})
                continue
            if need_long and "long" not in caps:
                counts["no_long"] += 1
                skipped.append({"shard": rel, "key": key,
                                "why": "no long caption (in the sidecars or KEY.json)"})
                continue
            lines.append(json.dumps({"image": f"{rel}/{img}", "captions": caps}, ensure_ascii=False))
            counts["images"] += 1
            for k in caps:
                counts[f"field {k}"] = counts.get(f"field {k}", 0) + 1
            if short:
                counts["short_recaption" if short == "recaption" else "short_alt_text"] += 1
            if source:
                counts[source] += 1
    if why:
        skipped.append({"shard": rel, "key": None,
                        "why": f"damaged shard: {why}; members after the damage are lost"})
        counts["damaged_shards"] = 1
    return lines, skipped, counts


def list_shards(spec):
    found = []
    for part in (p for p in spec.split(",") if p):
        if os.path.isdir(part):
            tars = glob.glob(os.path.join(part, "*.tar"))
            if not tars:
                raise FileNotFoundError(f"shards: no .tar files in the folder {part}")
            found += tars
        elif glob.has_magic(part):
            tars = glob.glob(part)
            if not tars:
                raise FileNotFoundError(f"shards: {part!r} matches no file")
            found += tars
        elif os.path.isfile(part):
            found.append(part)
        else:
            raise FileNotFoundError(f"shards: {part} is neither a folder nor a file")
    if not found:
        raise FileNotFoundError(f"shards={spec!r}: no .tar files there")
    return sorted({os.path.abspath(p) for p in found})


def summary(total, side):
    """The counts, in words."""
    n = total.get("images", 0)
    fields = [(k[6:], v) for k, v in total.items() if k.startswith("field ")]
    parts = ["images with each field: " + ", ".join(f"{k} {v}" for k, v in fields),
             f"short: the {recaptions} recaption for {total['short_recaption']}, the alt-text for "
             f"{total['short_alt_text']}",
             f"recaptions from the sidecars for {total['from_sidecar']}, from KEY.json for "
             f"{total['from_key_json']}, none for {n - total['from_sidecar'] - total['from_key_json']}"]
    if side:
        parts.append(f"sidecar entries: {side['entries']} read, {total['from_sidecar']} matched an "
                     f"image, {side['duplicates']} duplicate keys (the first entry wins"
                     + (f"; e.g. {', '.join(side['first_duplicates'])}" if side['duplicates'] else "")
                     + ")")
    left = {k: v for k, v in total.items() if k in SKIPS and v}
    if left:
        parts.append("left out (<out>.skipped.jsonl): " +
                     ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in left.items()))
    return parts


SKIPS = ("no_image", "no_caption", "no_long", "bad_json", "damaged_shards")


def main():
    if not shards or not out:
        sys.exit("usage: python data/webdataset/prepare.py --shards=<folders, globs or files> "
                 "--out=<manifest.jsonl> [--long_captions=<sidecars>]")
    if recaptions not in ("IB", "SV", "LLA"):
        sys.exit(f"recaptions={recaptions!r}: one of IB, SV, LLA (DreamLIP's captioners)")
    t0 = time.time()
    files = list_shards(shards)
    sides = [os.path.abspath(p) for p in long_captions.split(",") if p]
    for p in sides:
        if not os.path.isfile(p):
            sys.exit(f"long_captions: {p} is not a file")
    out_path = os.path.abspath(out)
    root = os.path.dirname(out_path)
    parts, record = out_path + ".parts", out_path + ".prepare.json"
    settings = dict(shards=files, long_captions=sides, recaptions=recaptions, keep_all=keep_all,
                    require_long=require_long, skip_bad=skip_bad)
    if os.path.exists(out_path) and not os.path.isdir(parts):
        try:
            with open(record) as f:
                mine = json.load(f)["settings"]
        except (OSError, ValueError, KeyError):
            sys.exit(f"{out_path} exists and was not written by prepare.py (no {record}); "
                     f"choose another --out, or move it away")
        if mine != settings:
            sys.exit(f"{out_path} was prepared with other settings ({record}); delete it and "
                     f"{record} to prepare again, or choose another --out")
        print(f"{out_path} exists; nothing to do (delete it to prepare again)")
        return
    sp = os.path.join(parts, "settings.json")
    if os.path.isfile(sp) and json.load(open(sp)) != settings:
        if any(n.endswith(".json") and n[:6].isdigit() for n in os.listdir(parts)):
            sys.exit(f"{parts} holds finished shards of a run with other settings; delete it (or pass the "
                     f"same settings to resume)")
        shutil.rmtree(parts)  # nothing finished under the old settings: start over
    os.makedirs(parts, exist_ok=True)
    with open(sp, "w") as f:
        json.dump(settings, f)
    try:
        side = spool_sidecar(sides, parts) if sides else None
    except (ValueError, FileNotFoundError) as e:
        sys.exit(str(e))
    todo = [(i, s) for i, s in enumerate(files)
            if not os.path.isfile(os.path.join(parts, f"{i:06d}.json"))]
    tasks = [(s, os.path.relpath(s, root), parts, bool(sides), recaptions, keep_all, require_long,
              skip_bad) for _, s in todo]
    n_proc = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    pool = mp.get_context("fork").Pool(n_proc) if n_proc > 1 else None
    try:
        results = pool.imap(read_shard, tasks) if pool else map(read_shard, tasks)
        for (i, s), (lines, skipped, counts) in tqdm(zip(todo, results), total=len(todo), desc="shards",
                                                     unit="shard", initial=len(files) - len(todo)):
            part = os.path.join(parts, f"{i:06d}.json")
            with open(part + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"lines": lines, "skipped": skipped, "counts": counts}, f, ensure_ascii=False)
            os.replace(part + ".tmp", part)  # this shard is done: a rerun after a kill skips it
    except ValueError as e:
        sys.exit(str(e))
    finally:
        if pool:
            pool.close()
            pool.join()
    total = {}
    with open(out_path + ".tmp", "w", encoding="utf-8") as f, \
            open(out_path + ".skipped.jsonl", "w", encoding="utf-8") as g:
        for i in range(len(files)):
            with open(os.path.join(parts, f"{i:06d}.json"), encoding="utf-8") as p:
                part = json.load(p)
            f.writelines(line + "\n" for line in part["lines"])
            g.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in part["skipped"])
            for k, v in part["counts"].items():
                total[k] = total.get(k, 0) + v
    words = summary(total, side)
    if not total.get("images"):
        hint = (" (no long caption anywhere: give --long_captions=<the DreamLIP CSV of each source>, "
                "or shards downloaded with the recaption columns, or --require_long=False)"
                if total.get("no_long") else "")
        os.remove(out_path + ".tmp")
        shutil.rmtree(parts)  # nothing to resume: a rerun with other settings starts afresh
        sys.exit(f"{out_path}: no image left from {len(files)} shards{hint}; " + "; ".join(words))
    with open(record + ".tmp", "w") as f:
        json.dump({"settings": settings, "counts": total, "sidecar": side}, f, indent=1)
    os.replace(record + ".tmp", record)
    os.replace(out_path + ".tmp", out_path)
    shutil.rmtree(parts)
    print(f"wrote {out_path}: {total['images']} images from {len(files)} shards in "
          f"{time.time() - t0:.1f}s")
    for line in words:
        print("  " + line)
    if index:
        Manifest(out_path).check()  # index (member offsets included) and check now, not at the first training run

if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    from configurator import configure
    configure(globals())
    main()
