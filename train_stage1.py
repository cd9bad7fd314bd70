r"""
Stage 1: make the LLM's caption embeddings something CLIP can align to.

--method=llm2clip  caption-contrastive fine-tune of the LLM (supervised SimCSE, LLM2CLIP section 3):
    pairs of captions of the same image (each step draws one of the field pairs in `pairs` for its
    whole batch, then one caption of each field per image; a coin flip per step says which field is
    the query), the instruction on queries only, bidirectional attention, mean pooling over the
    caption's tokens (never BOS or the instruction),
    L = CE(50 * cos(q_i, p_j), j = i) with the positives of every rank as negatives, gathered with
    gradient. LoRA on the LLM. Out: out_dir/lora.safetensors and out_dir/merged/ (HF folder, LoRA
    merged).
--method=proclip   distil CLIP's text tower into adaptor(LLM embedding) (ProCLIP stage 1): the LLM
    is frozen and read from its embedding cache (embed_cache.py); only the adaptor trains, on
    L = sum_i ||s_i - c_i||^2 (two captions per image)
        + sum_{i<j} SmoothL1(||s_i - s_j|| - ||c_i - c_j||) (one caption per image)
    with c = the frozen CLIP text tower. Only captions the teacher reads whole are distilled: one
    that CLIP's context would cut (a long caption, for real CLIP's 77 tokens) would teach the
    adaptor to map a whole caption onto CLIP's embedding of its first tokens, throwing away exactly
    what the LLM adds; such captions are left out of both terms and counted in the log (the official
    code pairs the short caption with a second caption of the same kind).
    Out: out_dir/adaptor.safetensors + .json.

    python train_stage1.py config/stage1_llm2clip_demo.py
    torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_llm2clip_demo.py \
        --batch_size=256

Settings below; override with config files and --key=value (configurator.py). `batch_size` is per
rank. Every step's images and caption choices are a function of (seed, step) and of the global batch
only, so a resumed run (checkpoint every `ckpt_interval` steps, and at the end) ends with the same
weights as an uninterrupted one. For llm2clip, N ranks take the same step as one process with N
times the batch (the loss is a mean, the negatives are gathered). ProCLIP's two terms are sums over
each rank's own batch, as in the paper's code (not gathered; the gradients are averaged over ranks):
with more ranks each L_struct sees pairs within a rank only.
Caption template (`template`, embedder.caption_template): as the official code feeds
Llama-3-Instruct, every caption is wrapped in the model's chat user turn; "auto" picks the wrap from
the tokenizer's vocabulary (Llama 3's, ChatML for <|im_start|> vocabularies such as
SmolLM2-Instruct's, else none), "none" turns it off. Queries carry the instruction inside the wrap,
keys do not; only the caption and the wrap's tail are pooled. merged/embedder.json records how (an
embedder.EmbedSpec: attention, resolved template, instruction, max length, pooling);
embed_cache.py and evaluate.py refuse to embed the merged LLM with another attention or template.
Difference from the paper's setup, on purpose: no hard negatives (one positive per query).
"""

import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

import embedder as EM
import llama as LM
import model as M
from manifest import Manifest
from fused_losses import all_gather_with_grad, structure_loss
from configurator import check
from filecheck import check_out_dir
from train_common import (StepLog, cosine_lr, global_batch, load_checkpoint, nonfinite_error,
                          recover, run_identity, save_checkpoint, setup_distributed,
                          teardown_distributed)

# -----------------------------------------------------------------------------
method = "llm2clip"              # llm2clip | proclip
manifest = "data/fashion/out/train.jsonl"
index_dir = ""                   # where the manifest's index goes; "" = beside it
                                 # (<manifest>.index/)
model = "data/smollm2/hf"        # the LLM (HF Llama folder)
out_dir = "out/stage1_llm2clip"
pairs = "short:long"             # llm2clip: field pairs; each step draws one for its whole batch,
                                 # then per image a caption of each field ("a:b"; "a:a" two
                                 # different ones; "a=b" the same index of parallel fields, e.g.
                                 # "long=de": a caption and its translation)
instruction = "Given a caption, retrieve a similar relevant caption."  # on queries only
                                                                       # (the paper's)
template = "auto"                # caption template: "auto" (the tokenizer's chat wrap, if any),
                                 # "none", or "...{}..."
max_length = 512                 # tokens per caption, instruction included
attention = "bidirectional"      # llm2clip: "bidirectional" (LLM2Vec / the paper) or "causal" (the
                                 # plain decoder; the demo)
simcse_scale = 50.0              # 1 / temperature 0.02
lora_r = 16                      # the paper's LoRA: rank 16, alpha 32, dropout 0.05, all 7
                                 # projections
