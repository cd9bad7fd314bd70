#!/usr/bin/env bash
# The papers' path, as demo.sh is the demo's: from the downloads to the papers' table on one node of GPUs.
# Set the variables below (edit them here, or pass them in the environment) and run ./paper.sh.
#   img2dataset shards (+ DreamLIP recaptions) -> manifests -> LLM2CLIP stage 1 (LoRA on the LLM)
#   -> the LLM's embeddings of the training captions (cache) -> ProCLIP stage 1 (adaptor distilled from
#   CLIP's text tower) -> stage 2 (the CLIP's ViT against the LLM) -> the seven benchmarks converted and
#   their captions cached -> evaluate.py: the baseline CLIP and the trained model, the papers' table.
# Every step is skipped when its output is complete ("paper.sh: skip ...") and resumes from its last
# checkpoint or chunk when it is not, so a killed run is continued by running the script again.
# README.md, Reproducing the papers: the downloads and where they go, the targets, time and disk per step.
set -euo pipefail
cd "$(dirname "$0")"

DATA=${DATA:-/data}            # the downloads: models/, cc3m/, cc12m/, dreamlip/, eval/ (README: Downloads)
OUT=${OUT:-out/paper}          # every output of this script
GPUS=${GPUS:-8}                # processes (GPUs) per node
NODES=${NODES:-1}              # several nodes: run the script on each with the same DATA and OUT (shared
NODE_RANK=${NODE_RANK:-0}      #   storage), NODE_RANK 0, 1, ... and MASTER=<node 0's host:port>; node 0
MASTER=${MASTER:-}             #   runs the one-process steps, the others wait for their outputs
METHOD=${METHOD:-llm2clip}     # llm2clip | proclip
LLM=${LLM:-llama3_8b}          # llama3_8b: stage 1 on Meta-Llama-3-8B-Instruct | llama32_1b: on
                               # Llama-3.2-1B-Instruct | released, released_1b: LLM2CLIP's released
                               # Llama-3-8B / Llama-3.2-1B CC-Finetuned LLM, stage 1 skipped
CLIP=${CLIP:-clip-vit-large-patch14-336}  # the image tower's folder under $DATA/models (a SigLIP folder
                               # trains with the sigmoid loss; ProCLIP needs a CLIP: its text tower teaches)
SOURCES=${SOURCES:-cc3m,cc12m} # cc3m | cc3m,cc12m: stage 2's training images (stage 1 reads CC3M only)
RECAPTIONS=${RECAPTIONS:-SV}   # DreamLIP's recaption pair trained on as short/long: SV (the papers'), IB, LLA
SMALL=${SMALL:-0}              # 1: a rehearsal on miniatures (tests/test_paper.py): batches of 4 per rank,
                               # at most 2 steps, float32, so every step runs in seconds on a CPU

# the papers' global batches and epochs; steps = ceil(epochs x images / global batch) from each manifest
S1_BATCH=512; S1_EPOCHS=1      # LLM2CLIP stage 1: one epoch of CC3M at 512 (official run: 5613 steps)
P1_BATCH=4096; P1_EPOCHS=1     # ProCLIP stage 1 (its recipe is not released: ours)
S2_BATCH=4096; S2_EPOCHS=4     # stage 2: four epochs at 4096 (CC3M + CC12M: 12572 steps)
MAX_STEPS=0                    # > 0: a cap on every training step's count
TRAIN_EXTRA=(); CACHE_EXTRA=(); EVAL_EXTRA=(); S2_EXTRA=()
if [ "$SMALL" = 1 ]; then
  S1_BATCH=$((4 * GPUS * NODES)); P1_BATCH=$S1_BATCH; S2_BATCH=$S1_BATCH; MAX_STEPS=2
  TRAIN_EXTRA=(--dtype=float32 --warmup_steps=0 --log_interval=1 --ckpt_interval=1 --grad_checkpointing=False)
  S2_EXTRA=(--num_workers=0)
  CACHE_EXTRA=(--dtype=float32 --batch_size=8 --chunk_size=16)
  EVAL_EXTRA=(--dtype=float32 --batch_size=16 --device=cpu)
