"""
The one data module: the JSONL manifest and its index, the check, image-tower preprocessing (CLIP's and
SigLIP's, as model.ImagePreprocess describes it), the image Dataset, the caption row order shared with the
embedding cache, and the CuPL descriptions of clip-benchmark.

Manifest (DESIGN.md section 6): JSONL, one image per line, record i on line i + 1 (no blank lines, so
a line number and a row index are the same thing, off by one):
    {"image": "images/train/00000.png", "captions": {"short": ["...", ...], "long": [...], "de": [...]}, "label": 3}
`image` is relative to the manifest's folder (absolute paths work too). `captions` is optional; each field
(a name of letters, digits, "_" or "-") is a non-empty list of strings with something besides whitespace
(a bare string, an empty list or "" is an error). `label` is optional, an int >= 0 (a class index).
The same image path on several lines is allowed and reported once, with a count, when the manifest is
indexed (evaluation then has two identical images: usually a mistake, sometimes on purpose).

Images inside tar shards (img2dataset's webdataset output, read in place, never unpacked): `image` names
the shard and the member, "shards/00000.tar/000000123.jpg" = member "000000123.jpg" of the file
"shards/00000.tar" (the first path component that ends in ".tar" and is a file). The index records each
member's byte offset and size (from tarfile's headers), and workers read it with one pread.
data/webdataset/prepare.py writes such manifests from a folder of shards.

The index: JSONL stays what users write; the first use of a manifest indexes it once (in parallel over
byte ranges, with a progress bar) into `<manifest>.index/` (or, with index_dir=<folder>, into
`<folder>/<name>-<hash of its path>.index/`, for manifests in read-only places):
    meta.json         what was indexed (size, mtime, a content sample of the manifest and of every shard),
                      counts, per-field caption fingerprints, duplicates, and the check's verdict
    faults.json       the first 1000 faults found, with their lines
    offsets.npy       int64 (N + 1,): record i is bytes offsets[i]:offsets[i + 1] of the manifest
    ptr.<field>.npy   int64 (N + 1,): image i's captions of that field are rows ptr[i]:ptr[i + 1] of the
                      field (CSR; the embedding cache's row order, see caption_rows)
    labels.npy        int32 (N,), -1 where a record has none
    status.npy        uint8 (N,): bit 0 a fault in the record, bit 1 its image is missing, bit 2 no captions
    member.*.npy      (tar shards only) shard number, byte offset and size of each record's member
Every process memory-maps these arrays (shared pages, nothing per image in Python) and reads a record's
text on demand (one pread of its line + json.loads), so memory per process does not grow with N.
Staleness rule: the index is used only if the manifest's size, modification time and a sample of its
bytes (first and last 64 KiB and 16 blocks between) equal what the index recorded, and the same for each
tar shard it read; otherwise it is rebuilt (said on stderr), never used silently. A folder that cannot be
written is an error that says to set index_dir.

Validation happens once, when the manifest is indexed: every fault of every line (malformed JSON, unknown
keys, captions that are not lists of non-empty strings, labels that are not ints >= 0, missing image files
or tar members, truncated shards) is recorded with its line. Scripts then call `Manifest.require(...)`,
which costs nothing unless something is wrong, and refuses with the list (the manifest, each line, why).

Bad images (`skip_bad`): whether an image file exists (or its shard member) is checked when indexing;
decoding is not (at 10M images that would take hours): it happens in the DataLoader workers. A missing
or undecodable image stops the run naming the file (shard and member) and the manifest line; with
skip_bad=True it is replaced by the next image in manifest order that reads (deterministic: the same
whatever the worker, rank or resume point), counted in a table shared by all workers and listed by
`skipped()`. `check_manifest(decode=True)` decodes everything up front, in parallel, for a full check.

Image modes: every image becomes 8-bit RGB with its full range. 16-bit data ("I;16", "I;16B", and "I" with
values in 0..65535) is scaled by 255/65535 (never clipped, which Pillow's convert does); "I" outside that
range and "F" are scaled from their min..max ("F" within [0, 1] by 255); "1", "L", "P", "CMYK", "YCbCr",
"LAB" convert as Pillow does; alpha ("LA", "PA", "RGBA", palette transparency) is dropped, as CLIP's own
preprocessing does (so train and eval see what the pretrained model saw).

    man = Manifest("data/fashion/out/train.jsonl").require(fields=["short", "long"])  # index, then check
    man[3]["captions"]["long"]          # record 3, read from the file on demand
    man.rows("long", 3)                 # its rows in the embedding cache's long.npy
    man.text("long", 17)                # the caption of row 17
    man.texts("long", 0, 2048)          # rows 0..2047, one read of the lines that hold them
    ds = ImageDataset(man, preprocess=tower.preprocess, train=True, seed=1337)  # the tower's (model.load_image_tower)
    ds = ImageDataset(man, size=64)     # CLIP's preprocessing at 64, eval
    check_manifest("m.jsonl", fields=["short"], decode=True)  # every fault at once, images decoded

The whole check from the shell (indexes if needed; decode=True decodes every image, in parallel):
    python dataset.py --manifest=m.jsonl --fields=short,long --label=False --decode=True [--index_dir=...]

No torch vision package (on a CPU-only machine it pulls the CUDA build of torch): the transforms are a few
lines of Pillow and numpy below.
"""

import fcntl
import glob
import hashlib
import importlib.util
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tarfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

import model as M  # ImagePreprocess and clip_preprocess only (model.py imports nothing of this module)

KEYS = ("image", "captions", "label")
MAX_LISTED = 20   # faults listed in full in an error; the rest are counted
MAX_KEPT = 1000   # faults kept in the index's faults.json
INDEX_VERSION = 1
CHUNK_BYTES = 16 << 20  # manifest bytes per indexing task
FIELD_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # caption fields name files (<field>.npy): no paths
BAD, MISSING, NO_CAPTIONS = 1, 2, 4  # status bits
# caption fingerprints: a polynomial hash, mod a Mersenne prime, of per-image blake2b digests. Horner's
# rule composes over consecutive chunks, so the parallel index gets the same value as one sequential pass
P127 = (1 << 127) - 1
R_FP = 0x5DEECE66D_2545F4914F6CDD1D_9E3779B97F4A7C15 % P127
H_NONE = int.from_bytes(hashlib.blake2b(b"", digest_size=16).digest(), "little") % P127

# -----------------------------------------------------------------------------
# indexing: one task per byte range of the manifest

def _caption_digest(texts):
    """An int digest of one image's captions of one field (each length-prefixed: no join ambiguity)."""
    raw = [t.encode("utf-8") for t in texts]
    data = b"".join(len(b).to_bytes(8, "little") + b for b in raw)
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little") % P127


def _geometric(n):
    """sum_{k < n} R^k mod P: the hash of n images without a field (each contributes H_NONE)."""
    return (pow(R_FP, n, P127) - 1) * pow(R_FP - 1, -1, P127) % P127


_GOOD_FIELDS = set()  # field names already matched against FIELD_NAME (a handful per manifest)


