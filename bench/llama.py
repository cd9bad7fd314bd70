"""
Benchmark: our Llama as a bidirectional caption encoder against transformers' LlamaModel (SDPA), same
weights, dtype, inputs and pooling, measured alternately in one run. Not a test: prints and saves a table.

    python -m bench.llama                                   # SmolLM2 (data/smollm2/prepare.py), fp32 on CPU
    python -m bench.llama --model=llama-1b --dtype=bfloat16 # Llama-3.2-1B's shape, random weights (GPU)

Captions are real text: the CuPL descriptions shipped in PyPI `clip-benchmark` (`pip install --no-deps
clip-benchmark`), shuffled and padded per batch to the batch's longest (plain padding, no length sorting).
Without clip-benchmark (a GPU machine without internet) they are synthetic: random words in
CuPL's lengths (median 8 words, 95% within 21), and the output says so. A preset tokenizes with
`tokenizer` (any HF folder), or, where that is missing, a word-level tokenizer made in memory.
Both models get the same bidirectional attention (transformers through a 4D mask, as LLM2Vec does it) and
mean pooling. A third row times embed_cache.py's way, the same captions in length-sorted batches.
Output: out/bench_llama.md (out_md), and the rows as CSV when out_csv is set.
"""

import json
import os
import random
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import embedder as EM  # noqa: E402
import llama as LM  # noqa: E402
import model as M  # noqa: E402
from bench.csvlog import append_row  # noqa: E402

# -----------------------------------------------------------------------------
model = "data/smollm2/hf"  # an HF Llama folder, or a preset name below (random weights)
dtype = "float32"          # float32 | bfloat16 | float16
device = "cuda" if torch.cuda.is_available() else "cpu"
batch_size = 32
n_batches = 6              # batches per measurement
repeats = 5                # measurements per model, alternated; the median is reported
max_len = 128              # tokens per caption at most
seed = 0
tokenizer = "data/smollm2/hf"  # a preset's tokenizer (any HF folder; missing: a word-level one)
captions_from = "auto"     # auto (clip-benchmark, else synthetic) | clip_benchmark | synthetic
out_md = "out/bench_llama.md"
out_csv = ""               # also append the rows to this CSV (bench/gpu_check.py)
# -----------------------------------------------------------------------------
PRESETS = {  # shapes only: weights are random, which is all a speed test needs
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128,  # for tests
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, tie_word_embeddings=True),
}
WORDS = ("a an the of with and in on its small large dark light red green blue brown white black "
         "striped spotted long short round flat soft hard wooden metal glass fish bird dog cat "
         "tree flower car boat house shirt dress shoe bag bottle cup table chair lamp clock is are "
         "has have that which often found near water grass sky road field forest city photo "
         "picture image").split()

def caption_source():
    """"clip_benchmark" or "synthetic", as captions_from and the installed packages decide."""
    import importlib.util
    installed = importlib.util.find_spec("clip_benchmark") is not None
    if captions_from == "clip_benchmark" and not installed:
        sys.exit("bench/llama.py reads real captions from clip-benchmark: pip install --no-deps clip-benchmark")
    if captions_from == "synthetic" or not installed:
        return "synthetic"
    return "clip_benchmark"

def cupl_captions():
    import importlib.util
    spec = importlib.util.find_spec("clip_benchmark")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "cupl_prompts.json")
    with open(path) as f:
        return [t for v in json.load(f)["imagenet1k"].values() for t in v]  # class -> descriptions

def synthetic_captions(n):
    """n random-word captions with CuPL's word counts: log-normal, median 8, 95% within 21."""
    rng = random.Random(seed)
    lengths = [min(60, max(2, round(rng.lognormvariate(2.08, 0.55)))) for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "." for k in lengths]

def captions():
    n = batch_size * n_batches
    if caption_source() == "synthetic":
        return synthetic_captions(n)
    texts = cupl_captions()
    random.Random(seed).shuffle(texts)
    return texts[:n]

