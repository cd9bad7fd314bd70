r"""
Stage 2: re-align a pretrained image tower to the text side, contrastively (the papers' stage 2).
The tower comes from model.load_image_tower(clip): a CLIP folder (ViT) or a SigLIP /
fixed-resolution SigLIP 2 folder (SiglipViT), preprocessed as the folder says (tower.preprocess).

--method=llm2clip  the tower with a fresh projection `embed_dim` wide (1280 in the paper) for a
    CLIP; a SigLIP tower has no projection and keeps its own joint width (the attention-pooled
    output, hidden_size wide). The adaptor (4 blocks) reads the LLM's caption embeddings from the
    cache of embed_cache.py: the LLM never runs.
--method=proclip   the tower with its own projection (SigLIP: its own pooled output), the adaptor
    (1 block) from ProCLIP stage 1, and an EMA copy of the tower as teacher: L = L_c +
    distill_lambda * (L_ins(v, u) + L_struct(v, u)), v and u the student's and the teacher's
    normalised image embeddings of the same images.
--method=clip      CLIP with its own text tower on the same captions: the "fine-tune CLIP directly"
    baseline, and, with clip="", a CLIP trained from scratch with the sizes below (the demo's base
    CLIP). CLIP folders only: model.py has no SigLIP text tower.
The contrastive loss L_c (`loss`): "softmax", CLIP's InfoNCE with a learnable scale
s = exp(logit_scale), clamped to [0, ln 100] as CLIP does; "sigmoid", SigLIP's loss with s and a
learnable bias t, not clamped (as SigLIP; released SigLIP checkpoints learned s above 100, e.g. 112
for So400m/14-384). Both start from the folder's logit_scale / logit_bias when it has them (SigLIP
folders have both, CLIP folders the scale), otherwise from the loss's own init: s = 1/0.07 (CLIP),
s = 10 and t = -10 (SigLIP).

    python train_stage2.py config/stage2_llm2clip_demo.py
    torchrun --standalone --nproc_per_node=8 train_stage2.py config/stage2_llm2clip_demo.py \
        --batch_size=512

In:  a manifest (manifest.py), an HF CLIP or SigLIP folder, and for the LLM methods the embedding
     cache of the manifest and the LLM that made it (checked by fingerprint).
Out: out_dir/model/  llm2clip, proclip: config.json + model.safetensors (an HF
                     CLIPVisionModelWithProjection or SiglipVisionModel folder, whichever the tower
                     is, plus logit_scale, and logit_bias for the sigmoid loss, as extra tensors
                     that model.py's loaders skip and read_logit_scale / read_logit_bias read),
                     preprocessor_config.json (the tower's preprocessing), adaptor.safetensors +
                     adaptor.json, text.json (which LLM, its fingerprint, how its embeddings were
                     made: the cache's embedder.EmbedSpec; the loss);
                     clip: an HF CLIPModel folder with its tokenizer (and the same extras).
     out_dir/ckpt/   the last checkpoint (resumed from automatically), out_dir/log.jsonl.
Each step takes one caption per image: a field of `fields` at random, then one of its captions (the
public LLM2CLIP code: short or long, 50/50). Every step's images, crops and captions are a function
of (seed, step) and of the global batch only, so a resumed run ends with the same weights as an
uninterrupted one, and N ranks take the step of one process with N times the batch (the loss gathers
every rank's features; ProCLIP's distillation terms are per rank, as in the paper's code: DDP
averages their gradients).
Optimisation as LLM2CLIP: AdamW, layer-wise lr decay over the towers (embeddings lowest; the head,
i.e. CLIP's final norm and projection or SigLIP's final norm and attention-pooling head, the
adaptor, the logit scale and bias at the full lr), no weight decay on norms, biases, embeddings,
SigLIP's probe token and the logit scale and bias, warm-up then cosine, gradient clipping. A
non-finite loss or gradient stops the run before the update, leaving the last checkpoint as it was.
"""

