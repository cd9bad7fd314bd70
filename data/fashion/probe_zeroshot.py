"""Where a demo run loses the base CLIP's zero-shot (the README's numbers on ProCLIP): zero-shot top-1 on the
single test items (zeroshot.jsonl, classes.json's prompts) for image towers crossed with text sides. Image
towers: the base CLIP's ViT and the stage-2 ViTs; text sides: the base CLIP's text tower, ProCLIP's stage-1
adaptor and the stage-2 adaptors, over the stage-1 LLM (embedded as ProCLIP's text.json says). A stage-2
ViT keeps the base CLIP's projection in ProCLIP (so it pairs with the base text tower, the stage-1 adaptor
and its own adaptor) and gets a fresh one in LLM2CLIP (its own adaptor only: the joint spaces differ).
    python data/fashion/probe_zeroshot.py --demo=out/demo [--stage1=<ProCLIP stage-1 folder>] [--proclip=<stage-2 folder>]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import evaluate as E  # noqa: E402
import model as M  # noqa: E402
from dataset import read_manifest  # noqa: E402

demo, data, stage1, proclip = "out/demo", "data/fashion/out", "", ""  # "" = the demo's own folders

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    stage1, proclip = stage1 or f"{demo}/stage1_proclip", proclip or f"{demo}/proclip/model"
    classes, templates = E.read_classes(f"{data}/classes.json")
    items = read_manifest(f"{data}/zeroshot.jsonl")
    labels = [r["label"] for r in items]
    with open(f"{proclip}/text.json") as f:
        info = json.load(f)
    llm = M.Llama.from_pretrained(info["llm"], causal=info["attention"] == "causal").eval()
    tok = M.load_tokenizer(info["llm"])
    prompts = [t.format(c) for c in classes for t in templates]
    with torch.no_grad():
        e = M.embed_texts(llm, tok, prompts, info["instruction"], info["max_length"], 64, info["template"])
        row = {p: i for i, p in enumerate(prompts)}

        def adaptor_side(path):
            ad = M.Adaptor.from_pretrained(path).eval()
            return lambda texts: ad(e[[row[t] for t in texts]])

        base_text = E.CLIPText(f"{demo}/base_clip/model", "cpu")
        base = {"base CLIP text tower": base_text, "ProCLIP stage-1 adaptor": adaptor_side(stage1)}  # base space
        towers = [("base CLIP ViT", f"{demo}/base_clip/model", base),
                  ("ProCLIP ViT", proclip, {**base, "its own adaptor": adaptor_side(proclip)}),
                  ("LLM2CLIP ViT", f"{demo}/llm2clip/model", {"its own adaptor": adaptor_side(f"{demo}/llm2clip/model")})]
        print(f"zero-shot top-1 (%) on {len(items)} single items of {data}/zeroshot.jsonl")
        for name, path, sides in towers:
            img = E.image_embeddings(M.load_image_tower(path).eval(), items, "cpu")
            for tname, fn in sides.items():
                cls = E.zeroshot_classifier(lambda t: F.normalize(fn(t).float(), dim=-1), classes, templates)
                print(f"{name:<14} + {tname:<24} {E.zeroshot_accuracy(img, cls, labels)['zeroshot_top1']:5.1f}")
