# LLM2CLIP stage 1 at the paper's settings (DESIGN.md section 5), e.g. Llama-3.2-1B on 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_llm2clip.py --model=... --manifest=...
# Global batch 512 = 8 x 64 (the paper: 2048), 1 epoch of pairs: set max_steps to images / 512.
method = "llm2clip"
out_dir = "out/stage1_llm2clip"
batch_size = 64
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lr = 2e-4
min_lr = 2e-5
warmup_steps = 300
max_length = 512
max_steps = 2000
grad_checkpointing = True
dtype = "bfloat16"
log_interval = 10
ckpt_interval = 200
