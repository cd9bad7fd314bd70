"""manifest.py, images.py and data/fashion/prepare.py: the manifest check finds every planted fault with its line,
CLIP preprocessing against hand-computed values, reproducible crops, bad images during loading, the
caption row order, and a tiny build of the Fashion-MNIST demo set."""

import importlib.util
import io
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

import images
from manifest import Manifest, caption_rows

ROOT = Path(__file__).resolve().parent.parent
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
MEAN, STD = torch.tensor(images.CLIP_MEAN), torch.tensor(images.CLIP_STD)


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
        Manifest(planted).check(fields=["short", "long"], decode=True)
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
        Manifest(planted).check(fields=["short", "long"])
    assert "5 fault(s)" in str(e.value) and "line 3" not in str(e.value) and "line 8" not in str(e.value)
    # a requested field that is absent, a missing label when labels are required
    path = tmp_path / "ok.jsonl"
    path.write_text(rec("img/a.png") + "\n" + json.dumps({"image": "img/b.png", "captions": {"short": ["y"]}}) + "\n")
    records = Manifest(path).check(decode=True)  # clean without requirements
    assert [r["image"] for r in records] == ["img/a.png", "img/b.png"]
    with pytest.raises(ValueError, match=r"line 2: caption field 'de' is missing(.|\n)*line 2: missing key 'label'"):
        Manifest(path).check(fields=["short", "de"], label=True, decode=True)


def test_check_manifest_lists_the_first_20_then_counts(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(rec(f"gone{i}.png") + "\n" for i in range(25)))
    msg = str(pytest.raises(ValueError, Manifest(path).check, decode=True).value)
    assert "25 fault(s) on 25 of 25 lines" in msg and "line 20: image file not found" in msg
    assert "line 21" not in msg and msg.endswith("... and 5 more")


def test_text_only_check_names_the_bad_lines(planted):
    """What text-only scripts open: record faults refuse (missing images are for the scripts that read images)."""
    with pytest.raises(ValueError) as e:
        Manifest(planted).check(images="ignore")
    assert str(e.value).splitlines()[:4] == [
        f"{planted}: 3 fault(s) on 3 of 9 lines:",
        "  line 4: malformed JSON: Expecting ',' delimiter: line 1 column 51 (char 50)",
        "  line 6: caption short[1] must be a non-empty string, got ''",
        "  line 7: 'label' must be an int, got '3'"]


def test_caption_policy_and_labels(tmp_path):
    """Captions: a field is a non-empty list of strings with something besides whitespace (a bare string
    would be split into characters); a label is an int >= 0; every refusal names the manifest and line."""
    cases = [({"short": "a red shirt"}, 1, "caption field 'short' must be a non-empty list of strings, got 'a red shirt'"),
             ({"short": []}, 1, "caption field 'short' must be a non-empty list of strings, got []"),
             ({"short": ["ok", "   "]}, 1, "caption short[1] must be a non-empty string, got '   '"),
             ({"short": ["ok", 3]}, 1, "caption short[1] must be a non-empty string, got 3"),
             ({"../x": ["ok"]}, 1, "caption field name '../x' must be letters, digits, '_' or '-'"),
             ({"short": ["ok"]}, "3", "'label' must be an int, got '3'"),
             ({"short": ["ok"]}, True, "'label' must be an int, got True"),
             ({"short": ["ok"]}, -1, "'label' must be a class index >= 0 (and < 2^31), got -1")]
    for k, (caps, label, msg) in enumerate(cases):
        path = tmp_path / f"m{k}.jsonl"
        path.write_text(rec("a.png") + "\n" + json.dumps({"image": "a.png", "captions": caps, "label": label}) + "\n")
        with pytest.raises(ValueError) as e:
            Manifest(path).check(images="ignore")
        assert str(e.value) == f"{path}: 1 fault(s) on 1 of 2 lines:\n  line 2: {msg}", str(e.value)


