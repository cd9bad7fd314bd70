# LLM2CLIP stage 1 on the Fashion demo with SmolLM2-135M, sized for a 2-core CPU (the paper: batch 2048,
# lr 2e-4, 300 warm-up steps, 1 epoch of real captions, on GPUs).
method = "llm2clip"
manifest = "data/fashion/out/train.jsonl"
model = "data/smollm2/hf"
out_dir = "out/stage1_llm2clip"
query_field = "short"
key_field = "long"
batch_size = 16
max_steps = 60
warmup_steps = 6
lr = 1e-3
min_lr = 1e-4
log_interval = 5
ckpt_interval = 20
