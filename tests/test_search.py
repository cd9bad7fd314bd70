"""search.py on tiny random models and images it writes: the scan's top k against torch.topk over
the whole matrix (any block size, skipped rows); a query's hits against the encoder's own
embeddings; image-to-image; a killed index resumed to the same bytes; the contact sheets; and the
refusals (another model's index, another list of images, a damaged file, a folder or file that is
not search.py's, an empty folder, an unreadable image, a model folder of the wrong kind)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import search as S
from configurator import is_setting
from encoder import load_encoder
from test_evaluate import tiny_stage2
from tiny import run_script, tiny_clip, tiny_llm

def write_folder(folder, n=11, seed=0):
    """n random images under folder/ and folder/sub/ as .png, .jpg and .webp, plus a text file."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    names = []
    for i in range(n):
        name = os.path.join("sub" if i % 2 else "", f"{i:02d}" + (".png", ".JPG", ".webp")[i % 3])
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            os.path.join(folder, name), quality=95)
        names.append(name)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image")
    return sorted(names)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    clip, llm = tiny_clip(d / "clip"), tiny_llm(d / "llm")
    return dict(dir=d, clip=clip, llm=llm, stage2=tiny_stage2(d / "stage2", clip, llm),
                names=write_folder(str(d / "photos")), photos=str(d / "photos"))

def run_search(**settings):
    """search.main in this process with these settings (the rest at their defaults)."""
    keys = [k for k, v in vars(S).items() if is_setting(k, v)]
    saved = {k: getattr(S, k) for k in keys}
    try:
        for key, v in {"device": "cpu", **settings}.items():
            setattr(S, key, type(saved[key])(v))
        return S.main({key: getattr(S, key) for key in keys})
    finally:
        for key, v in saved.items():
            setattr(S, key, v)

# -----------------------------------------------------------------------------
# the scan

@pytest.mark.parametrize("block", [1, 3, 7, 64, 1000])
def test_top_k_matches_topk_over_the_whole_matrix(tmp_path, block):
    g = torch.Generator().manual_seed(block)
    rows = torch.nn.functional.normalize(torch.randn(64, 24, generator=g), dim=-1).half()
    np.save(tmp_path / "e.npy", rows.numpy())
    q = torch.randn(5, 24, generator=g)
    full = q @ rows.float().T
    for k in (1, 4, 64, 100):
        s, i = S.top_k(str(tmp_path / "e.npy"), q, k, block)
        ws, wi = full.topk(min(k, 64), dim=1)
        torch.testing.assert_close(s, ws, atol=1e-5, rtol=0)  # matmuls of other shapes
        assert torch.equal(i, wi)
    skipped = {"0": "x", "5": "y", "63": "z"}
    s, i = S.top_k(str(tmp_path / "e.npy"), q, 64, block, skipped)
    assert s.shape == (5, 61) and not set(i.flatten().tolist()) & {0, 5, 63}
    full[:, [0, 5, 63]] = float("-inf")
    torch.testing.assert_close(s, full.topk(61, dim=1).values, atol=1e-5, rtol=0)

# -----------------------------------------------------------------------------
# the script

