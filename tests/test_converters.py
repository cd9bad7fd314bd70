"""data/<set>/prepare.py, the converters of the papers' evaluation sets: each runs on a miniature copy of
its set in the real format (tiny real JPEGs), every written record is compared with what the input
files hold (the image path resolves to the right file, the caption lists, languages, labels), the
output passes Manifest.check, and a missing image or a malformed entry stops the converter with
an error that names the file and the entry, writing nothing."""

import importlib.util
import json
import os

import pytest
from PIL import Image

from manifest import Manifest
from tiny import ROOT, run_script

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def jpeg(path, i=0):
    """A real 8x8 JPEG, a different colour per i."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), COLOURS[i % len(COLOURS)]).save(path, "JPEG")
    return str(path)


def convert(name, root, out, check=True, **kw):
    return run_script(f"data/{name}/prepare.py", {"root": root, "out": out, **kw}, check=check)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_matches(manifest, expected, fields=None, label=False):
    """Record i of the manifest is expected[i] = (image file, {field: captions} or None, label or None);
    the manifest passes Manifest.check (images decoded) and no temporary file is left beside it."""
    records = read_jsonl(manifest)
    assert len(records) == len(expected)
    for rec, (image, captions, lab) in zip(records, expected):
        assert os.path.isabs(rec["image"]) and os.path.samefile(rec["image"], image), (rec["image"], image)
        assert rec.get("captions") == captions
        assert rec.get("label") == lab
    Manifest(manifest).check(fields=fields, label=label, decode=True)
    assert not [f for f in os.listdir(os.path.dirname(manifest)) if f.endswith((".tmp", ".partial"))]
    return records


def assert_refused(r, out, *parts):
    """The converter failed, named every one of `parts` in its message, and wrote nothing."""
    assert r.returncode != 0
    for p in parts:
        assert str(p) in r.stderr, (p, r.stderr[-2000:])
    assert not os.path.exists(out) or not os.listdir(out)


FIVE = [[f"a caption {k} of image {i}" for k in range(5)] for i in range(3)]

# -----------------------------------------------------------------------------
# Flickr30k and COCO: BLIP's JSON arrays, Karpathy's dataset_*.json


def blip_flickr(root):
    ann = [{"image": f"flickr30k-images/{1000 + i}.jpg", "caption": FIVE[i]} for i in range(3)]
    ann[1]["caption"] = [c + " " for c in ann[1]["caption"]]  # surrounding whitespace is stripped
    for i in range(3):
        jpeg(root / f"flickr30k-images/{1000 + i}.jpg", i)
    (root / "flickr30k_test.json").write_text(json.dumps(ann))
    return [(root / f"flickr30k-images/{1000 + i}.jpg", {"short": FIVE[i]}, None) for i in range(3)]


def test_flickr30k_blip(tmp_path):
    root, out = tmp_path / "flickr30k", tmp_path / "out"
    expected = blip_flickr(root)
    r = convert("flickr30k", root, out)
    assert_matches(out / "test.jsonl", expected, fields=["short"])
    assert "3 images" in r.stdout and "the 1K test split has 1000" in r.stdout


def test_flickr30k_karpathy(tmp_path):
    root, out = tmp_path / "flickr30k", tmp_path / "out"
    splits = ["train", "test", "val", "test", "test"]
    images = [{"filename": f"{i}.jpg", "split": s, "imgid": i,
               "sentences": [{"raw": f"raw {k} of {i}", "tokens": ["raw"]} for k in range(5)]}
              for i, s in enumerate(splits)]
    for i in range(len(splits)):
        jpeg(root / f"flickr30k-images/{i}.jpg", i)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    r = convert("flickr30k", root, out)
    expected = [(root / f"flickr30k-images/{i}.jpg", {"short": [f"raw {k} of {i}" for k in range(5)]}, None)
                for i in (1, 3, 4)]
    assert_matches(out / "test.jsonl", expected, fields=["short"])
    assert "left out (other splits): train 1, val 1" in r.stdout


def test_flickr30k_two_caption_files_refused(tmp_path):
    root, out = tmp_path / "flickr30k", tmp_path / "out"
    blip_flickr(root)
    (root / "dataset_flickr30k.json").write_text("{}")
    r = convert("flickr30k", root, out, check=False)
    assert_refused(r, out, "more than one Flickr30k caption file", "flickr30k_test.json", "dataset_flickr30k.json", "--ann=")


def blip_coco(root):
    names = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in (42, 73, 74)]
    caps = [FIVE[0], FIVE[1] + ["a sixth caption"], FIVE[2]]  # one image with 6 (as in COCO): all kept
    for i, n in enumerate(names):
        jpeg(root / n, i)
    (root / "coco_karpathy_test.json").write_text(json.dumps(
        [{"image": n, "caption": c, "image_id": i} for i, (n, c) in enumerate(zip(names, caps))]))
    return [(root / n, {"short": c}, None) for n, c in zip(names, caps)]


def test_coco_blip_keeps_every_caption(tmp_path):
    root, out = tmp_path / "coco", tmp_path / "out"
    expected = blip_coco(root)
    r = convert("coco", root, out)
    records = assert_matches(out / "test.jsonl", expected, fields=["short"])
    assert [len(r["captions"]["short"]) for r in records] == [5, 6, 5]  # ragged, as written
    assert "images with more than 5 captions (all kept): 1" in r.stdout


def test_coco_karpathy_and_images_folder(tmp_path):
    """dataset_coco.json (filepath + filename), images under LLM2CLIP's <root>/images/ (--images)."""
    root, out = tmp_path / "coco", tmp_path / "out"
    entries = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": s,
                "sentences": [{"raw": f"c{k} {i}"} for k in range(6 if i == 2 else 5)]}
               for i, s in enumerate(["test", "restval", "test"])]
    for i in range(3):
        jpeg(root / "images/val2014" / f"COCO_val2014_{i:012d}.jpg", i)
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    convert("coco", root, out, images=root / "images")
    expected = [(root / "images/val2014" / f"COCO_val2014_{i:012d}.jpg",
                 {"short": [f"c{k} {i}" for k in range(n)]}, None) for i, n in ((0, 5), (2, 6))]
    assert_matches(out / "test.jsonl", expected, fields=["short"])

