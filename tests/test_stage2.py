"""train_stage2.py on tiny models and real (random) image files: the loss falls on a fixed batch for every
method, a halted and resumed run ends with the same weights as an uninterrupted one, two torchrun ranks
take the step of one process with the global batch, the exports load (the base CLIP in transformers too),
and the faults: a corrupt image, a cache of another LLM, a NaN loss."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import model as M
from tiny import (checkpoint_weights, ranks_vs_global_batch, run_script, tiny_clip, tiny_llm, write_images,
                  write_manifest)

pytestmark = pytest.mark.slow  # training runs, two-rank runs

N = 24

def run(args, script="train_stage2.py", torchrun=0, check=True):
    return run_script(script, args, torchrun, check)

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage2")
    (d / "data").mkdir()
    manifest = write_manifest(d / "data" / "m.jsonl", n=N)
    write_images(d / "data", N)
    llm = tiny_llm(d / "llm")
    run(dict(model=llm, manifest=manifest, out_dir=d / "cache"), script="embed_cache.py")
    clip = tiny_clip(d / "clip")
    # a ProCLIP stage-1 adaptor (random: stage 2 only needs its shape)
    torch.manual_seed(0)
    M.Adaptor.for_method("proclip", 32, 16).save_pretrained(str(d / "stage1"))
    return dict(dir=d, manifest=manifest, llm=llm, clip=clip, cache=str(d / "cache"), stage1=str(d / "stage1"))

def train(setup, out, method="llm2clip", torchrun=0, check=True, **kw):
    args = dict(method=method, manifest=setup["manifest"], clip=setup["clip"], llm=setup["llm"], cache=setup["cache"],
                out_dir=out, batch_size=8, max_steps=6, warmup_steps=2, lr=1e-3, embed_dim=16, log_interval=1,
                num_workers=0, tokenizer=setup["clip"], image_size=16, patch_size=8, vision_width=32,
                vision_layers=2, text_width=32, text_layers=2, context_length=8)
    if method == "proclip":
        args["stage1"] = setup["stage1"]
    if method == "clip":
        args["embed_dim"] = 0
    args.update(kw)
    r = run(args, torchrun=torchrun, check=check)
    log = os.path.join(out, "log.jsonl")
    return r, [json.loads(line) for line in open(log)] if os.path.isfile(log) else []

weights = checkpoint_weights

@pytest.mark.parametrize("method,kw", [("llm2clip", {}), ("proclip", {}), ("clip", {"clip": ""})])
def test_loss_falls_on_a_fixed_batch(setup, method, kw):
    _, log = train(setup, setup["dir"] / f"overfit_{method}", method, fixed_batch=True, max_steps=30,
                   lr=3e-3, min_lr=3e-3, warmup_steps=1, layer_decay=1.0, **kw)
    first, last = log[0]["infonce"], log[-1]["infonce"]
    print(f"{method}: InfoNCE {first:.4f} -> {last:.4f}")
    assert last < 0.5 * first

@pytest.mark.parametrize("method,kw", [("llm2clip", {}), ("proclip", {"distill_lambda": 1.0, "ema_momentum": 0.5}),
                                       ("clip", {"clip": ""})])
def test_resume_gives_the_same_weights(setup, method, kw):
    d = setup["dir"]
    os.makedirs(d / f"straight_{method}", exist_ok=True)
    (d / f"straight_{method}" / "log.jsonl").write_text('{"step": 99, "infonce": 9.0}\n')  # a stale log
    _, log = train(setup, d / f"straight_{method}", method, **kw)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # a fresh run starts a new log
    r, _ = train(setup, d / f"halted_{method}", method, halt_at=3, **kw)
    assert not os.path.exists(d / f"halted_{method}" / "model")  # it really stopped
    with open(d / f"halted_{method}" / "log.jsonl", "a") as f:  # as if killed at step 5, mid-line
        f.write('{"step": 4, "infonce": 9.0}\n{"step": 5, "inf')
    _, log = train(setup, d / f"halted_{method}", method, **kw)  # resumes from the step-3 checkpoint
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and log[3]["infonce"] != 9.0  # each step once
    a, b = weights(d / f"straight_{method}"), weights(d / f"halted_{method}")
    assert a.keys() == b.keys()
    if method == "proclip":
        assert any(k.startswith("ema.") for k in a) and not torch.equal(a["ema.visual_projection.weight"],
                                                                       a["vit.visual_projection.weight"])
    for k in a:
        assert torch.equal(a[k], b[k]), k

def test_two_ranks_equal_one_process_with_the_global_batch(setup):
    """2 ranks x 4 images take the same 3 steps as 1 process x 8 images (weights within fp32 rounding),
    and the ranks really split the batch: 1 process x 4 images ends elsewhere."""
    _, _, moved, change = ranks_vs_global_batch(train, setup)
    assert moved < 1e-5 and change > 1e-4

def test_exports_load(setup):
    d = setup["dir"]
    m = M.ViT.from_pretrained(str(d / "straight_llm2clip" / "model"))
    a = M.Adaptor.from_pretrained(str(d / "straight_llm2clip" / "model"))
    assert m.config.projection_dim == a.config.out_dim == 16
    text = json.load(open(d / "straight_llm2clip" / "model" / "text.json"))
    assert text["llm"] == setup["llm"] and text["method"] == "llm2clip"
    # the base CLIP from scratch is an HF CLIPModel folder: transformers reads it and agrees with our towers
    import transformers
    path = str(d / "straight_clip" / "model")
    hf = transformers.CLIPModel.from_pretrained(path).eval()
    tok = M.load_tokenizer(path)
    text_tower, vit = M.CLIPTextTower.from_pretrained(path), M.ViT.from_pretrained(path)
    ids, mask = text_tower.tokenize(tok, ["a red shirt on the left", "a bag"])
    assert all(ids[i, mask[i].sum() - 1] == text_tower.config.eos_token_id for i in range(2))  # CLIP pools there
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, pixel_values=x)
        # CLIPModel returns normalised embeddings
        torch.testing.assert_close(F.normalize(text_tower(ids, mask), dim=-1), out.text_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(F.normalize(vit(x), dim=-1), out.image_embeds, atol=1e-5, rtol=1e-5)
    assert abs(hf.logit_scale.item() - load_file(os.path.join(path, "model.safetensors"))["logit_scale"].item()) < 1e-6

def test_layer_decay_and_weight_decay_groups():
    import train_stage2 as T
    vit = M.ViT(M.ViTConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, projection_dim=16))
    net = T.Stage2(vit, M.Adaptor.for_method("llm2clip", 32, 16), 2.0)
    T.layer_decay, T.weight_decay = 0.5, 0.05
    groups = {id(p): g for g in T.param_groups(net) for p in g["params"]}
    named = dict(net.named_parameters())
    def group(name):
        return groups[id(named[name])]
    assert group("vit.vision_model.embeddings.patch_embedding.weight")["lr_scale"] == 0.5 ** 4
    assert group("vit.vision_model.encoder.layers.0.mlp.fc1.weight")["lr_scale"] == 0.5 ** 3
    assert group("vit.vision_model.encoder.layers.2.mlp.fc1.weight")["lr_scale"] == 0.5
    assert group("vit.visual_projection.weight")["lr_scale"] == 1.0
    assert group("text.blocks.0.fc1.weight")["lr_scale"] == 1.0 and group("logit_scale")["lr_scale"] == 1.0
    assert group("vit.vision_model.encoder.layers.0.mlp.fc1.weight")["weight_decay"] == 0.05
    for name in ("vit.vision_model.embeddings.position_embedding.weight", "vit.vision_model.embeddings.patch_embedding.weight",
                 "vit.vision_model.encoder.layers.0.mlp.fc1.bias", "vit.vision_model.post_layernorm.weight", "logit_scale"):
        assert group(name)["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in T.param_groups(net)) == len(named)
    T.adaptor_lr_scale = 0.1  # the adaptor alone moves to its own scale
    try:
        groups = {id(p): g for g in T.param_groups(net) for p in g["params"]}
        assert group("text.blocks.0.fc1.weight")["lr_scale"] == 0.1 and group("text.blocks.0.fc1.bias")["lr_scale"] == 0.1
        assert group("logit_scale")["lr_scale"] == 1.0 and group("vit.visual_projection.weight")["lr_scale"] == 1.0
    finally:
        T.adaptor_lr_scale = 1.0

def test_corrupt_image(setup, tmp_path):
    """Stop naming the file and its line; with skip_bad=True replace it by the next readable image (line 7),
    list it, and train on."""
    d = tmp_path / "data"
    d.mkdir()
    manifest = write_manifest(d / "m.jsonl", n=N)
    write_images(d, N)
    (d / "5.png").write_bytes(b"not a png")
    s = dict(setup, manifest=manifest)
    run(dict(model=setup["llm"], manifest=manifest, out_dir=tmp_path / "cache"), script="embed_cache.py")
    s["cache"] = str(tmp_path / "cache")
    r, _ = train(s, tmp_path / "strict", max_steps=12, check=False)
    assert r.returncode != 0 and "5.png" in r.stderr and "m.jsonl:6" in r.stderr, r.stderr[-2000:]
    r, _ = train(s, tmp_path / "skip", max_steps=12, skip_bad=True)
    assert "skipping 1 image(s)" in r.stdout and "line 6" in r.stdout and "5.png" in r.stdout
    assert os.path.isdir(tmp_path / "skip" / "model")

def test_cache_of_another_llm_is_refused(setup, tmp_path):
    other = tiny_llm(tmp_path / "other", seed=1)
    r, _ = train(setup, tmp_path / "out", llm=other, check=False)
    assert r.returncode != 0 and "made by another model" in r.stderr and setup["cache"] in r.stderr

def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path):
    """A NaN in the cache is refused when the cache is opened, before any step (naming the cache, the
    field and the first row). A loss that turns NaN mid-run (here: lr=1e30 blows the weights up
    after the first update) stops at that step, before the update, and the last checkpoint (the
    step before) is intact and finite."""
    import re
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    arr = np.load(cache / "long.npy", mmap_mode="r+")
    arr[5] = np.nan
    arr.flush()
    del arr
    r, _ = train(dict(setup, cache=str(cache)), tmp_path / "nan_cache", check=False)
    assert r.returncode != 0 and f"{cache / 'long.npy'}: 1 row(s) of field 'long' hold NaN or " \
        "infinity, the first row 5" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "nan_cache" / "ckpt")
    r, log = train(setup, tmp_path / "run", ckpt_interval=1, lr=1e30, check=False)
    m = re.search(r"step (\d+): loss \S+ and gradient norm \S+ on rank 0; stopped before the "
                  r"update\. This rank's batch: \S+ lines [\d, ]+; cache \S+ rows ", r.stderr)
    assert r.returncode != 0 and m and "last good checkpoint" in r.stderr, r.stderr[-2000:]
    k = int(m.group(1))
    state = json.load(open(tmp_path / "run" / "ckpt" / "state.json"))
    assert k >= 2 and state["step"] == k - 1 and [e["step"] for e in log] == list(range(1, k))
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())
    assert not os.path.exists(tmp_path / "run" / "model")

def test_evaluate_stage2_model_with_and_without_cache(setup, tmp_path):
    """evaluate.py on a stage-2 export: the cached embeddings and the LLM run on the texts give the same
    metrics (the cache is fp16), and the tiny base CLIP evaluates through its own text tower."""
    for method, kw in (("llm2clip", {}), ("clip", {"clip": ""})):  # made by the resume test, unless run alone
        if not os.path.isdir(setup["dir"] / f"straight_{method}" / "model"):
            train(setup, setup["dir"] / f"straight_{method}", method, **kw)
    model = setup["dir"] / "straight_llm2clip" / "model"
    common = dict(manifest=setup["manifest"], classes="", multilingual="", multilingual_unseen="", batch_size=8)
    res = {}
    for name, extra in (("cache", {"cache": setup["cache"]}), ("llm", {})):
        run(dict(model=model, out=tmp_path / f"{name}.json", **common, **extra), script="evaluate.py")
        res[name] = json.load(open(tmp_path / f"{name}.json"))["results"]
    assert {"short_i2t_r1", "long_t2i_r10", "c2c_top1", "c2c_llm_top1"} <= set(res["cache"])
    for k in res["llm"]:
        assert abs(res["cache"][k] - res["llm"][k]) < 1e-3, (k, res)
    run(dict(model=setup["dir"] / "straight_clip" / "model", out=tmp_path / "clip.json", **common), script="evaluate.py")
    assert "long_i2t_r1" in json.load(open(tmp_path / "clip.json"))["results"]
    other = tiny_llm(tmp_path / "other", seed=1)
    r = run(dict(model=model, llm=other, cache=setup["cache"], out=tmp_path / "x.json", **common),
            script="evaluate.py", check=False)
    assert r.returncode != 0 and "not the LLM" in r.stderr
