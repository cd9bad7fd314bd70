"""The rehearsal of paper.sh: the script itself, unchanged, on miniature stand-ins of every download in
the real formats (tests/paper_miniature.py), 2 processes under torchrun, SMALL=1 (batches of 4 per rank,
at most 2 steps). Every recipe variant (LLM2CLIP and ProCLIP on the 8B, the 1B and the released LLM, a
SigLIP tower, CC3M alone) reaches the printed table; the second pass over them all skips every step.
One output folder holds all variants, as a user's would: shared steps run once."""

import json
import os
import re
import subprocess
import sys

import pytest

from paper_miniature import build
from tiny import ROOT

pytestmark = pytest.mark.slow  # the whole papers' path, ten times over, at miniature size

VARIANTS = [dict(METHOD=m, LLM=llm) for llm in ("llama3_8b", "llama32_1b", "released")
            for m in ("llm2clip", "proclip")]
VARIANTS += [dict(METHOD="llm2clip", LLM="released", CLIP="siglip-so400m-patch14-384"),
             dict(METHOD="llm2clip", LLM="released", SOURCES="cc3m")]


def paper(data, out, **variant):
    env = {**os.environ, "DATA": str(data), "OUT": str(out), "GPUS": "2", "SMALL": "1",
           "OMP_NUM_THREADS": "1", **variant}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # python, torchrun
    r = subprocess.run(["bash", "paper.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{variant}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def run_name(v):
    src = "cc3m" if v.get("SOURCES") == "cc3m" else "cc3m_cc12m"
    return f"{v['METHOD']}_{v['LLM']}_{v.get('CLIP', 'clip-vit-large-patch14-336')}_{src}"


def table_rows(stdout):
    """{row name: [numbers]} of the table paper.sh prints last."""
    tail = stdout[stdout.rindex("The papers' table"):].splitlines()
    return {line.split()[0]: line.split()[1:] for line in tail[4:] if line and not line.startswith("(")}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    d = tmp_path_factory.mktemp("paper")
    data = build(d / "downloads")
    return data, d / "out", [paper(data, d / "out", **v) for v in VARIANTS]


def test_every_variant_reaches_the_table(rehearsal):
    data, out, logs = rehearsal
    for v, log in zip(VARIANTS, logs):
        rows = table_rows(log)
        name = run_name(v)
        assert name in rows and len(rows[name]) == 16, (v, log[-2000:])
        stored = json.load(open(out / "eval" / f"{name}.json"))["results"]
        assert float(rows[name][0]) == round(stored["flickr30k_i2t_r1"], 1)
        assert float(rows[name][15]) == round(stored["imagenet_ensemble_top1"], 1)
        # the baseline row: the CLIP through its own text tower (a raw SigLIP has none evaluate runs)
        assert ("clip-vit-large-patch14-336" in rows) == ("CLIP" not in v), v
        text = json.load(open(out / f"stage2_{name}" / "model" / "text.json"))
        llm = {"llama3_8b": out / "stage1_llama3_8b" / "merged", "llama32_1b": out / "stage1_llama32_1b" /
               "merged", "released": data / "models" / "LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"}
        assert text["llm"] == str(llm[v["LLM"]]) and text["method"] == v["METHOD"]
        assert text["loss"] == ("sigmoid" if "CLIP" in v else "softmax")
    # the steps a variant shares with an earlier one are skipped, not redone
    assert "paper.sh: run manifest train_cc3m\n" in logs[0] and "paper.sh: run manifest" not in logs[1]
    assert "paper.sh: skip stage 1 (llama3_8b)" in logs[1] and "paper.sh: run ProCLIP stage 1" in logs[1]
    assert "paper.sh: run stage 1" not in logs[4] and "run stage 1" not in logs[5]  # released: no stage 1


def test_manifests_count_where_each_caption_came_from(rehearsal):
    data, out, _ = rehearsal
    # cc3m: the recaptions are KEY.json columns; cc12m: a DreamLIP CSV listing 16 images, 12 downloaded
    one = json.load(open(out / "data" / "train_cc3m.jsonl.prepare.json"))
    both = json.load(open(out / "data" / "train_cc3m_cc12m.jsonl.prepare.json"))
    assert one["counts"]["images"] == one["counts"]["from_key_json"] == 12
    assert both["counts"]["from_sidecar"] == 12 and both["counts"]["from_key_json"] == 12
    assert both["sidecar"]["entries"] == 16 and both["sidecar"]["duplicates"] == 0
    recs = [json.loads(line) for line in open(out / "data" / "train_cc3m_cc12m.jsonl")]
    assert all(set(r["captions"]) == {"short", "long", "raw"} for r in recs)
    # short and long are the SV pair: the cache holds those two fields only
    meta = json.load(open(out / "cache" / "train_released_cc3m_cc12m" / "meta.json"))
    assert sorted(meta["fields"]) == ["long", "short"]


def test_second_pass_skips_every_step(rehearsal):
    data, out, first = rehearsal
    for v, before in zip(VARIANTS, first):
        log = paper(data, out, **v)
        assert "paper.sh: run" not in log, (v, log)
        assert len(re.findall(r"^paper\.sh: skip ", log, re.M)) >= 17  # 7 sets x 2 + evaluate + ...
        assert table_rows(log) == table_rows(before)
