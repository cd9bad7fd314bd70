"""
How an image becomes a tensor: Pillow decoding to 8-bit RGB, each image tower's preprocessing
(ImagePreprocess: CLIP's shortest side + centre crop, SigLIP's square resize, as HF's
preprocessor_config.json says), the eval and train transforms, and ImageDataset over a
manifest.Manifest. Pillow, numpy and a few lines of torch: no vision package, which on a CPU
machine would pull the CUDA build of torch.

Image modes: every image becomes 8-bit RGB with its full range. 16-bit data ("I;16", "I;16B", and
"I" with values in 0..65535) is scaled by 255/65535 (never clipped, as Pillow's convert does); "I"
outside that range and "F" are scaled from their min..max ("F" within [0, 1] by 255); "1", "L",
"P", "CMYK", "YCbCr", "LAB" convert as Pillow does; alpha is dropped, as CLIP's preprocessing does.
"""

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

# -----------------------------------------------------------------------------
# each tower's preprocessing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_RESAMPLE = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # PIL's numbering

@dataclass
class ImagePreprocess:
    """The pixels a tower expects: resize with `resample`, scale to [0, 1], (x - mean) / std.
    resize "shortest_side_crop": shortest side to `size`, then the centre crop_size^2 (CLIP);
    resize "square": the whole image to size x size, aspect ratio not kept, no crop (SigLIP)."""
    resize: str
    size: int
    crop_size: int  # the side of the square the tower gets (== size for "square")
    resample: str   # a PIL filter name: Image.Resampling[resample.upper()]
    image_mean: tuple
    image_std: tuple

def clip_preprocess(size):
    """HF CLIPImageProcessor's defaults, at the tower's own resolution."""
    return ImagePreprocess("shortest_side_crop", size, size, "bicubic", CLIP_MEAN, CLIP_STD)

