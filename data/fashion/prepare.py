"""
The demo data set: composite images of Fashion-MNIST items with captions that make the methods' effects
visible, single-item images that play "ImageNet" for zero-shot classification, and a caption-to-caption
set of real CuPL descriptions.

Set up once (Debian's copy of Fashion-MNIST; clip-benchmark read by path, never imported):
    apt-get install dataset-fashion-mnist && pip install --no-deps clip-benchmark==1.6.2

Run (one process, CPU, about 15 s; nothing to gain from torchrun here):
    python data/fashion/prepare.py                                       # writes data/fashion/out/
    python data/fashion/prepare.py --n_pretrain=8 --n_train=8 --out=/tmp/f  # tiny, somewhere else

In:  /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (28x28 grey,
     10 classes, 60k train + 10k test), clip_benchmark/datasets/cupl_prompts.json.
Out: <out>/images/<split>/NNNNN.png   image_size^2 RGB on black: a 2x2 grid of four tinted items, or (the
                                      "single" images) one item drawn twice as large
     <out>/pretrain.jsonl   the base CLIP's pretraining set: n_pretrain grids + n_single single items
     <out>/train.jsonl      grids for LLM2CLIP/ProCLIP stages 1 and 2 (other images than pretrain's)
     <out>/test.jsonl       grids for retrieval (items from Fashion-MNIST's test split)
     <out>/zeroshot.jsonl   single items for zero-shot classification (test split; label = class)
     <out>/classes.json     class names + prompt templates for zero-shot classification
     <out>/cupl.json        {"texts": [...], "group": [...], "classes": [...]}
     <out>/meta.json        the settings and statistics of this build (written last)
pretrain and train draw disjoint items from Fashion-MNIST's train split, test and zeroshot disjoint items
from its test split. Everything is a function of `seed` and the sizes; each split draws from its own
random stream. Running it again is a no-op once <out> is complete; a killed run leaves only
<out>.partial behind, which the next run deletes.

The miniature of the papers' setting. A real CLIP knows the visual concepts of dense captions but reads
only 77 tokens of them; LLM2CLIP lets an LLM read the whole caption. Here:
    short  one English caption per item of a grid, naming its colour, class and place ("a red sneaker at
           the top left", "top right: a blue dress"); at most 9 SmolLM2 tokens. The base CLIP learns
           every item of a grid from these, so its ViT sees all four, and its 10-token context reads them
           whole. Single images: "a red sneaker", "a photo of a red sneaker", "a sneaker".
    long   2 per grid (two different templates, items in reading or shuffled order) naming all four items
           with colour and place: 25-50 tokens. Two of the three templates open with a sentence about the
           grid that fills the base CLIP's context, so it reads at most one or two items of a long caption.
    de     train: the two long captions in German (LLM2CLIP stage 1 pairs them with English ones, so the
           LLM learns German; stage 2 never sees it); test: the first long caption in German.
    short_de  train only: the four short captions in German, item by item (stage 1 pairs each with its
           English one: "short=short_de").
    fr     test only: the first long caption in French, a language no stage ever trains on.
    label  single images only: the item's class (zero-shot classification).
"""
import os
import sys
import ast
import gzip
import importlib.util
import json
import time
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# -----------------------------------------------------------------------------
out = str(HERE / "out")  # where everything goes (gitignored)
src = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
n_pretrain = 4000  # grids the base CLIP pretrains on (with n_single single items)
n_single = 2000
n_train = 1000  # grids for stages 1 and 2: sized so the whole CPU demo takes minutes (the LLM dominates)
n_test = 500  # retrieval over 500 grids: long captions unique per image, short ones shared by ~2
n_zeroshot = 1000  # single items for zero-shot classification
image_size = 64  # 2x2 cells of 32 px, each a 28 px item at a random offset
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
# the opening sentence of long-caption templates 0 and 1: its 9 SmolLM2 tokens alone fill the base CLIP's
# 10-token context (9 + EOS)
GRID = {"en": "Four pieces of clothing, two by two.",
        "de": "Vier Kleidungsstücke, zwei mal zwei.",
        "fr": "Quatre vêtements, deux par deux."}
