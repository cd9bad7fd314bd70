"""train_stage2.py on SigLIP towers and with the sigmoid loss (issue 15): a tiny random SigLIP saved with
save_pretrained and the tiny cache of test_stage2.py. The sigmoid loss falls on a fixed batch, a halted and
resumed run ends bit for bit where an uninterrupted one does, two torchrun ranks take the step of one
process with the global batch, the export is an HF SiglipVisionModel folder that transformers and
model.load_image_tower load and agree on, the scale and bias start from the folder's values, and a CLIP
tower trains with the sigmoid loss too. `pytest -s` prints the measured numbers."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

import model as M  # noqa: E402
from images import ImagePreprocess, clip_preprocess, preprocess_config, read_preprocess  # noqa: E402
from tiny import (checkpoint_weights, ranks_vs_global_batch, run_script, tiny_clip, tiny_llm,  # noqa: E402
                  write_images, write_manifest)

pytestmark = pytest.mark.slow  # training runs, two-rank runs

N = 24
SCALE, BIAS = math.log(20.0), -4.0  # the tiny SigLIP's logit scale and bias: neither SigLIP's init nor CLIP's

def tiny_siglip(path, seed=0):
    """A random SiglipModel, 16x16 images in 2x2 patches of 8, its logit scale and bias set to SCALE and BIAS,
    with a SigLIP 2-style processor file (bilinear resize) that the export must keep."""
    torch.manual_seed(seed)
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=50, max_position_embeddings=8, pad_token_id=1, bos_token_id=2, eos_token_id=3))
    hf = transformers.SiglipModel(cfg)
    with torch.no_grad():
        hf.logit_scale.fill_(SCALE)
        hf.logit_bias.fill_(BIAS)
    hf.save_pretrained(path)
    transformers.SiglipImageProcessorPil(size={"height": 16, "width": 16}, resample=2).save_pretrained(path)
    return str(path)

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage2_siglip")
    (d / "data").mkdir()
    manifest = write_manifest(d / "data" / "m.jsonl", n=N)
    write_images(d / "data", N, size=20)  # not the tower's 16: the resize is exercised
    llm = tiny_llm(d / "llm")
    run_script("embed_cache.py", dict(model=llm, manifest=manifest, out_dir=d / "cache"))
    torch.manual_seed(0)
    M.Adaptor.for_method("proclip", 32, 32).save_pretrained(str(d / "stage1"))  # SigLIP's width: 32
    return dict(dir=d, manifest=manifest, llm=llm, cache=str(d / "cache"), siglip=tiny_siglip(d / "siglip"),
                clip=tiny_clip(d / "clip"), stage1=str(d / "stage1"))

def train(setup, out, method="llm2clip", torchrun=0, check=True, tower="siglip", **kw):
    args = dict(method=method, manifest=setup["manifest"], clip=setup[tower], llm=setup["llm"], cache=setup["cache"],
                out_dir=out, loss="sigmoid", batch_size=8, max_steps=5, warmup_steps=2, lr=1e-3, log_interval=1,
                num_workers=0)
    if method == "proclip":
        args["stage1"] = setup["stage1"]
    args.update(kw)
    r = run_script("train_stage2.py", args, torchrun, check)
    log = os.path.join(out, "log.jsonl")
    return r, [json.loads(line) for line in open(log)] if os.path.isfile(log) else []

weights = checkpoint_weights

# -----------------------------------------------------------------------------
# training

def test_sigmoid_loss_falls_and_starts_from_the_folders_scale_and_bias(setup):
    _, log = train(setup, setup["dir"] / "overfit", fixed_batch=True, max_steps=25, lr=3e-3, min_lr=3e-3,
                   warmup_steps=1, layer_decay=1.0)
    first, last = log[0]["sigmoid"], log[-1]["sigmoid"]
    print(f"SigLIP tower, sigmoid loss on a fixed batch: {first:.4f} -> {last:.4f}; after step 1 log s "
          f"{math.log(log[0]['logit_scale']):.4f} (folder {SCALE:.4f}), t {log[0]['logit_bias']:.4f} (folder {BIAS})")
    assert last < 0.5 * first
    # one Adam step moves each by about lr (3e-3): still the folder's values, far from SigLIP's init (log 10, -10)
    assert abs(math.log(log[0]["logit_scale"]) - SCALE) < 0.01 and abs(log[0]["logit_bias"] - BIAS) < 0.01
    assert "infonce" not in log[0] and log[-1]["logit_bias"] != log[0]["logit_bias"]

@pytest.mark.parametrize("method,kw", [("llm2clip", {}), ("proclip", {"distill_lambda": 1.0, "ema_momentum": 0.5})])
def test_resume_gives_the_same_weights(setup, method, kw):
    d = setup["dir"]
    train(setup, d / f"straight_{method}", method, **kw)
    train(setup, d / f"halted_{method}", method, halt_at=2, **kw)
    assert not os.path.exists(d / f"halted_{method}" / "model")  # it really stopped
    train(setup, d / f"halted_{method}", method, **kw)  # resumes from the step-2 checkpoint
    a, b = weights(d / f"straight_{method}"), weights(d / f"halted_{method}")
    assert a.keys() == b.keys() and {"logit_scale", "logit_bias", "vit.vision_model.head.probe"} <= set(a)
    if method == "proclip":
        assert "ema.vision_model.head.probe" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k

def test_two_ranks_equal_one_process_with_the_global_batch(setup):
    """2 ranks x 4 images take the same 3 steps as 1 process x 8 (the sigmoid loss gathers the texts of both
    ranks; the bias is averaged by DDP like every gradient), and 1 process x 4 images ends elsewhere."""
    one, two, moved, change = ranks_vs_global_batch(train, setup, "SigLIP, sigmoid: ")
    assert moved < 1e-5 and change > 1e-4
    assert abs(one["logit_bias"] - two["logit_bias"]).item() < 1e-6 and one["logit_bias"] != BIAS

# -----------------------------------------------------------------------------
# the export

def test_export_is_a_siglip_vision_model_folder(setup):
    """transformers' SiglipVisionModel and model.load_image_tower load the export and agree with each other and
    with the trained weights; the logit scale and bias are the checkpoint's; the preprocessing is the folder's."""
    path = setup["dir"] / "straight_llm2clip" / "model"
    if not os.path.isdir(path):  # made by the resume test, unless run alone
        train(setup, setup["dir"] / "straight_llm2clip")
    path = str(path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["model_type"] == "siglip_vision_model" and cfg["architectures"] == ["SiglipVisionModel"]
    sd = load_file(os.path.join(path, "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in sd)  # the keys as transformers 5 writes them
    hf, info = transformers.SiglipVisionModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) <= {"logit_scale", "logit_bias"}, info
    ours = M.load_image_tower(path).eval()
    assert type(ours) is M.SiglipViT and ours.embed_dim == 32
    ckpt = weights(setup["dir"] / "straight_llm2clip")
    for k, v in ours.state_dict().items():  # the trained weights, exactly
        assert torch.equal(v, ckpt[f"vit.{k}"]), k
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.eval()(pixel_values=x).pooler_output
        err = (ours(x) - ref).abs().max().item()
    print(f"export: our tower vs transformers' SiglipVisionModel, max abs error {err:.2e}")
    assert err <= 1e-5
    assert torch.equal(M.read_logit_scale(path), ckpt["logit_scale"])
    assert torch.equal(M.read_logit_bias(path), ckpt["logit_bias"])
    assert ours.preprocess == M.load_image_tower(setup["siglip"]).preprocess == \
        ImagePreprocess("square", 16, 16, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # HF's processor read from the export gives the pixels the dataset gives evaluate.py
    from images import ImageDataset
    from manifest import Manifest
    ds = ImageDataset(Manifest(setup["manifest"]), preprocess=ours.preprocess, train=False)
    proc = transformers.SiglipImageProcessorPil.from_pretrained(path)
    img = Image.open(os.path.join(os.path.dirname(setup["manifest"]), "0.png"))
    torch.testing.assert_close(ds[0][0], proc(images=img, return_tensors="pt")["pixel_values"][0], atol=1e-6, rtol=0)
    text = json.load(open(os.path.join(path, "text.json")))
    assert text["loss"] == "sigmoid" and text["method"] == "llm2clip"
    assert M.Adaptor.from_pretrained(path).config.out_dim == 32

# -----------------------------------------------------------------------------
# a CLIP tower with the sigmoid loss

def test_clip_tower_with_the_sigmoid_loss(setup):
    """LLM2CLIP on a CLIP folder (fresh projection) and method=clip (a CLIP from scratch), both with the sigmoid
    loss: the scale starts from the CLIP's, the bias from SigLIP's -10 (a CLIP has none); the exports keep the
    bias and load in transformers and in model.py."""
    d = setup["dir"]
    clip_scale = M.read_logit_scale(setup["clip"]).item()
    _, log = train(setup, d / "clip_sigmoid", tower="clip", embed_dim=24, max_steps=3)
    assert abs(math.log(log[0]["logit_scale"]) - clip_scale) < 2e-3 and abs(log[0]["logit_bias"] + 10) < 2e-3
    path = str(d / "clip_sigmoid" / "model")
    vit = M.load_image_tower(path).eval()
    assert type(vit) is M.ViT and vit.embed_dim == 24 and vit.preprocess == clip_preprocess(16)
    assert torch.equal(M.read_logit_bias(path), weights(d / "clip_sigmoid")["logit_bias"])
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(path).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf(pixel_values=x).image_embeds, atol=1e-5, rtol=0)

    _, log = train(setup, d / "clip_own_sigmoid", method="clip", tower="clip", clip="", max_steps=3,
                   tokenizer=setup["clip"], image_size=16, patch_size=8, vision_width=32, vision_layers=1,
                   text_width=32, text_layers=1, context_length=8)
    assert abs(math.log(log[0]["logit_scale"]) - math.log(10)) < 2e-3 and abs(log[0]["logit_bias"] + 10) < 2e-3
    assert len(log) == 3 and all(np.isfinite(e["sigmoid"]) for e in log)
    path = str(d / "clip_own_sigmoid" / "model")
    hf = transformers.CLIPModel.from_pretrained(path).eval()
    assert M.read_logit_bias(path) is not None and abs(hf.logit_scale.item() - M.read_logit_scale(path).item()) < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(M.load_image_tower(path)(x), hf.get_image_features(pixel_values=x).pooler_output,
                                   atol=1e-5, rtol=0)

@pytest.mark.parametrize("p", [ImagePreprocess("shortest_side_crop", 36, 32, "lanczos", (0.1, 0.2, 0.3), (0.3, 0.2, 0.1)),
                               ImagePreprocess("square", 20, 20, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_preprocess_config_round_trip(p, tmp_path):
    """What exports write as preprocessor_config.json: images.py reads back the same ImagePreprocess, and HF's
    processor of that file computes the pixels that test_siglip's reference (and so images.py) computes."""
    from test_siglip import apply
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump(preprocess_config(p), f)
    assert read_preprocess(str(tmp_path), clip_preprocess(224)) == p
    proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))  # even margins
    torch.testing.assert_close(apply(p, img), proc(images=img, return_tensors="pt")["pixel_values"][0], atol=1e-6, rtol=0)

