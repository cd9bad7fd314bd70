# LLM2CLIP stage 1 at the paper's settings for Llama-3-8B-Instruct, the model the official run config was
# written for, on one 8-GPU node (80 GB each: see `python -m bench.memory`):
#   torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_llm2clip_llama3_8b.py --manifest=<CC3M train.jsonl>
# Provenance as in config/stage1_llm2clip_llama32_1b.py: [cfg] microsoft/LLM2CLIP
# llm_caption_contrastive/train_configs/supervised/MetaLlama3_cc3m.json, [code] its run_supervised.py,
# [ours] our choice. The same known differences (no MNTP stage, no E5 data, one instruction, no hard
# negative, cosine instead of linear decay). The official run used ZeRO-2 over 8 x 80 GB H100s; here
# each rank holds the whole frozen bf16 base (16 GB) and only the LoRA tensors train, so ZeRO has
# nothing to shard that matters.
method = "llm2clip"
manifest = "out/paper/data/train_cc3m.jsonl"  # paper.sh's layout (README, Reproducing the papers)
model = "/data/models/Meta-Llama-3-8B-Instruct"  # [ours] an HF folder of meta-llama/Meta-Llama-3-8B-Instruct
out_dir = "out/paper/stage1_llama3_8b"
pairs = "short:long"         # [code]
batch_size = 64              # [cfg] 64 per GPU x 8 = 512 global
lora_r = 16                  # [cfg]
lora_alpha = 32              # [code] 2 * lora_r
lora_dropout = 0.05          # [code]
simcse_scale = 50.0          # [code] loss_scale 50
lr = 2e-4                    # [cfg]
min_lr = 0.0                 # [cfg] decays to 0
warmup_steps = 300           # [cfg]
weight_decay = 0.0           # [cfg] HF Trainer's default
grad_clip = 1.0              # [cfg] HF Trainer's default
max_length = 512             # [cfg]
max_steps = 5613             # [cfg] 1 epoch: ceil(2,873,538 CC3M pairs / 512) (paper.sh: from the manifest)
grad_checkpointing = True    # [cfg]
dtype = "bfloat16"           # [cfg]
log_interval = 10            # [ours]
ckpt_interval = 500          # [ours]