# -----------------------------------------------------------------------------
# the long-caption sets: ShareGPT4V-1k, Urban1k, DOCCI


SHAREGPT4V = "share-captioner_coco_lcs_sam_1246k_1107.json"


def sharegpt4v(root, n=5):
    entries = []
    for i in range(n):
        image = f"coco/train2017/{i:012d}.jpg" if i % 2 == 0 else f"sam/images/sa_{i}.jpg"
        jpeg(root / image, i)
        caption = f"The image shows thing {i}.\n\nIt is {'red' if i % 2 else 'blue'}. "
        entries.append({"id": f"{i:012d}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": caption}]})
    (root / SHAREGPT4V).write_text(json.dumps(entries, indent=1))
    return entries


def test_sharegpt4v_first_n_and_newlines(tmp_path):
    root, out = tmp_path / "sharegpt4v", tmp_path / "out"
    entries = sharegpt4v(root)
    # entry 3 onwards is past n=3: broken JSON there is never read
    text = (root / SHAREGPT4V).read_text()
    cut = text.index('"id": "000000000004"')
    (root / SHAREGPT4V).write_text(text[:cut] + "this is not JSON")
    r = convert("sharegpt4v", root, out, n=3)
    expected = [(root / e["image"], {"long": [f"The image shows thing {i}.  It is {'red' if i % 2 else 'blue'}."]}, None)
                for i, e in enumerate(entries[:3])]
    assert_matches(out / "test.jsonl", expected, fields=["long"])
    assert "captions with newlines (replaced by spaces): 3" in r.stdout
    r = convert("sharegpt4v", root, tmp_path / "out5", check=False)  # n=1000 reaches the broken entry
    assert_refused(r, tmp_path / "out5", SHAREGPT4V, "malformed JSON in entry 4")