fi

say() { echo "paper.sh: $*"; }
die() { echo "paper.sh: $*" >&2; exit 1; }
WORLD=$((GPUS * NODES))
if [ "$NODES" = 1 ]; then T=(torchrun --standalone --nproc_per_node="$GPUS")
else T=(torchrun --nnodes="$NODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS" --rdzv_backend=c10d
        --rdzv_endpoint="${MASTER:?MASTER=<host:port of node 0> with NODES > 1}"); fi

# done-tests: a path that exists, a complete cache
exists() { [ -e "$1" ]; }
cache_done() { [ -f "$1/meta.json" ] && python -c "import json, sys; sys.exit(not json.load(open(sys.argv[1])).get('complete'))" "$1/meta.json"; }
# step NAME DONE-TEST DONE-ARG [one|all] -- COMMAND...: skip when done, else run (one: node 0 only, the
# other nodes wait for it; all: every node, a torchrun step), then check it is done
step() {
  local name=$1 test=$2 arg=$3 where=$4; shift 5
  if $test "$arg"; then say "skip $name (done: $arg)"; return; fi
  if [ "$where" = one ] && [ "$NODE_RANK" != 0 ]; then
    say "wait $name (node 0 runs it)"; until $test "$arg"; do sleep 30; done; return
  fi
  say "run $name"
  "$@"
  $test "$arg" || die "$name ended without its output ($arg)"
}
# steps MANIFEST EPOCHS GLOBAL_BATCH: the step count of that many epochs (capped by MAX_STEPS), from
# the image count prepare.py recorded beside the manifest (no pass over it)
steps() {
  python - "$@" "$MAX_STEPS" <<'PY'
import json, math, sys
manifest, epochs, batch, cap = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n = json.load(open(manifest + ".prepare.json"))["counts"]["images"]
s = max(1, math.ceil(epochs * n / batch))
print(min(s, cap) if cap > 0 else s)
PY
}
per_rank() { [ $(($1 % WORLD)) = 0 ] || die "global batch $1 is not a multiple of $WORLD processes"; echo $(($1 / WORLD)); }
need() { [ -e "$1" ] || die "$1 not found: $2 (README, Reproducing the papers: Downloads)"; }
B1=$(per_rank $S1_BATCH); BP=$(per_rank $P1_BATCH); B2=$(per_rank $S2_BATCH)  # per-GPU batches

# ---- the downloads
M=$DATA/models
case $LLM in
  llama3_8b)   BASE=$M/Meta-Llama-3-8B-Instruct; S1_CONFIG=config/stage1_llm2clip_llama3_8b.py ;;
  llama32_1b)  BASE=$M/Llama-3.2-1B-Instruct; S1_CONFIG=config/stage1_llm2clip_llama32_1b.py ;;
  released)    BASE=$M/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned ;;
  released_1b) BASE=$M/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned ;;
  *) die "LLM=$LLM: one of llama3_8b, llama32_1b, released, released_1b" ;;
esac
[ "$METHOD" = llm2clip ] || [ "$METHOD" = proclip ] || die "METHOD=$METHOD: llm2clip or proclip"
case $SOURCES in cc3m) SRC=cc3m ;; cc3m,cc12m) SRC=cc3m_cc12m ;; *) die "SOURCES=$SOURCES: cc3m or cc3m,cc12m" ;; esac
need "$BASE" "the LLM"
need "$M/$CLIP" "the image tower CLIP=$CLIP"
SIGLIP=$(python -c "import json, sys; print(int(json.load(open(sys.argv[1])).get('model_type') == 'siglip'))" "$M/$CLIP/config.json")
[ "$SIGLIP" = 0 ] || [ "$METHOD" = llm2clip ] || die "ProCLIP distils a CLIP's text tower: CLIP=$CLIP is a SigLIP"
mkdir -p "$OUT/data" "$OUT/eval"
OUT=$(cd "$OUT" && pwd)  # absolute: text.json and the caches record the paths they were given

