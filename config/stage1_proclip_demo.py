# ProCLIP stage 1 on the Fashion demo: distil the base CLIP's text tower (out/demo/base_clip) into an adaptor
# over the stage-1 LLM's cached embeddings (ProCLIP runs on an LLM already tuned for captions: the paper's
# Llama3-CC is LLM2CLIP's stage-1 output), on the captions the base CLIP was pretrained on: the grids' and the
# single items' short captions (pretrain.jsonl), the kind the teacher's 10-token context reads whole (long
# captions would be cut by it). Distilled on the stage-2 grids' short captions instead, the adaptor never sees
# a single item's caption and maps the zero-shot prompts wrongly: the base ViT with it scored 12.2 zero-shot,
# 29.2 with this one (its own text tower 31.3; seed 1337, docs/experiments.md). L_ins on two short captions per
# image. Sized for a 2-core CPU.
method = "proclip"
manifest = "data/fashion/out/pretrain.jsonl"
model = "out/demo/stage1_llm2clip/merged"
clip = "out/demo/base_clip/model"
cache = "out/demo/cache/llm2clip_pretrain"
out_dir = "out/demo/stage1_proclip"
ins_fields = "short,short"
batch_size = 128
max_steps = 200
warmup_steps = 20
lr = 1e-3
min_lr = 1e-5
grad_clip = 1.0
log_interval = 25
ckpt_interval = 100
