"""
Stage 1: make the LLM's caption embeddings something CLIP can align to.

--method=llm2clip  caption-contrastive fine-tune of the LLM (supervised SimCSE, LLM2CLIP section 3):
    pairs of captions of the same image (one from `query_field`, one from `key_field`; a coin flip says
    which is the query), the instruction on queries only, bidirectional attention, mean pooling,
    L = CE(50 * cos(q_i, p_j), j = i) with the positives of every rank as negatives, gathered with
    gradient. LoRA on the LLM. Out: out_dir/lora.safetensors and out_dir/merged/ (HF folder, LoRA merged).
--method=proclip   distil CLIP's text tower into adaptor(LLM embedding) (ProCLIP stage 1): the LLM is
    frozen and read from its embedding cache (embed_cache.py); only the adaptor trains, on
    L = sum_i ||s_i - c_i||^2 (two captions per image) + sum_{i<j} SmoothL1(||s_i - s_j|| - ||c_i - c_j||)
    (one caption per image) with c = the frozen CLIP text tower. Out: out_dir/adaptor.safetensors + .json.

    python train_stage1.py config/stage1_llm2clip_demo.py
    torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_llm2clip_demo.py --batch_size=256

Settings below; override with config files and --key=value (configurator.py). `batch_size` is per rank.
Every step's images and caption choices are a function of (seed, step) and of the global batch only, so
a resumed run (checkpoint every `ckpt_interval` steps, and at the end) ends with the same weights as an
uninterrupted one. For llm2clip, N ranks take the same step as one process with N times the batch (the
loss is a mean, the negatives are gathered). ProCLIP's two terms are sums over each rank's own batch, as
in the paper's code (DESIGN.md section 4): with more ranks each L_struct sees pairs within a rank only.
Differences from the paper's setup, on purpose: no chat template around captions (the LLM2Vec-style
"instruction caption" text is used for every model) and no hard negatives (one positive per query).
"""

import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

import model as M
from dataset import caption_rows, read_manifest, rows_by_image
from kernels import all_gather_with_grad, structure_loss
from train_common import (StepLog, cosine_lr, global_batch, load_checkpoint, save_checkpoint, setup_distributed,
                          teardown_distributed)

# -----------------------------------------------------------------------------
method = "llm2clip"              # llm2clip | proclip
manifest = "data/fashion/out/train.jsonl"
model = "data/smollm2/hf"        # the LLM (HF Llama folder)
out_dir = "out/stage1_llm2clip"
query_field = "short"            # llm2clip: the pair's two caption fields (a coin flip picks the query)
key_field = "long"
instruction = "Given a caption, retrieve a similar relevant caption."  # on queries only (the paper's)
max_length = 512                 # tokens per caption, instruction included
simcse_scale = 50.0              # 1 / temperature 0.02
lora_r = 16                      # the paper's LoRA: rank 16, alpha 32, dropout 0.05, all 7 projections
lora_alpha = 32
lora_dropout = 0.05
grad_checkpointing = False
cache = "out/cache/raw_train"    # proclip: embed_cache.py output of the raw LLM over `manifest`
clip = ""                        # proclip: HF CLIP folder whose text tower is the teacher
ins_fields = "short,long"        # proclip: L_ins on one caption of each; L_struct on the first
struct_beta = 1.0
adaptor_out = 0                  # proclip: joint width; 0 = the CLIP text tower's projection width
batch_size = 32                  # per rank
max_steps = 200
warmup_steps = 20                # linear warm-up, then cosine to min_lr
lr = 2e-4
min_lr = 2e-5
weight_decay = 0.0
grad_clip = 1.0
seed = 1337
log_interval = 10
ckpt_interval = 100
halt_at = 0                      # stop after checkpointing at this step (tests resume with it); 0 = off
fixed_batch = False              # train on step 0's batch forever (an overfitting check)
grad_dump = ""                   # debug: save each step's averaged gradients here (safetensors; tests)
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------
MUST_MATCH = ("batch_size", "seed", "max_steps", "method")  # a checkpoint resumes only with these unchanged

def lr_at(step):
    return cosine_lr(step, lr, min_lr, warmup_steps, max_steps)

def pick(records, images, field, rng):
    return [rng.choice(records[i]["captions"][field]) for i in images]

# -----------------------------------------------------------------------------
# losses

