"""SiglipViT and load_image_tower against transformers: tiny random HF SigLIP / CLIP models saved with
save_pretrained, loaded through model.py's loaders, compared in fp32 on CPU at test_model's tolerance
(1e-5). `pytest -s` prints every measured max error."""

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import model as M  # noqa: E402
from images import CLIP_MEAN, CLIP_STD, ImagePreprocess  # noqa: E402
from test_model import _copy_folder, clip_config, close, randomize  # noqa: E402

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=40, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
            max_position_embeddings=8, pad_token_id=1, bos_token_id=98, eos_token_id=99)

@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory):
    """A SiglipModel folder (what SigLIP and fixed-resolution SigLIP 2 checkpoints are)."""
    path = str(tmp_path_factory.mktemp("siglip"))
    hf = randomize(transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)).eval())
    hf.save_pretrained(path)
    return path, hf

@pytest.fixture(scope="module")
def siglip_vision(tmp_path_factory):
    """A SiglipVisionModel folder of another shape (patch 4, 6 heads, 3 layers) with exact GELU: hidden_act
    comes from the config (SiglipModel's default tanh GELU is 1.6e-4 away from it here)."""
    path = str(tmp_path_factory.mktemp("siglip_vision"))
    cfg = transformers.SiglipVisionConfig(hidden_size=36, intermediate_size=60, num_hidden_layers=3,
                                          num_attention_heads=6, image_size=24, patch_size=4, hidden_act="gelu")
    hf = randomize(transformers.SiglipVisionModel(cfg).eval(), seed=1)
    hf.save_pretrained(path)
    return path, hf

@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)  # the same inputs, so the same printed errors, every run

def check_siglip(ours, hf_vision, x, what, **kw):
    with torch.no_grad():
        ref = hf_vision(pixel_values=x, **kw)
        close(ours.forward_features(x), ref.last_hidden_state, f"{what} last_hidden_state")
        close(ours(x), ref.pooler_output, f"{what} pooler_output")

# -----------------------------------------------------------------------------
# parity

def test_siglip_vision_model_matches_hf(siglip_vision):
    path, hf = siglip_vision
    tower = M.SiglipViT.from_pretrained(path).eval()
    check_siglip(tower, hf, torch.randn(3, 3, 24, 24), "SiglipVisionModel")
    assert tower.embed_dim == 36 and tower.config.num_hidden_layers == 3

def test_siglip_model_matches_hf(siglip_model):
    path, hf = siglip_model
    tower = M.SiglipViT.from_pretrained(path).eval()
    x = torch.randn(3, 3, 32, 32)
    check_siglip(tower, hf.vision_model, x, "SiglipModel")
    with torch.no_grad():
        close(tower(x), hf.get_image_features(pixel_values=x).pooler_output, "SiglipModel get_image_features")

@pytest.mark.parametrize("size", [(48, 40), (16, 16)])
def test_siglip_interpolates_position_embeddings(siglip_model, size):
    path, hf = siglip_model
    tower = M.SiglipViT.from_pretrained(path).eval()
    check_siglip(tower, hf.vision_model, torch.randn(2, 3, *size), f"SigLIP at {size[0]}x{size[1]}",
                 interpolate_pos_encoding=True)

