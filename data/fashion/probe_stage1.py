"""How an LLM folder embeds the demo's captions, for LLM2CLIP stage 1 (docs/experiments.md's numbers on why stage 1
does not learn here). Two probes, both with the scripts' tokenising, template and pooling (embedder.py):
  1. SimCSE loss at scale 50 and cosine statistics on the first 16 grids of train.jsonl, per caption pair
     (queries carry stage 1's instruction): loss (ln 16 = 2.77 for embeddings that carry nothing), mean
     cosine of the positives and of the negatives, standard deviation of all 256 cosines;
  2. top-1 among the first `n` test grids: the image's other long caption, its German and its French one
     -> its first long caption.
    python data/fashion/probe_stage1.py --model=data/smollm2/hf [--attention=causal] [--n=200] [--data=data/fashion/out]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import embedder as EM  # noqa: E402
import llama as LM  # noqa: E402
import model as M  # noqa: E402

model, data, n, attention, template = "data/smollm2/hf", "data/fashion/out", 200, "bidirectional", "auto"
INSTRUCTION = "Given a caption, retrieve a similar relevant caption."  # train_stage1.py's default
PAIRS = [("short", "long"), ("long", "short"), ("long", "long"), ("long", "de"), ("short", "short_de")]

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    llm = LM.Llama.from_pretrained(model, dtype=torch.bfloat16, causal=attention == "causal").eval()
    tok = M.load_tokenizer(model)
    tmpl = EM.caption_template(tok, template)
    EM.check_embedder(model, EM.EmbedSpec(INSTRUCTION, 512, tmpl, attention))

    @torch.no_grad()
    def embed(texts, instruction=""):
        ids, pre = EM.tokenize_for_embedding(tok, texts, instruction, 512, tmpl)
        i, m = EM.pad_batch(ids)
        return F.normalize(EM.mean_pool(llm(i, m), EM.skip_instruction(m, pre)).float(), dim=-1)

    print(f"{model} ({attention}, template {tmpl!r})")
    train = [json.loads(line) for _, line in zip(range(16), open(os.path.join(data, "train.jsonl")))]
    for fa, fb in PAIRS:  # caption 0 of fa against the last caption of fb (a different one for long:long)
        S = embed([r["captions"][fa][0] for r in train], INSTRUCTION) @ embed([r["captions"][fb][-1] for r in train]).T
        off = S[~torch.eye(16, dtype=torch.bool)]
        print(f"  {fa}->{fb}: SimCSE loss {F.cross_entropy(50 * S, torch.arange(16)).item():.2f}, cosine positives "
              f"{S.diag().mean().item():.3f}, negatives {off.mean().item():.3f}, std {S.std().item():.3f}")
    test = [json.loads(line) for _, line in zip(range(n), open(os.path.join(data, "test.jsonl")))]
    gallery = embed([r["captions"]["long"][0] for r in test])
    for name, texts in (("long1", [r["captions"]["long"][1] for r in test]), ("de", [r["captions"]["de"][0] for r in test]),
                        ("fr", [r["captions"]["fr"][0] for r in test])):
        top1 = (embed(texts) @ gallery.T).argmax(1) == torch.arange(len(test))
        print(f"  {name}->long0 top-1 among {len(test)}: {100 * top1.float().mean().item():.1f}")
