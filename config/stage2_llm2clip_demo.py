# LLM2CLIP stage 2 on the Fashion demo, sized for a 2-core CPU: the base CLIP's ViT (out/demo/base_clip)
# with a fresh projection, the adaptor on SmolLM2's cached embeddings of short and long captions, 50/50.
# The paper: lr 1e-5, global batch 4096, 4 epochs, projection 1280 wide, on GPUs. No layer decay here: the
# demo's ViT is small and young (300 steps from scratch on short captions) and every layer must learn the
# three items short captions never name (150 steps at decay 0.85: long R@1 2.6/2.4; 300 at 1.0: 8.4/9.3).
method = "llm2clip"
manifest = "data/fashion/out/train.jsonl"
clip = "out/demo/base_clip/model"
llm = "out/demo/stage1_llm2clip/merged"
cache = "out/demo/cache/llm2clip_train"
out_dir = "out/demo/llm2clip"
fields = "short,long"
embed_dim = 256
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
