"""evaluate.py's benchmark mode: the converters (data/<set>/prepare.py) run on miniatures in the real formats
(test_converters' writers), then a tiny CLIP, a tiny stage-2 model (some benchmarks from their own caches,
the rest through the LLM) and a tiny SigLIP-tower stage-2 model are evaluated on all seven sets in one call.
Checked: every benchmark's numbers equal evaluating it alone and an independent computation, the printed
table has the papers' layout with the JSON's numbers, Avg is the mean of the sets present, XM3600's the mean
of its languages, ImageNet's two prompt sets both appear, each benchmark's captions reach the text side once
and for it alone (a recording stub), and the refusals (a 1:1 set with a multi-caption image, a cache of
another benchmark's captions, a raw SigLIP model, a cache for a benchmark not run)."""

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import embedder as EM  # noqa: E402
import model as M  # noqa: E402
from images import eval_transform  # noqa: E402
from test_converters import blip_coco, blip_flickr, convert, docci, sharegpt4v, urban1k, val_map, xm3600  # noqa: E402
from test_evaluate import brute_force_recall, tiny_stage2  # noqa: E402
from tiny import WORDS, evaluate_in_process, run_script, tiny_clip, tiny_llm  # noqa: E402
from train_common import write_json  # noqa: E402

pytestmark = pytest.mark.slow  # converters and evaluation runs

SETS = ("flickr30k", "coco", "sharegpt4v", "urban1k", "docci", "xm3600", "imagenet")
URBAN = ["A busy street with a red bus.", "A quiet square at night.\n", "Two cyclists on a bridge.", "A market."]
IMAGENET = [(f"ILSVRC2012_val_{i:08d}.JPEG", label) for i, label in enumerate([3, 7, 0, 3], 1)]
N_CLASSES, N_TEMPLATES = 10, 3  # after conversion, classes.json is cut to 10 classes x 3 templates (CPU time),
CLASS_WORDS = WORDS[5:15]        # named with words the tiny models' word-level tokenizer knows (else all tie)

@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Each converter on its miniature: {"dir", set name: its output folder, "clip", "llm", "stage2", caches}."""
    d = tmp_path_factory.mktemp("benchmarks")
    build = {"flickr30k": blip_flickr, "coco": blip_coco, "sharegpt4v": sharegpt4v, "urban1k": lambda r: urban1k(r, URBAN),
             "docci": docci, "xm3600": xm3600, "imagenet": lambda r: val_map(r, IMAGENET)}
    out = {"dir": d}
    for name, write in build.items():
        os.makedirs(d / "raw" / name)
        write(d / "raw" / name)
        convert(name, d / "raw" / name, d / "eval" / name)
        out[name] = str(d / "eval" / name)
    for file, n in (("classes.json", N_TEMPLATES), ("classes_single.json", 1)):
        spec = json.load(open(d / "eval/imagenet" / file))
        assert len(spec["classes"]) == 1000 and len(spec["templates"]) == (80 if n > 1 else 1)
        write_json(str(d / "eval/imagenet" / file), {**spec, "classes": list(CLASS_WORDS),
                                                       "templates": spec["templates"][:n]})
    out["llm"], out["clip"] = tiny_llm(d / "llm"), tiny_clip(d / "clip")
    out["stage2"] = tiny_stage2(d / "stage2", out["clip"], out["llm"])
    for name in ("flickr30k", "urban1k"):  # two benchmarks cached, the others run the LLM
        run_script("embed_cache.py", dict(model=out["llm"], manifest=d / "eval" / name / "test.jsonl",
                                          out_dir=d / "cache" / name, batch_size=4))
    out["caches"] = ",".join(f"{n}={d / 'cache' / n}" for n in ("flickr30k", "urban1k"))
    return out

def bench_setting(sets, names=SETS):
    return ",".join(f"{n}={sets[n]}" for n in names)

def evaluate_here(out, **settings):
    """evaluate.main in this process, batches of 8 unless set; returns the JSON it wrote."""
    return evaluate_in_process(out, **{"batch_size": 8, **settings})

def texts_of(folder, fields=None):
    """Every caption of a manifest's fields, in caption_rows order."""
    recs = [json.loads(line) for line in open(os.path.join(folder, "test.jsonl"))]
    fields = fields or sorted(recs[0]["captions"])
    return [t for f in fields for r in recs for t in r["captions"][f]]

