"""
Memory per GPU of the paper-scale recipes (config/*_paper.py, stage1_llm2clip*.py, stage2_*_vitl14_*.py)
at their configured batch per GPU, without a GPU:

    python -m bench.memory                  # the table (about a minute on a CPU)
    python -m bench.memory --markdown       # the same as a Markdown table

How: this project's own models (model.py's ViT, Adaptor, CLIP text tower; llama.py's Llama with LoRA) are built at
real size on the meta device (shapes and dtypes, no memory, no arithmetic) and one training step runs
through them: the forward, the loss, the backward, with the same code paths the scripts take (LoRA and
activation checkpointing included). A dispatch mode sees every tensor each ATen op creates, counts its
storage's bytes until the storage is freed (autograd's saved tensors keep it alive, exactly as on a GPU)
and records the peak of the live bytes over the step. So activation memory is measured by running the
code, not by a formula. Two things the meta device cannot do are emulated:
  - autocast: matmuls, convolutions and attention get bf16 inputs, layer norms and softmaxes fp32 inputs
    (autocast's rules; autocast itself ignores meta tensors);
  - attention: the scripts call F.scaled_dot_product_attention, which on a GPU runs FlashAttention or
    the memory-efficient kernel. They keep q, k, v, the output, an fp32 logsumexp (and, with a mask, the
    mask as a bias) for backward, and never the T x T matrix; that is what is counted (on meta, SDPA
    would run its math fallback and keep the matrix).
Static memory is counted exactly from the parameters: weights in their dtype, gradients, AdamW's two fp32
moments per trainable tensor, a second fp32 copy of the gradients for the all-reduce ("grad copy": DDP's
buckets in stage 2, DDP's default; stage 1's flat all-reduce buffer), the EMA teacher for ProCLIP (in
"weights"). Not counted: the CUDA context (0.5-1 GiB), the caching allocator's
fragmentation (often 5-15%), NCCL buffers, kernels' workspaces, the loss kernels' O(N) statistics (the
stage-2 loss is counted as open_clip's local-loss logits, 512 x 4096 fp32: 8 MiB). Read "total" as a lower
bound, good to about 10-20%.
Sequence lengths: an LLM batch here has every caption at one length and no padding (meta tensors cannot
drive the unpadding, which needs the mask's values): the stage-1 rows at max_length=512 are a bound, the
rows at 160 tokens show a typical long caption with its chat wrap (LLM2CLIP pairs a short caption of ~25
tokens with a long one, so a real batch sits well below the bound).
"""

import argparse
import importlib
import os
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import llama as LM

import model as M
from configurator import configure
from embedder import mean_pool

GiB = 2 ** 30
GPUS = 8

# real sizes: the config.json values of the checkpoints the recipes name
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               patch_size=14, hidden_act="quick_gelu", projection_dim=768)  # openai/clip-vit-large-patch14(-336)
CLIP_L14_TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
LLAMA = {
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "Llama-3-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192),
}

# -----------------------------------------------------------------------------
# measuring: live bytes of every storage created during a step

class LiveBytes(TorchDispatchMode):
    """Counts the storage bytes of every tensor an op creates, from its creation until the storage is
    freed (a weakref finalizer on the storage, which PyTorch keeps alive exactly as long as any tensor,
    view or autograd-saved copy uses it). `peak` is the largest live total seen after any op."""

    def __init__(self, outside):
        super().__init__()
        self.outside = outside  # storages that existed before (parameters): counted as static memory
        self.live = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key in self.seen or key in self.outside:
                    continue
                self.seen.add(key)
                self.live += s.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, key, s.nbytes())
        return out

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)

