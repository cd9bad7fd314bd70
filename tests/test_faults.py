"""The fault battery of issue 17: every planted fault, run through the scripts' documented commands on
tiny models, ends in a refusal whose first line names the file (and line) or the setting at fault, or, where
the fault is allowed, in a counted report; never in silently wrong data.

    python -m pytest tests/test_faults.py -s    # also prints the fault table: fault | command | first line

Two lists, as the issue has them: faults that used to be accepted silently, and faults that used to fail
with a message naming neither the file nor the line. Each case records its row of the table from the run
itself (FAULT_TABLE=<path> also writes it there as Markdown)."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import ROOT, run_script, tiny_clip, tiny_llm, write_images, write_manifest

pytestmark = pytest.mark.slow  # subprocess runs of every script

N = 16
TABLE = []  # (fault, command, first line of the message), in the order run

def first_line(stderr):
    """The first line of the error a script ended with (the last exception of its traceback, or a plain
    message); for a fault list ('<manifest>: K fault(s) ...:'), with its first entry after ' / '."""
    lines = stderr.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): (.*)$", lines[i])
        if m:
            out = m.group(2)
            if out.endswith(":") and i + 1 < len(lines):
                out += " / " + lines[i + 1].strip()
            return out
    return lines[-1] if lines else ""

class Battery:
    """The shared tiny world (models, a manifest with images, a cache, checkpoints) and the runner."""

    def __init__(self, d):
        self.d = d
        self.data = d / "data"
        self.data.mkdir()
        self.manifest = write_manifest(self.data / "m.jsonl", n=N)
        write_images(self.data, N)
        self.llm, self.other_llm = tiny_llm(d / "llm"), tiny_llm(d / "other_llm", seed=1)
        self.clip = tiny_clip(d / "clip")
        self.cache = str(d / "cache")
        self.ok("embed_cache.py", dict(manifest=self.manifest, model=self.llm, out_dir=self.cache))

    def short(self, text):
        return str(text).replace(str(self.d) + "/", "").replace(ROOT + "/", "")

    def command(self, script, args):
        return f"python {script} " + " ".join(f"--{k}={self.short(v)}" for k, v in args.items())

    def ok(self, script, args, **kw):
        return run_script(script, args, **kw)

    def refused(self, fault, script, args, *names):
        """Run; assert it failed and that the message's first line contains every one of `names` (the file,
        the line, the setting); record the table row. Returns (that first line, the completed process)."""
        r = run_script(script, args, check=False)
        line = first_line(r.stderr)
        TABLE.append((fault, self.command(script, args), self.short(line)))
        assert r.returncode != 0, f"{fault}: not refused\n{r.stdout[-2000:]}"
        for n in names:
            assert str(n) in line, f"{fault}: {n!r} not in the first line {line!r}\n{r.stderr[-3000:]}"
        return line, r

    def reported(self, fault, script, args, pattern, stream="stderr"):
        """Run (it must succeed); assert the counted report `pattern` is in its output; record the row."""
        r = run_script(script, args, check=False)
        assert r.returncode == 0, f"{fault}: failed\n{r.stderr[-3000:]}"
        text = getattr(r, stream)
        m = re.search(pattern, text)
        TABLE.append((fault, self.command(script, args), self.short(m.group(0) if m else "(no report)")))
        assert m, f"{fault}: no report matching {pattern!r}\n{text[-3000:]}"
        return r

    def stage2(self, out, **kw):
        return dict(dict(method="llm2clip", manifest=self.manifest, clip=self.clip, llm=self.llm, cache=self.cache,
                         out_dir=out, batch_size=8, max_steps=2, warmup_steps=1, embed_dim=16, num_workers=0,
                         log_interval=1), **kw)

    def stage1(self, out, **kw):
        return dict(dict(method="llm2clip", manifest=self.manifest, model=self.llm, out_dir=out, batch_size=8,
                         max_steps=3, warmup_steps=1, lora_r=2, lora_alpha=4, max_length=32, log_interval=1), **kw)

    def evaluate(self, model, **kw):
        return dict(dict(model=model, manifest=self.manifest, classes="", multilingual="", multilingual_unseen="",
                         c2c_field="long", batch_size=8, out=self.d / "eval" / "x.json"), **kw)

    def embed(self, manifest, out, **kw):
        return dict(dict(manifest=manifest, model=self.llm, out_dir=out), **kw)

    def variant(self, name, edit, images=True):
        """A copy of the manifest, as `name` beside the images (or in a folder of its own), with
        edit(records) applied to the list of records (dicts)."""
        recs = [json.loads(line) for line in open(self.manifest)]
        edit(recs)
        folder = self.data if images else self.d / name.split(".")[0]
        folder.mkdir(exist_ok=True)
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(path)

    def cache_copy(self, name):
        dst = self.d / name
        shutil.copytree(self.cache, dst)
        return str(dst)

@pytest.fixture(scope="module")
def B(tmp_path_factory):
    b = Battery(tmp_path_factory.mktemp("faults"))
    yield b
    rows = ["| fault | command | first line of the message |", "|---|---|---|"]
    rows += [f"| {f} | `{c}` | {m.replace('|', '/')} |" for f, c, m in TABLE]
    print("\n\n" + "\n".join(rows))
    if os.environ.get("FAULT_TABLE"):
        with open(os.environ["FAULT_TABLE"], "w") as f:
            f.write("\n".join(rows) + "\n")

@pytest.fixture(scope="module")
def stage2_run(B):
    """A finished 2-step stage-2 LLM2CLIP run: its export is what evaluate.py reads, its last checkpoint
    what the resume faults try to resume (a run at max_steps resumes too: it exports again)."""
    out = B.d / "s2"
    B.ok("train_stage2.py", B.stage2(out))
    assert json.load(open(out / "ckpt" / "state.json"))["step"] == 2
    return out

@pytest.fixture(scope="module")
def stage2_model(stage2_run):
    return stage2_run / "model"

# -----------------------------------------------------------------------------
# accepted silently before (nine)

def test_caption_field_given_as_a_string(B):
    m = B.variant("string.jsonl", lambda r: r[2]["captions"].update(short="a red shirt"), images=False)
    _, r = B.refused("caption field given as a string", "embed_cache.py", B.embed(m, B.d / "c_string"),
                     "string.jsonl")
    assert "line 3: caption field 'short' must be a non-empty list of strings" in r.stderr

def test_empty_and_whitespace_captions(B):
    def edit(r):
        r[1]["captions"]["short"][0] = ""
        r[4]["captions"]["long"][1] = "   "
    m = B.variant("empty.jsonl", edit, images=False)
    _, r = B.refused("empty caption and whitespace-only caption", "embed_cache.py", B.embed(m, B.d / "c_empty"),
                     "empty.jsonl", "2 fault(s)", "line 2")
    assert "line 2: caption short[0] must be a non-empty string" in r.stderr
    assert "line 5: caption long[1] must be a non-empty string, got '   '" in r.stderr

def test_over_long_caption_is_counted_and_reported(B):
    words = "a red shirt on the left of a blue bag "
    m = B.variant("long.jsonl", lambda r: r[6]["captions"]["long"].append((words * 600)[:20000]), images=False)
    out = B.d / "c_long"
    B.reported("20,000-character caption (cut to max_length)", "embed_cache.py", B.embed(m, out, max_length=64),
               r"field 'long': 1 caption\(s\) longer than max_length=64 tokens \(longest \d+ tokens, line 7\)[^\n]*",
               stream="stdout")
    assert json.load(open(out / "meta.json"))["over_length"]["long"]["longest_line"] == 7

def test_sixteen_bit_grey_png_keeps_its_range(B):
    """A 16-bit grey ramp (0..65535) through the training/evaluation dataset spans black to white (Pillow's
    convert("RGB") would clip it to nearly all white)."""
    from images import CLIP_MEAN, CLIP_STD, ImageDataset
    from manifest import Manifest
    folder = B.d / "grey16"
    folder.mkdir()
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(folder / "ramp.png")  # mode I;16
    assert Image.open(folder / "ramp.png").mode == "I;16"
    (folder / "m.jsonl").write_text(json.dumps({"image": "ramp.png", "captions": {"short": ["a ramp"]}}) + "\n")
    x, _, _ = ImageDataset(Manifest(str(folder / "m.jsonl"), quiet=True), size=32)[0]
    rgb = x * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    lo, hi, white = rgb.min().item(), rgb.max().item(), (rgb > 0.98).float().mean().item()
    TABLE.append(("16-bit greyscale PNG", "ImageDataset(<manifest of a 0..65535 ramp>, size=32)[0]",
                  f"pixels span {lo:.3f}..{hi:.3f}, {100 * white:.0f}% white (RGB, CLIP mean/std undone)"))
    assert lo < 0.02 and hi > 0.98 and white < 0.1

def test_cache_field_with_other_rows_is_refused(B, stage2_model):
    cache = B.cache_copy("cache_rows")
    np.save(os.path.join(cache, "short.npy"), np.zeros((2 * N - 3, 32), np.float16))
    B.refused("cache .npy with another number of rows", "evaluate.py", B.evaluate(stage2_model, cache=cache),
              "cache_rows/short.npy", f"({2 * N - 3}, 32)", f"({2 * N}, 32)")

def test_resume_stage2_with_another_llm_or_cache(B, stage2_run):
    # another LLM with the run's cache: the cache's own check refuses first (another LLM made it)
    B.refused("resume stage 2 with another --llm", "train_stage2.py", B.stage2(stage2_run, llm=B.other_llm),
              "cache/meta.json", "made by another model")
    # another LLM with a cache it made: the checkpoint refuses, naming both
    other = B.d / "cache_other_llm"
    B.ok("embed_cache.py", B.embed(B.manifest, other, model=B.other_llm))
    _, r = B.refused("resume stage 2 with another --llm and its --cache", "train_stage2.py",
                     B.stage2(stage2_run, llm=B.other_llm, cache=other), "cannot resume", "llm, cache")
    assert re.search(r"\n  llm: '.*llm' \(content \w{12}\.\.\.\) -> '.*other_llm' \(content \w{12}\.\.\.\)", r.stderr)
    # a cache of the same LLM and captions, made with another instruction (its meta.json says so)
    instr = B.cache_copy("cache_instruction")
    meta = json.load(open(os.path.join(instr, "meta.json")))
    json.dump(dict(meta, instruction="retrieve"), open(os.path.join(instr, "meta.json"), "w"))
    B.refused("resume stage 2 with another --cache (same LLM, other instruction)", "train_stage2.py",
              B.stage2(stage2_run, cache=instr), "cannot resume", "differs in cache")
    B.refused("resume stage 2 with another --embed_dim", "train_stage2.py", B.stage2(stage2_run, embed_dim=24),
              "cannot resume", "differs in embed_dim, 3 tensor(s) (e.g. text.proj.bias (16,) -> (24,))")
    B.refused("resume stage 2 with another --clip", "train_stage2.py",
              B.stage2(stage2_run, clip=tiny_clip(B.d / "other_clip", seed=1)), "cannot resume", "differs in clip")
    # a moved copy of the same inputs resumes (compared by content, not path): the finished 2-step run again
    moved = B.cache_copy("moved_cache")
    r = B.ok("train_stage2.py", B.stage2(stage2_run, cache=moved))
    assert "cache moved" in r.stdout and "resuming at step 2" in r.stdout

def test_resume_stage1_with_another_manifest_or_model(B):
    out = B.d / "s1_halted"
    B.ok("train_stage1.py", B.stage1(out, halt_at=1))
    other_captions = B.variant("other_captions.jsonl", lambda r: r[0]["captions"]["short"].__setitem__(0, "a bag"))
    B.refused("resume stage 1 with another --manifest", "train_stage1.py", B.stage1(out, manifest=other_captions),
              "cannot resume", "differs in manifest")
    B.refused("resume stage 1 with another --model", "train_stage1.py", B.stage1(out, model=B.other_llm),
              "cannot resume", "differs in model")

def test_duplicate_image_paths_are_reported(B):
    m = B.variant("dup.jsonl", lambda r: r[4].update(image=r[1]["image"]), images=False)
    B.reported("duplicate image paths", "embed_cache.py", B.embed(m, B.d / "c_dup"),
               r"warning: 1 record\(s\) name an image an earlier line names \(lines 2 and 5: 1.png\)")

@pytest.mark.parametrize("script", ["train_stage1.py", "train_stage2.py"])
def test_max_steps_zero_is_refused(B, script):
    args = B.stage1(B.d / "z1") if script == "train_stage1.py" else B.stage2(B.d / "z2")
    B.refused("--max_steps=0 (would export an untrained model)", script, dict(args, max_steps=0, warmup_steps=0),
              "max_steps=0: must be > 0")
    assert not os.path.exists(args["out_dir"])  # nothing made

def test_module_constant_is_not_a_setting(B):
    B.refused("a module constant set from the command line", "train_stage2.py", dict(B.stage2(B.d / "c"), LN100=5),
              "--LN100=5: LN100 is a constant of the script, not a setting")

# -----------------------------------------------------------------------------
# failed without naming the file, the line or the setting before (ten)

def test_label_given_as_a_string(B):
    def edit(r):
        for x in r:
            x["label"] = 1
        r[3]["label"] = "3"
    m = B.variant("label.jsonl", edit)
    _, r = B.refused('label "3"', "train_stage2.py", B.stage2(B.d / "s2_label", manifest=m), "label.jsonl", "line 4")
    assert "line 4: 'label' must be an int, got '3'" in r.stderr

def test_truncated_npy_is_named_and_redone(B, stage2_model):
    cache = B.cache_copy("cache_cut")
    path = os.path.join(cache, "long.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    B.refused("truncated .npy", "evaluate.py", B.evaluate(stage2_model, cache=cache), "cache_cut/long.npy", "truncated")
    r = B.reported("truncated .npy, embed_cache.py run again", "embed_cache.py",
                   B.embed(B.manifest, cache), r"long.npy: damaged \([^\n]*\): redoing field 'long'", stream="stdout")
    assert "complete already" not in r.stdout
    assert np.array_equal(np.load(path), np.load(os.path.join(B.cache, "long.npy")))

def test_corrupt_meta_json(B, stage2_model):
    cache = B.cache_copy("cache_meta")
    with open(os.path.join(cache, "meta.json"), "r+") as f:
        f.truncate(50)
    B.refused("corrupt cache meta.json", "evaluate.py", B.evaluate(stage2_model, cache=cache),
              "cache_meta/meta.json", "does not parse", "rebuild")

def test_checkpoint_of_another_vision_width(B):
    out = B.d / "base_clip"
    args = dict(method="clip", clip="", manifest=B.manifest, tokenizer=B.clip, out_dir=out, batch_size=8, max_steps=3,
                warmup_steps=1, num_workers=0, image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                text_width=32, text_layers=1, context_length=8, halt_at=1)
    B.ok("train_stage2.py", args)
    before = (out / "ckpt" / "weights.safetensors").read_bytes()
    _, r = B.refused("checkpoint of another vision_width", "train_stage2.py", dict(args, vision_width=64),
                     "cannot resume", "differs in vision_width, ", " tensor(s) (e.g. vit.vision_model.")
    assert "  vision_width: 32 -> 64" in r.stderr
    assert "  tensor vit.vision_model.embeddings.patch_embedding.weight: (32, 3, 8, 8) in the checkpoint, " \
           "(64, 3, 8, 8) in this run" in r.stderr
    assert (out / "ckpt" / "weights.safetensors").read_bytes() == before

def test_load_checkpoint_refuses_other_shapes_before_copying(tmp_path):
    """The same identity but other tensor shapes (another model version): refused, naming each tensor,
    and no tensor of the run is touched."""
    from train_common import load_checkpoint, save_checkpoint
    a = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    opt = torch.optim.AdamW(list(a.values()))
    ident = {"settings": {"width": 3}, "inputs": {}}
    save_checkpoint(str(tmp_path / "ckpt"), a, opt, 5, {}, ident)
    b = {"w": torch.zeros(2, 4), "b": torch.zeros(3), "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(tmp_path / "ckpt"), b, torch.optim.AdamW(list(b.values())), ident)
    msg = str(e.value).splitlines()
    assert "differs in 2 tensor(s) (e.g. extra (missing) -> (1,))" in msg[0]
    assert msg[1:] == ["  tensor extra: missing in the checkpoint, (1,) in this run",
                       "  tensor w: (2, 3) in the checkpoint, (2, 4) in this run"]
    assert all(v.eq(0).all() for v in b.values())
    c = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    assert load_checkpoint(str(tmp_path / "ckpt"), c, torch.optim.AdamW(list(c.values())), ident) == 5
    assert all(v.eq(1).all() for v in c.values())
    with pytest.raises(ValueError, match=r"differs in width.*\n  width: 3 -> 4"):
        load_checkpoint(str(tmp_path / "ckpt"), c, opt, {"settings": {"width": 4}, "inputs": {}})
    state = json.load(open(tmp_path / "ckpt" / "state.json"))  # a checkpoint of the version before identities
    json.dump({"step": 5, "config": {}}, open(tmp_path / "ckpt" / "state.json", "w"))
    with pytest.raises(ValueError, match="ckpt: made by an older version that recorded neither"):
        load_checkpoint(str(tmp_path / "ckpt"), c, opt, ident)
    assert state["identity"] == ident

@pytest.mark.parametrize("script", ["train_stage1.py", "train_stage2.py", "embed_cache.py", "evaluate.py"])
def test_batch_size_zero(B, script, stage2_model):
    args = {"train_stage1.py": B.stage1(B.d / "b1"), "train_stage2.py": B.stage2(B.d / "b2"),
            "embed_cache.py": B.embed(B.manifest, B.d / "b3"), "evaluate.py": B.evaluate(stage2_model)}[script]
    B.refused("--batch_size=0", script, dict(args, batch_size=0), "batch_size=0: must be > 0")

def test_embed_cache_dtype_foo(B):
    B.refused("--dtype=foo", "embed_cache.py", B.embed(B.manifest, B.d / "c_dtype", dtype="foo"),
              "dtype='foo': must be one of float32, bfloat16, float16")

def test_npy_of_another_width(B, stage2_model):
    cache = B.cache_copy("cache_width")
    np.save(os.path.join(cache, "long.npy"), np.zeros((2 * N, 16), np.float16))
    B.refused("16-dim .npy inside a 32-dim cache", "evaluate.py", B.evaluate(stage2_model, cache=cache),
              "cache_width/long.npy", f"({2 * N}, 16)", f"({2 * N}, 32)")

def test_evaluate_bad_image_message(B):
    folder = B.d / "badimg"
    shutil.copytree(B.data, folder, ignore=shutil.ignore_patterns("*.index*", "*.jsonl"))
    shutil.copy(B.manifest, folder / "m.jsonl")
    (folder / "5.png").write_bytes(b"not a png")
    _, r = B.refused("unreadable image in evaluation", "evaluate.py",
                     B.evaluate(B.clip, manifest=folder / "m.jsonl", c2c_field=""), "m.jsonl:6", "5.png")
    # evaluate.py has no skip_bad: the message must not offer it as if it had
    assert "skip_bad" not in r.stderr or "trainers' skip_bad" in r.stderr

def test_unwritable_output_fails_at_start(B, stage2_model):
    blocker = B.d / "a_file"
    blocker.write_text("not a folder")
    cases = [("train_stage1.py", B.stage1(blocker / "out"), "out_dir="),
             ("train_stage2.py", B.stage2(blocker / "out"), "out_dir="),
             ("embed_cache.py", B.embed(B.manifest, blocker / "out"), "out_dir="),
             ("evaluate.py", B.evaluate(stage2_model, out=blocker / "eval.json"), "out=")]
    for script, args, name in cases:
        _, r = B.refused("output folder that cannot be written", script, args, name, "cannot write there")
        assert r.stdout == "" and "check(" in r.stderr  # refused by the start-up check, before any work

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(B, stage2_model):
    ro = B.d / "read_only"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        B.refused("read-only output folder", "evaluate.py", B.evaluate(stage2_model, out=ro / "eval.json"), "out=",
                  "cannot write there")
        B.refused("read-only output folder", "train_stage2.py", B.stage2(ro / "out"), "out_dir=", "cannot write there")
    finally:
        os.chmod(ro, 0o755)

# -----------------------------------------------------------------------------
# the other settings checks

@pytest.mark.parametrize("script,args,first", [
    ("train_stage2.py", dict(warmup_steps=5, max_steps=3), "warmup_steps=5: more than max_steps=3"),
    ("train_stage2.py", dict(method="llm2clp"), "method='llm2clp': must be one of llm2clip, proclip, clip"),
    ("train_stage1.py", dict(log_interval=0), "log_interval=0: must be > 0"),
    ("evaluate.py", dict(dtype="fp8"), "dtype='fp8': must be one of"),
])
def test_settings_are_checked(B, stage2_model, script, args, first):
    base = {"train_stage1.py": B.stage1(B.d / "k1"), "train_stage2.py": B.stage2(B.d / "k2"),
            "evaluate.py": B.evaluate(stage2_model)}[script]
    B.refused(f"--{next(iter(args))}={next(iter(args.values()))}", script, dict(base, **args), first)

def test_input_fingerprints_follow_content_not_path(B):
    """run_identity's inputs: a copy elsewhere has the same fingerprint, a change of content another one,
    for each kind (manifest, cache, HF model folder, adaptor folder, tokenizer)."""
    import model as M
    from manifest import Manifest
    from train_common import input_fingerprint as fp
    d = B.d / "fp"
    d.mkdir()
    llm_copy = shutil.copytree(B.llm, d / "llm_copy")
    assert fp("llm", str(llm_copy)) == fp("llm", B.llm) != fp("llm", B.other_llm)
    cache = B.cache_copy("fp/cache")
    assert fp("cache", cache, fields=["short"]) == fp("cache", B.cache, fields=["short"])
    meta = json.load(open(os.path.join(cache, "meta.json")))
    meta["fields"]["long"]["captions_fingerprint"] = "0" * 32  # another field changed: not this run's concern
    json.dump(meta, open(os.path.join(cache, "meta.json"), "w"))
    assert fp("cache", cache, fields=["short"]) == fp("cache", B.cache, fields=["short"])
    assert fp("cache", cache, fields=["short", "long"]) != fp("cache", B.cache, fields=["short", "long"])
    for seed in (0, 1):
        torch.manual_seed(seed)
        M.Adaptor.for_method("proclip", 32, 16).save_pretrained(str(d / f"adaptor{seed}"))
    (d / "adaptor0" / "log.jsonl").write_text("{}\n")  # (not part of an adaptor folder's content)
    shutil.copytree(d / "adaptor0", d / "adaptor0_copy")
    assert fp("stage1", str(d / "adaptor0")) == fp("stage1", str(d / "adaptor0_copy")) != fp("stage1", str(d / "adaptor1"))
    tok = shutil.copytree(B.clip, d / "tok")
    assert fp("tokenizer", str(tok)) == fp("tokenizer", B.clip)
    (tok / "tokenizer_config.json").write_text((tok / "tokenizer_config.json").read_text().replace("<pad>", "<unk>"))
    assert fp("tokenizer", str(tok)) != fp("tokenizer", B.clip)
    other = B.variant("fp_other.jsonl", lambda r: r[5]["captions"]["long"].reverse())
    copy = shutil.copy(B.manifest, d / "m.jsonl")
    a, b, c = (Manifest(str(m), quiet=True) for m in (B.manifest, other, copy))
    assert fp("manifest", B.manifest, a, ["long"]) == fp("manifest", str(copy), c, ["long"])
    assert fp("manifest", B.manifest, a, ["long"]) != fp("manifest", other, b, ["long"])
