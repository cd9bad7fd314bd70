"""
Evaluation (DESIGN.md section 7): image-text retrieval R@1/5/10 both ways (short, long and multilingual
captions), zero-shot classification with templates, caption-to-caption retrieval. One model per run;
the baseline (a CLIP with its own text tower) goes through the same code as the LLM models.

    python evaluate.py --model=out/demo/base_clip/model --name=base_clip                       # a CLIP
    python evaluate.py --model=out/demo/llm2clip/model --cache=out/demo/cache/llm2clip_test   # stage 2, cached
    python evaluate.py --model=out/demo/llm2clip/model                                        # runs the LLM
    python evaluate.py --model=data/smollm2/hf --out=out/c2c.json                             # an LLM: c2c only

In: `model`, one of three kinds of folder, told apart by their files:
  * stage 2 (train_stage2.py; adaptor.json + text.json): the ViT (an HF CLIPVisionModelWithProjection
    folder) and, for text, normalize(adaptor(e)) with e the embedding of the LLM named in text.json
    (made with its instruction and max length). Caption embeddings come from `cache` (embed_cache.py over
    `manifest` by that very LLM: fingerprints checked) or from running the LLM; prompts that are not
    manifest captions (zero-shot) always run it. The LLM is loaded only if some text needs it.
  * an HF CLIP folder (model_type "clip", with its tokenizer): the ViT and CLIP's own text tower,
    inputs truncated to its context like CLIP.
  * an HF Llama folder (model_type "llama"): caption-to-caption retrieval only, the stage-1 check, with
    `instruction` on the queries and not on the gallery, over `c2c_field` of `manifest` and the CuPL set.
  and a manifest (dataset.py) whose images and caption fields are evaluated, `classes` for zero-shot.
Out: a table on stdout and `out`: {"name", "model", "results": {metric: percent}, "counts", "config", "seconds"}.

Protocols (all numbers in percent):
  retrieval, several captions per image (Flickr30k/COCO): image->text is a hit at k if any caption of
    the image is among the k best of all the field's captions; text->image if the caption's image is
    among the k best images. Identical caption strings of a field are one text, a caption of every image
    that has it (the demo's short captions repeat: 1500 captions, 130 distinct strings), so no copy of a
    string competes with itself. With one caption per image this is plain argmax retrieval.
  ties count against the query everywhere: a wrong item scoring >= the best right one ranks ahead of it
    (NaN too), so a collapsed model scores 0, never 100, and no result depends on the order of rows.
  zero-shot: each class name in every template, embedded, normalised, averaged, renormalised; logits
    100 x cosine; top-k for every k below the number of classes (top-k of k classes is always 100).
  caption-to-caption: the best other caption (own entry excluded) must be of the same image (group);
    captions alone in their group are not queries. `c2c_top1` in the joint space (the text tower's or
    the adaptor's output); for stage-2 models also `c2c_llm_top1` on the LLM embeddings before the adaptor.
"""

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
from dataset import ImageDataset, caption_rows, check_manifest, collate, read_manifest
from embed_cache import model_fingerprint, open_cache

# -----------------------------------------------------------------------------
model = ""                       # stage-2 folder, HF CLIP folder, or HF Llama folder (c2c only, the stage-1 check)
manifest = "data/fashion/out/test.jsonl"
retrieval = "short,long"         # caption fields for image-text retrieval
multilingual = "de"              # caption fields in languages stage 1 taught ("" to skip); their mean is multilingual_*
multilingual_unseen = "fr"       # languages no stage trained on ("" to skip); their mean is multilingual_unseen_*
classes = "data/fashion/out/classes.json"  # zero-shot: {"classes": [...], "templates": ["a photo of {}.", ...]}; "" to skip
zeroshot_manifest = "data/fashion/out/zeroshot.jsonl"  # zero-shot on these labelled images ("" = `manifest`'s)
c2c_field = "long"               # caption-to-caption retrieval within this field ("" to skip)
cache = ""                       # stage 2: embed_cache.py output over `manifest` by the model's LLM; "" = run the LLM
llm = ""                         # stage 2: the LLM folder, if not where text.json says (fingerprint checked)
cupl = "data/fashion/out/cupl.json"  # Llama mode: {"texts": [...], "group": [...]}; "" to skip
instruction = "Given a caption, retrieve a similar relevant caption."  # Llama mode: on c2c queries; "" for none
name = ""                        # the row's name in the JSON ("" = the model path)
max_length = 512                 # Llama mode: tokens per caption (stage 2 uses text.json's)
batch_size = 64
out = "out/eval.json"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # the LLM's compute dtype
# -----------------------------------------------------------------------------
# metrics: pure functions of normalised embeddings