lora_alpha = 32
lora_dropout = 0.05
lora_top_layers = 0              # > 0: adapters on the last this-many layers only (backward stops
                                 # there); 0 = all (the paper)
grad_checkpointing = False
cache = "out/cache/raw_train"    # proclip: embed_cache.py output of the raw LLM over `manifest`
clip = ""                        # proclip: HF CLIP folder whose text tower is the teacher
ins_fields = "short,short"       # proclip: L_ins on one caption of each (a field may repeat);
                                 # L_struct on the first
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
halt_at = 0                      # stop after checkpointing at this step (tests resume with it);
                                 # 0 = off
fixed_batch = False              # train on step 0's batch forever (an overfitting check)
grad_dump = ""                   # debug: save each step's averaged gradients here
                                 # (safetensors; tests)
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
overwrite = False                # True: write into an out_dir that holds files of other kinds
# -----------------------------------------------------------------------------
OUTPUTS = ("ckpt", "log.jsonl", "lora.safetensors", "merged", "adaptor.safetensors",
           "adaptor.json")  # what it writes in out_dir
# a checkpoint resumes only with these settings unchanged (the data, its order, the run length, the
# sizes) and with the same content in these inputs (compared by fingerprint:
# train_common.run_identity)
MUST_MATCH = ("batch_size", "seed", "max_steps", "method", "template", "attention", "pairs",
              "ins_fields", "instruction", "max_length", "lora_r", "lora_alpha", "lora_top_layers",
              "adaptor_out")
INPUTS = {"llm2clip": ("manifest", "model"), "proclip": ("manifest", "model", "cache", "clip")}

def lr_at(step):
    return cosine_lr(step, lr, min_lr, warmup_steps, max_steps)

def field_pairs():
    """[(field a, field b, parallel)] from `pairs`: "a:b" draws any caption of each field, "a=b" the
    same caption index in both (parallel fields, e.g. a caption and its translation)."""
    out = []
    for p in pairs.split(","):
        sep = "=" if "=" in p else ":"
        a, _, b = p.partition(sep)
        if not a or not b or sep in b or (sep == "=" and a == b):
            raise ValueError(f"pairs={pairs!r}: expected field pairs like 'short:long,long=de' "
                             f"(a:b any captions of two fields, a=b the same index of two parallel "
                             f"fields)")
        out.append((a, b, sep == "="))
    return out

# -----------------------------------------------------------------------------
# losses

def simcse_loss(q, p, scale):
    """Supervised SimCSE (one direction): query i's positive is p_i among the positives of all
    ranks."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    # fp32 logits: at scale 50, bf16 would round by ~0.1
    with torch.autocast(q.device.type, enabled=False):
        logits = scale * q.float() @ all_gather_with_grad(p.float()).T  # (B, W B), with gradient
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels)

def llm2clip_step(llm, tok, tmpl, records, images, rng, part, device):
    # choices are drawn for the whole global batch, then this rank takes its part: the same samples
    # whatever the number of ranks
    # one field pair for the whole global batch, as the official code keeps each batch to one data
    # set: in a mixed batch the negatives of another kind (another language, short vs long) are told
    # apart by kind alone
    fp = field_pairs()
    fa, fb, parallel = fp[int(rng.integers(len(fp)))]
    a, b = [], []
    for i in images:
        ca, cb = records[i]["captions"][fa], records[i]["captions"][fb]
        j = int(rng.integers(len(ca)))
        if parallel and len(ca) != len(cb):
            raise ValueError(f"pairs: {fa}={fb} pairs caption k of {fa!r} with caption k of "
                             f"{fb!r}, but image {i} (line {i + 1}) has {len(ca)} and {len(cb)}")
        if parallel:
            k = j
        elif fa == fb and len(ca) > 1:  # two captions of one field: two different ones
            k = (j + 1 + int(rng.integers(len(ca) - 1))) % len(ca)
        else:
            k = int(rng.integers(len(cb)))
        a.append(ca[j])
        b.append(cb[k])
    # one coin for the whole batch: every query is of one field, every key of the other. With a coin
    # per image half of a query's negatives would be keys of the query's own kind (short vs long,
    # English vs German), which can be closer to it than its positive by kind alone
    if rng.random() < 0.5:
        a, b = b, a
    queries, keys = a[part], b[part]
    # tmpl: resolved
    q_ids, q_pre = EM.tokenize_for_embedding(tok, queries, instruction, max_length, tmpl)
    k_ids, _ = EM.tokenize_for_embedding(tok, keys, "", max_length, tmpl)
    # one forward for queries and keys together (unpadding makes the mixed lengths cheap)
    ids, mask = EM.pad_batch(q_ids + k_ids, device=device)
    pool = EM.skip_instruction(mask, q_pre + [0] * len(k_ids))
    emb = F.normalize(EM.mean_pool(llm(ids, mask), pool).float(), dim=-1)
    q, p = emb.split(len(queries))
    return simcse_loss(q, p, simcse_scale)

def teacher_reads_whole(clip_tok, teacher, texts):
    """Which texts fit the teacher's context untruncated (special tokens included)."""
    lengths = [len(ids) for ids in clip_tok(list(texts))["input_ids"]]
    return [n <= teacher.context_length for n in lengths]

