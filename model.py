"""
Models for LLM2CLIP and ProCLIP, in one file, with no training code:

- ViT            the CLIP image tower (HF `CLIPVisionModelWithProjection` key layout)
- CLIPTextTower  the CLIP text tower (HF `CLIPTextModelWithProjection` key layout)
- SiglipViT      the SigLIP / fixed-resolution SigLIP 2 image tower (HF `SiglipVisionModel` key
                 layout); `load_image_tower(path)` picks ViT or SiglipViT by the folder's model_type
- Llama, LoRA    the LLM as a text encoder, and low-rank adapters on it: llama.py
- Adaptor        LLM embedding -> CLIP joint space (LLM2CLIP: 4 blocks, 2x; ProCLIP: 1 block, 8x)

Module names copy the Hugging Face checkpoint keys, so loading is a key-for-key copy with every key
and shape checked. Only safetensors are read: a pickle can run code. `transformers` is imported only
where a tokenizer is needed (`load_tokenizer`), never to build or load a model.

Output conventions (what outside code can rely on):
    ViT(pixel_values)                        -> (B, proj_dim)  projected pooled embedding,
                                                               not normalised
    SiglipViT(pixel_values)                  -> (B, hidden)    attention-pooled embedding,
                                                               not normalised
    CLIPTextTower(input_ids, attention_mask) -> (B, proj_dim)  projected pooled EOS embedding
Caption embedding (template, instruction, pooling) lives in embedder.py; every file written here is
swapped in whole by train_common.atomic_write.
"""

import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from images import clip_preprocess, preprocess_config, read_preprocess, siglip_preprocess
from train_common import atomic_write, write_json

# -----------------------------------------------------------------------------
# configs: only what the forward pass needs, read from HF config.json files

@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # OpenAI checkpoints use quick_gelu; many others gelu
    projection_dim: int = 512

@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    max_position_embeddings: int = 77  # the context limit: the reason LLM2CLIP exists
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512
    eos_token_id: int = 49407  # 2 means "old HF config": pool at argmax(input_ids), as HF does

@dataclass
class AdaptorConfig:
    in_dim: int = 2048   # LLM hidden size
    out_dim: int = 1280  # joint width: LLM2CLIP re-initialises the projection to 1280; ProCLIP
                         # keeps CLIP's
    n_blocks: int = 4    # LLM2CLIP 4, ProCLIP 1
    expansion: int = 2   # LLM2CLIP 2, ProCLIP 8

ADAPTOR_PRESETS = {
    "llm2clip": dict(n_blocks=4, expansion=2),
    "proclip": dict(n_blocks=1, expansion=8),
}