def _record_faults(rec):
    """What is wrong with one parsed record (not its image file), as a list of short sentences."""
    if not isinstance(rec, dict):
        return [f"expected a JSON object, got {type(rec).__name__}"]
    faults = [f"unknown key {k!r} (a record has {', '.join(KEYS)})" for k in rec if k not in KEYS]
    if "image" not in rec:
        faults.append("missing key 'image'")
    elif not isinstance(rec["image"], str) or not rec["image"]:
        faults.append(f"'image' must be a non-empty string, got {rec['image']!r:.60}")
    caps = rec.get("captions")
    if "captions" in rec and not isinstance(caps, dict):
        faults.append(f"'captions' must be an object {{field: [captions]}}, got {type(caps).__name__}")
    elif caps:
        for field, texts in caps.items():
            if field not in _GOOD_FIELDS:
                if not FIELD_NAME.match(field):
                    faults.append(f"caption field name {field!r} must be letters, digits, '_' or '-'")
                elif len(_GOOD_FIELDS) < 1000:
                    _GOOD_FIELDS.add(field)
            if not isinstance(texts, list) or not texts:
                faults.append(f"caption field {field!r} must be a non-empty list of strings, got {texts!r:.60}")
                continue
            if not all(isinstance(t, str) and not t.isspace() and t for t in texts):
                faults += [f"caption {field}[{j}] must be a non-empty string, got {t!r:.60}"
                           for j, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if "label" in rec:
        lab = rec["label"]
        if type(lab) is not int:  # bool is an int subclass: refuse True/False too
            faults.append(f"'label' must be an int, got {lab!r:.60}")
        elif not 0 <= lab < 2 ** 31:
            faults.append(f"'label' must be a class index >= 0 (and < 2^31), got {lab}")
    return faults


def split_member(path):
    """'dir/00000.tar/KEY.jpg' -> ('dir/00000.tar', 'KEY.jpg') if dir/00000.tar is a file, else None."""
    at = path.find(".tar/")
    while at >= 0:
        if os.path.isfile(path[:at + 4]):
            return path[:at + 4], path[at + 5:]
        at = path.find(".tar/", at + 1)
    return None


def scan_tar(shard):
    """{member name: (data offset, size)} of a tar file's regular members, read from its headers only,
    and why the scan stopped early (None if it did not): a truncated or corrupt shard keeps the members
    before the damage. A member whose data runs past the end of the file is left out and named."""
    size, members, why = os.path.getsize(shard), {}, None
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    why = f"truncated: member {m.name} needs bytes up to {m.offset_data + m.size}, the file has {size}"
                    break
                members[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        why = f"corrupt after {len(members)} members ({type(e).__name__}: {e})"
    return members, why


def _scan_chunk(task):
    """Parse and check the lines that start in bytes [start, end) of the manifest: per-line arrays, the
    faults, and each caption field's Horner accumulator over these lines."""
    path, root, start, end = task
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line under `start` began in the previous chunk
        pos = f.tell()
        buf = f.read(max(0, end - pos))
        if buf and not buf.endswith(b"\n"):
            buf += f.readline()  # finish the last line (it started before `end`)
    lines = buf.split(b"\n")
    if not buf or buf.endswith(b"\n"):
        lines.pop()
    n = len(lines)
    offsets = np.empty(n, np.int64)
    labels = np.full(n, -1, np.int32)
    status = np.zeros(n, np.uint8)
    phash = np.zeros(n, np.uint64)
    counts, acc = {}, {}  # field -> caption count per line; field -> Horner accumulator over lines so far
    faults = []           # (local line index, message), the first MAX_KEPT
    n_faults = n_fault_lines = n_missing = 0
    exists, tars, shard_ids = {}, {}, {}
    member = None         # (shard id, offset, size) per line, made when the first tar member appears
    p = pos
    for k, line in enumerate(lines):
        offsets[k] = p
        p += len(line) + 1
        rec, bad = None, []
        if not line.strip():
            bad = ["blank line (record i must be line i + 1)"]
        else:
            try:
                rec = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                bad = [f"malformed JSON: {e}"]
            else:
                bad = _record_faults(rec)
        missing = None
        if isinstance(rec, dict) and isinstance(rec.get("image"), str) and rec["image"]:
            img = rec["image"]
            phash[k] = int.from_bytes(hashlib.blake2b(img.encode("utf-8"), digest_size=8).digest(), "little")
            full = os.path.join(root, img)
            if full not in exists:
                exists[full] = os.path.isfile(full)
            if not exists[full]:
                sm = split_member(full)
                if sm is None:
                    missing = f"image file not found: {full}"
                else:
                    shard, name = sm
                    if shard not in tars:
                        tars[shard] = scan_tar(shard)
                        shard_ids[shard] = len(shard_ids)
                    members, broken = tars[shard]
                    if name in members:
                        if member is None:
                            member = (np.full(n, -1, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64))
                        member[0][k] = shard_ids[shard]
                        member[1][k], member[2][k] = members[name]
                    else:
                        missing = f"no member {name!r} in shard {shard}" + (f" ({broken})" if broken else "")
        if bad:
            status[k] |= BAD
        if missing:
            status[k] |= MISSING
            n_missing += 1
            bad = bad + [missing]
        if bad:
            n_faults += len(bad)
            n_fault_lines += 1
            if len(faults) < MAX_KEPT:
                faults += [(k, msg) for msg in bad]
        caps = rec.get("captions") or {} if not status[k] & BAD else {}
        if not status[k] & BAD and not caps:
            status[k] |= NO_CAPTIONS
        for field, texts in caps.items():
            if field not in counts:
                counts[field] = np.zeros(n, np.int32)
                acc[field] = _horner_skip(0, k)  # the k lines before lack it
            counts[field][k] = len(texts)
        for field in acc:  # every line folds into every field: H_NONE where it lacks the field
            texts = caps.get(field)
            acc[field] = (acc[field] * R_FP + (_caption_digest(texts) if texts else H_NONE)) % P127
        if not status[k] & BAD and "label" in rec:
            labels[k] = rec["label"]
    shards = []
    for s, i in shard_ids.items():
        st = os.stat(s)
        shards.append((s, st.st_size, st.st_mtime_ns, tars[s][1]))
    return dict(n=n, end=p if n else pos, offsets=offsets, labels=labels, status=status, phash=phash,
                counts=counts, acc=acc, faults=faults, n_faults=n_faults, n_fault_lines=n_fault_lines,
                n_missing=n_missing, member=member, shards=shards)


def _horner_skip(acc, n):
    """A field's accumulator after n more images that lack it."""
    return (acc * pow(R_FP, n, P127) + H_NONE * _geometric(n)) % P127


class _NpyWriter:
    """Append to a 1-d .npy whose length is known only at the end: data after a fixed 128-byte header
    that close() writes (a valid version 1.0 header, padded as the format allows)."""
    HEADER = 128

    def __init__(self, path, dtype, fill=None, n=0):
        self.f, self.dtype, self.n = open(path, "wb"), np.dtype(dtype), 0
        self.f.seek(self.HEADER)
        if n:
            self.fill(fill, n)

    def write(self, a):
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.n += len(a)

    def fill(self, value, n):
        block = np.full(min(n, 1 << 20), value, self.dtype)
        while n > 0:
            self.write(block[:n])
            n -= len(block)

    def close(self):
        header = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (self.dtype.str, self.n)
        raw = header.encode("latin1")
        pad = self.HEADER - 10 - len(raw) - 1
        assert pad >= 0, header
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + (self.HEADER - 10).to_bytes(2, "little") + raw + b" " * pad + b"\n")
        self.f.close()


def _sample_digest(path, size):
    """sha256 of the first and last 64 KiB of a file and 16 blocks of 4 KiB spread between: the cheap
    content check (beside size and mtime) that tells an index it is stale."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        spots = [(0, 1 << 16), (max(0, size - (1 << 16)), 1 << 16)] + [(size * k // 17, 4096) for k in range(1, 17)]
        for at, n in spots:
            f.seek(at)
            h.update(f.read(n))
    return h.hexdigest()


def index_path(manifest, index_dir=None):
    """Where a manifest's index lives: beside it, or under index_dir (named after the manifest's path)."""
    path = os.path.abspath(str(manifest))
    if not index_dir:
        return path + ".index"
    tag = hashlib.sha1(path.encode()).hexdigest()[:10]
    return os.path.join(os.path.abspath(index_dir), f"{os.path.basename(path)}-{tag}.index")


def _stale(path, index):
    """None if `index` holds a current index of the manifest `path`, else why not."""
    try:
        with open(os.path.join(index, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "no index yet"
    except (OSError, ValueError) as e:
        return f"its meta.json does not read ({type(e).__name__})"
    if meta.get("version") != INDEX_VERSION:
        return f"index version {meta.get('version')}, this code writes {INDEX_VERSION}"
    st = os.stat(path)
    if (meta["size"], meta["mtime_ns"]) != (st.st_size, st.st_mtime_ns):
        return "the manifest changed (size or modification time)"
    if meta["sample_sha256"] != _sample_digest(path, st.st_size):
        return "the manifest's content changed"
    root = os.path.dirname(path)
    for rel, size, mtime in meta["shards"]:
        s = os.path.join(root, rel)
        try:
            st = os.stat(s)
        except OSError:
            return f"shard {s} is gone"
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return f"shard {s} changed"
    return None


def build_index(path, index, workers=0):
    """Index a manifest into the folder `index` (written under a temporary name, then swapped in).
    workers: processes over byte ranges (0: every core). Returns the meta dict."""
    path = os.path.abspath(path)
    root = os.path.dirname(path)
    st = os.stat(path)
    t0 = time.time()
    tasks = [(path, root, s, min(s + CHUNK_BYTES, st.st_size)) for s in range(0, st.st_size, CHUNK_BYTES)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    tmp = f"{index}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    w = {name: _NpyWriter(os.path.join(tmp, f"{name}.npy"), dt) for name, dt in
         (("offsets", np.int64), ("labels", np.int32), ("status", np.uint8), ("phash", np.uint64))}
    ptr, total, fp, missing_lines, n_missing_field = {}, {}, {}, {}, {}
    faults, shards, shard_ids = [], [], {}
    N = n_faults = n_fault_lines = n_missing = n_labelled = 0
    label_min, label_max, unlabelled = None, None, []
    end = 0
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_scan_chunk, tasks) if pool else map(_scan_chunk, tasks)
        bar = tqdm(total=st.st_size, unit="B", unit_scale=True, desc=f"indexing {os.path.basename(path)}",
                   disable=st.st_size < (64 << 20), file=sys.stderr)
        for task, r in zip(tasks, results):
            bar.update(task[3] - task[2])
            n = r["n"]
            if not n:
                continue
            end = r["end"]
            w["offsets"].write(r["offsets"])
            w["labels"].write(r["labels"])
            w["status"].write(r["status"])
            w["phash"].write(r["phash"])
            has = r["labels"] >= 0
            n_labelled += int(has.sum())
            if has.any():
                lo, hi = int(r["labels"][has].min()), int(r["labels"][has].max())
                label_min = lo if label_min is None else min(label_min, lo)
                label_max = hi if label_max is None else max(label_max, hi)
            if len(unlabelled) < MAX_LISTED:
                unlabelled += (np.flatnonzero(~has)[:MAX_LISTED] + N + 1).tolist()
            for field in r["counts"]:
                if field not in ptr:  # first seen here: every earlier image lacks it
                    ptr[field] = _NpyWriter(os.path.join(tmp, f"ptr.{field}.npy"), np.int64, 0, N + 1)
                    total[field], fp[field] = 0, _horner_skip(0, N)
                    missing_lines[field] = list(range(1, min(N, MAX_LISTED) + 1))
                    n_missing_field[field] = N
            for field in ptr:
                c = r["counts"].get(field)
                if c is None:
                    ptr[field].fill(total[field], n)
                    fp[field] = _horner_skip(fp[field], n)
                    lacking = np.arange(n)
                else:
                    ptr[field].write(total[field] + np.cumsum(c, dtype=np.int64))
                    total[field] += int(c.sum(dtype=np.int64))
                    fp[field] = (fp[field] * pow(R_FP, n, P127) + r["acc"][field]) % P127
                    lacking = np.flatnonzero(c == 0)
                n_missing_field[field] += len(lacking)
                if len(missing_lines[field]) < MAX_LISTED:
                    missing_lines[field] += (lacking[:MAX_LISTED] + N + 1).tolist()
            if r["member"] is not None or r["shards"] or "member_shard" in w:
                if "member_shard" not in w:
                    w["member_shard"] = _NpyWriter(os.path.join(tmp, "member_shard.npy"), np.int32, -1, N)
                    w["member_offset"] = _NpyWriter(os.path.join(tmp, "member_offset.npy"), np.int64, 0, N)
                    w["member_size"] = _NpyWriter(os.path.join(tmp, "member_size.npy"), np.int64, 0, N)
                local = []
                for s, size, mtime, why in r["shards"]:
                    if s not in shard_ids:
                        shard_ids[s] = len(shards)
                        shards.append([os.path.relpath(s, root), size, mtime, why])
                    local.append(shard_ids[s])
                if r["member"] is None:
                    w["member_shard"].fill(-1, n)
                    w["member_offset"].fill(0, n)
                    w["member_size"].fill(0, n)
                else:
                    sid, off, size = r["member"]
                    w["member_shard"].write(np.where(sid >= 0, np.asarray(local + [0], np.int32)[sid], -1))
                    w["member_offset"].write(off)
                    w["member_size"].write(size)
            if len(faults) < MAX_KEPT:
                faults += [(N + 1 + k, msg) for k, msg in r["faults"]]
            n_faults += r["n_faults"]
            n_fault_lines += r["n_fault_lines"]
            n_missing += r["n_missing"]
            N += n
        bar.close()
    finally:
        if pool:
            pool.close()
            pool.join()
    if N == 0:
        faults, n_faults, n_fault_lines = [(0, "the manifest is empty")], 1, 1
    w["offsets"].write([end])
    for x in list(w.values()) + list(ptr.values()):
        x.close()
    status = np.load(os.path.join(tmp, "status.npy"), mmap_mode="r")
    n_bad = int(np.count_nonzero(status & BAD)) if N else 1
    dup = _duplicates(path, tmp, N) if n_bad == 0 and N else {"count": 0, "examples": []}
    os.remove(os.path.join(tmp, "phash.npy"))
    meta = dict(version=INDEX_VERSION, manifest=path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                sample_sha256=_sample_digest(path, st.st_size), lines=N, valid=n_bad == 0,
                faults=n_faults, fault_lines=n_fault_lines, bad_lines=n_bad, missing_images=n_missing,
                no_captions=int(np.count_nonzero(status & NO_CAPTIONS)) if N else 0,
                fields={f: dict(captions=total[f], missing=n_missing_field[f], missing_lines=missing_lines[f][:MAX_LISTED],
                                fingerprint=f"{fp[f]:032x}") for f in sorted(ptr)},
                labels=dict(count=n_labelled, min=label_min, max=label_max, missing_lines=unlabelled[:MAX_LISTED]),
                duplicates=dup, shards=[s[:3] for s in shards],
                broken_shards=[[s[0], s[3]] for s in shards if s[3]],
                seconds=round(time.time() - t0, 2), workers=workers)
    del status
    with open(os.path.join(tmp, "faults.json"), "w") as f:
        json.dump(faults[:MAX_KEPT], f)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    old = f"{index}.old{os.getpid()}"
    if os.path.exists(index):
        os.replace(index, old)
    os.replace(tmp, index)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def _duplicates(path, folder, N):
    """{"count": records whose image path an earlier record has, "examples": [[line, line, path], ...]}."""
    h = np.load(os.path.join(folder, "phash.npy"), mmap_mode="r")
    s = np.sort(h)
    same = s[1:] == s[:-1]
    count = int(np.count_nonzero(same))
    examples = []
    if count:
        offsets = np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r")
        with open(path, "rb") as f:
            for v in np.unique(s[1:][same])[:5]:  # a few examples: the first two lines of each path
                a, b = np.flatnonzero(h == v)[:2].tolist()
                imgs = []
                for i in (a, b):
                    f.seek(int(offsets[i]))
                    imgs.append(json.loads(f.read(int(offsets[i + 1] - offsets[i])))["image"])
                if imgs[0] == imgs[1]:  # (a 64-bit hash collision of two paths is not a duplicate)
                    examples.append([a + 1, b + 1, imgs[0]])
    return {"count": count, "examples": sorted(examples)}

# -----------------------------------------------------------------------------
# the manifest: index arrays memory-mapped, records read on demand

class Manifest:
    """A JSONL manifest through its index (built on first use, rebuilt when stale; see the module
    docstring). Holds no per-image Python objects: arrays are memory maps, records are read from the file
    by offset. Picklable (for DataLoader workers started by spawn): maps and files reopen lazily.

    len(man), man[i] (record i as a dict), man.image_path(i), man.open_image(i), man.label(i) / man.labels,
    man.fields, man.rows(field, i), man.n_rows(field), man.text(field, r), man.texts(field, start, stop),
    man.row_images(field, start, stop), man.rows_of(field) / man.texts_of(field) (lazy sequences),
    man.fingerprint(field), man.require(fields, label, images)."""

    def __init__(self, path, index_dir=None, workers=0, quiet=False):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such manifest")
        self.abspath = os.path.abspath(self.path)
        self.root = os.path.dirname(self.abspath)
        self.index = index_path(self.path, index_dir)
        self.meta = self._open(workers, quiet)
        self.n = self.meta["lines"]
        self._maps, self._files, self._fd, self._shard_fds = {}, {}, None, {}

    def _open(self, workers, quiet):
        why = _stale(self.abspath, self.index)
        if why is None:
            return _read_json(os.path.join(self.index, "meta.json"))
        parent = os.path.dirname(self.index)
        try:
            os.makedirs(parent, exist_ok=True)
            lock = open(self.index + ".lock", "a")
        except OSError as e:
            raise OSError(f"{self.path}: cannot write its index {self.index} ({e}); set index_dir to a writable "
                          f"folder (--index_dir=...)") from None
        with lock:  # one builder; other ranks wait here, then find a fresh index
            fcntl.flock(lock, fcntl.LOCK_EX)
            why = _stale(self.abspath, self.index)
            if why is None:
                return _read_json(os.path.join(self.index, "meta.json"))
            for old in glob.glob(glob.escape(self.index) + ".tmp*") + glob.glob(glob.escape(self.index) + ".old*"):
                shutil.rmtree(old, ignore_errors=True)  # left by a builder that was killed
            if not quiet:
                print(f"{self.path}: indexing into {self.index} ({why})", file=sys.stderr)
            try:
                meta = build_index(self.abspath, self.index, workers)
            except OSError as e:
                raise OSError(f"{self.path}: cannot write its index {self.index} ({e}); set index_dir to a "
                              f"writable folder (--index_dir=...)") from None
            if not quiet:
                print(f"{self.path}: indexed {meta['lines']} lines in {meta['seconds']:.1f}s with {meta['workers']} "
                      f"process(es)" + _duplicate_note(self.path, meta), file=sys.stderr)
            return meta

    # pickling: drop maps and file descriptors; each process reopens its own on first use
    def __getstate__(self):
        return {**self.__dict__, "_maps": {}, "_files": {}, "_fd": None, "_shard_fds": {}}

    def _array(self, name):
        """An index array, memory-mapped (for whole-array, vectorised use: checks, evaluation)."""
        a = self._maps.get(name)
        if a is None:
            a = self._maps[name] = np.load(os.path.join(self.index, f"{name}.npy"), mmap_mode="r")
        return a

    def _at(self, name, i, k=1):
        """k elements of an index array from position i, by one pread. The per-item lookups of training use
        this rather than the memory map: a random access through a map maps a 64 KiB fault-around window
        into the process each time, so a long run would end up holding the whole index in every process's
        page tables (its PSS); a pread of 16 bytes costs less than that page fault and leaves nothing."""
        e = self._files.get(name)
        if e is None:
            path = os.path.join(self.index, f"{name}.npy")
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                _, _, dt = read(f)
                e = self._files[name] = (os.open(path, os.O_RDONLY), f.tell(), dt)
        fd, off, dt = e
        return np.frombuffer(os.pread(fd, k * dt.itemsize, off + int(i) * dt.itemsize), dt)

    def __len__(self):
        return self.n

    @property
    def fields(self):
        return list(self.meta["fields"])

    # records ------------------------------------------------------------------
    def _read(self, start, stop):
        """Bytes of records start..stop-1 (one pread: safe in forked workers sharing the descriptor)."""
        if self._fd is None:
            self._fd = os.open(self.abspath, os.O_RDONLY)
        if stop == start + 1:
            a, b = (int(x) for x in self._at("offsets", start, 2))
        else:
            a, b = int(self._at("offsets", start)[0]), int(self._at("offsets", stop)[0])
        return os.pread(self._fd, b - a, a)

    def __getitem__(self, i):
        """Record i as a dict, parsed from its line."""
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"{self.path}: record {i} of {self.n}")
        return json.loads(self._read(i, i + 1))

    def __iter__(self):
        for i in range(self.n):
            yield self[i]

    def image_path(self, i):
        return os.path.join(self.root, self[i]["image"])

    def label(self, i):
        """Record i's label (-1: none)."""
        return int(self._at("labels", i)[0])

    def status_of(self, i):
        """Record i's status bits (BAD, MISSING, NO_CAPTIONS)."""
        return int(self._at("status", i)[0])

    @property
    def labels(self):
        """int32 (N,) memory map, -1 where a record has none."""
        return self._array("labels")

    @property
    def status(self):
        return self._array("status")

    def open_image(self, i):
        """(PIL image, its name for messages): a file, or a tar member read in place with one pread."""
        rel = self[i]["image"]
        if self.meta["shards"]:
            sid = int(self._at("member_shard", i)[0])
            if sid >= 0:
                shard = os.path.join(self.root, self.meta["shards"][sid][0])
                off, size = int(self._at("member_offset", i)[0]), int(self._at("member_size", i)[0])
                fd = self._shard_fds.pop(shard, None)
                if fd is None:
                    fd = os.open(shard, os.O_RDONLY)
                    while len(self._shard_fds) >= 32:  # a few open shards per worker, least recently used closed
                        os.close(self._shard_fds.pop(next(iter(self._shard_fds))))
                self._shard_fds[shard] = fd
                data = os.pread(fd, size, off)
                name = f"{shard} member {rel[rel.find('.tar/') + 5:]}"
                if len(data) != size:
                    raise OSError(f"{name}: {len(data)} of {size} bytes (the shard was truncated after indexing)")
                return Image.open(io.BytesIO(data)), name
        path = os.path.join(self.root, rel)
        return Image.open(path), path

    def image_name(self, i):
        """The file, or 'shard member KEY', of image i (for messages)."""
        rel = self[i]["image"]
        sm = split_member(os.path.join(self.root, rel)) if self.meta["shards"] else None
        return f"{sm[0]} member {sm[1]}" if sm else os.path.join(self.root, rel)

    # captions -----------------------------------------------------------------
    def ptr(self, field):
        """int64 (N + 1,): image i's captions of `field` are rows ptr[i]:ptr[i + 1]."""
        if field not in self.meta["fields"]:
            raise KeyError(f"{self.path}: no caption field {field!r} (has {self.fields})")
        return self._array(f"ptr.{field}")

    def n_rows(self, field):
        return self.meta["fields"][field]["captions"] if field in self.meta["fields"] else 0

    def row_range(self, field, i):
        """(first, end) of image i's rows of `field` (equal if it has none), by one pread."""
        if field not in self.meta["fields"]:
            self.ptr(field)  # the KeyError naming the manifest and its fields
        lo, hi = self._at(f"ptr.{field}", i, 2)
        return int(lo), int(hi)

    def rows(self, field, i):
        """Image i's rows of `field` (an int64 arange; empty if it has none)."""
        return np.arange(*self.row_range(field, i))

    def captions(self, i, field):
        return self[i].get("captions", {}).get(field, [])

    def image_of_row(self, field, r):
        """The image that holds row r of `field` (a binary search over ptr, by preads)."""
        self.row_range(field, 0)  # (checks the field)
        lo, hi = 0, self.n  # invariant: ptr[lo] <= r < ptr[hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if int(self._at(f"ptr.{field}", mid)[0]) <= r:
                lo = mid
            else:
                hi = mid
        return lo

    def text(self, field, r):
        """The caption of row r of `field`."""
        i = self.image_of_row(field, r)
        return self.captions(i, field)[r - self.row_range(field, i)[0]]

    def texts(self, field, start=0, stop=None):
        """Captions of rows start..stop-1 of `field`, in row order, from one read of the lines that hold
        them (a cache chunk's texts: no whole field in memory)."""
        stop = self.n_rows(field) if stop is None else min(stop, self.n_rows(field))
        if start >= stop:
            return []
        i0, i1 = self.image_of_row(field, start), self.image_of_row(field, stop - 1) + 1
        out = []
        for line in self._read(i0, i1).split(b"\n"):
            if line.strip():
                out += json.loads(line).get("captions", {}).get(field, [])
        a = start - self.row_range(field, i0)[0]
        return out[a:a + stop - start]

    def row_images(self, field, start=0, stop=None):
        """int64 (stop - start,): the image of each row of `field`."""
        p = np.asarray(self.ptr(field))
        stop = self.n_rows(field) if stop is None else stop
        return np.searchsorted(p, np.arange(start, stop), side="right") - 1

    def rows_of(self, field):
        """A lazy sequence: item i = image i's rows of `field` (what rows_by_image gave)."""
        return _Lazy(len(self), lambda i: self.rows(field, i))

    def texts_of(self, field):
        """A lazy sequence: item r = the caption of row r of `field` (what caption_rows' texts gave)."""
        return _Lazy(self.n_rows(field), lambda r: self.text(field, r))

    def fingerprint(self, field):
        """The captions' fingerprint (a 128-bit polynomial hash over images of blake2b digests of each
        image's captions in that field): changes if any caption, its order or its image changes."""
        return self.meta["fields"][field]["fingerprint"] if field in self.meta["fields"] else None

    # checks -------------------------------------------------------------------
    def faults(self, fields=(), label=False, images="error"):
        """Every fault of the manifest for this use, as (line, message), sorted, and their count:
        the index's own (record faults; missing images unless images="ignore"), then the images that
        lack a caption field of `fields`, or a label if `label`."""
        with open(os.path.join(self.index, "faults.json")) as f:
            listed = [tuple(x) for x in json.load(f)]
        n = self.meta["faults"]
        if images != "error":  # missing images are not faults here (text-only use, or skipped)
            listed = [x for x in listed if not _is_missing(x[1])]
            n -= self.meta["missing_images"]
        need = [f for f in fields if f not in self.meta["fields"] or self.meta["fields"][f]["missing"]]
        if need or (label and self.meta["labels"]["count"] < self.n):
            st = np.asarray(self.status)
            nocap = st & NO_CAPTIONS != 0
            done = np.zeros(self.n, bool)
            for f in need:
                lack = np.ones(self.n, bool) if f not in self.meta["fields"] else np.diff(self.ptr(f)) == 0
                lack &= st & BAD == 0
                for i in np.flatnonzero(lack & nocap & ~done)[:MAX_KEPT].tolist():
                    listed.append((i + 1, "missing key 'captions'"))
                n += int(np.count_nonzero(lack & nocap & ~done))
                done |= lack & nocap
                for i in np.flatnonzero(lack & ~nocap)[:MAX_KEPT].tolist():
                    listed.append((i + 1, f"caption field {f!r} is missing"))
                n += int(np.count_nonzero(lack & ~nocap))
            if label:
                lack = (np.asarray(self.labels) < 0) & (st & BAD == 0)
                listed += [(i + 1, "missing key 'label'") for i in np.flatnonzero(lack)[:MAX_KEPT].tolist()]
                n += int(np.count_nonzero(lack))
        return sorted(listed, key=lambda x: x[0]), n

    def require(self, fields=(), label=False, images="error"):
        """Refuse (ValueError naming the manifest and each line) if any record this use reads is faulty:
        the records themselves, every image lacking a field of `fields`, a label (label=True), and
        missing images (images="error"; "skip": counted and said on stderr; "ignore": text-only use).
        Free when the manifest is clean: the index holds the verdict. Returns self."""
        if self.meta["bad_lines"] or fields or label or (images == "error" and self.meta["missing_images"]):
            listed, n = self.faults(fields, label, images)
            if n:
                raise ValueError(fault_report(self.path, listed, n, self.n))
        if images == "skip" and self.meta["missing_images"]:
            print(f"{self.path}: {self.meta['missing_images']} image(s) missing (see {self.index}/faults.json); "
                  f"skip_bad replaces each by the next readable image", file=sys.stderr)
        return self