import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import embedder as EM
import model as M
from embed_cache import open_cache, read_meta
from images import ImageDataset, collate
from manifest import Manifest
from fused_losses import contrastive_loss, sigmoid_loss, structure_loss
from configurator import check
from filecheck import check_out_dir
from train_common import (StepLog, atomic_write, cosine_lr, global_batch, load_checkpoint,
                          model_fingerprint, recover, run_identity, save_checkpoint,
                          nonfinite_error, setup_distributed, teardown_distributed,
                          write_json)

# -----------------------------------------------------------------------------
method = "llm2clip"              # llm2clip | proclip | clip
manifest = "data/fashion/out/train.jsonl"
index_dir = ""                   # where the manifest's index goes; "" = beside it
                                 # (<manifest>.index/)
clip = ""                        # HF CLIP or SigLIP folder: image tower, logit scale (and bias);
                                 # clip: CLIP only, "" = from scratch
cache = "out/cache/train"        # llm2clip, proclip: embed_cache.py output over `manifest`
llm = "data/smollm2/hf"          # llm2clip, proclip: the LLM that made the cache (fingerprint
                                 # checked; evaluate.py runs it)
stage1 = ""                      # an adaptor folder to start from: ProCLIP stage 1's out_dir
                                 # (required for proclip); "" = fresh
out_dir = "out/stage2"
fields = "short,long"            # caption fields: each image takes one field at random per step,
                                 # then a caption of it
embed_dim = 0                    # joint width; 0: 1280 for llm2clip on a CLIP (a fresh projection),
                                 # the tower's own otherwise (a SigLIP tower's always: hidden_size,
                                 # it has no projection; from scratch 128)
loss = "softmax"                 # softmax: CLIP's InfoNCE, scale clamped to [0, ln 100]
                                 # | sigmoid: SigLIP's, + a bias, no clamp
ema_momentum = 0.999             # proclip: teacher <- m teacher + (1 - m) student after every step
                                 # (half-life ~700 steps)
distill_lambda = 0.01            # proclip: weight of L_ins + L_struct, for a rank batch of 128
                                 # (sums: see README)
struct_beta = 1.0                # proclip: SmoothL1 beta of L_struct
adaptor_lr_scale = 1.0           # llm2clip, proclip: the adaptor's lr as a multiple of lr (the
                                 # papers: 1; 0 freezes it; below 1 keeps more of ProCLIP stage 1's
                                 # alignment to CLIP's text tower: README)
# clip from scratch (clip=""): the base CLIP's sizes and tokenizer (an EOS token ends each caption)
tokenizer = "data/smollm2/hf"
image_size = 64
patch_size = 8
vision_width = 128
vision_layers = 4
text_width = 128
text_layers = 3
context_length = 16              # the base CLIP's short context: long captions are cut, as CLIP's
                                 # 77 tokens cut them
logit_scale_init = 0.0           # the initial multiplier s when the folder has none (0 = the
                                 # loss's: CLIP's 1/0.07, SigLIP's 10)
# optimisation
batch_size = 64                  # per rank
max_steps = 1000
warmup_steps = 50
lr = 1e-5                        # the head's and the adaptor's; layer k of L gets
                                 # lr * layer_decay^(L + 1 - k)
min_lr = 0.0
layer_decay = 0.85
weight_decay = 0.05
grad_clip = 5.0
seed = 1337
num_workers = 2                  # image decoding processes per rank (0: in the training process)
skip_bad = False                 # True: an unreadable image is replaced by the next readable one,
                                 # counted and listed; False: stop at the first
log_interval = 10
ckpt_interval = 200
halt_at = 0                      # stop after checkpointing at this step (tests resume with it);
                                 # 0 = off
fixed_batch = False              # train on step 0's batch forever (an overfitting check)
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype of the towers
                                                                # on a GPU
grad_checkpointing = False       # recompute each tower layer in the backward (real-size batches
                                 # need it: bench/memory.py)