class _FlashAttention(torch.autograd.Function):
    """What FlashAttention / the memory-efficient kernel keep for backward: q, k, v, out, an fp32
    logsumexp (B, heads, T), and a float bias when there is a mask. Backward allocates dq (plus an fp32
    accumulator, as FlashAttention 2 does), dk, dv."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([bias] if bias is not None else []))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors[:3]
        acc = q.new_empty(q.shape, dtype=torch.float32)
        dq = acc.to(q.dtype)
        return dq, torch.empty_like(k), torch.empty_like(v), None

class Autocast:
    """autocast(bf16)'s casting rules on meta tensors (autocast itself ignores them) and SDPA as the GPU
    kernels keep memory, by swapping the torch.nn.functional entries the models call: linear and conv2d
    get bf16 inputs, layer_norm fp32 inputs (then runs in fp32, as under autocast), and
    scaled_dot_product_attention becomes _FlashAttention. A swap of module attributes, not a mode, so it
    also holds in the autograd thread that recomputes checkpointed layers."""

    def __init__(self, enabled=True):
        self.enabled = enabled

    def __enter__(self):
        self.saved = {n: getattr(F, n) for n in ("linear", "conv2d", "layer_norm", "scaled_dot_product_attention")}
        orig = self.saved
        low = lambda *ts: [t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t for t in ts]  # noqa: E731

        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if self.enabled:
                q, k, v = low(q, k, v)
            # with a mask the memory-efficient kernel takes it as an additive bias in q's dtype
            bias = None if attn_mask is None else torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
            return _FlashAttention.apply(q, k, v, bias)

        F.scaled_dot_product_attention = sdpa
        if self.enabled:
            F.linear = lambda x, w, b=None: orig["linear"](*low(x, w, b))
            F.conv2d = lambda x, w, b=None, *a, **kw: orig["conv2d"](*low(x, w, b), *a, **kw)
            F.layer_norm = lambda x, shape, w=None, b=None, eps=1e-5: orig["layer_norm"](
                x.float(), shape, None if w is None else w.float(), None if b is None else b.float(), eps)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(F, n, f)

def _no_padding(attention_mask, causal):
    """model._attn_mask for batches without padding: None, as the real one returns after checking
    attention_mask.all() (a check that needs values, which meta tensors do not have)."""
    return None

def measure(step, params, autocast=True):
    """Peak live bytes (activations, autocast copies, gradients) of step(), and the gradients' bytes at its end."""
    outside = {p.untyped_storage()._cdata for p in params}
    for p in params:
        p.grad = None
    counter = LiveBytes(outside)
    attn_mask, M._attn_mask = M._attn_mask, _no_padding
    try:
        with Autocast(autocast), counter:
            step()
    finally:
        M._attn_mask = attn_mask
    grads = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
    for p in params:
        p.grad = None
    return counter.peak, grads

# -----------------------------------------------------------------------------
# the recipes' steps

def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)