def test_index_query_and_contact_sheets(tiny, tmp_path, capsys):
    index = tmp_path / "index"
    queries = tmp_path / "q.txt"
    queries.write_text("a red shirt\n\na <b>blue</b> bag & a coat\n")
    results = run_search(model=tiny["stage2"], images=tiny["photos"], index=str(index),
                         query="a small white dress", queries=str(queries), k=4, batch_size=3,
                         chunk=4, out=str(tmp_path / "hits.html"))
    meta = json.load(open(index / "meta.json"))
    assert meta["count"] == meta["done"] == 11 and meta["dim"] == 16 and not meta["skipped"]
    assert S.read_paths(str(index)) == tiny["names"]  # recursive, sorted, the text file left out
    enc = load_encoder(tiny["stage2"], device="cpu")
    img = enc.encode_images([os.path.join(tiny["photos"], n) for n in tiny["names"]])
    rows = np.load(index / "embeddings.npy")
    np.testing.assert_allclose(rows, img.numpy().astype(np.float16), atol=1e-3, rtol=0)
    texts = ["a small white dress", "a red shirt", "a <b>blue</b> bag & a coat"]
    scores = enc.encode_texts(texts) @ torch.from_numpy(rows).float().T
    assert [t for t, _, _ in results] == texts
    for (_, _, hits), s in zip(results, scores):
        want = s.topk(4)
        assert [h[0] for h in hits] == pytest.approx(want.values.tolist(), abs=1e-6)
        assert [h[1] for h in hits] == [os.path.join(tiny["photos"], tiny["names"][i])
                                        for i in want.indices]
    out = capsys.readouterr().out
    assert "'a red shirt'" in out and f"{results[1][2][0][0]:.4f}  {results[1][2][0][1]}" in out
    page = (tmp_path / "hits.html").read_text()
    assert "a &lt;b&gt;blue&lt;/b&gt; bag &amp; a coat" in page and "<b>blue" not in page
    assert f'src="file://{results[0][2][0][1]}"' in page  # outside the page's folder
    run_search(model=tiny["stage2"], index=str(index), query="a coat", k=2,
               out=str(tiny["dir"] / "hits.html"))
    page = (tiny["dir"] / "hits.html").read_text()  # below its folder: relative addresses
    assert page.count('src="photos/') == 2 and "file://" not in page
    # image to image, on the index as made (no --images): the image itself first, cosine 1
    target = os.path.join(tiny["photos"], tiny["names"][7])
    results = run_search(model=tiny["stage2"], index=str(index), query_image=target, k=3,
                         out=str(tmp_path / "hits.png"))
    assert results[0][2][0][1] == target and results[0][2][0][0] == pytest.approx(1.0, abs=2e-3)
    sheet = Image.open(tmp_path / "hits.png")
    assert sheet.size == (8 + 2 * 96 + 8 + 3 * (96 + 8), 8 + 96 + 24)
    # search.py wrote both: a second run replaces them
    run_search(model=tiny["stage2"], index=str(index), query="a coat", k=2,
               out=str(tmp_path / "hits.png"))
    assert Image.open(tmp_path / "hits.png").size[0] == 8 + 2 * 96 + 8 + 2 * (96 + 8)

