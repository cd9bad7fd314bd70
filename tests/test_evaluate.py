"""evaluate.py: its metrics on data with known answers and against plain-loop references (exact ties
included), and the script end to end on tiny random models with real image files: a stage-2 folder with
and without the embedding cache (same numbers, and the numbers of an independent computation), a CLIP
folder, an LLM folder, and the refusals (a cache of another LLM, a bad classes file, an unknown folder).
The caption template through the scripts, on a tiny LLM with SmolLM2's chat tokens: embed_cache.py records
the resolved string (and --template=none writes the bytes it wrote before templates existed), stage 2
carries it into text.json, evaluate.py wraps with it and refuses a cache made with another, stage 1 wraps
queries and keys, the LLM mode wraps c2c captions. (The benchmark mode: tests/test_benchmarks.py.)"""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import embedder as EM
import llama as LM
import model as M
from chat_tokenizers import chatml_tokenizer
from images import eval_transform
from manifest import Manifest
from evaluate import (c2c_top1, distinct_captions, model_kind, read_classes, retrieval_recall, zeroshot_accuracy,
                      zeroshot_classifier)
from tiny import ROOT, WORDS, run_script, tiny_clip, tiny_llm, write_images
from train_common import model_fingerprint, write_json

pytestmark = pytest.mark.slow  # evaluation runs


# -----------------------------------------------------------------------------
# plain-loop references

def brute_force_recall(img, txt, txt_image, k):
    """Recall@k both ways with sorted python lists; among equal scores, wrong items sort first."""
    owners = [set(o) if isinstance(o, (list, tuple, set)) else {int(o)} for o in txt_image]
    img, txt = img.tolist(), txt.tolist()
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    def one_way(queries, items, right):
        hits = 0
        for i, q in enumerate(queries):
            ranked = sorted(((dot(q, it), right(i, j)) for j, it in enumerate(items)), key=lambda x: (-x[0], x[1]))
            hits += any(r for _, r in ranked[:k])
        return 100.0 * hits / len(queries)
    return (one_way(img, txt, lambda i, j: i in owners[j]), one_way(txt, img, lambda j, i: i in owners[j]))

def brute_force_c2c(q, g, group):
    q, g, hits, n = q.tolist(), g.tolist(), 0, 0
    for i in range(len(q)):
        if sum(x == group[i] for x in group) < 2:
            continue
        sims = [(sum(a * b for a, b in zip(q[i], g[j])), group[j] == group[i]) for j in range(len(g)) if j != i]
        n += 1
        hits += sorted(sims, key=lambda x: (-x[0], x[1]))[0][1]
    return 100.0 * hits / n

# -----------------------------------------------------------------------------
# caption-to-caption

def test_c2c_top1_known_answer():
    # captions 0,1 of image 0; 2,3 of image 1; 4 alone (not a query, but a distractor in the gallery)
    e = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                                  [0.1, 0.95, 0.0]]), dim=-1)
    group = [0, 0, 1, 1, 2]
    # 0 -> 1 hit, 1 -> 0 hit, 2 -> 4 miss (the distractor), 3 -> orthogonal to all but itself: its peer
    # 2 ties (0.0) with captions of other images, and a tie counts against it: a miss
    assert c2c_top1(e, e, group) == 50.0
    # queries embedded differently from the gallery (the instruction): only the query side moves
    q = e.clone()
    q[2] = F.normalize(torch.tensor([0.0, 0.5, 0.5]), dim=0)  # now nearest to caption 3, its peer
    assert c2c_top1(q, e, group) == 75.0

