# LLM2CLIP stage 2 at the paper's settings: OpenAI CLIP ViT-L/14 at 336 px on CC3M + CC12M, on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train_stage2.py config/stage2_llm2clip_vitl14_336.py --manifest=<train.jsonl>
# Provenance as in config/stage2_llm2clip_vitl14_224.py ([run.sh] microsoft/LLM2CLIP llm2clip/run.sh,
# [json] OpenaiCLIP-L-14-336.json, [paper], [ours]); only the CLIP and the output folder differ. At 336 px
# a ViT-L/14 sees 577 tokens per image instead of 257: about 2.3x the activations of the 224 run
# (`python -m bench.memory`: about 58 GiB per GPU with activation checkpointing, 357 GiB without).
method = "llm2clip"
clip = "/data/models/clip-vit-large-patch14-336"  # [ours] an HF folder of openai/clip-vit-large-patch14-336
llm = "out/paper/stage1_llama3_8b/merged"
cache = "out/paper/cache/train_llama3_8b_cc3m_cc12m"
manifest = "out/paper/data/train_cc3m_cc12m.jsonl"  # paper.sh's layout
out_dir = "out/paper/stage2_llm2clip_llama3_8b_clip-vit-large-patch14-336_cc3m_cc12m"
fields = "short,long"        # [run.sh data]
embed_dim = 1280             # [json] embed_dim 1280
batch_size = 512             # [run.sh] 512 x 8 = 4096
lr = 1e-5                    # [run.sh]
min_lr = 0.0                 # [run.sh]
warmup_steps = 0             # [run.sh]
layer_decay = 0.85           # [run.sh] --visual-ld 0.85
weight_decay = 0.05          # [run.sh]
grad_clip = 5.0              # [run.sh]
max_steps = 12572            # [paper] 4 epochs: 4 x 12,873,763 / 4096 = 12,572.03 (paper.sh: from the manifest)
num_workers = 8              # [run.sh]
dtype = "bfloat16"           # [ours] (run.sh: fp16)
log_interval = 50            # [run.sh]
ckpt_interval = 1000         # [ours]
grad_checkpointing = True    # [run.sh] --grad-checkpointing (see Memory above)