def _misses(queries, items, q_idx, i_idx, chunk):
    """Per query: the number of wrong items that score at least as high as its best right item (NaN
    counts as high). (q_idx[p], i_idx[p]) are the right (query, item) pairs. O(chunk x N_items) memory."""
    out = []
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s:s + chunk] @ items.T  # (C, N_items)
        right = torch.zeros_like(sim, dtype=torch.bool)
        m = (q_idx >= s) & (q_idx < s + chunk)
        right[q_idx[m] - s, i_idx[m]] = True
        best = torch.where(right, sim, float("-inf")).amax(1, keepdim=True)  # (C, 1); -inf: no right item
        out.append((~(sim < best) & ~right).sum(1))
    return torch.cat(out)

def retrieval_recall(img, txt, txt_image, ks=(1, 5, 10), chunk=1024):
    """Recall@k in percent, both ways: {"i2t_r1": ..., "t2i_r1": ..., ...}. img (N_img, D) and txt
    (N_txt, D) L2-normalised; txt_image[r] is the image of caption r (an int), or the images of a caption
    string that several images share (a list). image->text: a hit at k if fewer than k wrong captions
    score >= the image's best caption; text->image: if fewer than k wrong images score >= its image."""
    pairs = [(int(i), r) for r, own in enumerate(txt_image) for i in (own if isinstance(own, (list, tuple, set)) else [own])]
    img_idx, txt_idx = torch.tensor(pairs, dtype=torch.long, device=img.device).reshape(-1, 2).T
    i2t = _misses(img, txt, img_idx, txt_idx, chunk)  # (N_img,)
    t2i = _misses(txt, img, txt_idx, img_idx, chunk)  # (N_txt,)
    res = {}
    for k in ks:
        res[f"i2t_r{k}"] = 100.0 * (i2t < k).double().mean().item()
    for k in ks:
        res[f"t2i_r{k}"] = 100.0 * (t2i < k).double().mean().item()
    return res

def distinct_captions(texts, image):
    """Identical strings of one field merged: (row of each distinct text's first occurrence, the images
    that have it, sorted), for retrieval_recall(img, txt[rows], owners)."""
    where, rows, owners = {}, [], []
    for r, (t, i) in enumerate(zip(texts, image)):
        if t not in where:
            where[t] = len(rows)
            rows.append(r)
            owners.append(set())
        owners[where[t]].add(int(i))
    return rows, [sorted(o) for o in owners]

def zeroshot_classifier(text_embed_fn, classes, templates):
    """(C, D) class embeddings: every template filled with each class name, embedded (text_embed_fn:
    list of texts -> (N, D)), normalised, averaged over the templates, renormalised."""
    prompts = [t.format(c) for c in classes for t in templates]  # class-major
    e = F.normalize(text_embed_fn(prompts).float(), dim=-1)
    return F.normalize(e.view(len(classes), len(templates), -1).mean(1), dim=-1)  # (C, D)

def zeroshot_accuracy(img, class_emb, labels, ks=(1, 5)):
    """{"zeroshot_top1": ..., ...} in percent: logits 100 img @ class_emb^T; an image is right at k if
    fewer than k other classes score >= its label's (ties and NaN against it). Only k < C is reported."""
    logits = 100.0 * img.float() @ class_emb.float().T  # (N, C)
    labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    ahead = (~(logits < logits.gather(1, labels[:, None]))).sum(1) - 1  # the label itself is not < itself
    return {f"zeroshot_top{k}": 100.0 * (ahead < k).double().mean().item() for k in ks if k < class_emb.shape[0]}

