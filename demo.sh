#!/usr/bin/env bash
# The main job on the embedded default data, on whatever device there is. So far (the stages that exist):
# the demo data and SmolLM2, caption-to-caption retrieval of the raw LLM, LLM2CLIP stage 1, and the same
# check after it. Data, SmolLM2 and stage 1 skip work already done; the evaluations run again.
set -euo pipefail
cd "$(dirname "$0")"
out=out/demo
mkdir -p $out
SECONDS=0
python data/fashion/prepare.py
python data/smollm2/prepare.py
python evaluate.py --model=data/smollm2/hf --out=$out/c2c_raw.json
python train_stage1.py config/stage1_llm2clip_demo.py --out_dir=$out/stage1_llm2clip
python evaluate.py --model=$out/stage1_llm2clip/merged --out=$out/c2c_llm2clip.json
python - "$out" "$SECONDS" <<'PY'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
rows = {name: json.load(open(f"{out}/c2c_{name}.json"))["results"] for name in ("raw", "llm2clip")}
print(f"\ncaption-to-caption top-1 (%), SmolLM2-135M        raw  after LLM2CLIP stage 1")
for k in rows["raw"]:
    print(f"{k:<44} {rows['raw'][k]:6.2f} {rows['llm2clip'][k]:8.2f}")
json.dump({"rows": rows, "seconds": seconds}, open(f"{out}/results.json", "w"), indent=2)
print(f"{seconds}s; wrote {out}/results.json")
PY
