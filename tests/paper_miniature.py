"""Miniature stand-ins for every download paper.sh reads, in the real formats and the README's layout
(README, Reproducing the papers: Downloads), made in seconds with random weights:

  models/clip-vit-large-patch14, clip-vit-large-patch14-336   HF CLIPModel folders (save_pretrained)
  models/siglip-so400m-patch14-384                            an HF SiglipModel folder
  models/Meta-Llama-3-8B-Instruct, Llama-3.2-1B-Instruct      HF LlamaForCausalLM folders, Llama 3 tokenizer
  models/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned, -3.2-1B-  the release's layout (LlamaBiModel config,
                                                              no `model.` prefix, no lm_head)
  cc3m/*.tar      img2dataset shards downloaded as LLM2CLIP's recipe does: the DreamLIP recaptions are
                  KEY.json columns (raw_caption, shortIB_captions, ...), no KEY.txt; a shard's .parquet
                  and _stats.json beside it
  cc12m/*.tar     plain img2dataset shards (KEY.txt alt-text, KEY.json with url), and
  dreamlip/cc12m_3long_3short_1raw_captions_url.csv listing more images than were downloaded
  eval/<set>      the seven evaluation sets as their converters read them (test_converters' writers)

    python tests/paper_miniature.py <folder>     (what tests/test_paper.py runs paper.sh on)
"""

import io
import json
import os
import sys

import numpy as np
import torch
import transformers
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tests/ and the repository
from chat_tokenizers import llama3_tokenizer  # noqa: E402
from test_converters import blip_coco, blip_flickr, docci, sharegpt4v, urban1k, val_map, xm3600  # noqa: E402
from test_llm2clip_release import released_llm  # noqa: E402
from tiny import WORDS, tiny_clip, write_tar  # noqa: E402

DREAMLIP = ("shortIB_captions", "longIB_captions", "shortSV_captions", "longSV_captions",
            "shortLLA_captions", "longLLA_captions")


def caption(rng, lo, hi):
    return " ".join(rng.choice(WORDS, rng.integers(lo, hi)))


def recaptions(rng):
    """The six DreamLIP recaptions of one image: short ones of 3-6 words, long ones of 10-25."""
    return {c: caption(rng, 3, 7) if c.startswith("short") else caption(rng, 10, 26) for c in DREAMLIP}


def jpeg_bytes(rng, size=24):
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(b, "JPEG")
    return b.getvalue()


def shards(folder, source, n_shards, per_shard, rng, in_key_json):
    """img2dataset's webdataset output; returns [(url, alt-text, recaptions)] of every image listed in
    the source's CSV (downloaded or not: every fourth is a dead link, never downloaded)."""
    os.makedirs(folder, exist_ok=True)
    listed = []
    for s in range(n_shards):
        members, n_ok = [], 0
        for j in range(per_shard + per_shard // 3):
            url = f"https://images.example.com/{source}/{s}/{j}.jpg"
            alt, recap = caption(rng, 2, 6), recaptions(rng)
            listed.append((url, alt, recap))
            if j % 4 == 3:
                continue  # a dead link: in the CSV, not in the shard
            key = f"{s:05d}{n_ok:04d}"
            n_ok += 1
            meta = {"url": url, "key": key, "status": "success", "error_message": None,
                    "width": 24, "height": 24, "original_width": 24, "original_height": 24}
            if in_key_json:  # --url_col "Image Path" --save_additional_columns [raw_caption, ...]
                meta.update({"raw_caption": alt, **recap})
                members += [(f"{key}.jpg", jpeg_bytes(rng)), (f"{key}.json", json.dumps(meta).encode())]
            else:           # --caption_col caption
                meta["caption"] = alt
                members += [(f"{key}.jpg", jpeg_bytes(rng)), (f"{key}.txt", alt.encode()),
                            (f"{key}.json", json.dumps(meta).encode())]
        write_tar(os.path.join(folder, f"{s:05d}.tar"), members)
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": len(members) // 2, "successes": n_ok}, f)
        open(os.path.join(folder, f"{s:05d}.parquet"), "wb").close()
    return listed


def dreamlip_csv(path, listed):
    import csv
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Image Path", "raw_caption", *DREAMLIP])
        for url, alt, recap in listed:
            w.writerow([url, alt, *(recap[c] for c in DREAMLIP)])


def llama(path, seed):
    """An HF LlamaForCausalLM folder (as meta-llama's are) with a Llama 3 tokenizer."""
    vocab = llama3_tokenizer(path)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def siglip(path, seed):
    torch.manual_seed(seed)
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4))
    transformers.SiglipModel(cfg).save_pretrained(path)


def build(root, seed=0, per_shard=6):
    """Every download in its folder under `root`; returns root."""
    from pathlib import Path
    root = Path(root)
    rng = np.random.default_rng(seed)
    m = root / "models"
    tiny_clip(m / "clip-vit-large-patch14", seed=seed, context=77)
    tiny_clip(m / "clip-vit-large-patch14-336", seed=seed + 1, context=77)
    siglip(m / "siglip-so400m-patch14-384", seed)
    llama(m / "Meta-Llama-3-8B-Instruct", seed)
    llama(m / "Llama-3.2-1B-Instruct", seed + 1)
    released_llm(str(m / "LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"), seed=seed)
    released_llm(str(m / "LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned"), seed=seed + 1)
    shards(root / "cc3m", "cc3m", 2, per_shard, rng, in_key_json=True)
    listed = shards(root / "cc12m", "cc12m", 2, per_shard, rng, in_key_json=False)
    dreamlip_csv(root / "dreamlip" / "cc12m_3long_3short_1raw_captions_url.csv", listed)
    e = root / "eval"
    writers = {"flickr30k": blip_flickr, "coco": blip_coco, "sharegpt4v": sharegpt4v,
               "urban1k": urban1k, "docci": docci, "xm3600": xm3600,
               "imagenet": lambda r: val_map(r, [(f"ILSVRC2012_val_{i:08d}.JPEG", lab)
                                                 for i, lab in enumerate([3, 7, 0, 3], 1)])}
    for name, write in writers.items():
        os.makedirs(e / name, exist_ok=True)
        write(e / name)
    return root


if __name__ == "__main__":
    build(sys.argv[1])
    print(f"wrote the miniature downloads to {sys.argv[1]}")