def c2c_top1(queries, gallery, group, chunk=1024):
    """Top-1 caption-to-caption retrieval, in percent. queries[i] and gallery[i] embed caption i (as a
    query and as a gallery item; L2-normalised rows); group[i] is its image or class. Caption i's own
    gallery entry is excluded; captions alone in their group are not queries; a hit needs the best peer
    of the group to score strictly above every caption of another group."""
    group = torch.as_tensor(np.asarray(group), device=queries.device)
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    has_peer = counts[inverse] > 1
    if not has_peer.any():
        raise ValueError("c2c_top1: no caption shares its group with another (one caption per image?)")
    hits = []
    for s in range(0, len(group), chunk):
        sim = queries[s:s + chunk] @ gallery.T  # (C, N)
        own = torch.arange(s, s + sim.shape[0], device=sim.device)
        right = group[s:s + chunk, None] == group[None, :]  # (C, N): same group ...
        right[own - s, own] = False                          # ... but not itself
        wrong = group[s:s + chunk, None] != group[None, :]
        best = torch.where(right, sim, float("-inf")).amax(1, keepdim=True)
        hits.append((~(sim < best) & wrong).sum(1) == 0)
    return 100.0 * torch.cat(hits)[has_peer].double().mean().item()

# -----------------------------------------------------------------------------
# inputs

def model_kind(path):
    """"stage2", "clip" or "llama", from the folder's files."""
    if os.path.isfile(os.path.join(path, "adaptor.json")) and os.path.isfile(os.path.join(path, "text.json")):
        return "stage2"
    cfg_path = os.path.join(path, "config.json")
    mt = None
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            mt = json.load(f).get("model_type")
        if mt in ("clip", "llama"):
            return mt
    found = f"config.json has model_type {mt!r}" if os.path.isfile(cfg_path) else \
        ("not a directory" if not os.path.isdir(path) else "no config.json")
    raise ValueError(f"model={path!r}: not a model folder evaluate.py knows ({found}); expected a stage-2 "
                     f"output (adaptor.json + text.json + config.json), an HF CLIP folder (model_type 'clip') "
                     f"or an HF Llama folder (model_type 'llama')")

