"""
The demo data set: composite images of four Fashion-MNIST items, with captions that make the methods'
effects visible, plus a caption-to-caption set of real CuPL descriptions.

Set up once (Debian's copy of Fashion-MNIST; clip-benchmark read by path, never imported):
    apt-get install dataset-fashion-mnist && pip install --no-deps clip-benchmark==1.6.2

Run (one process, CPU, about 15 s; nothing to gain from torchrun here):
    python data/fashion/prepare.py                          # writes data/fashion/out/
    python data/fashion/prepare.py --n_train=8 --out=/tmp/f  # tiny, somewhere else

In:  /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (28x28 grey,
     10 classes, 60k train + 10k test), clip_benchmark/datasets/cupl_prompts.json.
Out: <out>/images/{train,val,test}/NNNNN.png   image_size^2 RGB, a 2x2 grid of tinted items on black
     <out>/{train,val,test}.jsonl                manifests (dataset.py format), label = top-left item's class
     <out>/classes.json                          class names + prompt templates for zero-shot classification
     <out>/cupl.json                             {"texts": [...], "group": [...], "classes": [...]}
     <out>/meta.json                             the settings and statistics of this build (written last)
Train and val items come from Fashion-MNIST's train split (disjoint), test items from its test split.
Everything is a function of `seed` and the sizes; each split draws from its own random stream, so
changing n_test does not change the training set. Running it again is a no-op once <out> is complete;
a killed run leaves only <out>.partial behind, which the next run deletes.

Captions (every field in every record, same counts for every image):
    short  3 English captions, at most 8 SmolLM2 tokens: they name only the top-left item ("a red sneaker
           and more", "a sneaker and other items"), so each fits a small CLIP context but matches many
           images (with 6 colours x 10 classes, about 1 test image in 60 shares a coloured short caption).
    long   2 English captions (two different templates, items listed in reading or shuffled order) that
           name every item with its colour and place: 30-50 tokens, needed to tell images apart.
    de, fr the two long captions translated by the same templates (de[j] is long[j] in German).
"""
import os
import sys
import ast
import gzip
import json
import time
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# -----------------------------------------------------------------------------
out = str(HERE / "out")  # where everything goes (the lead gitignores data/fashion/out/)
src = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
n_train = 2000  # composite images; 4 Fashion-MNIST items each. Sized so the whole CPU demo takes minutes
n_val = 500
n_test = 500  # retrieval over 500 images: short captions ambiguous (~8 matches), long ones unique
image_size = 64  # 2x2 cells of 32 px, each a 28 px item at a random offset; 8x8 patches of 8 px for a ViT
seed = 1337
cupl_classes = 100  # CuPL caption-to-caption set: this many ImageNet classes (0: skip it) ...
cupl_per_class = 10  # ... times this many descriptions each
tokenizer = str(ROOT / "data" / "smollm2" / "hf")  # only for the token-length statistics ('' to skip)
# -----------------------------------------------------------------------------

FMNIST_INSTALL = "apt-get install dataset-fashion-mnist"
CUPL_INSTALL = "pip install --no-deps clip-benchmark==1.6.2"
ITEM = 28  # Fashion-MNIST item size

# The vocabulary, one row per Fashion-MNIST class (its order: T-shirt/top, Trouser, Pullover, Dress, Coat,
# Sandal, Shirt, Sneaker, Bag, Ankle boot). English names carry their article, so "a photo of {}." reads
# right for "an ankle boot" and "a pair of trousers". German: noun with indefinite article, colour after
# "in" as a noun (no adjective endings to decline). French: noun, gender, and the colour agrees.
CLASSES = ["a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
           "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot"]
DE_CLASSES = ["ein T-Shirt", "eine Hose", "ein Pullover", "ein Kleid", "ein Mantel",
              "eine Sandale", "ein Hemd", "ein Turnschuh", "eine Tasche", "eine Stiefelette"]
FR_CLASSES = [("un t-shirt", "m"), ("un pantalon", "m"), ("un pull", "m"), ("une robe", "f"), ("un manteau", "m"),
              ("une sandale", "f"), ("une chemise", "f"), ("une basket", "f"), ("un sac", "m"), ("une bottine", "f")]
