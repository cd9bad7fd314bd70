"""
Evaluation (docs/design.md, Evaluation): image-text retrieval R@1/5/10 both ways, zero-shot
classification with templates, caption-to-caption retrieval. One model per run; the baseline (a CLIP
with its own text tower) goes through the same code as the LLM models. Two ways to call it:

The papers' benchmarks, several in one call, each with its paper's protocol, printed as the papers'
table (the folders are what data/<set>/prepare.py wrote; the name before "=" picks the protocol):
    E=data/eval
    B=flickr30k=$E/flickr30k,coco=$E/coco,sharegpt4v=$E/sharegpt4v,urban1k=$E/urban1k,docci=$E/docci
    B=$B,xm3600=$E/xm3600,imagenet=$E/imagenet
    # caches: stage 2, optional, per benchmark
    C=flickr30k=out/cache/eval_flickr30k,coco=out/cache/eval_coco
    python evaluate.py --model=out/llm2clip/model --name=llm2clip --out=out/eval/llm2clip.json \\
        --benchmarks=$B --caches=$C
One manifest with the demo's fields (the settings `manifest` ... `cache` below; `benchmarks` empty):
    python evaluate.py --model=out/demo/base_clip/model --name=base_clip      # a CLIP
    python evaluate.py --model=out/demo/llm2clip/model \\
        --cache=out/demo/cache/llm2clip_test                                  # stage 2, cached
    python evaluate.py --model=out/demo/llm2clip/model                        # runs the LLM
    python evaluate.py --model=data/smollm2/hf --out=out/c2c.json             # an LLM: c2c only

In: `model`, one of three kinds of folder, told apart by their files:
  * stage 2 (train_stage2.py; adaptor.json + text.json): the image tower (an HF CLIP or SigLIP
    vision folder, loaded by model.load_image_tower) and, for text, normalize(adaptor(e)) with e the
    embedding of the LLM named in text.json, made with its instruction, max length and caption
    template. Caption embeddings come from a cache (embed_cache.py over the same manifest by that
    very LLM with those very settings: all checked, a mismatch refused) or from running the LLM;
    prompts that are not manifest captions (zero-shot) always run it. The LLM is loaded only if some
    text needs it.
  * an HF CLIP folder (model_type "clip", with its tokenizer): the ViT and CLIP's own text tower,
    inputs truncated to its context like CLIP. (An HF SigLIP folder is refused: model.py has
    SigLIP's image tower only; a SigLIP model is evaluated as stage 2, its tower plus an adaptor
    over an LLM.)
  * an HF Llama folder (model_type "llama"): caption-to-caption retrieval only, the stage-1 check,
    with `instruction` on the queries and not on the gallery, each caption wrapped in `template`,
    over `c2c_field` of `manifest` and the CuPL set (single-manifest mode only).
  Images and texts are embedded by encoder.py (the classes load_encoder builds), the one way to
  embed in this project.
Out: a table on stdout and `out` (JSON): {"name", "model", "kind", "results": {metric: percent},
  "counts", "config", "seconds", ...}. An existing `out` that is not such a file is refused, not
  overwritten (overwrite=True replaces it). With `benchmarks`, results are named
  <benchmark>_<metric> (below) and the JSON also holds "benchmarks" (folder, manifest, protocol,
  cache of each), "avg_of", "seconds_per_benchmark" and "table" (the printed lines).

The benchmarks (BENCHMARKS below; each folder holds the converter's manifest):
  flickr30k, coco   multi-caption retrieval of field "short" (5 captions an image; COCO's 25,010
                    kept ragged): flickr30k_i2t_r1, ..., coco_t2i_r10
  sharegpt4v, urban1k, docci   strict 1:1 retrieval of field "long": every record must hold exactly
                    one caption; a record with several is refused, naming the manifest and its line
                    (sharegpt4v_i2t_r1, ...)
  xm3600            multi-caption retrieval per language (every caption field is a language):
                    xm3600_<lang>_i2t_r1, ..., and xm3600_i2t_r1 etc. = the mean over the languages
  imagenet          zero-shot on val.jsonl's labels, twice: classes_single.json (the one template
                    "a photo of the {}."): imagenet_single_top1/top5; classes.json (the 80 OpenAI
                    templates, averaged): imagenet_ensemble_top1/top5
  avg_i2t_r1, avg_t2i_r1: the mean R@1 over the five English retrieval sets present
    ("avg_of").
  Each benchmark's captions are embedded once, for it alone (a field at a time, from its own cache
  if `caches` names one); the ImageNet prompts once per protocol. Rows of a retrieval set that name
  the same image file are one image (ShareGPT4V-1k's converter keeps entries that repeat an image):
  otherwise the two identical embeddings would tie and, ties counting against the query, both would
  always miss.
  The table: `Flickr I2T T2I | COCO I2T T2I | ShareGPT4V I2T T2I | Urban-1k I2T T2I | DOCCI I2T T2I
  | Avg I2T T2I`, then `XM3600 I2T T2I | ImageNet 0-shot* 0-shot`, R@1 and top-1 in percent, "-"
  where a benchmark was not run. "0-shot*" is the single template and "0-shot" the 80: which of the
  two the LLM2CLIP paper's asterisk marks could not be confirmed from its text (the asterisk usually
  marks the non-standard protocol, and 80 templates are CLIP's standard); the printed footnote says
  what each is.

Protocols (all numbers in percent):
  retrieval, several captions per image (Flickr30k/COCO): image->text is a hit at k if any caption
    of the image is among the k best of all the field's captions; text->image if the caption's image
    is among the k best images. Identical caption strings of a field are one text, a caption of
    every image that has it (the demo's short captions repeat: 1500 captions, 130 distinct strings),
    so no copy of a string competes with itself. With one caption per image this is plain argmax
    retrieval (1:1).
  ties count against the query everywhere: a wrong item scoring >= the best right one ranks ahead of
    it (NaN too), so a collapsed model scores 0, never 100, and no result depends on the order of
    rows.
  zero-shot: each class name in every template, embedded, normalised, averaged, renormalised; logits
    100 x cosine; top-k for every k below the number of classes (top-k of k classes is always 100).
  caption-to-caption: the best other caption (own entry excluded) must be of the same image (group);
    captions alone in their group are not queries. `c2c_top1` in the joint space (the text tower's
    or the adaptor's output); for stage-2 models also `c2c_llm_top1` on the LLM embeddings before
    the adaptor.
"""

