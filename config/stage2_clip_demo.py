# The demo's base CLIP, from scratch (docs/design.md, The demo data): a small ViT and a CLIP text tower with a
# 10-token context, pretrained on the pretrain split: grids whose short captions name one item each (with
# its colour and place), and single items. It plays the part of "pretrained CLIP": its ViT learns every
# item of a grid, while its text tower cannot read a long caption past its opening sentence.
method = "clip"
clip = ""
tokenizer = "data/smollm2/hf_8layers"  # the demo's LLM folder (demo.sh passes its own: LLM_LAYERS)
manifest = "data/fashion/out/pretrain.jsonl"
out_dir = "out/demo/base_clip"
fields = "short"
context_length = 10
patch_size = 16
batch_size = 64
max_steps = 700
warmup_steps = 30
lr = 3e-4
logit_scale_init = 50.0           # a lower start than CLIP's 1/0.07: steadier from scratch at batch 64
min_lr = 1e-5
layer_decay = 1.0                # from scratch: every layer at the full lr
weight_decay = 0.05
num_workers = 1
log_interval = 50
ckpt_interval = 200
