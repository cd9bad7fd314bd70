r"""
Run the frozen LLM once over every caption of a manifest and write a memory-mapped embedding cache,
so that stage 2 never runs the LLM (LLM2CLIP: 17 h with a LoRA-tuned LLM in the loop, 1.3 h with a
frozen LLM and cached embeddings, same or better accuracy).

    python embed_cache.py --manifest=data/fashion/out/train.jsonl --model=data/smollm2/hf \
        --out_dir=out/cache/train
    torchrun --standalone --nproc_per_node=8 embed_cache.py --manifest=... --model=... --out_dir=...

In:  a JSONL manifest (manifest.py; indexed on first use) and an HF Llama folder (raw, or merged
     after stage 1).
Out: out_dir/<field>.npy  (rows = that field's captions in manifest order, see
                           manifest.Manifest.rows; L2-normalised mean-pooled embeddings, float16;
                           read with np.load(mmap_mode="r"))
     out_dir/meta.json    (count and caption fingerprint per field, dim, dtype, pooling,
                           instruction, max length, caption template, model fingerprint, "complete",
                           and the over-length report)
     out_dir/done/        (one small JSON file per finished chunk: the resume record, with a
                           digest of the chunk's rows)
Chunks of `chunk_size` captions go round-robin to the ranks, which write their rows into the same
files. Inside a chunk captions are length-sorted into batches. Killed at any moment and run again,
it redoes only unfinished chunks. A cache whose fingerprints do not match the model or manifest is
refused.

Scale (10M+ captions, D up to 4096: an 80 GB fp16 file per 10M rows): no field is ever held in
memory. A chunk's texts are read from the manifest through its index (one read of the lines that
hold them), its rows are written through a memory map of those rows only. The caption fingerprints
come from the manifest index (computed once, when the manifest was indexed); the model's sha256 is
cached per file size, mtime and inode (in ~/.cache/nano-llm2clip/fingerprints.json), so a start
rehashes nothing that did not change.

Bytes: a chunk's rows depend only on its captions and the settings in meta.json (model, compute
dtype, batch size, chunk size, instruction, max length, template), never on which rank ran it or
what ran before, so a resumed or multi-rank cache equals a one-process uninterrupted one byte for
byte *on the same kernels*: the same device and the same number of CPU threads (torchrun sets
OMP_NUM_THREADS=1 per rank; a plain `python` uses every core). fp32 reductions may round differently
with another thread count on some CPUs (AMD EPYC here): then rows differ in the last fp16 bit, not
more.

Captions longer than max_length tokens (instruction and BOS included) keep their first tokens and
lose the rest (embedder.tokenize_for_embedding); the cache counts them per field and reports, once,
when it completes: how many, the longest (tokens) and its manifest line (also in meta.json,
"over_length").

meta.json records how captions were embedded (an embedder.EmbedSpec: instruction, max length,
caption template, attention, pooling). Each caption is wrapped as stage 1 and evaluation wrap it
(embedder.caption_template; the official LLM2CLIP code wraps every caption of a Llama-3-Instruct
model in its user turn). "auto" is resolved once the tokenizer is loaded and meta.json records the
resolved string ("" = no wrap), so the cache's identity does not depend on how the setting was
spelled: a resume with other settings is refused, and a stage-2 model trained on this cache carries
the spec into its text.json, which evaluate.py checks against any cache it reads. An older meta.json
without template or attention reads as made with no wrap and bidirectional attention
(embedder.read_spec). A stage-1 folder's embedder.json says how stage 1 embedded captions; another
attention or template here is refused (embedder.check_embedder).

Integrity (filecheck.py): meta.json records each field's file (bytes, dtype, shape); every open
(open_cache, and embed_cache.py itself) checks it before any work, and names a damaged file with the
fix (run embed_cache.py again: it redoes a damaged field; a meta.json that does not parse means
deleting the folder). A chunk is done only when its rows are: its done-record holds a digest of the
rows it wrote, and a rerun re-reads every done chunk (once) and redoes those whose rows differ (a
file deleted, cut, replaced or edited), so no cache is marked complete with rows never written.
Non-finite values are refused where made (each chunk is checked before it is written: the message
names the field, the row and its manifest line) and where read (open_cache scans the field in
blocks and names the cache, the field and the first bad row). A full disk is an error naming the
path and the space needed: the free space is checked before the files are made, and they are
preallocated (posix_fallocate), so writing rows through a memory map never meets a full disk
(a SIGBUS). out_dir is new, empty or a cache: a folder holding other files is refused unless
overwrite=True (filecheck.check_out_dir).
"""

