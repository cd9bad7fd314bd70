"""Tiny HF models and manifests that tests build in a temporary folder (random weights, seconds to make),
and the one way tests run a script."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
import transformers

WORDS = ("a the red blue green black white small large shirt dress sneaker bag coat boot on left right top "
         "bottom of and with").split()

def word_tokenizer(path):
    """A word-level tokenizer over WORDS, saved as HF tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(path)
    return len(vocab)

def tiny_llm(path, seed=0):
    """A random 2-layer Llama with the word-level tokenizer, saved as an HF folder."""
    vocab = word_tokenizer(path)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaModel(cfg).save_pretrained(path)
    return str(path)

def tiny_clip(path, seed=0, context=8, projection_dim=16):
    """A random CLIPModel with a short text context and the word-level tokenizer."""
    vocab = word_tokenizer(path)
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=vocab, max_position_embeddings=context, eos_token_id=vocab, bos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8),
        projection_dim=projection_dim)
    transformers.CLIPModel(cfg).save_pretrained(path)
    return str(path)

def write_manifest(path, n=60, seed=0):
    """Captions only (the image files are not read by the tests that use this)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            caps = {"short": [" ".join(rng.choice(WORDS, rng.integers(2, 5))) for _ in range(2)],
                    "long": [" ".join(rng.choice(WORDS, rng.integers(5, 30))) for _ in range(2)]}
            f.write(json.dumps({"image": f"{i}.png", "captions": caps}) + "\n")
    return str(path)

def write_images(folder, n, size=16, seed=0):
    """n random RGB PNGs named 0.png ... (n-1).png, as write_manifest's records name them."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")

def write_tar(path, members):
    """A tar file of (name, bytes) members, in order (a name may come twice)."""
    import io
    import tarfile
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run_script(script, args, torchrun=0, check=True, env=None):
    """`python script --key=value ...` from the repository root (under torchrun with `torchrun` processes
    if > 0), one thread per process, extra environment `env`; asserts it succeeded unless check=False."""
    launch = [sys.executable] if not torchrun else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    r = subprocess.run(launch + [script] + [f"--{k}={v}" for k, v in args.items()], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r

def evaluate_in_process(out, **settings):
    """evaluate.main in this process (so runs compare on the same kernels and thread count) with
    these settings (each must be one of evaluate.py's), device cpu, dtype float32 and the rest at
    their defaults; the module's settings are restored after. Returns the JSON it wrote."""
    import evaluate as E
    from configurator import is_setting
    keys = [k for k, v in vars(E).items() if is_setting(k, v)]
    saved = {k: getattr(E, k) for k in keys}
    try:
        for k, v in {"out": str(out), "device": "cpu", "dtype": "float32", **settings}.items():
            assert k in saved, k
            setattr(E, k, type(saved[k])(v))
        E.main({k: getattr(E, k) for k in keys})
    finally:
        for k, v in saved.items():
            setattr(E, k, v)
    with open(out) as f:
        return json.load(f)

def checkpoint_weights(out):
    """The tensors of a stage script's last checkpoint in `out`."""
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "ckpt", "weights.safetensors"))

def ranks_vs_global_batch(train, setup, label=""):
    """Run `train(setup, out, ...)` (a test file's stage-2 runner) 3 steps three ways: 1 process x 8 images,
    2 torchrun ranks x 4 and 1 process x 4. Returns the weights of the first two (one, two)
    and max |one - two|, max |one - half|, printed for `pytest -s`."""
    d = setup["dir"]
    for name, extra in (("one", dict(batch_size=8)), ("two", dict(batch_size=4, torchrun=2)),
                        ("half", dict(batch_size=4))):
        train(setup, d / name, max_steps=3, warmup_steps=1, **extra)
    one, two, half = (checkpoint_weights(d / name) for name in ("one", "two", "half"))
    moved = max((one[k] - two[k]).abs().max().item() for k in one)
    change = max((one[k] - half[k]).abs().max().item() for k in one)
    print(f"{label}max |one - two| = {moved:.2e}, max |one - half batch| = {change:.2e}")
    return one, two, moved, change
