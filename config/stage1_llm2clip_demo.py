# LLM2CLIP stage 1 on the Fashion demo with SmolLM2-135M, sized for a 2-core CPU (the paper: batch 2048,
# lr 2e-4, 300 warm-up steps, 1 epoch of real captions, on GPUs). Pairs: a short caption with a long one
# (what the paper's stage 1 does), and English captions with their German translations (long=de,
# short=short_de), so the LLM would learn to embed German like English. French is never paired: the
# demo's unseen language.
# Attention: causal. Raw SmolLM2 with LLM2Vec's bidirectional mask but without LLM2Vec's MNTP training
# embeds these captions with strong hubs (SimCSE loss far above chance before training); at this batch it
# then collapses to chance and learns little (docs/experiments.md). With its own causal mask it starts at chance
# and learns (data/fashion/probe_stage1.py measures both). The paper's recipes keep "bidirectional".
method = "llm2clip"
manifest = "data/fashion/out/train.jsonl"
model = "data/smollm2/hf_8layers"  # SmolLM2's first 8 of 30 layers (demo.sh makes it; docs/experiments.md: why)
out_dir = "out/demo/stage1_llm2clip"
attention = "causal"
pairs = "short:long,long=de,short=short_de"
batch_size = 16
max_steps = 100                   # 60 taught German at some seeds only (docs/experiments.md)
warmup_steps = 5
lr = 2e-3                         # LoRA on a 135M model at batch 16: a high lr (the paper: 2e-4 at batch 2048)
min_lr = 2e-4
simcse_scale = 20.0               # temperature 0.05 (LLM2Vec's); the default 50 is temperature 0.02
lora_top_layers = 8               # adapters on the last 8 layers: all of the demo's 8 (of 30 with LLM_LAYERS=30,
                                  # where the backward then stops there: 2x faster on CPU)
log_interval = 10
ckpt_interval = 20