def test_a_killed_index_resumes_to_the_same_rows(tiny, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run_search(model=tiny["clip"], images=tiny["photos"], index=str(whole), batch_size=2)
    calls, encode = [], S.load_encoder
    def killed_after(n):
        def load(*a, **kw):
            enc = encode(*a, **kw)
            pixels = enc.encode_pixels
            def counting(x):
                calls.append(len(x))
                if len(calls) > n:
                    raise KeyboardInterrupt  # a kill, between two chunks' batches
                return pixels(x)
            enc.encode_pixels = counting
            return enc
        return load
    index = tmp_path / "index"
    monkeypatch.setattr(S, "load_encoder", killed_after(2))
    with pytest.raises(KeyboardInterrupt):
        run_search(model=tiny["clip"], images=tiny["photos"], index=str(index), chunk=3,
                   batch_size=2)  # chunks of 3 images: batches of 2 + 1
    assert json.load(open(index / "meta.json"))["done"] == 3  # the first chunk, not the second
    calls.clear()
    monkeypatch.setattr(S, "load_encoder", killed_after(100))
    run_search(model=tiny["clip"], images=tiny["photos"], index=str(index), chunk=3, batch_size=2)
    assert sum(calls) == 11 - 3  # only what was not done
    np.testing.assert_array_equal(np.load(index / "embeddings.npy"),
                                  np.load(whole / "embeddings.npy"))
    assert json.load(open(index / "meta.json"))["done"] == 11

def test_unreadable_images_are_named_or_skipped(tiny, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(tiny["photos"], photos)
    (photos / "sub" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=f"cannot read image {photos}/sub/broken.png: .*"
                       "--skip_bad=True"):
        run_search(model=tiny["clip"], images=str(photos), index=str(tmp_path / "a"))
    run_search(model=tiny["clip"], images=str(photos), index=str(tmp_path / "b"), skip_bad=True)
    meta = json.load(open(tmp_path / "b" / "meta.json"))
    row = S.read_paths(str(tmp_path / "b")).index("sub/broken.png")
    assert list(meta["skipped"]) == [str(row)] and meta["done"] == 12
    results = run_search(model=tiny["clip"], index=str(tmp_path / "b"), query="a shirt", k=20)
    assert len(results[0][2]) == 11 and all("broken" not in p for _, p in results[0][2])

def test_refusals(tiny, tmp_path):
    index = str(tmp_path / "index")
    run_search(model=tiny["clip"], images=tiny["photos"], index=index)
    with pytest.raises(ValueError, match=f"index='{index}': made by another model "
                       f"\\({tiny['clip']}"):
        run_search(model=tiny["stage2"], index=index, query="a shirt")
    other = tmp_path / "other"
    write_folder(str(other), n=4, seed=1)
    with pytest.raises(ValueError, match="images=.* lists others .*use another index folder"):
        run_search(model=tiny["clip"], images=str(other), index=index)
    with open(os.path.join(index, "embeddings.npy"), "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match="embeddings.npy: damaged: .*appended to"):
        run_search(model=tiny["clip"], index=index, query="a shirt")
    with pytest.raises(ValueError, match=f"index='{tmp_path}/none': no index there; pass "
                       "--images="):
        run_search(model=tiny["clip"], index=str(tmp_path / "none"), query="a shirt")
    with pytest.raises(ValueError, match="out_dir=.*photos: holds .* search.py does not write"):
        run_search(model=tiny["clip"], images=str(other), index=tiny["photos"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="images=.*empty': no image files"):
        run_search(model=tiny["clip"], images=str(tmp_path / "empty"), index=str(tmp_path / "e"))
    with pytest.raises(ValueError, match="an LLM alone .* has no image tower"):
        run_search(model=tiny["llm"], images=tiny["photos"], index=str(tmp_path / "l"))
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"mine")
    with pytest.raises(ValueError, match=f"{notes}: exists and search.py did not write it"):
        run_search(model=tiny["clip"], index=str(other), images=str(other), query="a",
                   out=str(notes))
    assert notes.read_bytes() == b"mine" and not (other / "meta.json").exists()
    with pytest.raises(ValueError, match="a contact sheet is a .png or an .html file"):
        run_search(model=tiny["clip"], index=str(other), query="a", out=str(tmp_path / "x.jpg"))

@pytest.mark.slow
def test_the_command_line_says_what_is_wrong(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_script("search.py", dict(model=tiny["clip"], images=tmp_path / "empty",
                                     index=tmp_path / "index"), check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
        f"search.py: images='{tmp_path / 'empty'}': no image files (" + \
        " ".join(S.EXTENSIONS) + ") in it or below"

def test_bench_search_runs_its_synthetic_part(tmp_path, capsys):
    import bench.search as B
    saved = {k: getattr(B, k) for k in ("demo", "sizes", "dim", "work", "out_md", "repeats")}
    try:
        B.demo, B.sizes, B.dim, B.repeats = "", "1000,3000", 8, 1
        B.work, B.out_md = str(tmp_path / "work"), str(tmp_path / "search.md")
        B.main()
    finally:
        for k, v in saved.items():
            setattr(B, k, v)
    lines = (tmp_path / "search.md").read_text().splitlines()
    assert lines[2] == "| measurement | result |" and len(lines) == 4 + 4
    assert "| 100 queries -> top 5 of 3,000 rows x 8" in lines[-1]
    assert not (tmp_path / "work").exists()  # the synthetic indexes are removed