def _from_dict(cls, d):
    """Build a config dataclass from an HF config dict: known keys only, HF's defaults for the
    rest."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})

# -----------------------------------------------------------------------------
# checkpoint reading: safetensors only, every key and shape checked

def _read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face model folder)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json")
    with open(cfg_path) as f:
        return json.load(f)

def _read_safetensors(path):
    """All tensors of an HF folder: model.safetensors, or the shards named by
    model.safetensors.index.json."""
    from safetensors.torch import load_file
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{index}: names shard {shard}, which does not exist")
            sd.update(load_file(shard_path))
        return sd
    pickled = [n for n in sorted(os.listdir(path)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to "
            f"safetensors)" if pickled else "")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")

def _load_into(model, sd, where):
    """Copy a state dict into a model built on the meta device; every key and shape must match
    exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise KeyError(f"{where}: missing key {missing[0]!r}" +
                       (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise KeyError(f"{where}: unexpected key {unexpected[0]!r}" +
                       (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: key {k!r} has shape {tuple(sd[k].shape)}, the config "
                             f"implies {tuple(v.shape)}")
    model.load_state_dict(sd, assign=True)
    return model

def _with_dtype(sd, dtype):
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in sd.items()}

def load_tokenizer(path):
    """The tokenizer stored in the same HF folder as the weights (transformers imported only
    here)."""
    # transformers would take it for a hub name and say so, not what is missing
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (an HF folder with the tokenizer's files)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)

# -----------------------------------------------------------------------------
# the CLIP transformer block, shared by the image and the text tower

ACT = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP's
}

def _act(name):
    if name not in ACT:
        raise ValueError(f"hidden_act {name!r} is not supported (expected one of {sorted(ACT)})")
    return ACT[name]

class CLIPAttention(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, mask=None, causal=False):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # a mask, when given, already holds causality; without one SDPA applies it itself
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=causal and mask is None)  # (B, heads, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

class CLIPMLP(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = _act(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

class CLIPLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, mask=None, causal=False):
        x = x + self.self_attn(self.layer_norm1(x), mask, causal)
        return x + self.mlp(self.layer_norm2(x))

class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.grad_checkpointing = False

    def forward(self, x, mask=None, causal=False):
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, mask, causal, use_reentrant=False)
            else:
                x = layer(x, mask, causal)
        return x

def _clip_split_config(raw, tower, path):
    """(tower config dict, projection_dim) of an HF CLIP folder: CLIPModel or the tower model
    alone."""
    mt = raw.get("model_type")
    if mt == "clip":
        sub = dict(raw.get(f"{tower}_config") or {})
        # CLIPModel projects to the top-level width
        sub["projection_dim"] = raw.get("projection_dim", 512)
        return sub
    if mt == f"clip_{tower}_model":
        return raw
    raise ValueError(f"{path}/config.json: model_type {mt!r} is not a CLIP {tower} model "
                     f"(expected 'clip' or 'clip_{tower}_model')")

def _clip_tower_state(sd, prefixes, path):
    """Keep one tower's tensors of a CLIP checkpoint; the other tower's keys, logit_scale and
    logit_bias (a stage-2 export trained with the sigmoid loss) are skipped."""
    other = ("text_model.", "text_projection.", "vision_model.", "visual_projection.",
             "logit_scale", "logit_bias")
    out = {}
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            continue  # a derived buffer that older HF checkpoints (e.g. OpenAI's) stored
        if k.startswith(prefixes):
            out[k] = v
        elif not k.startswith(other):
            raise KeyError(f"{path}: unexpected key {k!r}")
    return out

def _read_tensor(path, name):
    """One tensor of an HF folder, read without loading the others (None when the folder has
    none)."""
    from safetensors import safe_open
    file = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(file):
        if not os.path.isfile(index):
            return _read_safetensors(path).get(name)  # raises _read_safetensors' error
        with open(index) as f:
            shard = json.load(f)["weight_map"].get(name)
        if shard is None:
            return None
        file = os.path.join(path, shard)
    with safe_open(file, "pt") as f:
        return f.get_tensor(name) if name in f.keys() else None

def read_logit_scale(path):
    """The learned log temperature of a CLIPModel or SiglipModel folder, or of a stage-2 export
    (which keeps it in model.safetensors beside the tower's weights); None when the folder has none.
    Logits are exp(logit_scale) * cos, plus logit_bias for SigLIP's sigmoid loss."""
    return _read_tensor(path, "logit_scale")

def read_logit_bias(path):
    """SigLIP's learned logit bias from a SiglipModel folder or a stage-2 export trained with the
    sigmoid loss (None when the folder has none, as CLIP's)."""
    return _read_tensor(path, "logit_bias")

# -----------------------------------------------------------------------------
# ViT: the CLIP image tower

class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.grid ** 2 + 1, cfg.hidden_size)

    def pos_embed(self, gh, gw):
        """Position embeddings for a gh x gw patch grid: bicubic interpolation of the trained grid
        (as HF)."""
        pe = self.position_embedding.weight  # (1 + grid^2, C)
        if (gh, gw) == (self.grid, self.grid):
            return pe
        cls_pe, patch_pe = pe[:1], pe[1:]
        C = pe.shape[1]
        # (1, C, grid, grid)
        patch_pe = patch_pe.reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)
        patch_pe = F.interpolate(patch_pe, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pe, patch_pe.permute(0, 2, 3, 1).reshape(gh * gw, C)])

    def forward(self, pixel_values):
        B, _, H, W = pixel_values.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size "
                             f"{self.patch_size}")
        # (B, C, gh, gw)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, C)
        x = torch.cat([self.class_embedding.expand(B, 1, -1).to(x.dtype), x], dim=1)
        return x + self.pos_embed(H // self.patch_size, W // self.patch_size)

class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        # (sic) HF's spelling
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

class ViT(nn.Module):
    """CLIP image tower. Other resolutions than cfg.image_size interpolate the position
    embeddings."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        self.preprocess = clip_preprocess(cfg.image_size)  # from_pretrained reads
                                                           # preprocessor_config.json

    @property
    def embed_dim(self):
        """Width of forward's output (the joint space): projection_dim."""
        return self.config.projection_dim

    def forward_features(self, pixel_values):
        """(B, 3, H, W) -> (B, 1 + patches, width): the encoder output, HF's `last_hidden_state`."""
        vm = self.vision_model
        return vm.encoder(vm.pre_layrnorm(vm.embeddings(pixel_values)))

    def forward(self, pixel_values):
        """(B, 3, H, W) -> (B, projection_dim): HF's `image_embeds`, not normalised."""
        h = self.forward_features(pixel_values)
        return self.visual_projection(self.vision_model.post_layernorm(h[:, 0]))

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """An HF CLIP folder: CLIPModel or CLIPVisionModelWithProjection."""
        cfg = _from_dict(ViTConfig, _clip_split_config(_read_config(path), "vision", path))
        _act(cfg.hidden_act)
        sd = _clip_tower_state(_read_safetensors(path), ("vision_model.", "visual_projection."),
                               path)
        with torch.device("meta"):
            model = cls(cfg)
        model = _load_into(model, _with_dtype(sd, dtype), path)
        model.preprocess = read_preprocess(path, model.preprocess)
        return model

# -----------------------------------------------------------------------------
# CLIPTextTower: the CLIP text tower

class TextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

class TextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

class CLIPTextTower(nn.Module):
    """CLIP text tower: causal attention, pooled at the EOS token, projected.

    The context is cfg.max_position_embeddings tokens (77 for real CLIP); longer input is an error,
    and `tokenize` truncates like CLIP does (keeping the EOS token at the end). Padding may sit on
    either side.
    """

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    @property
    def context_length(self):
        return self.config.max_position_embeddings

    def tokenize(self, tokenizer, texts):
        """Texts -> (input_ids, attention_mask), truncated to the context like CLIP."""
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward_features(self, input_ids, attention_mask=None):
        """(B, T) -> (B, T, width): hidden states after final_layer_norm."""
        B, T = input_ids.shape
        if T > self.context_length:
            raise ValueError(f"input has {T} tokens, the CLIP text tower's context is "
                             f"{self.context_length}: truncate with CLIPTextTower.tokenize")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tm = self.text_model
        pos = _positions(attention_mask)  # real tokens at 0..L-1 whichever side the padding is on
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(pos)
        x = tm.encoder(x, _attn_mask(attention_mask, causal=True), causal=True)
        return tm.final_layer_norm(x)

    def eos_index(self, input_ids, attention_mask=None):
        """Where each row's pooled token is: the first EOS (HF's rule), or argmax id for old configs
        (eos 2). A row without EOS (cut off by hand) pools its last real token instead of HF's
        silent position 0."""
        eos = self.config.eos_token_id
        real = (attention_mask.bool() if attention_mask is not None
                else torch.ones_like(input_ids, dtype=torch.bool))
        if eos == 2:
            return torch.where(real, input_ids, -1).to(torch.int).argmax(-1)
        is_eos = (input_ids == eos) & real  # OpenAI's tokenizer pads with EOS:
                                            # only real tokens count
        last = _last_real(input_ids, attention_mask)
        return torch.where(is_eos.any(-1), is_eos.to(torch.int).argmax(-1), last)

    def forward(self, input_ids, attention_mask=None):
        """(B, T) -> (B, projection_dim): HF's `text_embeds`, not normalised."""
        h = self.forward_features(input_ids, attention_mask)
        pooled = h[torch.arange(h.shape[0], device=h.device),
                   self.eos_index(input_ids, attention_mask)]
        return self.text_projection(pooled)

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """An HF CLIP folder: CLIPModel or CLIPTextModelWithProjection."""
        cfg = _from_dict(CLIPTextConfig, _clip_split_config(_read_config(path), "text", path))
        _act(cfg.hidden_act)
        sd = _clip_tower_state(_read_safetensors(path), ("text_model.", "text_projection."), path)
        with torch.device("meta"):
            model = cls(cfg)
        return _load_into(model, _with_dtype(sd, dtype), path)

# -----------------------------------------------------------------------------
# SiglipViT: the SigLIP image tower (SigLIP and fixed-resolution SigLIP 2 share it)

@dataclass
class SiglipViTConfig:
    # the defaults are HF's SiglipVisionConfig's: SigLIP 2's config.json files name only what
    # differs
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = True  # False (some VLMs' copies):
                                  # no pooling head, so no image embedding

class SiglipEmbeddings(nn.Module):
    """Patches through a conv (with bias, unlike CLIP's) plus learned positions; no class token."""
    def __init__(self, cfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         cfg.patch_size)
        self.position_embedding = nn.Embedding(self.grid ** 2, cfg.hidden_size)

    def pos_embed(self, gh, gw):
        """Position embeddings for a gh x gw patch grid: bicubic interpolation of the trained grid
        (as HF with interpolate_pos_encoding=True; without it HF refuses other resolutions)."""
        pe = self.position_embedding.weight  # (grid^2, C)
        if (gh, gw) == (self.grid, self.grid):
            return pe
        C = pe.shape[1]
        pe = pe.reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)  # (1, C, grid, grid)
        pe = F.interpolate(pe, size=(gh, gw), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(gh * gw, C)

    def forward(self, pixel_values):
        B, _, H, W = pixel_values.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size "
                             f"{self.patch_size}")
        # (B, C, gh, gw)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, C)
        return x + self.pos_embed(H // self.patch_size, W // self.patch_size)

class PoolingAttention(nn.Module):
    """Cross-attention from a few queries to the tokens, with nn.MultiheadAttention's parameter
    names (HF stores the head's attention as one): q, k, v projections stacked in
    in_proj_weight/in_proj_bias."""
    def __init__(self, width, n_head):
        super().__init__()
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))  # rows: q, then k, then v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, queries, x):
        B, T, C = x.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(queries, wq, bq).view(B, -1, self.n_head,
                                           C // self.n_head).transpose(1, 2)  # (B, heads, Q, hd)
        k = F.linear(x, wk, bk).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, heads, T, hd)
        v = F.linear(x, wv, bv).view(B, T, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Q, hd), scaled by hd^-0.5 as MHA
        return self.out_proj(y.transpose(1, 2).reshape(B, -1, C))

