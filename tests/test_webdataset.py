"""data/webdataset/prepare.py on img2dataset shards as the papers' downloads are: recaptions in KEY.json
(LLM2CLIP's download recipe) or in one DreamLIP CSV per source, several sources in one manifest, the
chosen pair as short/long; a sidecar's malformed row named by file and line; duplicate sidecar keys
counted (the first wins); a KEY.json that does not parse named; an --out it did not write refused."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from paper_miniature import DREAMLIP, dreamlip_csv, jpeg_bytes, shards
from tiny import ROOT, write_tar


def prepare(**kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data", "webdataset", "prepare.py")] +
                          [f"--{k}={v}" for k, v in kw.items()], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def two_sources(tmp_path):
    """cc3m: recaptions in KEY.json; cc12m: alt-text in KEY.txt and a DreamLIP CSV (16 listed, 12 there)."""
    rng = np.random.default_rng(3)
    a = shards(tmp_path / "cc3m", "cc3m", 2, 6, rng, in_key_json=True)
    b = shards(tmp_path / "cc12m", "cc12m", 2, 6, rng, in_key_json=False)
    dreamlip_csv(tmp_path / "cc12m.csv", b)
    return tmp_path, a, b


def downloaded(listed):
    return [x for j, x in enumerate(listed) if j % 8 % 4 != 3]  # shards() skips every fourth of 8


def test_key_json_and_sidecar_sources_in_one_manifest(two_sources):
    d, a, b = two_sources
    out = d / "out" / "train.jsonl"
    r = prepare(shards=f"{d / 'cc3m'},{d / 'cc12m'}", long_captions=d / "cc12m.csv", out=out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recaptions from the sidecars for 12, from KEY.json for 12, none for 0" in r.stdout
    assert "sidecar entries: 16 read, 12 matched an image, 0 duplicate keys" in r.stdout
    recs = records(out)
    assert len(recs) == 24 and recs[0]["image"] == "../cc12m/00000.tar/000000000.jpg"  # sorted by path
    want = [(alt, rec["shortSV_captions"], rec["longSV_captions"]) for _, alt, rec in downloaded(b) + downloaded(a)]
    got = [(r["captions"]["raw"][0], r["captions"]["short"][0], r["captions"]["long"][0]) for r in recs]
    assert got == want
    assert all(set(r["captions"]) == {"short", "long", "raw"} for r in recs)
    meta = json.load(open(str(out) + ".prepare.json"))
    assert meta["counts"]["from_key_json"] == 12 and meta["sidecar"]["entries"] == 16
    # another pair, and every recaption kept
    out2 = d / "out" / "all.jsonl"
    r = prepare(shards=f"{d / 'cc3m'},{d / 'cc12m'}", long_captions=d / "cc12m.csv", out=out2,
                recaptions="LLA", keep_all=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = records(out2)[-1]
    src = downloaded(a)[-1][2]
    assert rec["captions"]["short"] == [src["shortLLA_captions"]]
    assert set(rec["captions"]) == {"short", "long", "raw", "shortIB", "longIB", "shortSV", "longSV"}


def test_sidecar_per_source_and_duplicates(two_sources):
    d, a, b = two_sources
    dreamlip_csv(d / "cc3m.csv", a + a[:3])  # three entries listed twice: the first wins, counted
    with open(d / "cc3m.csv", "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([a[0][0], "other", *("a different caption" for _ in DREAMLIP)])
    out = d / "train.jsonl"
    r = prepare(shards=f"{d / 'cc3m'},{d / 'cc12m'}", long_captions=f"{d / 'cc3m.csv'},{d / 'cc12m.csv'}",
                out=out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sidecar entries: 36 read, 24 matched an image, 4 duplicate keys (the first entry wins; e.g. url:" \
        in r.stdout, r.stdout
    first = [x for x in records(out) if "cc3m/00000.tar/000000000.jpg" in x["image"]][0]
    assert first["captions"]["long"] == [a[0][2]["longSV_captions"]]


@pytest.mark.parametrize("fault, line, words", [
    ("missing", 3, "5 fields, the header has 8 (a missing or extra column, or a ragged row)"),
    ("extra", 4, "9 fields, the header has 8"),
    ("latin1", 2, "is not UTF-8"),
    ("no_url", 3, "no 'Image Path' value"),
])
def test_malformed_csv_rows_named(two_sources, fault, line, words):
    d, _, b = two_sources
    path = d / "cc12m.csv"
    lines = path.read_bytes().split(b"\n")
    n = line - 1  # 0-based index of the physical line (1 = the header)
    if fault == "missing":
        lines[n] = b",".join(lines[n].split(b",")[:5])
    elif fault == "extra":
        lines[n] = lines[n].rstrip(b"\r") + b",x\r"  # csv.writer ends lines with \r\n
    elif fault == "latin1":
        lines[n] = lines[n].replace(b"a", "\u00e9".encode("latin-1"), 1)
    else:
        lines[n] = b"," + lines[n].split(b",", 1)[1]
    path.write_bytes(b"\n".join(lines))
    out = d / "train.jsonl"
    r = prepare(shards=d / "cc12m", long_captions=path, out=out)
    assert r.returncode != 0 and f"{path}:{line}: " in r.stderr and words in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.parametrize("text, line, words", [
    ('{"key": "000000000", "long": "a"}\n{"key": "000000001", "long": \n', 2, "not JSON"),
    ('{"key": "000000000", "long": "a"}\n\n["a list"]\n', 3, "expected an object, got list"),
    ('{"long": "a"}\n', 1, "no 'key', 'url' or 'image'"),
])
def test_malformed_jsonl_sidecar_named(two_sources, text, line, words):
    d, _, _ = two_sources
    path = d / "long.jsonl"
    path.write_text(text)
    r = prepare(shards=d / "cc12m", long_captions=path, out=d / "train.jsonl")
    assert r.returncode != 0 and f"{path}:{line}: {words}" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr[-2000:]


def test_key_json_that_does_not_parse(tmp_path):
    rng = np.random.default_rng(0)
    members = []
    for i in range(3):
        meta = json.dumps({"url": f"https://x/{i}.jpg", "raw_caption": "alt",
                           "shortSV_captions": "a short", "longSV_captions": "a long one"})
        members += [(f"{i:09d}.jpg", jpeg_bytes(rng)), (f"{i:09d}.json", (meta if i != 1 else meta[:20]).encode())]
    os.makedirs(tmp_path / "s")
    write_tar(tmp_path / "s" / "00000.tar", members)
    r = prepare(shards=tmp_path / "s", out=tmp_path / "m.jsonl")
    assert r.returncode != 0 and "00000.tar: member 000000001.json does not parse" in r.stderr, r.stderr
    r = prepare(shards=tmp_path / "s", out=tmp_path / "m.jsonl", skip_bad=True)
    assert r.returncode == 0 and "bad json 1" in r.stdout, r.stdout + r.stderr
    assert len(records(tmp_path / "m.jsonl")) == 2
    skipped = records(str(tmp_path / "m.jsonl") + ".skipped.jsonl")
    assert skipped[0]["key"] == "000000001" and "does not parse" in skipped[0]["why"]
    assert json.load(open(str(tmp_path / "m.jsonl") + ".prepare.json"))["counts"]["bad_json"] == 1


def test_out_not_written_by_prepare_is_kept(two_sources):
    d, _, _ = two_sources
    out = d / "train.jsonl"
    out.write_text("my own notes\n")
    r = prepare(shards=d / "cc3m", out=out)
    assert r.returncode != 0 and "was not written by prepare.py" in r.stderr
    assert out.read_text() == "my own notes\n"
    r = prepare(shards=d / "cc3m,/no/such/folder", out=d / "x.jsonl")
    assert r.returncode != 0 and "/no/such/folder is neither a folder nor a file" in r.stderr
