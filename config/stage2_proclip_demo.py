# ProCLIP stage 2 on the Fashion demo: the base CLIP's ViT with its own projection, the adaptor from
# ProCLIP stage 1 over the stage-1 LLM's cached embeddings, and the EMA teacher (settings as LLM2CLIP's demo
# but two). Both hold on to what the base CLIP knew, which zero-shot measures, at a cost in long retrieval
# (seed 1337 with the previous build's 60-step stage 1, docs/experiments.md: zero-shot 13.1 and long R@1
# 49.8/41.1 with neither, 21.7 and 29.2/23.3 with both): distill_lambda 0.1 (the image side: at 0.01 the
# ViT drifts from the teacher; at 0.1 the distillation sums, over 128 images and 8128 pairs, were 0.23 of
# the loss's 3.63 at step 25 in the demo's seed-1337 run), and adaptor_lr_scale 0.3
# (the text side: at the full lr the adaptor trained on grid captions forgets the zero-shot prompts that
# stage 1 mapped onto CLIP's text tower).
method = "proclip"
manifest = "data/fashion/out/train.jsonl"
clip = "out/demo/base_clip/model"
llm = "out/demo/stage1_llm2clip/merged"
cache = "out/demo/cache/llm2clip_train"
stage1 = "out/demo/stage1_proclip"
out_dir = "out/demo/proclip"
fields = "short,long"
ema_momentum = 0.999
distill_lambda = 0.1
adaptor_lr_scale = 0.3
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