def test_duplicate_images_are_reported_once(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(rec(f"{i % 3}.png") + "\n" for i in range(7)))
    man = Manifest(path)
    err = capsys.readouterr().err
    assert man.meta["duplicates"]["count"] == 4 and man.meta["duplicates"]["examples"][0] == [1, 4, "0.png"]
    assert f"{path}: warning: 4 record(s) name an image an earlier line names (lines 1 and 4: 0.png" in err, err
    Manifest(path)  # indexed already: nothing said again
    assert "warning" not in capsys.readouterr().err


def test_manifest_index_api(tmp_path):
    path = tmp_path / "m.jsonl"
    recs = [{"image": "0.png", "captions": {"long": ["a", "b"], "short": ["s0"]}, "label": 4},
            {"image": "1.png", "captions": {"long": ["c"]}},
            {"image": "2.png", "captions": {"long": ["d", "e", "f"], "short": ["s2"]}, "label": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    man = Manifest(path)
    assert len(man) == 3 and man.fields == ["long", "short"] and [man[i] for i in range(3)] == recs
    assert man.ptr("long").tolist() == [0, 2, 3, 6] and man.ptr("short").tolist() == [0, 1, 1, 2]
    assert man.rows("long", 2).tolist() == [3, 4, 5] and man.rows("short", 1).tolist() == []
    assert [man.text("long", r) for r in range(6)] == list("abcdef") == man.texts("long")
    assert man.texts("long", 2, 5) == ["c", "d", "e"] and man.texts("long", 5, 99) == ["f"]
    assert man.row_images("long").tolist() == [0, 0, 1, 2, 2, 2]
    assert man.labels.tolist() == [4, -1, 0] and man.labels.dtype == np.int32
    assert list(man.rows_of("long")[2]) == [3, 4, 5] and man.texts_of("long")[3] == "d"
    with pytest.raises(ValueError, match=rf"{path}: 1 fault\(s\) on 1 of 3 lines:\n  line 2: caption field 'short' is missing"):
        man.check(fields=["long", "short"], images="ignore")
    with pytest.raises(ValueError, match=r"line 2: missing key 'label'"):
        man.check(label=True, images="ignore")
    with pytest.raises(KeyError, match="no caption field 'de'"):
        man.ptr("de")
    texts, index = caption_rows(man, "long")  # the evaluation helper, same order
    assert texts == list("abcdef") and index.tolist() == [0, 0, 1, 2, 2, 2]


def test_caption_rows_order():
    records = [{"image": "0", "captions": {"long": ["a", "b"], "short": ["s0"]}},
               {"image": "1", "captions": {"long": ["c"]}},
               {"image": "2", "captions": {"long": ["d", "e", "f"]}}]
    texts, index = caption_rows(records, "long")
    assert texts == ["a", "b", "c", "d", "e", "f"]
    assert index.dtype == np.int64 and index.tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match=r"record 1 \(line 2\) has no captions in field 'short'"):
        caption_rows(records, "short")

# -----------------------------------------------------------------------------
# preprocessing

def test_eval_transform_constant_colour_and_grey():
    rgb = (255, 0, 128)
    x = images.eval_transform(Image.new("RGB", (40, 30), rgb), 16)  # resized, then centre-cropped
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    want = (torch.tensor(rgb) / 255.0 - MEAN) / STD  # [1.9303, -1.7521, 0.3486]
    torch.testing.assert_close(x, want.view(3, 1, 1).expand(3, 16, 16), atol=1e-5, rtol=0)
    g = images.eval_transform(Image.new("L", (20, 20), 200), 20)  # greyscale -> three equal channels, normalised
    torch.testing.assert_close(g, ((200 / 255.0 - MEAN) / STD).view(3, 1, 1).expand(3, 20, 20), atol=1e-6, rtol=0)


def test_eval_transform_centre_crop_geometry():
    # 30 wide x 20 high, size 20: no resize, crop columns 5..24 (offset round((30 - 20) / 2) = 5)
    a = np.zeros((20, 30, 3), np.uint8)
    a[:, :, 0] = np.arange(30) * 8
    x = images.eval_transform(Image.fromarray(a), 20)
    want = (torch.arange(5, 25) * 8 / 255.0 - MEAN[0]) / STD[0]
    torch.testing.assert_close(x[0, 7], want.float(), atol=1e-6, rtol=0)
    # tall image: shortest side 10 -> 20, long side int(20 * 25 / 10) = 50, crop rows 15..34
    assert images.eval_transform(Image.new("RGB", (10, 25)), 20).shape == (3, 20, 20)


def test_train_transform_seeded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    crop = lambda s: images.train_transform(img, 32, torch.Generator().manual_seed(s))
    a, b, c = crop(1), crop(1), crop(2)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # scale 1 and ratio 1: the crop is the whole image, so it equals the eval transform
    full = images.train_transform(img, 48, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    torch.testing.assert_close(full, images.eval_transform(img, 48), atol=0, rtol=0)

PREPROCESS = {  # one of each resize rule, with filters, means and crops unlike the defaults
    "square": dict(resize="square", size=20, crop_size=20, resample="bilinear", image_mean=(0.5, 0.4, 0.3),
                   image_std=(0.5, 0.6, 0.7)),
    "shortest_side_crop": dict(resize="shortest_side_crop", size=24, crop_size=20, resample="bicubic",
                               image_mean=(0.1, 0.2, 0.3), image_std=(0.3, 0.2, 0.1)),
    "clip_lanczos": dict(resize="shortest_side_crop", size=16, crop_size=16, resample="lanczos",
                         image_mean=images.CLIP_MEAN, image_std=images.CLIP_STD)}


@pytest.mark.parametrize("mode", PREPROCESS)
def test_dataset_applies_the_towers_preprocessing(tmp_path, mode):
    """ImageDataset(preprocess=tower.preprocess) in eval gives exactly the reference of test_siglip.py
    (`apply`, which matches HF's CLIP and SigLIP processors), for wide, tall and square images; in training
    a crop_size square whose scale = ratio = 1 crop of the whole image is the eval transform (for a square
    tower on any image: its crop ratios are relative to the image's)."""
    from test_siglip import apply
    p = images.ImagePreprocess(**PREPROCESS[mode])
    rng = np.random.default_rng(1)
    shapes = [(30, 44), (44, 30), (26, 26), (20, 90)]
    for i, shape in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": f"{i}.png"}) + "\n" for i in range(len(shapes))))
    ds = images.ImageDataset(Manifest(tmp_path / "m.jsonl"), preprocess=p)
    tr = images.ImageDataset(Manifest(tmp_path / "m.jsonl"), preprocess=p, train=True, seed=3)
    for i in range(len(shapes)):
        img = Image.open(tmp_path / f"{i}.png").convert("RGB")
        x = ds[i][0]
        assert x.shape == (3, p.crop_size, p.crop_size)
        torch.testing.assert_close(x, apply(p, img), atol=0, rtol=0)
        y = tr[i][0]
        assert y.shape == x.shape and torch.equal(y, tr[i][0]) and not torch.equal(y, x)
        whole = images.train_transform(img, p, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
        if p.resize == "square" or shape[0] == shape[1]:
            torch.testing.assert_close(whole, x, atol=0, rtol=0)
    # the old keyword: CLIP's preprocessing at that size
    old = images.ImageDataset(Manifest(tmp_path / "m.jsonl"), size=16)
    assert old.preprocess == images.clip_preprocess(16) and torch.equal(old[0][0], images.eval_transform(Image.open(tmp_path / "0.png"), 16))
    with pytest.raises(ValueError, match="give size= .* or preprocess=, not both"):
        images.ImageDataset(Manifest(tmp_path / "m.jsonl"), size=16, preprocess=p)
    with pytest.raises(ValueError, match="resize 'stretch': expected"):
        images.eval_transform(img, images.ImagePreprocess(**{**PREPROCESS[mode], "resize": "stretch"}))


def test_square_jpeg_draft_stays_close():
    """Draft decoding under a SigLIP-style square resize: same region, output about as close as CLIP's."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (45, 80, 3), dtype=np.uint8)).resize((2400, 1350), Image.BICUBIC)
    a = np.asarray(base).astype(np.int16) + rng.integers(-12, 13, (1350, 2400, 3))  # noise: fine detail to lose
    b = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(b, "JPEG", quality=90)
    p = images.siglip_preprocess(224)
    for fn in (lambda img, d: images.eval_transform(img, p, draft=d),
               lambda img, d: images.train_transform(img, p, torch.Generator().manual_seed(3), draft=d)):
        full, fast = fn(Image.open(io.BytesIO(b.getvalue())), False), fn(Image.open(io.BytesIO(b.getvalue())), True)
        assert full.shape == fast.shape == (3, 224, 224)
        diff = (full - fast).abs() * 0.5 * 255  # in 8-bit levels (std 0.5)
        assert 0 < diff.mean() < 1.0 and diff.max() < 40, (diff.mean(), diff.max())


def ramp_images():
    """(name, image, format, expected R row or None) for every mode Pillow reads from files: a horizontal ramp
    over the mode's full range, saved and read back. None: only the span and the direction are checked."""
    r8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    r16 = r8.astype(np.uint16) * 257  # 0..65535
    L = lambda a: Image.fromarray(np.ascontiguousarray(a), "L")
    zero, mid = L(np.zeros_like(r8)), L(np.full_like(r8, 128))
    up = np.arange(256)
    pal = L(r8).convert("P")
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    return [("1", Image.fromarray(r8 >= 128), "PNG", np.where(up >= 128, 255, 0)),
            ("L", L(r8), "PNG", up), ("P", pal, "PNG", up), ("P+transparency", pal_t, "PNG", up),
            ("LA", Image.merge("LA", [L(r8), L(r8[:, ::-1])]), "PNG", up),
            ("RGBA", Image.merge("RGBA", [L(r8)] * 3 + [L(r8[:, ::-1])]), "PNG", up),
            ("PA", Image.merge("LA", [L(r8), L(r8)]).convert("PA"), "TIFF", up),
            ("CMYK", Image.merge("CMYK", [L(r8), zero, zero, zero]), "TIFF", 255 - up),
            ("CMYK", Image.merge("CMYK", [L(r8), zero, zero, zero]), "JPEG", None),
            ("YCbCr", Image.merge("YCbCr", [L(r8), mid, mid]), "TIFF", None),
            ("LAB", Image.merge("LAB", [L(r8), mid, mid]), "TIFF", None),
            ("I;16", Image.fromarray(r16), "PNG", up),
            ("I;16B", Image.frombytes("I;16B", (256, 4), r16.astype(">u2").tobytes()), "TIFF", up),
            ("I", Image.fromarray(r16.astype(np.int32)), "TIFF", up),
            ("I", Image.fromarray(r16.astype(np.int32) - 40000), "TIFF", up),  # outside 0..65535: its min..max
            ("F", Image.fromarray((r16 / 65535).astype(np.float32)), "TIFF", up),
            ("F", Image.fromarray((r16 / 65535 * 1000 - 300).astype(np.float32)), "TIFF", up)]


@pytest.mark.parametrize("k", range(len(ramp_images())))
def test_every_mode_keeps_its_range(tmp_path, k):
    """Issue 17: 16-bit ("I;16" from a PNG: Pillow's convert clips it to 255, nearly all white), palette,
    CMYK, alpha, float: RGB with the full range, each ramp mapped onto the expected 8-bit ramp."""
    name, img, fmt, want = ramp_images()[k]
    path = tmp_path / f"ramp.{fmt.lower()}"
    img.save(path, fmt)
    back = Image.open(path)
    assert back.mode == (name if name != "P+transparency" else "P") or fmt == "PNG" and name == "I;16B"
    out = np.asarray(images.to_rgb(back))
    assert out.dtype == np.uint8 and out.shape == (4, 256, 3)
    row = out[0, :, 0].astype(int)
    assert row.min() <= 2 and row.max() >= 253, (name, fmt, row.min(), row.max())
    assert np.all(np.diff(row) >= 0) or np.all(np.diff(row) <= 0), (name, fmt)
    if want is not None:
        assert np.abs(row - want).max() <= 1, (name, fmt, row[::32], want[::32])
    if name == "I;16":  # the dataset path too: a 16-bit ramp stays a ramp (mean mid-grey), not white
        (tmp_path / "m.jsonl").write_text(json.dumps({"image": path.name}) + "\n")
        x = images.ImageDataset(Manifest(tmp_path / "m.jsonl"), size=16)[0][0]
        x = x * STD.view(3, 1, 1) + MEAN.view(3, 1, 1)
        assert abs(x.mean().item() - 0.5) < 0.05, x.mean()


def test_jpeg_draft_decoding_stays_close():
    """Draft decoding (large JPEGs decoded at 1/2..1/8 scale) crops the same region and changes the
    output about as little as Pillow's reducing_gap=2 shortcut; small JPEGs and PNGs are untouched."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((1800, 1350), Image.BICUBIC)
    a = np.asarray(base).astype(np.int16) + rng.integers(-12, 13, (1350, 1800, 3))
    a[400:404] = 250  # a hard edge
    b = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(b, "JPEG", quality=90)
    data = b.getvalue()
    big = Image.open(io.BytesIO(data))
    box = images._draft(big, (100.0, 50.0, 1500.0, 1250.0), 224)
    assert big.size == (900, 675) and box == (50.0, 25.0, 750.0, 625.0)  # 1/2 scale: 1200 / 2 >= 2 x 224 > 1200 / 4
    levels = (images.CLIP_STD[0] * 255)
    for size in (224, 336):
        for fn in (lambda img, d: images.eval_transform(img, size, draft=d),
                   lambda img, d: images.train_transform(img, size, torch.Generator().manual_seed(3), draft=d)):
            full, fast = fn(Image.open(io.BytesIO(data)), False), fn(Image.open(io.BytesIO(data)), True)
            diff = (full - fast).abs() * levels  # in 8-bit levels (roughly: one channel's std)
            assert diff.mean() < 1.0 and diff.max() < 40, (size, diff.mean(), diff.max())
    small = io.BytesIO()
    Image.fromarray(a[:375, :500].clip(0, 255).astype(np.uint8)).save(small, "JPEG", quality=90)
    for data in (small.getvalue(),):
        assert torch.equal(images.eval_transform(Image.open(io.BytesIO(data)), 224, draft=True),
                           images.eval_transform(Image.open(io.BytesIO(data)), 224))

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
    ds = images.ImageDataset(Manifest(folder / "m.jsonl"), size=8)
    x, i, label = ds[2]
    assert x.shape == (3, 8, 8) and (i, label) == (2, 2)
    tr = [images.ImageDataset(Manifest(folder / "m.jsonl"), size=8, train=True, seed=5) for _ in range(2)]
    assert torch.equal(tr[0][1][0], tr[1][1][0])  # same (seed, epoch, index): same crop
    tr[1].set_epoch(1)
    assert not torch.equal(tr[0][1][0], tr[1][1][0])


def test_dataset_bad_image_raises_naming_file_and_line(folder):
    ds = images.ImageDataset(Manifest(folder / "m.jsonl"), size=8)
    with pytest.raises(ValueError, match=rf"m.jsonl:4: cannot read image {folder / 'img' / '3.png'}"):
        ds[3]


def test_dataset_skip_bad_counts_across_workers(folder):
    ds = images.ImageDataset(Manifest(folder / "m.jsonl"), size=8, skip_bad=True)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=images.collate)
    batches = list(loader)
    # item 3 replaced by the next readable image (4): batches stay full, the same whatever the workers
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [4, 4, 5]]
    assert batches[1][0].shape == (3, 3, 8, 8) and batches[1][2].tolist() == [4, 4, 5]
    assert torch.equal(batches[1][0][0], batches[1][0][1])
    assert ds.n_skipped == 1 and ds.skipped() == [(4, str(folder / "img" / "3.png"))]  # written by a worker
    assert images.collate([None, None]) is None
    (folder / "img" / "5.png").unlink()  # the last one too: the walk wraps around to the first image
    ds = images.ImageDataset(Manifest(folder / "m.jsonl"), size=8, skip_bad=True)
    assert ds[5][1] == 0 and ds[3][1] == 4 and ds.skipped() == [(4, str(folder / "img" / "3.png")),
                                                                 (6, str(folder / "img" / "5.png"))]

# -----------------------------------------------------------------------------
# CuPL

def test_read_cupl(monkeypatch):
    spec = importlib.util.spec_from_file_location("fashion_prepare", ROOT / "data" / "fashion" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    if importlib.util.find_spec("clip_benchmark") is None:
        pytest.skip(f"clip-benchmark is not installed: {prepare.CUPL_INSTALL}")
    cupl = prepare.read_cupl()
    assert len(cupl) == 998 and all(isinstance(v, list) and v for v in cupl.values())
    assert "goldfish" in cupl
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps clip-benchmark==1.6.2"):
        prepare.cupl_path()

# -----------------------------------------------------------------------------
# data/fashion/prepare.py at a tiny size

@pytest.mark.skipif(not os.path.isfile(FMNIST), reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
def test_prepare_fashion_tiny(tmp_path):
    cupl = 3 if importlib.util.find_spec("clip_benchmark") else 0
    def prepare(out):
        args = [f"--out={out}", "--n_pretrain=6", "--n_single=3", "--n_train=8", "--n_test=4", "--n_zeroshot=5",
                f"--cupl_classes={cupl}", "--tokenizer="]
        return subprocess.run([sys.executable, str(ROOT / "data" / "fashion" / "prepare.py"), *args],
                              capture_output=True, text=True, check=True).stdout
    prepare(tmp_path / "a")
    prepare(tmp_path / "b")
    splits = {"pretrain": (9, ["short"]), "train": (8, ["short", "long", "short_de", "de"]), "test": (4, ["short", "long", "de", "fr"]),
              "zeroshot": (5, ["short"])}
    for split, (n, fields) in splits.items():
        records = list(Manifest(tmp_path / "a" / f"{split}.jsonl").check(fields=fields, label=split == "zeroshot", decode=True))
        assert len(records) == n
        for r in records:
            caps = r["captions"]
            assert sorted(caps) == sorted(fields)
            grid = "long" in caps or split == "pretrain" and "label" not in r
            if grid:  # one short caption per item, naming its place; long ones name all four items
                assert len(caps["short"]) == 4 and all(any(p in t for p in ("top", "bottom")) for t in caps["short"])
                assert "short_de" not in caps or len(caps["short_de"]) == 4  # German, item by item (stage 1)
            else:  # a single item: its class is the label
                assert 0 <= r["label"] < 10 and len(caps["short"]) == 3
            if "long" in caps:
                assert len(caps["long"]) == 2 and len(caps["de"]) == (2 if split == "train" else 1)
                assert min(len(t.split()) for t in caps["long"]) > 2 * max(len(t.split()) for t in caps["short"])
                assert all(t.count("left") + t.count("right") == 4 for t in caps["long"])  # every item placed
            assert "fr" not in caps or len(caps["fr"]) == 1  # French: test only, a language no stage sees
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
