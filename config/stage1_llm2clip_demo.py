# LLM2CLIP stage 1 on the Fashion demo with SmolLM2-135M, sized for a 2-core CPU (the paper: batch 2048,
# lr 2e-4, 300 warm-up steps, 1 epoch of real captions, on GPUs). Pairs: a short caption with a long one
# (what the paper's stage 1 does), and an English long caption with a German one of the same image, so the
# LLM learns to embed German like English. French is never paired: the demo's unseen language.
method = "llm2clip"
manifest = "data/fashion/out/train.jsonl"
model = "data/smollm2/hf"
out_dir = "out/stage1_llm2clip"
pairs = "short:long,long:de"
batch_size = 16
max_steps = 60
warmup_steps = 6
lr = 1e-3
min_lr = 1e-4
log_interval = 5
ckpt_interval = 20
