"""data/fashion/results_png.py on a tiny fake demo output (a random CLIP as the base CLIP, random
stage-2 folders as LLM2CLIP and ProCLIP, the evaluation manifest as the test set): it writes a
palette PNG of the expected width, its top five and ranks are the encoder's, and it replaces only
a file it wrote."""

import json
import os
import shutil
import sys

import pytest
from PIL import Image

from encoder import load_encoder
from manifest import Manifest
from test_evaluate import tiny_stage2, write_eval_manifest
from tiny import ROOT, tiny_clip, tiny_llm

sys.path.insert(0, os.path.join(ROOT, "data", "fashion"))
import results_png as R  # noqa: E402

@pytest.fixture(scope="module")
def fake_demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    data = d / "data"
    data.mkdir()
    manifest, _ = write_eval_manifest(str(data))
    shutil.copy(manifest, data / "test.jsonl")
    llm = tiny_llm(d / "llm")
    clip = tiny_clip(d / "out" / "base_clip" / "model")
    tiny_stage2(d / "out" / "llm2clip" / "model", clip, llm, seed=1)
    tiny_stage2(d / "out" / "proclip" / "model", clip, llm, method="proclip", seed=2)
    rows = {name: {k: 10.0 * i + j for j, (k, _) in enumerate(R.COLUMNS)}
            for i, (name, _, _) in enumerate(R.BARS)}
    del rows["llm2clip_no_stage1"]["multilingual_i2t_r1"]  # a cell the demo does not measure
    (d / "out" / "results.json").write_text(json.dumps({"rows": rows, "seed": 3}))
    return dict(demo=str(d / "out"), data=str(data))

def run(fake_demo, **settings):
    saved = {k: getattr(R, k) for k in ("demo", "data", "out", "examples", "overwrite")}
    try:
        for k, v in {**fake_demo, **settings}.items():
            setattr(R, k, v)
        return R.main()
    finally:
        for k, v in saved.items():
            setattr(R, k, v)

def test_results_png_on_a_fake_demo(fake_demo):
    res = run(fake_demo, examples="3:long,0:de")
    im = Image.open(os.path.join(fake_demo["demo"], "results.png"))
    assert im.mode == "P" and im.width == R.LABEL_W + 5 * R.THUMB + 12 * R.PAD + R.PAD
    man = Manifest(os.path.join(fake_demo["data"], "test.jsonl"))
    captions = [man[3]["captions"]["long"][0], man[0]["captions"]["de"][0]]
    for name, _ in R.MODELS:
        enc = load_encoder(os.path.join(fake_demo["demo"], name, "model"), device="cpu")
        sim = enc.encode_texts(captions) @ enc.encode_images(man).T
        for (grids, scores, rank), s, right in zip(res[name], sim, (3, 0)):
            assert grids == s.topk(5).indices.tolist()
            assert scores == pytest.approx(s.topk(5).values.tolist(), abs=1e-6)
            order = sorted(range(len(s)), key=lambda j: (-float(s[j]), j == right))  # ties: worse
            assert rank == order.index(right) + 1

def test_results_png_refuses_bad_examples_and_files_it_did_not_write(fake_demo, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"mine")
    with pytest.raises(ValueError, match=f"{notes}: exists and data/fashion/results_png.py did "
                       "not write it"):
        run(fake_demo, out=str(notes))
    assert notes.read_bytes() == b"mine"
    with pytest.raises(ValueError, match="examples: grid 0 has no 'it' caption in"):
        run(fake_demo, examples="0:it", out=str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="'0-long' is not grid:field"):
        run(fake_demo, examples="0-long", out=str(tmp_path / "x.png"))
