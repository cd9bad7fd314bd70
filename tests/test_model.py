"""model.py against transformers: tiny random HF models saved with save_pretrained, loaded through our
loaders, compared in fp32 on CPU. Tolerances are near fp32 rounding (1e-5), never loosened to pass."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import embedder as EM  # noqa: E402
import llama as LM  # noqa: E402
import model as M  # noqa: E402
from train_common import atomic_write, recover  # noqa: E402

ATOL = RTOL = 1e-5

def close(ours, ref, what):
    err = (ours.float() - ref.float()).abs().max().item()
    print(f"{what}: max abs err {err:.2e}")
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")

def randomize(model, seed=0, std=0.08):
    """HF's init leaves norms at 1/0 and weights tiny; random values everywhere test more."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            base = 1.0 if ("norm" in n and n.endswith("weight")) else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model

# -----------------------------------------------------------------------------
# CLIP

def clip_config(act="quick_gelu", eos=99, image_size=32):
    return transformers.CLIPConfig(
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=12, hidden_act=act, eos_token_id=eos,
                         bos_token_id=98, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, hidden_act=act),
        projection_dim=24)

@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def clip_folder(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"clip_{request.param}"))
    hf = randomize(transformers.CLIPModel(clip_config(request.param)).eval())
    hf.save_pretrained(path)
    return path, hf

def test_vit_matches_hf(clip_folder):
    path, hf = clip_folder
    vit = M.ViT.from_pretrained(path).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=x)
        close(vit.forward_features(x), ref.last_hidden_state, "ViT last_hidden_state")
        close(vit(x), hf.get_image_features(pixel_values=x).pooler_output, "ViT image_embeds")

def test_read_logit_scale(clip_folder):
    path, hf = clip_folder
    assert torch.equal(M.read_logit_scale(path), hf.logit_scale.detach())

def test_vit_interpolates_position_embeddings(clip_folder):
    path, hf = clip_folder
    vit = M.ViT.from_pretrained(path).eval()
    x = torch.randn(2, 3, 48, 40)  # another resolution, not even square
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        close(vit.forward_features(x), ref, "ViT interpolated positions")

def test_vit_from_vision_with_projection_folder(tmp_path):
    cfg = clip_config().vision_config
    cfg.projection_dim = 20
    hf = randomize(transformers.CLIPVisionModelWithProjection(cfg).eval())
    hf.save_pretrained(tmp_path)
    vit = M.ViT.from_pretrained(str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(vit(x), hf(pixel_values=x).image_embeds, "CLIPVisionModelWithProjection image_embeds")

def clip_text_batch(eos, pad=0, lengths=(12, 7, 3)):
    g = torch.Generator().manual_seed(1)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, :L] = torch.randint(3, 90, (L,), generator=g)
        ids[i, 0], ids[i, L - 1] = 98, eos
        mask[i, :L] = 1
    return ids, mask

def test_clip_text_matches_hf_with_padding(clip_folder):
    path, hf = clip_folder
    tower = M.CLIPTextTower.from_pretrained(path).eval()
    ids, mask = clip_text_batch(eos=99)
    with torch.no_grad():
        ref = hf.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = tower.forward_features(ids, mask)
        for i, L in enumerate(mask.sum(1).tolist()):  # padded positions are not outputs
            close(ours[i, :L], ref[i, :L], f"CLIP text hidden (row {i})")
        close(tower(ids, mask), hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
              "CLIP text_embeds")

def test_clip_text_pad_with_eos_either_side(clip_folder):
    """OpenAI's CLIP tokenizer pads with the EOS token: pooling must pick the real EOS, left or right."""
    tower = M.CLIPTextTower.from_pretrained(clip_folder[0]).eval()
    ids, mask = clip_text_batch(eos=99, pad=99)
    left_ids, left_mask = torch.full_like(ids, 99), torch.zeros_like(mask)
    for i, L in enumerate(mask.sum(1).tolist()):  # the same rows, padded on the left
        left_ids[i, ids.shape[1] - L:], left_mask[i, ids.shape[1] - L:] = ids[i, :L], 1
    with torch.no_grad():
        alone = torch.cat([tower(ids[i:i + 1, :L]) for i, L in enumerate(mask.sum(1).tolist())])
        close(tower(ids, mask), alone, "CLIP text, right-padded with EOS")
        close(tower(left_ids, left_mask), alone, "CLIP text, left-padded with EOS")

def test_clip_loads_old_checkpoints_with_position_ids(clip_folder, tmp_path):
    """Older HF CLIP checkpoints (OpenAI's among them) store the position_ids buffers."""
    path, hf = clip_folder
    sd = load_file(os.path.join(path, "model.safetensors"))
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    sd["text_model.embeddings.position_ids"] = torch.arange(12)[None]
    old = _copy_folder(path, tmp_path / "old", sd)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        close(M.ViT.from_pretrained(old)(x), M.ViT.from_pretrained(path)(x), "ViT from an old checkpoint")
    M.CLIPTextTower.from_pretrained(old)