def recipe(name):
    """A config file's settings, as its script sees them (the script's defaults, then the file)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", name)
    script = {"stage1": "train_stage1", "stage2": "train_stage2", "embed_": "embed_cache"}[name[:6]]
    return configure(dict(vars(importlib.import_module(script))), [path])

def row(name, batch, what, params, trainable, peak, grads, extra_static=0, note=""):
    weights = nbytes(params)
    adam = 2 * 4 * sum(p.numel() for p in trainable)
    return dict(run=name, batch=batch, what=what, params=sum(p.numel() for p in params) / 1e6,
                trainable=sum(p.numel() for p in trainable) / 1e6, weights=weights / GiB, grads=grads / GiB,
                adam=adam / GiB, extra=extra_static / GiB, acts=(peak - grads) / GiB,
                total=(weights + adam + extra_static + peak) / GiB, note=note)

def llm2clip_stage1(cfg_name, llm_name, length):
    c = recipe(cfg_name)
    with torch.device("meta"):
        llm = LM.Llama(LM.LlamaConfig(**LLAMA[llm_name])).to(getattr(torch, c["dtype"]))
        LM.add_lora(llm, c["lora_r"], c["lora_alpha"], c["lora_dropout"])  # LoRA tensors fp32, the rest frozen
    llm.grad_checkpointing = c["grad_checkpointing"]
    llm.train()
    B = c["batch_size"]
    params = list(llm.parameters())
    trainable = [p for p in params if p.requires_grad]

    def step():  # B queries and B keys in one forward, as train_stage1.llm2clip_step
        ids = torch.zeros(2 * B, length, dtype=torch.long, device="meta")
        h = llm(ids, None)  # no padding (see the docstring)
        emb = F.normalize(mean_pool(h, torch.ones(2 * B, length, device="meta")), dim=-1)
        q, p = emb.split(B)
        keys = torch.cat([p] + [p.detach().new_empty(p.shape)] * (GPUS - 1))  # every rank's positives
        F.cross_entropy(c["simcse_scale"] * q @ keys.T, torch.zeros(B, dtype=torch.long, device="meta")).backward()

    peak, grads = measure(step, params)
    return row(f"stage 1 llm2clip, {llm_name} (LoRA r{c['lora_r']})", B, f"2x{B} seq x {length} tok",
               params, trainable, peak, grads, extra_static=grads,  # the flat all-reduce buffer
               note="activation checkpointing" if c["grad_checkpointing"] else "no checkpointing")

def cache_row(llm_name):
    c = recipe("embed_cache_paper.py")
    with torch.device("meta"):
        llm = LM.Llama(LM.LlamaConfig(**LLAMA[llm_name])).to(getattr(torch, c["dtype"])).eval()
    params = list(llm.parameters())
    B, T = c["batch_size"], c["max_length"]

    def step():  # embed_texts' batch: forward, mean pool in fp32, normalise
        with torch.no_grad():
            ids = torch.zeros(B, T, dtype=torch.long, device="meta")
            F.normalize(mean_pool(llm(ids, None), torch.ones(B, T, device="meta")), dim=-1)

    peak, grads = measure(step, params, autocast=False)  # embed_cache runs the bf16 model as it is
    return row(f"embedding cache, {llm_name}", B, f"{B} captions x {T} tok", params, [], peak, grads,
               note="inference, bound: every caption at max_length")

def vit_l14(image_size, projection_dim):
    return M.ViT(M.ViTConfig(image_size=image_size, **{**VIT_L14, "projection_dim": projection_dim}))

def stage2(cfg_name, image_size, llm_name, ckpt):
    c = recipe(cfg_name)
    method = c["method"]
    D = LLAMA[llm_name]["hidden_size"]
    out = c["embed_dim"] or VIT_L14["projection_dim"]
    with torch.device("meta"):
        vit = vit_l14(image_size, out)
        adaptor = M.Adaptor.for_method(method, D, out)
        logit_scale = nn.Parameter(torch.zeros(()))
        teacher = vit_l14(image_size, out).requires_grad_(False).eval() if method == "proclip" else None
    vit.vision_model.encoder.grad_checkpointing = ckpt
    vit.train()
    adaptor.train()
    B = c["batch_size"]
    trainable = list(vit.parameters()) + list(adaptor.parameters()) + [logit_scale]
    ema = list(teacher.parameters()) if teacher is not None else []

    def step():  # train_stage2's step: images and cached LLM embeddings in, InfoNCE (+ ProCLIP's distillation)
        pixels = torch.empty(B, 3, image_size, image_size, device="meta")
        cached = torch.empty(B, D, dtype=torch.float16, device="meta").float()
        img = F.normalize(vit(pixels).float(), dim=-1)
        txt = F.normalize(adaptor(cached).float(), dim=-1)
        all_img = torch.cat([img] + [img.detach().new_empty(img.shape)] * (GPUS - 1))  # gathered, with gradient
        all_txt = torch.cat([txt] + [txt.detach().new_empty(txt.shape)] * (GPUS - 1))
        labels = torch.zeros(B, dtype=torch.long, device="meta")
        s = logit_scale.exp()
        loss = (F.cross_entropy(s * img @ all_txt.T, labels) + F.cross_entropy(s * txt @ all_img.T, labels)) / 2
        if teacher is not None:
            with torch.no_grad():
                u = F.normalize(teacher(pixels).float(), dim=-1)
            struct = F.smooth_l1_loss(F.pdist(img), F.pdist(u), reduction="sum")
            loss = loss + c["distill_lambda"] * ((img - u).pow(2).sum() + struct)
        loss.backward()

    peak, grads = measure(step, trainable + ema)
    ddp = 4 * sum(p.numel() for p in trainable)  # DDP's buckets: a second fp32 copy of every gradient
    what = f"{B} img {image_size}px + {B} cached D={D}"
    note = ("activation checkpointing" if ckpt else "no checkpointing") + (", EMA teacher" if teacher else "")
    return row(f"stage 2 {method}, ViT-L/14-{image_size} ({llm_name} cache)", B, what,
               trainable + ema, trainable, peak, grads, extra_static=ddp, note=note)

def proclip_stage1(llm_name):
    c = recipe("stage1_proclip_paper.py")
    D = LLAMA[llm_name]["hidden_size"]
    with torch.device("meta"):
        teacher = M.CLIPTextTower(M.CLIPTextConfig(**CLIP_L14_TEXT)).requires_grad_(False).eval()
        adaptor = M.Adaptor.for_method("proclip", D, c["adaptor_out"] or CLIP_L14_TEXT["projection_dim"])
    adaptor.train()
    B = c["batch_size"]
    trainable = list(adaptor.parameters())
    n_fields = len(c["ins_fields"].split(","))

    def step():  # train_stage1.proclip_step: per field, cached rows -> adaptor; the teacher on the captions
        loss, first = 0.0, None
        for _ in range(n_fields):
            e = torch.empty(B, D, dtype=torch.float16, device="meta").float()
            with torch.no_grad():
                ids = torch.zeros(B, CLIP_L14_TEXT["max_position_embeddings"], dtype=torch.long, device="meta")
                t = F.normalize(teacher(ids).float(), dim=-1)
            s = F.normalize(adaptor(e).float(), dim=-1)
            loss = loss + (s - t).pow(2).sum()
            first = first or (s, t)
        (loss + F.smooth_l1_loss(F.pdist(first[0]), F.pdist(first[1]), reduction="sum")).backward()

    peak, grads = measure(step, trainable + list(teacher.parameters()))
    return row(f"stage 1 proclip, adaptor on {llm_name} cache", B, f"{n_fields}x{B} cached + CLIP-L text",
               trainable + list(teacher.parameters()), trainable, peak, grads, extra_static=grads,
               note="teacher frozen")

def rows():
    out = [
        llm2clip_stage1("stage1_llm2clip_llama32_1b.py", "Llama-3.2-1B", 512),
        llm2clip_stage1("stage1_llm2clip_llama32_1b.py", "Llama-3.2-1B", 160),
        llm2clip_stage1("stage1_llm2clip_llama3_8b.py", "Llama-3-8B", 512),
        llm2clip_stage1("stage1_llm2clip_llama3_8b.py", "Llama-3-8B", 160),
        cache_row("Llama-3.2-1B"),
        cache_row("Llama-3-8B"),
        proclip_stage1("Llama-3-8B"),
    ]
    for cfg_name, size in (("stage2_llm2clip_vitl14_224.py", 224), ("stage2_llm2clip_vitl14_336.py", 336)):
        for ckpt in (False, True):
            out.append(stage2(cfg_name, size, "Llama-3-8B", ckpt))
    out.append(stage2("stage2_llm2clip_vitl14_336.py", 336, "Llama-3.2-1B", True))
    for ckpt in (False, True):
        out.append(stage2("stage2_proclip_paper.py", 224, "Llama-3-8B", ckpt))
    return out

COLUMNS = [("run", "run", "{}"), ("batch/GPU", "what", "{}"), ("params M", "params", "{:.0f}"),
           ("trainable M", "trainable", "{:.1f}"), ("weights", "weights", "{:.2f}"), ("grads", "grads", "{:.2f}"),
           ("AdamW", "adam", "{:.2f}"), ("grad copy", "extra", "{:.2f}"), ("activations", "acts", "{:.1f}"),
           ("total GiB", "total", "{:.1f}"), ("", "note", "{}")]

def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    md = ap.parse_args().markdown
    table = [[fmt.format(r[key]) for _, key, fmt in COLUMNS] for r in rows()]
    head = [h for h, _, _ in COLUMNS]
    if md:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for t in table:
            print("| " + " | ".join(t) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *table)]
        for t in [head] + table:
            left = (0, 1, len(t) - 1)  # text columns left-aligned, numbers right-aligned
            print("  ".join(x.ljust(w) if i in left else x.rjust(w) for i, (x, w) in enumerate(zip(t, widths))))
    print(f"per GPU, {GPUS} GPUs; GiB = 2^30 bytes. weights + AdamW + grad copy are static; 'activations' is the "
          f"step's measured peak of everything else minus the gradients (which the total counts in full). "
          f"Not counted: CUDA context, allocator fragmentation, NCCL buffers (see the docstring).")

if __name__ == "__main__":
    main()