def simcse_loss(q, p, scale):
    """Supervised SimCSE (one direction): query i's positive is p_i among the positives of all ranks."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    with torch.autocast(q.device.type, enabled=False):  # fp32 logits: at scale 50, bf16 would round by ~0.1
        logits = scale * q.float() @ all_gather_with_grad(p.float()).T  # (B, W B), with gradient
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels)

def llm2clip_step(llm, tok, records, images, rng, part, device):
    # choices are drawn for the whole global batch, then this rank takes its part: the same samples
    # whatever the number of ranks
    a = pick(records, images, query_field, rng)
    b = pick(records, images, key_field, rng)
    flip = rng.random(len(images)) < 0.5
    queries = [y if f else x for x, y, f in zip(a, b, flip)][part]
    keys = [x if f else y for x, y, f in zip(a, b, flip)][part]
    q_ids, q_pre = M.tokenize_for_embedding(tok, queries, instruction, max_length)
    k_ids, _ = M.tokenize_for_embedding(tok, keys, "", max_length)
    # one forward for queries and keys together (unpadding makes the mixed lengths cheap)
    ids, mask = M.pad_batch(q_ids + k_ids, device=device)
    pool = M.skip_instruction(mask, q_pre + [0] * len(k_ids))
    emb = F.normalize(M.mean_pool(llm(ids, mask), pool).float(), dim=-1)
    q, p = emb.split(len(queries))
    return simcse_loss(q, p, simcse_scale)

def proclip_step(adaptor, teacher, clip_tok, caches, records, images, rng, part, device):
    loss_ins = 0.0
    students = []
    for field in ins_fields.split(","):
        rows_of = caches[field][1]  # image -> its caption rows in the cache
        rows = [int(rng.choice(rows_of[i])) for i in images][part]  # drawn for the global batch (as above)
        texts = [caches[field][2][r] for r in rows]
        e = torch.from_numpy(caches[field][0][rows].astype(np.float32)).to(device)  # (B, D) from the memmap
        ids, am = teacher.tokenize(clip_tok, texts)
        with torch.no_grad(), torch.autocast(e.device.type, enabled=False):  # fp32 targets
            c = F.normalize(teacher(ids.to(device), am.to(device)).float(), dim=-1)
        s = F.normalize(adaptor(e).float(), dim=-1)
        loss_ins = loss_ins + (s - c).pow(2).sum()
        students.append((s, c))
    s, c = students[0]
    return loss_ins + structure_loss(s, c, beta=struct_beta)

# -----------------------------------------------------------------------------

def main(config):
    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    if method not in ("llm2clip", "proclip"):
        raise ValueError(f"method {method!r}: expected llm2clip or proclip")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: float32 or bfloat16 (float16 would need a gradient scaler)")
    amp = torch.autocast("cuda", dtype=getattr(torch, dtype)) if "cuda" in device and dtype != "float32" \
        else torch.autocast("cpu", enabled=False)

    torch.manual_seed(seed)  # LoRA A and the adaptor start the same on every rank and every run
    records = read_manifest(manifest)
    G = batch_size * world
    part = slice(rank * batch_size, (rank + 1) * batch_size)  # this rank's share of each global batch
    if len(records) < G:
        raise ValueError(f"{manifest}: {len(records)} images, fewer than one global batch ({G})")

    if method == "llm2clip":
        for f in (query_field, key_field):
            caption_rows(records, f)  # every image must have captions in both fields: fail now, not mid-run
        # the frozen base in the compute dtype; the LoRA tensors add_lora creates stay fp32
        net = M.Llama.from_pretrained(model, dtype=getattr(torch, dtype)).to(device)
        M.add_lora(net, lora_r, lora_alpha, lora_dropout)
        net.grad_checkpointing = grad_checkpointing
        tok = M.load_tokenizer(model)
        step_fn = lambda images, rng: llm2clip_step(net, tok, records, images, rng, part, device)  # noqa: E731
    else:
        from embed_cache import open_cache
        teacher = M.CLIPTextTower.from_pretrained(clip).to(device).eval().requires_grad_(False)
        clip_tok = M.load_tokenizer(clip)
        caches = {}
        for field in ins_fields.split(","):
            texts, image_index = caption_rows(records, field)
            caches[field] = (open_cache(cache, field, model, records), rows_by_image(image_index), texts)
        dim = caches[ins_fields.split(",")[0]][0].shape[1]
        net = M.Adaptor.for_method("proclip", dim, adaptor_out or teacher.config.projection_dim).to(device)
        step_fn = lambda images, rng: proclip_step(net, teacher, clip_tok, caches, records, images, rng, part, device)  # noqa: E731
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    # no decay on norms and biases (1-d tensors)
    groups = [{"params": [p for p in trainable.values() if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable.values() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)

    ckpt = M.recover(os.path.join(out_dir, "ckpt"))
    step = load_checkpoint(ckpt, trainable, opt, config, MUST_MATCH) if os.path.isdir(ckpt) else 0
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"{method}: {sum(p.numel() for p in trainable.values()) / 1e6:.2f}M trainable parameters, "
              f"global batch {G}, {'resuming at step ' + str(step) if step else 'from scratch'}")
    log = StepLog(os.path.join(out_dir, "log.jsonl"), max_steps, G, master)
    net.train()
    t_start = time.time()
    while step < max_steps:
        _, images, rng = global_batch(seed, step, len(records), G, fixed_batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        torch.manual_seed(seed + 100003 * step + rank)  # dropout: a function of (step, rank), for resume
        with amp:
            loss = step_fn(images, rng)
        opt.zero_grad(set_to_none=True)
        # the loss of each rank is its share; the sum over ranks is the global objective's gradient x W
        loss.backward()
        if ddp:  # few trainable tensors (LoRA or adaptor): one flat all-reduce, averaged as DDP does
            params = list(trainable.values())
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)
            flat /= world
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        if grad_dump and master:
            save_file({k: p.grad.detach().cpu().contiguous() for k, p in trainable.items()}, grad_dump)
        gnorm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), grad_clip)
        opt.step()
        step += 1
        if step % log_interval == 0 or step == max_steps or step == 1:
            # the global loss (llm2clip); the mean of the ranks' sums (proclip)
            log(step, {"loss": loss}, lr=lr_at(step - 1), grad_norm=gnorm)
        if master and (step % ckpt_interval == 0 or step == max_steps or step == halt_at):
            save_checkpoint(ckpt, trainable, opt, step, config)
        if step == halt_at:
            break

    if master and step == max_steps:
        net.eval()
        if method == "llm2clip":
            M.save_lora(net, os.path.join(out_dir, "lora.safetensors"))
            net.save_pretrained(os.path.join(out_dir, "merged"))
        else:
            net.save_pretrained(out_dir)
        print(f"done in {time.time() - t_start:.0f}s: {out_dir}")
    teardown_distributed()

if __name__ == "__main__":
    from configurator import configure
    main(configure(globals()))
