#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default data (docs/design.md, The demo data), on whatever device
# there is (a GPU if torch sees one). Usage: [LLM_LAYERS=k] [FASHION_SRC=dir] ./demo.sh [seed] (default 1337 into out/demo;
# out/demo_seed<N>, out/demo_<k>layers_seed<N>).
#   data + SmolLM2 (its first 8 layers) -> base CLIP pretrained from scratch -> LLM2CLIP stage 1 (SmolLM2 ->
#   caption embedder)
#   -> embedding caches (raw and stage-1 LLM) -> ProCLIP stage 1 (on the stage-1 LLM, as the paper does;
#   distilled on the base CLIP's pretraining captions)
#   -> stage 2 three ways (LLM2CLIP without stage 1, LLM2CLIP, ProCLIP) -> evaluation
# Prints one table and writes $out/results.json. Every step skips work already done (checkpoints, complete
# caches, finished models), so a killed demo resumes where it stopped; delete $out to start over.
set -euo pipefail
cd "$(dirname "$0")"
seed=${1:-1337}
# the LLM: SmolLM2's first 8 of its 30 layers (docs/experiments.md: why); LLM_LAYERS=30 for the whole model
layers=${LLM_LAYERS:-8}
out=${OUT:-out/demo$([ "$layers" = 8 ] || echo "_${layers}layers")$([ "$seed" = 1337 ] || echo "_seed$seed")}
mkdir -p "$out/eval"
SECONDS=0
# the LLM's inference dtype: bf16 on GPUs and on CPUs with bf16 instructions (2x faster there), else fp32
llm_dtype=$(python -c "import torch; print('bfloat16' if torch.cuda.is_available() or getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)() else 'float32')")
data=data/fashion/out
s1="$out/stage1_llm2clip/merged"
llm=data/smollm2/hf$([ "$layers" = 30 ] || echo "_${layers}layers")

python data/smollm2/prepare.py --layers="$layers" --out="$llm"  # first: the data build reads its tokenizer
python data/fashion/prepare.py --tokenizer="$llm" ${FASHION_SRC:+--src="$FASHION_SRC"}  # (caption-length stats)
train2() { [ -d "$2/model" ] || python train_stage2.py "$1" --out_dir="$2" --seed="$seed" "${@:3}"; }
# every LLM embedding with stage 1's attention (causal in the demo: config/stage1_llm2clip_demo.py says why)
cache() { python embed_cache.py --model="$1" --manifest="$data/$2.jsonl" --fields="$3" --out_dir="$4" --dtype="$llm_dtype" --attention=causal; }

# 1. the base CLIP ("pretrained CLIP"): a small ViT + a CLIP text tower with a 10-token context, pretrained on
#    grids whose short captions name one item each and on single items ("its ImageNet")
train2 config/stage2_clip_demo.py "$out/base_clip" --tokenizer="$llm"
# 2. LLM2CLIP stage 1: SmolLM2 fine-tuned (LoRA, causal attention) on caption pairs of one image: short-long and
#    English-German
[ -d "$s1" ] || python train_stage1.py config/stage1_llm2clip_demo.py --model="$llm" --out_dir="$out/stage1_llm2clip" --seed="$seed" --dtype="$llm_dtype"
# 3. embedding caches: the raw and the stage-1 LLM over the training captions (English) and the test captions
#    (the raw LLM: English only, to save time; data/fashion/probe_stage1.py shows it cannot match German or French)
cache "$llm" train short,long "$out/cache/raw_train"
cache "$llm" test short,long "$out/cache/raw_test"
cache "$s1" train short,long "$out/cache/llm2clip_train"
cache "$s1" test short,long,de,fr "$out/cache/llm2clip_test"
# 4. ProCLIP stage 1: an adaptor on the stage-1 LLM's embeddings distilled from the base CLIP's text tower,
#    on the captions it was pretrained on (short ones: its 10-token context reads them whole)
cache "$s1" pretrain short "$out/cache/llm2clip_pretrain"
[ -f "$out/stage1_proclip/adaptor.json" ] || python train_stage1.py config/stage1_proclip_demo.py --model="$s1" --clip="$out/base_clip/model" --cache="$out/cache/llm2clip_pretrain" --out_dir="$out/stage1_proclip" --seed="$seed"
# 5. stage 2, three ways, from the base CLIP's ViT, on English captions only
train2 config/stage2_llm2clip_demo.py "$out/llm2clip_no_stage1" --clip="$out/base_clip/model" --llm="$llm" --cache="$out/cache/raw_train"
train2 config/stage2_llm2clip_demo.py "$out/llm2clip" --clip="$out/base_clip/model" --llm="$s1" --cache="$out/cache/llm2clip_train"
train2 config/stage2_proclip_demo.py "$out/proclip" --clip="$out/base_clip/model" --llm="$s1" --cache="$out/cache/llm2clip_train" --stage1="$out/stage1_proclip"
# 6. evaluation: retrieval on the test grids (German: taught by stage 1; French: never trained on), zero-shot
#    on the single test items, the base CLIP through its own text tower, the others through cached LLM embeddings
ev() { python evaluate.py --model="$out/$1/model" --name="$1" --out="$out/eval/$1.json" --dtype="$llm_dtype" "${@:2}"; }
ev base_clip
ev llm2clip_no_stage1 --cache="$out/cache/raw_test" --multilingual= --multilingual_unseen=
ev llm2clip --cache="$out/cache/llm2clip_test"
ev proclip --cache="$out/cache/llm2clip_test"

python - "$out" "$SECONDS" "$seed" "$layers" <<'PY'
import json, os, sys
import torch
out, seconds, seed, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
keys = ["c2c_top1", "short_i2t_r1", "short_t2i_r1", "long_i2t_r1", "long_t2i_r1", "multilingual_i2t_r1",
        "multilingual_t2i_r1", "multilingual_unseen_i2t_r1", "multilingual_unseen_t2i_r1", "zeroshot_top1"]
heads = ["c2c", "short i2t", "short t2i", "long i2t", "long t2i", "de i2t", "de t2i", "fr i2t", "fr t2i", "zero-shot"]
rows = {}
for name in ("base_clip", "llm2clip_no_stage1", "llm2clip", "proclip"):
    res = json.load(open(f"{out}/eval/{name}.json"))["results"]
    rows[name] = {k: res[k] for k in keys if k in res}
device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
print(f"\nFashion demo (percent; retrieval R@1 on 500 test grids, de = multilingual, fr = unseen language;"
      f" zero-shot top-1 on 1000 single items), seed {seed}, {device}, SmolLM2 layers {layers}")
print(f"{'':<20}" + "".join(f"{h:>11}" for h in heads))
for name, r in rows.items():
    print(f"{name:<20}" + "".join(f"{r[k]:11.1f}" if k in r else f"{'-':>11}" for k in keys))
json.dump({"rows": rows, "seconds": seconds, "device": device, "seed": seed, "llm_layers": layers}, open(f"{out}/results.json", "w"), indent=2)
print(f"{seconds}s; wrote {out}/results.json")
PY
python data/fashion/results_png.py --demo="$out" --data="$data"  # $out/results.png: what each model retrieves