import errno
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import embedder as EM
import llama as LM
import model as M
from filecheck import check_out_dir, file_fault, npy_layout, npy_record, verify_files
from manifest import Manifest
from train_common import model_fingerprint, setup_distributed, teardown_distributed, write_json

# -----------------------------------------------------------------------------
manifest = "data/fashion/out/train.jsonl"
index_dir = ""                   # where the manifest's index goes; "" = beside it
                                 # (<manifest>.index/)
model = "data/smollm2/hf"        # HF Llama folder
out_dir = "out/cache/train"
fields = ""                      # comma-separated caption fields; "" = every field of the manifest
instruction = ""                 # prepended and attended to, not pooled; "" = none
template = "auto"                # caption template (embedder.caption_template): "auto" = the chat
                                 # wrap the tokenizer's vocabulary implies (Llama 3's user turn,
                                 # ChatML, or none); "none"; or "...{}..."
attention = "bidirectional"      # the LLM's attention: "bidirectional" (LLM2Vec / LLM2CLIP) or
                                 # "causal" (the plain decoder); as stage 1 trained the model (its
                                 # embedder.json says which)
max_length = 512                 # tokens per caption (instruction included); longer ones are cut
                                 # and reported
batch_size = 64
chunk_size = 2048                # captions per resumable unit of work
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
overwrite = False                # True: write into an out_dir that holds files of other kinds
# -----------------------------------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")

# -----------------------------------------------------------------------------
# integrity: the files against meta.json, the rows against their done-records, finite values

def field_record(rows, dim):
    """What meta.json records of a field's file (filecheck.npy_record): (rows, dim) float16."""
    return npy_record("float16", (rows, dim))

def npy_fault(path, rows, dim):
    """None if path is a complete (rows, dim) float16 .npy, else what is wrong."""
    return file_fault(path, field_record(rows, dim))

def nonfinite_rows(a, start=0, stop=None, block=1 << 16):
    """(count, first) of the rows start..stop-1 of a float16 (N, D) array (a memmap: read in blocks
    of `block` rows) holding NaN or infinity: an exponent of all ones (first: -1 if none)."""
    stop = len(a) if stop is None else stop
    count, first = 0, -1
    for lo in range(start, stop, block):
        bits = np.asarray(a[lo:min(lo + block, stop)]).view(np.uint16)
        bad = ((bits & 0x7C00) == 0x7C00).any(axis=1)
        if bad.any():
            count += int(bad.sum())
            first = lo + int(np.argmax(bad)) if first < 0 else first
    return count, first

def rows_digest(a):
    """The done-record's fingerprint of a chunk's rows (float16 bytes)."""
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()

def chunk_fault(arr, path, start, record):
    """None if rows start.. of `arr` (the memmap of the .npy at path) are those the chunk's
    done-record describes, else why not (the record is then not trusted: the chunk is redone)."""
    n = record.get("rows", 0)
    rows = arr[start:start + n]
    if len(rows) != n:
        return f"{path} holds {len(rows)} of its {n} rows"
    if "blake2b" in record:  # (a record of an older version has none: checked for zero rows)
        return None if rows_digest(rows) == record["blake2b"] else \
            "its rows differ from those written (the file was replaced or edited)"
    zero = np.flatnonzero(~np.asarray(rows).view(np.uint16).any(axis=1))
    return f"row {start + zero[0]} is all zeros (never written)" if len(zero) else None

def read_meta(cache_dir):
    """(EmbedSpec, meta.json as a dict) of a cache, through embedder.read_spec (which fills in the
    spec fields an older cache lacks)."""
    meta_path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{cache_dir}: no meta.json (run embed_cache.py first)")
    return EM.read_spec(meta_path, fix=f"the cache cannot be trusted: delete {cache_dir} and run "
                                       f"embed_cache.py again to rebuild it")