def read_classes(path):
    """(class names, templates) of a zero-shot spec {"classes": [...], "templates": ["... {} ...", ...]}."""
    with open(path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected an object {{\"classes\": [...], \"templates\": [...]}}")
    for key in ("classes", "templates"):
        v = spec.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f"{path}: key {key!r} must be a non-empty list of strings, got {v!r:.80}")
    bad = [t for t in spec["templates"] if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: template {bad[0]!r} has no '{{}}' for the class name")
    return spec["classes"], spec["templates"]

def split(fields):
    return [f for f in fields.split(",") if f]

# -----------------------------------------------------------------------------
# the text side of each kind of model: texts -> embeddings in the joint space, and the manifest's fields

def _chunks(texts, size, desc):
    starts = range(0, len(texts), size)
    return tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2)

class CLIPText:
    """CLIP's own text tower: texts truncated to its context like CLIP."""

    def __init__(self, path, records, device):
        self.tower = M.CLIPTextTower.from_pretrained(path).to(device).eval()
        self.tok, self.records, self.device = M.load_tokenizer(path), records, device

    @torch.no_grad()
    def __call__(self, texts):
        out = []
        for s in _chunks(texts, batch_size, "text tower"):
            ids, mask = self.tower.tokenize(self.tok, texts[s:s + batch_size])
            with torch.autocast("cuda", torch.bfloat16, enabled=self.device == "cuda"):
                e = self.tower(ids.to(self.device), mask.to(self.device))
            out.append(F.normalize(e.float(), dim=-1))
        return torch.cat(out)

    def field(self, f):
        """(None: no LLM, joint embeddings) of the field's captions in caption_rows order."""
        return None, self(caption_rows(self.records, f)[0])

class StageTwoText:
    """normalize(adaptor(e)), e the LLM's normalised mean-pooled embedding: read from the cache for the
    manifest's captions when there is one, else computed by the LLM (loaded on first use)."""

    def __init__(self, path, records, device):
        with open(os.path.join(path, "text.json")) as f:
            self.info = json.load(f)
        self.llm_path = llm or self.info["llm"]
        if not os.path.isdir(self.llm_path):
            raise FileNotFoundError(f"{self.llm_path}: the LLM of {path}/text.json is not there; pass --llm=<its folder>")
        # the adaptor was trained on this LLM's embeddings: another one (e.g. via --llm) means garbage
        if model_fingerprint(self.llm_path) != self.info["llm_sha256"]:
            raise ValueError(f"{self.llm_path}: not the LLM {path} was trained with "
                             f"(its fingerprint differs from llm_sha256 in {path}/text.json)")
        if cache:
            meta_path = os.path.join(cache, "meta.json")
            if not os.path.isfile(meta_path):
                raise FileNotFoundError(f"{cache}: no meta.json (run embed_cache.py first)")
            with open(meta_path) as f:
                meta = json.load(f)
            for key in ("instruction", "max_length"):
                if meta.get(key) != self.info[key]:
                    raise ValueError(f"{cache}: embedded with {key} {meta.get(key)!r}, but {path} was trained on "
                                     f"embeddings with {key} {self.info[key]!r} ({path}/text.json)")
        self.adaptor = M.Adaptor.from_pretrained(path).to(device).eval()
        self.records, self.device, self.llm = records, device, None

    def open_field(self, f):
        """The cache's (N, D) float16 rows of field f, checked against this LLM and the manifest's captions."""
        return open_cache(cache, f, self.llm_path, self.records)

    def llm_embed(self, texts):
        if self.llm is None:
            self.llm = M.Llama.from_pretrained(self.llm_path, dtype=getattr(torch, dtype)).to(self.device).eval()
            self.tok = M.load_tokenizer(self.llm_path)
        chunk = 16 * batch_size
        return torch.cat([M.embed_texts(self.llm, self.tok, texts[s:s + chunk], self.info["instruction"],
                                        self.info["max_length"], batch_size)
                          for s in _chunks(texts, chunk, "LLM")])

    @torch.no_grad()
    def joint(self, e):
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device == "cuda"):
            return F.normalize(self.adaptor(e.to(self.device)).float(), dim=-1)

    def __call__(self, texts):
        return self.joint(self.llm_embed(texts))

    def field(self, f):
        """(LLM embeddings, joint embeddings) of the field's captions in caption_rows order."""
        if cache:  # float16 rows, renormalised in fp32
            e = F.normalize(torch.from_numpy(np.asarray(self.open_field(f), dtype=np.float32)), dim=-1)
        else:
            e = self.llm_embed(caption_rows(self.records, f)[0])
        e = e.to(self.device)
        return e, self.joint(e)

@torch.no_grad()
def image_embeddings(vit, path, records, device):
    """(N_img, D) L2-normalised, in the order of the manifest at `path`."""
    ds = ImageDataset(path, size=vit.config.image_size, train=False, records=records)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=0)
    out = []
    for pixels, _, _ in tqdm(loader, desc="images", leave=False):
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            e = vit(pixels.to(device))
        out.append(F.normalize(e.float(), dim=-1))
    return torch.cat(out)

# -----------------------------------------------------------------------------

