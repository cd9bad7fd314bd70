# LLM2CLIP stage 2 at the paper's settings: OpenAI CLIP ViT-L/14 (224 px) on CC3M + CC12M, the LLM's
# embeddings read from the cache, on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train_stage2.py config/stage2_llm2clip_vitl14_224.py --manifest=<train.jsonl>
# Provenance: [run.sh] the official stage-2 launch script (microsoft/LLM2CLIP llm2clip/run.sh, written
# for EVA02-L/14-336; the OpenAI ViT-L/14 runs were not released with their own script), [json] the
# official model config OpenaiCLIP-L-14.json, [paper] the LLM2CLIP paper, [ours] our choice.
# Not the same as the official run: bf16 autocast (the official: fp16 with a loss scaler), our AdamW
# (the official: apex's, betas and eps as EVA-CLIP's, which train_stage2.py uses too).
# Memory (`python -m bench.memory`): at 512 images per GPU a ViT-L/14 needs activation checkpointing
# (the official run passes --grad-checkpointing): about 31 GiB per GPU with it at 224 px, 165 GiB without.
method = "llm2clip"
clip = "/data/models/clip-vit-large-patch14"    # [ours] an HF folder of openai/clip-vit-large-patch14
llm = "out/paper/stage1_llama3_8b/merged"  # [ours] the LLM that made the cache (fingerprint checked)
cache = "out/paper/cache/train_llama3_8b_cc3m_cc12m"             # embed_cache.py over the same manifest with that LLM
manifest = "out/paper/data/train_cc3m_cc12m.jsonl"  # paper.sh's layout
out_dir = "out/paper/stage2_llm2clip_llama3_8b_clip-vit-large-patch14_cc3m_cc12m"
fields = "short,long"        # [run.sh data] one caption per image per step, short or long at random
embed_dim = 1280             # [json] embed_dim 1280: a fresh projection
batch_size = 512             # [run.sh] --batch-size=512 per GPU x 8 GPUs = 4096 global
lr = 1e-5                    # [run.sh] --lr 1e-5 (visual and text alike)
min_lr = 0.0                 # [run.sh] open_clip's cosine schedule ends at 0
warmup_steps = 0             # [run.sh] --warmup 0
layer_decay = 0.85           # [run.sh] --visual-ld 0.85
weight_decay = 0.05          # [run.sh] --wd 0.05
grad_clip = 5.0              # [run.sh] --grad-clip-norm 5.0
# [paper] 4 epochs of CC3M + CC12M (run.sh's name says 4ep; its --epochs says 20). One epoch is
# 2,873,538 + 10,000,225 = 12,873,763 samples (run.sh's --train-num-samples-list), so at 4096 per step:
#   4 x 12,873,763 / 4096 = 12,572.03 -> 12572 steps (3143 per epoch). paper.sh: from the manifest's count.
max_steps = 12572
num_workers = 8              # [run.sh] --workers 8 per GPU
dtype = "bfloat16"           # [ours] (run.sh: fp16)
log_interval = 50            # [run.sh] --log-every-n-steps 50
ckpt_interval = 1000         # [ours] (run.sh saves every epoch)
grad_checkpointing = True    # [run.sh] --grad-checkpointing (see Memory above)
