"""
The one data module: the JSONL manifest, its check, CLIP preprocessing, the image Dataset, the caption
row order shared with the embedding cache, and the CuPL descriptions of clip-benchmark.

Manifest (DESIGN.md section 6): JSONL, one image per line, record i on line i + 1 (no blank lines, so
a line number and a row index are the same thing, off by one):
    {"image": "images/train/00000.png", "captions": {"short": ["...", ...], "long": [...], "de": [...]}, "label": 3}
`image` is relative to the manifest's folder (absolute paths work too); `captions` and `label` are
optional; a caption field is a list of non-empty strings (any number per image); `label` is an int.

    records = check_manifest("data/fashion/out/train.jsonl", fields=["short", "long"])  # every fault at once
    ds = ImageDataset("data/fashion/out/train.jsonl", size=64, train=True, seed=1337)
    texts, image_index = caption_rows(records, "long")  # the rows of the embedding cache, in order

No torch vision package (on a CPU-only machine it pulls the CUDA build of torch): the CLIP transforms are a few
lines of Pillow and numpy below.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

KEYS = ("image", "captions", "label")
MAX_LISTED = 20  # faults listed in full by check_manifest; the rest are counted

# -----------------------------------------------------------------------------
# manifest

def read_manifest(path):
    """All records of a manifest, in order: record i is line i + 1. Only parses JSON (a line that is not
    a JSON object raises, naming the line); check_manifest validates everything else."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON ({e}); run check_manifest for every fault") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def image_path(manifest, rec):
    """Where a record's image lies: relative paths are relative to the manifest's folder."""
    return os.path.join(os.path.dirname(os.path.abspath(manifest)), rec["image"])


