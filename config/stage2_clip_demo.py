# The demo's base CLIP, from scratch on the short captions only (DESIGN.md section 9): a small ViT and a
# CLIP text tower with a 16-token context, sized for a 2-core CPU. It plays the part of "pretrained CLIP".
method = "clip"
clip = ""
manifest = "data/fashion/out/train.jsonl"
out_dir = "out/base_clip"
fields = "short"
batch_size = 128
max_steps = 300
warmup_steps = 20
lr = 5e-4
min_lr = 1e-5
layer_decay = 1.0                # from scratch: every layer at the full lr
weight_decay = 0.05
num_workers = 1
log_interval = 25
ckpt_interval = 100
