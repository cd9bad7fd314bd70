"""bench/memory.py's measuring: the live-bytes counter on the meta device against hand counts of what
autograd keeps, its autocast and attention emulation, and one recipe row end to end."""

import torch
import torch.nn as nn

from bench import memory as E
import model as M

def test_counts_what_autograd_keeps_fp32():
    """Linear -> GELU -> Linear, fp32, no autocast: after the forward, alive are the input, fc1's output
    (kept by GELU) and GELU's output (kept by fc2), and the output; the backward adds the gradients."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    keep = []
    params = list(net.parameters())
    peak, _ = E.measure(lambda: keep.append(net(torch.empty(16, 32, device="meta"))), params, autocast=False)
    assert peak == 4 * (16 * 32 + 16 * 128 + 16 * 128 + 16 * 32)
    _, grads = E.measure(lambda: net(torch.empty(16, 32, device="meta")).sum().backward(), list(net.parameters()),
                         autocast=False)
    assert grads == 4 * sum(p.numel() for p in net.parameters())

def test_clip_layer_under_emulated_autocast_and_flash_attention():
    """A CLIP block under autocast keeps, per token and channel (N x C elements), 48 bytes: the bf16 input
    of q/k/v (2), q, k, v (6) and the output (2) for attention, out_proj's input (2), the fp32 residual
    after attention (4), fc1's bf16 input (2), fc1's output, sigmoid's output and their product (3 x 8,
    quick_gelu at 4C) and fc2's input (2, the product itself: 0 more), the fp32 output (4); plus bf16 copies
    of the weights and biases, and small statistics. Never the T x T attention matrix."""
    cfg = M.ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4)
    with torch.device("meta"):
        layer = M.CLIPLayer(cfg)
    B, T, C = 8, 96, 64  # T > C: a kept T x T matrix would show
    keep = []
    peak, _ = E.measure(lambda: keep.append(layer(torch.empty(B, T, C, device="meta"), None, False)),
                        list(layer.parameters()))
    NC = B * T * C
    copies = 2 * sum(p.numel() for n, p in layer.named_parameters() if "norm" not in n)
    expect = 4 * NC + 48 * NC + copies  # the fp32 input, what the block keeps, the weight copies
    assert expect <= peak <= expect + 4 * NC + 64 * B * T  # + one fp32 transient (the norm's output) and statistics
    assert peak < expect + 2 * B * 4 * T * T  # far below what a kept attention matrix (bf16, 4 heads) would add

def test_activation_checkpointing_keeps_only_layer_inputs():
    cfg = M.ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4)
    with torch.device("meta"):
        vit = M.ViT(cfg)
    vit.train()
    step = lambda: vit(torch.empty(8, 3, 32, 32, device="meta")).sum().backward()  # noqa: E731
    full, grads = E.measure(step, list(vit.parameters()))
    vit.vision_model.encoder.grad_checkpointing = True
    ckpt, grads2 = E.measure(step, list(vit.parameters()))
    assert grads == grads2 == 4 * sum(p.numel() for p in vit.parameters())
    assert ckpt < full

def test_a_recipe_row():
    r = E.proclip_stage1("Llama-3.2-1B")
    assert r["run"].startswith("stage 1 proclip") and r["batch"] == 512
    D = 2048  # one block x8, LayerNorm, projection to CLIP-L's 768
    block = D * 8 * D + 8 * D + 8 * D * D + D + 2 * D
    assert round(r["trainable"], 1) == round((block + 2 * D + D * 768 + 768) / 1e6, 1)
    assert 0 < r["acts"] < r["total"]
