"""
Any model this project can evaluate, as a joint-space encoder: images and texts in, L2-normalised
float32 rows out, comparable by a dot product. One call loads it:

    from encoder import load_encoder
    enc = load_encoder("out/demo/llm2clip/model")   # stage 2 (LLM2CLIP or ProCLIP) + its LLM
    enc = load_encoder("out/demo/base_clip/model")  # an HF CLIP folder: its own text tower
    img = enc.encode_images(["a.png", pil_image])   # (N, D) float32, rows of norm 1
    txt = enc.encode_texts(["Oben links: ein Hemd in Gelb; ..."])  # (M, D), any language
    logits = enc.logit_scale * txt @ img.T          # (+ enc.logit_bias for a SigLIP model)

The kinds of folder, told apart by their files (model_kind):
  * stage 2 (train_stage2.py's model/: adaptor.json + text.json): the image tower, and for text
    normalize(adaptor(e)), e the mean-pooled embedding of the LLM that text.json names, made with
    the instruction, max length, caption template and attention text.json records (embedder.py);
    `llm=` gives the LLM's folder if it is not where text.json says (its fingerprint is checked
    against text.json's either way). A relative LLM path in text.json is relative to the folder
    the stage-2 run was started in: tried from here, then from that folder (the model's path less
    the run's out_dir/model).
    The LLM runs in `dtype`; by default in the dtype of the cache the adaptor trained on
    (text.json's config.cache, its meta.json), else fp32 on a CPU and bf16 on a GPU. Its
    embeddings are rounded to float16 as a cache stores them (as_cached): the adaptor sees what it
    trained on, and a caption embeds the same whether its LLM embedding is computed now or read
    from a cache made in the same dtype (the demo's R@1 through this module equals evaluate.py's
    over its caches).
  * an HF CLIP folder (model_type "clip", with its tokenizer): its ViT and its own text tower,
    texts truncated to its context like CLIP.
  * an HF Llama folder has no image tower: refused here (evaluate.py's caption-to-caption mode
    reads it).
Images (PIL images, paths, or a manifest.Manifest) get the tower's own eval preprocessing
(images.eval_transform with tower.preprocess). evaluate.py embeds through this module: the same
classes, the same batching, the same adaptor call on cached LLM embeddings (StageTwoText.joint).
"""

import json
import os

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import embedder as EM
import llama as LM
import model as M
from images import ImageDataset, collate, eval_transform
from train_common import model_fingerprint

DTYPES = ("float32", "bfloat16", "float16")

def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"

def _autocast(device):
    """bf16 autocast for the towers and the adaptor on GPUs (as in training); none on a CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))

def _chunks(n, size, desc):
    starts = range(0, n, size)
    return tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2)

def model_kind(path):
    """"stage2", "clip" or "llama", from the folder's files."""
    if (os.path.isfile(os.path.join(path, "adaptor.json")) and
            os.path.isfile(os.path.join(path, "text.json"))):
        return "stage2"
    cfg_path = os.path.join(path, "config.json")
    mt = None
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            mt = json.load(f).get("model_type")
        if mt in ("clip", "llama"):
            return mt
        if mt in ("siglip", "siglip_vision_model"):
            raise ValueError(f"model={path!r}: an HF SigLIP folder (model_type {mt!r}). "
                             f"A SigLIP model with its own text tower is not supported (model.py "
                             f"implements SigLIP's image tower only); a SigLIP model is "
                             f"evaluated as a stage-2 model: its image tower plus an adaptor "
                             f"over an LLM (train_stage2.py's output folder, with adaptor.json "
                             f"and text.json)")
    found = f"config.json has model_type {mt!r}" if os.path.isfile(cfg_path) else \
        ("not a directory" if not os.path.isdir(path) else "no config.json")
    raise ValueError(f"model={path!r}: not a model folder this project knows ({found}); expected "
                     f"a stage-2 output (adaptor.json + text.json + config.json), an HF CLIP "
                     f"folder (model_type 'clip') or an HF Llama folder (model_type 'llama')")

# -----------------------------------------------------------------------------
# images: the tower's own preprocessing, then the tower, normalised

@torch.no_grad()
def embed_pixels(tower, pixels, device):
    """(B, 3, S, S) preprocessed pixels -> (B, D) float32, L2-normalised."""
    with _autocast(device):
        e = tower(pixels.to(device))
    return F.normalize(e.float(), dim=-1)