# -----------------------------------------------------------------------------
# every benchmark in one call = each alone; the averages; the independent computation

@pytest.mark.parametrize("kind", ["clip", "stage2"])
def test_one_call_equals_each_alone(sets, kind, tmp_path):
    extra = {"caches": sets["caches"]} if kind == "stage2" else {}
    both = evaluate_here(tmp_path / "all.json", model=sets[kind], benchmarks=bench_setting(sets), **extra)
    res = both["results"]
    seen = set()
    for name in SETS:
        alone = evaluate_here(tmp_path / f"{name}.json", model=sets[kind], benchmarks=bench_setting(sets, [name]),
                              caches=f"{name}={sets['dir'] / 'cache' / name}" if extra and name in ("flickr30k", "urban1k") else "")
        mine = {k: v for k, v in res.items() if k.startswith(name + "_")}
        assert mine and mine == {k: v for k, v in alone["results"].items() if k.startswith(name + "_")}, name
        assert both["counts"][name] == alone["counts"][name]
        seen |= set(mine)
    assert set(res) - seen == {"avg_i2t_r1", "avg_t2i_r1"}
    assert both["avg_of"] == ["flickr30k", "coco", "sharegpt4v", "urban1k", "docci"]
    for d in ("i2t", "t2i"):
        assert res[f"avg_{d}_r1"] == pytest.approx(np.mean([res[f"{b}_{d}_r1"] for b in both["avg_of"]]), abs=1e-12)
        for k in (1, 5, 10):  # XM3600's headline: the mean over its languages
            assert res[f"xm3600_{d}_r{k}"] == pytest.approx(np.mean([res[f"xm3600_{g}_{d}_r{k}"] for g in ("de", "en", "ja")]))
    assert {"imagenet_single_top1", "imagenet_single_top5", "imagenet_ensemble_top1", "imagenet_ensemble_top5"} <= set(res)
    c = both["counts"]
    assert c["coco"]["short"] == {"captions": 16, "distinct": 16} and c["coco"]["images"] == 3  # the 6-caption image kept
    assert c["urban1k"]["long"]["captions"] == 4 and c["xm3600"]["languages"] == ["de", "en", "ja"]
    assert c["imagenet"] == {"protocol": "zeroshot", "images": 4, "single_templates": 1,
                             "ensemble_templates": N_TEMPLATES, "classes": N_CLASSES}
    assert both["benchmarks"]["urban1k"]["protocol"] == "1:1" and both["benchmarks"]["coco"]["protocol"] == "multi"
    if kind == "stage2":
        assert both["benchmarks"]["urban1k"]["cache"] and not both["benchmarks"]["coco"]["cache"]

def test_clip_numbers_match_an_independent_computation(sets, tmp_path):
    res = evaluate_here(tmp_path / "clip.json", model=sets["clip"], benchmarks=bench_setting(sets))["results"]
    vit, text = M.ViT.from_pretrained(sets["clip"]).eval(), M.CLIPTextTower.from_pretrained(sets["clip"]).eval()
    tok = M.load_tokenizer(sets["clip"])
    def embed_texts(texts):
        return F.normalize(text(*text.tokenize(tok, texts)), dim=-1)
    def embed_images(paths):
        return F.normalize(vit(torch.stack([eval_transform(Image.open(p), 16) for p in paths])), dim=-1)
    with torch.no_grad():
        for name, field in (("coco", "short"), ("docci", "long"), ("xm3600", "ja")):
            recs = [json.loads(line) for line in open(os.path.join(sets[name], "test.jsonl"))]
            owners = {}
            for i, r in enumerate(recs):
                for t in r["captions"][field]:
                    owners.setdefault(t, set()).add(i)
            img, txt = embed_images([r["image"] for r in recs]), embed_texts(list(owners))
            prefix = f"xm3600_{field}" if name == "xm3600" else name
            for k in (1, 5):
                i2t, t2i = brute_force_recall(img, txt, [sorted(o) for o in owners.values()], k)
                assert res[f"{prefix}_i2t_r{k}"] == pytest.approx(i2t) and res[f"{prefix}_t2i_r{k}"] == pytest.approx(t2i)
        img = embed_images([json.loads(line)["image"] for line in open(os.path.join(sets["imagenet"], "val.jsonl"))])
        labels = torch.tensor([lab for _, lab in IMAGENET])
        for key, file in (("single", "classes_single.json"), ("ensemble", "classes.json")):
            spec = json.load(open(os.path.join(sets["imagenet"], file)))
            prompts = embed_texts([t.format(c) for c in spec["classes"] for t in spec["templates"]])
            cls = F.normalize(prompts.view(N_CLASSES, len(spec["templates"]), -1).mean(1), dim=-1)
            logits = img @ cls.T  # a hit: the label's score above every other class's (a tie is a miss)
            top1 = 100.0 * (logits.topk(2).values[:, 1] < logits.gather(1, labels[:, None])[:, 0]).float().mean().item()
            assert res[f"imagenet_{key}_top1"] == pytest.approx(top1)

