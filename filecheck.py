"""
Two rules for the files the steps hand each other, each kept here once.

1. Every file between the steps is checked on open against what its writer recorded. A writer
   records each file's bytes (and for an .npy its dtype and shape, optionally a sha256) in its own
   metadata; a reader checks every recorded file before any work and names the first that differs,
   with the command that rebuilds it:

       meta["files"] = record_files(folder, ["offsets.npy", "faults.json"])      # when written
       meta["files"] = {"long.npy": npy_record("float16", (N, D))}  # or before (a preallocation)
       verify_files(folder, meta["files"], fix="run embed_cache.py again")  # FileFault if not
       file_faults(folder, meta["files"])   # [(path, why)], empty when all match (to rebuild)

   Users: the manifest index (manifest_index.py), the embedding cache (embed_cache.py).

2. No command overwrites a file it did not write. An output either does not exist, or is one this
   command wrote (recognised by the record it left: written.json beside an output file; the
   metadata of an output folder), or the user passed overwrite=True:

       check_out_file(path, "data/coco/prepare.py", overwrite)  # before any work; ValueError
       ...write path atomically...; record_out_file(path, "data/coco/prepare.py")
       check_out_dir(out_dir, "train_stage2.py", ["ckpt", "log.jsonl", "model"], overwrite)
"""

import fnmatch
import hashlib
import io
import json
import os

import numpy as np

WRITTEN = "written.json"  # beside output files: {name: {"by": command, "bytes", "sha256"}}
SCRATCH = ("*.tmp", "*.tmp[0-9]*", "*.old", "*.old[0-9]*", "*.tmp.npy", "*.lock")  # a kill's

class FileFault(ValueError):
    """A file differs from what its writer recorded (the message names it and the fix)."""

# -----------------------------------------------------------------------------
# records of written files, checked on open

def npy_layout(path):
    """(shape, dtype, data offset) of an .npy from its header; ValueError naming the file if
    unreadable."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                    np.lib.format.read_array_header_2_0)
            shape, _, dt = read(f)
            return shape, dt, f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy ({type(e).__name__}: {e})") from None

def dtype_str(dt):
    """A dtype as JSON: its name ("float16"), or numpy's field list for a structured dtype."""
    dt = np.dtype(dt)
    return dt.name if dt.fields is None else np.lib.format.dtype_to_descr(dt)

def dtype_of(x):
    """The dtype a dtype_str names (JSON turned the field tuples into lists)."""
    return np.dtype(x if isinstance(x, str) else [tuple(f) for f in x])

def npy_record(dtype, shape):
    """The record of a complete C-order .npy of this dtype and shape, as numpy writes it (before the
    file exists: what a preallocating writer records)."""
    dt = np.dtype(dtype)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False,
              "shape": tuple(shape)})
    return {"bytes": buf.tell() + int(np.prod(shape, dtype=np.int64)) * dt.itemsize,
            "dtype": dtype_str(dt), "shape": [int(n) for n in shape]}

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()

def describe(path, digest=False):
    """A file's record: {"bytes"}, with "dtype" and "shape" for an .npy and "sha256" if digest."""
    rec = {"bytes": os.path.getsize(path)}
    if path.endswith(".npy"):
        shape, dt, _ = npy_layout(path)
        rec.update(dtype=dtype_str(dt), shape=list(shape))
    if digest:
        rec["sha256"] = sha256_file(path)
    return rec

def record_files(folder, names, digest=False):
    """{name: describe(folder/name)} for the files a step just wrote."""
    return {n: describe(os.path.join(folder, n), digest) for n in names}

