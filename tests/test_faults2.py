"""The fault battery, round two (issue 30): the files between the steps (the manifest index, the
embedding cache), the outputs a command writes, the shards it reads, a full disk and non-finite
values. Each case asserts the refusal and what its message names (or the counted report), and the
bytes of every file that must survive.

    python -m pytest tests/test_faults2.py -s    # also prints its rows of the fault table

Most cases call the scripts' functions in this process (seconds); those that run a script end to
end are marked slow."""

import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import filecheck
from manifest import Manifest
from tiny import write_images, write_manifest, write_tar

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
    row(f"manifest index: {name} {what}", "any script opening m.jsonl",
        err.replace(str(tmp_path), ""))
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
# rule 6: malformed JSONL lines named with file and line

def test_malformed_manifest_lines_are_named(tmp_path):
    good = json.dumps({"image": "0.png", "captions": {"short": ["a red shirt"]}}).encode()
    m = tmp_path / "m.jsonl"
    write_images(tmp_path, 1)
    m.write_bytes(b"\n".join([good, b'{"image": "caf\xe9.png"}', b"[1, 2]", b"", good,
                              good[:20]]))  # latin-1, not an object, empty, cut short at the end
    with pytest.raises(ValueError) as e:
        Manifest(m, quiet=True).check(images="ignore")
    msg = str(e.value)
    row("latin-1 byte, a list, an empty line, a cut last line in a JSONL manifest",
        "any script opening m.jsonl", " / ".join(msg.splitlines()[:2]).replace(str(tmp_path), ""))
    assert msg.startswith(f"{m}: 4 fault(s) on 4 of 6 lines:\n"), msg
    for n, why in ((2, "malformed JSON: 'utf-8' codec can't decode byte 0xe9"),
                   (3, "expected a JSON object, got list"),
                   (4, "blank line (record i must be line i + 1)"),
                   (6, "malformed JSON: Unterminated string")):
        assert f"\n  line {n}: {why}" in msg, (n, msg)

# -----------------------------------------------------------------------------
# rule 5: duplicates in and across tar shards are counted, named and kept

def test_duplicate_keys_across_and_within_shards(tmp_path, capsys):
    s = tmp_path / "s"
    s.mkdir()
    write_tar(s / "0.tar", [("a.png", png(1)), ("b.png", png(2)), ("b.png", png(3))])  # b twice
    write_tar(s / "1.tar", [("a.png", png(4)), ("c.png", png(5))])  # a again, in another shard
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
    assert f"{m}: warning: 1 tar member(s) have the key of a member another line names in " \
        "another shard (lines 1 and 3: key 'a' in s/0.tar/a.png and s/1.tar/a.png); both lines " \
        "are kept" == line, err
    assert "1 member name(s) come twice in one shard (s/0.tar: b.png); the first of each is read" \
        in err, err
    row("the same key in two tar shards", "any script opening the manifest", line.split(": ", 1)[1])
    row("a member name twice in one shard", "any script opening the manifest",
        next(x for x in err.splitlines() if "come twice" in x).split(": ", 1)[1])
    img, _ = man.open_image(1)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(png(2)))))  # first
    assert len(man) == 4  # nothing dropped
    Manifest(m)  # opened again: every recorded file (member.npy, a structured dtype, too) checks out
    assert capsys.readouterr().err == ""

