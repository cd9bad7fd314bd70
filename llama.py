"""
Llama as a caption encoder, and LoRA on its projections (HF `LlamaModel` key layout, with or without
the `model.` prefix). Bidirectional attention by default (LLM2Vec's mask), `causal=True` for the
plain decoder.

    Llama(input_ids, attention_mask) -> (B, T, D)  hidden states after the final norm

How its hidden states become one caption embedding (template, instruction, pooling) is embedder.py.
"""

import json
import math
import os
import shutil
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import (_attn_mask, _from_dict, _load_into, _positions, _read_config, _read_safetensors,
                   _with_dtype)
from train_common import TOKENIZER_FILES, atomic_write

@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3", "factor": 8.0, ...}
                                                      # or {}
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


# -----------------------------------------------------------------------------
# LoRA: a Linear that can carry a low-rank update W + (alpha / r) * B @ A

class LoRALinear(nn.Linear):
    """nn.Linear whose state dict keys stay `x.weight` / `x.bias` (HF layout); `add_lora` adds
    `x.lora_A`, `x.lora_B`. B starts at zero, so a fresh adapter changes nothing."""

    r = 0

    def add_lora(self, r, alpha, dropout=0.0):
        dev = self.weight.device
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init
        # a new module would start in train mode
        self.lora_dropout = nn.Dropout(dropout).train(self.training)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.r:
            y = y + F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)),
                             self.lora_B.to(x.dtype)) * self.scaling
        return y

    def merged_weight(self):
        if not self.r:
            return self.weight
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)

    def merge(self):
        """Fold the update into the base weight and drop the adapter."""
        if self.r:
            with torch.no_grad():
                self.weight.copy_(self.merged_weight())
            del self.lora_A, self.lora_B, self.lora_dropout
            self.r = 0

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

def add_lora(model, r=16, alpha=32, dropout=0.05, targets=LORA_TARGETS, top_layers=0):
    """Put adapters on every LoRALinear whose name ends with one of `targets`; freeze everything
    else. Defaults are the paper's (rank 16, alpha 32, dropout 0.05 on all seven projections of
    every layer). top_layers > 0: only the last `top_layers` layers get adapters, so the backward
    pass stops there (a cheaper fine-tune for small machines, not the paper's)."""
    first = len(model.layers) - top_layers if top_layers else 0
    hits = 0
    for name, m in model.named_modules():
        parts = name.split(".")
        if (isinstance(m, LoRALinear) and parts[-1] in targets and
                int(parts[parts.index("layers") + 1]) >= first):
            m.add_lora(r, alpha, dropout)
            hits += 1
    if not hits:
        raise ValueError(f"no LoRA target found among {targets}")
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets),
                             top_layers=top_layers)
    return model

def merge_lora(model):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    model.lora_config = None
    return model

def save_lora(model, path):
    """Only the adapter tensors, with their config in the safetensors metadata."""
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    if not sd:
        raise ValueError("the model has no LoRA adapters to save")
    meta = {"lora_config": json.dumps(model.lora_config)}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))

def load_lora(model, path):
    """Add adapters as saved in `path` (by save_lora) and load their weights; keys must match
    exactly."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if "lora_config" not in meta:
            raise ValueError(f"{path}: no lora_config in the metadata (not written by save_lora)")
        sd = {k: f.get_tensor(k) for k in f.keys()}
    lc = json.loads(meta["lora_config"])
    add_lora(model, lc["r"], lc["alpha"], lc["dropout"], tuple(lc["targets"]),
             lc.get("top_layers", 0))
    own = {k for k in model.state_dict() if "lora_" in k}
    if own != set(sd):
        extra, miss = sorted(set(sd) - own), sorted(own - set(sd))
        raise KeyError(f"{path}: " + (f"unexpected key {extra[0]!r}" if extra
                                      else f"missing key {miss[0]!r}"))
    model.load_state_dict(sd, strict=False)
    return model

# -----------------------------------------------------------------------------
# Llama as a text encoder

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # statistics in fp32 whatever the model dtype, then back (HF's order: cast, then scale)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

def rope_inv_freq(cfg: LlamaConfig):
    """Inverse frequencies of rotate-half RoPE, with the `linear` and `llama3` scaling rules."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta **
                      (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {kind!r} is not supported (expected default, linear or llama3)")

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)

class LlamaAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                           cfg.head_dim)
        bias = cfg.attention_bias
        self.q_proj = LoRALinear(cfg.hidden_size, self.n_head * self.hd, bias=bias)
        self.k_proj = LoRALinear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = LoRALinear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = LoRALinear(self.n_head * self.hd, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, causal, unpad=None):
        # x: (B, T, C), or (N, C) real tokens only when unpad = (idx, B, T) says where they sit
        q = self.q_proj(x).unflatten(-1, (self.n_head, self.hd))  # (..., heads, hd)
        k = self.k_proj(x).unflatten(-1, (self.n_kv, self.hd))    # (..., kv_heads, hd)
        v = self.v_proj(x).unflatten(-1, (self.n_kv, self.hd))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if unpad is not None:  # attention needs the (B, T) grid back:
                               # scatter into zeros (masked anyway)
            idx, B, T = unpad
            q, k, v = (t.new_zeros(B * T, *t.shape[1:]).index_copy(0, idx, t)
                       .view(B, T, *t.shape[1:]) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if mask is None:  # no padding: let SDPA pick its fastest kernel and share kv heads itself
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1,
                                               enable_gqa=self.n_kv != self.n_head)
        else:  # with a mask the fused kernels need equal head counts (as HF does it)
            rep = self.n_head // self.n_kv
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).flatten(2)  # (B, T, heads * hd)
        if unpad is not None:
            y = y.flatten(0, 1)[unpad[0]]  # (N, heads * hd)
        return self.o_proj(y)

class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = LoRALinear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = LoRALinear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = LoRALinear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU

class LlamaLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, causal, unpad=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, causal, unpad)
        return x + self.mlp(self.post_attention_layernorm(x))