# -----------------------------------------------------------------------------
# the printed table

def table_rows(lines, first):
    """The three lines of the table block whose heading starts with `first`, split into cells."""
    i = next(i for i, line in enumerate(lines) if line.startswith(first))
    return [[cell.split() for cell in line.split("|")] for line in lines[i:i + 3]]

def test_printed_table_has_the_papers_layout(sets, tmp_path):
    out = tmp_path / "eval.json"
    r = run_script("evaluate.py", dict(model=sets["clip"], benchmarks=bench_setting(sets), out=out, batch_size=8,
                                       name="tiny_clip"), env={"CUDA_VISIBLE_DEVICES": ""})
    res = json.load(open(out))
    lines = r.stdout.splitlines()
    assert all(line in lines for line in res["table"])
    heads, subs, vals = table_rows(lines, "Flickr")
    assert heads == [["Flickr"], ["COCO"], ["ShareGPT4V"], ["Urban-1k"], ["DOCCI"], ["Avg"]]
    assert subs == [["I2T", "T2I"]] * 6
    keys = ["flickr30k", "coco", "sharegpt4v", "urban1k", "docci", "avg"]
    assert vals == [[f"{res['results'][f'{k}_{d}_r1']:.1f}" for d in ("i2t", "t2i")] for k in keys]
    heads, subs, vals = table_rows(lines, "XM3600")
    assert heads == [["XM3600"], ["ImageNet"]] and subs == [["I2T", "T2I"], ["0-shot*", "0-shot"]]
    assert vals == [[f"{res['results'][k]:.1f}" for k in ("xm3600_i2t_r1", "xm3600_t2i_r1")],
                    [f"{res['results'][k]:.1f}" for k in ("imagenet_single_top1", "imagenet_ensemble_top1")]]
    assert '0-shot*: the single template "a photo of the {}."' in r.stdout and f"0-shot: the {N_TEMPLATES} templates" in r.stdout
    assert "XM3600: the mean over its 3 languages" in r.stdout
    assert res["name"] == "tiny_clip" and res["kind"] == "clip" and set(res["seconds_per_benchmark"]) == set(SETS)

def test_missing_benchmarks_print_a_dash_and_avg_is_over_those_present(sets, tmp_path, capsys):
    res = evaluate_here(tmp_path / "two.json", model=sets["clip"], benchmarks=bench_setting(sets, ["urban1k", "coco"]))
    lines = capsys.readouterr().out.splitlines()
    _, _, vals = table_rows(lines, "Flickr")
    r = res["results"]
    assert vals[0] == vals[2] == vals[4] == ["-", "-"]  # Flickr, ShareGPT4V, DOCCI
    assert res["avg_of"] == ["coco", "urban1k"]  # the table's order, not the setting's
    assert r["avg_i2t_r1"] == pytest.approx((r["coco_i2t_r1"] + r["urban1k_i2t_r1"]) / 2)
    assert vals[5] == [f"{r['avg_i2t_r1']:.1f}", f"{r['avg_t2i_r1']:.1f}"]
    assert table_rows(lines, "XM3600")[2] == [["-", "-"], ["-", "-"]]
    assert any(line.endswith("Avg: the mean over COCO, Urban-1k.") for line in lines) and not any(line.startswith("XM3600:") for line in lines)

# -----------------------------------------------------------------------------
# each benchmark's texts reach the text side once, for it alone

def expected_texts(sets, cached=()):
    """Benchmark -> Counter of the texts its evaluation embeds: every caption of each field once (a cached
    benchmark: none), and for imagenet the prompts of each protocol once."""
    want = {n: Counter(texts_of(sets[n]) if n not in cached else []) for n in SETS if n != "imagenet"}
    prompts = []
    for file in ("classes_single.json", "classes.json"):
        spec = json.load(open(os.path.join(sets["imagenet"], file)))
        prompts += [t.format(c) for c in spec["classes"] for t in spec["templates"]]
    want["imagenet"] = Counter(prompts)
    return want