def open_cache(cache_dir, field, model_path=None, manifest=None):
    """The (N, D) float16 memmap of one field, after checking the cache is complete and intact, was
    made by this model (fingerprint of `model_path`) and from these captions (`manifest`: a
    manifest.Manifest, or a manifest path, whose index holds the captions' fingerprint)."""
    meta_path = os.path.join(cache_dir, "meta.json")
    _, meta = read_meta(cache_dir)
    if not meta.get("complete"):
        raise ValueError(f"{meta_path}: the cache is incomplete; run embed_cache.py again to "
                         f"finish it")
    if field not in meta["fields"]:
        raise KeyError(f"{meta_path}: no field {field!r} (has {sorted(meta['fields'])})")
    if "captions_fingerprint" not in meta["fields"][field]:
        raise ValueError(f"{meta_path}: made by an older embed_cache.py (no caption fingerprint); "
                         f"rebuild the cache")
    path = os.path.join(cache_dir, f"{field}.npy")
    name = f"{field}.npy"
    rec = meta.get("files", {}).get(name) or field_record(meta["fields"][field]["count"],
                                                          meta["dim"])
    verify_files(cache_dir, {name: rec}, fix=f"run embed_cache.py again with the same settings "
                 f"(it redoes a damaged field) or delete {cache_dir} and rebuild it")
    if model_path is not None and meta["model_sha256"] != model_fingerprint(model_path):
        raise ValueError(f"{meta_path}: made by another model ({meta['model']}) than {model_path}: "
                         f"rebuild the cache with this model")
    if manifest is not None:
        man = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
        if meta["fields"][field]["captions_fingerprint"] != man.fingerprint(field):
            raise ValueError(f"{meta_path}: field {field!r} was made from other captions than "
                             f"{man.path}")
    arr = np.load(path, mmap_mode="r")
    n_bad, first = nonfinite_rows(arr)  # (reads the field once: a few seconds per GB)
    if n_bad:
        at = ""
        if manifest is not None:
            at = f" (image of manifest line {man.image_of_row(field, first) + 1})"
        raise ValueError(f"{path}: {n_bad} row(s) of field {field!r} hold NaN or infinity, the "
                         f"first row {first}{at}; the cache cannot be trusted: run embed_cache.py "
                         f"again with the same settings (it redoes every chunk whose rows differ "
                         f"from what it wrote) or delete {cache_dir} and rebuild it")
    return arr

# -----------------------------------------------------------------------------

def _touch(path, record):
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)

def over_length(tok, texts, max_length, template=""):
    """(count, longest in tokens, its index) of texts that need more than max_length tokens with the
    instruction and the (resolved) caption template. Each token covers at least one byte, plus at
    most 2 tokens of prefix space and BOS, so only texts longer than that many bytes beyond an empty
    caption's tokens (instruction, template head and tail) are tokenized (captions that surely fit
    cost nothing)."""
    prefix = len(EM.tokenize_for_embedding(tok, [""], instruction, 10 ** 9, template)[0][0])
    maybe = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) + prefix + 2 > max_length]
    if not maybe:
        return 0, 0, -1
    ids, _ = EM.tokenize_for_embedding(tok, [texts[i] for i in maybe], instruction, 10 ** 9,
                                       template)
    lens = [len(x) for x in ids]
    k = int(np.argmax(lens))
    return sum(n > max_length for n in lens), lens[k], maybe[k]

def gb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n} bytes"