class Llama(nn.Module):
    """LLaMA as a text encoder. Bidirectional attention by default (LLM2Vec / LLM2CLIP);
    `causal=True` gives the ordinary decoder. Positions count real tokens only, so a caption embeds
    the same alone, left-padded or right-padded. `grad_checkpointing=True` recomputes each layer in
    backward."""

    def __init__(self, cfg: LlamaConfig, causal=False, lm_head=False):
        super().__init__()
        self.config = cfg
        self.causal = causal
        self.grad_checkpointing = False
        self.lora_config = None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # only for generation (sanity checks); an encoder does not need it. Tied: the embedding is
        # reused.
        if lm_head and not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq = rope_inv_freq(cfg)  # fp32 always:
                                             # not a buffer, so .to(bfloat16) cannot round it

    def rope(self, position_ids, dtype):
        if self._inv_freq.device != position_ids.device:
            self._inv_freq = self._inv_freq.to(position_ids.device)  # once; still fp32
        inv_freq = self._inv_freq
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # (B, T, 1, hd):
                                                               # broadcasts over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """(B, T) token ids, (B, T) 0/1 mask -> (B, T, D) hidden states after the final RMSNorm.
        Padding positions of the output hold zeros."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = _positions(attention_mask)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = _attn_mask(attention_mask, self.causal)
        unpad = None
        if mask is not None:
            # Unpad: the projections, the MLP and the norms (nearly all FLOPs) run on the real
            # tokens only; only attention sees the padded (B, T) grid. Plainly padded caption
            # batches are ~half padding.
            idx = attention_mask.flatten().nonzero().squeeze(1)
            unpad = (idx, B, T)
            x, cos, sin = (t.flatten(0, 1)[idx] for t in (x, cos, sin))  # (N, ...)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, self.causal, unpad, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, self.causal, unpad)
        x = self.norm(x)
        if unpad is not None:
            x = x.new_zeros(B * T, x.shape[-1]).index_copy(0, unpad[0], x).view(B, T, -1)
        return x

    def logits(self, hidden):
        w = self.lm_head.weight if hasattr(self, "lm_head") else self.embed_tokens.weight
        return F.linear(hidden, w)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=20, eos_token_id=None):
        """Greedy decoding of one sequence (B=1), recomputing the prefix each step: for sanity
        checks only."""
        assert self.causal and input_ids.shape[0] == 1, (
            "generate needs causal=True and a batch of one")
        for _ in range(max_new_tokens):
            nxt = self.logits(self(input_ids)[:, -1]).argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, nxt], dim=1)
            if eos_token_id is not None and nxt.item() == eos_token_id:
                break
        return input_ids

    @classmethod
    def from_pretrained(cls, path, causal=False, dtype=None, lm_head=False):
        """An HF Llama folder (LlamaModel or LlamaForCausalLM; one file or shards with an index).
        `lm_head=True` also loads an untied output head (for generate); otherwise it is skipped."""
        raw = _read_config(path)
        if raw.get("model_type") != "llama":
            raise ValueError(f"{path}/config.json: model_type {raw.get('model_type')!r} is not "
                             f"supported (Llama.from_pretrained reads 'llama')")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}/config.json: hidden_act {raw['hidden_act']!r} is not "
                             f"supported (expected 'silu')")
        cfg = llama_config(raw)
        rope_inv_freq(cfg)  # unsupported rope types fail here, before any weights are read
        sd = {}
        for k, v in _read_safetensors(path).items():
            if k.endswith("rotary_emb.inv_freq"):
                continue  # a derived buffer some old checkpoints stored
            if k == "lm_head.weight":
                if lm_head and not cfg.tie_word_embeddings:
                    sd[k] = v
                continue
            sd[k.removeprefix("model.")] = v
        with torch.device("meta"):
            model = cls(cfg, causal=causal, lm_head=lm_head)
        model = _load_into(model, _with_dtype(sd, dtype), path)
        model.source_path = path
        model.hf_config = raw
        return model

    def save_pretrained(self, out, tokenizer_from=None, json_files=None):
        """Export as an HF LlamaForCausalLM folder (LoRA merged in, the model itself untouched):
        model.safetensors + config.json + the tokenizer files of `tokenizer_from` (default: the
        source), and json_files ({name: JSON object}, e.g. stage 1's embedder.json), swapped in
        together."""
        from safetensors.torch import save_file
        sd = {}
        for name, m in self.named_modules():
            if isinstance(m, LoRALinear):
                sd[f"model.{name}.weight"] = m.merged_weight()
                if m.bias is not None:
                    sd[f"model.{name}.bias"] = m.bias
        for k, v in self.state_dict().items():
            if "lora_" in k or k.startswith("lm_head.") or f"model.{k}" in sd:
                continue
            sd[f"model.{k}"] = v
        if hasattr(self, "lm_head"):
            sd["lm_head.weight"] = self.lm_head.weight
        untied_without_head = not self.config.tie_word_embeddings and not hasattr(self, "lm_head")
        raw = dict(getattr(self, "hf_config", None) or llama_hf_dict(self.config))
        raw["architectures"] = ["LlamaModel" if untied_without_head else "LlamaForCausalLM"]
        raw["dtype"] = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        raw.pop("torch_dtype", None)
        # e.g. LLM2CLIP's release points at remote code this folder does not carry
        raw.pop("auto_map", None)
        src = tokenizer_from or getattr(self, "source_path", None)

        def write(tmp):
            os.makedirs(tmp)
            save_file({k: v.detach().contiguous() for k, v in sd.items()},
                      os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(raw, f, indent=2)
            extra = ("chat_template.jinja", "chat_template.json", "generation_config.json")
            if src:  # the tokenizer, and the chat template and generation config of an HF LLM
                for n in TOKENIZER_FILES + extra:
                    if os.path.isfile(os.path.join(src, n)):
                        shutil.copy(os.path.join(src, n), os.path.join(tmp, n))
            for name, obj in (json_files or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=2)
        atomic_write(out, write)

def llama_config(raw):
    """LlamaConfig from an HF config dict, old (rope_theta + rope_scaling) or new (rope_parameters)
    style."""
    cfg = _from_dict(LlamaConfig, {k: v for k, v in raw.items()
                                   if k not in ("rope_scaling", "rope_theta")})
    rp = raw.get("rope_parameters") or {}
    rs = raw.get("rope_scaling") or {}
    cfg.rope_theta = float(rp.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in {**rs, **rp}.items() if k != "rope_theta"}
    cfg.rope_scaling = (scaling if scaling.get("rope_type",
                                               scaling.get("type", "default")) != "default" else {})
    return cfg

def llama_hf_dict(cfg: LlamaConfig):
    """An HF config dict for a LlamaConfig built by hand (no source folder to copy the config
    from)."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)
         if f.name not in ("rope_theta", "rope_scaling")}
    d["model_type"] = "llama"
    d["hidden_act"] = "silu"
    d["rope_parameters"] = {"rope_type": "default", **cfg.rope_scaling,
                            "rope_theta": cfg.rope_theta}
    return d

