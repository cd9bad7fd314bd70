"""
The manifest's index (manifest.py's Manifest reads it): one parallel pass over the JSONL manifest
that checks every line and the tar members it names, then writes, in <manifest>.index/
(index_path): meta.json (what was indexed, counts, caption fingerprints, duplicates, the verdict,
and the record of every other file of the index: bytes, dtype and shape, filecheck.record_files),
faults.json (the first MAX_KEPT faults), and .npy columns: offsets (N + 1: record i is bytes
offsets[i]:offsets[i + 1]), ptr.<field> (N + 1: image i's captions are that field's rows
ptr[i]:ptr[i + 1], the embedding cache's order), labels (-1: none), status (bits BAD, MISSING,
NO_CAPTIONS), member (shard, offset, size: shards only).

_stale(manifest, index) says why an index cannot be used: none yet, the manifest or a shard
changed, or "damaged: <file>: <why>" when a file of the index differs from its record. Manifest
then rebuilds it, saying why. Rebuilding is always safe (the index holds nothing the manifest and
its shards do not) and costs one pass over the manifest.

Tar shards: "s/00000.tar/KEY.jpg" names the member KEY.jpg of s/00000.tar. A member name twice in
one shard: the first is read, and each repeat is counted and named (meta.json
"duplicate_members"). Lines naming members of the same KEY in two shards are both kept, counted and
named (meta.json "duplicate_keys"), as lines naming the same image path are ("duplicates").
Known limit: a shard edited in place to the same size with its modification time restored leaves
the index stale (shards are compared by size and mtime only); `python manifest.py --manifest=m.jsonl
--rebuild=True` is the full verification (the index made anew, every image decoded).
"""

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tarfile
import time

import numpy as np
from tqdm import tqdm

from filecheck import file_faults, record_files

KEYS = ("image", "captions", "label")
MAX_LISTED = 20   # faults listed in full in an error; the rest are counted
MAX_KEPT = 1000   # faults kept in the index's faults.json
INDEX_VERSION = 3  # 3: files recorded in meta.json, duplicate keys and members counted
                   # (2: caption fingerprints are blake2b digests; 1: a polynomial hash)
CHUNK_BYTES = 16 << 20  # manifest bytes per indexing task
FIELD_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # caption fields name files (<field>.npy): no paths
BAD, MISSING, NO_CAPTIONS = 1, 2, 4  # status bits
NONE = bytes(16)  # the caption digest of an image without the field
MEMBER = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i8")])  # where a tar member lies
NO_MEMBER = np.array((-1, 0, 0), MEMBER)  # a plain file

# -----------------------------------------------------------------------------
# one record, one tar member

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
        faults.append("'captions' must be an object {field: [captions]}, "
                      f"got {type(caps).__name__}")
    elif caps:
        for field, texts in caps.items():
            if field not in _GOOD_FIELDS:
                if not FIELD_NAME.match(field):
                    faults.append(f"caption field name {field!r} must be letters, digits, '_' "
                                  "or '-'")
                elif len(_GOOD_FIELDS) < 1000:
                    _GOOD_FIELDS.add(field)
            if not isinstance(texts, list) or not texts:
                faults.append(f"caption field {field!r} must be a non-empty list of strings, "
                              f"got {texts!r:.60}")
                continue
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
    """'d/00000.tar/KEY.jpg' -> ('d/00000.tar', 'KEY.jpg') if d/00000.tar is a file, else None."""
    at = path.find(".tar/")
    while at >= 0:
        if os.path.isfile(path[:at + 4]):
            return path[:at + 4], path[at + 5:]
        at = path.find(".tar/", at + 1)
    return None