def test_clip_text_legacy_eos_2(tmp_path):
    """Old configs say eos_token_id=2; HF then pools at the largest token id, and so must we."""
    cfg = clip_config(eos=2)
    hf = randomize(transformers.CLIPTextModelWithProjection(cfg.text_config).eval())
    hf.save_pretrained(tmp_path)
    tower = M.CLIPTextTower.from_pretrained(str(tmp_path)).eval()
    ids, mask = clip_text_batch(eos=99)  # 99 is the largest id, as EOT is in CLIP's vocabulary
    with torch.no_grad():
        close(tower(ids, mask), hf(input_ids=ids, attention_mask=mask).text_embeds, "CLIP text_embeds (eos 2)")

def test_clip_text_context_limit(clip_folder):
    tower = M.CLIPTextTower.from_pretrained(clip_folder[0])
    assert tower.context_length == 12
    with pytest.raises(ValueError, match="13 tokens.*context is 12"):
        tower(torch.ones(1, 13, dtype=torch.long))

# -----------------------------------------------------------------------------
# Llama

LLAMA_CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16)),
    "head_dim_tied": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True),
}

def llama_hf_config(**kw):
    base = dict(vocab_size=120, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    return transformers.LlamaConfig(**{**base, **kw})

@pytest.fixture(scope="module", params=list(LLAMA_CASES))
def llama_folder(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"llama_{request.param}"))
    hf = randomize(transformers.LlamaForCausalLM(llama_hf_config(**LLAMA_CASES[request.param])).eval(), std=0.1)
    hf.save_pretrained(path)
    return path, hf

def padded_batch(lengths=(11, 6, 3), side="right", vocab=120, pad=0, seed=2):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, L in enumerate(lengths):
        sl = slice(0, L) if side == "right" else slice(T - L, T)
        ids[i, sl] = torch.randint(1, vocab, (L,), generator=g)
        mask[i, sl] = 1
    return ids, mask

def test_llama_causal_matches_hf(llama_folder):
    path, hf = llama_folder
    ours = LM.Llama.from_pretrained(path, causal=True).eval()
    for side in ("right", "left"):
        ids, mask = padded_batch(side=side)
        pos = M._positions(mask)  # HF counts positions from 0 at the first column; we count real tokens
        with torch.no_grad():
            ref = hf.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            out = ours(ids, mask)
        close(out[mask.bool()], ref[mask.bool()], f"causal Llama ({side} padding)")

def test_llama_bidirectional_matches_hf_full_mask(llama_folder):
    path, hf = llama_folder
    ours = LM.Llama.from_pretrained(path).eval()  # bidirectional is the default
    ids, mask = padded_batch()
    B, T = ids.shape
    # HF takes a 4D mask as given: every real token sees every real token, no causality
    full = (mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool)).expand(B, 1, T, T)
    with torch.no_grad():
        ref = hf.model(input_ids=ids, attention_mask=full).last_hidden_state
        out = ours(ids, mask)
    close(out[mask.bool()], ref[mask.bool()], "bidirectional Llama")
    # and it really is bidirectional: the first token's state changes when a later token does
    ids2 = ids.clone()
    ids2[0, 5] = (ids2[0, 5] + 1) % 120
    with torch.no_grad():
        assert (ours(ids2, mask)[0, 0] - out[0, 0]).abs().max() > 1e-3

def test_llama_rope_inv_freq_matches_hf():
    cfg = llama_hf_config(**LLAMA_CASES["llama3_rope"])
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    ref = LlamaRotaryEmbedding(cfg).inv_freq
    ours = LM.rope_inv_freq(LM.llama_config(json.loads(cfg.to_json_string())))
    assert not torch.equal(ours, LM.rope_inv_freq(LM.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=50000.0)))
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)

def test_llama_old_style_rope_config(tmp_path, llama_folder):
    """Configs written by transformers 4.x carry rope_theta and rope_scaling at the top level."""
    path, hf = llama_folder
    raw = json.load(open(os.path.join(path, "config.json")))
    rp = raw.pop("rope_parameters")
    raw["rope_theta"] = rp.pop("rope_theta")
    raw["rope_scaling"] = rp if rp.get("rope_type") != "default" else None
    new = LM.llama_config(raw)
    old = LM.llama_config(json.load(open(os.path.join(path, "config.json"))))
    assert new == old

