"""The data layer at scale: the O(batch) sampler is a permutation per epoch and ignores N; the manifest
index built in parallel over byte ranges equals a one-process build (arrays and caption fingerprints),
is refused or rebuilt when stale, and holds nothing per image in Python; tar shards written here with
tarfile go through data/webdataset/prepare.py (with DreamLIP-, ShareGPT4V- and JSONL-style sidecars),
are read in place, and a truncated or corrupt shard is named with its member; shards -> prepare ->
embed_cache -> stage 2 runs end to end."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import manifest
import manifest_index
from images import ImageDataset
from manifest import Manifest
from tiny import ROOT, WORDS, run_script, tiny_clip, tiny_llm
from train_common import global_batch, permute

# -----------------------------------------------------------------------------
# the sampler

@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097, 65536, 100003])
def test_permute_is_a_permutation(n):
    for key in ((0, 0), (1337, 5)):
        p = permute(np.arange(n), n, key)
        assert p.dtype == np.int64 and np.array_equal(np.sort(p), np.arange(n)), (n, key)
    if n >= 17:  # keys matter, and the order is shuffled, not a rotation
        a, b = permute(np.arange(n), n, (1, 0)), permute(np.arange(n), n, (1, 1))
        assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(n))
        assert len(np.unique(np.diff(a) % n)) > n // 4


def test_permute_spreads_evenly():
    """Where position 0 lands over 4000 keys: roughly uniform over 8 bins of [0, 1000) (chi-square)."""
    hits = np.bincount(np.array([permute(np.array([0]), 1000, (s, 0))[0] for s in range(4000)]) // 125, minlength=8)
    chi2 = ((hits - 500) ** 2 / 500).sum()
    assert chi2 < 30, hits  # 7 degrees of freedom: p < 1e-4 for a fair permutation


def test_global_batch_covers_each_epoch_and_costs_o_batch():
    n, G = 1003, 16  # 62 full batches per epoch, 11 images wait
    seen = [global_batch(7, s, n, G)[1] for s in range(62)]
    epoch0 = np.concatenate(seen)
    assert global_batch(7, 61, n, G)[0] == 0 and global_batch(7, 62, n, G)[0] == 1
    assert len(np.unique(epoch0)) == 62 * G  # no image twice in an epoch
    assert not np.array_equal(global_batch(7, 62, n, G)[1], seen[0])  # a new order each epoch
    e, imgs, rng = global_batch(7, 5, n, G)
    e2, imgs2, rng2 = global_batch(7, 5, n, G)  # a function of (seed, step) only
    assert np.array_equal(imgs, imgs2) and rng.random() == rng2.random()
    t = time.time()
    for s in range(20):  # 10^12 images: nothing of size N is ever made
        _, big, _ = global_batch(1, 10 ** 9 + s, 10 ** 12, 4096)
        assert len(np.unique(big)) == 4096 and big.min() >= 0 and big.max() < 10 ** 12
    assert time.time() - t < 5
    with pytest.raises(ValueError, match="fewer than one global batch"):
        global_batch(0, 0, 3, 4)

# -----------------------------------------------------------------------------
# the index

def write(path, n, seed=0, image=lambda i: f"img/{i % 3}.png", **extra):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            caps = {"short": [" ".join(rng.choice(WORDS, rng.integers(1, 5))) for _ in range(rng.integers(1, 4))],
                    "long": [" ".join(rng.choice(WORDS, rng.integers(5, 40))) for _ in range(2)]}
            if i % 5 == 3:
                caps["de"] = ["ein Hemd"]  # a field some images lack, first seen after line 1
            f.write(json.dumps({"image": image(i), "captions": caps, "label": i % 7, **extra}) + "\n")
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (12, 10), (40 * i, 100, 200)).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def arrays(index):
    return {n: np.load(os.path.join(index, n)) for n in sorted(os.listdir(index)) if n.endswith(".npy")}


def test_parallel_index_equals_one_process(folder, monkeypatch):
    path = write(folder / "m.jsonl", 3000)
    one = manifest.build_index(str(path), str(folder / "one"), workers=1)
    monkeypatch.setattr(manifest_index, "CHUNK_BYTES", 4096)  # ~70 byte ranges, lines cut at every boundary
    par = manifest.build_index(str(path), str(folder / "par"), workers=2)
    assert par["workers"] == 2 and one["workers"] == 1
    for k in ("lines", "fields", "labels", "faults", "duplicates", "valid"):
        assert par[k] == one[k], k
    a, b = arrays(folder / "one"), arrays(folder / "par")
    assert a.keys() == b.keys() == {"offsets.npy", "labels.npy", "status.npy", "ptr.short.npy", "ptr.long.npy", "ptr.de.npy"}
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # against the file itself
    lines = path.read_bytes().split(b"\n")[:-1]
    assert a["offsets.npy"].tolist() == np.cumsum([0] + [len(x) + 1 for x in lines]).tolist()
    recs = [json.loads(x) for x in lines]
    assert np.array_equal(np.diff(a["ptr.short.npy"]), [len(r["captions"]["short"]) for r in recs])
    assert np.array_equal(np.diff(a["ptr.de.npy"]), [len(r["captions"].get("de", [])) for r in recs])
    assert one["fields"]["de"]["missing"] == 2400 and one["fields"]["de"]["missing_lines"][:3] == [1, 2, 3]


def test_fingerprint_follows_captions_only(folder, monkeypatch):
    path = write(folder / "m.jsonl", 500)
    fp = Manifest(path).meta["fields"]
    lines = path.read_text().splitlines()
    moved = folder / "moved.jsonl"  # other image paths and labels, same captions: the cache stays valid
    moved.write_text("".join(json.dumps({**json.loads(x), "image": f"elsewhere/{i}.png", "label": 1}) + "\n"
                             for i, x in enumerate(lines)))
    monkeypatch.setattr(manifest_index, "CHUNK_BYTES", 2048)
    fm = Manifest(moved).meta["fields"]
    assert all(fm[f]["fingerprint"] == fp[f]["fingerprint"] for f in fp)
    rec = json.loads(lines[250])
    rec["captions"]["long"] = rec["captions"]["long"][::-1]  # two captions swapped
    swapped = folder / "swapped.jsonl"
    swapped.write_text("\n".join(lines[:250] + [json.dumps(rec)] + lines[251:]) + "\n")
    fs = Manifest(swapped).meta["fields"]
    assert fs["long"]["fingerprint"] != fp["long"]["fingerprint"] and fs["short"]["fingerprint"] == fp["short"]["fingerprint"]


def test_stale_index_is_rebuilt_never_used(folder, capsys):
    path = write(folder / "m.jsonl", 50)
    Manifest(path)
    assert "indexing into" in capsys.readouterr().err
    Manifest(path)
    assert capsys.readouterr().err == ""  # fresh: used as is
    text = path.read_text()
    path.write_text(text + text.splitlines()[0] + "\n")  # one line more
    man = Manifest(path)
    assert "(the manifest changed (size or modification time))" in capsys.readouterr().err and len(man) == 51
    # same size, same mtime, other bytes (a caption edited in place): the content sample catches it
    st = os.stat(path)
    path.write_text(path.read_text().replace("shirt", "dress", 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size
    Manifest(path)
    assert "(the manifest's content changed)" in capsys.readouterr().err


def test_index_dir_for_read_only_manifests(folder):
    """A place the index cannot be written is an error that says to set index_dir (as root, who writes
    anywhere, the place is made unwritable by putting a file where its folder should be)."""
    path = write(folder / "m.jsonl", 20)
    (folder / "a_file").write_text("")
    with pytest.raises(OSError, match=rf"{path}: cannot write its index {folder / 'a_file'}/m.jsonl-.*set index_dir"):
        Manifest(path, index_dir=str(folder / "a_file"))
    os.chmod(folder, 0o555)
    try:
        if not os.access(folder, os.W_OK):
            with pytest.raises(OSError, match=rf"{path}: cannot write its index .* set index_dir"):
                Manifest(path)
    finally:
        os.chmod(folder, 0o755)


def test_index_dir_override(folder, tmp_path_factory):
    path = write(folder / "m.jsonl", 20)
    elsewhere = tmp_path_factory.mktemp("indexes")
    man = Manifest(path, index_dir=str(elsewhere))
    assert man.index.startswith(str(elsewhere)) and os.path.isfile(os.path.join(man.index, "meta.json"))
    assert not os.path.exists(str(path) + ".index") and len(man) == 20


def test_nothing_per_image_in_python(folder):
    """A Manifest and an ImageDataset pickle (what a spawn worker receives) to the same small size at 100
    and at 20,000 images: arrays are memory maps, records are read on demand."""
    sizes = []
    for n in (100, 20000):
        man = Manifest(write(folder / f"m{n}.jsonl", n))
        ds = ImageDataset(man, size=8, train=True)
        assert ds[n - 1][0].shape == (3, 8, 8) and man[n - 1]["label"] == (n - 1) % 7
        sizes.append((len(pickle.dumps(man)), len(pickle.dumps(ds))))
    assert sizes[0][0] < 4000 and sizes[1][0] < sizes[0][0] + 100 and sizes[1][1] < sizes[0][1] + 100, sizes
    assert isinstance(man.ptr("long"), np.memmap) and isinstance(man.labels, np.memmap)


def test_faults_found_at_index_time_in_parallel(folder, monkeypatch):
    path = write(folder / "m.jsonl", 400)
    lines = path.read_text().splitlines()
    lines[10] = lines[10].replace('"label": 3', '"label": "3"')
    lines[390] = lines[390][:-5]
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(manifest_index, "CHUNK_BYTES", 1000)
    with pytest.raises(ValueError) as e:
        Manifest(path).check(images="ignore")
    msg = str(e.value).splitlines()
    assert msg[0] == f"{path}: 2 fault(s) on 2 of 400 lines:"
    assert msg[1] == "  line 11: 'label' must be an int, got '3'" and msg[2].startswith("  line 391: malformed JSON")
    assert not Manifest(path).meta["valid"]  # the verdict is kept: a second start reads it, no rescan

# -----------------------------------------------------------------------------
# tar shards

def jpeg(i, size=(40, 30)):
    img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    b = io.BytesIO()
    img.save(b, "JPEG", quality=95)
    return b.getvalue()


def write_shards(folder, n_shards=3, per_shard=5):
    """img2dataset's webdataset layout: NNNNN.tar with KEY.jpg, KEY.txt, KEY.json (key = shard + index)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                meta = {"url": f"https://example.com/img/{key}.jpg", "key": key, "caption": f"alt {key}",
                        "status": "success", "width": 40, "height": 30}
                for name, data in ((f"{key}.jpg", jpeg(s * 100 + j)), (f"{key}.txt", f"a red shirt {key}".encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                keys.append(key)
    return keys


def prepare(**kw):
    args = [f"--{k}={v}" for k, v in kw.items()]
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", "webdataset", "prepare.py")] + args, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_prepare_shards_with_sidecars(tmp_path):
    keys = write_shards(tmp_path / "shards")
    # three sidecar styles, each covering some images: JSONL by key, DreamLIP CSV by url, ShareGPT4V by file stem
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text("".join(json.dumps({"key": k, "long": f"a long caption of {k}"}) + "\n" for k in keys[:6]))
    dl = tmp_path / "dreamlip.csv"
    dl.write_text("Image Path,raw_caption,shortIB_captions,longIB_captions,shortSV_captions,longSV_captions,"
                  "shortLLA_captions,longLLA_captions\n" +
                  "".join(f'https://example.com/img/{k}.jpg,raw,short ib,"long ib, of {k}",short sv,"long sv\nsecond line",'
                          f'short lla,long lla\n' for k in keys[3:9]))
    s4v = tmp_path / "sharegpt4v.json"
    s4v.write_text(json.dumps([{"id": k, "image": f"coco/train2017/{k}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe"}, {"from": "gpt", "value": f"share\ncaption {k}"}]} for k in keys[9:12]]))
    out = tmp_path / "data" / "train.jsonl"
    for sidecar, covered in ((jsonl, 6), (dl, 6), (s4v, 3)):
        r = prepare(shards=tmp_path / "shards", out=out, long_captions=sidecar, workers=2)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"wrote {out}: {covered} images from 3 shards" in r.stdout and f"no long {15 - covered}" in r.stdout, r.stdout
        skipped = [json.loads(x) for x in open(str(out) + ".skipped.jsonl")]
        assert len(skipped) == 15 - covered and skipped[0]["why"] == "no long caption (in the sidecars or KEY.json)"
        recs = [json.loads(x) for x in open(out)]
        if sidecar == dl:
            # the SV pair becomes short/long (recaptions=SV), the alt-text raw; the others are not kept
            assert recs[0] == {"image": "../shards/00000.tar/000000003.jpg", "captions": {
                "short": ["short sv"], "long": ["long sv\nsecond line"], "raw": ["a red shirt 000000003"]}}
        if sidecar == s4v:
            assert recs[0]["captions"]["long"] == ["share\ncaption 000010004"]  # the gpt turn as written
            assert recs[0]["captions"]["short"] == ["a red shirt 000010004"]  # no short recaption: alt-text
        for name in ("", ".skipped.jsonl", ".prepare.json"):
            os.remove(str(out) + name)
    r = prepare(shards=tmp_path / "shards", out=out, workers=1)  # no recaption anywhere: refused
    assert r.returncode != 0 and "no image left from 3 shards (no long caption anywhere" in r.stderr, r.stderr
    # alt-text only, when asked for
    r = prepare(shards=tmp_path / "shards", out=out, workers=1, require_long=False)
    assert r.returncode == 0 and "wrote" in r.stdout and os.path.isdir(str(out) + ".index"), r.stderr[-2000:]
    man = Manifest(out).check(fields=["short"])
    assert len(man) == 15 and man[7]["image"] == "../shards/00001.tar/000010002.jpg"
    for i in (0, 7, 14):  # the member read in place is the bytes that were written
        img, name = man.open_image(i)
        key = keys[i]
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(jpeg(int(key[:5]) * 100 + int(key[5:]))))))
        assert name == f"{tmp_path / 'data' / '..' / 'shards' / (key[:5] + '.tar')} member {key}.jpg"
    ds = ImageDataset(man, size=16, train=True, seed=1)
    assert ds[3][0].shape == (3, 16, 16)
    assert prepare(shards=tmp_path / "shards", out=out, require_long=False).stdout.endswith(
        "nothing to do (delete it to prepare again)\n")
    r = prepare(shards=tmp_path / "shards", out=out)  # other settings: refused, the manifest kept
    assert r.returncode != 0 and "was prepared with other settings" in r.stderr and len(Manifest(out)) == 15