def scan_tar(shard, dups=None):
    """({member name: (data offset, size)} of a tar file's regular members, from its headers only;
    why the scan stopped early, or None): a truncated or corrupt shard keeps the members before the
    damage; a member whose data runs past the end of the file is left out and named. A name that
    comes twice: the first is kept, and the name is appended to the list `dups` if one is given."""
    size, members, why = os.path.getsize(shard), {}, None
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    why = (f"truncated: member {m.name} needs bytes up to "
                           f"{m.offset_data + m.size}, the file has {size}")
                    break
                if m.name in members:
                    if dups is not None:
                        dups.append(m.name)
                    continue
                members[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        why = f"corrupt after {len(members)} members ({type(e).__name__}: {e})"
    return members, why

# -----------------------------------------------------------------------------
# indexing: one task per byte range of the manifest

def _caption_digest(texts):
    """16 bytes for one image's captions of one field (each length-prefixed: no join ambiguity). A
    field's fingerprint is the blake2b of these, image after image in manifest order."""
    data = b"".join(len(b).to_bytes(8, "little") + b for b in (t.encode("utf-8") for t in texts))
    return hashlib.blake2b(data, digest_size=16).digest()

def _update_none(h, n):
    """Feed a fingerprint n images that lack its field."""
    block = NONE * min(n, 1 << 16)
    while n > 0:
        h.update(block[:16 * n])
        n -= len(block) // 16

def _scan_chunk(task):
    """Parse and check the lines that start in bytes [start, end) of the manifest: per-line arrays,
    the faults, and per caption field the digests of these lines (NONE where a line lacks it)."""
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
    khash = np.zeros(n, np.uint64)  # a tar member's key (its name less the extension); 0: a file
    counts, digests = {}, {}  # field -> caption count per line; field -> 16 digest bytes per line
    faults = []  # (local line index, message), the first MAX_KEPT
    n_faults = n_fault_lines = n_missing = 0
    exists, tars, shard_ids = {}, {}, {}
    member = None  # MEMBER per line, made when the first tar member appears
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
            digest = hashlib.blake2b(img.encode("utf-8"), digest_size=8).digest()
            phash[k] = int.from_bytes(digest, "little")
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
                        dups = []
                        tars[shard] = (*scan_tar(shard, dups), dups)
                        shard_ids[shard] = len(shard_ids)
                    members, broken, _ = tars[shard]
                    key = name.rpartition(".")[0] or name
                    khash[k] = int.from_bytes(hashlib.blake2b(
                        key.encode("utf-8"), digest_size=8).digest(), "little") | 1
                    if name in members:
                        if member is None:
                            member = np.full(n, NO_MEMBER, MEMBER)
                        member[k] = (shard_ids[shard], *members[name])
                    else:
                        missing = f"no member {name!r} in shard {shard}" + \
                            (f" ({broken})" if broken else "")
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
                digests[field] = bytearray(NONE * n)
            counts[field][k] = len(texts)
            digests[field][16 * k:16 * k + 16] = _caption_digest(texts)
        if not status[k] & BAD and "label" in rec:
            labels[k] = rec["label"]
    shards = [(s, os.stat(s).st_size, os.stat(s).st_mtime_ns, tars[s][1], tars[s][2])
              for s in shard_ids]
    return dict(n=n, end=p if n else pos, offsets=offsets, labels=labels, status=status,
                phash=phash, khash=khash, counts=counts, digests=digests, faults=faults,
                n_faults=n_faults,
                n_fault_lines=n_fault_lines, n_missing=n_missing, member=member, shards=shards)

class _Column:
    """A 1-d .npy appended to in pieces, its length known only at close(): numpy's header is written
    for length 0, then rewritten in place with the final length (numpy pads a 1-d header to a size
    that does not depend on the length, for exactly this)."""

    def __init__(self, path, dtype, fill=None, n=0):
        self.f, self.dtype, self.n = open(path, "wb"), np.dtype(dtype), 0
        self.data = self._header()
        self.fill(fill, n)

    def _header(self):
        """Write the header at the start of the file; the offset of the data after it."""
        self.f.seek(0)
        descr = np.lib.format.dtype_to_descr(self.dtype)
        np.lib.format.write_array_header_1_0(
            self.f, {"descr": descr, "fortran_order": False, "shape": (self.n,)})
        return self.f.tell()

    def write(self, a):
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.n += len(a)

    def fill(self, value, n):
        for k in range(0, n, 1 << 20):  # n copies of value, in blocks of bounded size
            self.write(np.full(min(n - k, 1 << 20), value, self.dtype))

    def close(self):
        assert self._header() == self.data, f"{self.f.name}: the .npy header changed size"
        self.f.close()

def _sample_digest(path, size):
    """sha256 of the first and last 64 KiB of a file and 16 blocks of 4 KiB spread between: the
    cheap content check (beside size and mtime) that tells an index it is stale."""
    h = hashlib.sha256(str(size).encode())
    spots = [(0, 1 << 16), (max(0, size - (1 << 16)), 1 << 16)]
    spots += [(size * k // 17, 4096) for k in range(1, 17)]
    with open(path, "rb") as f:
        for at, n in spots:
            f.seek(at)
            h.update(f.read(n))
    return h.hexdigest()

def index_path(manifest, index_dir=None):
    """Where a manifest's index lives: beside it, or in index_dir (named after its path)."""
    path = os.path.abspath(str(manifest))
    if not index_dir:
        return path + ".index"
    tag = hashlib.sha1(path.encode()).hexdigest()[:10]
    return os.path.join(os.path.abspath(index_dir), f"{os.path.basename(path)}-{tag}.index")

def _stale(path, index):
    """None if `index` holds a current index of the manifest `path`, else why not ("damaged: ..."
    if a file of the index differs from what its meta.json records)."""
    try:
        meta = _read_json(os.path.join(index, "meta.json"))
    except FileNotFoundError:
        return "no index yet"
    except (OSError, ValueError) as e:
        return f"damaged: its meta.json does not read ({type(e).__name__}: {e})"
    if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
        return f"index version {meta.get('version')}, this code writes {INDEX_VERSION}" \
            if isinstance(meta, dict) else "damaged: its meta.json is not an object"
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
    bad = file_faults(index, meta.get("files", {}))
    if bad:
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        return f"damaged: {bad[0][0]}: {bad[0][1]}{more}"
    return None

def _imap(fn, tasks, workers):
    """fn over tasks, results in order: in `workers` forked processes (<= 1: in this one)."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(fn, tasks)

def build_index(path, index, workers=0):
    """Index a manifest into the folder `index` (written under a temporary name, then swapped in).
    workers: processes over byte ranges (0: every core). Returns the meta dict."""
    path = os.path.abspath(path)
    root = os.path.dirname(path)
    st = os.stat(path)
    t0 = time.time()
    tasks = [(path, root, s, min(s + CHUNK_BYTES, st.st_size))
             for s in range(0, st.st_size, CHUNK_BYTES)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    tmp = f"{index}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def column(name, dtype, fill=None, n=0):
        return _Column(os.path.join(tmp, f"{name}.npy"), dtype, fill, n)
    w = {name: column(name, dt) for name, dt in
         (("offsets", np.int64), ("labels", np.int32), ("status", np.uint8), ("phash", np.uint64),
          ("khash", np.uint64))}
    ptr, total, fp, missing_lines, n_missing_field = {}, {}, {}, {}, {}
    faults, shards, shard_ids = [], [], {}
    N = n_faults = n_fault_lines = n_missing = n_labelled = 0
    end = 0
    bar = tqdm(total=st.st_size, unit="B", unit_scale=True, file=sys.stderr,
               desc=f"indexing {os.path.basename(path)}", disable=st.st_size < (64 << 20))
    for task, r in zip(tasks, _imap(_scan_chunk, tasks, workers)):
        bar.update(task[3] - task[2])
        n = r["n"]
        if not n:
            continue
        end = r["end"]
        for name in ("offsets", "labels", "status", "phash", "khash"):
            w[name].write(r[name])
        n_labelled += int(np.count_nonzero(r["labels"] >= 0))
        for field in r["counts"]:
            if field not in ptr:  # first seen here: every earlier image lacks it
                ptr[field] = column(f"ptr.{field}", np.int64, 0, N + 1)
                total[field], fp[field] = 0, hashlib.blake2b(digest_size=16)
                _update_none(fp[field], N)
                missing_lines[field] = list(range(1, min(N, MAX_LISTED) + 1))
                n_missing_field[field] = N
        for field in ptr:
            c = r["counts"].get(field)
            if c is None:
                ptr[field].fill(total[field], n)
                _update_none(fp[field], n)
                lacking = np.arange(n)
            else:
                ptr[field].write(total[field] + np.cumsum(c, dtype=np.int64))
                total[field] += int(c.sum(dtype=np.int64))
                fp[field].update(r["digests"][field])
                lacking = np.flatnonzero(c == 0)
            n_missing_field[field] += len(lacking)
            if len(missing_lines[field]) < MAX_LISTED:
                missing_lines[field] += (lacking[:MAX_LISTED] + N + 1).tolist()
        if r["member"] is not None or r["shards"] or "member" in w:
            if "member" not in w:
                w["member"] = column("member", MEMBER, NO_MEMBER, N)  # every earlier line: a file
            local = []
            for s, size, mtime, why, dups in r["shards"]:
                if s not in shard_ids:
                    shard_ids[s] = len(shards)
                    shards.append([os.path.relpath(s, root), size, mtime, why, dups])
                local.append(shard_ids[s])
            if r["member"] is None:
                w["member"].fill(NO_MEMBER, n)
            else:
                m, sid = r["member"], r["member"]["shard"]
                m["shard"] = np.where(sid >= 0, np.array(local + [0], np.int32)[sid], -1)  # global
                w["member"].write(m)
        if len(faults) < MAX_KEPT:
            faults += [(N + 1 + k, msg) for k, msg in r["faults"]]
        n_faults += r["n_faults"]
        n_fault_lines += r["n_fault_lines"]
        n_missing += r["n_missing"]
        N += n
    bar.close()
    if N == 0:
        faults, n_faults, n_fault_lines = [(0, "the manifest is empty")], 1, 1
    w["offsets"].write([end])
    for x in list(w.values()) + list(ptr.values()):
        x.close()
    status = np.load(os.path.join(tmp, "status.npy"), mmap_mode="r")
    n_bad = int(np.count_nonzero(status & BAD)) if N else 1
    none = {"count": 0, "examples": []}
    dup = _duplicates(path, tmp, N) if n_bad == 0 and N else none
    dup_keys = _duplicate_keys(path, tmp) if n_bad == 0 and N and shards else none
    os.remove(os.path.join(tmp, "phash.npy"))
    os.remove(os.path.join(tmp, "khash.npy"))
    dup_members = [[s[0], name] for s in shards for name in s[4]]
    fields = {f: dict(captions=total[f], missing=n_missing_field[f], fingerprint=fp[f].hexdigest(),
                      missing_lines=missing_lines[f][:MAX_LISTED]) for f in sorted(ptr)}
    meta = dict(version=INDEX_VERSION, manifest=path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                sample_sha256=_sample_digest(path, st.st_size), lines=N, valid=n_bad == 0,
                faults=n_faults, fault_lines=n_fault_lines, bad_lines=n_bad,
                missing_images=n_missing, fields=fields,
                no_captions=int(np.count_nonzero(status & NO_CAPTIONS)) if N else 0,
                labels=dict(count=n_labelled), duplicates=dup, duplicate_keys=dup_keys,
                duplicate_members=dict(count=len(dup_members), examples=dup_members[:5]),
                shards=[s[:3] for s in shards],
                broken_shards=[[s[0], s[3]] for s in shards if s[3]],
                seconds=round(time.time() - t0, 2), workers=workers)
    del status
    with open(os.path.join(tmp, "faults.json"), "w") as f:
        json.dump(faults[:MAX_KEPT], f)
    # what opening checks before any use (a cut or missing column is rebuilt, never misread)
    meta["files"] = record_files(tmp, sorted(n for n in os.listdir(tmp) if n != "meta.json"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    old = f"{index}.old{os.getpid()}"
    if os.path.exists(index):
        os.replace(index, old)
    os.replace(tmp, index)
    shutil.rmtree(old, ignore_errors=True)
    return meta

def _duplicates(path, folder, N):
    """{"count": records naming an image an earlier one names, "examples": [[line, line, path]]}"""
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

def _duplicate_keys(path, folder):
    """{"count": lines whose tar member has the key (name less extension) of a member of another
    shard or name an earlier line names, "examples": [[line, line, key]]}: the same image twice in
    a set of shards (both lines are kept)."""
    k = np.load(os.path.join(folder, "khash.npy"), mmap_mode="r")
    h = np.load(os.path.join(folder, "phash.npy"), mmap_mode="r")
    at = np.flatnonzero(np.asarray(k) != 0)
    pairs = np.unique(np.stack([k[at], h[at]], 1), axis=0)  # (key, image path): one per image
    keys, n_images = np.unique(pairs[:, 0], return_counts=True)
    count = int((n_images - 1).sum())
    examples = []
    if count:
        offsets = np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r")
        with open(path, "rb") as f:
            for v in keys[n_images > 1][:5]:
                lines = at[np.asarray(k[at]) == v]
                first = lines[0]
                b = lines[np.asarray(h[lines]) != h[first]][0]
                imgs = []
                for i in (first, b):
                    f.seek(int(offsets[i]))
                    imgs.append(json.loads(f.read(int(offsets[i + 1] - offsets[i])))["image"])
                key = imgs[0].rsplit("/", 1)[-1].rpartition(".")[0]
                examples.append([int(first) + 1, int(b) + 1, key, imgs[0], imgs[1]])
    return {"count": count, "examples": sorted(examples)}

def _read_json(path):
    with open(path) as f:
        return json.load(f)