# -----------------------------------------------------------------------------
# settings, groups, errors

def test_initial_logits():
    """The start values of (log s, t) for every loss and kind of folder."""
    import train_stage2 as T
    saved = T.loss, T.logit_scale_init
    try:
        T.logit_scale_init = 0.0
        T.loss = "sigmoid"
        assert T.initial_logits("") == (math.log(10.0), -10.0)  # SigLIP's init
        T.logit_scale_init = 30.0
        assert T.initial_logits("") == (math.log(30.0), -10.0)
        T.loss, T.logit_scale_init = "softmax", 0.0
        assert T.initial_logits("") == (math.log(1 / 0.07), None)
    finally:
        T.loss, T.logit_scale_init = saved

def test_initial_logits_from_folders(setup, tmp_path):
    import train_stage2 as T
    clip_scale = M.read_logit_scale(setup["clip"]).item()
    saved = T.loss
    try:
        T.loss = "sigmoid"
        s, t = T.initial_logits(setup["siglip"])
        assert abs(s - SCALE) < 1e-6 and t == BIAS
        s, t = T.initial_logits(setup["clip"])
        assert abs(s - clip_scale) < 1e-6 and t == -10.0
        T.loss = "softmax"
        s, t = T.initial_logits(setup["siglip"])  # the folder's scale, within softmax's clamp; no bias
        assert abs(s - SCALE) < 1e-6 and t is None
    finally:
        T.loss = saved
    # a SigLIP scale above ln 100 (released ones learned about 112): kept by sigmoid, clamped by softmax
    hf = transformers.SiglipModel.from_pretrained(setup["siglip"])
    with torch.no_grad():
        hf.logit_scale.fill_(4.7215)
    hf.save_pretrained(tmp_path)
    try:
        T.loss = "sigmoid"
        assert abs(T.initial_logits(str(tmp_path))[0] - 4.7215) < 1e-6
        T.loss = "softmax"
        assert T.initial_logits(str(tmp_path))[0] == math.log(100.0)
    finally:
        T.loss = saved

