#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default data (DESIGN.md section 9), on whatever device
# there is (a GPU if torch sees one). Usage: ./demo.sh [seed] (default 1337; out/demo, or out/demo_seed<N>).
#   data + SmolLM2 -> base CLIP from scratch -> LLM2CLIP stage 1 -> embedding caches (raw and stage-1 LLM)
#   -> ProCLIP stage 1 -> stage 2 three ways (LLM2CLIP without stage 1, LLM2CLIP, ProCLIP) -> evaluation
# Prints one table and writes $out/results.json. Every step skips work already done (checkpoints, complete
# caches, finished models), so a killed demo resumes where it stopped; delete $out to start over.
set -euo pipefail
cd "$(dirname "$0")"
seed=${1:-1337}
out=${OUT:-out/demo$([ "$seed" = 1337 ] || echo "_seed$seed")}
mkdir -p "$out/eval"
SECONDS=0
# the LLM's inference dtype: bf16 on GPUs and on CPUs with bf16 instructions (3.5x faster there), else fp32
llm_dtype=$(python -c "import torch; print('bfloat16' if torch.cuda.is_available() or getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)() else 'float32')")

python data/smollm2/prepare.py  # first: the data build reads its tokenizer for caption-length statistics
python data/fashion/prepare.py
train2() { [ -d "$2/model" ] || python train_stage2.py "$1" --out_dir="$2" --seed="$seed" "${@:3}"; }

# 1. the base CLIP ("pretrained CLIP"): a small ViT + a CLIP text tower with a 16-token context, short captions
train2 config/stage2_clip_demo.py "$out/base_clip"
# 2. LLM2CLIP stage 1: SmolLM2 fine-tuned (LoRA) to tell captions of different images apart
[ -d "$out/stage1_llm2clip/merged" ] || python train_stage1.py config/stage1_llm2clip_demo.py --out_dir="$out/stage1_llm2clip" --seed="$seed"
# 3. embedding caches: the raw and the stage-1 LLM over the training captions and every test caption
for name in raw llm2clip; do
    llm=$([ $name = raw ] && echo data/smollm2/hf || echo "$out/stage1_llm2clip/merged")
    python embed_cache.py --model="$llm" --manifest=data/fashion/out/train.jsonl --fields=short,long --out_dir="$out/cache/${name}_train" --dtype="$llm_dtype"
    python embed_cache.py --model="$llm" --manifest=data/fashion/out/test.jsonl --out_dir="$out/cache/${name}_test" --dtype="$llm_dtype"
done
# 4. ProCLIP stage 1: an adaptor on raw SmolLM2 embeddings distilled from the base CLIP's text tower
[ -f "$out/stage1_proclip/adaptor.json" ] || python train_stage1.py config/stage1_proclip_demo.py --clip="$out/base_clip/model" --cache="$out/cache/raw_train" --out_dir="$out/stage1_proclip" --seed="$seed"
# 5. stage 2, three ways, from the base CLIP's ViT
train2 config/stage2_llm2clip_demo.py "$out/llm2clip_no_stage1" --clip="$out/base_clip/model" --llm=data/smollm2/hf --cache="$out/cache/raw_train"
train2 config/stage2_llm2clip_demo.py "$out/llm2clip" --clip="$out/base_clip/model" --llm="$out/stage1_llm2clip/merged" --cache="$out/cache/llm2clip_train"
train2 config/stage2_proclip_demo.py "$out/proclip" --clip="$out/base_clip/model" --cache="$out/cache/raw_train" --stage1="$out/stage1_proclip"
# 6. evaluation on the test split: the base CLIP through its own text tower, the others through cached LLM embeddings
python evaluate.py --model="$out/base_clip/model" --name=base_clip --out="$out/eval/base_clip.json" --dtype="$llm_dtype"
python evaluate.py --model="$out/llm2clip_no_stage1/model" --cache="$out/cache/raw_test" --name=llm2clip_no_stage1 --out="$out/eval/llm2clip_no_stage1.json" --dtype="$llm_dtype"
python evaluate.py --model="$out/llm2clip/model" --cache="$out/cache/llm2clip_test" --name=llm2clip --out="$out/eval/llm2clip.json" --dtype="$llm_dtype"
python evaluate.py --model="$out/proclip/model" --cache="$out/cache/raw_test" --name=proclip --out="$out/eval/proclip.json" --dtype="$llm_dtype"

python - "$out" "$SECONDS" "$seed" <<'PY'
import json, os, sys
import torch
out, seconds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keys = ["c2c_top1", "short_i2t_r1", "short_t2i_r1", "long_i2t_r1", "long_t2i_r1", "multilingual_i2t_r1",
        "multilingual_t2i_r1", "zeroshot_top1"]
rows = {}
for name in ("base_clip", "llm2clip_no_stage1", "llm2clip", "proclip"):
    res = json.load(open(f"{out}/eval/{name}.json"))["results"]
    rows[name] = {k: res[k] for k in keys if k in res}
device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
print(f"\nFashion demo, test split (percent), seed {seed}, {device}")
print(f"{'':<20}" + "".join(f"{k.replace('_r1', '').replace('multilingual', 'multi'):>14}" for k in keys))
for name, r in rows.items():
    print(f"{name:<20}" + "".join(f"{r[k]:14.1f}" if k in r else f"{'-':>14}" for k in keys))
json.dump({"rows": rows, "seconds": seconds, "device": device, "seed": seed}, open(f"{out}/results.json", "w"), indent=2)
print(f"{seconds}s; wrote {out}/results.json")
PY