import json
import os
import time
from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F

import embedder as EM
import llama as LM
import model as M
import encoder as EN
from encoder import model_kind
from manifest import Manifest, caption_rows
from embed_cache import open_cache, read_meta
from train_common import write_json

# -----------------------------------------------------------------------------
model = ""                       # stage-2 folder, HF CLIP folder, or HF Llama folder (c2c only, the
                                 # stage-1 check)
# the papers' benchmarks; when set, the single-manifest settings below (manifest ... cache)
# are not read
benchmarks = ""                  # "name=folder,...": flickr30k coco sharegpt4v urban1k docci xm3600
                                 # imagenet (BENCHMARKS)
caches = ""                      # stage 2: "name=folder,...": embed_cache.py over that benchmark's
                                 # manifest; none = run the LLM
# one manifest (the demo)
manifest = "data/fashion/out/test.jsonl"
retrieval = "short,long"         # caption fields for image-text retrieval
multilingual = "de"              # caption fields in languages stage 1 taught ("" to skip); their
                                 # mean is multilingual_*
multilingual_unseen = "fr"       # languages no stage trained on ("" to skip); their mean is
                                 # multilingual_unseen_*
classes = "data/fashion/out/classes.json"  # zero-shot: {"classes": [...], "templates":
                                           # ["a photo of {}.", ...]}; "" to skip
zeroshot_manifest = "data/fashion/out/zeroshot.jsonl"  # zero-shot on these labelled images
                                                       # ("" = `manifest`'s)
c2c_field = "long"               # caption-to-caption retrieval within this field ("" to skip)
cache = ""                       # stage 2: embed_cache.py output over `manifest` by the model's
                                 # LLM; "" = run the LLM