# zero-shot classification prompts (single images; "a picture of" never occurs in any caption)
TEMPLATES = ["a photo of {}.", "a picture of {}.", "{}"]


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
    if template == 0:  # "Four pieces of clothing ... Top left: a red sneaker; top right: ..."
        sep = " ; " if lang == "fr" else "; "
        colon = " : " if lang == "fr" else ": "
        return f"{GRID[lang]} " + cap(sep.join(f"{pi}{colon}{xi}" for pi, xi in zip(p, x))) + "."
    if template == 1:  # "Four pieces of clothing ... In the top left there is a red sneaker, in the ..."
        if lang == "en":
            first, rest = f"In the {p[0]} there is {x[0]}", [f"in the {pi} {xi}" for pi, xi in zip(p[1:], x[1:])]
        elif lang == "de":
            first, rest = f"{cap(p[0])} befindet sich {x[0]}", [f"{pi} {xi}" for pi, xi in zip(p[1:], x[1:])]
        else:
            first, rest = f"{cap(p[0])} se trouve {x[0]}", [f"{pi} {xi}" for pi, xi in zip(p[1:], x[1:])]
        return f"{GRID[lang]} {first}, {', '.join(rest[:-1])} {and_} {rest[-1]}."
    # template 2: "A red sneaker (top left), a blue dress (top right), ... and a white coat (bottom right)."
    parts = [f"{xi} ({pi})" for pi, xi in zip(p, x)]
    return cap(f"{', '.join(parts[:-1])} {and_} {parts[-1]}.")


def item_caption(slot, cls, col, variant, lang="en"):
    """One item of a grid, short enough for the base CLIP: 'a red sneaker at the top left' or
    'top right: a blue dress' (German: 'ein Turnschuh in Rot oben links', 'oben rechts: ein Kleid in Blau')."""
    x, place = phrase(lang, cls, col), PLACES[lang][slot]
    if variant == 1:
        return f"{place}: {x}"
    return f"{x} at the {place}" if lang == "en" else f"{x} {place}"


def single_captions(cls, col):
    return [phrase("en", cls, col), f"a photo of {phrase('en', cls, col)}", CLASSES[cls]]


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


def tinted(item, colour):
    """(h, w) uint8 grey item -> (h, w, 3) float32 in its palette colour (grey level scales the ink)."""
    return item[:, :, None] / 255.0 * np.asarray(PALETTE[colour][4], np.float32)