overwrite = False                # True: write into an out_dir that holds files of other kinds
# -----------------------------------------------------------------------------
OUTPUTS = ("ckpt", "log.jsonl", "model")  # what it writes in out_dir
# a checkpoint resumes only with these settings unchanged (the data, its order, the run length, the
# sizes) and with the same content in these inputs (compared by fingerprint:
# train_common.run_identity)
MUST_MATCH = ("method", "loss", "batch_size", "seed", "max_steps", "fields", "skip_bad",
              "embed_dim", "image_size", "patch_size", "vision_width", "vision_layers",
              "text_width", "text_layers", "context_length")
INPUTS = {"llm2clip": ("manifest", "clip", "llm", "cache", "stage1"),
          "proclip": ("manifest", "clip", "llm", "cache", "stage1"),
          # (clip: the tokenizer when the CLIP starts from scratch)
          "clip": ("manifest", "clip", "tokenizer")}
LN100 = math.log(100.0)

def stage2_loss(img, txt, net, teacher_img=None):
    """This rank's loss -> (total, L_c). img, txt: normalised (B, D) embeddings; the kernels gather
    every rank's features, so L_c is over the global batch. L_c: CLIP's InfoNCE (loss=softmax) or
    SigLIP's sigmoid loss. ProCLIP (teacher_img: the EMA teacher's normalised embeddings u of the
    same images) adds distill_lambda * (L_ins + L_struct): L_ins = sum_i ||v_i - u_i||^2, L_struct
    the SmoothL1 between the two sets' pairwise distances (fused_losses/structure.py)."""
    if loss == "sigmoid":
        l_c = sigmoid_loss(img, txt, net.logit_scale.exp(), net.logit_bias)
    else:
        l_c = contrastive_loss(img, txt, net.logit_scale.exp())
    if teacher_img is None:
        return l_c, l_c
    l_ins = (img - teacher_img).pow(2).sum()
    return l_c + distill_lambda * (l_ins + structure_loss(img, teacher_img, beta=struct_beta)), l_c

class Stage2(nn.Module):
    """The trained towers: the image tower (ViT or SiglipViT), the text side (Adaptor over cached
    LLM embeddings, or a CLIP text tower over token ids), the logit scale, and the logit bias for
    the sigmoid loss (logit_bias=None: none). forward -> normalised (image, text) embeddings,
    fp32."""

    def __init__(self, vit, text, logit_scale, logit_bias=None):
        super().__init__()
        self.vit, self.text = vit, text
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.logit_bias = (None if logit_bias is None else
                           nn.Parameter(torch.tensor(float(logit_bias))))

    def forward(self, pixels, text):
        txt = self.text(*text) if isinstance(text, tuple) else self.text(text)
        return F.normalize(self.vit(pixels).float(), dim=-1), F.normalize(txt.float(), dim=-1)

def layer_id(name, n_layers):
    """0 for embeddings (and CLIP's pre-norm), k + 1 for encoder layer k, n_layers + 1 for the head:
    the final norm and CLIP's projection, or SigLIP's final norm and attention-pooling head."""
    parts = name.split(".")
    if "embeddings" in parts or "pre_layrnorm" in parts:
        return 0
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) + 1
    return n_layers + 1

def param_groups(net):
    """AdamW groups: layer-wise lr decay inside each tower (the adaptor at adaptor_lr_scale, logit
    scale and bias at the full lr), no weight decay on 1-d tensors (norms, biases, class embedding,
    logit scale and bias), embeddings and SigLIP's probe (the pooling head's learned query token:
    the part its class embedding plays in CLIP)."""
    groups = {}
    for name, p in net.named_parameters():
        tower = getattr(net, name.split(".")[0])
        scale = 1.0
        if isinstance(tower, (M.ViT, M.SiglipViT, M.CLIPTextTower)):
            n = tower.config.num_hidden_layers
            scale = layer_decay ** (n + 1 - layer_id(name, n))
        elif isinstance(tower, M.Adaptor):
            scale = adaptor_lr_scale
        decay = (0.0 if p.ndim < 2 or ".embeddings." in name or name.endswith(".head.probe") else
                 weight_decay)
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr_scale": s, "weight_decay": d}
            for (s, d), ps in sorted(groups.items())]