def load_pixels(image, preprocess):
    """A PIL image or a path -> (3, S, S) float32 pixels as the tower expects (eval_transform: the
    image decoded to RGB, resized and cropped as `preprocess` says, normalised). A file that
    cannot be read: ValueError naming it."""
    if isinstance(image, Image.Image):
        return eval_transform(image, preprocess)
    try:
        with Image.open(image) as img:
            return eval_transform(img, preprocess)
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ...)
        raise ValueError(f"cannot read image {image}: {type(e).__name__}: {e}") from e

@torch.no_grad()
def image_embeddings(tower, man, device, rows=None, batch_size=64, num_workers=0):
    """(N, D) L2-normalised embeddings of the images of a Manifest (or of its records `rows`), in
    order, each preprocessed as its tower expects (CLIP: shortest side and centre crop; SigLIP: a
    square resize)."""
    ds = ImageDataset(man, preprocess=tower.preprocess, train=False)
    if rows is not None:
        ds = torch.utils.data.Subset(ds, rows)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate,
                                         num_workers=num_workers)
    return torch.cat([embed_pixels(tower, pixels, device)
                      for pixels, _, _ in tqdm(loader, desc="images", leave=False)])

# -----------------------------------------------------------------------------
# the text side of each kind of model: texts -> joint-space embeddings

class CLIPText:
    """CLIP's own text tower: texts truncated to its context like CLIP."""

    def __init__(self, path, device, batch_size=64):
        self.tower = M.CLIPTextTower.from_pretrained(path).to(device).eval()
        self.tok, self.device, self.batch_size = M.load_tokenizer(path), device, batch_size

    @torch.no_grad()
    def __call__(self, texts):
        out, bs = [], self.batch_size
        for s in _chunks(len(texts), bs, "text tower"):
            ids, mask = self.tower.tokenize(self.tok, texts[s:s + bs])
            with _autocast(self.device):
                e = self.tower(ids.to(self.device), mask.to(self.device))
            out.append(F.normalize(e.float(), dim=-1))
        return torch.cat(out)

def run_path(path, info, name):
    """A path a stage-2 run recorded in text.json (its LLM, its cache), for use here: as written if
    it exists (or is absolute); a relative one that does not exist here, from the folder the run
    was started in (the model's path with the run's out_dir/model taken off its end)."""
    if os.path.exists(name) or os.path.isabs(name):
        return name
    run_dir = (info.get("config") or {}).get("out_dir", "")
    tail = os.path.normpath(os.path.join(run_dir, "model")).split(os.sep) if run_dir else []
    parts = os.path.abspath(path).split(os.sep)
    if tail and parts[-len(tail):] == tail:
        there = os.path.join(os.sep.join(parts[:-len(tail)]) or os.sep, name)
        if os.path.exists(there):
            return there
    return name

def trained_dtype(path, info):
    """The LLM dtype of the cache the adaptor trained on (its meta.json's compute_dtype), or None
    when text.json names no cache or it is not there."""
    cache = (info.get("config") or {}).get("cache", "")
    meta = os.path.join(run_path(path, info, cache), "meta.json") if cache else ""
    if not os.path.isfile(meta):
        return None
    with open(meta) as f:
        return json.load(f).get("compute_dtype")

def as_cached(e):
    """LLM embeddings (a tensor or an array) as the adaptor was trained on them: rounded to
    float16 (the cache's rows), renormalised in float32. A cache's rows pass unchanged but for the
    renormalisation, so the embedding of a caption is the same whether the LLM runs now or ran
    for a cache."""
    return F.normalize(torch.as_tensor(e).to(torch.float16).float(), dim=-1)

