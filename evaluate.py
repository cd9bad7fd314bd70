"""
Evaluation. So far: caption-to-caption retrieval, the paper's stage-1 check (DESIGN.md section 7): for
every caption, is its nearest other caption one of the same image (or, for CuPL, of the same class)?
Queries carry the stage-1 instruction, the gallery does not, as in training. Image-text retrieval and
zero-shot classification follow with stage 2.

    python evaluate.py --model=data/smollm2/hf                                  # raw LLM
    python evaluate.py --model=out/stage1_llm2clip/merged --out=out/c2c_after.json  # after stage 1

In: an HF Llama folder, a manifest (its `fields` captions) and the CuPL descriptions (cupl.json written
by data/fashion/prepare.py). Out: a printed table and a JSON file.
"""

import json
import os
import time

import torch

import model as M
from dataset import caption_rows, read_manifest

# -----------------------------------------------------------------------------
model = "data/smollm2/hf"        # HF Llama folder (raw, or stage 1's merged output)
manifest = "data/fashion/out/test.jsonl"
fields = "long"                  # caption fields pooled into one c2c set (captions of one image = a group)
cupl = "data/fashion/out/cupl.json"  # {"texts", "group"}; "" to skip
instruction = "Given a caption, retrieve a similar relevant caption."  # on queries; "" for none
max_length = 512
batch_size = 64
out = "out/c2c.json"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"
# -----------------------------------------------------------------------------

def c2c_top1(queries, gallery, group):
    """Top-1 caption-to-caption retrieval, in percent. queries[i] and gallery[i] embed caption i (as a
    query and as a gallery item; L2-normalised rows); group[i] is its image or class. Caption i's own
    gallery entry is excluded; captions alone in their group are not queries."""
    group = torch.as_tensor(group, device=queries.device)
    sim = queries @ gallery.T  # (N, N): evaluation sets are small; chunk this for large ones
    sim.fill_diagonal_(float("-inf"))
    has_peer = (group[:, None] == group[None, :]).sum(1) > 1
    hit = group[sim.argmax(1)] == group
    return 100.0 * hit[has_peer].float().mean().item()

def c2c(llm, tok, texts, group):
    q = M.embed_texts(llm, tok, texts, instruction, max_length, batch_size)
    g = M.embed_texts(llm, tok, texts, "", max_length, batch_size) if instruction else q
    return c2c_top1(q, g, group)

if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    llm = M.Llama.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    tok = M.load_tokenizer(model)
    results = {}
    records = read_manifest(manifest)
    texts, group = [], []
    for f in fields.split(","):
        t, g = caption_rows(records, f)
        texts += t
        group += g.tolist()
    results[f"c2c_top1_{fields.replace(',', '+')}"] = c2c(llm, tok, texts, group)
    if cupl:
        with open(cupl) as f:
            c = json.load(f)
        results["c2c_top1_cupl"] = c2c(llm, tok, c["texts"], c["group"])
    print(f"{'metric':<28} {'top-1 %':>8}")
    for k, v in results.items():
        print(f"{k:<28} {v:8.2f}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"results": results, "config": config, "seconds": time.time() - t0}, f, indent=2)
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