def siglip_preprocess(size):
    """HF SiglipImageProcessor's defaults (SigLIP 2's folders override resample with bilinear)."""
    return ImagePreprocess("square", size, size, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

def _square_side(v, what, file):
    """An HF image-processor size (an int, {"height": n, "width": n}, {"shortest_edge": n}) -> n."""
    if isinstance(v, dict):
        v = v.get("shortest_edge", v.get("height") if v.get("height") == v.get("width") else None)
    if not isinstance(v, int):
        raise ValueError(f"{file}: {what} is not supported (expected a shortest edge or a square "
                         "size)")
    return v

def read_preprocess(path, default):
    """`default` as the folder's preprocessor_config.json (HF image-processor format) says, if it
    has one. Rescaling is always by 1/255."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return default
    with open(file) as f:
        raw = json.load(f)
    size = raw.get("size", default.size)
    resize = default.resize  # a plain int size (old CLIP files) keeps the tower's own rule
    if isinstance(size, dict):
        resize = "shortest_side_crop" if "shortest_edge" in size else "square"
    size = _square_side(size, f"size {size!r}", file)
    crop = size
    if resize == "shortest_side_crop":
        if raw.get("do_center_crop") is False:
            raise ValueError(f"{file}: do_center_crop false (images of any shape) is not supported")
        crop = _square_side(raw.get("crop_size", size), f"crop_size {raw.get('crop_size')!r}", file)
    resample = PIL_RESAMPLE[raw.get("resample", PIL_RESAMPLE.index(default.resample))]
    norm = raw.get("do_normalize", True)
    mean = tuple(raw.get("image_mean", default.image_mean)) if norm else (0.0, 0.0, 0.0)
    std = tuple(raw.get("image_std", default.image_std)) if norm else (1.0, 1.0, 1.0)
    return ImagePreprocess(resize, size, crop, resample, mean, std)

def preprocess_config(p: ImagePreprocess):
    """p as an HF preprocessor_config.json dict (as transformers' CLIP / SigLIP image processors
    save it): an exported folder carries its tower's preprocessing, read_preprocess gives p back."""
    crop = p.resize == "shortest_side_crop"
    size = {"shortest_edge": p.size} if crop else {"height": p.size, "width": p.size}
    out = {"image_processor_type": "CLIPImageProcessor" if crop else "SiglipImageProcessor",
           "do_resize": True, "size": size, "resample": PIL_RESAMPLE.index(p.resample),
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": list(p.image_mean), "image_std": list(p.image_std), "do_convert_rgb": True}
    if crop:
        out.update(do_center_crop=True, crop_size={"height": p.crop_size, "width": p.crop_size})
    return out

# -----------------------------------------------------------------------------
# any mode to 8-bit RGB; the transforms

def _grey_to_rgb(a):
    """A 2-d uint8 array -> an RGB image."""
    return Image.fromarray(np.ascontiguousarray(a), "L").convert("RGB")

def _scale_to_8bit(a, lo, hi):
    """Linear map of [lo, hi] onto 0..255 (rounded), NaN to 0."""
    a = np.nan_to_num(a.astype(np.float64), nan=lo)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)

def to_rgb(img):
    """Any Pillow image -> 8-bit RGB with its full range (the module docstring's rules). Decodes
    every pixel (Image.open reads only the header)."""
    mode = img.mode
    if mode == "RGB":
        img.load()
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            return _grey_to_rgb(_scale_to_8bit(a, float(a.min()), float(a.max())))
        a = a.astype(np.uint32)
        return _grey_to_rgb(((a + 128) // 257).astype(np.uint8))  # round(v * 255 / 65535)
    if mode == "F":
        a = np.asarray(img)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        return _grey_to_rgb(_scale_to_8bit(a, lo, hi))
    if mode == "P" and "transparency" in img.info or mode in ("PA", "La", "RGBa"):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")  # 1, L, LA, P, RGBA, RGBX, CMYK, YCbCr, LAB, HSV: alpha dropped

def to_tensor(img, mean=CLIP_MEAN, std=CLIP_STD):
    """RGB PIL image -> (3, H, W) float32: scaled to [0, 1], then (x - mean) / std per channel."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (x - mean) / std

def as_preprocess(p):
    """A tower's preprocessing (an ImagePreprocess; e.g. `tower.preprocess`), or an int: CLIP's
    preprocessing at that size (what the transforms took before towers carried their own)."""
    if isinstance(p, (int, np.integer)):
        return clip_preprocess(int(p))
    if p.resize not in ("shortest_side_crop", "square"):
        raise ValueError(f"ImagePreprocess.resize {p.resize!r}: expected 'shortest_side_crop' or "
                         "'square'")
    if p.resize == "square" and p.crop_size != p.size:
        raise ValueError(f"ImagePreprocess: resize 'square' takes crop_size == size, got "
                         f"{p.crop_size} and {p.size}")
    return p

def _resample(p):
    return Image.Resampling[p.resample.upper()]

DRAFT_MARGIN = 2  # JPEG draft decoding keeps at least this many source pixels per output pixel

def _draft(img, box, size):
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling: it skips most of the decoding
    work) when the crop `box` (in full-size pixels) still has >= DRAFT_MARGIN source pixels per
    output pixel; returns the box in the decoded image's pixels (the same region). Other images:
    unchanged. Why a margin of 2: it is the rule of Pillow's own `reducing_gap=2` shortcut (reduce
    by an integer factor, then resample from >= 2x the target), and it changes the output about as
    little (bench/data.py: mean 0.3-0.4 levels of 255 at 224/336; a margin of 1 doubles that, with
    edges off by up to 46 levels). So it only acts on images >= 4x the target's side: 2000x1500
    photos decode 1.4-1.6x faster, 500x375 ones not at all."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L", "YCbCr"):
        return box
    side = min(box[2] - box[0], box[3] - box[1])
    s = 1
    while s < 8 and side / (2 * s) >= DRAFT_MARGIN * size:
        s *= 2
    if s == 1:
        return box
    W, H = img.size
    _, full = img.draft("RGB" if img.mode != "L" else "L", (max(1, W // s), max(1, H // s)))
    k = full[2] / W  # decoded pixels per full-size pixel (1/scale actually chosen)
    return tuple(v * k for v in box)

def eval_box(W, H, size, crop=None):
    """CLIP's eval geometry: shortest side to `size`, centre crop crop x crop (None: size) ->
    (resized width, height, crop left, top), rounded as CLIP's own Resize + CenterCrop round."""
    crop = size if crop is None else crop
    if W <= H:
        nw, nh = size, int(size * H / W)
    else:
        nw, nh = int(size * W / H), size
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    return nw, nh, left, top

def eval_transform(img, preprocess, draft=False):
    """A tower's eval transform. preprocess: an ImagePreprocess, or an int (CLIP's at that size).
    "shortest_side_crop" (CLIP): shortest side to size, centre crop crop_size x crop_size;
    "square" (SigLIP): the whole image to size x size. Both resample with the tower's filter, then
    normalise with its mean and std. draft=True: large JPEGs decode at a reduced scale first
    (_draft); the crop is the same region."""
    p = as_preprocess(preprocess)
    W, H = img.size
    c, rs = p.crop_size, _resample(p)
    if p.resize == "square":
        nw, nh, left, top = c, c, 0, 0
    else:
        nw, nh, left, top = eval_box(W, H, p.size, c)
    if draft:
        sx, sy = W / nw, H / nh
        box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
        small = _draft(img, box, c)
        if small is not box:
            return to_tensor(to_rgb(img).resize((c, c), rs, box=small), p.image_mean, p.image_std)
    img = to_rgb(img)
    img = img.resize((nw, nh), rs)  # Pillow returns a copy when the size already matches
    return to_tensor(img.crop((left, top, left + c, top + c)), p.image_mean, p.image_std)

def random_resized_crop_box(W, H, generator, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, right, bottom) of a random resized crop (area fraction in `scale`, aspect ratio
    in `ratio`, log-uniform). All randomness from `generator` (a torch.Generator). The usual
    RandomResizedCrop rule: 10 tries, then the centred crop of the largest in-range aspect ratio."""
    u = torch.rand(10, 4, generator=generator, dtype=torch.float64).tolist()  # area, aspect, x, y
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    for a, r, x, y in u:
        area = W * H * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = float(np.exp(lo + (hi - lo) * r))
        w, h = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < w <= W and 0 < h <= H:
            left, top = int(x * (W - w + 1)), int(y * (H - h + 1))  # uniform over every position
            return left, top, left + w, top + h
    w, h = W, H  # no try fit: the centred crop, its aspect ratio clamped into `ratio`
    if W / H > ratio[1]:
        w = int(round(H * ratio[1]))
    elif W / H < ratio[0]:
        h = int(round(W / ratio[0]))
    left, top = (W - w) // 2, (H - h) // 2
    return left, top, left + w, top + h

def train_transform(img, preprocess, generator, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3),
                    draft=False):
    """Random resized crop (random_resized_crop_box) resized to crop_size x crop_size with the
    tower's filter, normalised with its mean and std. preprocess: an ImagePreprocess, or an int
    (CLIP's at that size). A seed fixes the crop. For a "square" tower (SigLIP, whose eval squashes
    the whole image to a square) the aspect ratios in `ratio` are relative to the image's own, so
    crops are distorted as eval's squash distorts them, and scale = ratio = 1 is exactly its eval
    transform (as it is CLIP's for a square image). draft=True: large JPEGs decode at a reduced
    scale first; the crop is the same region."""
    p = as_preprocess(preprocess)
    W, H = img.size
    if p.resize == "square":
        ratio = (ratio[0] * W / H, ratio[1] * W / H)
    box = random_resized_crop_box(W, H, generator, scale, ratio)
    if draft:
        box = _draft(img, box, p.crop_size)
    img = to_rgb(img).resize((p.crop_size, p.crop_size), _resample(p), box=box)
    return to_tensor(img, p.image_mean, p.image_std)

# -----------------------------------------------------------------------------
# the image dataset

class ImageDataset(Dataset):
    """Images of a manifest, decoded with Pillow in DataLoader workers (files or tar members).

    item i -> (pixels (3, S, S) float32, the image index used, label (-1: none)), S the
    preprocessing's crop_size. Captions are not here: trainers pick them by the returned index
    (Manifest.rows, embedding cache).

    manifest: a manifest.Manifest (no records are held: the index is memory-mapped, lines read on
    demand). preprocess: the image tower's preprocessing (an ImagePreprocess: `tower.preprocess`),
    applied as eval_transform / train_transform say; or size=n: CLIP's preprocessing at n (size 224
    if neither). train=True: a random resized crop whose randomness depends only on (seed, epoch,
    i), never on the worker or the batch, so a resumed run sees the same crops. Call set_epoch(e)
    before iterating each epoch (before the DataLoader starts its workers: they copy the dataset),
    or ask for items (i, e). draft: JPEG draft decoding for large images (_draft); None (default) =
    for training only, so evaluation keeps CLIP's reference preprocessing exactly.

    A bad image (missing, or Pillow cannot decode it) raises ValueError naming the file (or shard
    and member) and the manifest line. With skip_bad=True it is replaced by the next image in
    manifest order that reads, so the returned index differs from the requested one; the replacement
    is a function of the files only (deterministic across workers, ranks and resumes). Each skipped
    image is marked in a shared-memory table every worker writes into, printed once to stderr, and
    listed by `skipped()`."""

    def __init__(self, manifest, size=None, train=False, seed=0, skip_bad=False, draft=None,
                 preprocess=None):
        if size is not None and preprocess is not None:
            raise ValueError("ImageDataset: give size= (CLIP's preprocessing at that size) or "
                             "preprocess=, not both")
        if not hasattr(manifest, "open_image"):
            raise TypeError("ImageDataset takes a manifest.Manifest (Manifest(path).check(...)), "
                            f"got {manifest!r:.80}")
        self.man, self.manifest = manifest, manifest.path
        self.preprocess = as_preprocess(preprocess if preprocess is not None else size or 224)
        self.size = self.preprocess.crop_size  # the side of every item
        self.train, self.seed, self.skip_bad = train, seed, skip_bad
        self.draft = train if draft is None else draft
        self.epoch = 0
        self.bad = torch.zeros(len(manifest), dtype=torch.bool).share_memory_() if skip_bad \
            else None  # shared by the DataLoader workers

    def __len__(self):
        return len(self.man)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def path(self, i):
        return self.man.image_name(i)

    def _load(self, i, epoch):
        img, _ = self.man.open_image(i)
        with img:
            if self.train:
                # from (seed, epoch, i) only: the same crop whatever the worker, batch, resume
                s = np.random.SeedSequence([self.seed, epoch, i]).generate_state(2)
                g = torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))
                return train_transform(img, self.preprocess, g, draft=self.draft)
            return eval_transform(img, self.preprocess, draft=self.draft)

    def __getitem__(self, i):
        epoch = self.epoch
        if isinstance(i, tuple):  # (i, epoch): that epoch's crop, whatever set_epoch said
            i, epoch = i
        i = int(i)
        for tries in range(min(len(self.man), 1000)):
            j = (i + tries) % len(self.man)
            if self.bad is not None and self.bad[j]:
                continue
            try:
                x = self._load(j, epoch)
            except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ...)
                msg = (f"{self.manifest}:{j + 1}: cannot read image {self.path(j)}: "
                       f"{type(e).__name__}: {e}")
                if not self.skip_bad:
                    raise ValueError(msg + " (Manifest.check(decode=True) finds every such fault; "
                                           "trainers' skip_bad=True replaces such images)") from e
                self.bad[j] = True
                print(f"skipping {msg}", file=sys.stderr)
                continue
            return x, j, self.man.label(j)
        raise ValueError(f"{self.manifest}: no readable image in the {tries + 1} lines from line "
                         f"{i + 1}")

    @property
    def n_skipped(self):
        return 0 if self.bad is None else int(self.bad.sum())

    def skipped(self):
        """(line, image) of every image skipped so far, in manifest order."""
        bad = [] if self.bad is None else self.bad.nonzero().flatten().tolist()
        return [(i + 1, self.path(i)) for i in bad]

def collate(batch):
    """DataLoader collate_fn for ImageDataset: (pixels (B, 3, S, S), index (B,), label (B,)); drops
    None items (ImageDataset gives none; callers' own datasets may)."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None