class StageTwoText:
    """normalize(adaptor(e)), e the LLM's normalised mean-pooled embedding, made as text.json says;
    the LLM is loaded on first use (a cache's rows go through `joint` alone)."""

    def __init__(self, path, device, llm=None, dtype=None, batch_size=64):
        # how the adaptor's training embeddings were made (an older text.json: read_spec's defaults)
        self.spec, self.info = EM.read_spec(os.path.join(path, "text.json"))
        self.path, self.llm_path = path, llm or run_path(path, self.info, self.info["llm"])
        if not os.path.isdir(self.llm_path):
            raise FileNotFoundError(f"{self.llm_path}: the LLM of {path}/text.json is not there; "
                                    f"pass --llm=<its folder>")
        # the adaptor was trained on this LLM's embeddings: another one (e.g. via --llm) means
        # garbage
        if model_fingerprint(self.llm_path) != self.info["llm_sha256"]:
            raise ValueError(f"{self.llm_path}: not the LLM {path} was trained with "
                             f"(its fingerprint differs from llm_sha256 in {path}/text.json)")
        self.adaptor = M.Adaptor.from_pretrained(path).to(device).eval()
        # by default the dtype its training embeddings were made in: the same embeddings
        self.dtype = dtype or trained_dtype(path, self.info) or \
            ("bfloat16" if str(device).startswith("cuda") else "float32")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        self.device, self.batch_size, self.llm = device, batch_size, None

    def llm_embed(self, texts):
        """(N, D_llm) float32, L2-normalised: the LLM's embeddings of texts, as text.json says."""
        if self.llm is None:
            self.llm = (LM.Llama.from_pretrained(self.llm_path, dtype=getattr(torch, self.dtype),
                                                 causal=self.spec.attention == "causal")
                        .to(self.device).eval())
            self.tok = M.load_tokenizer(self.llm_path)
        bs, sp = self.batch_size, self.spec
        chunk = 16 * bs
        return as_cached(torch.cat([EM.embed_texts(self.llm, self.tok, texts[s:s + chunk],
                                                   sp.instruction, sp.max_length, bs, sp.template)
                                    for s in _chunks(len(texts), chunk, "LLM")]))

    @torch.no_grad()
    def joint(self, e):
        """LLM embeddings (N, D_llm), computed or read from a cache -> (N, D) joint, normalised."""
        with _autocast(self.device):
            return F.normalize(self.adaptor(e.to(self.device)).float(), dim=-1)

    def __call__(self, texts):
        return self.joint(self.llm_embed(texts))

# -----------------------------------------------------------------------------
# the one call

class Encoder:
    """An image tower and a text side in one joint space (load_encoder builds it).
    encode_images / encode_texts -> (N, D) float32 rows of norm 1; logit_scale: the multiplier
    exp(log s) of the cosine (None if the folder has none); logit_bias: SigLIP's, else None."""

    def __init__(self, path, kind, tower, text, device, batch_size=64, num_workers=0):
        self.path, self.kind, self.tower, self.text = path, kind, tower, text
        self.device, self.batch_size, self.num_workers = device, batch_size, num_workers
        s, b = M.read_logit_scale(path), M.read_logit_bias(path)
        self.logit_scale = None if s is None else float(s.float().exp())
        self.logit_bias = None if b is None else float(b)

    @property
    def preprocess(self):
        """The image tower's ImagePreprocess (images.py)."""
        return self.tower.preprocess

    @property
    def dim(self):
        return self.tower.embed_dim

    def encode_pixels(self, pixels):
        """(B, 3, S, S) pixels from load_pixels -> (B, D)."""
        return embed_pixels(self.tower, pixels, self.device)

    def encode_images(self, images):
        """PIL images or paths (a list), or a manifest.Manifest -> (N, D), in their order."""
        if hasattr(images, "open_image"):
            return image_embeddings(self.tower, images, self.device, None, self.batch_size,
                                    self.num_workers)
        images, bs = list(images), self.batch_size
        out = [self.encode_pixels(torch.stack([load_pixels(x, self.preprocess)
                                               for x in images[s:s + bs]]))
               for s in _chunks(len(images), bs, "images")]
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def encode_texts(self, texts):
        """Texts (a list of str, any language) -> (N, D), in their order."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of texts, got one string")
        return self.text(list(texts))

def load_encoder(path, llm=None, device=None, dtype=None, batch_size=64, num_workers=0):
    """The Encoder of a stage-2 folder (LLM2CLIP or ProCLIP; `llm`: its LLM if not where text.json
    says) or of an HF CLIP folder. device: default cuda if there is one; dtype: the LLM's compute
    dtype (default: that of the adaptor's training cache, else bf16 on a GPU, fp32 on a CPU);
    batch_size: images or texts per forward;
    num_workers: DataLoader processes decoding a manifest's images."""
    device = device or default_device()
    kind = model_kind(path)
    if kind == "llama":
        raise ValueError(f"model={path!r}: an LLM alone (model_type 'llama') has no image tower; "
                         f"load a stage-2 folder (the LLM is read from its text.json) or an HF "
                         f"CLIP folder")
    if llm and kind != "stage2":
        raise ValueError(f"llm={llm!r} is for stage-2 models; {path} is an HF {kind} folder")
    text = (StageTwoText(path, device, llm, dtype, batch_size) if kind == "stage2"
            else CLIPText(path, device, batch_size))
    tower = M.load_image_tower(path).to(device).eval()
    return Encoder(path, kind, tower, text, device, batch_size, num_workers)