def _read_json(path):
    with open(path) as f:
        return json.load(f)


class _Lazy:
    """A read-only sequence computed item by item."""

    def __init__(self, n, get):
        self.n, self.get = n, get

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.get(i % self.n)


def _is_missing(msg):
    return msg.startswith("image file not found") or msg.startswith("no member ")


def _duplicate_note(path, meta):
    d = meta["duplicates"]
    if not d["count"]:
        return ""
    ex = "; ".join(f"lines {a} and {b}: {p}" for a, b, p in d["examples"][:3])
    return f"\n{path}: warning: {d['count']} record(s) name an image an earlier line names ({ex})"


def fault_report(path, listed, n, n_lines):
    """One error text: '<path>: K fault(s) on L of N lines:' then the first MAX_LISTED, then a count
    (L is exact when every fault is listed; past MAX_KEPT it counts the listed ones: 'at least')."""
    lines = len({ln for ln, _ in listed})
    shown = [f"  line {ln}: {msg}" for ln, msg in listed[:MAX_LISTED]]
    if n > MAX_LISTED:
        shown.append(f"  ... and {n - MAX_LISTED} more")
    on = f"on {lines} of {n_lines} lines" if n == len(listed) else f"on at least {lines} of {n_lines} lines"
    return f"{path}: {n} fault(s) {on}:\n" + "\n".join(shown)