# ---- 1. manifests: the shards read in place, recaptions from each source's DreamLIP CSV or KEY.json
manifest() {  # manifest NAME SOURCE...
  local name=$1 shards="" sides=""; shift
  for s in "$@"; do
    need "$DATA/$s" "the img2dataset shards of $s"
    shards=${shards:+$shards,}$DATA/$s
    local csv=$DATA/dreamlip/${s}_3long_3short_1raw_captions_url.csv
    [ -f "$csv" ] && sides=${sides:+$sides,}$csv
  done
  step "manifest $name" exists "$OUT/data/$name.jsonl.prepare.json" one -- \
    python data/webdataset/prepare.py --shards="$shards" --long_captions="$sides" \
      --recaptions="$RECAPTIONS" --out="$OUT/data/$name.jsonl"
}
manifest train_cc3m cc3m
[ "$SRC" = cc3m ] || manifest train_cc3m_cc12m cc3m cc12m
S1_MAN=$OUT/data/train_cc3m.jsonl
TRAIN=$OUT/data/train_$SRC.jsonl
S1_STEPS=$(steps "$S1_MAN" $S1_EPOCHS $S1_BATCH)
P1_STEPS=$(steps "$TRAIN" $P1_EPOCHS $P1_BATCH)
S2_STEPS=$(steps "$TRAIN" $S2_EPOCHS $S2_BATCH)

# ---- 2. LLM2CLIP stage 1: the LLM fine-tuned into a caption embedder (short-long pairs of CC3M)
if [ -n "${S1_CONFIG:-}" ]; then
  LLM_DIR=$OUT/stage1_$LLM/merged
  step "stage 1 ($LLM)" exists "$LLM_DIR" all -- \
    "${T[@]}" train_stage1.py "$S1_CONFIG" --manifest="$S1_MAN" --model="$BASE" --out_dir="$OUT/stage1_$LLM" \
      --batch_size="$B1" --max_steps="$S1_STEPS" "${TRAIN_EXTRA[@]}"
else
  LLM_DIR=$BASE
fi

# ---- 3. the LLM's embeddings of the training captions, the two fields trained on
CACHE=$OUT/cache/train_${LLM}_$SRC
step "cache of the training captions" cache_done "$CACHE" all -- \
  "${T[@]}" embed_cache.py config/embed_cache_paper.py --manifest="$TRAIN" --model="$LLM_DIR" \
    --fields=short,long --out_dir="$CACHE" "${CACHE_EXTRA[@]}"

# ---- 4. ProCLIP stage 1: the adaptor distilled from the CLIP's text tower
RUN=${METHOD}_${LLM}_${CLIP}_$SRC
S2_ARGS=(--method="$METHOD" --clip="$M/$CLIP" --llm="$LLM_DIR" --cache="$CACHE")
if [ "$METHOD" = proclip ]; then
  P1=$OUT/stage1_proclip_${LLM}_${CLIP}_$SRC
  step "ProCLIP stage 1" exists "$P1/adaptor.json" all -- \
    "${T[@]}" train_stage1.py config/stage1_proclip_paper.py --manifest="$TRAIN" --model="$LLM_DIR" \
      --clip="$M/$CLIP" --cache="$CACHE" --out_dir="$P1" --batch_size="$BP" --max_steps="$P1_STEPS" \
      "${TRAIN_EXTRA[@]}"
  S2_CONFIG=config/stage2_proclip_paper.py
  S2_ARGS+=(--stage1="$P1")
else
  S2_CONFIG=config/stage2_llm2clip_vitl14_224.py  # the 336 config differs only in its CLIP and out_dir
  [ "$SIGLIP" = 0 ] || S2_ARGS+=(--loss=sigmoid --embed_dim=0)
fi