def test_padding_side_does_not_change_embeddings(llama_folder):
    path, _ = llama_folder
    ours = LM.Llama.from_pretrained(path).eval()
    alone = torch.tensor([[5, 17, 33, 8, 91, 2]])
    with torch.no_grad():
        ref = EM.mean_pool(ours(alone), torch.ones_like(alone))[0]
        for side in ("right", "left"):
            ids, mask = padded_batch(lengths=(3, 6, 11), side=side)
            row = mask[1].bool()
            ids[1, row] = alone[0]
            emb = EM.mean_pool(ours(ids, mask), mask)[1]
            close(emb, ref, f"caption alone vs {side}-padded batch")

def test_skip_instruction_pools_caption_tokens_only(llama_folder):
    path, _ = llama_folder
    ours = LM.Llama.from_pretrained(path).eval()
    n_instr = [4, 2, 0]
    for side in ("right", "left"):
        ids, mask = padded_batch(side=side)
        with torch.no_grad():
            h = ours(ids, mask)
        pooled = EM.mean_pool(h, EM.skip_instruction(mask, n_instr))
        for i in range(len(n_instr)):
            real = mask[i].nonzero().flatten()
            want = h[i, real[n_instr[i]:]].mean(0)
            close(pooled[i], want, f"skip-instruction pooling ({side}, row {i})")

def test_grad_checkpointing_same_gradients(llama_folder):
    path, _ = llama_folder
    ids, mask = padded_batch()
    grads = []
    for ckpt in (False, True):
        m = LM.Llama.from_pretrained(path).train()
        m.grad_checkpointing = ckpt
        EM.mean_pool(m(ids, mask), mask).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)

# -----------------------------------------------------------------------------
# LoRA

@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_lora"))
    hf = randomize(transformers.LlamaForCausalLM(llama_hf_config(**LLAMA_CASES["gqa"])).eval(), std=0.1)
    hf.save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # stands in for the tokenizer files
        json.dump({"model_max_length": 64}, f)
    return path, hf

def test_lora_zero_b_changes_nothing_and_trains_only_adapters(gqa_folder):
    path, _ = gqa_folder
    ids, mask = padded_batch()
    base = LM.Llama.from_pretrained(path).eval()
    with torch.no_grad():
        ref = base(ids, mask)
    LM.add_lora(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        assert torch.equal(base(ids, mask), ref)
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 3  # A and B on seven projections in each of three layers

def lora_model(path, seed=3):
    m = LM.add_lora(LM.Llama.from_pretrained(path).eval(), r=4, alpha=8, dropout=0.05)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return m

def test_lora_merged_equals_unmerged(gqa_folder):
    path, _ = gqa_folder
    ids, mask = padded_batch()
    m = lora_model(path)
    with torch.no_grad():
        unmerged = m(ids, mask)
        assert (unmerged - LM.Llama.from_pretrained(path)(ids, mask)).abs().max() > 1e-3  # the adapter acts
        LM.merge_lora(m)
        assert not any("lora_" in k for k in m.state_dict())
        close(m(ids, mask), unmerged, "LoRA merged vs unmerged")

def test_lora_save_load_roundtrip(gqa_folder, tmp_path):
    path, _ = gqa_folder
    ids, mask = padded_batch()
    m = lora_model(path)
    LM.save_lora(m, str(tmp_path / "lora.safetensors"))
    assert all("lora_" in k for k in load_file(str(tmp_path / "lora.safetensors")))
    m2 = LM.load_lora(LM.Llama.from_pretrained(path).eval(), str(tmp_path / "lora.safetensors"))
    with torch.no_grad():
        assert torch.equal(m2(ids, mask), m(ids, mask))

def test_export_merged_loads_in_transformers_and_model(gqa_folder, tmp_path):
    path, _ = gqa_folder
    ids, mask = padded_batch()
    m = lora_model(path)
    out = str(tmp_path / "merged")
    m.save_pretrained(out)
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    assert any("lora_" in k for k in m.state_dict())  # exporting does not merge the live model
    with torch.no_grad():
        want = m(ids, mask)
        mine = LM.Llama.from_pretrained(out)(ids, mask)
        close(mine, want, "exported merged folder, loaded by model.py")
        hf = transformers.AutoModel.from_pretrained(out).eval()
        B, T = ids.shape
        full = (mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool)).expand(B, 1, T, T)
        ref = hf(input_ids=ids, attention_mask=full).last_hidden_state
        close(want[mask.bool()], ref[mask.bool()], "exported merged folder, loaded by transformers")

# -----------------------------------------------------------------------------
# loading layouts and bad input

def test_llama_sharded_and_unprefixed(tmp_path):
    hf = randomize(transformers.LlamaModel(llama_hf_config()).eval())  # LlamaModel: keys without `model.`
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "shards" / "model.safetensors.index.json")
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        for name in ("one", "shards"):
            out = LM.Llama.from_pretrained(str(tmp_path / name), causal=True)(ids, mask)
            close(out[mask.bool()], ref[mask.bool()], f"Llama from {name}")