def check_calls(calls, want):
    assert sum(map(len, calls)) == sum(sum(c.values()) for c in want.values())
    assert Counter(t for call in calls for t in call) == sum(want.values(), Counter())
    for call in calls:  # no call mixes two benchmarks' texts
        assert any(set(call) <= set(c) for c in want.values()), call[:3]

def test_stage2_llm_embeds_each_benchmarks_captions_once(sets, tmp_path, monkeypatch):
    calls, depth, embed = [], [0], EM.embed_texts
    def recording(llm, tok, texts, *args, **kw):  # outer calls only (embed_texts recurses on distinct texts)
        if not depth[0]:
            calls.append(list(texts))
        depth[0] += 1
        try:
            return embed(llm, tok, texts, *args, **kw)
        finally:
            depth[0] -= 1
    monkeypatch.setattr(EM, "embed_texts", recording)
    evaluate_here(tmp_path / "s2.json", model=sets["stage2"], benchmarks=bench_setting(sets), caches=sets["caches"])
    want = expected_texts(sets, cached=("flickr30k", "urban1k"))
    check_calls(calls, want)  # (flickr30k's and urban1k's captions come from their caches: not at all)

def test_clip_text_tower_embeds_each_benchmarks_captions_once(sets, tmp_path, monkeypatch):
    calls, tokenize = [], M.CLIPTextTower.tokenize
    def recording(self, tok, texts):
        calls.append(list(texts))
        return tokenize(self, tok, texts)
    monkeypatch.setattr(M.CLIPTextTower, "tokenize", recording)
    evaluate_here(tmp_path / "clip.json", model=sets["clip"], benchmarks=bench_setting(sets), batch_size=64)
    check_calls(calls, expected_texts(sets))

# -----------------------------------------------------------------------------
# SigLIP: a stage-2 model on a SigLIP tower works; a raw SiglipModel is refused

def test_siglip_tower_stage2_and_raw_siglip_refused(sets, tmp_path):
    import transformers
    torch.manual_seed(0)
    raw = tmp_path / "siglip"
    transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=50, max_position_embeddings=8))).save_pretrained(raw)
    with pytest.raises(ValueError, match="an HF SigLIP folder.*evaluated as a stage-2 model"):
        evaluate_here(tmp_path / "x.json", model=str(raw), benchmarks=bench_setting(sets, ["urban1k"]))
    s2 = tmp_path / "siglip_stage2"  # as train_stage2 exports a SigLIP run: the vision tower + adaptor + text.json
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**json.load(open(raw / "config.json"))["vision_config"])) \
        .save_pretrained(s2)
    tower = M.load_image_tower(str(s2))
    torch.manual_seed(1)
    M.Adaptor.for_method("llm2clip", 32, tower.embed_dim).save_pretrained(str(s2))
    shutil.copy(os.path.join(sets["stage2"], "text.json"), s2 / "text.json")
    res = evaluate_here(tmp_path / "s.json", model=str(s2), benchmarks=bench_setting(sets, ["urban1k", "imagenet"]),
                        caches=f"urban1k={sets['dir'] / 'cache' / 'urban1k'}")
    assert res["kind"] == "stage2" and 0 <= res["results"]["urban1k_i2t_r1"] <= 100
    assert {"imagenet_single_top1", "imagenet_ensemble_top1"} <= set(res["results"])
    # the numbers are the SigLIP tower's (adaptor over the cached LLM embeddings, as computed here)
    with torch.no_grad():
        recs = [json.loads(line) for line in open(os.path.join(sets["urban1k"], "test.jsonl"))]
        assert tower.preprocess.resize == "square" and tower.preprocess.image_mean == (0.5, 0.5, 0.5)  # SigLIP's own
        img = F.normalize(tower(torch.stack([eval_transform(Image.open(r["image"]), tower.preprocess) for r in recs])), dim=-1)
        e = np.load(sets["dir"] / "cache/urban1k/long.npy").astype(np.float32)
        txt = F.normalize(M.Adaptor.from_pretrained(str(s2))(F.normalize(torch.from_numpy(e), dim=-1)), dim=-1)
        i2t, t2i = brute_force_recall(img, txt, list(range(len(recs))), 1)
    assert res["results"]["urban1k_i2t_r1"] == pytest.approx(i2t) and res["results"]["urban1k_t2i_r1"] == pytest.approx(t2i)