# colours: (English, German, French masculine, French feminine, RGB of full ink). Six well-separated hues;
# an item's grey level scales its colour, so "white" is the plain Fashion-MNIST item.
PALETTE = [("red", "Rot", "rouge", "rouge", (235, 35, 35)),
           ("green", "Grün", "vert", "verte", (40, 200, 60)),
           ("blue", "Blau", "bleu", "bleue", (50, 100, 255)),
           ("yellow", "Gelb", "jaune", "jaune", (245, 225, 40)),
           ("pink", "Rosa", "rose", "rose", (255, 100, 210)),
           ("white", "Weiß", "blanc", "blanche", (255, 255, 255))]
# places in reading order: slot 0 top left, 1 top right, 2 bottom left, 3 bottom right
PLACES = {"en": ["top left", "top right", "bottom left", "bottom right"],
          "de": ["oben links", "oben rechts", "unten links", "unten rechts"],
          "fr": ["en haut à gauche", "en haut à droite", "en bas à gauche", "en bas à droite"]}
# zero-shot classification prompts (for the class of the top-left item)
TEMPLATES = ["a photo of {}.", "{} and more", "{} at the top left.", "a picture of {} and three more items."]


def phrase(lang, cls, col):
    """Noun phrase for one item of class `cls` in colour `col`, e.g. 'a red sneaker'."""
    if lang == "en":
        art, noun = CLASSES[cls].split(" ", 1)
        c = PALETTE[col][0]
        if noun.startswith("pair of "):
            return f"{art} pair of {c} {noun[len('pair of '):]}"
        return f"{'an' if c[0] in 'aeiou' else 'a'} {c} {noun}"
    if lang == "de":
        return f"{DE_CLASSES[cls]} in {PALETTE[col][1]}"
    noun, gender = FR_CLASSES[cls]
    return f"{noun} {PALETTE[col][2 if gender == 'm' else 3]}"


def cap(s):
    return s[0].upper() + s[1:]


def long_caption(lang, template, items):
    """items: [(slot, cls, col)] in the order to describe them. Three templates per language."""
    x = [phrase(lang, cls, col) for _, cls, col in items]
    p = [PLACES[lang][slot] for slot, _, _ in items]
    and_ = {"en": "and", "de": "und", "fr": "et"}[lang]
    if template == 0:  # "top left: a red sneaker; top right: ..."
        sep = " ; " if lang == "fr" else "; "
        colon = " : " if lang == "fr" else ": "
        return sep.join(f"{pi}{colon}{xi}" for pi, xi in zip(p, x)) + "."
    if template == 1:  # "Four clothing items in a grid. In the top left there is a red sneaker, in the ..."
        if lang == "en":
            head, first, rest = "Four clothing items in a grid.", f"In the {p[0]} there is {x[0]}", [f"in the {pi} {xi}" for pi, xi in zip(p[1:], x[1:])]
        elif lang == "de":
            head, first, rest = "Vier Kleidungsstücke in einem Raster.", f"{cap(p[0])} befindet sich {x[0]}", [f"{pi} {xi}" for pi, xi in zip(p[1:], x[1:])]
        else:
            head, first, rest = "Quatre vêtements dans une grille.", f"{cap(p[0])} se trouve {x[0]}", [f"{pi} {xi}" for pi, xi in zip(p[1:], x[1:])]
        return f"{head} {first}, {', '.join(rest[:-1])} {and_} {rest[-1]}."
    # template 2: "A red sneaker (top left), a blue dress (top right), ... and a white coat (bottom right)."
    parts = [f"{xi} ({pi})" for pi, xi in zip(p, x)]
    return cap(f"{', '.join(parts[:-1])} {and_} {parts[-1]}.")


def short_captions(cls, col):
    """Three English captions that name only the top-left item (the designated one, also the label)."""
    x = phrase("en", cls, col)
    return [f"{x} and more", f"{x} among other items", f"{CLASSES[cls]} and three more items"]