def evaluate_towers(kind, device):
    """Retrieval, zero-shot and c2c of a stage-2 model or a CLIP: (results, counts)."""
    fields, langs, unseen = split(retrieval), split(multilingual), split(multilingual_unseen)
    zs = read_classes(classes) if classes else None  # bad input fails before any model is loaded
    need = list(dict.fromkeys(fields + langs + unseen + split(c2c_field)))
    zs_manifest = zeroshot_manifest or manifest
    records = check_manifest(manifest, fields=need, decode=False, label=zs is not None and zs_manifest == manifest)
    if zs:
        zs_records = records if zs_manifest == manifest else check_manifest(zs_manifest, decode=False, label=True)
        bad = [n for n, r in enumerate(zs_records, 1) if not 0 <= r["label"] < len(zs[0])]
        if bad:
            raise ValueError(f"{zs_manifest}:{bad[0]}: label {zs_records[bad[0] - 1]['label']} is not a class of {classes} "
                             f"(0..{len(zs[0]) - 1}; {len(bad)} such lines)")
    text = (StageTwoText if kind == "stage2" else CLIPText)(model, records, device)
    if kind == "stage2" and cache:
        for f in need:  # every cache check before the slow part
            text.open_field(f)
    vit = M.ViT.from_pretrained(model).to(device).eval()
    img = image_embeddings(vit, manifest, records, device)
    memo = {}
    def field(f):  # (LLM embeddings or None, joint embeddings) of a field, computed once
        if f not in memo:
            memo[f] = text.field(f)
        return memo[f]
    results, counts = {}, {"images": len(records)}
    for f in fields + langs + unseen:
        texts, image = caption_rows(records, f)
        rows, owners = distinct_captions(texts, image)
        _, joint = field(f)
        for k, v in retrieval_recall(img, joint[torch.as_tensor(rows, device=joint.device)], owners).items():
            results[f"{f}_{k}"] = v
        counts[f] = {"captions": len(texts), "distinct": len(rows)}
    for key, group in (("multilingual", langs), ("multilingual_unseen", unseen)):
        for d in ("i2t", "t2i") if group else ():
            results[f"{key}_{d}_r1"] = sum(results[f"{f}_{d}_r1"] for f in group) / len(group)
    if zs:
        class_emb = zeroshot_classifier(text, *zs)
        zs_img = img if zs_manifest == manifest else image_embeddings(vit, zs_manifest, zs_records, device)
        results.update(zeroshot_accuracy(zs_img, class_emb, [r["label"] for r in zs_records]))
        counts["zeroshot_images"] = len(zs_records)
    if c2c_field:
        e, joint = field(c2c_field)
        image = caption_rows(records, c2c_field)[1]
        results["c2c_top1"] = c2c_top1(joint, joint, image)
        if e is not None:
            results["c2c_llm_top1"] = c2c_top1(e, e, image)
    return results, counts

def evaluate_llm(device):
    """The stage-1 check: caption-to-caption top-1 of an LLM, the instruction on queries only."""
    net = M.Llama.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    tok = M.load_tokenizer(model)
    def c2c(texts, group):
        q = M.embed_texts(net, tok, texts, instruction, max_length, batch_size)
        g = M.embed_texts(net, tok, texts, "", max_length, batch_size) if instruction else q
        return c2c_top1(q, g, group)
    results, counts = {}, {}
    if c2c_field:
        texts, group = caption_rows(read_manifest(manifest), c2c_field)
        results[f"c2c_top1_{c2c_field}"] = c2c(texts, group)
        counts[c2c_field] = len(texts)
    if cupl:
        with open(cupl) as f:
            c = json.load(f)
        results["c2c_top1_cupl"] = c2c(c["texts"], c["group"])
        counts["cupl"] = len(c["texts"])
    return results, counts

if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    kind = model_kind(model)
    if (cache or llm) and kind != "stage2":
        raise ValueError(f"--cache and --llm are for stage-2 models; {model} is an HF {kind} folder")
    results, counts = evaluate_llm(device) if kind == "llama" else evaluate_towers(kind, device)
    print(f"{name or model} ({kind}): " + ", ".join(
        f"{k} {v}" if isinstance(v, int) else f"{k} {v['captions']} captions ({v['distinct']} distinct)"
        for k, v in counts.items()))
    print(f"{'metric':<24} {'%':>7}")
    for k, v in results.items():  # in the order computed: retrieval per field, multilingual, zero-shot, c2c
        print(f"{k:<24} {v:7.2f}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    M.write_json(out, {"name": name or model, "model": model, "results": results, "counts": counts,
                       "config": config, "seconds": time.time() - t0})
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