def initial_logits(path):
    """(log s, t) a run starts from, t None for the softmax loss: the folder's logit_scale and
    logit_bias when it has them (SigLIP folders have both, CLIP folders the scale, path "" neither),
    else the loss's own init: log s = log(1/0.07) for softmax (CLIP), log 10 and t = -10 for sigmoid
    (SigLIP), or log(logit_scale_init) if set. Softmax clamps log s into [0, ln 100] as it does
    after every step."""
    scale = M.read_logit_scale(path) if path else None
    bias = M.read_logit_bias(path) if path else None
    if scale is None:
        scale = math.log(logit_scale_init or (10.0 if loss == "sigmoid" else 1 / 0.07))
    if loss == "softmax":
        return min(max(float(scale), 0.0), LN100), None
    return float(scale), -10.0 if bias is None else float(bias)

def fresh_projection(vit, width):
    """Replace the ViT's projection by a new one `width` wide (CLIP's init: std = hidden^-0.5)."""
    vit.visual_projection = nn.Linear(vit.config.hidden_size, width, bias=False)
    nn.init.normal_(vit.visual_projection.weight, std=vit.config.hidden_size ** -0.5)
    vit.config.projection_dim = width

def clip_from_scratch(vocab_size, eos_token_id):
    width = embed_dim or 128
    vit = M.ViT(M.ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_width,
                            intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                            num_attention_heads=max(1, vision_width // 64), hidden_act="gelu",
                            projection_dim=width))
    text = M.CLIPTextTower(M.CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=context_length, hidden_size=text_width,
        intermediate_size=4 * text_width, num_hidden_layers=text_layers,
        num_attention_heads=max(1, text_width // 64),
        hidden_act="gelu", projection_dim=width, eos_token_id=eos_token_id))
    for m in (vit, text):  # CLIP-like init: small normal weights, zero biases, unit norms
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.02)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            elif "class_embedding" in name:
                nn.init.normal_(p, std=vision_width ** -0.5)
            else:
                nn.init.zeros_(p)
    return vit, text

def clip_tokenizer(path):
    """The tokenizer of `path`, made to end every caption with an end-of-text token if it does not
    already (CLIP's text tower pools at it): its own EOS when that is not also its padding, else
    <|endoftext|> (added if missing). -> (tokenizer, EOS id)."""
    tok = M.load_tokenizer(path)
    if tok.eos_token is not None and tok.eos_token != tok.pad_token:
        name = tok.eos_token
    else:
        name = "<|endoftext|>"
        if name not in tok.get_vocab():
            tok.add_tokens([name], special_tokens=True)
    eos = tok.convert_tokens_to_ids(name)
    if tok("a")["input_ids"][-1] != eos:
        from tokenizers.processors import TemplateProcessing
        tok._tokenizer.post_processor = TemplateProcessing(single=f"$A {name}",
                                                           special_tokens=[(name, eos)])
    if tok.pad_token is None:
        tok.pad_token = name
    return tok, eos

# -----------------------------------------------------------------------------
# the towers per method, and the export