def test_c2c_top1_never_retrieves_itself_and_ties_count_against():
    # captions 4 and 5 share image 4 but each is nearer to caption 0 or 1 than to the other: were its own
    # entry not excluded, each would find itself (similarity 1) and hit
    e = torch.eye(6)
    e[4], e[5] = F.normalize(torch.tensor([1.0, 0, 0, 0, 0.5, 0]), dim=0), F.normalize(torch.tensor([0, 1.0, 0, 0, 0, 0.5]), dim=0)
    assert c2c_top1(e, e, [0, 1, 2, 3, 4, 4]) == 0.0
    assert c2c_top1(e, e, [0, 0, 0, 0, 0, 0]) == 100.0
    same = F.normalize(torch.ones(6, 4), dim=-1)  # a collapsed model: every caption ties with every other
    assert c2c_top1(same, same, [0, 0, 1, 1, 2, 2]) == 0.0
    assert c2c_top1(torch.full((4, 3), float("nan")), torch.full((4, 3), float("nan")), [0, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="no caption shares its group"):
        c2c_top1(e, e, [0, 1, 2, 3, 4, 5])

def test_c2c_top1_matches_brute_force_with_exact_ties():
    g = torch.Generator().manual_seed(0)
    for seed in range(3):
        x = torch.randint(-1, 2, (40, 3), generator=g).float()  # small integers: many exact ties
        y = torch.randint(-1, 2, (40, 3), generator=g).float()
        group = torch.randint(0, 15, (40,), generator=g).tolist()
        assert c2c_top1(x, y, group, chunk=7) == pytest.approx(brute_force_c2c(x, y, group), abs=1e-9)

# -----------------------------------------------------------------------------
# retrieval

def test_retrieval_recall_identity_is_perfect():
    eye = torch.eye(12)
    r = retrieval_recall(eye, eye, list(range(12)))
    assert r == {f"{d}_r{k}": 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert list(r) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]

def test_retrieval_recall_known_ranks():
    # images e0..e5, one caption each. t4 and t5 rank their own image third (two other images score
    # higher); t0 and t1 lean towards image 4, so image 4 ranks its caption t4 third. Everything else
    # is right at rank 1.
    img = torch.eye(6)
    txt = torch.zeros(6, 6)
    txt[[0, 1, 2, 3], [0, 1, 2, 3]] = 1.0
    txt[0, 4], txt[1, 4] = 0.5, 0.4        # image 4: t0 0.447, t1 0.371, t4 0.267
    txt[4, [0, 1, 4]] = torch.tensor([3.0, 2.0, 1.0])  # t4: image 0 0.80, image 1 0.53, image 4 0.27
    txt[5, [2, 3, 5]] = torch.tensor([3.0, 2.0, 1.0])  # t5: image 2, image 3, then image 5
    txt = F.normalize(txt, dim=-1)
    r = retrieval_recall(img, txt, list(range(6)), ks=(1, 2, 3, 5))
    expect = {"i2t_r1": 500 / 6, "i2t_r2": 500 / 6, "i2t_r3": 100.0, "i2t_r5": 100.0,
              "t2i_r1": 400 / 6, "t2i_r2": 400 / 6, "t2i_r3": 100.0, "t2i_r5": 100.0}
    assert r == pytest.approx(expect, abs=1e-12)
    for k in (1, 2, 3, 5):
        assert brute_force_recall(img, txt, list(range(6)), k) == pytest.approx((expect[f"i2t_r{k}"], expect[f"t2i_r{k}"]))

def test_retrieval_recall_several_captions_per_image():
    # image 0 has c0 (= its embedding) and c1 (far: nearest to image 2, then image 1); images 1, 2 one each
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 2.0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    owner = [0, 0, 1, 2]
    r = retrieval_recall(img, txt, owner, ks=(1, 2, 5))
    # image->text: image 0 finds c0 first (any caption counts): every image hits at 1. text->image: c1
    # ranks image 0 last (third): a miss at 1 and 2
    assert r == pytest.approx({"i2t_r1": 100.0, "i2t_r2": 100.0, "i2t_r5": 100.0,
                               "t2i_r1": 75.0, "t2i_r2": 75.0, "t2i_r5": 100.0}, abs=1e-12)
    # without c0, image 0's only caption is orthogonal to it, tied at 0.0 with c2 and c3: ties count
    # against the query, so image 0 ranks it third
    r = retrieval_recall(img, txt[1:], owner[1:], ks=(1, 2, 3))
    assert r == pytest.approx({"i2t_r1": 200 / 3, "i2t_r2": 200 / 3, "i2t_r3": 100.0,
                               "t2i_r1": 200 / 3, "t2i_r2": 200 / 3, "t2i_r3": 100.0}, abs=1e-12)

def test_retrieval_recall_ties_and_nan_count_against_the_query():
    same = F.normalize(torch.ones(3, 4), dim=-1)  # a collapsed model scores 0, not 100
    assert retrieval_recall(same, same, [0, 1, 2], ks=(1, 3)) == {"i2t_r1": 0.0, "i2t_r3": 100.0,
                                                                  "t2i_r1": 0.0, "t2i_r3": 100.0}
    nan = torch.full((3, 4), float("nan"))
    assert retrieval_recall(nan, nan, [0, 1, 2], ks=(1, 2)) == {"i2t_r1": 0.0, "i2t_r2": 0.0, "t2i_r1": 0.0, "t2i_r2": 0.0}

def test_identical_captions_are_one_text_of_every_image_that_has_it():
    texts, image = ["a shirt", "a red shirt", "a shirt", "a bag", "a bag"], [0, 0, 1, 2, 2]
    rows, owners = distinct_captions(texts, image)
    assert rows == [0, 1, 3] and owners == [[0, 1], [0], [2]]
    # images 0 and 1 both say "a shirt", their best caption: kept apart, the two copies of the string
    # tie, and each image loses its hit to the other's copy; merged, the string is right for both
    img = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    emb = {"a shirt": [1.0, 0.0, 0.0], "a red shirt": [0.0, 1.0, 0.0], "a bag": [0.0, 0.0, 1.0]}
    txt = F.normalize(torch.tensor([emb[t] for t in texts]), dim=-1)
    assert retrieval_recall(img, txt, image, ks=(1,))["i2t_r1"] == pytest.approx(100 / 3)
    r = retrieval_recall(img, txt[rows], owners, ks=(1,))
    assert r == {"i2t_r1": 100.0, "t2i_r1": 100.0}

def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for seed in range(4):
        n_img, n_txt = 13, 37
        if seed % 2:  # continuous: no ties
            img, txt = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1), F.normalize(torch.randn(n_txt, 8, generator=g), dim=-1)
        else:  # small integers: dot products exact in both implementations, with many exact ties
            img, txt = torch.randint(-1, 2, (n_img, 3), generator=g).float(), torch.randint(-1, 2, (n_txt, 3), generator=g).float()
        owner = torch.randint(0, n_img, (n_txt,), generator=g).tolist()
        owner[:n_img] = range(n_img)  # every image has a caption
        owner = [[o, (o + 5) % n_img] if j % 6 == 0 else o for j, o in enumerate(owner)]  # a few shared
        r = retrieval_recall(img, txt, owner, ks=(1, 5, 10), chunk=5)  # chunks smaller than the sets
        for k in (1, 5, 10):
            i2t, t2i = brute_force_recall(img, txt, owner, k)
            assert r[f"i2t_r{k}"] == pytest.approx(i2t, abs=1e-9) and r[f"t2i_r{k}"] == pytest.approx(t2i, abs=1e-9)