def test_siglip_vision_folder_with_prefix(siglip_vision, tmp_path):
    """transformers 4.x saved SiglipVisionModel with a `vision_model.` prefix (the hub's files), 5.x without."""
    path, hf = siglip_vision
    sd = load_file(os.path.join(path, "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in sd)  # what this transformers writes
    old = _copy_folder(path, tmp_path / "old", {f"vision_model.{k}": v for k, v in sd.items()})
    check_siglip(M.SiglipViT.from_pretrained(old).eval(), hf, torch.randn(2, 3, 24, 24), "prefixed SiglipVisionModel")

def test_siglip_sharded_folder_and_logits(siglip_model, tmp_path):
    path, hf = siglip_model
    assert torch.equal(M.read_logit_scale(path), hf.logit_scale.detach())
    assert torch.equal(M.read_logit_bias(path), hf.logit_bias.detach())
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert torch.equal(M.read_logit_scale(str(tmp_path)), hf.logit_scale.detach())
    assert torch.equal(M.read_logit_bias(str(tmp_path)), hf.logit_bias.detach())
    check_siglip(M.SiglipViT.from_pretrained(str(tmp_path)).eval(), hf.vision_model, torch.randn(2, 3, 32, 32),
                 "sharded SiglipModel")

def test_siglip_dtype(siglip_model):
    tower = M.SiglipViT.from_pretrained(siglip_model[0], dtype=torch.bfloat16)
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    assert tower(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16

# -----------------------------------------------------------------------------
# load_image_tower

@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip"))
    hf = randomize(transformers.CLIPModel(clip_config()).eval())
    hf.save_pretrained(path)
    return path, hf

def test_load_image_tower_clip_model(clip_model):
    path, hf = clip_model
    tower = M.load_image_tower(path).eval()
    assert type(tower) is M.ViT and tower.embed_dim == 24
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(tower(x), hf.get_image_features(pixel_values=x).pooler_output, "load_image_tower CLIPModel")
    assert M.read_logit_bias(path) is None

def test_load_image_tower_clip_vision_with_projection(tmp_path):
    cfg = clip_config().vision_config
    cfg.projection_dim = 20
    hf = randomize(transformers.CLIPVisionModelWithProjection(cfg).eval())
    hf.save_pretrained(tmp_path)
    tower = M.load_image_tower(str(tmp_path)).eval()
    assert type(tower) is M.ViT and tower.embed_dim == 20
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(tower(x), hf(pixel_values=x).image_embeds, "load_image_tower CLIPVisionModelWithProjection")

@pytest.mark.parametrize("which", ["siglip_model", "siglip_vision"])
def test_load_image_tower_siglip(which, request):
    path, hf = request.getfixturevalue(which)
    tower = M.load_image_tower(path).eval()
    assert type(tower) is M.SiglipViT and tower.embed_dim == {"siglip_model": 48, "siglip_vision": 36}[which]
    s = tower.config.image_size
    check_siglip(tower, getattr(hf, "vision_model", hf), torch.randn(2, 3, s, s), f"load_image_tower {which}")

# -----------------------------------------------------------------------------
# preprocessing

HALF = (0.5, 0.5, 0.5)

def with_weights(src, dst):
    """A copy of the HF folder src (config and weights) to add a preprocessor_config.json to."""
    return _copy_folder(src, dst, load_file(os.path.join(src, "model.safetensors")))

def apply(p: ImagePreprocess, img):
    """What a trainer does with a tower's .preprocess (the reference images.py must match)."""
    resample = Image.Resampling[p.resample.upper()]
    if p.resize == "square":
        img = img.resize((p.size, p.size), resample)
    else:  # shortest side to p.size, centre crop, offsets and sizes rounded as CLIP's own transform
        w, h = img.size
        nw, nh = (p.size, int(p.size * h / w)) if w <= h else (int(p.size * w / h), p.size)
        img = img.resize((nw, nh), resample)
        left, top = int(round((nw - p.crop_size) / 2.0)), int(round((nh - p.crop_size) / 2.0))
        img = img.crop((left, top, left + p.crop_size, top + p.crop_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (x - torch.tensor(p.image_mean).view(3, 1, 1)) / torch.tensor(p.image_std).view(3, 1, 1)

def test_preprocess_defaults_without_processor_file(clip_model, siglip_model):
    clip, siglip = M.load_image_tower(clip_model[0]), M.load_image_tower(siglip_model[0])
    assert clip.preprocess == ImagePreprocess("shortest_side_crop", 32, 32, "bicubic", CLIP_MEAN, CLIP_STD)
    assert siglip.preprocess == ImagePreprocess("square", 32, 32, "bicubic", HALF, HALF)
    assert M.ViT(M.ViTConfig(image_size=64)).preprocess.crop_size == 64  # a tower built from scratch too

def test_preprocess_read_from_hf_processor_files_and_matches_them(clip_model, siglip_model, tmp_path):
    """The folder's processor is read, and `apply` of what was read gives HF's pixels exactly (the PIL
    backends of HF's processors; both resample with Pillow)."""
    sig = with_weights(siglip_model[0], tmp_path / "sig")
    # SigLIP 2's folders say resample 2 (bilinear), SigLIP's 3 (bicubic, the class default)
    sig_proc = transformers.SiglipImageProcessorPil(size={"height": 40, "width": 40}, resample=2)
    sig_proc.save_pretrained(sig)
    clip = with_weights(clip_model[0], tmp_path / "clip")
    clip_proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    clip_proc.save_pretrained(clip)
    cases = [(sig, sig_proc, ImagePreprocess("square", 40, 40, "bilinear", HALF, HALF)),
             (clip, clip_proc, ImagePreprocess("shortest_side_crop", 36, 32, "bicubic", CLIP_MEAN, CLIP_STD))]
    rng = np.random.default_rng(0)
    for path, proc, expected in cases:
        p = M.load_image_tower(path).preprocess
        assert p == expected, p
        # even crop margins only: for an odd one HF's PIL processor floors the offset, OpenAI's transform
        # (its center crop, and images.py) rounds it: the crops then differ by one pixel
        for shape in [(36, 54), (54, 36), (30, 30), (20, 90)]:
            img = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
            ref = proc(images=img, return_tensors="pt")["pixel_values"][0]
            close(apply(p, img), ref, f"{p.resize} preprocessing of a {shape[1]}x{shape[0]} image")

def test_preprocess_old_and_unsupported_processor_files(clip_model, tmp_path):
    clip = with_weights(clip_model[0], tmp_path / "clip")
    file = os.path.join(clip, "preprocessor_config.json")
    with open(file, "w") as f:  # the old CLIPFeatureExtractor format: int sizes
        json.dump({"size": 48, "crop_size": 40, "resample": 3, "image_mean": [0.1, 0.2, 0.3],
                   "image_std": [1, 2, 3]}, f)
    p = M.load_image_tower(clip).preprocess
    assert p == ImagePreprocess("shortest_side_crop", 48, 40, "bicubic", (0.1, 0.2, 0.3), (1, 2, 3))
    with open(file, "w") as f:
        json.dump({"size": {"height": 32, "width": 48}}, f)
    with pytest.raises(ValueError, match=r"preprocessor_config.json: size \{'height': 32, 'width': 48\} is not"):
        M.load_image_tower(clip)
    with open(file, "w") as f:
        json.dump({"size": {"shortest_edge": 32}, "do_center_crop": False}, f)
    with pytest.raises(ValueError, match="do_center_crop false .* is not supported"):
        M.load_image_tower(clip)

# -----------------------------------------------------------------------------
# errors

def test_unsupported_model_type(siglip_model, clip_model, tmp_path):
    path, _ = siglip_model
    for mt in ("gpt2", "siglip2"):
        bad = _copy_folder(path, tmp_path / mt, cfg_edit=lambda c: c.update(model_type=mt))
        msg = (f"{bad}/config.json: model_type '{mt}' is not a supported image tower (supported: clip, clip_vision_model, "
               f"siglip, siglip_vision_model; NaFlex SigLIP 2, model_type siglip2, is not)")
        with pytest.raises(ValueError) as e:
            M.load_image_tower(bad)
        assert str(e.value) == msg
    with pytest.raises(ValueError, match="model_type 'siglip2' is not a SigLIP vision model .*NaFlex SigLIP 2"):
        M.SiglipViT.from_pretrained(str(tmp_path / "siglip2"))
    with pytest.raises(ValueError, match="model_type 'clip' is not a SigLIP vision model"):
        M.SiglipViT.from_pretrained(clip_model[0])
    with pytest.raises(ValueError, match="model_type 'siglip' is not a CLIP vision model"):
        M.ViT.from_pretrained(path)

def test_bad_siglip_folders(siglip_model, tmp_path):
    path, _ = siglip_model
    sd = load_file(os.path.join(path, "model.safetensors"))
    missing = {k: v for k, v in sd.items() if k != "vision_model.head.probe"}
    with pytest.raises(KeyError, match="missing key 'vision_model.head.probe'"):
        M.SiglipViT.from_pretrained(_copy_folder(path, tmp_path / "missing", missing))
    extra = {**sd, "vision_model.embeddings.class_embedding": torch.zeros(48)}
    with pytest.raises(KeyError, match="unexpected key 'vision_model.embeddings.class_embedding'"):
        M.SiglipViT.from_pretrained(_copy_folder(path, tmp_path / "extra", extra))
    stray = {**sd, "visual_projection.weight": torch.zeros(1)}  # SigLIP has none: outside both towers
    with pytest.raises(KeyError, match="unexpected key 'visual_projection.weight'"):
        M.SiglipViT.from_pretrained(_copy_folder(path, tmp_path / "stray", stray))
    shape = {**sd, "vision_model.head.attention.in_proj_weight": torch.zeros(48 * 3, 40)}
    with pytest.raises(ValueError, match=r"key 'vision_model.head.attention.in_proj_weight' has shape \(144, 40\), "
                                         r"the config implies \(144, 48\)"):
        M.SiglipViT.from_pretrained(_copy_folder(path, tmp_path / "shape", shape))
    pos = _copy_folder(path, tmp_path / "pos", sd, lambda c: c["vision_config"].update(image_size=40))
    with pytest.raises(ValueError, match=r"position_embedding.weight' has shape \(16, 48\), the config implies \(25, "):
        M.SiglipViT.from_pretrained(pos)
    nohead = _copy_folder(path, tmp_path / "nohead", sd, lambda c: c["vision_config"].update(vision_use_head=False))
    with pytest.raises(ValueError, match="vision_use_head is false"):
        M.SiglipViT.from_pretrained(nohead)
    with pytest.raises(ValueError, match="image size 30x32 is not a multiple of the patch size 8"):
        M.SiglipViT.from_pretrained(path)(torch.randn(1, 3, 30, 32))