def file_fault(path, rec, by="meta.json"):
    """None if the file at `path` is as `rec` (a describe record) says, else what differs."""
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if "shape" in rec:
        try:
            shape, dt, offset = npy_layout(path)
        except ValueError as e:
            return str(e).split(": ", 1)[1]
        want = (dtype_of(rec["dtype"]), tuple(rec["shape"]))
        if (dt, shape) != want:
            return f"holds {dt} {shape}, {by} records {want[0]} {want[1]}"
        full = offset + int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if size != full:
            return (f"{size} bytes, a complete {shape} {dt} file has {full} "
                    f"({'truncated' if size < full else 'appended to'}?)")
    if size != rec["bytes"]:
        return (f"{size} bytes, {by} records {rec['bytes']} "
                f"({'truncated' if size < rec['bytes'] else 'appended to'}?)")
    if "sha256" in rec and sha256_file(path) != rec["sha256"]:
        return f"its bytes differ from those {by} records (sha256; edited or replaced?)"
    return None

def file_faults(folder, recorded, by="meta.json"):
    """[(path, why)] of every recorded file that differs from its record, in record order."""
    out = []
    for name, rec in recorded.items():
        path = os.path.join(folder, name)
        why = file_fault(path, rec, by)
        if why:
            out.append((path, why))
    return out

def verify_files(folder, recorded, fix, by="meta.json"):
    """Raise FileFault '<file>: damaged: <why>; <fix>' (and how many others differ) unless every
    recorded file is as recorded."""
    faults = file_faults(folder, recorded, by)
    if faults:
        path, why = faults[0]
        more = "" if len(faults) == 1 else \
            f" ({len(faults) - 1} more file(s) differ: " + \
            ", ".join(os.path.basename(p) for p, _ in faults[1:4]) + ")"
        raise FileFault(f"{path}: damaged: {why}; {fix}{more}")

# -----------------------------------------------------------------------------
# outputs: never overwrite what this command did not write

def _records(folder):
    try:
        with open(os.path.join(folder, WRITTEN)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}

def check_out_file(path, command, overwrite=False):
    """Refuse (ValueError naming the file and the way out) to replace a file that this command did
    not write, or that changed since it wrote it (edited by hand: its bytes differ from the record
    in written.json beside it). A missing file, or overwrite=True, passes."""
    if overwrite or not os.path.lexists(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder is in the way of this output file; choose another "
                         f"output")
    rec = _records(os.path.dirname(os.path.abspath(path))).get(os.path.basename(path))
    if rec is None:
        why = f"exists and {command} did not write it (no record in {WRITTEN} beside it)"
    elif rec.get("by") != command:
        why = f"exists and was written by {rec.get('by')}, not {command}"
    elif file_fault(path, rec, WRITTEN):
        why = f"exists and changed since {command} wrote it ({file_fault(path, rec, WRITTEN)})"
    else:
        return
    raise ValueError(f"{path}: {why}; nothing written. Move it away, choose another output, or "
                     f"pass --overwrite=True to replace it")

def record_out_file(path, command):
    """Record in written.json beside `path` that `command` wrote it (bytes and sha256)."""
    folder = os.path.dirname(os.path.abspath(path))
    recs = _records(folder)
    recs[os.path.basename(path)] = {"by": command, **describe(path, digest=True)}
    tmp = os.path.join(folder, f"{WRITTEN}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(recs, f, indent=1)
    os.replace(tmp, os.path.join(folder, WRITTEN))

def foreign_entries(folder, owns):
    """The entries of `folder` that match none of the patterns in `owns` (nor a kill's scratch)."""
    if not os.path.isdir(folder):
        return []
    return sorted(e for e in os.listdir(folder)
                  if not any(fnmatch.fnmatchcase(e, p) for p in (*owns, *SCRATCH)))

def check_out_dir(folder, command, owns, overwrite=False):
    """Refuse (ValueError) an output folder that holds entries this command does not write (`owns`:
    names or glob patterns): it is someone else's folder (a model, a cache, data), and this command
    would write into it. A missing or empty folder, one that holds only this command's outputs,
    or overwrite=True (this command's names are replaced, the rest left alone) passes."""
    foreign = foreign_entries(folder, owns)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                         else "")
        what = f"{len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'}"
        raise ValueError(f"out_dir={folder}: holds {what} {command} does not write ({shown}); "
                         f"choose a new or empty folder, or pass --overwrite=True to write "
                         f"beside them (its own "
                         f"{', '.join(owns)} replaced)")