class SiglipHead(nn.Module):
    """Attention pooling: one learned probe attends over the tokens, then a residual pre-LN MLP."""
    def __init__(self, cfg):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = PoolingAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x)  # (B, 1, C)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]

class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)  # CLIP's block exactly; SigLIP has no pre-layernorm
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = SiglipHead(cfg)

class SiglipViT(nn.Module):
    """SigLIP image tower (HF `SiglipVisionModel` key layout), also fixed-resolution SigLIP 2. It
    has no projection: the attention-pooled output is the joint space, hidden_size wide. Other
    resolutions than cfg.image_size interpolate the position embeddings."""

    def __init__(self, cfg: SiglipViTConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = SiglipVisionTransformer(cfg)
        self.preprocess = siglip_preprocess(cfg.image_size)  # from_pretrained reads
                                                             # preprocessor_config.json

    @property
    def embed_dim(self):
        """Width of forward's output (the joint space): hidden_size."""
        return self.config.hidden_size

    def forward_features(self, pixel_values):
        """(B, 3, H, W) -> (B, patches, width): HF's `last_hidden_state`, after post_layernorm
        (unlike CLIP's)."""
        vm = self.vision_model
        return vm.post_layernorm(vm.encoder(vm.embeddings(pixel_values)))

    def forward(self, pixel_values):
        """(B, 3, H, W) -> (B, hidden_size): HF's `pooler_output` (SiglipModel's image_embeds), not
        normalised."""
        return self.vision_model.head(self.forward_features(pixel_values))

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """An HF SigLIP folder: SiglipModel (model_type "siglip", the vision tensors only; SigLIP
        2's fixed-resolution checkpoints are these) or SiglipVisionModel ("siglip_vision_model")."""
        raw = _read_config(path)
        mt = raw.get("model_type")
        if mt not in ("siglip", "siglip_vision_model"):
            naflex = ("; NaFlex SigLIP 2 (Siglip2VisionModel) is not supported"
                      if str(mt).startswith("siglip2") else "")
            raise ValueError(f"{path}/config.json: model_type {mt!r} is not a SigLIP vision model "
                             f"(expected 'siglip' or 'siglip_vision_model'{naflex})")
        cfg = _from_dict(SiglipViTConfig,
                         (raw.get("vision_config") or {}) if mt == "siglip" else raw)
        for k in ("image_size", "patch_size"):
            if not isinstance(getattr(cfg, k), int):
                raise ValueError(f"{path}/config.json: {k} {getattr(cfg, k)!r} is not supported "
                                 f"(expected one int)")
        if not cfg.vision_use_head:
            raise ValueError(f"{path}/config.json: vision_use_head is false: "
                             f"no attention-pooling head, so no image embedding")
        _act(cfg.hidden_act)
        sd = {}
        for k, v in _read_safetensors(path).items():
            if k.endswith("embeddings.position_ids") or k in ("logit_scale", "logit_bias") or \
                    (mt == "siglip" and k.startswith("text_model.")):
                continue  # the text tower of a SiglipModel; its (or a stage-2 export's) logit_scale
                          # and logit_bias
            # transformers 5 saves a SiglipVisionModel without the `vision_model.` prefix,
            # 4.x with it
            sd[k if mt == "siglip" or k.startswith("vision_model.") else "vision_model." + k] = v
        with torch.device("meta"):
            model = cls(cfg)
        model = _load_into(model, _with_dtype(sd, dtype), path)
        model.preprocess = read_preprocess(path, model.preprocess)
        return model

# -----------------------------------------------------------------------------
# saving in HF's layout (what evaluate.py, this file's loaders and transformers read)

def _scalars(logit_scale, logit_bias):
    """log s and SigLIP's bias t as the extra 0-dim tensors SiglipModel and CLIPModel name
    `logit_scale` and `logit_bias` (read_logit_scale / read_logit_bias read them; the tower loaders
    skip them)."""
    out = ({} if logit_scale is None
           else {"logit_scale": logit_scale.detach().float().cpu().reshape(())})
    if logit_bias is not None:
        out["logit_bias"] = logit_bias.detach().float().cpu().reshape(())
    return out

def _tower_state(vit):
    """The tower's tensors, fp32, under HF's names (SiglipVisionModel: transformers 5's, no
    prefix)."""
    siglip = isinstance(vit, SiglipViT)
    return {(k.removeprefix("vision_model.") if siglip else k):
            v.detach().float().contiguous().cpu()
            for k, v in vit.state_dict().items()}

def save_image_tower(folder, vit, logit_scale=None, logit_bias=None):
    """config.json + model.safetensors (+ the logits) + preprocessor_config.json into `folder`: an
    HF CLIPVisionModelWithProjection or SiglipVisionModel folder, whichever `vit` is."""
    from safetensors.torch import save_file
    siglip = isinstance(vit, SiglipViT)
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "preprocessor_config.json"), preprocess_config(vit.preprocess))
    save_file({**_tower_state(vit), **_scalars(logit_scale, logit_bias)},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    arch = "SiglipVisionModel" if siglip else "CLIPVisionModelWithProjection"
    write_json(os.path.join(folder, "config.json"),
               {**vars(vit.config),
                "model_type": "siglip_vision_model" if siglip else "clip_vision_model",
                "architectures": [arch]})

def save_clip(folder, vit, text, tokenizer, logit_scale, logit_bias=None):
    """An HF CLIPModel folder (both towers, the logits, the tokenizer) into `folder`."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "preprocessor_config.json"), preprocess_config(vit.preprocess))
    sd = {**_tower_state(vit), **_scalars(logit_scale, logit_bias)}
    sd.update({k: v.detach().float().contiguous().cpu() for k, v in text.state_dict().items()})
    tcfg = {**vars(text.config), "model_type": "clip_text_model",
            "pad_token_id": tokenizer.pad_token_id}
    tcfg.pop("projection_dim")
    vcfg = {**{k: v for k, v in vars(vit.config).items() if k != "projection_dim"},
            "model_type": "clip_vision_model"}
    write_json(os.path.join(folder, "config.json"),
               {"model_type": "clip", "architectures": ["CLIPModel"],
                "projection_dim": vit.config.projection_dim,
                "logit_scale_init_value": sd["logit_scale"].item(), "text_config": tcfg,
                "vision_config": vcfg})
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)

# -----------------------------------------------------------------------------
# one loader for any image tower (their preprocessing: images.py)

IMAGE_TOWERS = {"clip": ViT, "clip_vision_model": ViT, "siglip": SiglipViT,
                "siglip_vision_model": SiglipViT}

def load_image_tower(path, dtype=None):
    """The image tower of an HF folder, chosen by config.json's model_type: CLIP (CLIPModel,
    CLIPVisionModelWithProjection) -> ViT, forward = image_embeds; SigLIP (SiglipModel incl.
    fixed-resolution SigLIP 2, SiglipVisionModel) -> SiglipViT, forward = pooler_output. Both have
    .embed_dim (forward's width), .preprocess (an ImagePreprocess) and .config.{image_size,
    patch_size, hidden_size, num_hidden_layers}."""
    mt = _read_config(path).get("model_type")
    if mt not in IMAGE_TOWERS:
        raise ValueError(f"{path}/config.json: model_type {mt!r} is not a supported image tower "
                         f"(supported: {', '.join(IMAGE_TOWERS)}; NaFlex SigLIP 2, model_type "
                         f"siglip2, is not)")
    return IMAGE_TOWERS[mt].from_pretrained(path, dtype=dtype)

# -----------------------------------------------------------------------------
# masks and positions, shared by the CLIP text tower and Llama

def _positions(attention_mask):
    """(B, T) 0/1 -> (B, T) positions counting real tokens only, so padding on either side changes
    nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

