"""embed_cache.py: rows match the model's embeddings, a killed run resumes to identical bytes, two torchrun
ranks write the same files as one process with the same thread count (and files within fp16 rounding of
one with another thread count), a cache made by another model or from other captions is refused, a damaged
cache is named on open and redone by a rerun, and captions beyond max_length are counted and reported."""

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
import embedder as EM  # noqa: E402
import llama as LM  # noqa: E402
import model as M  # noqa: E402
from manifest import Manifest  # noqa: E402
from tiny import WORDS, tiny_llm, write_manifest  # noqa: E402

pytestmark = pytest.mark.slow  # cache runs in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    return tiny_llm(d / "llm"), write_manifest(d / "m.jsonl"), d

def run(args, threads=1):
    """embed_cache.py with `threads` CPU threads per process (the byte-identity claims hold for equal
    thread counts: fp32 reductions may round differently with another count on some CPUs)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "embed_cache.py")] + args, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": str(threads)})

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
    man = Manifest(manifest)
    model = LM.Llama.from_pretrained(llm).eval()
    tok = M.load_tokenizer(llm)
    meta = json.load(open(reference / "meta.json"))
    assert meta["complete"] and meta["fields"]["long"]["count"] == 120 and meta["fields"]["short"]["count"] == 120 and meta["dim"] == 32
    for field in ("short", "long"):
        texts = man.texts(field)
        assert texts[:4] == man[0]["captions"][field] + man[1]["captions"][field]  # rows in manifest order
        cache = embed_cache.open_cache(str(reference), field, llm, man)
        assert cache.dtype == np.float16 and cache.shape == (len(texts), 32)
        # one caption at a time, nothing padded: the cache must hold the same vector, up to float16
        ids, n_prefix = EM.tokenize_for_embedding(tok, texts[:5], "retrieve a similar caption")
        for r in range(5):
            x = torch.tensor([ids[r]])
            with torch.no_grad():
                h = model(x)
            want = torch.nn.functional.normalize(EM.mean_pool(h, EM.skip_instruction(torch.ones_like(x), [n_prefix[r]])), dim=-1)[0]
            np.testing.assert_allclose(cache[r].astype(np.float32), want.numpy(), atol=1e-3)  # fp16 rounding
        np.testing.assert_allclose(np.linalg.norm(cache.astype(np.float32), axis=1), 1.0, atol=2e-3)

def test_killed_and_resumed_is_byte_identical(setup, reference):
    llm, manifest, d = setup
    out = d / "killed"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "embed_cache.py")] + args_for(llm, manifest, out),
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    """Byte-identical to one process with the same thread count (1 per process: what torchrun sets); with
    another thread count (the machine's default) within fp16 rounding, which is all fp32 reductions promise."""
    llm, manifest, d = setup
    out = d / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "embed_cache.py")] + args_for(llm, manifest, out)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(out) == files(reference)
    default = d / "default_threads"
    r = run(args_for(llm, manifest, default), threads=os.cpu_count())
    assert r.returncode == 0, r.stderr[-3000:]
    for name, a in files(default).items():
        x, y = np.load(default / name).astype(np.float32), np.load(reference / name).astype(np.float32)
        np.testing.assert_allclose(x, y, atol=2e-3, rtol=0)  # a few fp16 ulps at most

