"""Print the sigmoid kernel's largest errors against fp64 over test_sigmoid.py's cases, ours / PyTorch's in
the same dtype (the numbers docs/verification.md quotes; the test asserts the accuracy rule and prints nothing).
Run from the repository root: python tests/sigmoid_errors.py (interpreter on CPU, about 20 s of CPU time)."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import test_sigmoid as T
from fused_losses.sigmoid import sigmoid_loss, sigmoid_loss_reference

worst = {}  # (dtype, quantity, abs|rel) -> (ours, PyTorch's)
def keep(key, ours, torch_):
    a, b = worst.get(key, (0.0, 0.0))
    worst[key] = (max(a, ours), max(b, torch_) if torch_ == torch_ else float("inf"))  # NaN: PyTorch overflowed

for N, D, s, t, dtype, kind in T.CASES:
    x = T.inputs(N, D, s, t, dtype, kind)
    ours = T.loss_and_grads(sigmoid_loss, *x)
    lowp = T.loss_and_grads(sigmoid_loss_reference, *x)
    ref = T.loss_and_grads(sigmoid_loss_reference, *T.fp64(*x))
    dt = str(dtype).split(".")[1]
    for name, o, l, r in zip(T.NAMES, ours, lowp, ref):
        eo, el = (o.double() - r).abs().max().item(), (l.double() - r).abs().max().item()
        keep((dt, name, "abs"), eo, el)
        if name == "loss" and r.abs().item() > 1e-3:
            keep((dt, name, "rel"), eo / r.abs().item(), el / r.abs().item())
for (dt, name, kind), (a, b) in sorted(worst.items()):
    print(f"{dt:9s} {name:6s} {kind}  {a:.2g} / {b:.2g}")