def read_idx(path):
    """A gzipped IDX file (the MNIST format: big-endian magic, dims, then uint8 data) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    assert data[:3] == b"\x00\x00\x08", f"{path}: not a uint8 IDX file"
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fmnist(split):
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [os.path.join(src, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    for p in paths:
        if not os.path.isfile(p):
            sys.exit(f"Fashion-MNIST not found at {p}; install it with: {FMNIST_INSTALL}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    assert images.shape[1:] == (ITEM, ITEM) and len(images) == len(labels), (images.shape, labels.shape)
    return images, labels


def compose(items, colours, offsets):
    """items (4, 28, 28) uint8, colours (4,) palette indices, offsets (4, 2) -> (S, S, 3) uint8 image."""
    cell = image_size // 2
    canvas = np.zeros((image_size, image_size, 3), np.float32)  # black background
    for slot in range(4):
        y, x = (slot // 2) * cell + offsets[slot, 0], (slot % 2) * cell + offsets[slot, 1]
        tint = np.asarray(PALETTE[colours[slot]][4], np.float32)
        canvas[y:y + ITEM, x:x + ITEM] = items[slot, :, :, None] / 255.0 * tint  # (28, 28, 3)
    return np.round(canvas).astype(np.uint8)


def make_split(name, n, pool_images, pool_labels, pool_ids, stream, folder):
    """Write n composite images and return their manifest records."""
    rng = np.random.default_rng([seed, stream])
    ids = pool_ids.reshape(n, 4)  # 4 distinct source items per image, in slot order
    colours = rng.integers(0, len(PALETTE), (n, 4))
    offsets = rng.integers(0, image_size // 2 - ITEM + 1, (n, 4, 2))
    (folder / "images" / name).mkdir(parents=True)
    records = []
    for i in range(n):
        classes = [int(c) for c in pool_labels[ids[i]]]
        img = compose(pool_images[ids[i]], colours[i], offsets[i])
        rel = f"images/{name}/{i:05d}.png"
        Image.fromarray(img).save(folder / rel)
        caps = {"short": short_captions(classes[0], colours[i, 0]), "long": [], "de": [], "fr": []}
        for template in rng.choice(3, 2, replace=False):  # two different templates per image
            order = rng.permutation(4) if rng.random() < 0.5 else np.arange(4)  # reading or shuffled order
            items = [(int(s), classes[s], int(colours[i, s])) for s in order]
            for lang, field in (("en", "long"), ("de", "de"), ("fr", "fr")):
                caps[field].append(long_caption(lang, int(template), items))
        records.append({"image": rel, "captions": caps, "label": classes[0]})
    return records


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(path)


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def cupl_set():
    """{"texts", "group", "classes"}: cupl_per_class CuPL descriptions of each of cupl_classes ImageNet
    classes; group[r] is the class index of texts[r] (a hit retrieves another text of the same group)."""
    import importlib.util
    spec = importlib.util.find_spec("clip_benchmark")  # finds, does not execute, its __init__
    path = spec and os.path.join(spec.submodule_search_locations[0], "datasets", "cupl_prompts.json")
    if not path or not os.path.isfile(path):
        sys.exit(f"clip-benchmark's cupl_prompts.json not found; install it with: {CUPL_INSTALL} "
                 f"(or pass --cupl_classes=0 to skip the CuPL set)")
    with open(path, encoding="utf-8") as f:
        cupl = json.load(f)["imagenet1k"]
    rng = np.random.default_rng([seed, 99])
    names = sorted(cupl)  # a fixed order, whatever the JSON file's
    texts, group, classes = [], [], []
    for c in sorted(rng.choice(len(names), cupl_classes, replace=False)):
        descs = list(dict.fromkeys(d.strip() for d in cupl[names[c]] if d.strip()))  # dedup, keep order
        if len(descs) < 2:
            continue  # a group needs two texts to retrieve one from the other
        pick = sorted(rng.choice(len(descs), min(cupl_per_class, len(descs)), replace=False))
        texts += [descs[j] for j in pick]
        group += [len(classes)] * len(pick)
        classes.append(names[c])
    return {"texts": texts, "group": group, "classes": classes}


def token_stats(splits):
    """Mean/max caption length in SmolLM2 tokens per field, over all splits."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer)
    stats = {}
    for field in ("short", "long", "de", "fr"):
        texts = [t for recs in splits.values() for r in recs for t in r["captions"][field]]
        lens = np.array([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]])
        stats[field] = {"mean": round(float(lens.mean()), 1), "min": int(lens.min()), "max": int(lens.max())}
    return stats


def ambiguity(records):
    """How many images share each caption text, on average over captions (1.0 = every caption unique)."""
    out = {}
    for field in ("short", "long"):
        owners = {}
        for i, r in enumerate(records):
            for t in r["captions"][field]:
                owners.setdefault(t, set()).add(i)
        per_caption = [len(owners[t]) for r in records for t in r["captions"][field]]
        out[field] = round(float(np.mean(per_caption)), 2)
    return out


