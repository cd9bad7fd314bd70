"""
The JSONL manifest and its index. One image per line, record i on line i + 1 (no blank lines):
    {"image": "img/0.png", "captions": {"short": ["...", ...], "long": [...]}, "label": 3}
`image` is relative to the manifest's folder (or absolute); "s/00000.tar/KEY.jpg" is the member
KEY.jpg of the tar file s/00000.tar, read in place. `captions` (optional): {field: a non-empty list
of non-blank strings}, field names of letters, digits, "_", "-". `label` (optional): an int >= 0.

The index (manifest_index.py), built on first use in parallel over byte ranges, in
<manifest>.index/ (or, for manifests in read-only places, index_dir/<name>-<hash of its
path>.index/): meta.json, faults.json and .npy columns (offsets, ptr.<field>, labels, status,
member). It is rebuilt when the manifest or a shard changed (size, mtime, a sample of the bytes),
and when a file of it differs from what its meta.json records (a cut or deleted column: said on
stderr). Every fault of every line is found then, so Manifest.check costs nothing on a clean
manifest. Duplicates are counted, named and kept: image paths named twice, tar keys in two
shards, member names twice in one shard (the first is read).

    man = Manifest("train.jsonl").check(fields=["short", "long"])  # indexed on first use
    python manifest.py --manifest=m.jsonl --fields=short,long --decode=True  # the full check
"""

import fcntl
import glob
import io
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from images import to_rgb
# the index (split out); names re-exported for the scripts that import them from here
from manifest_index import (BAD, MAX_KEPT, MAX_LISTED, MISSING, NO_CAPTIONS,  # noqa: F401
                            NO_MEMBER,
                            _imap, _read_json, _stale, build_index, index_path, scan_tar,
                            split_member)

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
                if why.startswith("damaged"):  # said even when quiet: a file was lost
                    print(f"{self.path}: its index {self.index} is {why}; rebuilding it (it holds "
                          f"nothing the manifest and its shards do not)", file=sys.stderr)
                elif not quiet:
                    print(f"{self.path}: indexing into {self.index} ({why})", file=sys.stderr)
                meta = build_index(self.abspath, self.index, workers)
        except OSError as e:
            raise OSError(f"{self.path}: cannot write its index {self.index} ({e}); set index_dir "
                          f"to a writable folder (--index_dir=...)") from None
        if not quiet:
            print(f"{self.path}: indexed {meta['lines']} lines in {meta['seconds']:.1f}s with "
                  f"{meta['workers']} process(es)", file=sys.stderr)
            for line in duplicate_report(self.path, meta):
                print(line, file=sys.stderr)
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

def duplicate_report(path, meta):
    """Warning lines (none when clean) for the duplicates an index counted; all are kept."""
    out = []
    d = meta["duplicates"]
    if d["count"]:
        ex = "; ".join(f"lines {a} and {b}: {p}" for a, b, p in d["examples"][:3])
        out.append(f"{path}: warning: {d['count']} record(s) name an image an earlier line names "
                   f"({ex})")
    d = meta.get("duplicate_keys", {"count": 0})
    if d["count"]:
        ex = "; ".join(f"lines {a} and {b}: key {k!r} in {p} and {q}"
                       for a, b, k, p, q in d["examples"][:3])
        out.append(f"{path}: warning: {d['count']} tar member(s) have the key of a member another "
                   f"line names in another shard ({ex}); both lines are kept")
    d = meta.get("duplicate_members", {"count": 0})
    if d["count"]:
        ex = "; ".join(f"{s}: {n}" for s, n in d["examples"][:3])
        out.append(f"{path}: warning: {d['count']} member name(s) come twice in one shard "
                   f"({ex}); the first of each is read")
    return out

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
    # rebuild=True: the full verification: the index made anew (every shard's members listed again,
    # every image's presence checked again), whatever its record says, then (decode) every image
    # decoded. For what the cheap staleness check cannot see: a shard edited in place to the same
    # size with its mtime restored, images that appeared after the index was built.
    cfg = dict(manifest="", fields="", label=False, decode=True, index_dir="", workers=0,
               rebuild=False)
    configure(cfg)
    if not cfg["manifest"]:
        sys.exit("usage: python manifest.py --manifest=m.jsonl [--fields=short,long] "
                 "[--label=True] [--decode=False] [--index_dir=...] [--workers=n] [--rebuild=True]")
    if cfg["rebuild"]:
        old = index_path(cfg["manifest"], cfg["index_dir"] or None)
        if os.path.isdir(old):  # it holds nothing the manifest and its shards do not
            shutil.rmtree(old)
            print(f"{old}: removed, to be built anew (rebuild=True)")
    try:
        m = Manifest(cfg["manifest"], cfg["index_dir"] or None, cfg["workers"]).check(
            [f for f in cfg["fields"].split(",") if f], cfg["label"], decode=cfg["decode"])
    except ValueError as e:
        sys.exit(str(e))
    print(f"{m.path}: {len(m)} records, clean; fields " +
          ", ".join(f"{f} ({m.n_rows(f)} captions)" for f in m.fields) + f"; index {m.index}")