def test_shard_edited_in_place_needs_the_full_verification(tmp_path):
    """The documented limit and its remedy: a shard rewritten to the same size with its mtime
    restored (two members' bytes swapped) is not seen by the cheap check, so line 1 reads the other
    image; `manifest.py --rebuild=True` makes the index anew and line 1 reads its own image again."""
    import subprocess
    import sys
    from tiny import ROOT
    s = tmp_path / "s"
    s.mkdir()
    a, b = png(1, size=8), png(7, size=8)
    assert len(a) == len(b)
    write_tar(s / "0.tar", [("a.png", a), ("b.png", b)])
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"image": f"s/0.tar/{k}.png"}) + "\n" for k in "ab"))
    Manifest(m).check(decode=True)
    st = os.stat(s / "0.tar")
    write_tar(s / "0.tar", [("b.png", b), ("a.png", a)])  # same size, members in the other order
    os.utime(s / "0.tar", ns=(st.st_atime_ns, st.st_mtime_ns))
    pixels = lambda data: np.asarray(Image.open(io.BytesIO(data)))  # noqa: E731
    stale, _ = Manifest(m).open_image(0)
    assert np.array_equal(np.asarray(stale), pixels(b))  # the limit: the other member's bytes
    r = subprocess.run([sys.executable, "manifest.py", f"--manifest={m}", "--rebuild=True"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "removed, to be built anew (rebuild=True)" in r.stdout, r.stderr
    fresh, _ = Manifest(m).open_image(0)
    assert np.array_equal(np.asarray(fresh), pixels(a))

# -----------------------------------------------------------------------------
# the embedding cache, run in this process (embed_cache.main reads its module's settings)

import errno  # noqa: E402

import embed_cache as EC  # noqa: E402
import embedder as EM  # noqa: E402
from tiny import tiny_llm  # noqa: E402

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache2")
    llm, man = tiny_llm(d / "llm"), write_manifest(d / "m.jsonl", n=20)  # 40 rows per field
    write_images(d, 20)  # (before the index is built: stage 2 reads them)
    ref = d / "ref"
    embed(llm, man, ref)
    return llm, man, ref

def embed(llm, man, out, **kw):
    """embed_cache.main() with these settings (chunks of 8 rows: 5 per field)."""
    settings = {**dict(manifest=man, model=llm, out_dir=str(out), fields="", chunk_size=8,
                       batch_size=4, dtype="float32", overwrite=False), **kw}
    saved = {k: getattr(EC, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(EC, k, v)
        EC.main()
    finally:
        for k, v in saved.items():
            setattr(EC, k, v)

def npys(folder):
    return {n: (folder / n).read_bytes() for n in ("short.npy", "long.npy")}

def kill_after(monkeypatch, k):
    """Make write_rows raise (a kill) at its (k + 1)-th call."""
    real, calls = EC.write_rows, []

    def write(*a):
        calls.append(1)
        if len(calls) > k:
            raise KeyboardInterrupt("killed")
        real(*a)
    monkeypatch.setattr(EC, "write_rows", write)

def test_field_deleted_from_unfinished_cache_is_redone(world, tmp_path, monkeypatch, capsys):
    llm, man, ref = world
    out = tmp_path / "c"
    kill_after(monkeypatch, 7)  # long's 5 chunks (fields in name order) and 2 of short's
    with pytest.raises(KeyboardInterrupt):
        embed(llm, man, out)
    monkeypatch.undo()
    os.remove(out / "long.npy")
    capsys.readouterr()
    embed(llm, man, out)
    text = capsys.readouterr().out
    row("a field's .npy deleted from an unfinished cache", "embed_cache.py (run again)",
        text.replace(str(tmp_path) + "/", ""))
    assert f"{out / 'long.npy'}: damaged (missing): redoing field 'long' (its 5 chunk record(s) " \
        "dropped)" in text, text
    assert npys(out) == npys(ref)
    assert json.load(open(out / "meta.json"))["complete"]

def test_field_replaced_in_complete_cache_is_redone(world, tmp_path, capsys):
    llm, man, ref = world
    out = tmp_path / "c"
    shutil.copytree(ref, out)
    shutil.copy(out / "short.npy", out / "long.npy")  # same shape, other rows
    embed(llm, man, out)
    text = capsys.readouterr().out
    row("a field's .npy replaced by another of the same shape", "embed_cache.py (run again)",
        text.replace(str(tmp_path) + "/", ""))
    assert f"{out / 'long.npy'}: chunk 0 (rows 0..7): its rows differ from those written (the " \
        "file was replaced or edited): redoing it" in text, text
    assert "complete already" not in text and npys(out) == npys(ref)

def test_nan_in_cache_is_refused_where_read(world, tmp_path, capsys):
    llm, man, ref = world
    out = tmp_path / "c"
    shutil.copytree(ref, out)
    a = np.load(out / "long.npy", mmap_mode="r+")
    a[13, 5] = np.nan
    a.flush()
    del a
    with pytest.raises(ValueError) as e:
        EC.open_cache(str(out), "long", llm, man)
    msg = str(e.value)
    row("NaN in a cache's row", "evaluate.py / train_stage2.py (open_cache)",
        msg.replace(str(tmp_path) + "/", ""))
    assert msg.startswith(f"{out / 'long.npy'}: 1 row(s) of field 'long' hold NaN or infinity, "
                          "the first row 13 (image of manifest line 7)"), msg
    EC.open_cache(str(out), "short", llm, man)  # the other field is fine
    embed(llm, man, out)  # the rerun redoes the chunk whose rows changed
    assert "chunk 1 (rows 8..15): its rows differ" in capsys.readouterr().out
    assert npys(out) == npys(ref)

def test_nan_from_the_model_is_refused_where_made(world, tmp_path, monkeypatch):
    llm, man, ref = world
    out = tmp_path / "c"
    real = EM.embed_texts

    def nan_at_row_3(*a, **kw):
        e = real(*a, **kw)
        if a[2][0] == Manifest(man, quiet=True).texts("long", 8, 9)[0]:  # long's chunk 1
            e[3, 0] = float("nan")
        return e
    monkeypatch.setattr(EM, "embed_texts", nan_at_row_3)
    with pytest.raises(FloatingPointError) as e:
        embed(llm, man, out, fields="long")
    msg = str(e.value)
    row("the model gives NaN for a caption", "embed_cache.py", msg.replace(str(tmp_path) + "/", ""))
    assert msg.startswith(f"{man}: field 'long': the model gave NaN or infinity for 1 of the 8 "
                          "captions of rows 8..15, the first row 11 (line 6: "), msg
    assert sorted(os.listdir(out / "done")) == ["long.000000"]  # nothing of chunk 1 written
    monkeypatch.undo()
    embed(llm, man, out, fields="long")  # resumes
    assert (out / "long.npy").read_bytes() == (ref / "long.npy").read_bytes()

def test_full_disk_is_a_clear_error_and_resumes(world, tmp_path, monkeypatch):
    llm, man, ref = world
    out = tmp_path / "c"
    need = 2 * EC.field_record(40, 32)["bytes"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 0, 1000))
    with pytest.raises(OSError) as e:
        embed(llm, man, out)
    msg = str(e.value)
    row("not enough free space for the cache", "embed_cache.py",
        msg.replace(str(tmp_path) + "/", ""))
    assert msg == (f"{out}: not enough free space: the cache's files long.npy, short.npy need "
                   f"{need} bytes, its disk has 1000 bytes free; free space or choose another "
                   "out_dir"), msg
    monkeypatch.undo()

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as e:
        embed(llm, man, out)
    msg = str(e.value)
    row("disk full while the cache's files are made", "embed_cache.py",
        msg.replace(str(tmp_path) + "/", ""))
    assert msg.startswith(f"{out / 'long.npy'}: cannot write: the disk is full "
                          f"({need // 2} bytes needed, "), msg
    assert not (out / "long.npy").exists() and not (out / "long.npy.tmp.npy").exists()
    monkeypatch.undo()
    kill_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        embed(llm, man, out)
    monkeypatch.undo()

    def enospc(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(EC, "_touch", enospc)  # the done-record cannot be written
    done3 = out / "done" / "long.000003"
    with pytest.raises(OSError, match=rf"^{done3}: cannot write: the disk is full; free "
                                      "space .* it resumes from the chunks already written"):
        embed(llm, man, out)
    monkeypatch.undo()
    embed(llm, man, out)
    assert npys(out) == npys(ref)

def test_cache_files_are_preallocated(world):
    _, _, ref = world
    st = os.stat(ref / "long.npy")
    assert st.st_blocks * 512 >= st.st_size  # no hole a memory-mapped write could fault on

def test_cache_out_dir_of_another_kind_is_refused(world, tmp_path):
    llm, man, ref = world
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError) as e:
        embed(llm, man, out)
    msg = str(e.value)
    row("cache out_dir holding other files", "embed_cache.py", msg.replace(str(tmp_path) + "/", ""))
    assert msg.startswith(f"out_dir={out}: holds 1 entry embed_cache.py does not write (notes.txt)"
                          "; choose a new or empty folder, or pass --overwrite=True"), msg
    assert sorted(os.listdir(out)) == ["notes.txt"]
    (out / "notes.txt").unlink()
    (out / "meta.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=rf"^{out / 'meta.json'}: not an embedding cache's "
                                         "meta.json"):
        embed(llm, man, out)
    assert (out / "meta.json").read_text() == '{"model_type": "llama"}'
    (out / "notes.txt").write_text("mine")
    embed(llm, man, out, overwrite=True)
    assert npys(out) == npys(ref) and (out / "notes.txt").read_text() == "mine"
    embed(llm, man, out)  # its own cache now: a rerun passes

# -----------------------------------------------------------------------------
# the converters: no output replaces a file they did not write; lines named as an editor shows

import sys  # noqa: E402

from test_converters import VAL_MAP, convert, docci, val_map  # noqa: E402
from tiny import ROOT  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "data"))
import benchmarks as BM  # noqa: E402

def test_read_lines_splits_at_newline_only_and_names_bad_bytes(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": "x\xe2\x80\xa8y"}\r\n{"a": "caf\xe9"}\n\n{"a": 1}\n')
    faults = []
    lines = BM.read_lines(str(p), faults)
    assert lines == ['{"a": "x\u2028y"}', None, "", '{"a": 1}']
    assert faults == ["line 2: not UTF-8 (invalid continuation byte at byte 10 of the line: "
                      "b'{\"a\": \"caf\\xe9\"}')"], faults

@pytest.mark.slow
def test_converter_never_replaces_what_it_did_not_write(tmp_path):
    root, out = tmp_path / "docci", tmp_path / "out"
    docci(root)
    out.mkdir()
    (out / "test.jsonl").write_text("someone else's manifest\n")
    r = convert("docci", root, out, check=False)
    row("converter --out onto an existing, different test.jsonl", "data/docci/prepare.py",
        r.stderr.strip().splitlines()[-1].replace(str(tmp_path) + "/", ""))
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
        f"{out / 'test.jsonl'}: exists and data/docci/prepare.py did not write it (no record in "
        "written.json beside it); nothing written. Move it away, choose another output, or pass "
        "--overwrite=True to replace it"), r.stderr
    assert (out / "test.jsonl").read_text() == "someone else's manifest\n"
    convert("docci", root, out, overwrite=True)
    mine = (out / "test.jsonl").read_bytes()
    assert json.load(open(out / "written.json"))["test.jsonl"]["by"] == "data/docci/prepare.py"
    convert("docci", root, out)  # its own output, unchanged since: replaced
    assert (out / "test.jsonl").read_bytes() == mine
    (out / "test.jsonl").write_bytes(mine + b"\n")  # edited by hand since
    r = convert("docci", root, out, check=False)
    assert r.returncode != 0 and "exists and changed since data/docci/prepare.py wrote it" \
        in r.stderr and (out / "test.jsonl").read_bytes() == mine + b"\n", r.stderr
    r = convert("xm3600", root, out, check=False)  # another converter: refused before any work
    assert r.returncode != 0 and "exists and was written by data/docci/prepare.py, not " \
        "data/xm3600/prepare.py" in r.stderr, r.stderr
    # several outputs: all are checked before anything is written
    inet, out2 = tmp_path / "inet", tmp_path / "out2"
    val_map(inet, VAL_MAP[:2])
    out2.mkdir()
    (out2 / "classes.json").write_text("{}")
    r = convert("imagenet", inet, out2, check=False)
    assert r.returncode != 0 and f"{out2 / 'classes.json'}: exists and" in r.stderr, r.stderr
    assert sorted(os.listdir(out2)) == ["classes.json"]

@pytest.mark.slow
def test_converter_names_a_line_that_is_not_utf8(tmp_path):
    root, out = tmp_path / "docci", tmp_path / "out"
    docci(root)
    ann = root / "docci_descriptions.jsonlines"
    lines = ann.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"description": "', b'"description": "\xe2\x80\xa8 ')  # U+2028
    lines[2] = lines[2].replace(b'"description": "', b'"description": "caf\xe9 ')  # latin-1
    ann.write_bytes(b"\n".join(lines))
    r = convert("docci", root, out, check=False)
    row("a latin-1 byte in a JSONL input (line 3)", "data/docci/prepare.py",
        " / ".join(r.stderr.strip().splitlines()[-2:]).replace(str(tmp_path) + "/", ""))
    assert r.returncode != 0 and f"{ann}: 1 fault(s), nothing written:" in r.stderr and \
        "  line 3: not UTF-8 (invalid continuation byte at byte" in r.stderr, r.stderr
    assert not out.exists()

# -----------------------------------------------------------------------------
# the stage scripts: a non-finite loss names the step and the batch; out_dir of another kind

from safetensors.torch import load_file, save_file  # noqa: E402

from tiny import run_script, tiny_clip  # noqa: E402

def with_nan(folder, key):
    """Put NaN into tensor `key` of an HF folder's model.safetensors."""
    f = os.path.join(folder, "model.safetensors")
    sd = load_file(f)
    sd[key][0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})