def build_towers(man, names, device):
    """-> (image tower, text side, CLIP tokenizer or None, EMA teacher or None, cache arrays by
    field). clip: a CLIP's own text tower (from its folder, or both towers from scratch); llm2clip,
    proclip: the Adaptor over the cached LLM embeddings (fresh, or ProCLIP stage 1's), the tower
    re-aligned to it."""
    # ViT (CLIP) or SiglipViT (SigLIP), by model_type
    vit = M.load_image_tower(clip) if clip else None
    siglip = isinstance(vit, M.SiglipViT)
    if method == "clip":
        if siglip:
            raise ValueError(f"method=clip trains a CLIP with its own text tower, and clip={clip} "
                             f"is a SigLIP folder: model.py has no SigLIP text tower (re-align its "
                             f"image tower with method=llm2clip or proclip)")
        tok, eos = clip_tokenizer(clip or tokenizer)
        if clip:
            text = M.CLIPTextTower.from_pretrained(clip)
        else:
            vit, text = clip_from_scratch(len(tok), eos)
        if embed_dim and embed_dim != vit.embed_dim:
            raise ValueError(f"embed_dim {embed_dim}: method=clip keeps the CLIP's width "
                             f"{vit.embed_dim}")
        return vit, text, tok, None, {}
    if not clip:
        raise ValueError(f"method={method} needs clip= (an HF CLIP or SigLIP folder whose image "
                         f"tower is re-aligned)")
    # refuses another LLM's or manifest's cache
    arrays = {f: open_cache(cache, f, llm, man) for f in names}
    dim = arrays[names[0]].shape[1]
    if method == "llm2clip" and not siglip:
        fresh_projection(vit, embed_dim or 1280)
    elif embed_dim and embed_dim != vit.embed_dim:
        # SigLIP: no projection to re-initialise (its joint space is the attention-pooled output),
        # and adding one would make the export something transformers' SiglipVisionModel cannot load
        raise ValueError(f"embed_dim {embed_dim}: a SigLIP tower has no projection, so it keeps "
                         f"its own joint width {vit.embed_dim} (hidden_size, the pooled output); "
                         f"set embed_dim=0 or {vit.embed_dim}" if siglip else
                         f"embed_dim {embed_dim}: ProCLIP keeps CLIP's joint width {vit.embed_dim}")
    if stage1:
        text = M.Adaptor.from_pretrained(stage1)
    elif method == "proclip":
        raise ValueError("method=proclip needs stage1= (ProCLIP stage 1's out_dir with "
                         "adaptor.safetensors)")
    else:
        text = M.Adaptor.for_method("llm2clip", dim, vit.embed_dim)
    if (text.config.in_dim, text.config.out_dim) != (dim, vit.embed_dim):
        raise ValueError(f"{stage1}: the adaptor maps {text.config.in_dim} -> "
                         f"{text.config.out_dim}, this run needs {dim} (the cache) -> "
                         f"{vit.embed_dim} (the image tower's joint width)")
    teacher = (copy.deepcopy(vit).requires_grad_(False).eval().to(device) if method == "proclip"
               else None)
    return vit, text, None, teacher, arrays

def export(out, net, tok, config):
    """out_dir/model, swapped in whole: an HF folder that model.load_image_tower, evaluate.py and
    transformers load. clip: a CLIPModel folder; llm2clip, proclip: the image tower's folder
    (model.save_image_tower), the adaptor, and text.json (which LLM, its fingerprint, and how the
    cache embedded captions, so that evaluate.py embeds new captions the same way)."""
    def write(tmp):
        if method == "clip":
            M.save_clip(tmp, net.vit, net.text, tok, net.logit_scale, net.logit_bias)
            return
        M.save_image_tower(tmp, net.vit, net.logit_scale, net.logit_bias)
        net.text.save_pretrained(tmp)
        spec, _ = read_meta(cache)
        info = dict(llm=llm, llm_sha256=model_fingerprint(llm), method=method, loss=loss,
                    config=config)
        write_json(os.path.join(tmp, "text.json"), EM.put_spec(info, spec))
    atomic_write(out, write)

# -----------------------------------------------------------------------------