def config():
    return {k: globals()[k] for k in ("src", "n_train", "n_val", "n_test", "image_size", "seed",
                                      "cupl_classes", "cupl_per_class")}


if __name__ == "__main__":
    # --key=value overrides, type-checked against the defaults above (nanoGPT style)
    for arg in sys.argv[1:]:
        key, _, val = arg.removeprefix("--").partition("=")
        assert key in config() or key in ("out", "tokenizer"), f"unknown argument {arg!r}"
        try:
            val = ast.literal_eval(val)
        except (SyntaxError, ValueError):
            pass  # a plain string
        assert type(val) is type(globals()[key]), f"{arg!r}: expected a {type(globals()[key]).__name__}"
        globals()[key] = val
    assert image_size >= 2 * ITEM and image_size % 2 == 0, "image_size must be even and at least 56"
    assert 4 * (n_train + n_val) <= 60000 and 4 * n_test <= 10000, "not enough Fashion-MNIST items"
    assert min(n_train, n_val, n_test) > 0

    out_dir = Path(out).resolve()
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        done = json.loads(meta_path.read_text())["config"]
        if done == config():
            print(f"{out_dir} is complete for these settings; nothing to do (delete it to build again)")
            sys.exit(0)
        sys.exit(f"{out_dir} holds a build with other settings {done}; delete it or pass --out=elsewhere")
    assert not out_dir.exists() or not any(out_dir.iterdir()), f"{out_dir} exists but is not a complete build; delete it"
    # build beside the target and rename at the end, so a kill never leaves a half-written <out>
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftover of a killed run
    tmp_dir.mkdir(parents=True)

    t0 = time.time()
    train_images, train_labels = load_fmnist("train")
    test_images, test_labels = load_fmnist("test")
    rng = np.random.default_rng([seed, 0])
    train_pool = rng.permutation(len(train_images))  # train and val take disjoint slices of it
    test_pool = rng.permutation(len(test_images))
    n_tr, n_va = 4 * n_train, 4 * n_val
    splits = {
        "train": make_split("train", n_train, train_images, train_labels, train_pool[:n_tr], 1, tmp_dir),
        "val": make_split("val", n_val, train_images, train_labels, train_pool[n_tr:n_tr + n_va], 2, tmp_dir),
        "test": make_split("test", n_test, test_images, test_labels, test_pool[:4 * n_test], 3, tmp_dir),
    }
    for name, records in splits.items():
        write_jsonl(tmp_dir / f"{name}.jsonl", records)
    write_atomic(tmp_dir / "classes.json", json.dumps({
        "classes": CLASSES, "templates": TEMPLATES,
        "label": "the Fashion-MNIST class of the top-left item; a class name already carries its article",
    }, indent=1))
    if cupl_classes:
        cupl = cupl_set()
        write_atomic(tmp_dir / "cupl.json", json.dumps(cupl, ensure_ascii=False))
    t_build = time.time() - t0

    # check what we wrote exactly as a trainer will, before publishing it
    sys.path.insert(0, str(ROOT))
    from dataset import check_manifest
    for name in splits:
        check_manifest(tmp_dir / f"{name}.jsonl", fields=["short", "long", "de", "fr"], label=True)

    stats = {"counts": {k: len(v) for k, v in splits.items()},
             "images_sharing_a_caption_test": ambiguity(splits["test"])}
    if cupl_classes:
        stats["cupl"] = {"texts": len(cupl["texts"]), "classes": len(cupl["classes"])}
    if tokenizer and os.path.isdir(tokenizer):
        stats["tokens_smollm2"] = token_stats(splits)
    else:
        print(f"no tokenizer at {tokenizer!r}: token statistics skipped (python data/smollm2/prepare.py makes it)")
    stats["seconds"] = round(time.time() - t0, 1)
    write_atomic(tmp_dir / "meta.json", json.dumps({"config": config(), "stats": stats}, indent=1))
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    tmp_dir.rename(out_dir)

    ex = splits["test"][0]["captions"]
    print(f"wrote {out_dir} in {stats['seconds']}s (images and manifests {t_build:.1f}s)")
    print(json.dumps(stats, indent=1))
    for field in ("short", "long", "de", "fr"):
        print(f"test[0] {field}: {ex[field][0]}")