# ---- 5. stage 2: the image tower tuned against the LLM's embeddings
S2=$OUT/stage2_$RUN
step "stage 2 ($RUN)" exists "$S2/model" all -- \
  "${T[@]}" train_stage2.py "$S2_CONFIG" --manifest="$TRAIN" "${S2_ARGS[@]}" --out_dir="$S2" \
    --batch_size="$B2" --max_steps="$S2_STEPS" "${TRAIN_EXTRA[@]}" "${S2_EXTRA[@]}"

# ---- 6. the benchmarks: each set converted once, its captions cached by this LLM
B=""; C=""
for s in flickr30k coco sharegpt4v urban1k docci xm3600 imagenet; do
  if [ ! -d "$DATA/eval/$s" ]; then say "no $DATA/eval/$s: its column prints -"; continue; fi
  last=test.jsonl; [ "$s" = imagenet ] && last=classes_single.json
  step "convert $s" exists "$OUT/eval_data/$s/$last" one -- \
    python "data/$s/prepare.py" --root="$DATA/eval/$s" --out="$OUT/eval_data/$s"
  B=${B:+$B,}$s=$OUT/eval_data/$s
  [ "$s" = imagenet ] && continue  # zero-shot prompts are not manifest captions: always embedded
  step "cache of $s's captions" cache_done "$OUT/cache/eval_${LLM}_$s" all -- \
    "${T[@]}" embed_cache.py config/embed_cache_paper.py --manifest="$OUT/eval_data/$s/test.jsonl" \
      --model="$LLM_DIR" --fields= --out_dir="$OUT/cache/eval_${LLM}_$s" "${CACHE_EXTRA[@]}"
  C=${C:+$C,}$s=$OUT/cache/eval_${LLM}_$s
done
[ -n "$B" ] || die "no evaluation set under $DATA/eval"

# ---- 7. evaluation: the baseline (the CLIP through its own text tower) and the trained model
evaluate() {  # evaluate NAME MODEL [evaluate.py settings...]
  step "evaluate $1" exists "$OUT/eval/$1.json" one -- \
    python evaluate.py --model="$2" --name="$1" --out="$OUT/eval/$1.json" --benchmarks="$B" \
      "${EVAL_EXTRA[@]}" "${@:3}"
}
[ "$SIGLIP" = 1 ] || evaluate "$CLIP" "$M/$CLIP"   # a raw SigLIP has no text tower evaluate.py runs
evaluate "$RUN" "$S2/model" --caches="$C"
python - "$OUT/eval" "$RUN" $([ "$SIGLIP" = 1 ] || echo "$CLIP") <<'PY'
import json, os, sys
folder, names = sys.argv[1], sys.argv[3:] + sys.argv[2:3]  # the baseline first
sets = [("Flickr", "flickr30k"), ("COCO", "coco"), ("S-GPT4V", "sharegpt4v"), ("Urb-1k", "urban1k"),
        ("DOCCI", "docci"), ("Avg", "avg"), ("XM3600", "xm3600")]
cols = [(f"{head} {d}", f"{key}_{d.lower()}_r1") for head, key in sets for d in ("I2T", "T2I")]
cols += [("IN 0-shot*", "imagenet_single_top1"), ("IN 0-shot", "imagenet_ensemble_top1")]
width = max(len(n) for n in names) + 2
print("\nThe papers' table: R@1 in percent; IN: ImageNet top-1, 0-shot* one template, 0-shot the 80"
      "\n(README, Reproducing the papers: the papers' own numbers)")
print(" " * width + "".join(f"{h.split()[0]:>8}" for h, _ in cols))
print(" " * width + "".join(f"{' '.join(h.split()[1:]):>8}" for h, _ in cols))
for name in names:
    res = json.load(open(os.path.join(folder, name + ".json")))["results"]
    print(f"{name:<{width}}" + "".join(f"{res[k]:8.1f}" if k in res else f"{'-':>8}" for _, k in cols))
print(f"(each model's whole table and every metric: {folder}/<name>.json)")
PY