def proclip_step(adaptor, teacher, clip_tok, caches, records, images, rng, part, device):
    """(L_ins + L_struct of this rank's images, how many drawn captions the teacher would cut)."""
    loss_ins, students, n_cut = 0.0, [], 0
    for k, field in enumerate(ins_fields.split(",")):
        rows_of = caches[field][1]  # image -> its caption rows in the cache
        # drawn for the global batch (as above)
        rows = [int(rng.choice(rows_of[i])) for i in images][part]
        whole = teacher_reads_whole(clip_tok, teacher, [caches[field][2][r] for r in rows])
        n_cut += len(rows) - sum(whole)
        rows = [r for r, w in zip(rows, whole) if w]  # distil only what the teacher reads whole
        if not rows:
            if k == 0:
                raise ValueError(f"ins_fields: every caption of field {field!r} drawn at this step "
                                 f"is longer than the teacher's {teacher.context_length}-token "
                                 f"context; distil from a field it reads whole")
            continue
        # (B', D) from the memmap
        e = torch.from_numpy(caches[field][0][rows].astype(np.float32)).to(device)
        ids, am = teacher.tokenize(clip_tok, [caches[field][2][r] for r in rows])
        with torch.no_grad(), torch.autocast(e.device.type, enabled=False):  # fp32 targets
            c = F.normalize(teacher(ids.to(device), am.to(device)).float(), dim=-1)
        s = F.normalize(adaptor(e).float(), dim=-1)
        loss_ins = loss_ins + (s - c).pow(2).sum()
        students.append((s, c))
    s, c = students[0]
    return loss_ins + structure_loss(s, c, beta=struct_beta), n_cut

# -----------------------------------------------------------------------------

