"""
Run the frozen LLM once over every caption of a manifest and write a memory-mapped embedding cache, so
that stage 2 never runs the LLM (LLM2CLIP: 17 h with a LoRA-tuned LLM in the loop, 1.3 h with a frozen
LLM and cached embeddings, same or better accuracy).

    python embed_cache.py --manifest=data/fashion/train.jsonl --model=data/smollm2/hf --out_dir=out/cache/train
    torchrun --standalone --nproc_per_node=8 embed_cache.py --manifest=... --model=... --out_dir=...

In:  a JSONL manifest (dataset.py) and an HF Llama folder (raw, or merged after stage 1).
Out: out_dir/<field>.npy  (rows = that field's captions in manifest order, see dataset.caption_rows;
                           L2-normalised mean-pooled embeddings, float16; read with np.load(mmap_mode="r"))
     out_dir/meta.json    (count and fingerprint per field, dim, dtype, pooling, instruction, max length,
                           model fingerprint, "complete")
     out_dir/done/        (one empty file per finished chunk: the resume record)
Chunks of `chunk_size` captions go round-robin to the ranks, which write their rows into the same files.
Inside a chunk captions are length-sorted into batches. Killed at any moment and run again, it redoes only
unfinished chunks and ends with files byte-identical to an uninterrupted run (a chunk's batches do not
depend on what else ran). A cache whose fingerprints do not match the model or manifest is refused.
"""

import functools
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib.format import open_memmap
from tqdm import tqdm

import model as M
from dataset import caption_rows, read_manifest
from train_common import setup_distributed, teardown_distributed

# -----------------------------------------------------------------------------
manifest = "data/fashion/train.jsonl"
model = "data/smollm2/hf"        # HF Llama folder
out_dir = "out/cache/train"
fields = ""                      # comma-separated caption fields; "" = every field of the manifest
instruction = ""                 # prepended and attended to, not pooled; "" = none
max_length = 512                 # tokens per caption (instruction included)
batch_size = 64
chunk_size = 2048                # captions per resumable unit of work
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------

