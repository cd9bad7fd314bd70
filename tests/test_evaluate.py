"""evaluate.py's metrics on data with known answers."""

import torch
import torch.nn.functional as F

from evaluate import c2c_top1

def test_c2c_top1_known_answer():
    # captions 0,1 of image 0; 2,3 of image 1; 4 alone (not a query, but a distractor in the gallery)
    e = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                                  [0.1, 0.95, 0.0]]), dim=-1)
    group = [0, 0, 1, 1, 2]
    # 0 -> 1 hit, 1 -> 0 hit, 2 -> 4 miss (the distractor), 3 -> ? (orthogonal to all but itself: the
    # first of the ties after excluding itself is row 0, a miss)
    assert c2c_top1(e, e, group) == 50.0
    # queries embedded differently from the gallery (the instruction): only the query side moves
    q = e.clone()
    q[2] = F.normalize(torch.tensor([0.0, 0.5, 0.5]), dim=0)  # now nearest to caption 3, its peer
    assert c2c_top1(q, e, group) == 75.0

def test_c2c_top1_never_retrieves_itself():
    e = F.normalize(torch.randn(6, 4), dim=-1)
    assert c2c_top1(e, e, [0, 1, 2, 3, 4, 4]) in (0.0, 100.0)
    assert c2c_top1(e, e, [0, 0, 0, 0, 0, 0]) == 100.0
