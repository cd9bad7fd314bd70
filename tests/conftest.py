import os

import torch

# The device the kernel tests (test_contrastive/sigmoid/structure.py) put their tensors on, read
# here alone: TEST_DEVICE=cuda runs them natively on a GPU (bench/gpu_check.py does); the default,
# cpu, runs them in Triton's interpreter. Triton reads TRITON_INTERPRET when a kernel is decorated,
# so it must be set before anything imports fused_losses/; this file sets it for a CPU run only.
DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("TEST_DEVICE=cuda, but torch sees no CUDA GPU")
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # The fast tier for the edit-test loop: python -m pytest tests -q -m "not slow"
    config.addinivalue_line("markers", "slow: runs scripts, subprocesses or two ranks (left out by -m 'not slow')")