@pytest.mark.slow
def test_damaged_shards(tmp_path):
    keys = write_shards(tmp_path / "shards")
    out = tmp_path / "train.jsonl"
    assert prepare(shards=tmp_path / "shards", out=out, require_long=False).returncode == 0
    shard = tmp_path / "shards" / "00001.tar"
    data = shard.read_bytes()
    # a member's bytes corrupted in place (same size): the index still finds it, decoding names shard and member
    man = Manifest(out)
    i = keys.index("000010002")
    _, off, size = man._array("member")[i].item()
    shard.write_bytes(data[:off] + b"\0" * size + data[off + size:])
    man = Manifest(out)  # the shard changed: re-indexed
    with pytest.raises(ValueError, match=rf"{out}:{i + 1}: cannot read image .*00001.tar member 000010002.jpg"):
        ImageDataset(man, size=8)[i]
    with pytest.raises(ValueError, match=rf"line {i + 1}: cannot decode image .*00001.tar member 000010002.jpg"):
        Manifest(out).check(decode=True)
    # truncated in the middle of a member: the index names the shard and every member it lost
    shard.write_bytes(data[:off + size // 2])
    with pytest.raises(ValueError) as e:
        Manifest(out).check()
    msg = str(e.value)
    assert f"{out}: 3 fault(s) on 3 of 15 lines:" in msg and \
        f"line {i + 1}: no member '000010002.jpg' in shard {shard} (truncated: member 000010002.jpg needs bytes up to" in msg, msg
    ds = ImageDataset(Manifest(out).check(images="skip"), size=8, skip_bad=True)
    assert ds[i][1] == 10 and ds.n_skipped == 3  # lines 8, 9, 10 gone: replaced by line 11 (the next shard)
    # prepare on the damaged shard: stops naming it, or keeps what it can with skip_bad
    r = prepare(shards=tmp_path / "shards", out=tmp_path / "again.jsonl", require_long=False)
    assert r.returncode != 0 and f"{shard}: truncated: member 000010002.jpg needs" in r.stderr and \
        "(last good member 000010001.json)" in r.stderr, r.stderr[-2000:]
    r = prepare(shards=tmp_path / "shards", out=tmp_path / "again.jsonl", skip_bad=True, require_long=False)  # shard 0 is kept from the run
    assert r.returncode != 0 and "again.jsonl.parts holds finished shards of a run with other settings" in r.stderr
    shutil.rmtree(tmp_path / "again.jsonl.parts")
    r = prepare(shards=tmp_path / "shards", out=tmp_path / "again.jsonl", skip_bad=True, require_long=False)
    assert r.returncode == 0 and "wrote" in r.stdout and "damaged shards 1" in r.stdout, r.stdout
    assert len(open(tmp_path / "again.jsonl").read().splitlines()) == 12


@pytest.mark.slow
def test_shards_through_cache_and_stage2(tmp_path):
    """Shards written with tarfile -> prepare.py -> embed_cache.py -> train_stage2.py (llm2clip, 2 ranks of
    work in one process) -> evaluate.py, all reading the images inside the shards."""
    keys = write_shards(tmp_path / "shards", n_shards=2, per_shard=8)
    jsonl = tmp_path / "long.jsonl"
    rng = np.random.default_rng(0)
    jsonl.write_text("".join(json.dumps({"key": k, "long": " ".join(rng.choice(WORDS, 12))}) + "\n" for k in keys))
    out = tmp_path / "train.jsonl"
    assert prepare(shards=tmp_path / "shards", out=out, long_captions=jsonl).returncode == 0
    llm, clip = tiny_llm(tmp_path / "llm"), tiny_clip(tmp_path / "clip")
    run_script("embed_cache.py", dict(model=llm, manifest=out, out_dir=tmp_path / "cache"))
    r = run_script("train_stage2.py", dict(method="llm2clip", manifest=out, clip=clip, llm=llm, cache=tmp_path / "cache",
                                           out_dir=tmp_path / "s2", batch_size=8, max_steps=3, warmup_steps=1,
                                           embed_dim=16, num_workers=2, log_interval=1))
    assert os.path.isdir(tmp_path / "s2" / "model") and "step 3/3" in r.stdout
    run_script("evaluate.py", dict(model=tmp_path / "s2" / "model", manifest=out, cache=tmp_path / "cache",
                                   retrieval="short,long", multilingual="", multilingual_unseen="", classes="",
                                   zeroshot_manifest="", c2c_field="", out=tmp_path / "eval.json"))
    assert "long_i2t_r1" in json.load(open(tmp_path / "eval.json"))["results"]
