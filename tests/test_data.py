"""dataset.py and data/fashion/prepare.py: the manifest check finds every planted fault with its line,
CLIP preprocessing against hand-computed values, reproducible crops, bad images during loading, the
caption row order, and a tiny build of the Fashion-MNIST demo set."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dataset as D

ROOT = Path(__file__).resolve().parent.parent
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
MEAN, STD = torch.tensor(D.CLIP_MEAN), torch.tensor(D.CLIP_STD)


def save_png(path, rgb=(10, 200, 30), size=(8, 8), mode="RGB"):
    Image.new(mode, size, rgb).save(path)


def rec(image, **kw):
    return json.dumps({"image": image, "captions": {"short": ["a cat"], "long": ["a cat on a mat"]}, "label": 1, **kw})


@pytest.fixture
def planted(tmp_path):
    """A manifest with one fault of each kind, at known lines."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        save_png(tmp_path / "img" / name)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not an image at all")
    good = (tmp_path / "img" / "a.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(good[: len(good) // 2])  # header reads, pixels do not
    lines = [
        rec("img/a.png"),                                                   # 1 clean
        rec("img/missing.png"),                                             # 2 missing file
        rec("img/corrupt.png"),                                             # 3 not an image
        '{"image": "img/a.png", "captions": {"short": ["x"]',               # 4 malformed JSON
        json.dumps({"image": "img/a.png", "label": 2}),                     # 5 no captions key
        json.dumps({"image": "img/b.png", "captions": {"short": ["ok", ""], "long": ["x"]}}),  # 6 empty caption
        rec("img/b.png", label="3"),                                        # 7 label is a string
        rec("img/cut.png"),                                                 # 8 truncated image
        rec("img/b.png"),                                                   # 9 clean
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_check_manifest_reports_every_fault(planted):
    with pytest.raises(ValueError) as e:
        D.check_manifest(planted, fields=["short", "long"])
    msg = str(e.value)
    print(msg)
    assert msg.startswith(f"{planted}: 7 fault(s) on 7 of 9 lines:")
    expect = {2: "image file not found: " + str(planted.parent / "img" / "missing.png"),
              3: "cannot decode image " + str(planted.parent / "img" / "corrupt.png"),
              4: "malformed JSON",
              5: "missing key 'captions'",
              6: "caption short[1] must be a non-empty string, got ''",
              7: "'label' must be an int, got '3'",
              8: "cannot decode image " + str(planted.parent / "img" / "cut.png")}
    reported = [line.strip() for line in msg.splitlines()[1:]]
    assert [int(r.split(":")[0].removeprefix("line ")) for r in reported] == sorted(expect)
    for r, (n, text) in zip(reported, sorted(expect.items())):
        assert r.startswith(f"line {n}: {text}"), r


def test_check_manifest_options(planted, tmp_path):
    # decode=False only checks that files exist: the corrupt and the truncated image pass
    with pytest.raises(ValueError) as e:
        D.check_manifest(planted, fields=["short", "long"], decode=False)
    assert "5 fault(s)" in str(e.value) and "line 3" not in str(e.value) and "line 8" not in str(e.value)
    # a requested field that is absent, a missing label when labels are required
    path = tmp_path / "ok.jsonl"
    path.write_text(rec("img/a.png") + "\n" + json.dumps({"image": "img/b.png", "captions": {"short": ["y"]}}) + "\n")
    records = D.check_manifest(path)  # clean without requirements
    assert [r["image"] for r in records] == ["img/a.png", "img/b.png"]
    with pytest.raises(ValueError, match=r"line 2: caption field 'de' is missing(.|\n)*line 2: missing key 'label'"):
        D.check_manifest(path, fields=["short", "de"], label=True)


def test_check_manifest_lists_the_first_20_then_counts(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(rec(f"gone{i}.png") + "\n" for i in range(25)))
    msg = str(pytest.raises(ValueError, D.check_manifest, path).value)
    assert "25 fault(s) on 25 of 25 lines" in msg and "line 20: image file not found" in msg
    assert "line 21" not in msg and msg.endswith("... and 5 more")


def test_read_manifest_names_the_bad_line(planted):
    with pytest.raises(ValueError, match=r"m.jsonl:4: malformed JSON"):
        D.read_manifest(planted)


def test_caption_rows_order():
    records = [{"image": "0", "captions": {"long": ["a", "b"], "short": ["s0"]}},
               {"image": "1", "captions": {"long": ["c"]}},
               {"image": "2", "captions": {"long": ["d", "e", "f"]}}]
    texts, index = D.caption_rows(records, "long")
    assert texts == ["a", "b", "c", "d", "e", "f"]
    assert index.dtype == np.int64 and index.tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match=r"record 1 \(line 2\) has no captions in field 'short'"):
        D.caption_rows(records, "short")

# -----------------------------------------------------------------------------
# preprocessing

def test_eval_transform_constant_colour_and_grey():
    rgb = (255, 0, 128)
    x = D.eval_transform(Image.new("RGB", (40, 30), rgb), 16)  # resized, then centre-cropped
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    want = (torch.tensor(rgb) / 255.0 - MEAN) / STD  # [1.9303, -1.7521, 0.3486]
    torch.testing.assert_close(x, want.view(3, 1, 1).expand(3, 16, 16), atol=1e-5, rtol=0)
    g = D.eval_transform(Image.new("L", (20, 20), 200), 20)  # greyscale -> three equal channels, normalised
    torch.testing.assert_close(g, ((200 / 255.0 - MEAN) / STD).view(3, 1, 1).expand(3, 20, 20), atol=1e-6, rtol=0)


def test_eval_transform_centre_crop_geometry():
    # 30 wide x 20 high, size 20: no resize, crop columns 5..24 (offset round((30 - 20) / 2) = 5)
    a = np.zeros((20, 30, 3), np.uint8)
    a[:, :, 0] = np.arange(30) * 8
    x = D.eval_transform(Image.fromarray(a), 20)
    want = (torch.arange(5, 25) * 8 / 255.0 - MEAN[0]) / STD[0]
    torch.testing.assert_close(x[0, 7], want.float(), atol=1e-6, rtol=0)
    # tall image: shortest side 10 -> 20, long side int(20 * 25 / 10) = 50, crop rows 15..34
    assert D.eval_transform(Image.new("RGB", (10, 25)), 20).shape == (3, 20, 20)


def test_train_transform_seeded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    crop = lambda s: D.train_transform(img, 32, torch.Generator().manual_seed(s))
    a, b, c = crop(1), crop(1), crop(2)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # scale 1 and ratio 1: the crop is the whole image, so it equals the eval transform
    full = D.train_transform(img, 48, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    torch.testing.assert_close(full, D.eval_transform(img, 48), atol=0, rtol=0)

# -----------------------------------------------------------------------------
# the Dataset

@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # noise, so that two different crops differ
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "3.png").write_bytes(b"\x89PNG broken")  # line 4 is bad
    (tmp_path / "m.jsonl").write_text("".join(rec(f"img/{i}.png", label=i) + "\n" for i in range(6)))
    return tmp_path


def test_dataset_items_and_seeded_crops(folder):
    ds = D.ImageDataset(folder / "m.jsonl", size=8)
    x, i, label = ds[2]
    assert x.shape == (3, 8, 8) and (i, label) == (2, 2)
    tr = [D.ImageDataset(folder / "m.jsonl", size=8, train=True, seed=5) for _ in range(2)]
    assert torch.equal(tr[0][1][0], tr[1][1][0])  # same (seed, epoch, index): same crop
    tr[1].set_epoch(1)
    assert not torch.equal(tr[0][1][0], tr[1][1][0])


def test_dataset_bad_image_raises_naming_file_and_line(folder):
    ds = D.ImageDataset(folder / "m.jsonl", size=8)
    with pytest.raises(ValueError, match=rf"m.jsonl:4: cannot read image {folder / 'img' / '3.png'}"):
        ds[3]


def test_dataset_skip_bad_counts_across_workers(folder):
    ds = D.ImageDataset(folder / "m.jsonl", size=8, skip_bad=True)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=D.collate)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [4, 5]]  # item 3 dropped from its batch
    assert batches[1][0].shape == (2, 3, 8, 8) and batches[1][2].tolist() == [4, 5]
    assert ds.n_skipped == 1 and ds.skipped() == [(4, str(folder / "img" / "3.png"))]  # written by a worker
    assert D.collate([None, None]) is None

