"""LLM2CLIP's released LLM (microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned) in our loader, with no
remote code. No hub here: a tiny model is saved in the release's layout and config shape, as far as they
are known (config.json as the model page shows it; the key layout inferred from the remote
class, a LlamaModel subclass, which saves without the `model.` prefix):
  config.json: architectures ["LlamaBiModel"], auto_map to modeling_bidirectional_llama_encoder.LlamaBiModel,
  model_type llama, eos_token_id a list, no pad_token_id, tie_word_embeddings true, rope_scaling llama3
  (factor 32, 1, 4, 8192), rope_theta 5e5, torch_dtype bfloat16 while the tensors are fp32,
  transformers_version 4.44.2; model.safetensors: keys embed_tokens / layers.N / norm, no lm_head;
  tokenizer.json + tokenizer_config.json: Llama 3's (BOS added, chat special tokens, no pad token)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

import embedder as EM  # noqa: E402
import llama as LM  # noqa: E402
import model as M  # noqa: E402
from chat_tokenizers import llama3_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # a release-shaped LLM end to end

ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)

def released_llm(path, seed=0):
    """A random tiny Llama saved as the release is: returns (path, the transformers LlamaModel it holds)."""
    vocab = llama3_tokenizer(path)
    tok = M.load_tokenizer(path)
    bos = tok.bos_token_id
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    shape = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    hf = transformers.LlamaModel(transformers.LlamaConfig(**shape, rope_theta=500000.0, rope_scaling=dict(ROPE),
                                                          max_position_embeddings=131072,
                                                          tie_word_embeddings=True)).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and weights tiny; random values test more
        for n, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in n else 0.0) + 0.1 * torch.randn(p.shape))
    hf.save_pretrained(path)  # a LlamaModel: keys without `model.`, no lm_head, fp32 tensors
    cfg = {  # the release's keys (transformers 4.44.2 style), our tiny sizes
        "_name_or_path": "microsoft/LLM2CLIP-Llama-3.2-1B-Instruct-CC-Finetuned",
        "architectures": ["LlamaBiModel"],
        "auto_map": {"AutoModel": "modeling_bidirectional_llama_encoder.LlamaBiModel"},
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": bos, "eos_token_id": eos,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "pretraining_tp": 1, "rope_scaling": dict(ROPE), "rope_theta": 500000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.44.2",
        "use_cache": True, **shape}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path, hf

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return released_llm(str(tmp_path_factory.mktemp("llm2clip_1b")))

def full_mask(mask):
    B, T = mask.shape
    return (mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool)).expand(B, 1, T, T)

def test_the_folder_is_shaped_like_the_release(release):
    path, _ = release
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("embed_tokens.weight").dtype == torch.float32
    assert "embed_tokens.weight" in keys and "norm.weight" in keys
    assert not any(k.startswith("model.") or k.startswith("lm_head") for k in keys)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["torch_dtype"] == "bfloat16" and isinstance(cfg["eos_token_id"], list) and "pad_token_id" not in cfg

def test_loads_without_remote_code_and_matches_hf_bidirectional(release):
    path, hf = release
    ours = LM.Llama.from_pretrained(path).eval()  # bidirectional, as LlamaBiModel
    assert ours.config.tie_word_embeddings and not hasattr(ours, "lm_head")
    assert ours.config.rope_scaling["rope_type"] == "llama3" and ours.config.rope_theta == 500000.0
    assert ours.embed_tokens.weight.dtype == torch.float32  # the file's dtype; torch_dtype is not applied
    g = torch.Generator().manual_seed(1)
    lengths = (13, 7, 2)
    ids = torch.zeros(3, 13, dtype=torch.long)
    mask = torch.zeros(3, 13, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, :L] = torch.randint(1, ours.config.vocab_size, (L,), generator=g)
        mask[i, :L] = 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=full_mask(mask)).last_hidden_state
        out = ours(ids, mask)
    err = (out[mask.bool()] - ref[mask.bool()]).abs().max().item()
    print(f"released layout, bidirectional vs transformers LlamaModel (full mask): max abs err {err:.2e}")
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    # bf16, as the cache and stage 1 run it on a GPU
    assert LM.Llama.from_pretrained(path, dtype=torch.bfloat16).embed_tokens.weight.dtype == torch.bfloat16
    # the tied head for generate(): logits through the embedding
    dec = LM.Llama.from_pretrained(path, causal=True, lm_head=True)
    assert torch.equal(dec.logits(out[:1, :1]), out[:1, :1] @ dec.embed_tokens.weight.T)

def test_tokenizer_offline_and_embed_texts_with_the_llama3_wrap(release):
    """The tokenizer loads offline and has no pad token: our embedding path pads with id 0 under a mask
    (pad_batch), so it needs none. embed_texts with the auto template equals LLM2Vec's computation: the
    official string, bidirectional transformers LlamaModel, mean over the caption's tokens and <|eot_id|>."""
    path, hf = release
    tok = M.load_tokenizer(path)
    assert tok.pad_token is None
    assert EM.caption_template(tok, "auto") == "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    llm = LM.Llama.from_pretrained(path).eval()
    texts = ["A red shirt on the left of a small blue bag.", "boot", "The large white coat, with black boots!"]
    got = EM.embed_texts(llm, tok, texts, batch_size=2, template="auto")
    for i, t in enumerate(texts):
        ids = torch.tensor([tok("<|start_header_id|>user<|end_header_id|>\n\n" + t + "<|eot_id|>")["input_ids"]])
        k = len(tok(t + "<|eot_id|>", add_special_tokens=False)["input_ids"])  # LLM2Vec's embed mask
        with torch.no_grad():
            h = hf(input_ids=ids, attention_mask=full_mask(torch.ones_like(ids))).last_hidden_state
        torch.testing.assert_close(got[i], F.normalize(h[0, -k:].mean(0), dim=-1), atol=1e-5, rtol=1e-5)

def test_export_drops_the_remote_code_pointer(release, tmp_path):
    """save_pretrained (stage 1's merged export) writes a plain Llama folder: no auto_map to a file it does
    not carry; transformers and model.py load it."""
    path, _ = release
    ours = LM.Llama.from_pretrained(path)
    out = str(tmp_path / "merged")
    ours.save_pretrained(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "auto_map" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    ids = torch.tensor([[5, 9, 3, 7]])
    with torch.no_grad():
        hf = transformers.AutoModel.from_pretrained(out).eval()
        ref = hf(input_ids=ids, attention_mask=full_mask(torch.ones_like(ids)))
        torch.testing.assert_close(LM.Llama.from_pretrained(out)(ids), ref.last_hidden_state, atol=1e-5, rtol=1e-5)