def _record_faults(rec, fields, need_label):
    """What is wrong with one parsed record (not its image), as a list of short sentences."""
    if not isinstance(rec, dict):
        return [f"expected a JSON object, got {type(rec).__name__}"]
    faults = [f"unknown key {k!r} (a record has {', '.join(KEYS)})" for k in rec if k not in KEYS]
    if "image" not in rec:
        faults.append("missing key 'image'")
    elif not isinstance(rec["image"], str) or not rec["image"]:
        faults.append(f"'image' must be a non-empty string, got {rec['image']!r}")
    if "captions" not in rec:
        if fields:
            faults.append("missing key 'captions'")
    elif not isinstance(rec["captions"], dict):
        faults.append(f"'captions' must be an object {{field: [captions]}}, got {type(rec['captions']).__name__}")
    else:
        for field, texts in rec["captions"].items():
            if not isinstance(texts, list) or not texts:
                faults.append(f"caption field {field!r} must be a non-empty list of strings, got {texts!r:.60}")
                continue
            faults += [f"caption {field}[{j}] must be a non-empty string, got {t!r:.60}"
                       for j, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        faults += [f"caption field {f!r} is missing" for f in fields or () if f not in rec["captions"]]
    if "label" in rec:
        if type(rec["label"]) is not int:  # bool is an int subclass: refuse True/False too
            faults.append(f"'label' must be an int, got {rec['label']!r:.60}")
    elif need_label:
        faults.append("missing key 'label'")
    return faults


def image_fault(path):
    """None if Pillow fully decodes the file, else why not."""
    if not os.path.isfile(path):
        return f"image file not found: {path}"
    try:
        with Image.open(path) as img:
            img.load()  # open() reads only the header; load() decodes every pixel
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        return f"cannot decode image {path}: {type(e).__name__}: {e}"
    return None


def check_manifest(path, fields=None, decode=True, label=False):
    """Check a whole manifest before any training; return its records when clean.

    fields: caption fields every record must have (None: only check the ones present).
    decode: fully decode every image with Pillow (False: only check that each file exists).
    label:  every record must have an int label.
    Every fault is collected with its line number, then one ValueError lists them all (the first
    MAX_LISTED in full, then a count), so one run finds everything that a training run would trip on.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    faults, records = [], []
    for n, line in enumerate(tqdm(lines, desc=f"check {os.path.basename(path)}", unit="line",
                                  disable=len(lines) < 5000, leave=False), 1):
        if not line.strip():
            faults.append((n, "blank line (record i must be line i + 1)"))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            faults.append((n, f"malformed JSON: {e}"))
            continue
        records.append(rec)
        bad = _record_faults(rec, fields, label)
        faults += [(n, msg) for msg in bad]
        if isinstance(rec, dict) and isinstance(rec.get("image"), str) and rec["image"]:
            p = image_path(path, rec)
            why = image_fault(p) if decode else (None if os.path.isfile(p) else f"image file not found: {p}")
            if why:
                faults.append((n, why))
    if not lines:
        faults.append((0, "the manifest is empty"))
    if faults:
        shown = [f"  line {n}: {msg}" for n, msg in faults[:MAX_LISTED]]
        if len(faults) > MAX_LISTED:
            shown.append(f"  ... and {len(faults) - MAX_LISTED} more")
        n_lines = len({n for n, _ in faults})
        raise ValueError(f"{path}: {len(faults)} fault(s) on {n_lines} of {len(lines)} lines:\n" + "\n".join(shown))
    return records


def caption_rows(records, field):
    """Flatten one caption field in manifest order: record 0's captions in their order, then record 1's,
    and so on. Returns (texts, image_index) with image_index[r] = the record (image) of text row r, an
    int64 array. The embedding cache stores its rows in exactly this order, so row r of
    `<field>.npy` embeds texts[r] and belongs to image image_index[r]."""
    texts, index = [], []
    for i, rec in enumerate(records):
        caps = rec.get("captions", {}).get(field)
        if not caps:
            raise ValueError(f"record {i} (line {i + 1}) has no captions in field {field!r}")
        texts += caps
        index += [i] * len(caps)
    return texts, np.asarray(index, dtype=np.int64)


def rows_by_image(image_index):
    """caption_rows' image_index -> a list whose item i holds image i's rows (every image has some)."""
    return np.split(np.arange(len(image_index)), np.flatnonzero(np.diff(image_index)) + 1)

# -----------------------------------------------------------------------------
# CLIP preprocessing: Pillow for the resampling, numpy/torch for the rest

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(img):
    """RGB PIL image -> (3, H, W) float32, CLIP-normalised."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def eval_transform(img, size):
    """CLIP's eval transform: shortest side to `size` (bicubic), centre crop size x size, normalise.
    Sizes and crop offsets round like the Resize + CenterCrop of CLIP's own preprocessing."""
    img = img.convert("RGB")  # greyscale, palette, RGBA, 16-bit -> RGB
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    img = img.resize((nw, nh), Image.BICUBIC)  # Pillow returns a copy when the size already matches
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return to_tensor(img.crop((left, top, left + size, top + size)))


def train_transform(img, size, generator, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random resized crop (area fraction in `scale`, aspect ratio in `ratio`, log-uniform), resized
    to size x size (bicubic), normalised. All randomness comes from `generator` (a torch.Generator), so
    a seed fixes the crop. The usual RandomResizedCrop sampling rule: 10 tries, then the
    centred crop of the largest in-range aspect ratio."""
    img = img.convert("RGB")
    W, H = img.size
    u = torch.rand(10, 4, generator=generator, dtype=torch.float64).tolist()  # per try: area, aspect, x, y
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    for a, r, x, y in u:
        area = W * H * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = float(np.exp(lo + (hi - lo) * r))
        w, h = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < w <= W and 0 < h <= H:
            left, top = int(x * (W - w + 1)), int(y * (H - h + 1))  # uniform over every position
            break
    else:  # no try fit: the centred crop, its aspect ratio clamped into `ratio`
        w, h = W, H
        if W / H > ratio[1]:
            w = int(round(H * ratio[1]))
        elif W / H < ratio[0]:
            h = int(round(W / ratio[0]))
        left, top = (W - w) // 2, (H - h) // 2
    return to_tensor(img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h)))

# -----------------------------------------------------------------------------
# the image dataset

class ImageDataset(Dataset):
    """Images of a manifest, decoded with Pillow in DataLoader workers.

    item i -> (pixels (3, size, size) float32, i, label (-1 if the record has none))
    Captions are not here: trainers pick them by the returned index (caption_rows, embedding cache).

    train=True: a random resized crop whose randomness depends only on (seed, epoch, i), never on the
    worker or the batch, so a resumed run sees the same crops. Call set_epoch(e) before iterating each
    epoch (before the DataLoader starts its workers: they copy the dataset), or ask for items (i, e).

    A bad image raises ValueError naming the file and the manifest line. With skip_bad=True it is
    skipped instead: __getitem__ returns None, `collate` drops it from the batch, and the index is
    marked in a shared-memory table that every worker writes into, so the main process can print
    `ds.n_skipped` and `ds.skipped()` (line, path). Nothing is skipped silently: each skip also prints
    one line to stderr from the worker.
    """

    def __init__(self, manifest, size=224, train=False, seed=0, skip_bad=False, records=None):
        self.manifest = str(manifest)
        self.records = read_manifest(manifest) if records is None else records
        self.size, self.train, self.seed, self.skip_bad = size, train, seed, skip_bad
        self.epoch = 0
        self.bad = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()  # seen by all workers

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def path(self, i):
        return image_path(self.manifest, self.records[i])

    def __getitem__(self, i):
        epoch = self.epoch
        if isinstance(i, tuple):  # (i, epoch): that epoch's crop, whatever set_epoch said (trainers' samplers)
            i, epoch = i
        path = self.path(i)
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # decodes every pixel (and greyscale -> RGB)
        except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            msg = f"{self.manifest}:{i + 1}: cannot read image {path}: {type(e).__name__}: {e}"
            if not self.skip_bad:
                raise ValueError(msg + " (check_manifest finds every such fault; skip_bad=True skips them)") from e
            self.bad[i] = True
            print(f"skipping {msg}", file=sys.stderr)
            return None
        if self.train:
            # seeded from (seed, epoch, i) only: the same crop whatever the worker, batch or resume point
            s = np.random.SeedSequence([self.seed, epoch, i]).generate_state(2)
            x = train_transform(img, self.size, torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1])))
        else:
            x = eval_transform(img, self.size)
        return x, i, self.records[i].get("label", -1)

    @property
    def n_skipped(self):
        return int(self.bad.sum())

    def skipped(self):
        """(line, path) of every image skipped so far, in manifest order."""
        return [(i + 1, self.path(i)) for i in self.bad.nonzero().flatten().tolist()]


def collate(batch):
    """DataLoader collate_fn for ImageDataset: drops skipped (None) items, then stacks into
    (pixels (B, 3, S, S), index (B,), label (B,)). Returns None if every item of the batch was skipped."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None

# -----------------------------------------------------------------------------
# CuPL descriptions (clip-benchmark's cupl_prompts.json), read by path

CUPL_INSTALL = "pip install --no-deps clip-benchmark==1.6.2"


def cupl_path():
    """Path of clip-benchmark's cupl_prompts.json, found without importing clip_benchmark (its
    __init__ may import open_clip and its image package)."""
    spec = importlib.util.find_spec("clip_benchmark")
    path = spec and os.path.join(spec.submodule_search_locations[0], "datasets", "cupl_prompts.json")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"clip-benchmark's cupl_prompts.json not found; install it with: {CUPL_INSTALL}")
    return path


def read_cupl(path=None):
    """{ImageNet class name: [CuPL descriptions]} (998 classes, about 150 descriptions each)."""
    with open(path or cupl_path(), encoding="utf-8") as f:
        return json.load(f)["imagenet1k"]