# -----------------------------------------------------------------------------
# refusals, before any model runs

def test_one_to_one_set_with_a_multi_caption_image_is_refused(sets, tmp_path):
    folder = tmp_path / "urban1k"
    os.makedirs(folder)
    lines = open(os.path.join(sets["urban1k"], "test.jsonl")).read().splitlines()
    rec = json.loads(lines[2])
    rec["captions"]["long"].append("A second caption for the third image.")
    lines[2] = json.dumps(rec)
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{folder}/test.jsonl:3: urban1k is scored 1:1 .* this image has 2 captions "
                                         rf"in field 'long' \(1 such line\(s\)\)"):
        evaluate_here(tmp_path / "x.json", model=sets["clip"], benchmarks=f"coco={sets['coco']},urban1k={folder}")

def test_repeated_image_is_one_image(sets, tmp_path):
    """ShareGPT4V-1k may repeat an image in two entries: one gallery image with both captions, so the two
    identical embeddings do not tie against each other."""
    folder = tmp_path / "sharegpt4v"
    os.makedirs(folder)
    recs = [json.loads(line) for line in open(os.path.join(sets["sharegpt4v"], "test.jsonl"))]
    recs.append({"image": recs[0]["image"], "captions": {"long": ["Another description of the first image."]}})
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = evaluate_here(tmp_path / "x.json", model=sets["clip"], benchmarks=f"sharegpt4v={folder}")
    assert res["counts"]["sharegpt4v"]["images"] == 6 and res["counts"]["sharegpt4v"]["distinct_images"] == 5
    vit, text = M.ViT.from_pretrained(sets["clip"]).eval(), M.CLIPTextTower.from_pretrained(sets["clip"]).eval()
    tok = M.load_tokenizer(sets["clip"])
    with torch.no_grad():
        img = F.normalize(vit(torch.stack([eval_transform(Image.open(r["image"]), 16) for r in recs[:5]])), dim=-1)
        txt = F.normalize(text(*text.tokenize(tok, [r["captions"]["long"][0] for r in recs])), dim=-1)
    i2t, t2i = brute_force_recall(img, txt, [0, 1, 2, 3, 4, 0], 1)
    assert res["results"]["sharegpt4v_i2t_r1"] == pytest.approx(i2t) and res["results"]["sharegpt4v_t2i_r1"] == pytest.approx(t2i)

def test_bad_settings_and_caches_refused(sets, tmp_path):
    s2 = sets["stage2"]
    cases = [
        (dict(benchmarks=f"urban1k={sets['urban1k']}", caches=f"sharegpt4v={sets['dir'] / 'cache' / 'urban1k'}"),
         "caches: 'sharegpt4v' is not among the benchmarks"),
        (dict(benchmarks=f"sharegpt4v={sets['sharegpt4v']}", caches=f"sharegpt4v={sets['dir'] / 'cache' / 'urban1k'}"),
         "field 'long' was made from other captions than"),
        (dict(benchmarks=f"flickr={sets['flickr30k']}"), "unknown benchmark 'flickr'"),
        (dict(benchmarks=f"coco={sets['coco']},coco={sets['coco']}"), "benchmark 'coco' named twice"),
        (dict(benchmarks=f"coco={sets['urban1k']}"), "no test.jsonl there|caption field 'short' is missing"),
        (dict(benchmarks=f"imagenet={sets['imagenet']}", caches=f"imagenet={sets['dir'] / 'cache' / 'urban1k'}"),
         "imagenet has no captions to cache"),
        (dict(benchmarks=f"urban1k={sets['urban1k']}", cache=str(sets["dir"] / "cache" / "urban1k")),
         "with benchmarks, name each benchmark's cache in caches="),
    ]
    for settings, msg in cases:
        with pytest.raises((ValueError, KeyError, FileNotFoundError), match=msg):
            evaluate_here(tmp_path / "x.json", model=s2, **settings)
    with pytest.raises(ValueError, match="are for stage-2 models"):
        evaluate_here(tmp_path / "x.json", model=sets["clip"], benchmarks=f"urban1k={sets['urban1k']}", caches=sets["caches"])
    with pytest.raises(ValueError, match="is an LLM"):
        evaluate_here(tmp_path / "x.json", model=sets["llm"], benchmarks=f"urban1k={sets['urban1k']}")