def read_manifest(path, index_dir=None, fields=(), label=False, images="ignore"):
    """The Manifest of `path` (indexed on first use), after require(fields, label, images): what every
    script opens. Records are read on demand: man[i] is record i as a dict."""
    return Manifest(path, index_dir).require(fields, label, images)


def image_path(manifest, rec):
    """Where a record's image lies: relative paths are relative to the manifest's folder."""
    return os.path.join(os.path.dirname(os.path.abspath(str(manifest))), rec["image"])


def image_fault(path):
    """None if Pillow fully decodes the file (or 'shard.tar/member'), else why not."""
    sm = None if os.path.isfile(path) else split_member(path)
    try:
        if sm:
            members, why = scan_tar(sm[0])
            if sm[1] not in members:
                return f"no member {sm[1]!r} in shard {sm[0]}" + (f" ({why})" if why else "")
            off, size = members[sm[1]]
            with open(sm[0], "rb") as f:
                f.seek(off)
                img = Image.open(io.BytesIO(f.read(size)))
        elif not os.path.isfile(path):
            return f"image file not found: {path}"
        else:
            img = Image.open(path)
        with img:
            to_rgb(img)  # open() reads only the header; this decodes every pixel
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        return f"cannot decode image {path}: {type(e).__name__}: {e}"
    return None