# both
llm = ""                         # stage 2: the LLM folder, if not where text.json says (fingerprint
                                 # checked)
cupl = "data/fashion/out/cupl.json"  # Llama mode: {"texts": [...], "group": [...]};
                                     # "" to skip
instruction = "Given a caption, retrieve a similar relevant caption."  # Llama mode: on c2c queries;
                                                                       # "" for none
template = "auto"                # Llama mode: caption template (embedder.caption_template); stage 2
                                 # uses text.json's
attention = "bidirectional"      # Llama mode: "bidirectional" or "causal" (as stage 1 trained it);
                                 # stage 2 uses text.json's
name = ""                        # the row's name in the JSON ("" = the model path)
max_length = 512                 # Llama mode: tokens per caption (stage 2 uses text.json's)
batch_size = 64
num_workers = 0                  # DataLoader processes decoding images (0 = in this process)
out = "out/eval.json"
overwrite = False                # replace `out` even if it is not an evaluate.py output
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # the LLM's compute dtype (towers:
                                                                # bf16 autocast on GPUs)
# -----------------------------------------------------------------------------
# metrics: pure functions of normalised embeddings

def _misses(queries, items, q_idx, i_idx, chunk):
    """Per query: the number of wrong items that score at least as high as its best right item (NaN
    counts as high). (q_idx[p], i_idx[p]) are the right (query, item) pairs. O(chunk x N_items)
    memory."""
    out = []
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s:s + chunk] @ items.T  # (C, N_items)
        right = torch.zeros_like(sim, dtype=torch.bool)
        m = (q_idx >= s) & (q_idx < s + chunk)
        right[q_idx[m] - s, i_idx[m]] = True
        best = torch.where(right, sim, float("-inf")).amax(1, keepdim=True)  # (C, 1);
                                                                             # -inf: no right item
        out.append((~(sim < best) & ~right).sum(1))
    return torch.cat(out)

def retrieval_recall(img, txt, txt_image, ks=(1, 5, 10), chunk=1024):
    """Recall@k in percent, both ways: {"i2t_r1": ..., "t2i_r1": ..., ...}. img (N_img, D) and txt
    (N_txt, D) L2-normalised; txt_image[r] is the image of caption r (an int), or the images of a
    caption string that several images share (a list). image->text: a hit at k if fewer than k wrong
    captions score >= the image's best caption; text->image: if fewer than k wrong images score >=
    its image."""
    pairs = [(int(i), r) for r, own in enumerate(txt_image)
             for i in (own if isinstance(own, (list, tuple, set)) else [own])]
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
    """Identical strings of one field merged: (row of each distinct text's first occurrence, the
    images that have it, sorted), for retrieval_recall(img, txt[rows], owners)."""
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
    """{"zeroshot_top1": ..., ...} in percent: logits 100 img @ class_emb^T; an image is right at k
    if fewer than k other classes score >= its label's (ties and NaN against it). Only k < C is
    reported."""
    logits = 100.0 * img.float() @ class_emb.float().T  # (N, C)
    labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    # the label itself is not < itself
    ahead = (~(logits < logits.gather(1, labels[:, None]))).sum(1) - 1
    return {f"zeroshot_top{k}": 100.0 * (ahead < k).double().mean().item()
            for k in ks if k < class_emb.shape[0]}

def c2c_top1(queries, gallery, group, chunk=1024):
    """Top-1 caption-to-caption retrieval, in percent. queries[i] and gallery[i] embed caption i (as
    a query and as a gallery item; L2-normalised rows); group[i] is its image or class. Caption i's
    own gallery entry is excluded; captions alone in their group are not queries; a hit needs the
    best peer of the group to score strictly above every caption of another group."""
    group = torch.as_tensor(np.asarray(group), device=queries.device)
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    has_peer = counts[inverse] > 1
    if not has_peer.any():
        raise ValueError("c2c_top1: no caption shares its group with another (one caption per "
                         "image?)")
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

