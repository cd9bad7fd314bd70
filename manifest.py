"""
The JSONL manifest and its index. One image per line, record i on line i + 1 (no blank lines):
    {"image": "img/0.png", "captions": {"short": ["...", ...], "long": [...]}, "label": 3}
`image` is relative to the manifest's folder (or absolute); "s/00000.tar/KEY.jpg" is the member
KEY.jpg of the tar file s/00000.tar, read in place. `captions` (optional): {field: a non-empty list
of non-blank strings}, field names of letters, digits, "_", "-". `label` (optional): an int >= 0.

The index, built on first use in parallel over byte ranges, in <manifest>.index/ (or, for manifests
in read-only places, index_dir/<name>-<hash of its path>.index/): meta.json (what was indexed,
counts, caption fingerprints, duplicates, the verdict), faults.json (the first MAX_KEPT faults), and
.npy columns: offsets (N + 1: record i is bytes offsets[i]:offsets[i + 1]), ptr.<field> (N + 1:
image i's captions are that field's rows ptr[i]:ptr[i + 1], the embedding cache's order), labels
(-1: none), status (bits BAD, MISSING, NO_CAPTIONS), member (shard, offset, size: shards only).
It is rebuilt when the manifest or a shard changed (size, mtime, a sample of the bytes). Every fault
of every line is found then, so Manifest.check costs nothing on a clean manifest.

    man = Manifest("train.jsonl").check(fields=["short", "long"])  # indexed on first use
    python manifest.py --manifest=m.jsonl --fields=short,long --decode=True  # the full check
"""

import fcntl
import glob
import hashlib
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
from PIL import Image
from tqdm import tqdm

from images import to_rgb

KEYS = ("image", "captions", "label")
MAX_LISTED = 20   # faults listed in full in an error; the rest are counted
MAX_KEPT = 1000   # faults kept in the index's faults.json
INDEX_VERSION = 2  # 2: caption fingerprints are blake2b digests (1: a polynomial hash)
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

