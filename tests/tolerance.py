"""The kernels' accuracy rule, shared by their tests (flash-attention's principle): for the loss and every
gradient, the max abs error of ours against fp64 (the same formula in float64 on the same rounded inputs)
is at most twice the max abs error of PyTorch's own computation in the input dtype, plus a floor of 2^-20
(16 fp32 ulps) times the largest reference value, because both sides accumulate in fp32 in different
orders and, where PyTorch's fp32 result happens to be nearly exact, "twice its error" would ask for more
than fp32 can promise."""


def assert_close_to_fp64(ours, lowp, ref, names):
    for o, t, r, name in zip(ours, lowp, ref, names):
        err = (o.double() - r).abs().max().item()
        base = (t.double() - r).abs().max().item()
        floor = 2**-20 * r.abs().max().item()
        assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 x torch's {base:.3e} + {floor:.3e}"
