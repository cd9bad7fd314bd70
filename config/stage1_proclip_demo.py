# ProCLIP stage 1 on the Fashion demo: distil the base CLIP's text tower (out/demo/base_clip) into an
# adaptor over raw SmolLM2's cached embeddings of short and long captions. Sized for a 2-core CPU.
method = "proclip"
manifest = "data/fashion/out/train.jsonl"
model = "data/smollm2/hf"
clip = "out/demo/base_clip/model"
cache = "out/demo/cache/raw_train"
out_dir = "out/demo/stage1_proclip"
ins_fields = "short,long"
batch_size = 128
max_steps = 400
warmup_steps = 40
lr = 1e-3
min_lr = 1e-5
grad_clip = 1.0
log_interval = 25
ckpt_interval = 100
