"""
Evaluation (DESIGN.md section 7): image-text retrieval R@1/5/10 both ways (short, long and multilingual
captions), zero-shot classification with templates, caption-to-caption retrieval. One model per run.

    python evaluate.py --model=out/demo/base_clip/model                                  # a CLIP, own text tower
    python evaluate.py --model=out/demo/llm2clip/model --cache=out/demo/cache/llm2clip_test  # stage 2 + cache
    python evaluate.py --model=out/demo/llm2clip/model                                   # runs the LLM instead
    python evaluate.py --model=data/smollm2/hf                                           # an LLM: c2c only

`model` is one of three kinds of folder:
  * a stage-2 output (train_stage2.py, has adaptor.json): ViT + adaptor over the LLM named in text.json;
    caption embeddings come from `cache` (embed_cache.py over `manifest` with that LLM: checked by
    fingerprint) or from running the LLM; zero-shot prompts always run the LLM.
  * an HF CLIP folder: the ViT and CLIP's own text tower (context-truncated like CLIP).
  * an HF Llama folder: caption-to-caption retrieval only (the stage-1 check), with the instruction on
    queries and not on the gallery, over `c2c_field` of the manifest and the CuPL set.
Protocols. Retrieval, multi-caption (Flickr30k/COCO): image->text is a hit if any caption of the image
is in the top k among all captions of the field; text->image if the caption's image is in the top k.
Identical caption strings count once, as a caption of each image that has it (the demo's short captions
repeat across images). Ties count against the query: a wrong item scores ahead of the right one when
its similarity is >= (so a collapsed model scores 0, not 100). Zero-shot: every template per class, embeddings normalised,
averaged, renormalised; logits 100 x cosine. Caption-to-caption: the nearest other caption must belong
to the same image (own entry excluded; captions alone in their group are not queries); `c2c_top1` in
the model's joint space, and for stage-2 models also `c2c_llm_top1` on the LLM embeddings themselves.
Out: a table and `out` (JSON: name, model, results, config, seconds).
"""

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
from dataset import ImageDataset, caption_rows, collate, read_manifest

# -----------------------------------------------------------------------------
model = "data/smollm2/hf"        # stage-2 folder, HF CLIP folder, or HF Llama folder (c2c only)
manifest = "data/fashion/out/test.jsonl"
retrieval = "short,long"         # caption fields for image-text retrieval
multilingual = "de,fr"           # caption fields in other languages ("" to skip); their mean is multilingual_*
classes = "data/fashion/out/classes.json"  # zero-shot: {"classes": [...], "templates": [...]}; "" to skip
c2c_field = "long"               # caption-to-caption retrieval within this field ("" to skip)
cache = ""                       # stage-2 models: embed_cache.py output over `manifest` by the model's LLM
llm = ""                         # stage-2 models: the LLM folder, if not where text.json says
cupl = "data/fashion/out/cupl.json"  # Llama mode: {"texts", "group"}; "" to skip
instruction = "Given a caption, retrieve a similar relevant caption."  # Llama mode: on c2c queries
name = ""                        # the row's name in the JSON
max_length = 512
batch_size = 64
out = "out/eval.json"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # the LLM's compute dtype
# -----------------------------------------------------------------------------

def retrieval_recall(img, txt, rel, ks=(1, 5, 10), chunk=1024):
    """Recall@k in percent, both ways. img (N_img, D), txt (N_txt, D) L2-normalised; rel (N_img, N_txt)
    bool, True where the text is a caption of the image. A query is a hit at k when fewer than k wrong
    items score >= its best right one (ties count against it). O(chunk x N) memory."""
    def ranks(q, items, right):  # per query: the number of wrong items at or above its best right item
        out = []
        for s in range(0, q.shape[0], chunk):
            sim, r = q[s:s + chunk] @ items.T, right[s:s + chunk]
            best = torch.where(r, sim, float("-inf")).amax(1, keepdim=True)
            out.append(((sim >= best) & ~r).sum(1))
        return torch.cat(out)
    rel = torch.as_tensor(rel, device=img.device)
    i2t, t2i = ranks(img, txt, rel), ranks(txt, img, rel.T)
    res = {}
    for k in ks:
        res[f"i2t_r{k}"] = 100.0 * (i2t < k).double().mean().item()
        res[f"t2i_r{k}"] = 100.0 * (t2i < k).double().mean().item()
    return res