def scan_tar(shard):
    """({member name: (data offset, size)} of a tar file's regular members, from its headers only;
    why the scan stopped early, or None): a truncated or corrupt shard keeps the members before the
    damage; a member whose data runs past the end of the file is left out and named."""
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
                        tars[shard] = scan_tar(shard)
                        shard_ids[shard] = len(shard_ids)
                    members, broken = tars[shard]
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
    shards = [(s, os.stat(s).st_size, os.stat(s).st_mtime_ns, tars[s][1]) for s in shard_ids]
    return dict(n=n, end=p if n else pos, offsets=offsets, labels=labels, status=status,
                phash=phash, counts=counts, digests=digests, faults=faults, n_faults=n_faults,
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
    """None if `index` holds a current index of the manifest `path`, else why not."""
    try:
        meta = _read_json(os.path.join(index, "meta.json"))
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
         (("offsets", np.int64), ("labels", np.int32), ("status", np.uint8), ("phash", np.uint64))}
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
        for name in ("offsets", "labels", "status", "phash"):
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
            for s, size, mtime, why in r["shards"]:
                if s not in shard_ids:
                    shard_ids[s] = len(shards)
                    shards.append([os.path.relpath(s, root), size, mtime, why])
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
    dup = _duplicates(path, tmp, N) if n_bad == 0 and N else {"count": 0, "examples": []}
    os.remove(os.path.join(tmp, "phash.npy"))
    fields = {f: dict(captions=total[f], missing=n_missing_field[f], fingerprint=fp[f].hexdigest(),
                      missing_lines=missing_lines[f][:MAX_LISTED]) for f in sorted(ptr)}
    meta = dict(version=INDEX_VERSION, manifest=path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                sample_sha256=_sample_digest(path, st.st_size), lines=N, valid=n_bad == 0,
                faults=n_faults, fault_lines=n_fault_lines, bad_lines=n_bad,
                missing_images=n_missing, fields=fields,
                no_captions=int(np.count_nonzero(status & NO_CAPTIONS)) if N else 0,
                labels=dict(count=n_labelled), duplicates=dup, shards=[s[:3] for s in shards],
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

# -----------------------------------------------------------------------------
# the manifest: index arrays memory-mapped, records read on demand

class Manifest:
    """A JSONL manifest through its index (built on first use, rebuilt when stale): arrays are
    memory maps, records are read from the file by offset, nothing per image is held. Picklable (for
    DataLoader workers started by spawn): maps and files reopen lazily. The one way to open one:
        man = Manifest(path, index_dir=None, workers=0, quiet=False).check(fields, label, images)
    man[i] is record i as a dict; man.rows(field, i), man.texts(field, a, b): the cache's rows."""

    def __init__(self, path, index_dir=None, workers=0, quiet=False):  # workers 0: every core
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such manifest")
        self.abspath = os.path.abspath(self.path)
        self.root = os.path.dirname(self.abspath)
        self.index = index_path(self.path, index_dir)
        self.workers = workers
        self.meta = self._open(workers, quiet)
        self.n = self.meta["lines"]
        self._maps, self._files, self._fd, self._shard_fds = {}, {}, None, {}

    def _open(self, workers, quiet):
        """The index's meta dict, after (re)building the index if it is missing or stale."""
        meta_path = os.path.join(self.index, "meta.json")
        if _stale(self.abspath, self.index) is None:
            return _read_json(meta_path)
        try:
            os.makedirs(os.path.dirname(self.index), exist_ok=True)
            with open(self.index + ".lock", "a") as lock:  # one builder; the other ranks wait
                fcntl.flock(lock, fcntl.LOCK_EX)
                why = _stale(self.abspath, self.index)
                if why is None:  # built by another rank meanwhile
                    return _read_json(meta_path)
                for old in glob.glob(glob.escape(self.index) + ".tmp*") + \
                        glob.glob(glob.escape(self.index) + ".old*"):
                    shutil.rmtree(old, ignore_errors=True)  # left by a builder that was killed
                if not quiet:
                    print(f"{self.path}: indexing into {self.index} ({why})", file=sys.stderr)
                meta = build_index(self.abspath, self.index, workers)
        except OSError as e:
            raise OSError(f"{self.path}: cannot write its index {self.index} ({e}); set index_dir "
                          f"to a writable folder (--index_dir=...)") from None
        if not quiet:
            d = meta["duplicates"]
            ex = "; ".join(f"lines {a} and {b}: {p}" for a, b, p in d["examples"][:3])
            print(f"{self.path}: indexed {meta['lines']} lines in {meta['seconds']:.1f}s with "
                  f"{meta['workers']} process(es)" + (f"\n{self.path}: warning: {d['count']} "
                  f"record(s) name an image an earlier line names ({ex})" if d["count"] else ""),
                  file=sys.stderr)
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
        """k elements of an index array from position i, by one pread (through the map, each lookup
        would map a 64 KiB window, and a long run would hold the whole index in every process)."""
        e = self._files.get(name)
        if e is None:
            path = os.path.join(self.index, f"{name}.npy")
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                _, _, dt = getattr(np.lib.format, "read_array_header_%d_%d" % version)(f)
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
        """Bytes of records start..stop-1 (one pread: safe in forked workers sharing the fd)."""
        if self._fd is None:
            self._fd = os.open(self.abspath, os.O_RDONLY)
        o = self._at("offsets", start, stop - start + 1)
        return os.pread(self._fd, int(o[-1] - o[0]), int(o[0]))

    def __getitem__(self, i):
        """Record i as a dict, parsed from its line."""
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"{self.path}: record {i} of {self.n}")
        return json.loads(self._read(i, i + 1))

    def label(self, i):
        """Record i's label (-1: none)."""
        return int(self._at("labels", i)[0])

    @property
    def labels(self):
        """int32 (N,) memory map, -1 where a record has none."""
        return self._array("labels")

    @property
    def status(self):
        """uint8 (N,) memory map of status bits (BAD, MISSING, NO_CAPTIONS)."""
        return self._array("status")

    def open_image(self, i):
        """(PIL image, its name for messages): a file, or a tar member read in place with one
        pread. FileNotFoundError if the image was missing when the manifest was indexed."""
        if int(self._at("status", i)[0]) & MISSING:
            raise FileNotFoundError("not found when the manifest was indexed "
                                    f"(see {self.index}/faults.json)")
        rel = self[i]["image"]
        sid, off, size = (self._at("member", i)[0] if self.meta["shards"] else NO_MEMBER).item()
        if sid < 0:
            path = os.path.join(self.root, rel)
            return Image.open(path), path
        shard = os.path.join(self.root, self.meta["shards"][sid][0])
        fd = self._shard_fds.pop(shard, None)  # (re)inserted last: the dict is in LRU order
        if fd is None:
            fd = os.open(shard, os.O_RDONLY)
            while len(self._shard_fds) >= 32:  # a few open shards per worker
                os.close(self._shard_fds.pop(next(iter(self._shard_fds))))
        self._shard_fds[shard] = fd
        data = os.pread(fd, size, off)
        name = f"{shard} member {rel[rel.find('.tar/') + 5:]}"
        if len(data) != size:
            raise OSError(f"{name}: {len(data)} of {size} bytes (the shard was truncated after "
                          "indexing)")
        return Image.open(io.BytesIO(data)), name

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
            lo, hi = (mid, hi) if int(self._at(f"ptr.{field}", mid)[0]) <= r else (lo, mid)
        return lo

    def text(self, field, r):
        """The caption of row r of `field`."""
        i = self.image_of_row(field, r)
        return self.captions(i, field)[r - self.row_range(field, i)[0]]

    def texts(self, field, start=0, stop=None):
        """Captions of rows start..stop-1 of `field`, in row order, from one read of the lines that
        hold them (a cache chunk's texts: no whole field in memory)."""
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

    def row_images(self, field):
        """int64 (n_rows,): the image of each row of `field`."""
        rows = np.arange(self.n_rows(field))
        return np.searchsorted(np.asarray(self.ptr(field)), rows, side="right") - 1

    def rows_of(self, field):
        """A lazy sequence: item i = image i's rows of `field`."""
        return _Lazy(len(self), lambda i: self.rows(field, i))

    def texts_of(self, field):
        """A lazy sequence: item r = the caption of row r of `field`."""
        return _Lazy(self.n_rows(field), lambda r: self.text(field, r))

    def fingerprint(self, field):
        """The captions' fingerprint (a blake2b digest, over images in order, of each image's
        captions in that field): changes if any caption, its order or its image changes."""
        return self.meta["fields"][field]["fingerprint"] if field in self.meta["fields"] else None

    # the check ----------------------------------------------------------------
    def check(self, fields=(), label=False, images="error", decode=False):
        """Refuse (ValueError naming the manifest, then each line and why: the first MAX_LISTED,
        then a count) if a record this use reads is faulty: any record fault; an image lacking a
        caption field of `fields`, or a label (label=True); a missing image (images="error";
        "skip": counted on stderr, trainers' skip_bad replaces it; "ignore": text-only use).
        decode=True: also every image Pillow cannot decode (in parallel; hours at 10M images).
        Returns self. Free when clean and decode=False: the index holds the verdict."""
        fields = list(fields or ())
        listed, n = [], 0
        if self.meta["bad_lines"] or fields or label or decode or \
                (images == "error" and self.meta["missing_images"]):
            listed, n = self._faults(fields, label, images)
        if decode and self.n:
            found = self._decode_faults()
            listed = sorted(listed + found, key=lambda x: x[0])
            n += len(found)
        if n:
            raise ValueError(_fault_report(self.path, listed, n, self.n))
        if images == "skip" and self.meta["missing_images"]:
            print(f"{self.path}: {self.meta['missing_images']} image(s) missing (see "
                  f"{self.index}/faults.json); skip_bad replaces each by the next readable image",
                  file=sys.stderr)
        return self

    def _faults(self, fields, label, images):
        """The faults for this use, as sorted (line, message), and their count: the index's own
        (missing images only if images="error"), images that lack a field or a label."""
        listed = [tuple(x) for x in _read_json(os.path.join(self.index, "faults.json"))]
        n = self.meta["faults"]
        if images != "error":  # missing images are not faults here (text-only use, or skipped)
            missing = ("image file not found", "no member ")
            listed = [x for x in listed if not x[1].startswith(missing)]
            n -= self.meta["missing_images"]
        have = self.meta["fields"]
        need = [f for f in fields if f not in have or have[f]["missing"]]
        if need or (label and self.meta["labels"]["count"] < self.n):
            st = np.asarray(self.status)
            good, nocap = st & BAD == 0, st & NO_CAPTIONS != 0
            done = np.zeros(self.n, bool)  # lines already said to have no captions at all

            def add(where, msg):
                nonlocal n
                listed.extend((i + 1, msg) for i in np.flatnonzero(where)[:MAX_KEPT].tolist())
                n += int(np.count_nonzero(where))
            for f in need:
                lack = good & (np.diff(self.ptr(f)) == 0 if f in have else True)
                add(lack & nocap & ~done, "missing key 'captions'")
                done |= lack & nocap
                add(lack & ~nocap, f"caption field {f!r} is missing")
            if label:
                add(good & (np.asarray(self.labels) < 0), "missing key 'label'")
        return sorted(listed, key=lambda x: x[0]), n

    def _decode_faults(self):
        """(line, why) of each image Pillow cannot decode (in self.workers processes; 0: all)."""
        step = max(1, min(4096, self.n // (4 * (os.cpu_count() or 1)) + 1))
        tasks = [(self, a, min(a + step, self.n)) for a in range(0, self.n, step)]
        workers = min(self.workers or os.cpu_count() or 1, len(tasks))
        bar = tqdm(total=self.n, desc=f"decode {os.path.basename(self.path)}", unit="img",
                   disable=self.n < 5000, leave=False, file=sys.stderr)
        found = []
        for (_, a, b), f in zip(tasks, _imap(_decode_range, tasks, workers)):
            found += f
            bar.update(b - a)
        bar.close()
        return found

def _decode_range(task):
    """Decode the images of records [a, b) whose record and file are sound; their faults."""
    man, a, b = task
    st = man.status
    out = []
    for i in range(a, b):
        if st[i] & (BAD | MISSING):
            continue
        try:
            img, _ = man.open_image(i)
            with img:
                to_rgb(img)  # open() reads only the header; this decodes every pixel
        except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            why = f"cannot decode image {man.image_name(i)}: {type(e).__name__}: {e}"
            out.append((i + 1, why))
    return out

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
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.get(i % self.n)

def _fault_report(path, listed, n, n_lines):
    """One error text: '<path>: K fault(s) on L of N lines:' then the first MAX_LISTED, then a
    count (L is exact when every fault is listed; past MAX_KEPT it counts the listed ones)."""
    lines = len({ln for ln, _ in listed})
    shown = [f"  line {ln}: {msg}" for ln, msg in listed[:MAX_LISTED]]
    if n > MAX_LISTED:
        shown.append(f"  ... and {n - MAX_LISTED} more")
    on = "on" if n == len(listed) else "on at least"
    return f"{path}: {n} fault(s) {on} {lines} of {n_lines} lines:\n" + "\n".join(shown)

def caption_rows(records, field):
    """One caption field flattened in manifest order (record 0's captions, then record 1's, ...),
    the embedding cache's row order: (texts, image_index), image_index[r] (int64) the record of row
    r. records: a Manifest or a list of records. It holds the whole field: for evaluation sets; at
    training scale Manifest.rows / text / texts read on demand."""
    if isinstance(records, Manifest):
        m = records.meta["fields"].get(field)
        if m is None or m["missing"]:
            line = m["missing_lines"][0] if m else 1
            raise ValueError(f"{records.path}: record {line - 1} (line {line}) has no captions in "
                             f"field {field!r}")
        return records.texts(field), records.row_images(field)
    texts, index = [], []
    for i, rec in enumerate(records):
        caps = rec.get("captions", {}).get(field)
        if not caps:
            raise ValueError(f"record {i} (line {i + 1}) has no captions in field {field!r}")
        texts += caps
        index += [i] * len(caps)
    return texts, np.asarray(index, dtype=np.int64)

if __name__ == "__main__":
    from configurator import configure
    cfg = dict(manifest="", fields="", label=False, decode=True, index_dir="", workers=0)
    configure(cfg)
    if not cfg["manifest"]:
        sys.exit("usage: python manifest.py --manifest=m.jsonl [--fields=short,long] "
                 "[--label=True] [--decode=False] [--index_dir=...] [--workers=n]")
    try:
        m = Manifest(cfg["manifest"], cfg["index_dir"] or None, cfg["workers"]).check(
            [f for f in cfg["fields"].split(",") if f], cfg["label"], decode=cfg["decode"])
    except ValueError as e:
        sys.exit(str(e))
    print(f"{m.path}: {len(m)} records, clean; fields " +
          ", ".join(f"{f} ({m.n_rows(f)} captions)" for f in m.fields) + f"; index {m.index}")