@pytest.fixture(scope="module")
def stages(world, tmp_path_factory):
    llm, man, cache = world
    d = tmp_path_factory.mktemp("stages")
    nan_clip = tiny_clip(d / "nan_clip")
    with_nan(nan_clip, "vision_model.post_layernorm.weight")
    nan_llm = d / "nan_llm"
    shutil.copytree(llm, nan_llm)
    with_nan(nan_llm, "norm.weight")
    return dict(llm=llm, man=man, cache=str(cache), clip=tiny_clip(d / "clip"), nan_clip=nan_clip,
                nan_llm=str(nan_llm), d=d)

def stage2_args(s, out, **kw):
    return {**dict(method="llm2clip", manifest=s["man"], clip=s["clip"], llm=s["llm"],
                   cache=s["cache"], out_dir=out, batch_size=4, max_steps=2, warmup_steps=1,
                   embed_dim=16, num_workers=0, log_interval=1), **kw}

def last_line(r):
    """The exception line a script ended with (progress bars may print after it)."""
    return [x for x in r.stderr.splitlines() if re.match(r"^[A-Za-z_.]*Error: ", x)][-1]

@pytest.mark.slow
def test_nonfinite_loss_names_step_and_batch(stages):
    s = stages
    r = run_script("train_stage2.py", stage2_args(s, s["d"] / "s2", clip=s["nan_clip"]),
                   check=False)
    line = last_line(r)
    row("NaN in the image tower's weights", "train_stage2.py", line.replace(str(s["d"]) + "/", ""))
    assert r.returncode != 0 and re.match(
        rf"FloatingPointError: step 1: loss nan and gradient norm nan on rank 0; stopped before "
        rf"the update\. This rank's batch: {s['man']} lines \d+, \d+, \d+, \d+; cache "
        rf"{s['cache']} rows (long|short)\[\d+\], .*\. The last good checkpoint is "
        rf"{s['d'] / 's2' / 'ckpt'} \(none yet\)$", line), r.stderr[-3000:]
    r = run_script("train_stage1.py", dict(method="llm2clip", manifest=s["man"], model=s["nan_llm"],
                                           out_dir=s["d"] / "s1", batch_size=4, max_steps=2,
                                           warmup_steps=1, lora_r=2, lora_alpha=4, max_length=32,
                                           log_interval=1), check=False)
    line = last_line(r)
    row("NaN in the LLM's weights", "train_stage1.py", line.replace(str(s["d"]) + "/", ""))
    assert r.returncode != 0 and re.match(
        rf"FloatingPointError: step 1: loss nan and gradient norm nan on rank 0; stopped before "
        rf"the update\. This rank's batch: {s['man']} lines \d+, \d+, \d+, \d+\. The last good "
        rf"checkpoint is", line), r.stderr[-3000:]

@pytest.mark.slow
def test_stage_out_dir_of_another_kind_is_refused(stages):
    s = stages
    out = s["d"] / "taken"
    shutil.copytree(s["clip"], out)  # a model folder given as out_dir
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    r = run_script("train_stage2.py", stage2_args(s, out), check=False)
    line = last_line(r)
    row("stage out_dir holding a model folder", "train_stage2.py",
        line.replace(str(s["d"]) + "/", ""))
    assert r.returncode != 0 and line.startswith(
        f"ValueError: out_dir={out}: holds {len(before)} entries train_stage2.py does not "
        "write ("), \
        r.stderr[-2000:]
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    r = run_script("train_stage1.py", dict(method="proclip", manifest=s["man"], model=s["llm"],
                                           clip=s["clip"], cache=s["cache"], out_dir=s["cache"],
                                           max_steps=2, warmup_steps=1, batch_size=4),
                   check=False)
    assert r.returncode != 0 and f"out_dir={s['cache']}: holds " in last_line(r), r.stderr[-2000:]