def _last_real(input_ids, attention_mask):
    if attention_mask is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, device=input_ids.device)
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    return torch.where(attention_mask.bool(), idx, -1).amax(-1).clamp(min=0)

def _attn_mask(attention_mask, causal):
    """(B, T) 0/1 padding mask -> (B, 1, T, T) boolean SDPA mask (True = may attend), or None if not
    needed.

    Each token also attends to itself: that changes no real token (they never see padding), and
    keeps the rows of padding tokens from being fully masked, which would give NaN and spread
    through later layers.
    """
    B, T = attention_mask.shape
    if bool(attention_mask.all()):
        return None  # callers use SDPA's is_causal, its fast path
    mask = attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    return mask | eye

# -----------------------------------------------------------------------------
# Adaptor: LLM embedding -> CLIP joint space

class AdaptorBlock(nn.Module):
    """x + W2 gelu(W1 LN(x)), W1: D -> eD, W2: eD -> D (an inverted bottleneck, exact GELU)."""
    def __init__(self, dim, expansion):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

class Adaptor(nn.Module):
    """L2-normalise the LLM embedding, n residual blocks, LayerNorm, Linear to the joint width.
    The output is not normalised (callers normalise before a loss, as with the towers)."""

    def __init__(self, cfg: AdaptorConfig):
        super().__init__()
        self.config = cfg
        self.blocks = nn.ModuleList(AdaptorBlock(cfg.in_dim, cfg.expansion)
                                    for _ in range(cfg.n_blocks))
        self.norm = nn.LayerNorm(cfg.in_dim)
        self.proj = nn.Linear(cfg.in_dim, cfg.out_dim)

    def forward(self, x):
        x = F.normalize(x.float(), dim=-1).to(self.proj.weight.dtype)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))

    @classmethod
    def for_method(cls, method, in_dim, out_dim):
        if method not in ADAPTOR_PRESETS:
            raise ValueError(f"method {method!r}: expected one of {sorted(ADAPTOR_PRESETS)}")
        return cls(AdaptorConfig(in_dim=in_dim, out_dim=out_dim, **ADAPTOR_PRESETS[method]))

    def save_pretrained(self, out):
        """out/adaptor.safetensors + out/adaptor.json (its AdaptorConfig), each written
        atomically."""
        from safetensors.torch import save_file
        os.makedirs(out, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(out, "adaptor.safetensors"), lambda tmp: save_file(sd, tmp))
        write_json(os.path.join(out, "adaptor.json"), vars(self.config))

    @classmethod
    def from_pretrained(cls, path):
        """What save_pretrained wrote into the folder `path`; every key and shape checked."""
        from safetensors.torch import load_file
        cfg_path = os.path.join(path, "adaptor.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path}: no adaptor.json (expected a folder with an adaptor, "
                                    f"e.g. ProCLIP stage 1's out_dir)")
        with open(cfg_path) as f:
            cfg = _from_dict(AdaptorConfig, json.load(f))
        with torch.device("meta"):
            model = cls(cfg)
        return _load_into(model, load_file(os.path.join(path, "adaptor.safetensors")), path)
