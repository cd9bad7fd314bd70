# ProCLIP stage 2 on the Fashion demo: the base CLIP's ViT with its own projection, the adaptor from
# ProCLIP stage 1 over the stage-1 LLM's cached embeddings, and the EMA teacher (settings as LLM2CLIP's demo).
# lambda 0.01: at 0.1 with these steps the distillation sums (over 128 images, 8128 pairs) were twice the
# InfoNCE loss at step 25 and the clipped gradient was almost all distillation.
method = "proclip"
manifest = "data/fashion/out/train.jsonl"
clip = "out/demo/base_clip/model"
llm = "out/demo/stage1_llm2clip/merged"
cache = "out/demo/cache/llm2clip_train"
stage1 = "out/demo/stage1_proclip"
out_dir = "out/demo/proclip"
fields = "short,long"
ema_momentum = 0.999
distill_lambda = 0.01
batch_size = 128
max_steps = 250
warmup_steps = 20
lr = 5e-4
min_lr = 1e-5
layer_decay = 1.0
weight_decay = 0.05
num_workers = 1
log_interval = 25
ckpt_interval = 50