def check_settings(config):
    check(config, positive=("batch_size", "max_steps", "log_interval", "ckpt_interval", "lr",
                            "grad_clip", "image_size", "patch_size", "vision_width",
                            "vision_layers", "text_width", "text_layers", "context_length"),
          nonnegative=("warmup_steps", "min_lr", "weight_decay", "embed_dim", "distill_lambda",
                       "struct_beta", "adaptor_lr_scale", "logit_scale_init", "num_workers",
                       "halt_at"),
          choices={"method": ("llm2clip", "proclip", "clip"), "loss": ("softmax", "sigmoid"),
                   "dtype": ("float32", "bfloat16")},  # (fp16 would need a grad scaler)
          within={"ema_momentum": (0.0, 1.0)},
          rules=[(warmup_steps <= max_steps,
                  f"warmup_steps={warmup_steps}: more than max_steps={max_steps}"),
                 (min_lr <= lr, f"min_lr={min_lr}: more than lr={lr}"),
                 (0 < layer_decay <= 1, f"layer_decay={layer_decay}: must be within (0, 1]"),
                 (any(fields.split(",")),
                  f"fields={fields!r}: expected caption fields like 'short,long'")],
          folders=("out_dir",))

def main(config):
    check_settings(config)
    # out_dir is new, empty or this script's (filecheck.check_out_dir)
    check_out_dir(out_dir, "train_stage2.py", OUTPUTS, overwrite)
    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    amp = torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32") \
        if "cuda" in device else torch.autocast("cpu", enabled=False)
    torch.manual_seed(seed)  # fresh weights start the same on every rank and every run

    names = [f for f in fields.split(",") if f]
    # the manifest through its index (built once, in parallel, and checked on first use): memory
    # maps and lines read on demand, nothing per image in this process or its workers. Every image
    # needs captions in every field, and (unless skip_bad) an image file: refused now, naming the
    # lines
    man = Manifest(manifest, index_dir or None).check(fields=names,
                                                      images="skip" if skip_bad else "error")
    G = batch_size * world
    part = slice(rank * batch_size, (rank + 1) * batch_size)
    if len(man) < G:
        raise ValueError(f"{manifest}: {len(man)} images, fewer than one global batch ({G})")

    vit, text, tok, teacher, arrays = build_towers(man, names, device)
    net = Stage2(vit, text, *initial_logits(clip)).to(device)
    # the towers' encoders (CLIPEncoder) recompute each layer in the backward
    for m in net.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = grad_checkpointing
    # fused: one kernel for all tensors (on a CPU 10x faster than the default loop; CUDA has it too)
    opt = torch.optim.AdamW(param_groups(net), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    tensors = dict(net.state_dict())  # what a checkpoint holds (views of the live tensors)
    if teacher is not None:
        tensors.update({f"ema.{k}": v for k, v in teacher.state_dict().items()})
    ckpt = recover(os.path.join(out_dir, "ckpt"))
    # (a CLIP folder brings its own tokenizer)
    inputs = [k for k in INPUTS[method] if k != "tokenizer" or not clip]
    identity = run_identity(config, MUST_MATCH, inputs, man, names)
    start = load_checkpoint(ckpt, tensors, opt, identity) if os.path.isdir(ckpt) else 0
    model = (DDP(net, device_ids=[torch.cuda.current_device()] if "cuda" in device else None) if ddp
             else net)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        n_params = sum(p.numel() for p in net.parameters())
        print(f"{method} ({type(vit).__name__}, {loss} loss): {n_params / 1e6:.2f}M trainable "
              f"parameters, global batch {G}, "
              f"{'resuming at step ' + str(start) if start else 'from scratch'}")

    def batches():  # this rank's (image, epoch) pairs of every step from `start` on
        for step in range(start, max_steps):
            epoch, images, _ = global_batch(seed, step, len(man), G, fixed_batch)
            yield [(j, epoch) for j in images[part].tolist()]
    ds = ImageDataset(man, preprocess=vit.preprocess,  # the tower's own
                      train=True, seed=seed, skip_bad=skip_bad)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches(), num_workers=num_workers,
                                         collate_fn=collate, pin_memory="cuda" in device)

    def text_input(images, rng):  # this rank's images (as the loader served them)
        # per image of the global batch: which field, which caption; this rank's share
        u = rng.random((G, 2))[part]
        rows = sources  # (field, cache row, image, caption k of the image's captions there)
        rows.clear()
        for i, (a, b) in zip(images, u):
            f = names[int(a * len(names))]
            lo, hi = man.row_range(f, i)
            rows.append((f, lo + int(b * (hi - lo)), i, int(b * (hi - lo))))
        if method == "clip":
            ids, mask = text.tokenize(tok, [man.captions(i, f)[k] for f, _, i, k in rows])
            return ids.to(device), mask.to(device)
        # (B, D) from the memmaps
        e = np.stack([arrays[f][r] for f, r, _, _ in rows]).astype(np.float32)
        return torch.from_numpy(e).to(device)

    sources = []  # the text rows of the step's batch (for a message)
    bar = tqdm(total=max_steps, initial=start, desc=f"stage 2 {method}", unit="step",
               disable=not master)
    log = StepLog(os.path.join(out_dir, "log.jsonl"), max_steps, G, master, write=bar.write,
                  start=start)
    model.train()
    step, t_start = start, time.time()
    for pixels, idx, _ in loader:
        _, images, rng = global_batch(seed, step, len(man), G, fixed_batch)
        # the loader serves exactly this step's images (skip_bad: a bad one replaced by a later one)
        idx = idx.tolist()
        assert all(a == b or (ds.bad is not None and ds.bad[b])
                   for a, b in zip(idx, images[part].tolist()))
        lr_now = cosine_lr(step, lr, min_lr, warmup_steps, max_steps)
        for g in opt.param_groups:
            g["lr"] = lr_now * g["lr_scale"]
        pixels = pixels.to(device, non_blocking=True)
        with amp:
            img, txt = model(pixels, text_input(idx, rng))
            with torch.no_grad():
                u = None if teacher is None else F.normalize(teacher(pixels).float(), dim=-1)
            total, info = stage2_loss(img, txt, net, u)
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        # DDP averaged the gradients: every rank takes this branch
        if not torch.isfinite(gnorm).item():
            rows = "" if method == "clip" else f"; cache {cache} rows " + ", ".join(
                f"{f}[{r}]" for f, r, _, _ in sources[:8])
            raise nonfinite_error(step + 1, total, gnorm, rank, ckpt, manifest, idx, rows)
        opt.step()
        with torch.no_grad():
            if loss == "softmax":
                # CLIP's rule; SigLIP's loss leaves s free (its bias sets the threshold)
                net.logit_scale.clamp_(0, LN100)
            if teacher is not None:
                for pt, ps in zip(teacher.parameters(), net.vit.parameters()):
                    pt.lerp_(ps, 1 - ema_momentum)
        step += 1
        bar.update()
        if step % log_interval == 0 or step == max_steps or step == start + 1:
            bias = {} if net.logit_bias is None else {"logit_bias": net.logit_bias}
            log(step, {"loss": total, "infonce" if loss == "softmax" else "sigmoid": info},
                logit_scale=net.logit_scale.exp(), **bias, lr=lr_now, grad_norm=gnorm)
        if master and (step % ckpt_interval == 0 or step == max_steps or step == halt_at):
            save_checkpoint(ckpt, tensors, opt, step, config, identity)
        if step == halt_at:
            break
    bar.close()
    if ds.n_skipped:  # each rank's workers mark its own table: each rank lists what it replaced
        print(f"{manifest}: rank {rank}: skipping {ds.n_skipped} image(s) that could not be read "
              f"(each replaced by the next readable image):\n" +
              "\n".join(f"  line {ln}: {p}" for ln, p in ds.skipped()[:20]) +
              (f"\n  ... and {ds.n_skipped - 20} more" if ds.n_skipped > 20 else ""))
    if master and step == max_steps:
        export(os.path.join(out_dir, "model"), net, tok, config)
        print(f"done in {time.time() - t_start:.0f}s: {out_dir}/model")
    teardown_distributed()

if __name__ == "__main__":
    from configurator import configure
    main(configure(globals()))