def caption_relation(texts, image, n_images):
    """(rows of the distinct caption texts of a field, the (N_img, N_distinct) relation 'the image has this caption'.
    Identical captions of different images (the demo's "a shirt and three more items") are one text,
    right for each of its images: no tie between copies of one string decides a hit.)"""
    distinct, rows = {}, []  # text -> its column; the row of its first occurrence
    for r, t in enumerate(texts):
        if t not in distinct:
            distinct[t] = len(rows)
            rows.append(r)
    rel = torch.zeros(n_images, len(rows), dtype=torch.bool)
    rel[torch.as_tensor(image), torch.tensor([distinct[t] for t in texts])] = True
    return rows, rel

def zeroshot_classifier(embed, class_names, templates):
    """(C, D): each class's prompts embedded (embed: texts -> (N, D)), normalised, averaged, renormalised."""
    prompts = [t.format(c) for c in class_names for t in templates]
    e = F.normalize(embed(prompts).float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(e.mean(1), dim=-1)

def zeroshot_accuracy(img, class_emb, labels, ks=(1, 5)):
    """Top-k accuracy in percent of logits 100 img @ class_emb^T; ties count against the image."""
    logits = 100.0 * img @ class_emb.T
    labels = torch.as_tensor(labels, device=img.device)
    rank = (logits >= logits.gather(1, labels[:, None])).sum(1) - 1
    return {f"zeroshot_top{k}": 100.0 * (rank < k).double().mean().item() for k in ks if k <= class_emb.shape[0]}

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

# -----------------------------------------------------------------------------
# the text side of each kind of model: texts (or a manifest field) -> normalised embeddings

class LLMText:
    """A stage-2 model's text side: adaptor(LLM embedding), the LLM embedding from the cache when the
    texts are a cached field of the manifest, else from the LLM (loaded on first use)."""

    def __init__(self, path, records, device):
        with open(os.path.join(path, "text.json")) as f:
            self.info = json.load(f)
        self.llm_path = llm or self.info["llm"]
        self.adaptor = M.Adaptor.from_pretrained(path).to(device).eval()
        self.records, self.device, self.llm = records, device, None
        if cache:
            from embed_cache import model_fingerprint
            with open(os.path.join(cache, "meta.json")) as f:
                meta = json.load(f)
            if meta["instruction"] != self.info["instruction"]:
                raise ValueError(f"{cache}: embedded with instruction {meta['instruction']!r}, the model was "
                                 f"trained with {self.info['instruction']!r} ({path}/text.json)")
            if model_fingerprint(self.llm_path) != self.info["llm_sha256"]:
                raise ValueError(f"{self.llm_path}: not the LLM {path} was trained with (fingerprint differs)")

    def llm_embed(self, texts):
        if self.llm is None:
            self.llm = M.Llama.from_pretrained(self.llm_path, dtype=getattr(torch, dtype)).to(self.device).eval()
            self.tok = M.load_tokenizer(self.llm_path)
        return M.embed_texts(self.llm, self.tok, texts, self.info["instruction"], self.info["max_length"], batch_size)

    def raw(self, field):
        """(LLM embeddings, image of each caption) of a manifest field."""
        texts, image = caption_rows(self.records, field)
        if cache:
            from embed_cache import open_cache
            e = torch.from_numpy(np.asarray(open_cache(cache, field, self.llm_path, self.records), dtype=np.float32))
            return e.to(self.device), image
        return self.llm_embed(texts), image

    @torch.no_grad()
    def joint(self, e):
        return F.normalize(self.adaptor(e.to(self.device)).float(), dim=-1)

    def __call__(self, texts):
        return self.joint(self.llm_embed(texts))

class CLIPText:
    def __init__(self, path, records, device):
        self.tower = M.CLIPTextTower.from_pretrained(path).to(device).eval()
        self.tok, self.records, self.device = M.load_tokenizer(path), records, device

    @torch.no_grad()
    def __call__(self, texts):
        out = []
        for s in range(0, len(texts), batch_size):
            ids, mask = self.tower.tokenize(self.tok, texts[s:s + batch_size])
            out.append(F.normalize(self.tower(ids.to(self.device), mask.to(self.device)).float(), dim=-1))
        return torch.cat(out)

    def raw(self, field):
        texts, image = caption_rows(self.records, field)
        return self(texts), image

    def joint(self, e):
        return e

@torch.no_grad()
def image_embeddings(vit, records, device):
    ds = ImageDataset(manifest, size=vit.config.image_size, train=False, records=records)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    out = []
    for pixels, _, _ in tqdm(loader, desc="images", leave=False):
        out.append(F.normalize(vit(pixels.to(device)).float(), dim=-1))
    return torch.cat(out)

def model_kind(path):
    if os.path.isfile(os.path.join(path, "adaptor.json")):
        return "stage2"
    mt = M._read_config(path).get("model_type")
    if mt in ("clip", "llama"):
        return mt
    raise ValueError(f"{path}: neither a stage-2 output (adaptor.json), an HF CLIP folder nor an HF Llama "
                     f"folder (config.json model_type {mt!r})")

def evaluate_towers(kind, device):
    records = read_manifest(manifest)
    vit = M.ViT.from_pretrained(model).to(device).eval()
    text = (LLMText if kind == "stage2" else CLIPText)(model, records, device)
    img = image_embeddings(vit, records, device)
    results = {}
    fields = [f for f in retrieval.split(",") if f]
    langs = [f for f in multilingual.split(",") if f]
    for f in fields + langs:
        raw, image = text.raw(f)
        rows, rel = caption_relation(caption_rows(records, f)[0], image, len(records))
        for k, v in retrieval_recall(img, text.joint(raw)[rows], rel).items():
            results[f"{f}_{k}"] = v
        if f == c2c_field:
            results["c2c_top1"] = c2c_top1(text.joint(raw), text.joint(raw), image)
            if kind == "stage2":
                results["c2c_llm_top1"] = c2c_top1(raw, raw, image)
    if langs:
        for d in ("i2t", "t2i"):
            results[f"multilingual_{d}_r1"] = float(np.mean([results[f"{f}_{d}_r1"] for f in langs]))
    if c2c_field and c2c_field not in fields + langs:
        raw, image = text.raw(c2c_field)
        results["c2c_top1"] = c2c_top1(text.joint(raw), text.joint(raw), image)
        if kind == "stage2":
            results["c2c_llm_top1"] = c2c_top1(raw, raw, image)
    if classes:
        with open(classes) as f:
            spec = json.load(f)
        for key in ("classes", "templates"):
            if not spec.get(key):
                raise KeyError(f"{classes}: no {key!r} list (expected {{\"classes\": [...], \"templates\": [...]}})")
        missing = [i + 1 for i, r in enumerate(records) if not isinstance(r.get("label"), int)]
        if missing:
            raise ValueError(f"{manifest}:{missing[0]}: no int label for zero-shot classification "
                             f"({len(missing)} such lines); set classes='' to skip it")
        class_emb = zeroshot_classifier(text, spec["classes"], spec["templates"])
        results.update(zeroshot_accuracy(img, class_emb, [r["label"] for r in records]))
    return results

def evaluate_llm(device):
    """The stage-1 check: caption-to-caption top-1 of an LLM, instruction on queries only."""
    llm_model = M.Llama.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    tok = M.load_tokenizer(model)
    def c2c(texts, group):
        q = M.embed_texts(llm_model, tok, texts, instruction, max_length, batch_size)
        g = M.embed_texts(llm_model, tok, texts, "", max_length, batch_size) if instruction else q
        return c2c_top1(q, g, group)
    results = {}
    if c2c_field:
        texts, group = caption_rows(read_manifest(manifest), c2c_field)
        results[f"c2c_top1_{c2c_field}"] = c2c(texts, group)
    if cupl:
        with open(cupl) as f:
            c = json.load(f)
        results["c2c_top1_cupl"] = c2c(c["texts"], c["group"])
    return results

if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    kind = model_kind(model)
    results = evaluate_llm(device) if kind == "llama" else evaluate_towers(kind, device)
    print(f"{name or model}")
    print(f"{'metric':<28} {'%':>8}")
    for k, v in results.items():
        print(f"{k:<28} {v:8.2f}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    M.write_json(out, {"name": name, "model": model, "results": results, "config": config, "seconds": time.time() - t0})
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