def test_layer_decay_groups_cover_siglip():
    import train_stage2 as T
    tower = M.SiglipViT(M.SiglipViTConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3, num_attention_heads=4))
    net = T.Stage2(tower, M.Adaptor.for_method("llm2clip", 32, 32), 2.0, -10.0)
    saved = T.layer_decay, T.weight_decay
    T.layer_decay, T.weight_decay = 0.5, 0.05
    try:
        groups = {id(p): g for g in T.param_groups(net) for p in g["params"]}
        named = dict(net.named_parameters())
        lr = {n: groups[id(p)]["lr_scale"] for n, p in named.items()}
        wd = {n: groups[id(p)]["weight_decay"] for n, p in named.items()}
        assert sum(len(g["params"]) for g in T.param_groups(net)) == len(named)
    finally:
        T.layer_decay, T.weight_decay = saved
    v = "vit.vision_model."
    assert lr[v + "embeddings.patch_embedding.weight"] == lr[v + "embeddings.position_embedding.weight"] == 0.5 ** 4
    assert lr[v + "encoder.layers.0.mlp.fc1.weight"] == 0.5 ** 3 and lr[v + "encoder.layers.2.self_attn.q_proj.weight"] == 0.5
    for name in (v + "post_layernorm.weight", v + "head.probe", v + "head.attention.in_proj_weight", v + "head.mlp.fc2.weight",
                 "logit_scale", "logit_bias", "text.blocks.0.fc1.weight"):
        assert lr[name] == 1.0, name
    for name in (v + "head.probe", v + "embeddings.position_embedding.weight", v + "embeddings.patch_embedding.weight",
                 v + "embeddings.patch_embedding.bias", v + "head.attention.in_proj_bias", "logit_scale", "logit_bias"):
        assert wd[name] == 0.0, name
    for name in (v + "encoder.layers.0.mlp.fc1.weight", v + "head.attention.in_proj_weight", v + "head.mlp.fc1.weight"):
        assert wd[name] == 0.05, name

def test_errors(setup, tmp_path):
    r, _ = train(setup, tmp_path / "a", method="clip", check=False)
    assert r.returncode != 0 and (f"method=clip trains a CLIP with its own text tower, and clip={setup['siglip']} is a "
                                  f"SigLIP folder: model.py has no SigLIP text tower") in r.stderr, r.stderr[-2000:]
    r, _ = train(setup, tmp_path / "b", embed_dim=64, check=False)
    assert r.returncode != 0 and ("embed_dim 64: a SigLIP tower has no projection, so it keeps its own joint width 32 "
                                  "(hidden_size, the pooled output); set embed_dim=0 or 32") in r.stderr, r.stderr[-2000:]
    import train_stage2 as T
    from configurator import configure
    config = {**configure(dict(vars(T)), []), "loss": "hinge", "out_dir": str(tmp_path / "c")}
    with pytest.raises(ValueError, match="^loss='hinge': must be one of softmax, sigmoid$"):
        T.main(config)  # refused at the top of main, before any work