def test_refuses_other_model_or_captions(setup, reference, tmp_path):
    llm, manifest, d = setup
    other = tiny_llm(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="made by another model"):
        embed_cache.open_cache(str(reference), "long", other, manifest)
    lines = open(manifest).read().splitlines()
    rec = json.loads(lines[3])
    rec["captions"]["long"] = ["a different caption", "x"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join(lines[:3] + [json.dumps(rec)] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=f"field 'long' was made from other captions than {edited}"):
        embed_cache.open_cache(str(reference), "long", llm, str(edited))
    embed_cache.open_cache(str(reference), "short", llm, str(edited))  # the short captions did not change
    with pytest.raises(KeyError, match="no field 'de'"):
        embed_cache.open_cache(str(reference), "de")
    # resuming into a cache made with other settings is refused too
    shutil.copytree(reference, tmp_path / "copy")
    r = run(args_for(other, manifest, tmp_path / "copy"))
    assert r.returncode != 0 and "existing cache made with other model_sha256" in r.stderr

def test_damaged_cache_is_named_and_redone(setup, reference, tmp_path):
    """A truncated .npy, a .npy of another shape and a meta.json that does not parse: open_cache names the
    file and says how to fix it; a rerun of embed_cache.py redoes the damaged field (never 'nothing to do')."""
    llm, manifest, _ = setup
    cache = tmp_path / "c"
    shutil.copytree(reference, cache)
    data = (cache / "long.npy").read_bytes()
    (cache / "long.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"{cache / 'long.npy'}: damaged: .* bytes, a complete \(120, 32\) float16 "
                                         r"file has .* \(truncated\?\); run embed_cache.py again"):
        embed_cache.open_cache(str(cache), "long", llm, manifest)
    embed_cache.open_cache(str(cache), "short", llm, manifest)  # the other field is fine
    r = run(args_for(llm, manifest, cache))
    assert r.returncode == 0 and f"{cache / 'long.npy'}: damaged (" in r.stdout and "nothing to do" not in r.stdout, r.stdout
    assert files(cache) == files(reference)
    np.save(cache / "short.npy", np.zeros((120, 16), np.float16))  # another width
    with pytest.raises(ValueError, match=r"short.npy: damaged: holds float16 \(120, 16\), meta.json records float16 \(120, 32\)"):
        embed_cache.open_cache(str(cache), "short")
    (cache / "meta.json").write_text('{"complete": tru')
    with pytest.raises(ValueError, match=rf"{cache / 'meta.json'}: does not parse .* delete {cache} and run embed_cache.py again"):
        embed_cache.open_cache(str(cache), "short")
    r = run(args_for(llm, manifest, cache))
    assert r.returncode != 0 and f"{cache / 'meta.json'}: does not parse" in r.stderr

def test_over_length_captions_are_counted_and_reported(setup, tmp_path):
    llm, _, _ = setup
    manifest = tmp_path / "m.jsonl"
    long_caps = [" ".join(WORDS * 3), " ".join(WORDS[:5])]  # 69 words (= tokens, a word-level tokenizer) and 5
    with open(manifest, "w") as f:
        for i in range(6):
            f.write(json.dumps({"image": f"{i}.png", "captions": {"long": long_caps if i in (2, 4) else ["a red bag"]}}) + "\n")
    r = run(args_for(llm, manifest, tmp_path / "c", max_length=20, instruction=""))
    assert r.returncode == 0, r.stderr
    assert f"{manifest}: field 'long': 2 caption(s) longer than max_length=20 tokens (longest 69 tokens, line 3)" in r.stdout, r.stdout
    meta = json.load(open(tmp_path / "c" / "meta.json"))
    assert meta["over_length"] == {"long": {"captions": 2, "longest_tokens": 69, "longest_line": 3}}

def test_bad_manifest_is_refused_naming_line(setup, tmp_path):
    """A caption field given as a string (it would be split into characters) stops the cache before any
    work, naming the manifest and the line."""
    llm, _, _ = setup
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "0.png", "captions": {"short": ["a bag"]}}) + "\n" +
                        json.dumps({"image": "1.png", "captions": {"short": "a red shirt"}}) + "\n")
    r = run(args_for(llm, manifest, tmp_path / "c"))
    assert r.returncode != 0 and f"{manifest}: 1 fault(s) on 1 of 2 lines:" in r.stderr and \
        "line 2: caption field 'short' must be a non-empty list of strings, got 'a red shirt'" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "c")
