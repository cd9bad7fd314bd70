# ProCLIP stage 1 (representation inheritance) at paper scale: distil OpenAI CLIP ViT-L/14's text tower
# into a 1-block adaptor over the cached embeddings of an LLM embedder already tuned for captions
# (ProCLIP's "Llama3-CC": LLM2CLIP's released Llama-3-8B-Instruct-CC-Finetuned, loaded by model.py
# without remote code), on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train_stage1.py config/stage1_proclip_paper.py --manifest=<train.jsonl>
# Provenance: [paper] the ProCLIP paper (method, losses, the LLM), [code] the official ProCLIP code's
# stage-1 loss (two captions in L_ins, one in L_struct), [ours] our choice: ProCLIP's training recipe
# (batch, learning rate, steps) is not released, so these are ours, sized like LLM2CLIP's stage 2.
method = "proclip"
manifest = "out/paper/data/train_cc3m_cc12m.jsonl"  # paper.sh's layout
model = "/data/models/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"  # [paper] Llama3-CC (the cache's LLM: fingerprint checked)
clip = "/data/models/clip-vit-large-patch14"   # [paper] the teacher: the CLIP whose ViT stage 2 tunes
cache = "out/paper/cache/train_released_cc3m_cc12m"         # embed_cache.py over the manifest with `model`
out_dir = "out/paper/stage1_proclip_released_clip-vit-large-patch14_cc3m_cc12m"
ins_fields = "short,short"   # [code] two captions the teacher reads whole (77 tokens); L_struct on the first
struct_beta = 1.0            # [paper] SmoothL1 with beta 1
adaptor_out = 0              # [paper] 0 = the teacher's joint width (768 for ViT-L/14): L_ins regresses onto it
batch_size = 512             # [ours] 512 x 8 = 4096 global; L_struct is per rank (over 512 x 511 / 2 pairs)
lr = 1e-4                    # [ours]
min_lr = 0.0                 # [ours]
warmup_steps = 200           # [ours]
weight_decay = 0.0           # [ours]
grad_clip = 1.0              # [ours]
max_steps = 3143             # [ours] one epoch of CC3M + CC12M: 12,873,763 / 4096 = 3143.0
dtype = "bfloat16"           # [ours]
log_interval = 50            # [ours]
ckpt_interval = 500          # [ours]