def compose(items, colours, offsets):
    """items (4, 28, 28) uint8, colours (4,) palette indices, offsets (4, 2) -> (S, S, 3) uint8 image."""
    cell = image_size // 2
    canvas = np.zeros((image_size, image_size, 3), np.float32)  # black background
    for slot in range(4):
        y, x = (slot // 2) * cell + offsets[slot, 0], (slot % 2) * cell + offsets[slot, 1]
        canvas[y:y + ITEM, x:x + ITEM] = tinted(items[slot], colours[slot])
    return np.round(canvas).astype(np.uint8)


def compose_single(item, colour, offset):
    """One item drawn at twice its size (bilinear) at `offset` -> (S, S, 3) uint8 image."""
    big = np.asarray(Image.fromarray(item).resize((2 * ITEM, 2 * ITEM), Image.BILINEAR))
    canvas = np.zeros((image_size, image_size, 3), np.float32)
    canvas[offset[0]:offset[0] + 2 * ITEM, offset[1]:offset[1] + 2 * ITEM] = tinted(big, colour)
    return np.round(canvas).astype(np.uint8)


def grids(name, n, pool_images, pool_labels, pool_ids, stream, folder, fields):
    """Write n grid images; return their records with the caption `fields` (a subset of short, long,
    de (two, or "de1": the first only), fr1)."""
    rng = np.random.default_rng([seed, stream])
    ids = pool_ids.reshape(n, 4)  # 4 distinct source items per image, in slot order
    colours = rng.integers(0, len(PALETTE), (n, 4))
    offsets = rng.integers(0, image_size // 2 - ITEM + 1, (n, 4, 2))
    variants = rng.integers(0, 2, (n, 4))
    (folder / "images" / name).mkdir(parents=True)
    records = []
    for i in range(n):
        classes = [int(c) for c in pool_labels[ids[i]]]
        rel = f"images/{name}/{i:05d}.png"
        Image.fromarray(compose(pool_images[ids[i]], colours[i], offsets[i])).save(folder / rel)
        caps = {"short": [item_caption(s, classes[s], colours[i, s], variants[i, s]) for s in range(4)],
                "short_de": [item_caption(s, classes[s], colours[i, s], variants[i, s], "de") for s in range(4)],
                "long": [], "de": [], "fr": []}
        for template in rng.choice(3, 2, replace=False):  # two different templates per image
            order = rng.permutation(4) if rng.random() < 0.5 else np.arange(4)  # reading or shuffled order
            items = [(int(s), classes[s], int(colours[i, s])) for s in order]
            for lang, field in (("en", "long"), ("de", "de"), ("fr", "fr")):
                caps[field].append(long_caption(lang, int(template), items))
        keep = {**caps, "de1": caps["de"][:1], "fr1": caps["fr"][:1]}
        records.append({"image": rel, "captions": {f.rstrip("1"): keep[f] for f in fields}})
    return records


def singles(name, n, pool_images, pool_labels, pool_ids, stream, folder):
    """Write n single-item images; return their records (short captions, label = class)."""
    rng = np.random.default_rng([seed, stream])
    colours = rng.integers(0, len(PALETTE), n)
    offsets = rng.integers(0, image_size - 2 * ITEM + 1, (n, 2))
    (folder / "images" / name).mkdir(parents=True)
    records = []
    for i in range(n):
        cls = int(pool_labels[pool_ids[i]])
        rel = f"images/{name}/{i:05d}.png"
        Image.fromarray(compose_single(pool_images[pool_ids[i]], colours[i], offsets[i])).save(folder / rel)
        records.append({"image": rel, "captions": {"short": single_captions(cls, int(colours[i]))}, "label": cls})
    return records


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(path)


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def cupl_path():
    """Path of clip-benchmark's cupl_prompts.json, found without importing clip_benchmark (its
    __init__ may import open_clip and its image package)."""
    spec = importlib.util.find_spec("clip_benchmark")  # finds, does not execute, its __init__
    path = spec and os.path.join(spec.submodule_search_locations[0], "datasets", "cupl_prompts.json")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"clip-benchmark's cupl_prompts.json not found; install it with: {CUPL_INSTALL}")
    return path


def read_cupl(path=None):
    """{ImageNet class name: [CuPL descriptions]} (998 classes, about 150 descriptions each)."""
    with open(path or cupl_path(), encoding="utf-8") as f:
        return json.load(f)["imagenet1k"]


def cupl_set():
    """{"texts", "group", "classes"}: cupl_per_class CuPL descriptions of each of cupl_classes ImageNet
    classes; group[r] is the class index of texts[r] (a hit retrieves another text of the same group)."""
    try:
        cupl = read_cupl()
    except FileNotFoundError as e:
        sys.exit(f"{e} (or pass --cupl_classes=0 to skip the CuPL set)")
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
    """Mean/min/max caption length in SmolLM2 tokens per split and field."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer)
    stats = {}
    for name, recs in splits.items():
        for field in sorted({f for r in recs for f in r["captions"]}):
            texts = [t for r in recs for t in r["captions"].get(field, [])]
            lens = np.array([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]])
            stats[f"{name}.{field}"] = {"mean": round(float(lens.mean()), 1), "min": int(lens.min()), "max": int(lens.max())}
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


FORMAT = 2  # bump when what a build writes changes (2: short_de in train): an older build is refused, not reused

def config():
    return {"format": FORMAT} | {k: globals()[k] for k in ("src", "n_pretrain", "n_single", "n_train", "n_test",
                                                           "n_zeroshot", "image_size", "seed", "cupl_classes",
                                                           "cupl_per_class")}


if __name__ == "__main__":
    # --key=value overrides, type-checked against the defaults above (nanoGPT style)
    for arg in sys.argv[1:]:
        key, _, val = arg.removeprefix("--").partition("=")
        if key not in config() and key not in ("out", "tokenizer") or key == "format":
            sys.exit(f"unknown argument {arg!r} (settings: {', '.join(sorted(config()))}, out, tokenizer)")
        try:
            val = ast.literal_eval(val)
        except (SyntaxError, ValueError):
            pass  # a plain string
        if type(val) is not type(globals()[key]):
            sys.exit(f"{arg!r}: expected a {type(globals()[key]).__name__}")
        globals()[key] = val
    if image_size < 2 * ITEM or image_size % 2:
        sys.exit("image_size must be even and at least 56")
    if 4 * (n_pretrain + n_train) + n_single > 60000 or 4 * n_test + n_zeroshot > 10000:
        sys.exit("not enough Fashion-MNIST items for these sizes")
    if min(n_pretrain, n_single, n_train, n_test, n_zeroshot) <= 0:
        sys.exit("every split needs at least one image")

    out_dir = Path(out).resolve()
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        done = json.loads(meta_path.read_text())["config"]
        if done == config():
            print(f"{out_dir} is complete for these settings; nothing to do (delete it to build again)")
            sys.exit(0)
        sys.exit(f"{out_dir} holds a build with other settings {done}; delete it or pass --out=elsewhere")
    if out_dir.exists() and any(out_dir.iterdir()):
        sys.exit(f"{out_dir} exists but is not a complete build; delete it")
    # build beside the target and rename at the end, so a kill never leaves a half-written <out>
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftover of a killed run
    tmp_dir.mkdir(parents=True)

    t0 = time.time()
    train_images, train_labels = load_fmnist("train")
    test_images, test_labels = load_fmnist("test")
    rng = np.random.default_rng([seed, 0])
    train_pool = rng.permutation(len(train_images))  # pretrain grids, singles and train take disjoint slices
    test_pool = rng.permutation(len(test_images))
    a, b, c = 4 * n_pretrain, 4 * n_pretrain + n_single, 4 * n_pretrain + n_single + 4 * n_train
    pretrain = (grids("pretrain", n_pretrain, train_images, train_labels, train_pool[:a], 1, tmp_dir, ["short"]) +
                singles("single", n_single, train_images, train_labels, train_pool[a:b], 2, tmp_dir))
    splits = {
        "pretrain": pretrain,
        "train": grids("train", n_train, train_images, train_labels, train_pool[b:c], 3, tmp_dir,
                       ["short", "long", "short_de", "de"]),
        "test": grids("test", n_test, test_images, test_labels, test_pool[:4 * n_test], 4, tmp_dir,
                      ["short", "long", "de1", "fr1"]),
        "zeroshot": singles("zeroshot", n_zeroshot, test_images, test_labels,
                            test_pool[4 * n_test:4 * n_test + n_zeroshot], 5, tmp_dir),
    }
    for name, records in splits.items():
        write_jsonl(tmp_dir / f"{name}.jsonl", records)
    write_atomic(tmp_dir / "classes.json", json.dumps({
        "classes": CLASSES, "templates": TEMPLATES,
        "label": "the Fashion-MNIST class of a single-item image; a class name already carries its article",
    }, indent=1))
    if cupl_classes:
        cupl = cupl_set()
        write_atomic(tmp_dir / "cupl.json", json.dumps(cupl, ensure_ascii=False))
    t_build = time.time() - t0

    # check what we wrote exactly as a trainer will, before publishing it
    sys.path.insert(0, str(ROOT))
    from manifest import Manifest
    Manifest(tmp_dir / "pretrain.jsonl").check(fields=["short"], decode=True)
    Manifest(tmp_dir / "train.jsonl").check(fields=["short", "long", "short_de", "de"], decode=True)
    Manifest(tmp_dir / "test.jsonl").check(fields=["short", "long", "de", "fr"], decode=True)
    Manifest(tmp_dir / "zeroshot.jsonl").check(fields=["short"], label=True, decode=True)

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
    for field, texts in ex.items():
        print(f"test[0] {field}: {texts[0]}")