def main(config):
    check(config, positive=("batch_size", "max_steps", "log_interval", "ckpt_interval",
                            "max_length", "lr", "simcse_scale", "lora_r", "lora_alpha",
                            "grad_clip"),
          nonnegative=("warmup_steps", "min_lr", "weight_decay", "lora_top_layers", "adaptor_out",
                       "struct_beta", "halt_at"),
          choices={"method": ("llm2clip", "proclip"),
                   "dtype": ("float32", "bfloat16"),  # (float16 needs a grad scaler)
                   "attention": EM.ATTENTION},
          rules=[(warmup_steps <= max_steps,
                  f"warmup_steps={warmup_steps}: more than max_steps={max_steps}"),
                 (min_lr <= lr, f"min_lr={min_lr}: more than lr={lr}"),
                 (0 <= lora_dropout < 1, f"lora_dropout={lora_dropout}: must be within [0, 1)"),
                 (method != "proclip" or clip,
                  "clip='': method=proclip needs an HF CLIP folder (its text tower teaches)"),
                 (all(ins_fields.split(",")),
                  f"ins_fields={ins_fields!r}: expected caption fields like 'short,short'")],
          folders=("out_dir",))
    # out_dir is new, empty or this script's (filecheck.check_out_dir)
    check_out_dir(out_dir, "train_stage1.py", OUTPUTS, overwrite)
    # the caption fields the run reads (a malformed `pairs` is refused now)
    used = sorted({f for a, b, _ in field_pairs() for f in (a, b)} if method == "llm2clip" else
                  set(ins_fields.split(",")))
    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    amp = torch.autocast("cuda", dtype=getattr(torch, dtype)) \
        if "cuda" in device and dtype != "float32" else torch.autocast("cpu", enabled=False)

    torch.manual_seed(seed)  # LoRA A and the adaptor start the same on every rank and every run
    # the manifest through its index (built and checked once, on first use): records[i] is read on
    # demand (stage 1 reads no images)
    records = Manifest(manifest, index_dir or None).check(images="ignore")
    G = batch_size * world
    # this rank's share of each global batch
    part = slice(rank * batch_size, (rank + 1) * batch_size)
    if len(records) < G:
        raise ValueError(f"{manifest}: {len(records)} images, fewer than one global batch ({G})")

    if method == "llm2clip":
        # every image must have captions in every field (and parallel fields as many): fail now, not
        # mid-run
        records.check(fields=used, images="ignore")
        # the frozen base in the compute dtype; the LoRA tensors add_lora creates stay fp32
        net = LM.Llama.from_pretrained(model, dtype=getattr(torch, dtype),
                                       causal=attention == "causal").to(device)
        LM.add_lora(net, lora_r, lora_alpha, lora_dropout, top_layers=lora_top_layers)
        net.grad_checkpointing = grad_checkpointing
        tok = M.load_tokenizer(model)
        tmpl = EM.caption_template(tok, template)  # resolved once: "" = no wrap
        if master:
            print(f"caption template {template!r}: "
                  + (repr(tmpl) if tmpl else "none (captions as given)"))
        step_fn = lambda images, rng: (  # noqa: E731
            llm2clip_step(net, tok, tmpl, records, images, rng, part, device), None)
    else:
        from embed_cache import open_cache
        teacher = M.CLIPTextTower.from_pretrained(clip).to(device).eval().requires_grad_(False)
        clip_tok = M.load_tokenizer(clip)
        caches = {}
        for field in ins_fields.split(","):
            records.check(fields=[field], images="ignore")
            # (array, image -> its rows, row -> its text): lazy views
            caches[field] = (open_cache(cache, field, model, records), records.rows_of(field),
                             records.texts_of(field))
        dim = caches[ins_fields.split(",")[0]][0].shape[1]
        net = M.Adaptor.for_method("proclip", dim,
                                   adaptor_out or teacher.config.projection_dim).to(device)
        step_fn = lambda images, rng: proclip_step(  # noqa: E731
            net, teacher, clip_tok, caches, records, images, rng, part, device)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    # no decay on norms and biases (1-d tensors)
    groups = [{"params": [p for p in trainable.values() if p.ndim >= 2],
               "weight_decay": weight_decay},
              {"params": [p for p in trainable.values() if p.ndim < 2], "weight_decay": 0.0}]
    # one kernel for all tensors
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)

    ckpt = recover(os.path.join(out_dir, "ckpt"))
    identity = run_identity(config, MUST_MATCH, INPUTS[method], records, used)
    step = load_checkpoint(ckpt, trainable, opt, identity) if os.path.isdir(ckpt) else 0
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"{method}: {sum(p.numel() for p in trainable.values()) / 1e6:.2f}M trainable "
              f"parameters, global batch {G}, "
              f"{'resuming at step ' + str(step) if step else 'from scratch'}")
    log = StepLog(os.path.join(out_dir, "log.jsonl"), max_steps, G, master, start=step)
    net.train()
    t_start = time.time()
    while step < max_steps:
        _, images, rng = global_batch(seed, step, len(records), G, fixed_batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # dropout: a function of (step, rank), for resume
        torch.manual_seed(seed + 100003 * step + rank)
        with amp:
            loss, n_cut = step_fn(images, rng)
        opt.zero_grad(set_to_none=True)
        # the loss of each rank is its share; the sum over ranks is the global objective's
        # gradient x W
        loss.backward()
        # few trainable tensors (LoRA or adaptor): one flat all-reduce, averaged as DDP does
        if ddp:
            params = list(trainable.values())
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)
            flat /= world
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        if grad_dump and master:
            save_file({k: p.grad.detach().cpu().contiguous() for k, p in trainable.items()},
                      grad_dump)
        gnorm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), grad_clip)
        if not torch.isfinite(gnorm).item():  # (the same on every rank: gradients all-reduced)
            more = f"; cache {cache} rows of those images in {ins_fields}" \
                if method == "proclip" else ""
            raise nonfinite_error(step + 1, loss, gnorm, rank, ckpt, manifest, images[part], more)
        opt.step()
        step += 1
        if step % log_interval == 0 or step == max_steps or step == 1:
            # the global loss (llm2clip); the mean of the ranks' sums (proclip)
            # proclip: captions left out (this rank)
            extra = {} if n_cut is None else {"cut_by_teacher": n_cut}
            log(step, {"loss": loss}, lr=lr_at(step - 1), grad_norm=gnorm, **extra)
        if master and (step % ckpt_interval == 0 or step == max_steps or step == halt_at):
            save_checkpoint(ckpt, trainable, opt, step, config, identity)
        if step == halt_at:
            break

    if master and step == max_steps:
        net.eval()
        if method == "llm2clip":
            LM.save_lora(net, os.path.join(out_dir, "lora.safetensors"))
            # how the merged LLM embeds: embed_cache.py and evaluate.py refuse other settings
            spec = EM.EmbedSpec(instruction, max_length, tmpl, attention)
            record = {EM.EMBEDDER_JSON: EM.put_spec({}, spec)}
            net.save_pretrained(os.path.join(out_dir, "merged"), json_files=record)
        else:
            net.save_pretrained(out_dir)
        print(f"done in {time.time() - t_start:.0f}s: {out_dir}")
    teardown_distributed()

if __name__ == "__main__":
    from configurator import configure
    main(configure(globals()))