# -----------------------------------------------------------------------------
# zero-shot

def test_zeroshot_classifier_averages_normalised_prompts():
    vec = {"a cat": [3.0, 0, 0], "a cat photo": [0, 1.0, 0], "a dog": [0, 0, 2.0], "a dog photo": [0, 0, 5.0]}
    c = zeroshot_classifier(lambda texts: torch.tensor([vec[t] for t in texts]), ["cat", "dog"], ["a {}", "a {} photo"])
    s = 1 / math.sqrt(2)
    assert torch.allclose(c, torch.tensor([[s, s, 0], [0, 0, 1.0]]), atol=1e-6)

def test_zeroshot_known_answer():
    classes = ["cat", "dog", "bird", "fish", "cow", "ant"]
    def embed(texts):  # each prompt embeds as its class's one-hot, plus template noise
        g = torch.Generator().manual_seed(0)
        return torch.stack([F.one_hot(torch.tensor(next(i for i, c in enumerate(classes) if c in t)), 6).float()
                            + 0.1 * torch.randn(6, generator=g) for t in texts])
    class_emb = zeroshot_classifier(embed, classes, ["a {}.", "a photo of a {}."])
    assert class_emb.shape == (6, 6) and torch.allclose(class_emb.norm(dim=-1), torch.ones(6))
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.eye(6)[[0, 1, 2, 3, 4, 5, 0, 1]] + 0.02 * torch.randn(8, 6, generator=g), dim=-1)
    img[7] = F.normalize(torch.tensor([0.0, 1.0, 0.6, 0.3, 0, 0]), dim=0)  # labelled bird: its second class
    labels = [0, 1, 2, 3, 4, 5, 0, 2]
    r = zeroshot_accuracy(img, class_emb, labels, ks=(1, 2, 5, 6))
    assert r == pytest.approx({"zeroshot_top1": 87.5, "zeroshot_top2": 100.0, "zeroshot_top5": 100.0})
    assert "zeroshot_top6" not in r  # top-6 of 6 classes cannot fail: not reported
    # a tie with another class counts against the image
    assert zeroshot_accuracy(torch.ones(2, 6), class_emb * 0 + 1, [0, 3], ks=(1,)) == {"zeroshot_top1": 0.0}

def test_read_classes_refuses_bad_files(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"classes": ["a", "b"], "templates": ["{}."]}))
    assert read_classes(str(p)) == (["a", "b"], ["{}."])
    for spec, msg in (({"templates": ["{}"]}, "key 'classes'"), ({"classes": ["a"], "template": ["{}"]}, "key 'templates'"),
                      ({"classes": ["a"], "templates": []}, "key 'templates'"),
                      ({"classes": ["a"], "templates": ["a photo"]}, "has no '{}'")):
        p.write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=f"{p}: .*{msg}"):
            read_classes(str(p))