def write_error(path, e, need=None):
    """An OSError naming the file, what failed and what to do (a full disk said as such)."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    what = "the disk is full" if full else f"{type(e).__name__}: {e.strerror or e}"
    need = f" ({gb(need)} needed, {gb(shutil.disk_usage(os.path.dirname(path)).free)} free)" \
        if need else ""
    err = OSError(f"{path}: cannot write: {what}{need}; " +
                  ("free space (or choose another out_dir) and " if full else "") +
                  "run embed_cache.py again: it resumes from the chunks already written")
    err.errno = e.errno
    return err

def preallocate(path, record):
    """A float16 .npy of record's shape (filecheck.npy_record) at path with every block reserved
    (posix_fallocate, where the platform has it): its rows, written through a memory map, never meet
    a full disk (a SIGBUS: exit 135 and no message). Made under a temporary name, so a kill leaves
    no half file; a full disk here is an OSError naming the path and the space needed."""
    tmp = path + ".tmp.npy"
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f2", "fortran_order": False, "shape": tuple(record["shape"])})
            try:
                os.posix_fallocate(f.fileno(), 0, record["bytes"])
            except (AttributeError, OSError) as e:  # not on this platform or file system: sparse
                if getattr(e, "errno", None) not in (None, errno.EOPNOTSUPP, errno.ENOSYS,
                                                     errno.EINVAL):
                    raise
            f.truncate(record["bytes"])
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_error(path, e, record["bytes"]) from None
    os.replace(tmp, path)

def claim_out_dir(folder, names):
    """The output rule (filecheck.check_out_dir): out_dir is new, empty (an empty done/ at most), or
    an embedding cache (its meta.json says so), or overwrite=True. Returns the existing cache's
    meta.json ({} if none); with overwrite=True, what is in the way of the cache's files is
    removed first."""
    meta_path = os.path.join(folder, "meta.json")
    m = None
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                m = json.load(f)
        except ValueError:  # our own file, damaged: read_meta names it and the fix
            read_meta(folder)
    ours = isinstance(m, dict) and all(k in m for k in ("fields", "dim", "model_sha256"))
    if m is not None and not ours and not overwrite:
        raise ValueError(f"{meta_path}: not an embedding cache's meta.json (no fields, dim and "
                         f"model_sha256): out_dir={folder} holds something else; choose another "
                         f"out_dir, or pass --overwrite=True to replace it")
    if ours:  # (other files beside a cache are left alone: none has a name the cache writes)
        return read_meta(folder)[1]
    check_out_dir(folder, "embed_cache.py", ["meta.json", "done"], overwrite)
    for name in ["meta.json"] + [f"{f}.npy" for f in names]:  # nothing of a cache: not ours
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    shutil.rmtree(os.path.join(folder, "done"), ignore_errors=True)
    return {}

def write_rows(path, start, emb):
    """emb (n, D) float16 into rows start.. of the .npy at path, through a map of those rows only
    (an 80 GB field is never mapped, or flushed, whole)."""
    _, _, offset = npy_layout(path)
    rows = np.memmap(path, dtype=np.float16, mode="r+", offset=offset + start * emb.shape[1] * 2,
                     shape=emb.shape)
    rows[:] = emb
    rows.flush()
    del rows

def main():
    # one line per bad setting; out_dir must be writable before any work
    from configurator import check
    check(globals(), positive=("batch_size", "chunk_size", "max_length"), folders=("out_dir",),
          choices={"dtype": DTYPES, "attention": EM.ATTENTION})
    # gloo even on GPUs: the ranks only meet at barriers, and uneven work must not trip NCCL's
    # watchdog
    ddp, rank, world, device = setup_distributed("gloo")
    barrier = dist.barrier if ddp else (lambda: None)

    man = Manifest(manifest, index_dir or None).check(images="ignore")  # indexed once, on first use
    names = [f for f in fields.split(",") if f] or man.fields
    for f in names:
        man.ptr(f)  # a field no record has: KeyError naming the manifest and its fields
    counts = {f: man.n_rows(f) for f in names}
    llm = LM.Llama.from_pretrained(model, dtype=getattr(torch, dtype),
                                   causal=attention == "causal").to(device).eval()
    tok = M.load_tokenizer(model)
    # the resolved string ("" = no wrap): what meta.json records
    tmpl = EM.caption_template(tok, template)
    spec = EM.EmbedSpec(instruction, max_length, tmpl, attention)
    EM.check_embedder(model, spec)
    meta_path = os.path.join(out_dir, "meta.json")
    # rank 0 checks an existing cache and (re)writes meta.json; the others read its verdict after
    # the barrier
    if rank == 0:
        # compute dtype and batch size are part of the identity: batches of another size or
        # precision would give other bytes, and a resumed cache must be byte-identical to an
        # uninterrupted one
        per_field = {f: dict(count=counts[f], captions_fingerprint=man.fingerprint(f))
                     for f in names}
        dim = llm.config.hidden_size
        meta = EM.put_spec(dict(model=model, model_sha256=model_fingerprint(model),
                                manifest=manifest, dim=dim, dtype="float16",
                                compute_dtype=dtype, batch_size=batch_size, chunk_size=chunk_size,
                                fields=per_field), spec)
        # what every open checks: each field's file, preallocated to its full size
        meta["files"] = {f"{f}.npy": field_record(counts[f], dim) for f in names}
        old = claim_out_dir(out_dir, names)  # {} unless out_dir holds a cache
        if old:  # resume: only into a cache made with exactly these settings
            if any("captions_fingerprint" not in v for v in old.get("fields", {}).values()):
                raise ValueError(f"{meta_path}: a cache made by an older embed_cache.py (caption "
                                 f"fingerprints of another kind); delete {out_dir} and run again "
                                 f"to rebuild it")
            diff = [k for k in meta if old.get(k) != meta[k] and
                    k not in ("model", "manifest", "files")]
            if diff:
                raise ValueError(f"{meta_path}: an existing cache made with other "
                                 f"{', '.join(diff)}; delete {out_dir} or choose another out_dir")
        done = os.path.join(out_dir, "done")
        for f in names:  # a field whose file is not as recorded is redone, never trusted
            path = os.path.join(out_dir, f"{f}.npy")
            why = npy_fault(path, counts[f], dim)
            records = [d for d in os.listdir(done) if d.rsplit(".", 1)[0] == f] \
                if os.path.isdir(done) else []
            if why and (records or why != "missing"):
                print(f"{path}: damaged ({why}): redoing field {f!r}" +
                      (f" (its {len(records)} chunk record(s) dropped)" if records else ""))
                if os.path.exists(path):
                    os.remove(path)
                for d in records:
                    os.remove(os.path.join(done, d))
                old["complete"] = False
        if not old.get("complete"):
            os.makedirs(done, exist_ok=True)
            write_json(meta_path, {**meta, "complete": False})
            new = [f for f in names if not os.path.isfile(os.path.join(out_dir, f"{f}.npy"))]
            need = sum(meta["files"][f"{f}.npy"]["bytes"] for f in new)
            free = shutil.disk_usage(out_dir).free
            if need > free:
                raise OSError(f"{out_dir}: not enough free space: the cache's files "
                              f"{', '.join(f + '.npy' for f in new)} need {gb(need)}, its disk "
                              f"has {gb(free)} free; free space or choose another out_dir")
            for f in new:
                preallocate(os.path.join(out_dir, f"{f}.npy"), meta["files"][f"{f}.npy"])
    barrier()  # (a rank 0 that raised above takes the others down with it: torchrun ends the job)
    _, meta = read_meta(out_dir)

    work = [(f, c) for f in names for c in range((counts[f] + chunk_size - 1) // chunk_size)]
    mine = [(f, c) for i, (f, c) in enumerate(work) if i % world == rank]
    # a done-record is trusted only when the rows it describes are there: a field's file that was
    # deleted, cut, replaced or edited has its chunks redone (this reads each done chunk once)
    todo, arrays = [], {}
    for f, c in mine:
        rec_path = os.path.join(out_dir, "done", f"{f}.{c:06d}")
        if not os.path.exists(rec_path):
            todo.append((f, c))
            continue
        try:
            with open(rec_path) as fh:
                record = json.load(fh)
        except ValueError:  # an empty record from an older version
            record = dict(rows=min(chunk_size, counts[f] - c * chunk_size))
        path = os.path.join(out_dir, f"{f}.npy")
        if f not in arrays:
            arrays[f] = np.load(path, mmap_mode="r")
        why = chunk_fault(arrays[f], path, c * chunk_size, record)
        if why:
            last = c * chunk_size + record["rows"] - 1
            print(f"{path}: chunk {c} (rows {c * chunk_size}..{last}): {why}: redoing it")
            os.remove(rec_path)
            todo.append((f, c))
    del arrays
    n_todo = torch.tensor([len(todo)])
    if ddp:
        dist.all_reduce(n_todo)
    if meta["complete"]:
        if not n_todo.item():
            print(f"{out_dir}: complete already (every field intact), "
                  f"nothing to do") if rank == 0 else None
            return
        if rank == 0:  # (a kill during the redo leaves an incomplete cache, never a wrong one)
            write_json(meta_path, {**meta, "complete": False})
        barrier()

    n_caps = sum(min(chunk_size, counts[f] - c * chunk_size) for f, c in todo)
    bar = tqdm(total=n_caps, unit="cap", disable=rank != 0, desc=f"embedding (rank 0 of {world})")
    t0 = time.time()
    for f, c in todo:
        start = c * chunk_size
        # this chunk's captions only, read from the manifest
        texts = man.texts(f, start, start + chunk_size)
        n_over, longest, at = over_length(tok, texts, max_length, tmpl)
        emb = EM.embed_texts(llm, tok, texts, instruction, max_length, batch_size, tmpl)
        emb = emb.to(torch.float16).cpu().numpy()
        n_bad, first = nonfinite_rows(emb)  # refused where made: nothing non-finite is written
        if n_bad:
            r = start + first
            raise FloatingPointError(
                f"{man.path}: field {f!r}: the model gave NaN or infinity for {n_bad} of the "
                f"{len(texts)} captions of rows {start}..{start + len(texts) - 1}, the first row "
                f"{r} (line {man.image_of_row(f, r) + 1}: {texts[first]!r:.80}); nothing of them "
                f"was written (a rerun resumes here). Check the model {model} (weights holding "
                f"NaN?) or embed in float32 (--dtype=float32)")
        target = os.path.join(out_dir, f"{f}.npy")
        try:
            write_rows(target, start, emb)
            # only after the rows are on disk
            target = os.path.join(out_dir, "done", f"{f}.{c:06d}")
            _touch(target, dict(rows=len(texts), over=n_over, longest=longest,
                                longest_row=start + at if at >= 0 else -1,
                                blake2b=rows_digest(emb)))
        except OSError as e:
            raise write_error(target, e) from None
        bar.update(len(texts))
    bar.close()
    if rank == 0 and todo:
        dt = time.time() - t0
        print(f"rank 0: {n_caps} captions in {dt:.1f}s ({n_caps / dt:.1f} captions/s)")
    barrier()
    if rank == 0:
        missing = [(f, c) for f, c in work
                   if not os.path.exists(os.path.join(out_dir, "done", f"{f}.{c:06d}"))]
        if missing:
            raise RuntimeError(f"{out_dir}: chunks {missing[:5]} were not finished; run again to "
                               f"complete")
        meta["over_length"] = report_over_length(man, names, counts)
        write_json(meta_path, {**meta, "complete": True})
        print(f"wrote {out_dir}: " + ", ".join(f"{f} {counts[f]}x{meta['dim']}" for f in names))
    teardown_distributed()

def report_over_length(man, names, counts):
    """Sum the chunks' over-length records per field; print one line per field that has any."""
    out = {}
    for f in names:
        n, longest, row = 0, 0, -1
        for c in range((counts[f] + chunk_size - 1) // chunk_size):
            try:
                with open(os.path.join(out_dir, "done", f"{f}.{c:06d}")) as fh:
                    r = json.load(fh)
            except ValueError:  # an empty record from an older version: nothing counted
                continue
            n += r["over"]
            if r["longest"] > longest:
                longest, row = r["longest"], r["longest_row"]
        if n:
            line = man.image_of_row(f, row) + 1
            out[f] = dict(captions=n, longest_tokens=longest, longest_line=line)
            print(f"{man.path}: field {f!r}: {n} caption(s) longer than max_length={max_length} "
                  f"tokens (longest {longest} tokens, line {line}); each keeps its first "
                  f"{max_length} tokens (instruction included)")
    return out

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    main()
