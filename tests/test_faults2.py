"""The fault battery, round two (issue 30): the files between the steps (the manifest index, the
embedding cache), the outputs a command writes, the shards it reads, a full disk and non-finite
values. Each case asserts the refusal and what its message names (or the counted report), and the
bytes of every file that must survive.

    python -m pytest tests/test_faults2.py -s    # also prints this battery's rows of the fault table

Most cases call the scripts' functions in this process (seconds); those that run a script end to
end are marked slow."""

import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

import filecheck
from manifest import Manifest
from tiny import ROOT, run_script, write_images, write_manifest

TABLE = []  # (fault, command, first line of the message or the count), in the order run

def row(fault, command, text):
    TABLE.append((fault, command, text.strip().splitlines()[0] if text.strip() else "(none)"))

@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if TABLE:
        print("\n\nfault | command | first line of the message, or the count")
        for f, c, t in TABLE:
            print(f"{f} | {c} | {t}")

def png(i, size=8):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (30 * i % 256, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()

def tar(path, members):
    """A tar file of (name, bytes) members, in order (a name may come twice)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

# -----------------------------------------------------------------------------
# rule 1: the manifest index is checked on open, and rebuilt when damaged

@pytest.mark.parametrize("what,name", [("cut", "offsets.npy"), ("deleted", "ptr.long.npy"),
                                       ("cut", "status.npy"), ("emptied", "faults.json")])
def test_damaged_index_is_named_and_rebuilt(tmp_path, capsys, what, name):
    path = write_manifest(tmp_path / "m.jsonl", n=12)
    write_images(tmp_path, 12)
    man = Manifest(path).check(fields=["long"], decode=True)
    want = [man[i] for i in range(12)], man.texts("long")
    index = man.index
    f = os.path.join(index, name)
    if what == "cut":
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) - 8)
    elif what == "deleted":
        os.remove(f)
    else:
        open(f, "w").close()
    capsys.readouterr()
    man = Manifest(path, quiet=True).check(fields=["long"], decode=True)  # no image blamed
    err = capsys.readouterr().err
    row(f"manifest index: {name} {what}", "any script opening m.jsonl", err.replace(str(tmp_path), ""))
    assert f"{path}: its index {index} is damaged: {f}: " in err and "rebuilding it" in err, err
    assert ([man[i] for i in range(12)], man.texts("long")) == want
    assert filecheck.file_faults(index, man.meta["files"]) == []

def test_index_records_every_file(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", n=5)
    meta = Manifest(path, quiet=True).meta
    index = path + ".index"
    assert sorted(meta["files"]) == sorted(n for n in os.listdir(index) if n != "meta.json")
    assert meta["files"]["offsets.npy"] == dict(bytes=os.path.getsize(f"{index}/offsets.npy"),
                                                dtype="int64", shape=[6])

# -----------------------------------------------------------------------------
# rule 5: duplicates in and across tar shards are counted, named and kept

def test_duplicate_keys_across_and_within_shards(tmp_path, capsys):
    s = tmp_path / "s"
    s.mkdir()
    tar(s / "0.tar", [("a.png", png(1)), ("b.png", png(2)), ("b.png", png(3))])  # b twice
    tar(s / "1.tar", [("a.png", png(4)), ("c.png", png(5))])  # a again, in another shard
    lines = ["s/0.tar/a.png", "s/0.tar/b.png", "s/1.tar/a.png", "s/1.tar/c.png"]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"image": p, "captions": {"short": ["a red shirt"]}}) + "\n"
                         for p in lines))
    man = Manifest(m).check(decode=True)
    err = capsys.readouterr().err
    keys, members = man.meta["duplicate_keys"], man.meta["duplicate_members"]
    assert keys["count"] == 1 and keys["examples"] == [[1, 3, "a", "s/0.tar/a.png",
                                                        "s/1.tar/a.png"]], keys
    assert members == {"count": 1, "examples": [["s/0.tar", "b.png"]]}, members
    line = next(x for x in err.splitlines() if "key of a member" in x)
    assert f"{m}: warning: 1 tar member(s) have the key of a member another line names in another " \
        "shard (lines 1 and 3: key 'a' in s/0.tar/a.png and s/1.tar/a.png); both lines are kept" \
        == line, err
    assert "1 member name(s) come twice in one shard (s/0.tar: b.png); the first of each is read" \
        in err, err
    row("the same key in two tar shards", "any script opening the manifest", line.split(": ", 1)[1])
    row("a member name twice in one shard", "any script opening the manifest",
        next(x for x in err.splitlines() if "come twice" in x).split(": ", 1)[1])
    img, _ = man.open_image(1)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(png(2)))))  # first
    assert len(man) == 4  # nothing dropped