def read_classes(path):
    """(class names, templates) of a zero-shot spec {"classes": [...], "templates": ["... {} ...",
    ...]}."""
    with open(path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected an object {{\"classes\": [...], \"templates\": [...]}}")
    for key in ("classes", "templates"):
        v = spec.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f"{path}: key {key!r} must be a non-empty list of strings, got "
                             f"{v!r:.80}")
    bad = [t for t in spec["templates"] if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: template {bad[0]!r} has no '{{}}' for the class name")
    return spec["classes"], spec["templates"]

def split(fields):
    return [f for f in fields.split(",") if f]

# -----------------------------------------------------------------------------
# the model, through encoder.py (the one way to embed); a stage-2 model's cached LLM embeddings go
# through the same adaptor call (StageTwoText.joint)

class CLIPText(EN.CLIPText):
    """encoder.CLIPText (CLIP's own text tower), and a manifest's caption fields."""

    def field(self, man, f, cache_dir=""):
        """(None: no LLM, joint embeddings) of the field's captions in caption_rows order."""
        return None, self(caption_rows(man, f)[0])

class StageTwoText(EN.StageTwoText):
    """encoder.StageTwoText (the LLM as text.json says, the adaptor), and a manifest's caption
    fields, from a cache when there is one: its rows go through the same as_cached and joint as
    the LLM's embeddings do."""

    def check_cache(self, cache_dir):
        """The cache's embeddings must be made as the adaptor's training embeddings were: the same
        EmbedSpec (the LLM and the captions: open_field)."""
        spec, _ = read_meta(cache_dir)
        EM.check_spec(self.spec, f"{self.path}/text.json (how the adaptor's training embeddings "
                      f"were made)", spec, f"{cache_dir}/meta.json (how the cache was embedded)",
                      fix="use a cache embedded with {key}={want!r}, or none (the LLM then runs)")

    def open_field(self, cache_dir, man, f):
        """The cache's (N, D) float16 rows of field f, checked against this LLM and the
        manifest's captions."""
        return open_cache(cache_dir, f, self.llm_path, man)

    def field(self, man, f, cache_dir=""):
        """(LLM embeddings, joint embeddings) of the field's captions in caption_rows order."""
        if cache_dir:
            e = EN.as_cached(np.asarray(self.open_field(cache_dir, man, f), dtype=np.float32))
        else:
            e = self.llm_embed(caption_rows(man, f)[0])
        e = e.to(self.device)
        return e, self.joint(e)

def text_side(kind, device):
    if kind == "stage2":
        return StageTwoText(model, device, llm or None, dtype, batch_size)
    return CLIPText(model, device, batch_size)

def image_embeddings(tower, man, device, rows=None):
    """encoder.image_embeddings with this run's batch size and DataLoader workers."""
    return EN.image_embeddings(tower, man, device, rows, batch_size, num_workers)

def how_text_embeds(text):
    """What the output JSON records of how a stage-2 text side embeds: template and attention."""
    if not isinstance(text, StageTwoText):
        return {}
    return dict(template=text.spec.template, attention=text.spec.attention)

# -----------------------------------------------------------------------------
# one manifest (the demo's fields)

def evaluate_towers(kind, device):
    """Retrieval, zero-shot and c2c of a stage-2 model or a CLIP over `manifest`: (results, counts,
    extra JSON)."""
    fields, langs, unseen = split(retrieval), split(multilingual), split(multilingual_unseen)
    zs = read_classes(classes) if classes else None  # bad input fails before any model is loaded
    need = list(dict.fromkeys(fields + langs + unseen + split(c2c_field)))
    zs_manifest = zeroshot_manifest or manifest
    records = Manifest(manifest).check(fields=need,
                                       label=zs is not None and zs_manifest == manifest)
    if zs:
        zs_records = records if zs_manifest == manifest else Manifest(zs_manifest).check(label=True)
        bad = [n for n, r in enumerate(zs_records, 1) if not 0 <= r["label"] < len(zs[0])]
        if bad:
            raise ValueError(f"{zs_manifest}:{bad[0]}: label {zs_records[bad[0] - 1]['label']} is "
                             f"not a class of {classes} (0..{len(zs[0]) - 1}; {len(bad)} such "
                             f"lines)")
    text = text_side(kind, device)
    if kind == "stage2" and cache:
        text.check_cache(cache)
        for f in need:  # every cache check before the slow part
            text.open_field(cache, records, f)
    tower = M.load_image_tower(model).to(device).eval()
    img = image_embeddings(tower, records, device)
    memo = {}
    def field(f):  # (LLM embeddings or None, joint embeddings) of a field, computed once
        if f not in memo:
            memo[f] = text.field(records, f, cache)
        return memo[f]
    results, counts = {}, {"images": len(records)}
    for f in fields + langs + unseen:
        texts, image = caption_rows(records, f)
        rows, owners = distinct_captions(texts, image)
        _, joint = field(f)
        for k, v in retrieval_recall(img, joint[torch.as_tensor(rows, device=joint.device)],
                                     owners).items():
            results[f"{f}_{k}"] = v
        counts[f] = {"captions": len(texts), "distinct": len(rows)}
    for key, group in (("multilingual", langs), ("multilingual_unseen", unseen)):
        for d in ("i2t", "t2i") if group else ():
            results[f"{key}_{d}_r1"] = sum(results[f"{f}_{d}_r1"] for f in group) / len(group)
    if zs:
        class_emb = zeroshot_classifier(text, *zs)
        zs_img = img if zs_manifest == manifest else image_embeddings(tower, zs_records, device)
        results.update(zeroshot_accuracy(zs_img, class_emb, [r["label"] for r in zs_records]))
        counts["zeroshot_images"] = len(zs_records)
    if c2c_field:
        e, joint = field(c2c_field)
        image = caption_rows(records, c2c_field)[1]
        results["c2c_top1"] = c2c_top1(joint, joint, image)
        if e is not None:
            results["c2c_llm_top1"] = c2c_top1(e, e, image)
    return results, counts, how_text_embeds(text)

def evaluate_llm(device):
    """The stage-1 check: caption-to-caption top-1 of an LLM, the instruction on queries only, every
    caption wrapped in the caption template (resolved here, from the LLM's tokenizer)."""
    net = LM.Llama.from_pretrained(model, dtype=getattr(torch, dtype),
                                   causal=attention == "causal").to(device).eval()
    tok = M.load_tokenizer(model)
    tmpl = EM.caption_template(tok, template)
    EM.check_embedder(model, EM.EmbedSpec(instruction, max_length, tmpl, attention))
    print(f"caption template {template!r}: " + (repr(tmpl) if tmpl else "none (captions as given)"))
    def c2c(texts, group):
        q = EM.embed_texts(net, tok, texts, instruction, max_length, batch_size, tmpl)
        g = EM.embed_texts(net, tok, texts, "", max_length, batch_size, tmpl) if instruction else q
        return c2c_top1(q, g, group)
    results, counts = {}, {}
    if c2c_field:
        texts, group = caption_rows(Manifest(manifest).check(images="ignore"), c2c_field)
        results[f"c2c_top1_{c2c_field}"] = c2c(texts, group)
        counts[c2c_field] = len(texts)
    if cupl:
        with open(cupl) as f:
            c = json.load(f)
        results["c2c_top1_cupl"] = c2c(c["texts"], c["group"])
        counts["cupl"] = len(c["texts"])
    return results, counts, dict(template=tmpl, attention=attention)

# -----------------------------------------------------------------------------
# the papers' benchmarks

Bench = namedtuple("Bench", "file protocol field column")
# name -> (manifest in the converter's folder, protocol, caption field, the table's column)
BENCHMARKS = {
    "flickr30k": Bench("test.jsonl", "multi", "short", "Flickr"),
    "coco": Bench("test.jsonl", "multi", "short", "COCO"),
    "sharegpt4v": Bench("test.jsonl", "1:1", "long", "ShareGPT4V"),
    "urban1k": Bench("test.jsonl", "1:1", "long", "Urban-1k"),
    "docci": Bench("test.jsonl", "1:1", "long", "DOCCI"),
    "xm3600": Bench("test.jsonl", "languages", "", "XM3600"),  # every caption field is a language
    "imagenet": Bench("val.jsonl", "zeroshot", "", "ImageNet"),  # + classes.json,
                                                                 # classes_single.json
}
AVG_OF = ("flickr30k", "coco", "sharegpt4v", "urban1k", "docci")  # the Avg columns average these

def name_map(setting, what):
    """"a=x,b=y" -> {"a": "x", "b": "y"}: names of BENCHMARKS, each once."""
    out = {}
    for item in split(setting):
        key, eq, value = item.partition("=")
        if not eq or not value:
            raise ValueError(f"{what}={setting!r}: {item!r} is not name=folder")
        if key not in BENCHMARKS:
            raise ValueError(f"{what}: unknown benchmark {key!r} (known: {', '.join(BENCHMARKS)})")
        if key in out:
            raise ValueError(f"{what}: benchmark {key!r} named twice")
        out[key] = value
    return out

def open_benchmark(bname, folder):
    """Check a benchmark's files before any model loads: {"man", "path", "fields"} (+ "single" and
    "ensemble" zero-shot specs for imagenet). A 1:1 set with an image of several captions is
    refused."""
    b = BENCHMARKS[bname]
    path = os.path.join(folder, b.file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{bname}={folder}: no {b.file} there (run data/{bname}/prepare.py "
                                f"--out={folder})")
    if b.protocol == "zeroshot":
        man = Manifest(path).check(label=True)
        labels, specs = np.asarray(man.labels), {}
        for key, file in (("single", "classes_single.json"), ("ensemble", "classes.json")):
            specs[key] = read_classes(os.path.join(folder, file))
            bad = np.flatnonzero(labels >= len(specs[key][0]))
            if len(bad):
                raise ValueError(f"{path}:{bad[0] + 1}: label {labels[bad[0]]} is not a class of "
                                 f"{folder}/{file} (0..{len(specs[key][0]) - 1}; {len(bad)} such "
                                 f"line(s))")
        return dict(man=man, path=path, fields=[], **specs)
    if b.protocol == "languages":
        man = Manifest(path).check()
        fields = sorted(man.fields)
        if not fields:
            raise ValueError(f"{path}: no caption fields (XM3600's are its language codes)")
        man.check(fields=fields)  # every image has every language
    else:
        fields = [b.field]
        man = Manifest(path).check(fields=fields)
    # strict: exactly one caption per record, or the protocol is not the paper's
    if b.protocol == "1:1":
        n = np.diff(np.asarray(man.ptr(b.field)))
        bad = np.flatnonzero(n != 1)
        if len(bad):
            raise ValueError(f"{path}:{bad[0] + 1}: {bname} is scored 1:1 (one caption per image, "
                             f"plain argmax) but this image has {n[bad[0]]} captions in field "
                             f"{b.field!r} ({len(bad)} such line(s)); convert it with "
                             f"data/{bname}/prepare.py, which writes one caption per image")
    return dict(man=man, path=path, fields=fields)

def distinct_images(man):
    """(the first record of each distinct image file, the distinct image of every record)."""
    where, first, of = {}, [], []
    for i in range(len(man)):
        p = os.path.normpath(os.path.join(man.root, man[i]["image"]))
        if p not in where:
            where[p] = len(first)
            first.append(i)
        of.append(where[p])
    return first, np.asarray(of, dtype=np.int64)

def run_benchmark(bname, bench, text, tower, device, cache_dir):
    """One benchmark with its protocol: (results named <bname>_<metric>, counts)."""
    b, man = BENCHMARKS[bname], bench["man"]
    results, counts = {}, {"protocol": b.protocol, "images": len(man)}
    if b.protocol == "zeroshot":
        img = image_embeddings(tower, man, device)
        for key in ("single", "ensemble"):  # each protocol's prompts embedded once
            names, templates = bench[key]
            r = zeroshot_accuracy(img, zeroshot_classifier(text, names, templates),
                                  np.array(man.labels))
            results.update({f"{bname}_{key}_{k.split('_', 1)[1]}": v for k, v in r.items()})
            counts[f"{key}_templates"] = len(templates)
        counts["classes"] = len(bench["ensemble"][0])
        return results, counts
    first, image_of = distinct_images(man)  # rows naming the same file are one image
    counts["distinct_images"] = len(first)
    img = image_embeddings(tower, man, device, first)
    for f in bench["fields"]:
        texts, image = caption_rows(man, f)
        rows, owners = distinct_captions(texts, image_of[image])
        _, joint = text.field(man, f, cache_dir)
        r = retrieval_recall(img, joint[torch.as_tensor(rows, device=joint.device)], owners)
        prefix = f"{bname}_{f}" if b.protocol == "languages" else bname
        results.update({f"{prefix}_{k}": v for k, v in r.items()})
        counts[f] = {"captions": len(texts), "distinct": len(rows)}
    if b.protocol == "languages":  # the mean over languages
        for k in r:
            results[f"{bname}_{k}"] = (sum(results[f"{bname}_{f}_{k}"] for f in bench["fields"]) /
                                       len(bench["fields"]))
        counts["languages"] = bench["fields"]
    return results, counts

def paper_table(results):
    """The papers' layout, R@1 (top-1 for ImageNet) in percent, "-" where a benchmark did not run:
    lines."""
    def block(groups):  # groups: (name, (sub-heading, key), (sub-heading, key))
        val = lambda k: f"{results[k]:.1f}" if k in results else "-"  # noqa: E731
        return [" | ".join(f"{name:<15}" for name, _, _ in groups).rstrip(),
                " | ".join(f"{a:<7} {b:<7}" for _, (a, _), (b, _) in groups).rstrip(),
                " | ".join(f"{val(ka):<7} {val(kb):<7}" for _, (_, ka), (_, kb) in groups).rstrip()]
    r1 = lambda col, key: (col, ("I2T", f"{key}_i2t_r1"), ("T2I", f"{key}_t2i_r1"))  # noqa: E731
    return (block([r1(BENCHMARKS[b].column, b) for b in AVG_OF] + [r1("Avg", "avg")]) +
            [""] + block([r1("XM3600", "xm3600"),
                          ("ImageNet", ("0-shot*", "imagenet_single_top1"),
                           ("0-shot", "imagenet_ensemble_top1"))]))

def evaluate_benchmarks(kind, device):
    """Every benchmark of `benchmarks`, one after the other: (results, counts, extra JSON)."""
    if kind == "llama":
        raise ValueError(f"benchmarks: {model} is an LLM (caption-to-caption only); the benchmarks "
                         f"need an image tower and a text side (a stage-2 folder or an HF CLIP "
                         f"folder)")
    folders, cache_dirs = name_map(benchmarks, "benchmarks"), name_map(caches, "caches")
    for bname in cache_dirs:
        if bname not in folders:
            raise ValueError(f"caches: {bname!r} is not among the benchmarks "
                             f"({', '.join(folders)})")
        if BENCHMARKS[bname].protocol == "zeroshot":
            raise ValueError(f"caches: {bname} has no captions to cache (its prompts always run "
                             f"the LLM); drop it")
    # inputs first
    bench = {bname: open_benchmark(bname, folder) for bname, folder in folders.items()}
    text = text_side(kind, device)
    for bname, d in cache_dirs.items():  # every cache check before the slow part
        text.check_cache(d)
        for f in bench[bname]["fields"]:
            text.open_field(d, bench[bname]["man"], f)
    tower = M.load_image_tower(model).to(device).eval()
    results, counts, seconds = {}, {}, {}
    for bname in folders:
        t0 = time.time()
        r, counts[bname] = run_benchmark(bname, bench[bname], text, tower, device,
                                         cache_dirs.get(bname, ""))
        results.update(r)
        seconds[bname] = time.time() - t0
        shown = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith(("_r1", "_top1")) and
                          (BENCHMARKS[bname].protocol != "languages" or k.count("_") == 2))
        print(f"{bname} ({BENCHMARKS[bname].protocol}, {len(bench[bname]['man'])} images, "
              f"{seconds[bname]:.0f}s): {shown}")
    avg_of = [b for b in AVG_OF if b in folders]
    for d in ("i2t", "t2i") if avg_of else ():
        results[f"avg_{d}_r1"] = sum(results[f"{b}_{d}_r1"] for b in avg_of) / len(avg_of)
    info = {b: dict(folder=folders[b], manifest=bench[b]["path"], protocol=BENCHMARKS[b].protocol,
                    cache=cache_dirs.get(b, "")) for b in folders}
    n80 = counts.get("imagenet", {}).get("ensemble_templates", 80)
    table = paper_table(results) + [
        "", "R@1 in percent (ImageNet: top-1); -: not run. Avg: the mean over " +
        (", ".join(BENCHMARKS[b].column for b in avg_of) if avg_of
         else "none (no English retrieval set ran)") + "."]
    if "xm3600" in counts:
        table.append(f"XM3600: the mean over its {len(counts['xm3600']['languages'])} languages "
                     f"(each one's in the JSON).")
    table.append(f"ImageNet 0-shot*: the single template \"a photo of the {{}}.\" "
                 f"(classes_single.json); 0-shot: the {n80} templates of classes.json, averaged.")
    return results, counts, dict(benchmarks=info, avg_of=avg_of, seconds_per_benchmark=seconds,
                                 table=table, **how_text_embeds(text))

# -----------------------------------------------------------------------------

OUT_KEYS = ("name", "model", "kind", "results", "counts", "config")  # in every output's JSON

def foreign_output(path):
    """Why the existing file `path` is not an evaluate.py output (None if it is one, or is not
    there): the command replaces only what it wrote."""
    if not os.path.lexists(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        return f"it does not read as JSON ({type(e).__name__})"
    missing = [k for k in OUT_KEYS if k not in rec] if isinstance(rec, dict) else list(OUT_KEYS)
    return f"its JSON has no {missing[0]!r}" if missing else None

def main(config):
    from configurator import check
    check(config, positive=("batch_size", "max_length"), nonnegative=("num_workers",),
          choices={"dtype": ("float32", "bfloat16", "float16"), "attention": EM.ATTENTION},
          files=("out",),
          rules=[(model != "", "model='': name a stage-2, HF CLIP or HF Llama folder")])
    why = None if overwrite else foreign_output(out)
    if why:
        raise ValueError(f"out={out!r}: the file exists and is not an evaluate.py output ({why}); "
                         f"not overwriting it: name another file, or set --overwrite=True")
    t0 = time.time()
    kind = model_kind(model)
    if (cache or llm or caches) and kind != "stage2":
        raise ValueError(f"--cache, --caches and --llm are for stage-2 models; {model} is an HF "
                         f"{kind} folder")
    if cache and benchmarks:
        raise ValueError("cache is the single-manifest mode's; with benchmarks, name each "
                         "benchmark's cache in caches=<benchmark>=<folder>,...")
    if benchmarks:
        results, counts, extra = evaluate_benchmarks(kind, device)
    elif kind == "llama":
        results, counts, extra = evaluate_llm(device)
    else:
        results, counts, extra = evaluate_towers(kind, device)
    if benchmarks:
        print(f"\n{name or model} ({kind})")
        print("\n".join(extra["table"]))
    else:
        print(f"{name or model} ({kind}): " + ", ".join(
            f"{k} {v}" if isinstance(v, int)
            else f"{k} {v['captions']} captions ({v['distinct']} distinct)"
            for k, v in counts.items()))
        print(f"{'metric':<24} {'%':>7}")
        # in the order computed: retrieval per field, multilingual, zero-shot, c2c
        for k, v in results.items():
            print(f"{k:<24} {v:7.2f}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    write_json(out, {"name": name or model, "model": model, "kind": kind, "results": results,
                       "counts": counts, **extra, "config": config, "seconds": time.time() - t0})
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
    return results

if __name__ == "__main__":
    from configurator import configure
    main(configure(globals()))