def word_tokenizer():
    """A word-level fast tokenizer over WORDS (and "."), made in memory: for a machine without any
    tokenizer folder. No BOS; "<pad>" pads."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "."] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")

def preset_tokenizer():
    """(tokenizer, its name) for a random-weight preset: `tokenizer`'s, or word_tokenizer()."""
    from transformers import AutoTokenizer
    if os.path.isfile(os.path.join(tokenizer, "tokenizer.json")) or os.path.isfile(
            os.path.join(tokenizer, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(tokenizer), tokenizer
    return word_tokenizer(), f"word-level, in memory ({tokenizer} is missing)"

def build():
    from transformers import LlamaConfig, LlamaModel
    dt = getattr(torch, dtype)
    if model in PRESETS:
        cfg = LlamaConfig(**PRESETS[model])
        torch.manual_seed(seed)
        with torch.device(device):
            hf = LlamaModel(cfg).to(dt)
        with torch.device(device):  # built where it runs: a 1B model's CPU init takes long
            ours = LM.Llama(LM.llama_config(json.loads(cfg.to_json_string())))
        ours.load_state_dict(hf.state_dict())
        ours = ours.to(device, dt)
        tok, tok_name = preset_tokenizer()  # any tokenizer will do; ids are folded in range
    else:
        hf = LlamaModel.from_pretrained(model, dtype=dt, attn_implementation="sdpa").to(device)
        ours = LM.Llama.from_pretrained(model, dtype=dt).to(device)
        tok, tok_name = M.load_tokenizer(model), model
    return ours.eval(), hf.eval(), tok, tok_name, hf.config.vocab_size

def batches(tok, vocab):
    texts = captions()
    tok.padding_side = "right"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append((enc["input_ids"].remainder(vocab).to(device), enc["attention_mask"].to(device)))
    return out

def run_ours(m, data):
    return [EM.mean_pool(m(ids, mask), mask) for ids, mask in data]

def run_sorted(m, tok, texts):
    """What embed_cache.py does: length-sorted batches (and the same unpadded forward)."""
    return EM.embed_texts(m, tok, texts, "", max_len, batch_size)

def run_hf(m, data):
    res = []
    for ids, mask in data:
        B, T = ids.shape
        full = (mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=ids.device)).expand(B, 1, T, T)
        res.append(EM.mean_pool(m(input_ids=ids, attention_mask=full).last_hidden_state, mask))
    return res

def timed(fn, *args):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out

def measure(ours, hf, tok, vocab, data, texts):
    """{provider: median seconds} over `repeats` alternated runs, and max |ours - transformers|."""
    _, a = timed(run_ours, ours, data)  # warm-up, and the outputs must agree
    _, b = timed(run_hf, hf, data)
    err = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    times = {"ours": [], "transformers": [], "ours, length-sorted (embed_cache.py)": []}
    # embed_cache's batches tokenize the texts afresh (no folding): only where the ids are in range
    sorted_too = len(tok) <= vocab
    if sorted_too:
        timed(run_sorted, ours, tok, texts)  # warm-up
    for _ in range(repeats):  # alternate, so drift in the machine's speed hits all alike
        times["ours"].append(timed(run_ours, ours, data)[0])
        times["transformers"].append(timed(run_hf, hf, data)[0])
        if sorted_too:
            times["ours, length-sorted (embed_cache.py)"].append(timed(run_sorted, ours, tok, texts)[0])
    return {k: statistics.median(v) for k, v in times.items() if v}, err

def report(med, err, data, tok_name):
    """The Markdown table (printed, and written to out_md); with out_csv, a CSV row per provider."""
    n_tok = sum(int(mask.sum()) for _, mask in data)
    n_cap = sum(ids.shape[0] for ids, _ in data)
    padded = sum(ids.numel() for ids, _ in data)
    hw = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    source = caption_source()
    source_text = ("CuPL captions (clip-benchmark)" if source == "clip_benchmark" else
                   "SYNTHETIC captions (no clip-benchmark installed, or captions_from=synthetic)")
    ratio = med["transformers"] / med["ours"]
    lines = [f"# Llama encoder benchmark: {model}, {dtype}, {hw}",
             f"torch {torch.__version__}, transformers {__import__('transformers').__version__}; "
             f"{n_cap} {source_text}, tokenizer {tok_name}, in batches of {batch_size}, "
             f"{n_tok} real tokens ({n_tok / padded:.0%} of the padded {padded}); "
             f"median of {repeats}; "
             f"max |ours - transformers| of pooled embeddings {err:.1e}", "",
             "| provider | median s | captions/s | tokens/s |", "|---|---|---|---|"]
    for k, t in med.items():
        lines.append(f"| {k} | {t:.3f} | {n_cap / t:.1f} | {n_tok / t:.0f} |")
        if out_csv:
            append_row(out_csv, dict(provider=k, model=model, dtype=dtype, device=hw, median_s=t,
                                     captions_per_s=n_cap / t, tokens_per_s=n_tok / t,
                                     ratio_vs_transformers=med["transformers"] / t, max_abs_err=err,
                                     captions=source, tokenizer=tok_name))
    lines += ["", f"ratio (ours speed / transformers speed, same batches): {ratio:.3f}"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, "w") as f:
        f.write(text + "\n")

def main():
    from configurator import check, configure
    configure(globals())
    check(globals(), positive=("batch_size", "n_batches", "repeats", "max_len"),
          choices={"dtype": ("float32", "bfloat16", "float16"),
                   "captions_from": ("auto", "clip_benchmark", "synthetic")})
    torch.set_grad_enabled(False)
    ours, hf, tok, tok_name, vocab = build()
    data = batches(tok, vocab)
    med, err = measure(ours, hf, tok, vocab, data, captions())
    report(med, err, data, tok_name)

if __name__ == "__main__":
    main()
