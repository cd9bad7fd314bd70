# LLM2CLIP stage 1 at the paper's settings, Llama-3.2-1B-Instruct on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_llm2clip_llama32_1b.py --manifest=<CC3M train.jsonl>
# Provenance of each number: [cfg] the official stage-1 run config (microsoft/LLM2CLIP,
# llm_caption_contrastive/train_configs/supervised/MetaLlama3_cc3m.json, written for Llama-3-8B-Instruct;
# the 1B's own settings were not released, so the 8B's are used), [code] the official stage-1 code
# (run_supervised.py / E5_cc3m.py), [paper] the LLM2CLIP paper, [ours] our choice where nothing says.
# Known differences from the official run: no MNTP stage before (the official starts from an MNTP LoRA
# trained on wikitext-103 + CC3M), CC3M pairs only (the official mixes in LLM2Vec's E5 data), one
# instruction for both directions (the official has one per direction), no hard negative, and a cosine
# schedule (the official: HF Trainer's linear decay to 0).
method = "llm2clip"
manifest = "out/paper/data/train_cc3m.jsonl"  # paper.sh's layout (README, Reproducing the papers)
model = "/data/models/Llama-3.2-1B-Instruct"  # [ours] an HF folder of meta-llama/Llama-3.2-1B-Instruct
out_dir = "out/paper/stage1_llama32_1b"
pairs = "short:long"         # [code] a short and a long caption of one image; a coin flip picks the query
batch_size = 64              # [cfg] per_device_train_batch_size 64 x 8 GPUs = 512 global
lora_r = 16                  # [cfg] lora_r 16
lora_alpha = 32              # [code] lora_alpha = 2 * lora_r
lora_dropout = 0.05          # [code] the lora_dropout default
simcse_scale = 50.0          # [code] loss_scale 50 (temperature 0.02)
lr = 2e-4                    # [cfg] learning_rate 2e-4
min_lr = 0.0                 # [cfg] HF Trainer's schedule ends at 0 (linear there, cosine here)
warmup_steps = 300           # [cfg] warmup_steps 300
weight_decay = 0.0           # [cfg] HF Trainer's default
grad_clip = 1.0              # [cfg] HF Trainer's default max_grad_norm
max_length = 512             # [cfg] max_seq_length 512
# [cfg] num_train_epochs 1: one epoch of CC3M pairs at the global batch of 512 (CC3M as the official run
# counts it: 2,873,538 images, run.sh's --train-num-samples-list), rounded up like HF Trainer:
#   ceil(2,873,538 / 512) = ceil(5612.4) = 5613 steps. paper.sh computes it from the manifest's
#   own image count (a download never has them all); set it so by hand if you run this alone.
max_steps = 5613
grad_checkpointing = True    # [cfg] gradient_checkpointing true
dtype = "bfloat16"           # [cfg] bf16
log_interval = 10            # [ours]
ckpt_interval = 500          # [ours] (the official saves every 200 steps)