def _decode_range(task):
    """Decode the images of records [a, b) (those without other faults); their faults."""
    man, a, b = task
    st = man.status
    out = []
    for i in range(a, b):
        if st[i]:
            continue
        try:
            img, _ = man.open_image(i)
            with img:
                to_rgb(img)
        except Exception as e:
            out.append((i + 1, f"cannot decode image {man.image_name(i)}: {type(e).__name__}: {e}"))
    return out


def check_manifest(path, fields=None, decode=True, label=False, index_dir=None, workers=0):
    """Check a whole manifest; return its Manifest when clean.

    fields: caption fields every record must have (None: only check the ones present).
    decode: fully decode every image with Pillow, in parallel (False: existence only, from the index).
    label:  every record must have an int label.
    Every fault is collected with its line number, then one ValueError lists them all (the first
    MAX_LISTED in full, then a count), so one run finds everything a training run would trip on.
    Indexing does the line checks once; later checks of the same manifest read the verdict."""
    man = Manifest(path, index_dir, workers)
    listed, n = man.faults(fields or (), label, "error")
    if decode and man.n:
        step = max(1, min(4096, man.n // (4 * (os.cpu_count() or 1)) + 1))
        tasks = [(man, a, min(a + step, man.n)) for a in range(0, man.n, step)]
        nproc = min(workers or os.cpu_count() or 1, len(tasks))
        bar = tqdm(total=man.n, desc=f"decode {os.path.basename(str(path))}", unit="img", disable=man.n < 5000,
                   leave=False, file=sys.stderr)
        with (mp.get_context("fork").Pool(nproc) if nproc > 1 else _Serial()) as pool:
            for (_, a, b), found in zip(tasks, pool.imap(_decode_range, tasks)):
                listed += found
                n += len(found)
                bar.update(b - a)
        bar.close()
        listed.sort(key=lambda x: x[0])
    if n:
        raise ValueError(fault_report(man.path, listed, n, man.n))
    return man


class _Serial:
    """A stand-in for a one-process Pool."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def imap(self, fn, tasks):
        return map(fn, tasks)


def caption_rows(records, field):
    """Flatten one caption field in manifest order: record 0's captions in their order, then record 1's,
    and so on. Returns (texts, image_index) with image_index[r] = the record (image) of text row r, an
    int64 array. The embedding cache stores its rows in exactly this order, so row r of `<field>.npy`
    embeds texts[r] and belongs to image image_index[r]. This materialises the whole field: fine for
    evaluation sets; at training scale use Manifest.rows / text / texts, which read on demand."""
    if isinstance(records, Manifest):
        m = records.meta["fields"].get(field)
        if m is None or m["missing"]:
            line = m["missing_lines"][0] if m else 1
            raise ValueError(f"{records.path}: record {line - 1} (line {line}) has no captions in field {field!r}")
        return records.texts(field), records.row_images(field)
    texts, index = [], []
    for i, rec in enumerate(records):
        caps = rec.get("captions", {}).get(field)
        if not caps:
            raise ValueError(f"record {i} (line {i + 1}) has no captions in field {field!r}")
        texts += caps
        index += [i] * len(caps)
    return texts, np.asarray(index, dtype=np.int64)


def rows_by_image(image_index):
    """caption_rows' image_index -> a list whose item i holds image i's rows (every image has some)."""
    return np.split(np.arange(len(image_index)), np.flatnonzero(np.diff(image_index)) + 1)

# -----------------------------------------------------------------------------
# images: every mode to 8-bit RGB with its full range; the towers' preprocessing (Pillow + numpy/torch)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _grey_to_rgb(a):
    """A 2-d uint8 array -> an RGB image."""
    return Image.fromarray(np.ascontiguousarray(a), "L").convert("RGB")


def _scale_to_8bit(a, lo, hi):
    """Linear map of [lo, hi] onto 0..255 (rounded), NaN to 0."""
    a = np.nan_to_num(a.astype(np.float64), nan=lo)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def to_rgb(img):
    """Any Pillow image -> 8-bit RGB with its full range (the module docstring's rules): 16-bit scaled
    by 255/65535 (Pillow's own convert clips it at 255), float from [0, 1] or its min..max, alpha dropped."""
    mode = img.mode
    if mode == "RGB":
        img.load()
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            return _grey_to_rgb(_scale_to_8bit(a, float(a.min()), float(a.max())))
        a = a.astype(np.uint32)
        return _grey_to_rgb(((a + 128) // 257).astype(np.uint8))  # round(v * 255 / 65535)
    if mode == "F":
        a = np.asarray(img)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        return _grey_to_rgb(_scale_to_8bit(a, lo, hi))
    if mode == "P" and "transparency" in img.info or mode in ("PA", "La", "RGBa"):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")  # 1, L, LA, P, RGBA, RGBX, CMYK, YCbCr, LAB, HSV: alpha dropped


def to_tensor(img, mean=CLIP_MEAN, std=CLIP_STD):
    """RGB PIL image -> (3, H, W) float32: scaled to [0, 1], then (x - mean) / std per channel (CLIP's by default)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (x - mean) / std


def as_preprocess(p):
    """A tower's preprocessing (M.ImagePreprocess; e.g. `tower.preprocess`), or an int: CLIP's preprocessing
    at that size (what the transforms took before towers carried their own)."""
    if isinstance(p, (int, np.integer)):
        return M.clip_preprocess(int(p))
    if p.resize not in ("shortest_side_crop", "square"):
        raise ValueError(f"ImagePreprocess.resize {p.resize!r}: expected 'shortest_side_crop' or 'square'")
    if p.resize == "square" and p.crop_size != p.size:
        raise ValueError(f"ImagePreprocess: resize 'square' takes crop_size == size, got {p.crop_size} and {p.size}")
    return p


def _resample(p):
    return Image.Resampling[p.resample.upper()]


DRAFT_MARGIN = 2  # JPEG draft decoding keeps at least this many source pixels per output pixel


def _draft(img, box, size):
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: it skips most of the decoding work)
    when the crop `box` (in full-size pixels) still has >= DRAFT_MARGIN source pixels per output pixel;
    returns the box in the decoded image's pixels (the same region). Other images: unchanged.
    Why a margin of 2: it is the rule of Pillow's own `reducing_gap=2` shortcut (reduce by an integer
    factor, then resample from >= 2x the target), and it changes the output about as little (bench/data.py:
    mean 0.3-0.4 levels of 255 at 224/336; a margin of 1 doubles that, with edges off by up to 46 levels).
    So it only acts on images >= 4x the target's side: 2000x1500 photos decode 1.4-1.6x faster, 500x375
    ones not at all."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L", "YCbCr"):
        return box
    side = min(box[2] - box[0], box[3] - box[1])
    s = 1
    while s < 8 and side / (2 * s) >= DRAFT_MARGIN * size:
        s *= 2
    if s == 1:
        return box
    W, H = img.size
    _, full = img.draft("RGB" if img.mode != "L" else "L", (max(1, W // s), max(1, H // s)))
    k = full[2] / W  # decoded pixels per full-size pixel (1/scale actually chosen)
    return tuple(v * k for v in box)


def eval_box(W, H, size, crop=None):
    """CLIP's eval geometry: shortest side to `size`, centre crop crop x crop (crop=None: size) ->
    (resized width, height, crop left, top). Sizes and offsets round like CLIP's own Resize + CenterCrop."""
    crop = size if crop is None else crop
    if W <= H:
        nw, nh = size, int(size * H / W)
    else:
        nw, nh = int(size * W / H), size
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    return nw, nh, left, top


def eval_transform(img, preprocess, draft=False):
    """A tower's eval transform. preprocess: an M.ImagePreprocess, or an int (CLIP's at that size).
    resize "shortest_side_crop" (CLIP): shortest side to size, centre crop crop_size x crop_size;
    "square" (SigLIP): the whole image to size x size, aspect ratio not kept. Both resample with the
    tower's filter, then normalise with its mean and std.
    draft=True: large JPEGs decode at a reduced scale first (_draft); the crop is the same region."""
    p = as_preprocess(preprocess)
    W, H = img.size
    c, rs = p.crop_size, _resample(p)
    if p.resize == "square":
        nw, nh, left, top = c, c, 0, 0
    else:
        nw, nh, left, top = eval_box(W, H, p.size, c)
    if draft:
        sx, sy = W / nw, H / nh
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        small = _draft(img, box, c)
        if small is not box:
            return to_tensor(to_rgb(img).resize((c, c), rs, box=small), p.image_mean, p.image_std)
    img = to_rgb(img)
    img = img.resize((nw, nh), rs)  # Pillow returns a copy when the size already matches
    return to_tensor(img.crop((left, top, left + c, top + c)), p.image_mean, p.image_std)


def random_resized_crop_box(W, H, generator, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, right, bottom) of a random resized crop (area fraction in `scale`, aspect ratio in
    `ratio`, log-uniform). All randomness from `generator` (a torch.Generator). The usual
    RandomResizedCrop rule: 10 tries, then the centred crop of the largest in-range aspect ratio."""
    u = torch.rand(10, 4, generator=generator, dtype=torch.float64).tolist()  # per try: area, aspect, x, y
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    for a, r, x, y in u:
        area = W * H * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = float(np.exp(lo + (hi - lo) * r))
        w, h = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < w <= W and 0 < h <= H:
            left, top = int(x * (W - w + 1)), int(y * (H - h + 1))  # uniform over every position
            return left, top, left + w, top + h
    w, h = W, H  # no try fit: the centred crop, its aspect ratio clamped into `ratio`
    if W / H > ratio[1]:
        w = int(round(H * ratio[1]))
    elif W / H < ratio[0]:
        h = int(round(W / ratio[0]))
    left, top = (W - w) // 2, (H - h) // 2
    return left, top, left + w, top + h


def train_transform(img, preprocess, generator, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), draft=False):
    """Random resized crop (random_resized_crop_box) resized to crop_size x crop_size with the tower's
    filter, normalised with its mean and std. preprocess: an M.ImagePreprocess, or an int (CLIP's at that
    size). A seed fixes the crop. For a "square" tower (SigLIP, whose eval squashes the whole image to a
    square) the aspect ratios in `ratio` are relative to the image's own, so crops are distorted as eval's
    squash distorts them, and scale = ratio = 1 is exactly its eval transform (as it is CLIP's for a
    square image). draft=True: large JPEGs decode at a reduced scale first; the crop is the same region."""
    p = as_preprocess(preprocess)
    W, H = img.size
    if p.resize == "square":
        ratio = (ratio[0] * W / H, ratio[1] * W / H)
    box = random_resized_crop_box(W, H, generator, scale, ratio)
    if draft:
        box = _draft(img, box, p.crop_size)
    return to_tensor(to_rgb(img).resize((p.crop_size, p.crop_size), _resample(p), box=box), p.image_mean, p.image_std)

# -----------------------------------------------------------------------------
# the image dataset

class ImageDataset(Dataset):
    """Images of a manifest, decoded with Pillow in DataLoader workers (files or tar members).

    item i -> (pixels (3, S, S) float32, the image index used, label (-1 if the record has none)), S the
    preprocessing's crop_size. Captions are not here: trainers pick them by the returned index
    (Manifest.rows, embedding cache).

    manifest: a path or a Manifest (no records are held: the index is memory-mapped, lines read on demand).
    preprocess: the image tower's preprocessing (an M.ImagePreprocess: `tower.preprocess`), applied as
    eval_transform / train_transform say; or size=n: CLIP's preprocessing at n (size 224 if neither).
    train=True: a random resized crop whose randomness depends only on (seed, epoch, i), never on the
    worker or the batch, so a resumed run sees the same crops. Call set_epoch(e) before iterating each
    epoch (before the DataLoader starts its workers: they copy the dataset), or ask for items (i, e).
    draft: JPEG draft decoding for large images (_draft); None (default) = for training only, so evaluation
    keeps CLIP's reference preprocessing exactly.

    A bad image (missing, or Pillow cannot decode it) raises ValueError naming the file (or shard and
    member) and the manifest line. With skip_bad=True it is replaced by the next image in manifest order
    that reads, so the returned index differs from the requested one; the replacement is a function of
    the files only (deterministic across workers, ranks and resumes). Each skipped image is marked in a
    shared-memory table every worker writes into, printed once to stderr, and listed by `skipped()`.
    """

    def __init__(self, manifest, size=None, train=False, seed=0, skip_bad=False, records=None, index_dir=None,
                 draft=None, preprocess=None):
        if size is not None and preprocess is not None:
            raise ValueError("ImageDataset: give size= (CLIP's preprocessing at that size) or preprocess=, not both")
        man = records if isinstance(records, Manifest) else manifest
        self.man = man if isinstance(man, Manifest) else Manifest(man, index_dir)
        self.manifest = self.man.path
        self.preprocess = as_preprocess(preprocess if preprocess is not None else size or 224)
        self.size = self.preprocess.crop_size  # the side of every item
        self.train, self.seed, self.skip_bad = train, seed, skip_bad
        self.draft = train if draft is None else draft
        self.epoch = 0
        self.bad = torch.zeros(len(self.man), dtype=torch.bool).share_memory_() if skip_bad else None

    def __len__(self):
        return len(self.man)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def path(self, i):
        return self.man.image_name(i)

    def _load(self, i, epoch):
        if self.man.status_of(i) & MISSING:
            raise FileNotFoundError(f"not found when the manifest was indexed (see {self.man.index}/faults.json)")
        img, _ = self.man.open_image(i)
        with img:
            if self.train:
                # seeded from (seed, epoch, i) only: the same crop whatever the worker, batch or resume point
                s = np.random.SeedSequence([self.seed, epoch, i]).generate_state(2)
                g = torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))
                return train_transform(img, self.preprocess, g, draft=self.draft)
            return eval_transform(img, self.preprocess, draft=self.draft)

    def __getitem__(self, i):
        epoch = self.epoch
        if isinstance(i, tuple):  # (i, epoch): that epoch's crop, whatever set_epoch said (trainers' samplers)
            i, epoch = i
        i = int(i)
        for tries in range(min(len(self.man), 1000)):
            j = (i + tries) % len(self.man)
            if self.bad is not None and self.bad[j]:
                continue
            try:
                x = self._load(j, epoch)
            except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
                msg = f"{self.manifest}:{j + 1}: cannot read image {self.path(j)}: {type(e).__name__}: {e}"
                if not self.skip_bad:
                    raise ValueError(msg + " (check_manifest finds every such fault; trainers' skip_bad=True "
                                           "replaces such images)") from e
                self.bad[j] = True
                print(f"skipping {msg}", file=sys.stderr)
                continue
            return x, j, self.man.label(j)
        raise ValueError(f"{self.manifest}: no readable image in the {tries + 1} lines from line {i + 1}")

    @property
    def n_skipped(self):
        return 0 if self.bad is None else int(self.bad.sum())

    def skipped(self):
        """(line, image) of every image skipped so far, in manifest order."""
        return [] if self.bad is None else [(i + 1, self.path(i)) for i in self.bad.nonzero().flatten().tolist()]


def collate(batch):
    """DataLoader collate_fn for ImageDataset: stacks into (pixels (B, 3, S, S), index (B,), label (B,));
    drops None items (none since skip_bad replaces bad images; kept for callers' own datasets)."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None

# -----------------------------------------------------------------------------
# CuPL descriptions (clip-benchmark's cupl_prompts.json), read by path

CUPL_INSTALL = "pip install --no-deps clip-benchmark==1.6.2"


def cupl_path():
    """Path of clip-benchmark's cupl_prompts.json, found without importing clip_benchmark (its
    __init__ may import open_clip and its image package)."""
    spec = importlib.util.find_spec("clip_benchmark")
    path = spec and os.path.join(spec.submodule_search_locations[0], "datasets", "cupl_prompts.json")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"clip-benchmark's cupl_prompts.json not found; install it with: {CUPL_INSTALL}")
    return path


def read_cupl(path=None):
    """{ImageNet class name: [CuPL descriptions]} (998 classes, about 150 descriptions each)."""
    with open(path or cupl_path(), encoding="utf-8") as f:
        return json.load(f)["imagenet1k"]


if __name__ == "__main__":
    from configurator import configure
    cfg = dict(manifest="", fields="", label=False, decode=True, index_dir="", workers=0)
    configure(cfg)
    if not cfg["manifest"]:
        sys.exit("usage: python dataset.py --manifest=m.jsonl [--fields=short,long] [--label=True] [--decode=False]")
    try:
        m = check_manifest(cfg["manifest"], [f for f in cfg["fields"].split(",") if f] or None, cfg["decode"],
                           cfg["label"], cfg["index_dir"] or None, cfg["workers"])
    except ValueError as e:
        sys.exit(str(e))
    print(f"{m.path}: {len(m)} records, clean; fields " +
          ", ".join(f"{f} ({m.n_rows(f)} captions)" for f in m.fields) + f"; index {m.index}")
