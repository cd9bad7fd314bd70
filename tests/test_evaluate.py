"""evaluate.py's metrics on data with known answers."""

import pytest
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

def brute_force_recall(img, txt, rel, k):
    """Plain loops: sort each query's items, find the first right one, ties broken against the query."""
    def one_way(q, items, right):
        hits = 0
        for i in range(q.shape[0]):
            sims = [(float(q[i] @ items[j]), bool(right[i][j])) for j in range(items.shape[0])]
            sims.sort(key=lambda x: (-x[0], x[1]))  # among equal scores, wrong items first
            hits += any(r for _, r in sims[:k])
        return 100.0 * hits / q.shape[0]
    return one_way(img, txt, rel), one_way(txt, img, rel.T)

def test_retrieval_recall_known_answers():
    from evaluate import retrieval_recall
    eye = torch.eye(4)
    r = retrieval_recall(eye, eye, torch.eye(4, dtype=torch.bool), ks=(1,))
    assert r == {"i2t_r1": 100.0, "t2i_r1": 100.0}
    # images 0..2 (one-hot); texts: t0 = image 0, t1 closer to image 2 than to image 1 (its image),
    # t2 = image 2, t3 = a second caption of image 0 that points at image 1
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0, 1.0], [0.2, 0.9, 0]]), dim=-1)
    rel = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    r = retrieval_recall(img, txt, rel, ks=(1, 2))
    # i2t: image 0 -> t0 first (hit); image 1 -> t3 (0.98) before t1 (0.6): miss at 1, hit at 2;
    # image 2 -> t2 (1.0) first: hit.   t2i: t0 -> 0 hit; t1 -> image 2 (0.8) first: miss, then 1; t2 hit;
    # t3 -> image 1 (0.98) first: miss, then image 0: hit at 2
    assert r == pytest.approx({"i2t_r1": 200 / 3, "i2t_r2": 100.0, "t2i_r1": 50.0, "t2i_r2": 100.0}, abs=1e-12)
    # a tie with a wrong item counts against the query: a collapsed model scores 0, not 100
    same = F.normalize(torch.ones(3, 4), dim=-1)
    assert retrieval_recall(same, same, torch.eye(3, dtype=torch.bool), ks=(1,)) == {"i2t_r1": 0.0, "t2i_r1": 0.0}

def test_retrieval_recall_matches_brute_force():
    from evaluate import retrieval_recall
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        img = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
        txt = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
        rel = torch.zeros(12, 30, dtype=torch.bool)
        rel[torch.randint(0, 12, (30,), generator=g), torch.arange(30)] = True  # each text: one image
        for k in (1, 5, 10):
            r = retrieval_recall(img, txt, rel, ks=(k,), chunk=5)  # chunks smaller than the sets
            i2t, t2i = brute_force_recall(img, txt, rel, k)
            assert abs(r[f"i2t_r{k}"] - i2t) < 1e-9 and abs(r[f"t2i_r{k}"] - t2i) < 1e-9

def test_caption_relation_merges_identical_captions():
    from evaluate import caption_relation
    rows, rel = caption_relation(["a shirt", "a red shirt", "a shirt", "a bag"], [0, 0, 1, 2], 3)
    assert rows == [0, 1, 3]
    assert rel.tolist() == [[True, True, False], [True, False, False], [False, False, True]]

def test_zeroshot_known_answer():
    from evaluate import zeroshot_accuracy, zeroshot_classifier
    classes = ["cat", "dog", "bird"]
    def embed(texts):  # each prompt embeds as its class's one-hot, plus template noise
        return torch.stack([F.one_hot(torch.tensor(next(i for i, c in enumerate(classes) if c in t)), 3).float()
                            + 0.1 * torch.randn(3) for t in texts])
    class_emb = zeroshot_classifier(embed, classes, ["a {}.", "a photo of a {}."])
    assert class_emb.shape == (3, 3) and torch.allclose(class_emb.norm(dim=-1), torch.ones(3))
    img = F.normalize(torch.eye(3)[[0, 1, 2, 0]] + 0.05, dim=-1)
    labels = [0, 1, 2, 1]  # the last image is labelled wrong
    r = zeroshot_accuracy(img, class_emb, labels, ks=(1, 2, 5))
    assert r["zeroshot_top1"] == 75.0 and "zeroshot_top5" not in r  # top-5 of 3 classes is meaningless
