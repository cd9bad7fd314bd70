"""Where a demo run loses the base CLIP's zero-shot (docs/experiments.md's numbers on ProCLIP): zero-shot top-1 on the
single test items (zeroshot.jsonl, classes.json's prompts) for image towers crossed with text sides. Image
towers: the base CLIP's ViT and the stage-2 ViTs; text sides: the base CLIP's text tower, ProCLIP's stage-1
adaptor (over ProCLIP's LLM, embedded as its text.json says) and each stage-2 folder's own text side. A
stage-2 ViT keeps the base CLIP's projection in ProCLIP (so it pairs with the base text tower, the stage-1
adaptor and its own text side) and gets a fresh one in LLM2CLIP (its own text side only: the spaces differ).
    python data/fashion/probe_zeroshot.py --demo=out/demo [--stage1=<ProCLIP stage-1 folder>] [--proclip=<stage-2 folder>]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import evaluate as E  # noqa: E402
import model as M  # noqa: E402
from manifest import Manifest  # noqa: E402

demo, data, stage1, proclip = "out/demo", "data/fashion/out", "", ""  # "" = the demo's own folders

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    stage1, proclip = stage1 or f"{demo}/stage1_proclip", proclip or f"{demo}/proclip/model"
    classes, templates = E.read_classes(f"{data}/classes.json")
    items = Manifest(f"{data}/zeroshot.jsonl").check(images="ignore")
    labels = [r["label"] for r in items]
    with torch.no_grad():
        pro = E.StageTwoText(proclip, E.device)  # its LLM (fingerprint checked), adaptor and embedding settings
        pro_stage1 = M.Adaptor.from_pretrained(stage1).to(E.device).eval()
        base = {"base CLIP text tower": E.CLIPText(f"{demo}/base_clip/model", E.device),
                "ProCLIP stage-1 adaptor": lambda texts: pro_stage1(pro.llm_embed(texts))}  # the base CLIP's space
        towers = [("base CLIP ViT", f"{demo}/base_clip/model", base),
                  ("ProCLIP ViT", proclip, {**base, "its own text side": pro}),
                  ("LLM2CLIP ViT", f"{demo}/llm2clip/model",
                   {"its own text side": E.StageTwoText(f"{demo}/llm2clip/model", E.device)})]
        print(f"zero-shot top-1 (%) on {len(items)} single items of {data}/zeroshot.jsonl")
        for name, path, sides in towers:
            img = E.image_embeddings(M.load_image_tower(path).to(E.device).eval(), items, E.device)
            for side, embed in sides.items():  # zeroshot_classifier normalises what embed returns
                acc = E.zeroshot_accuracy(img, E.zeroshot_classifier(embed, classes, templates), labels)["zeroshot_top1"]
                print(f"{name:<14} + {side:<24} {acc:5.1f}")
