"""embed_cache.py: rows match the model's embeddings, a killed run resumes to identical bytes, two torchrun
ranks write the same files as one, and a cache made by another model or from other captions is refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import embed_cache  # noqa: E402
import model as M  # noqa: E402
from tiny import tiny_llm, write_manifest  # noqa: E402
from dataset import caption_rows, read_manifest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    return tiny_llm(d / "llm"), write_manifest(d / "m.jsonl"), d

def run(args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "embed_cache.py")] + args, cwd=ROOT,
                          capture_output=True, text=True, **kw)

def args_for(llm, manifest, out, **extra):
    base = dict(model=llm, manifest=manifest, out_dir=str(out), chunk_size=8, batch_size=4,
                instruction="retrieve a similar caption")
    return [f"--{k}={v}" for k, v in {**base, **extra}.items()]

def files(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".npy")}

@pytest.fixture(scope="module")
def reference(setup):
    llm, manifest, d = setup
    r = run(args_for(llm, manifest, d / "ref"))
    assert r.returncode == 0, r.stderr
    return d / "ref"

def test_rows_are_the_models_embeddings(setup, reference):
    llm, manifest, _ = setup
    records = read_manifest(manifest)
    model = M.Llama.from_pretrained(llm).eval()
    tok = M.load_tokenizer(llm)
    meta = json.load(open(reference / "meta.json"))
    assert meta["complete"] and meta["fields"]["long"]["count"] == 120 and meta["fields"]["short"]["count"] == 120 and meta["dim"] == 32
    for field in ("short", "long"):
        texts, _ = caption_rows(records, field)
        cache = embed_cache.open_cache(str(reference), field, llm, records)
        assert cache.dtype == np.float16 and cache.shape == (len(texts), 32)
        # one caption at a time, nothing padded: the cache must hold the same vector, up to float16
        ids, n_prefix = M.tokenize_for_embedding(tok, texts[:5], "retrieve a similar caption")
        for r in range(5):
            x = torch.tensor([ids[r]])
            with torch.no_grad():
                h = model(x)
            want = torch.nn.functional.normalize(M.mean_pool(h, M.skip_instruction(torch.ones_like(x), [n_prefix[r]])), dim=-1)[0]
            np.testing.assert_allclose(cache[r].astype(np.float32), want.numpy(), atol=1e-3)  # fp16 rounding
        np.testing.assert_allclose(np.linalg.norm(cache.astype(np.float32), axis=1), 1.0, atol=2e-3)

def test_killed_and_resumed_is_byte_identical(setup, reference):
    llm, manifest, d = setup
    out = d / "killed"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "embed_cache.py")] + args_for(llm, manifest, out),
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120 and not (os.path.isdir(out / "done") and len(os.listdir(out / "done")) >= 2):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_done = len(os.listdir(out / "done"))
    assert not json.load(open(out / "meta.json"))["complete"] or n_done == 30  # 15 + 15 chunks in all
    r = run(args_for(llm, manifest, out))
    assert r.returncode == 0, r.stderr
    assert files(out) == files(reference)
    # and rows of unfinished chunks are redone, whatever garbage a kill left in them
    arr = np.load(out / "long.npy", mmap_mode="r+")
    arr[8:16] = 7.0
    arr.flush()
    os.remove(out / "done" / "long.000001")
    meta = json.load(open(out / "meta.json"))
    json.dump({**meta, "complete": False}, open(out / "meta.json", "w"))
    assert run(args_for(llm, manifest, out)).returncode == 0
    assert files(out) == files(reference)

def test_two_ranks_write_the_same_cache(setup, reference):
    llm, manifest, d = setup
    out = d / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "embed_cache.py")] + args_for(llm, manifest, out)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(out) == files(reference)

def test_refuses_other_model_or_captions(setup, reference, tmp_path):
    llm, manifest, d = setup
    other = tiny_llm(tmp_path / "other", seed=1)
    records = read_manifest(manifest)
    with pytest.raises(ValueError, match="made by another model"):
        embed_cache.open_cache(str(reference), "long", other, records)
    edited = [dict(r) for r in records]
    edited[3] = {**edited[3], "captions": {**edited[3]["captions"], "long": ["a different caption", "x"]}}
    with pytest.raises(ValueError, match="field 'long' was made from other captions"):
        embed_cache.open_cache(str(reference), "long", llm, edited)
    with pytest.raises(KeyError, match="no field 'de'"):
        embed_cache.open_cache(str(reference), "de")
    # resuming into a cache made with other settings is refused too
    shutil.copytree(reference, tmp_path / "copy")
    r = run(args_for(other, manifest, tmp_path / "copy"))
    assert r.returncode != 0 and "existing cache made with other model_sha256" in r.stderr
