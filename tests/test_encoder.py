"""encoder.py on tiny random models: load_encoder's embeddings against the models' own parts run
here (the tower on eval_transform's pixels; the adaptor over embed_texts' rows rounded as a cache
stores them; CLIP's text tower), for paths, PIL images and a manifest alike; the same R@1 as
evaluate.py's JSON; the cache path through the same adaptor call (slow: it runs embed_cache.py);
the LLM path and dtype read from text.json; the refusals; evaluate.py's refusal to overwrite a
file it did not write."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import embedder as EM
import evaluate as E
import llama as LM
import model as M
from encoder import as_cached, load_encoder
from images import eval_transform
from manifest import Manifest, caption_rows
from test_evaluate import N, tiny_stage2, write_eval_manifest
from tiny import evaluate_in_process, run_script, tiny_clip, tiny_llm
from train_common import write_json

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoder")
    manifest, classes = write_eval_manifest(str(d))
    llm, clip = tiny_llm(d / "llm"), tiny_clip(d / "clip")
    return dict(dir=d, manifest=manifest, llm=llm, clip=clip,
                stage2=tiny_stage2(d / "stage2", clip, llm),
                images=[str(d / f"{i}.png") for i in range(N)])

def reference_images(tower_path, paths):
    vit = M.ViT.from_pretrained(tower_path).eval()
    with torch.no_grad():
        return F.normalize(vit(torch.stack([eval_transform(Image.open(p), vit.preprocess)
                                            for p in paths])), dim=-1)

# -----------------------------------------------------------------------------
# the embeddings, against the models' parts

def test_stage2_encoder_matches_its_parts(tiny):
    enc = load_encoder(tiny["stage2"], device="cpu", batch_size=5)  # batches smaller than the sets
    assert enc.kind == "stage2" and enc.text.dtype == "float32"  # no training cache: fp32 on a CPU
    img = enc.encode_images(tiny["images"])
    assert img.dtype == torch.float32 and img.shape == (N, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(N))
    torch.testing.assert_close(img, reference_images(tiny["stage2"], tiny["images"]),
                               atol=1e-6, rtol=0)
    pil = [Image.open(p) for p in tiny["images"]]
    torch.testing.assert_close(enc.encode_images(pil), img, atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode_images(Manifest(tiny["manifest"])), img, atol=1e-6,
                               rtol=0)
    texts = caption_rows(Manifest(tiny["manifest"]), "long")[0] + ["Ein rotes Kleid, oben links."]
    txt = enc.encode_texts(texts)
    llm, tok = LM.Llama.from_pretrained(tiny["llm"]).eval(), M.load_tokenizer(tiny["llm"])
    adaptor = M.Adaptor.from_pretrained(tiny["stage2"]).eval()
    with torch.no_grad():
        e = EM.embed_texts(llm, tok, texts)
        cached = F.normalize(e.half().float(), dim=-1)  # as a cache stores it, evaluate reads it
        torch.testing.assert_close(txt, F.normalize(adaptor(cached), dim=-1), atol=1e-6, rtol=0)
        before = F.normalize(adaptor(e), dim=-1)  # the LLM path before as_cached: fp16 apart
    assert 0 < (txt - before).abs().max() < 2e-3
    assert enc.logit_scale == pytest.approx(100.0) and enc.logit_bias is None

def test_clip_encoder_matches_its_parts(tiny):
    enc = load_encoder(tiny["clip"], device="cpu", batch_size=3)
    assert enc.kind == "clip"
    torch.testing.assert_close(enc.encode_images(tiny["images"]),
                               reference_images(tiny["clip"], tiny["images"]), atol=1e-6, rtol=0)
    texts = ["a red shirt", "a small blue bag on the left of a white coat and a black boot", "a"]
    tower = M.CLIPTextTower.from_pretrained(tiny["clip"]).eval()
    tok = M.load_tokenizer(tiny["clip"])
    with torch.no_grad():
        ref = F.normalize(tower(*tower.tokenize(tok, texts)), dim=-1)
    torch.testing.assert_close(enc.encode_texts(texts), ref, atol=1e-6, rtol=0)
    want = math.exp(M.read_logit_scale(tiny["clip"]).item())
    assert enc.logit_scale == pytest.approx(want) and enc.logit_bias is None
    with pytest.raises(TypeError, match="a list of texts"):
        enc.encode_texts("a red shirt")

def test_same_r1_as_evaluate(tiny):
    """R@1 from the encoder's rows and evaluate.retrieval_recall equals evaluate.py's JSON."""
    man = Manifest(tiny["manifest"])
    texts, image = caption_rows(man, "long")
    rows, owners = E.distinct_captions(texts, image)
    for name in ("stage2", "clip"):
        res = evaluate_in_process(tiny["dir"] / f"{name}.json", model=tiny[name],
                           manifest=tiny["manifest"], retrieval="long",
                           multilingual="", multilingual_unseen="", classes="", c2c_field="",
                           batch_size=4)["results"]
        enc = load_encoder(tiny[name], device="cpu")
        r = E.retrieval_recall(enc.encode_images(man), enc.encode_texts([texts[i] for i in rows]),
                               owners)
        assert {k: res[f"long_{k}"] for k in r} == r, name

@pytest.mark.slow
def test_cache_path_gives_the_encoders_embeddings(tiny):
    """A cache's rows through evaluate.py's path (encoder.as_cached, StageTwoText.joint) equal the
    encoder's embeddings of the same captions, and so do the R@1 of evaluate.py with the
    cache."""
    cache = tiny["dir"] / "cache"
    run_script("embed_cache.py", dict(model=tiny["llm"], manifest=tiny["manifest"], out_dir=cache),
               env={"CUDA_VISIBLE_DEVICES": ""})
    enc, man = load_encoder(tiny["stage2"], device="cpu"), Manifest(tiny["manifest"])
    text = E.StageTwoText(tiny["stage2"], "cpu")  # evaluate.py's: encoder's, plus the cache
    for f in ("short", "long", "de"):
        e, joint = text.field(man, f, str(cache))
        texts = caption_rows(man, f)[0]
        torch.testing.assert_close(e, enc.text.llm_embed(texts), atol=1e-3, rtol=0)
        torch.testing.assert_close(joint, enc.encode_texts(texts), atol=1e-3, rtol=0)
    res = evaluate_in_process(tiny["dir"] / "cached.json", model=tiny["stage2"], cache=str(cache),
                       manifest=tiny["manifest"],
                       retrieval="short,long", multilingual="de", multilingual_unseen="",
                       classes="", c2c_field="")["results"]
    img = enc.encode_images(man)
    for f in ("short", "long", "de"):
        texts, image = caption_rows(man, f)
        rows, owners = E.distinct_captions(texts, image)
        r = E.retrieval_recall(img, enc.encode_texts([texts[i] for i in rows]), owners)
        assert {k: res[f"{f}_{k}"] for k in r} == r, f

def test_as_cached_is_what_a_cache_holds():
    e = F.normalize(torch.randn(7, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    stored = e.numpy().astype(np.float16)  # embed_cache.py's rows
    torch.testing.assert_close(as_cached(e), F.normalize(torch.from_numpy(stored).float(), dim=-1),
                               atol=0, rtol=0)
    torch.testing.assert_close(as_cached(torch.from_numpy(stored)), as_cached(e), atol=0, rtol=0)

# -----------------------------------------------------------------------------
# text.json's LLM path and dtype; refusals

def test_relative_llm_path_and_training_dtype_from_text_json(tiny, tmp_path, monkeypatch):
    """A stage-2 run started in run/ wrote out/s2/model/text.json naming models/llm and its cache
    out/cache: loaded from elsewhere, both are found from run/, and the LLM runs in the cache's
    dtype."""
    run = tmp_path / "run"
    model = run / "out" / "s2" / "model"
    shutil.copytree(tiny["stage2"], model)
    shutil.copytree(tiny["llm"], run / "models" / "llm")
    info = json.load(open(model / "text.json"))
    write_json(str(model / "text.json"), {**info, "llm": "models/llm",
                                          "config": {"out_dir": "out/s2", "cache": "out/cache"}})
    monkeypatch.chdir(tmp_path)
    enc = load_encoder(str(model), device="cpu")
    assert enc.text.llm_path == str(run / "models" / "llm") and enc.text.dtype == "float32"
    os.makedirs(run / "out" / "cache")
    write_json(str(run / "out" / "cache" / "meta.json"), {"compute_dtype": "bfloat16"})
    enc = load_encoder(str(model), device="cpu")
    assert enc.text.dtype == "bfloat16"
    assert load_encoder(str(model), device="cpu", dtype="float32").text.dtype == "float32"
    e = enc.encode_texts(["a red shirt"])
    assert e.dtype == torch.float32 and abs(e.norm().item() - 1) < 1e-5
    shutil.rmtree(run / "models")  # nowhere to be found: the error names it and the way out
    with pytest.raises(FileNotFoundError, match="models/llm: the LLM of .* pass --llm="):
        load_encoder(str(model), device="cpu")

def test_refusals(tiny, tmp_path):
    with pytest.raises(ValueError, match="an LLM alone .* has no image tower"):
        load_encoder(tiny["llm"], device="cpu")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a model folder this project knows .*'bert'"):
        load_encoder(str(tmp_path / "bert"), device="cpu")
    other = tiny_llm(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=f"{other}: not the LLM .* was trained with"):
        load_encoder(tiny["stage2"], llm=other, device="cpu")
    with pytest.raises(ValueError, match="llm=.* is for stage-2 models"):
        load_encoder(tiny["clip"], llm=tiny["llm"], device="cpu")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    enc = load_encoder(tiny["clip"], device="cpu")
    with pytest.raises(ValueError, match=f"cannot read image {bad}: "):
        enc.encode_images([tiny["images"][0], str(bad)])

def test_evaluate_does_not_overwrite_a_file_it_did_not_write(tiny, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"results": "mine"}))
    settings = dict(model=tiny["clip"], manifest=tiny["manifest"], retrieval="long",
                    multilingual="", multilingual_unseen="", classes="", c2c_field="")
    with pytest.raises(ValueError, match=f"out='{notes}': the file exists and is not an "
                       "evaluate.py output .*no 'name'.*--overwrite=True"):
        evaluate_in_process(notes, **settings)
    assert json.loads(notes.read_text()) == {"results": "mine"}
    first = evaluate_in_process(tmp_path / "e.json", **settings)  # its own output: replaced
    again = evaluate_in_process(tmp_path / "e.json", **settings)
    assert again["results"] == first["results"]
    assert "results" in evaluate_in_process(notes, overwrite=True, **settings)