# -----------------------------------------------------------------------------
# CuPL

def test_read_cupl(monkeypatch):
    if importlib.util.find_spec("clip_benchmark") is None:
        pytest.skip(f"clip-benchmark is not installed: {D.CUPL_INSTALL}")
    cupl = D.read_cupl()
    assert len(cupl) == 998 and all(isinstance(v, list) and v for v in cupl.values())
    assert "goldfish" in cupl
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps clip-benchmark==1.6.2"):
        D.cupl_path()

# -----------------------------------------------------------------------------
# data/fashion/prepare.py at a tiny size

@pytest.mark.skipif(not os.path.isfile(FMNIST), reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
def test_prepare_fashion_tiny(tmp_path):
    cupl = 3 if importlib.util.find_spec("clip_benchmark") else 0
    def prepare(out):
        args = [f"--out={out}", "--n_train=8", "--n_val=4", "--n_test=4", f"--cupl_classes={cupl}", "--tokenizer="]
        return subprocess.run([sys.executable, str(ROOT / "data" / "fashion" / "prepare.py"), *args],
                              capture_output=True, text=True, check=True).stdout
    prepare(tmp_path / "a")
    prepare(tmp_path / "b")
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        records = D.check_manifest(tmp_path / "a" / f"{split}.jsonl", fields=["short", "long", "de", "fr"], label=True)
        assert len(records) == n
        for r in records:
            caps = r["captions"]
            assert len(caps["short"]) == 3 and len(caps["long"]) == len(caps["de"]) == len(caps["fr"]) == 2
            assert min(len(t.split()) for t in caps["long"]) > 2 * max(len(t.split()) for t in caps["short"])
            assert 0 <= r["label"] < 10
        # deterministic: a second build is byte for byte the same
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        img = Image.open(tmp_path / "a" / records[0]["image"])
        assert img.size == (64, 64) and img.mode == "RGB"
    classes = json.loads((tmp_path / "a" / "classes.json").read_text())
    assert len(classes["classes"]) == 10 and all("{}" in t for t in classes["templates"])
    if cupl:
        c = json.loads((tmp_path / "a" / "cupl.json").read_text())
        assert len(c["texts"]) == len(c["group"]) and sorted(set(c["group"])) == list(range(len(c["classes"])))
    assert "nothing to do" in prepare(tmp_path / "a")  # complete: a rerun is a no-op
