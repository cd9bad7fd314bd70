# The embedding caches of the paper-scale runs: the frozen LLM (stage 1's merged output, or the released
# LLM2CLIP LLM for ProCLIP) over every caption of CC3M + CC12M, once, on 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 embed_cache.py config/embed_cache_paper.py \
#       --manifest=out/paper/data/train_cc3m_cc12m.jsonl --model=out/paper/stage1_llama3_8b/merged \
#       --out_dir=out/paper/cache/train_llama3_8b_cc3m_cc12m    (paper.sh's layout)
# Provenance: [code] the official embedding script (microsoft/LLM2CLIP llm2clip/data/extract_embedding.py:
# LLM2Vec with mean pooling, max_length 512, no instruction, bf16), [ours] our choice.
# Size: 8 KiB per caption at D=4096 (fp16), 4 KiB at D=2048. The official run embeds two captions per image
# (one short, one long: shortSV_captions, longSV_captions): 2 x 12,873,763 = 25.7M rows = 211 GB at
# D=4096. A manifest with every DreamLIP caption (3 short + 3 long + raw per image) would be 3.5x that:
# set `fields` to the two you train on.
fields = "short,long"        # [ours] the two fields stage 2 trains on ("" = every field: see above)
instruction = ""             # [code] captions are embedded without an instruction
max_length = 512             # [code] LLM2Vec(max_length=512)
dtype = "bfloat16"           # [code] torch_dtype bfloat16
batch_size = 256             # [ours] (the official encode() batch is 32); memory: `python -m bench.memory`.
                             # Part of the cache's identity: a cache resumes only with the same batch size
chunk_size = 8192            # [ours] captions per resumable unit: ~3,100 chunks over 25.7M captions