def _copy_folder(src, dst, sd=None, cfg_edit=None):
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if cfg_edit:
        cfg_edit(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    if sd is not None:
        save_file(sd, os.path.join(dst, "model.safetensors"))
    return str(dst)

def test_bad_input_errors(gqa_folder, clip_folder, tmp_path):
    path, _ = gqa_folder
    sd = load_file(os.path.join(path, "model.safetensors"))

    bad = _copy_folder(path, tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="noweights: no model.safetensors"):
        LM.Llama.from_pretrained(bad)
    torch.save({}, os.path.join(bad, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin: pickled weights are never loaded"):
        LM.Llama.from_pretrained(bad)

    with pytest.raises(FileNotFoundError, match="nowhere: not a directory"):
        LM.Llama.from_pretrained(str(tmp_path / "nowhere"))

    bad = _copy_folder(path, tmp_path / "gpt2", sd, lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ValueError, match="gpt2/config.json: model_type 'gpt2' is not supported"):
        LM.Llama.from_pretrained(bad)

    bad = _copy_folder(path, tmp_path / "yarn", sd, lambda c: c["rope_parameters"].update(rope_type="yarn"))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        LM.Llama.from_pretrained(bad)

    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    bad = _copy_folder(path, tmp_path / "missing", missing)
    with pytest.raises(KeyError, match="missing: missing key 'layers.1.mlp.up_proj.weight'"):
        LM.Llama.from_pretrained(bad)

    bad = _copy_folder(path, tmp_path / "extra", {**sd, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(KeyError, match="extra: unexpected key 'layers.0.extra.weight'"):
        LM.Llama.from_pretrained(bad)

    shapes = {**sd, "model.layers.2.self_attn.k_proj.weight": torch.zeros(48, 96)}
    bad = _copy_folder(path, tmp_path / "shape", shapes)
    with pytest.raises(ValueError, match=r"shape: key 'layers.2.self_attn.k_proj.weight' has shape \(48, 96\), "
                                         r"the config implies \(32, 96\)"):
        LM.Llama.from_pretrained(bad)

    cpath, _ = clip_folder
    with pytest.raises(ValueError, match="model_type 'llama' is not a CLIP vision model"):
        M.ViT.from_pretrained(path)
    csd = load_file(os.path.join(cpath, "model.safetensors"))
    bad = _copy_folder(cpath, tmp_path / "clipextra", {**csd, "vision_model.head.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected key 'vision_model.head.weight'"):
        M.ViT.from_pretrained(bad)
    bad = _copy_folder(cpath, tmp_path / "clipact", csd, lambda c: c["vision_config"].update(hidden_act="relu6"))
    with pytest.raises(ValueError, match="hidden_act 'relu6' is not supported"):
        M.ViT.from_pretrained(bad)

# -----------------------------------------------------------------------------
# Adaptor

def _count(module):
    return sum(p.numel() for p in module.parameters())

def test_adaptor_parameter_counts():
    with torch.device("meta"):  # counts only: nothing allocated
        a = M.Adaptor.for_method("llm2clip", in_dim=2048, out_dim=1280)
        big = M.Adaptor.for_method("llm2clip", in_dim=4096, out_dim=1280)
        p = M.Adaptor.for_method("proclip", in_dim=2048, out_dim=768)
    assert len(a.blocks) == 4 and a.blocks[0].fc1.out_features == 4096
    assert round(_count(a.blocks) / 1e6, 1) == 67.1  # the paper's count for the four blocks at D=2048
    assert round(_count(big) / 1e6, 1) == 273.8      # and in total at D=4096
    assert len(p.blocks) == 1 and p.blocks[0].fc1.out_features == 8 * 2048 and p.proj.out_features == 768

def test_adaptor_normalises_its_input():
    a = M.Adaptor(M.AdaptorConfig(in_dim=16, out_dim=8, n_blocks=2, expansion=2))
    x = torch.randn(4, 16)
    torch.testing.assert_close(a(x), a(7.5 * x))

def test_atomic_write_recovers_from_a_kill_between_renames(tmp_path):
    path = str(tmp_path / "ckpt")
    atomic_write(path, lambda tmp: os.makedirs(tmp) or open(os.path.join(tmp, "a"), "w").write("1"))
    atomic_write(path, lambda tmp: os.makedirs(tmp) or open(os.path.join(tmp, "a"), "w").write("2"))
    assert open(os.path.join(path, "a")).read() == "2" and not os.path.exists(path + ".old")
    os.replace(path, path + ".old")  # what a kill right after the first rename leaves
    recover(path)
    assert open(os.path.join(path, "a")).read() == "2"
