# LLM2CLIP stage 1 on the Fashion demo with SmolLM2-135M, sized for a 2-core CPU (the paper: batch 2048,
# lr 2e-4, 300 warm-up steps, 1 epoch of real captions, on GPUs). Pairs: a short caption with a long one
# (what the paper's stage 1 does), and English captions with their German translations (long=de,
# short=short_de), so the LLM would learn to embed German like English. French is never paired: the
# demo's unseen language.
# Measured (README, Numbers): at this batch and length stage 1 does not yet learn on the demo data (raw
# bidirectional SmolLM2 has strong hubs; higher lrs collapse), so the demo's stage 1 is kept gentle.
method = "llm2clip"
manifest = "data/fashion/out/train.jsonl"
model = "data/smollm2/hf"
out_dir = "out/stage1_llm2clip"
pairs = "short:long,long=de,short=short_de"
batch_size = 16
max_steps = 40
warmup_steps = 4
lr = 2e-4
min_lr = 2e-5
lora_top_layers = 8               # adapters on the last 8 of 30 layers: the backward stops there (2x faster on CPU)
log_interval = 5
ckpt_interval = 20