def test_model_kind(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=f"model='{tmp_path}'.*model_type 'bert'"):
        model_kind(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        model_kind(str(tmp_path / "empty"))

# -----------------------------------------------------------------------------
# the script end to end, on tiny random models and real image files

N, CLASSES, TEMPLATES = 12, ["shirt", "dress", "bag", "coat"], ["a {}", "a small {} on the left"]

def tiny_stage2(folder, clip, llm, method="llm2clip", seed=0, template=""):
    """A stage-2 folder as train_stage2.py exports it: tiny_clip's ViT (+ logit_scale) as an HF
    CLIPVisionModelWithProjection folder, a random adaptor, text.json naming the LLM (and the resolved
    caption template its embeddings were made with)."""
    os.makedirs(folder, exist_ok=True)
    vit = M.ViT.from_pretrained(clip)
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file({**sd, "logit_scale": torch.tensor(math.log(100.0))}, os.path.join(folder, "model.safetensors"))
    write_json(os.path.join(folder, "config.json"), {**vars(vit.config), "model_type": "clip_vision_model"})
    torch.manual_seed(seed)
    M.Adaptor.for_method(method, LM.Llama.from_pretrained(llm).config.hidden_size, vit.config.projection_dim).save_pretrained(folder)
    write_json(os.path.join(folder, "text.json"), dict(llm=llm, llm_sha256=model_fingerprint(llm), instruction="",
                                                           max_length=512, template=template, method=method))
    return str(folder)

def write_eval_manifest(folder):
    """N images with labels; "short" repeats strings across images, "long" and "de" do not."""
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(rng.choice(WORDS, n))
    write_images(folder, N)
    with open(os.path.join(folder, "m.jsonl"), "w") as f:
        for i in range(N):
            long = words(12)  # the second long caption extends the first: c2c has something to find
            caps = {"short": [f"a {['red', 'blue', 'green'][i % 3]} shirt", words(3)],
                    "long": [long, long + " " + words(6)], "de": [words(8)]}
            f.write(json.dumps({"image": f"{i}.png", "captions": caps, "label": i % 4}) + "\n")
    with open(os.path.join(folder, "classes.json"), "w") as f:
        json.dump({"classes": CLASSES, "templates": TEMPLATES}, f)
    return os.path.join(folder, "m.jsonl"), os.path.join(folder, "classes.json")

def run(script, check=True, **args):
    """A script on the CPU (fp32 throughout: the numbers below are compared with CPU computations here)."""
    return run_script(script, args, check=check, env={"CUDA_VISIBLE_DEVICES": ""})

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    manifest, classes = write_eval_manifest(str(d))
    llm, clip = tiny_llm(d / "llm"), tiny_clip(d / "clip")
    stage2 = tiny_stage2(d / "stage2", clip, llm)
    run("embed_cache.py", model=llm, manifest=manifest, out_dir=d / "cache")
    common = dict(manifest=manifest, classes=classes, retrieval="short,long", multilingual="de", c2c_field="long",
                  multilingual_unseen="", zeroshot_manifest="", batch_size=5)  # batches smaller than the sets
    return dict(dir=d, manifest=manifest, classes=classes, llm=llm, clip=clip, stage2=stage2, cache=str(d / "cache"),
                common=common)

def evaluate(tiny, name, check=True, **kw):
    out = tiny["dir"] / f"{name}.json"
    r = run("evaluate.py", check=check, **{**tiny["common"], "out": out, "name": name, **kw})
    return (json.load(open(out)), r) if check else r

RETRIEVAL = {f"{f}_{d}_r{k}" for f in ("short", "long", "de") for d in ("i2t", "t2i") for k in (1, 5, 10)}

def test_stage2_with_and_without_cache(tiny):
    cached, r = evaluate(tiny, "cached", model=tiny["stage2"], cache=tiny["cache"])
    ran, _ = evaluate(tiny, "ran", model=tiny["stage2"])
    keys = RETRIEVAL | {"multilingual_i2t_r1", "multilingual_t2i_r1", "zeroshot_top1", "c2c_top1", "c2c_llm_top1"}
    assert set(cached["results"]) == keys and set(ran["results"]) == keys  # top5 of 4 classes: not reported
    assert cached["name"] == "cached" and cached["model"] == tiny["stage2"] and cached["config"]["cache"] == tiny["cache"]
    assert cached["counts"]["short"] == {"captions": 2 * N, "distinct": N + 3}
    for k in keys:  # the cache holds float16 rows of the same embeddings
        assert abs(cached["results"][k] - ran["results"][k]) < 1e-3, (k, cached["results"][k], ran["results"][k])
    assert cached["results"]["multilingual_t2i_r1"] == cached["results"]["de_t2i_r1"]
    assert "short_i2t_r1" in r.stdout and "zeroshot_top1" in r.stdout

def test_stage2_numbers_match_an_independent_computation(tiny):
    """The script's wiring (row order, merged captions, adaptor, normalisation) against the models run here
    and the plain-loop references."""
    res, _ = evaluate(tiny, "ran2", model=tiny["stage2"], cache="")
    res = res["results"]
    vit, adaptor = M.ViT.from_pretrained(tiny["stage2"]), M.Adaptor.from_pretrained(tiny["stage2"])
    llm, tok = LM.Llama.from_pretrained(tiny["llm"]), M.load_tokenizer(tiny["llm"])
    records = [json.loads(line) for line in open(tiny["manifest"])]
    with torch.no_grad():
        pixels = torch.stack([eval_transform(Image.open(tiny["dir"] / r["image"]), 16) for r in records])
        img = F.normalize(vit(pixels), dim=-1)
        text = lambda texts: F.normalize(adaptor(EM.embed_texts(llm, tok, texts)), dim=-1)
        for field in ("short", "long"):
            owners = {}
            for i, r in enumerate(records):
                for t in r["captions"][field]:
                    owners.setdefault(t, set()).add(i)
            txt = text(list(owners))
            for k in (1, 5):
                i2t, t2i = brute_force_recall(img, txt, [sorted(o) for o in owners.values()], k)
                assert res[f"{field}_i2t_r{k}"] == pytest.approx(i2t, abs=1e-6)
                assert res[f"{field}_t2i_r{k}"] == pytest.approx(t2i, abs=1e-6)
        prompts = text([t.format(c) for c in CLASSES for t in TEMPLATES]).view(4, 2, -1).mean(1)
        pred = (img @ F.normalize(prompts, dim=-1).T).argmax(1)
        assert res["zeroshot_top1"] == pytest.approx(100.0 * (pred == torch.arange(N) % 4).float().mean().item(), abs=1e-6)
        # zero-shot on another labelled manifest (the demo's single items): the same images, other labels here;
        # and a language reported apart from the multilingual mean
        other = tiny["dir"] / "zeroshot.jsonl"
        other.write_text("".join(json.dumps({"image": os.path.abspath(tiny["dir"] / r["image"]), "label": (r["label"] + 1) % 4}) + "\n"
                                 for r in records))
        res2, _ = evaluate(tiny, "zs", model=tiny["stage2"], cache="", zeroshot_manifest=other, multilingual_unseen="de",
                           retrieval="long")
        res2 = res2["results"]
        want = 100.0 * (pred == (torch.arange(N) % 4 + 1) % 4).float().mean().item()
        assert res2["zeroshot_top1"] == pytest.approx(want, abs=1e-6) and want != res["zeroshot_top1"]
        assert res2["multilingual_unseen_i2t_r1"] == res2["de_i2t_r1"] == res["de_i2t_r1"]
        longs = [t for r in records for t in r["captions"]["long"]]
        group = [i for i, r in enumerate(records) for _ in r["captions"]["long"]]
        e = EM.embed_texts(llm, tok, longs)
        assert res["c2c_llm_top1"] == pytest.approx(brute_force_c2c(e, e, group), abs=1e-6)
        j = F.normalize(adaptor(e), dim=-1)
        assert res["c2c_top1"] == pytest.approx(brute_force_c2c(j, j, group), abs=1e-6)

def test_clip_folder_and_llm_folder(tiny):
    res, _ = evaluate(tiny, "clip", model=tiny["clip"])
    assert set(res["results"]) == RETRIEVAL | {"multilingual_i2t_r1", "multilingual_t2i_r1", "zeroshot_top1", "c2c_top1"}
    res, _ = evaluate(tiny, "llm", model=tiny["llm"], cupl="")  # the stage-1 check: c2c only
    assert set(res["results"]) == {"c2c_top1_long"} and 0.0 <= res["results"]["c2c_top1_long"] <= 100.0

def test_refusals(tiny):
    other = tiny_llm(tiny["dir"] / "other_llm", seed=1)
    run("embed_cache.py", model=other, manifest=tiny["manifest"], out_dir=tiny["dir"] / "other_cache")
    r = evaluate(tiny, "x", check=False, model=tiny["stage2"], cache=tiny["dir"] / "other_cache")
    assert r.returncode != 0 and f"{tiny['dir'] / 'other_cache'}/meta.json: made by another model" in r.stderr, r.stderr[-2000:]
    shutil.copytree(tiny["cache"], tiny["dir"] / "instructed_cache")  # as if made with an instruction
    meta = json.load(open(tiny["dir"] / "instructed_cache" / "meta.json"))
    write_json(str(tiny["dir"] / "instructed_cache" / "meta.json"), {**meta, "instruction": "find it"})
    r = evaluate(tiny, "x", check=False, model=tiny["stage2"], cache=tiny["dir"] / "instructed_cache")
    assert r.returncode != 0 and f"{tiny['dir'] / 'instructed_cache'}/meta.json (how the cache was embedded) has " \
        f"instruction 'find it', but {tiny['stage2']}/text.json (how the adaptor's training embeddings were made) " \
        f"has instruction ''" in r.stderr, r.stderr[-2000:]
    r = evaluate(tiny, "x", check=False, model=tiny["stage2"], llm=other)  # the LLM is not the one of text.json
    assert r.returncode != 0 and f"{other}: not the LLM {tiny['stage2']} was trained with" in r.stderr, r.stderr[-2000:]
    bad = tiny["dir"] / "bad_classes.json"
    bad.write_text(json.dumps({"classes": CLASSES}))
    r = evaluate(tiny, "x", check=False, model=tiny["clip"], classes=bad)
    assert r.returncode != 0 and f"{bad}: key 'templates' must be a non-empty list" in r.stderr, r.stderr[-2000:]
    lines = open(tiny["manifest"]).read().splitlines()
    rec = json.loads(lines[2])
    del rec["label"]
    unlabelled = tiny["dir"] / "unlabelled.jsonl"
    unlabelled.write_text("\n".join(lines[:2] + [json.dumps(rec)] + lines[3:]) + "\n")
    r = evaluate(tiny, "x", check=False, model=tiny["clip"], manifest=unlabelled)
    assert r.returncode != 0 and f"{unlabelled}: 1 fault(s)" in r.stderr and "line 3: missing key 'label'" in r.stderr, r.stderr[-2000:]

# -----------------------------------------------------------------------------
# caption templates through the scripts (a tiny LLM whose vocabulary has SmolLM2's ChatML tokens)

CHATML = "<|im_start|>user\n{}<|im_end|>"  # what "auto" must resolve to for it (written out, not imported)

def tiny_chat_llm(path, seed=0):
    """tiny_llm's shape with a ChatML tokenizer (tests/chat_tokenizers.py)."""
    import transformers
    vocab = chatml_tokenizer(str(path))
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaModel(cfg).save_pretrained(path)
    return str(path)

@pytest.fixture(scope="module")
def chat(tiny):
    """The chat LLM and its caches of the test manifest, made with template auto and none."""
    d = tiny["dir"] / "chat"
    llm = tiny_chat_llm(d / "llm")
    for t in ("auto", "none"):
        run("embed_cache.py", model=llm, manifest=tiny["manifest"], out_dir=d / f"cache_{t}", template=t, batch_size=4)
    return dict(dir=d, llm=llm, caches={t: str(d / f"cache_{t}") for t in ("auto", "none")})

def cache_run(tiny, chat, out, check=True, **kw):
    return run("embed_cache.py", check=check, model=chat["llm"], manifest=tiny["manifest"], out_dir=out, batch_size=4, **kw)

def test_cache_records_the_resolved_template(tiny, chat):
    meta = {t: json.load(open(os.path.join(chat["caches"][t], "meta.json"))) for t in ("auto", "none")}
    assert meta["auto"]["template"] == CHATML and meta["none"]["template"] == ""
    assert json.load(open(os.path.join(tiny["cache"], "meta.json")))["template"] == ""  # no chat tokens: no wrap
    r = cache_run(tiny, chat, chat["caches"]["auto"], check=False, template="none")  # resume with another template
    assert r.returncode != 0 and "an existing cache made with other template" in r.stderr, r.stderr[-2000:]
    old = chat["dir"] / "cache_old"  # a meta.json from before templates: no key, which reads as no wrap
    shutil.copytree(chat["caches"]["none"], old)
    write_json(str(old / "meta.json"), {k: v for k, v in meta["none"].items() if k != "template"})
    assert "complete already" in cache_run(tiny, chat, old, template="none").stdout
    r = cache_run(tiny, chat, old, check=False, template="auto")
    assert r.returncode != 0 and "an existing cache made with other template" in r.stderr, r.stderr[-2000:]

REFERENCE = """import sys
sys.path.insert(0, {root!r})
import numpy as np, torch
import embedder as EM
import llama as LM
import model as M
from manifest import Manifest
llm, tok, man = LM.Llama.from_pretrained({llm!r}).eval(), M.load_tokenizer({llm!r}), Manifest({manifest!r})
for f in man.fields:  # the call embed_cache.py made before templates existed (one chunk per field here)
    np.save({out!r} + "/" + f + ".npy", EM.embed_texts(llm, tok, man.texts(f), "", 512, 4).to(torch.float16).numpy())
"""

def test_template_none_writes_the_bytes_of_before(tiny, chat, tmp_path):
    script = tmp_path / "reference.py"
    script.write_text(REFERENCE.format(root=ROOT, llm=chat["llm"], manifest=tiny["manifest"], out=str(tmp_path)))
    run(str(script))  # a process of its own with one thread, as embed_cache.py's
    for f in ("short", "long", "de"):
        before = np.load(tmp_path / f"{f}.npy")
        none = np.load(os.path.join(chat["caches"]["none"], f"{f}.npy"))
        assert none.tobytes() == before.tobytes(), f
        auto = np.load(os.path.join(chat["caches"]["auto"], f"{f}.npy")).astype(np.float32)
        assert np.abs(auto - before.astype(np.float32)).max() > 1e-2  # the wrap changes the embeddings

def test_stage2_template_from_text_json_must_match_the_cache(tiny, chat):
    import evaluate as E
    s2 = tiny_stage2(chat["dir"] / "stage2", tiny["clip"], chat["llm"], template=CHATML)
    text = E.StageTwoText(s2, "cpu")
    e = text.llm_embed(Manifest(tiny["manifest"]).texts("long")).numpy()  # the LLM path wraps as text.json says
    np.testing.assert_allclose(e, np.load(os.path.join(chat["caches"]["auto"], "long.npy")).astype(np.float32), atol=2e-3)
    assert np.abs(e - np.load(os.path.join(chat["caches"]["none"], "long.npy")).astype(np.float32)).max() > 1e-2
    text.check_cache(chat["caches"]["auto"])
    r = evaluate(tiny, "x", check=False, model=s2, cache=chat["caches"]["none"])
    assert r.returncode != 0 and f"{chat['caches']['none']}/meta.json (how the cache was embedded) has template '', " \
        f"but {s2}/text.json (how the adaptor's training embeddings were made) has template {CHATML!r}" in r.stderr, \
        r.stderr[-2000:]
    plain = tiny_stage2(chat["dir"] / "stage2_plain", tiny["clip"], chat["llm"])  # text.json without a template
    r = evaluate(tiny, "x", check=False, model=plain, cache=chat["caches"]["auto"])
    assert r.returncode != 0 and f"(how the cache was embedded) has template {CHATML!r}, but" in r.stderr, \
        r.stderr[-2000:]

def test_stage2_training_carries_the_caches_template(tiny, chat, tmp_path):
    run("train_stage2.py", method="llm2clip", manifest=tiny["manifest"], clip=tiny["clip"], llm=chat["llm"],
        cache=chat["caches"]["auto"], out_dir=tmp_path / "s2", batch_size=4, max_steps=1, warmup_steps=0,
        embed_dim=16, num_workers=0, log_interval=1)
    info = json.load(open(tmp_path / "s2" / "model" / "text.json"))
    assert info["template"] == CHATML and info["instruction"] == "" and info["max_length"] == 512
    res, _ = evaluate(tiny, "chat_stage2", model=tmp_path / "s2" / "model", cache=chat["caches"]["auto"])
    assert res["template"] == CHATML and "short_i2t_r1" in res["results"]

def test_llm_mode_wraps_the_c2c_captions(tiny, chat):
    auto, r = evaluate(tiny, "chat_llm", model=chat["llm"], cupl="")
    none, _ = evaluate(tiny, "chat_llm_none", model=chat["llm"], cupl="", template="none")
    assert auto["template"] == CHATML and none["template"] == "" and "caption template 'auto': " in r.stdout
    llm, tok = LM.Llama.from_pretrained(chat["llm"]).eval(), M.load_tokenizer(chat["llm"])
    records = [json.loads(line) for line in open(tiny["manifest"])]
    texts = [t for r in records for t in r["captions"]["long"]]
    group = [i for i, r in enumerate(records) for _ in r["captions"]["long"]]
    instruction = auto["config"]["instruction"]
    for res, tmpl in ((auto, CHATML), (none, "")):
        q, g = EM.embed_texts(llm, tok, texts, instruction, template=tmpl), EM.embed_texts(llm, tok, texts, template=tmpl)
        assert res["results"]["c2c_top1_long"] == pytest.approx(brute_force_c2c(q, g, group), abs=1e-6)

def test_stage1_wraps_queries_and_keys(tiny, chat, monkeypatch):
    import train_stage1 as S1
    calls, tokenize = [], EM.tokenize_for_embedding
    def recording(tok, texts, instruction="", max_length=512, template=""):
        calls.append((instruction, template))
        return tokenize(tok, texts, instruction, max_length, template)
    monkeypatch.setattr(EM, "tokenize_for_embedding", recording)
    llm, tok = LM.Llama.from_pretrained(chat["llm"]), M.load_tokenizer(chat["llm"])
    records = [json.loads(line) for line in open(tiny["manifest"])]
    loss = S1.llm2clip_step(llm, tok, EM.caption_template(tok, S1.template), records, list(range(4)),
                            np.random.default_rng(0), slice(0, 4), "cpu")
    assert calls == [(S1.instruction, CHATML), ("", CHATML)] and torch.isfinite(loss)

# -----------------------------------------------------------------------------
# attention (bidirectional or causal) through the scripts: stage 1 records it, the others follow or refuse

def test_causal_attention_from_stage1_to_evaluation(tiny, chat, tmp_path):
    s1 = tmp_path / "s1"
    run("train_stage1.py", method="llm2clip", manifest=tiny["manifest"], model=chat["llm"], out_dir=s1,
        attention="causal", pairs="short:long", batch_size=4, max_steps=1, warmup_steps=0, dtype="float32")
    merged = str(s1 / "merged")
    assert json.load(open(s1 / "merged" / "embedder.json")) == dict(
        attention="causal", template=CHATML, instruction="Given a caption, retrieve a similar relevant caption.",
        max_length=512, pooling="mean")
    # embedding it otherwise than stage 1 trained it is refused, naming the file and the setting
    r = run("embed_cache.py", check=False, model=merged, manifest=tiny["manifest"], out_dir=tmp_path / "c_bi", batch_size=4)
    assert r.returncode != 0 and f"this run has attention 'bidirectional', but {merged}/embedder.json (how stage 1 " \
        f"trained this LLM) has attention 'causal'; set attention='causal'" in r.stderr, r.stderr[-2000:]
    r = run("embed_cache.py", check=False, model=merged, manifest=tiny["manifest"], out_dir=tmp_path / "c_none",
            batch_size=4, attention="causal", template="none")
    assert r.returncode != 0 and f"{merged}/embedder.json (how stage 1 trained this LLM) has template" in r.stderr, \
        r.stderr[-2000:]
    r = evaluate(tiny, "x", check=False, model=merged, cupl="")
    assert r.returncode != 0 and "(how stage 1 trained this LLM) has attention 'causal'" in r.stderr, r.stderr[-2000:]
    # the cache records it, and its rows are those of the causal model (not of the bidirectional one)
    cache = tmp_path / "c"
    run("embed_cache.py", model=merged, manifest=tiny["manifest"], out_dir=cache, batch_size=4, attention="causal")
    assert json.load(open(cache / "meta.json"))["attention"] == "causal"
    texts, tok = Manifest(tiny["manifest"]).texts("long"), M.load_tokenizer(merged)
    rows = np.load(cache / "long.npy").astype(np.float32)
    for causal, close in ((True, True), (False, False)):
        e = EM.embed_texts(LM.Llama.from_pretrained(merged, causal=causal).eval(), tok, texts, template=CHATML).numpy()
        assert (np.abs(rows - e).max() < 2e-3) == close
    # stage 2 carries it into text.json; its LLM path embeds causally; a bidirectional cache is refused
    run("train_stage2.py", method="llm2clip", manifest=tiny["manifest"], clip=tiny["clip"], llm=merged, cache=cache,
        out_dir=tmp_path / "s2", batch_size=4, max_steps=1, warmup_steps=0, embed_dim=16, num_workers=0, log_interval=1)
    s2 = str(tmp_path / "s2" / "model")
    assert json.load(open(os.path.join(s2, "text.json")))["attention"] == "causal"
    import evaluate as E
    np.testing.assert_allclose(E.StageTwoText(s2, "cpu").llm_embed(texts).numpy(), rows, atol=2e-3)
    bi = tmp_path / "c_bi_meta"  # a cache that says bidirectional (otherwise the same)
    shutil.copytree(cache, bi)
    meta = json.load(open(bi / "meta.json"))
    # a meta.json from before attention was recorded: read_spec reads it as bidirectional
    write_json(str(bi / "meta.json"), {k: v for k, v in meta.items() if k != "attention"})
    r = evaluate(tiny, "x", check=False, model=s2, cache=bi)
    assert r.returncode != 0 and "(how the cache was embedded) has attention 'bidirectional', but" in r.stderr, \
        r.stderr[-2000:]
    res, _ = evaluate(tiny, "causal_stage2", model=s2, cache=cache)
    assert "long_i2t_r1" in res["results"] and res["attention"] == "causal"