def sha256_files(paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()

@functools.lru_cache(maxsize=None)
def model_fingerprint(path):
    """sha256 of config.json and every safetensors file: any change of weights gives another cache."""
    names = ["config.json"] + sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    return sha256_files([os.path.join(path, n) for n in names])

def text_fingerprint(texts):
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()

def open_cache(cache_dir, field, model_path=None, records=None):
    """The (N, D) float16 memmap of one field, after checking the cache is complete and was made by this
    model (fingerprint of `model_path`) from these captions (`records`, as read from the manifest)."""
    meta_path = os.path.join(cache_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{cache_dir}: no meta.json (run embed_cache.py first)")
    with open(meta_path) as f:
        meta = json.load(f)
    if not meta.get("complete"):
        raise ValueError(f"{meta_path}: the cache is incomplete; run embed_cache.py again to finish it")
    if field not in meta["fields"]:
        raise KeyError(f"{meta_path}: no field {field!r} (has {sorted(meta['fields'])})")
    if model_path is not None and meta["model_sha256"] != model_fingerprint(model_path):
        raise ValueError(f"{meta_path}: made by another model ({meta['model']}) than {model_path}: "
                         f"rebuild the cache with this model")
    if records is not None:
        texts, _ = caption_rows(records, field)
        if meta["fields"][field]["captions_sha256"] != text_fingerprint(texts):
            raise ValueError(f"{meta_path}: field {field!r} was made from other captions than the manifest in use")
    return np.load(os.path.join(cache_dir, f"{field}.npy"), mmap_mode="r")

def _touch(path):
    with open(path + ".tmp", "w"):
        pass
    os.replace(path + ".tmp", path)

def main():
    # gloo even on GPUs: the ranks only meet at barriers, and uneven work must not trip NCCL's watchdog
    ddp, rank, world, device = setup_distributed("gloo")
    barrier = dist.barrier if ddp else (lambda: None)

    records = read_manifest(manifest)
    names = [f for f in fields.split(",") if f] or sorted({k for r in records for k in r.get("captions", {})})
    rows = {f: caption_rows(records, f)[0] for f in names}
    llm = M.Llama.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    tok = M.load_tokenizer(model)
    meta_path = os.path.join(out_dir, "meta.json")
    # rank 0 checks an existing cache and (re)writes meta.json; the others read its verdict after the barrier
    if rank == 0:
        # compute dtype and batch size are part of the identity: batches of another size or precision
        # would give other bytes, and a resumed cache must be byte-identical to an uninterrupted one
        meta = dict(model=model, model_sha256=model_fingerprint(model), manifest=manifest,
                    dim=llm.config.hidden_size, dtype="float16", compute_dtype=dtype, batch_size=batch_size,
                    pooling="mean", instruction=instruction, max_length=max_length, chunk_size=chunk_size,
                    fields={f: dict(count=len(t), captions_sha256=text_fingerprint(t)) for f, t in rows.items()})
        os.makedirs(os.path.join(out_dir, "done"), exist_ok=True)
        old = {}
        if os.path.isfile(meta_path):  # resume: only into a cache made with exactly these settings
            with open(meta_path) as f:
                old = json.load(f)
            diff = [k for k in meta if old.get(k) != meta[k] and k not in ("model", "manifest")]
            if diff:
                raise ValueError(f"{meta_path}: an existing cache made with other {', '.join(diff)}; "
                                 f"delete {out_dir} or choose another out_dir")
        if not old.get("complete"):
            M.write_json(meta_path, {**meta, "complete": False})
            for f, texts in rows.items():
                path = os.path.join(out_dir, f"{f}.npy")
                if not os.path.isfile(path):  # create under a temporary name: a kill leaves no half header
                    arr = open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float16, shape=(len(texts), meta["dim"]))
                    del arr
                    os.replace(path + ".tmp.npy", path)
    barrier()  # (a rank 0 that raised above takes the others down with it: torchrun ends the job)
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["complete"]:
        print(f"{out_dir}: complete already, nothing to do") if rank == 0 else None
        return

    work = [(f, c) for f, texts in rows.items() for c in range((len(texts) + chunk_size - 1) // chunk_size)]
    mine = [(f, c) for i, (f, c) in enumerate(work) if i % world == rank]
    todo = [(f, c) for f, c in mine if not os.path.exists(os.path.join(out_dir, "done", f"{f}.{c:06d}"))]
    n_caps = sum(min(chunk_size, len(rows[f]) - c * chunk_size) for f, c in todo)
    bar = tqdm(total=n_caps, unit="cap", disable=rank != 0, desc=f"embedding (rank 0 of {world})")
    arrays = {f: np.load(os.path.join(out_dir, f"{f}.npy"), mmap_mode="r+") for f in rows}
    t0 = time.time()
    for f, c in todo:
        texts = rows[f][c * chunk_size:(c + 1) * chunk_size]
        emb = M.embed_texts(llm, tok, texts, instruction, max_length, batch_size)
        arrays[f][c * chunk_size:c * chunk_size + len(texts)] = emb.to(torch.float16).cpu().numpy()
        arrays[f].flush()
        _touch(os.path.join(out_dir, "done", f"{f}.{c:06d}"))  # only after the rows are on disk
        bar.update(len(texts))
    bar.close()
    if rank == 0 and todo:
        dt = time.time() - t0
        print(f"rank 0: {n_caps} captions in {dt:.1f}s ({n_caps / dt:.1f} captions/s)")
    barrier()
    if rank == 0:
        missing = [(f, c) for f, c in work if not os.path.exists(os.path.join(out_dir, "done", f"{f}.{c:06d}"))]
        if missing:
            raise RuntimeError(f"{out_dir}: chunks {missing[:5]} were not finished; run again to complete")
        M.write_json(meta_path, {**meta, "complete": True})
        print(f"wrote {out_dir}: " + ", ".join(f"{f} {len(t)}x{meta['dim']}" for f, t in rows.items()))
    teardown_distributed()

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    main()
