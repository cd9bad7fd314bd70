import os

import torch

# Without a GPU the kernels run in Triton's interpreter. Triton reads this when a kernel is decorated,
# so it must be set before anything imports fused_losses/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