def test_sharegpt4v_head_of_array_across_chunks(tmp_path, monkeypatch):
    """The incremental parser equals json.load()[:k] however the file is cut into chunks."""
    spec = importlib.util.spec_from_file_location("sharegpt4v_prepare", os.path.join(ROOT, "data/sharegpt4v/prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sharegpt4v(tmp_path, n=6)
    path = str(tmp_path / SHAREGPT4V)
    whole = json.load(open(path))
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(whole, separators=(",", ":"), ensure_ascii=False))
    for chunk in (1, 7, 64, 1 << 20):
        monkeypatch.setattr(mod, "CHUNK", chunk)
        for k in (0, 1, 4, 6, 9):
            assert mod.head_of_array(path, k) == whole[:k]
            assert mod.head_of_array(str(compact), k) == whole[:k]


def urban1k(root, texts=("A busy street with a red bus.", "A quiet square at night.\n")):
    """image/<i>.jpg and caption/<i>.txt for i = 1, 2, ..."""
    os.makedirs(root / "caption", exist_ok=True)
    for i, t in enumerate(texts, 1):
        jpeg(root / f"image/{i}.jpg", i)
        (root / f"caption/{i}.txt").write_text(t)


def test_urban1k(tmp_path):
    root, out = tmp_path / "Urban1k", tmp_path / "out"
    texts = ["A busy street with a red bus.", "A quiet square at night.\n", "Two cyclists on a bridge.\nsecond line\n"]
    urban1k(root, texts)
    (root / "image/.DS_Store").write_bytes(b"\0")
    r = convert("urban1k", root, out)
    expected = [(root / f"image/{i}.jpg", {"long": [t.split("\n")[0]]}, None) for i, t in enumerate(texts, 1)]
    assert_matches(out / "test.jsonl", expected, fields=["long"])
    assert "caption files with text after their first line (not used, as in the official evaluations): 1" in r.stdout
    assert "skipped hidden files: 0 in caption/, 1 in image/" in r.stdout
    assert "Urban1k has 1000" in r.stdout


def test_urban1k_gap_and_orphan_refused(tmp_path):
    root, out = tmp_path / "Urban1k", tmp_path / "out"
    urban1k(root, ["caption 1", "caption 2", "caption 3"])
    os.remove(root / "caption/2.txt")
    jpeg(root / "image/7.jpg")
    r = convert("urban1k", root, out, check=False)
    assert_refused(r, out, root / "caption/2.txt", "caption file not found", root / "image/7.jpg", "without a caption")


def docci(root):
    rows = [("train_00001", "train"), ("test_00001", "test"), ("qual_dev_00001", "qual_dev"), ("test_00002", "test")]
    lines = []
    for i, (eid, split) in enumerate(rows):
        jpeg(root / f"images/{eid}.jpg", i)
        lines.append(json.dumps({"example_id": eid, "split": split, "image_file": f"{eid}.jpg",
                                 "description": f"A long description of {eid}, with detail. ",
                                 "cluster_id": "x"}))
    (root / "docci_descriptions.jsonlines").write_text("\n".join(lines) + "\n")
    return [(root / f"images/{eid}.jpg", {"long": [f"A long description of {eid}, with detail."]}, None)
            for eid, split in rows if split == "test"]


def test_docci_keeps_test_split(tmp_path):
    root, out = tmp_path / "docci", tmp_path / "out"
    expected = docci(root)
    r = convert("docci", root, out)
    assert_matches(out / "test.jsonl", expected, fields=["long"])
    assert "left out: qual_dev 1, train 1" in r.stdout and "DOCCI's test split has 5000" in r.stdout

# -----------------------------------------------------------------------------
# XM3600: one caption field per language


def xm3600(root):
    os.makedirs(root, exist_ok=True)
    keys = ["000411001ff7dd4f", "a0b1c2d3e4f50617"]
    caps = {"en": [["A dog on grass.", "Brown dog."], ["A red car."]],
            "de": [["Ein Hund auf dem Rasen."], ["Ein rotes Auto.", "Auto, rot.", "Rotes Auto "]],
            "ja": [["芝生の上の犬。"], ["赤い車。"]]}
    with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
        for i, key in enumerate(keys):
            jpeg(root / f"images/{key}.jpg", i)
            line = {"image/key": key, "image/locale": "en"}
            for lang, per_image in caps.items():
                line[lang] = {"caption": per_image[i], "caption/tokenized": [c.lower() for c in per_image[i]]}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return [(root / f"images/{key}.jpg", {lang: [c.strip() for c in caps[lang][i]] for lang in sorted(caps)}, None)
            for i, key in enumerate(keys)]


def test_xm3600_languages_as_fields(tmp_path):
    root, out = tmp_path / "xm3600", tmp_path / "out"
    expected = xm3600(root)
    r = convert("xm3600", root, out)
    records = assert_matches(out / "test.jsonl", expected, fields=["de", "en", "ja"])
    assert records[1]["captions"]["de"] == ["Ein rotes Auto.", "Auto, rot.", "Rotes Auto"]
    assert "3 languages: de, en, ja" in r.stdout and "image/locale (2 lines)" in r.stdout


def test_xm3600_missing_language_refused(tmp_path):
    root, out = tmp_path / "xm3600", tmp_path / "out"
    xm3600(root)
    lines = (root / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    second = json.loads(lines[1])
    del second["ja"]
    lines[1] = json.dumps(second, ensure_ascii=False)
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = convert("xm3600", root, out, check=False)
    assert_refused(r, out, root / "captions.jsonl", "line 2 (image/key 'a0b1c2d3e4f50617')", "missing ja")

# -----------------------------------------------------------------------------
# ImageNet: ImageFolder or val_map.txt, and the zero-shot class files


def test_imagenet_image_folder(tmp_path):
    root, out = tmp_path / "imagenet", tmp_path / "out"
    files = [("n01440764", "ILSVRC2012_val_00000293.JPEG", 0), ("n01440764", "ILSVRC2012_val_00002138.JPEG", 0),
             ("n01443537", "ILSVRC2012_val_00000236.JPEG", 1), ("n15075141", "ILSVRC2012_val_00000001.JPEG", 999)]
    for i, (w, name, _) in enumerate(files):
        jpeg(root / "val" / w / name, i)
    (root / "val/n01443537/notes.txt").write_text("not an image")
    os.makedirs(root / "train")  # beside val/: not read
    r = convert("imagenet", root, out)
    assert_matches(out / "val.jsonl", [(root / "val" / w / n, None, lab) for w, n, lab in files], label=True)
    assert "1 non-image entries in class folders (n01443537/notes.txt)" in r.stdout
    assert "4 images of 3 classes" in r.stdout

    from evaluate import read_classes  # the zero-shot files are what evaluate.py reads
    classes, templates = read_classes(out / "classes.json")
    assert len(classes) == 1000 and classes[:3] == ["tench", "goldfish", "great white shark"]
    assert classes[999] == "toilet paper" and len(templates) == 80
    assert templates[0] == "a bad photo of a {}." and all(t.count("{}") == 1 and "{c}" not in t for t in templates)
    single_classes, single = read_classes(out / "classes_single.json")
    assert single_classes == classes and single == ["a photo of the {}."]
    wnids = json.loads((out / "classes.json").read_text())["wnids"]
    assert wnids == sorted(wnids) and wnids[0] == "n01440764" and wnids[999] == "n15075141"


VAL_MAP = [("ILSVRC2012_val_00000001.JPEG", 65), ("ILSVRC2012_val_00000002.JPEG", 970), ("ILSVRC2012_val_00000003.JPEG", 230)]


def val_map(root, rows):
    """The flat layout: val/<name> and val_map.txt lines "<name><TAB><label>"."""
    for i, (name, _) in enumerate(rows):
        jpeg(root / "val" / name, i)
    (root / "val_map.txt").write_text("".join(f"{n}\t{lab}\n" for n, lab in rows))


def test_imagenet_val_map(tmp_path):
    root, out = tmp_path / "imagenet", tmp_path / "out"
    val_map(root, VAL_MAP)
    convert("imagenet", root, out)
    assert_matches(out / "val.jsonl", [(root / "val" / n, None, lab) for n, lab in VAL_MAP], label=True)


def test_imagenet_unknown_class_folder_refused(tmp_path):
    root, out = tmp_path / "imagenet", tmp_path / "out"
    jpeg(root / "val/n01440764/a.JPEG")
    jpeg(root / "val/n99999999/b.JPEG")
    r = convert("imagenet", root, out, check=False)
    assert_refused(r, out, root / "val/n99999999", "not an ImageNet-1k class folder")

# -----------------------------------------------------------------------------
# every converter: a missing image file and a malformed entry are named, nothing is written


def _edit_json(path, fn):
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _edit_line(path, n, fn):
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[n] = fn(lines[n])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _docci_line(line):
    e = json.loads(line)
    e["description"] = 7
    return json.dumps(e)


def _xm_line(line):
    e = json.loads(line)
    e["en"]["caption"] = []
    return json.dumps(e)


# name -> (build the miniature, {"missing": (file to delete, *words the error names),
#                                "malformed": (edit the input, *words the error names)})
CASES = {
    "flickr30k": (blip_flickr, {
        "missing": ("flickr30k-images/1001.jpg", "flickr30k_test.json", "entry 1 (image 'flickr30k-images/1001.jpg')",
                    "image file not found"),
        "malformed": (lambda r: _edit_json(r / "flickr30k_test.json", lambda d: d[2].update(caption="one string")),
                      "flickr30k_test.json", "entry 2 (image 'flickr30k-images/1002.jpg')", "'caption' must be a non-empty list"),
    }),
    "coco": (blip_coco, {
        "missing": ("val2014/COCO_val2014_000000000073.jpg", "coco_karpathy_test.json",
                    "entry 1 (image 'val2014/COCO_val2014_000000000073.jpg')", "image file not found"),
        "malformed": (lambda r: _edit_json(r / "coco_karpathy_test.json", lambda d: d[0]["caption"].append("  ")),
                      "coco_karpathy_test.json", "entry 0 (image 'val2014/COCO_val2014_000000000042.jpg')",
                      "caption[5] must be a non-empty string"),
    }),
    "sharegpt4v": (sharegpt4v, {
        "missing": ("sam/images/sa_3.jpg", SHAREGPT4V, "entry 3 (id '000000000003', image 'sam/images/sa_3.jpg')",
                    "image file not found"),
        "malformed": (lambda r: _edit_json(r / SHAREGPT4V, lambda d: d[1]["conversations"][1].update({"from": "human"})),
                      SHAREGPT4V, "entry 1 (id '000000000001'", "conversations[1] must be"),
    }),
    "urban1k": (urban1k, {
        "missing": ("image/2.jpg", "image/2.jpg", "image file not found (for caption 2.txt)"),
        "malformed": (lambda r: (r / "caption/1.txt").write_text("\n\nthe first line is empty"),
                      "caption/1.txt", "the first line is empty"),
    }),
    "docci": (docci, {
        "missing": ("images/test_00002.jpg", "docci_descriptions.jsonlines", "line 4 (example_id 'test_00002')",
                    "image file not found"),
        "malformed": (lambda r: _edit_line(r / "docci_descriptions.jsonlines", 1, _docci_line),
                      "docci_descriptions.jsonlines", "line 2 (example_id 'test_00001')", "description must be"),
    }),
    "xm3600": (xm3600, {
        "missing": ("images/a0b1c2d3e4f50617.jpg", "captions.jsonl", "line 2 (image/key 'a0b1c2d3e4f50617')",
                    "image file not found"),
        "malformed": (lambda r: _edit_line(r / "captions.jsonl", 0, _xm_line),
                      "captions.jsonl", "line 1 (image/key '000411001ff7dd4f')", "'en.caption' must be a non-empty list"),
    }),
    "imagenet": (lambda r: val_map(r, VAL_MAP[:2]), {
        "missing": ("val/ILSVRC2012_val_00000002.JPEG", "val_map.txt", "line 2 (ILSVRC2012_val_00000002.JPEG)",
                    "image file not found"),
        "malformed": (lambda r: (r / "val_map.txt").write_text("ILSVRC2012_val_00000001.JPEG\t65\nILSVRC2012_val_00000002.JPEG 1000\n"),
                      "val_map.txt", "line 2 (ILSVRC2012_val_00000002.JPEG)", "label 1000 is not in 0..999"),
    }),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("fault", ["missing", "malformed"])
def test_fault_names_file_and_entry(tmp_path, name, fault):
    root, out = tmp_path / name, tmp_path / "out"
    build, faults = CASES[name]
    os.makedirs(root, exist_ok=True)
    build(root)
    action, *words = faults[fault]
    if fault == "missing":
        os.remove(root / action)
    else:
        action(root)
    r = convert(name, root, out, check=False)
    assert_refused(r, out, *words)
    assert "nothing written" in r.stderr
