"""
How a caption becomes an embedding: the caption template, tokenization that keeps the instruction
out of the pooling, mean pooling and `embed_texts`. And EmbedSpec, the one record of how an LLM
embeds captions, which travels with everything made from its embeddings:

    stage 1   merged/embedder.json  how stage 1 trained the LLM (checked by embed_cache, evaluate)
    cache     meta.json             how its rows were made (embed_cache.py)
    stage 2   text.json             the cache's spec: how the adaptor's inputs were made
    evaluate  embeds as text.json says, and refuses a cache whose meta.json says otherwise

Output conventions:
    mean_pool(hidden, mask)                  -> (B, D) fp32 mean over the tokens where mask == 1
    embed_texts(llm, tokenizer, texts, ...)  -> (N, D) fp32, L2-normalised, in the order of texts
"""

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# pooling

def mean_pool(hidden, mask):
    """(B, T, D), (B, T) 0/1 -> (B, D) fp32: mean over the tokens where mask is 1 (fp32 whatever the
    model's dtype, so a bf16 model's embedding is not rounded before it is normalised and
    stored)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)

def skip_instruction(attention_mask, n_instruction):
    """The pooling mask that drops the first n_instruction[i] real tokens of each row (LLM2Vec's
    "skip instruction": the instruction is attended to but not pooled). Works with padding on either
    side."""
    n = torch.as_tensor(n_instruction, device=attention_mask.device).reshape(-1, 1)
    real = attention_mask.bool()
    rank = attention_mask.long().cumsum(-1)  # 1 for the first real token, 2 for the next, ...
    return (real & (rank > n)).to(attention_mask.dtype)

# Caption templates: how a chat model sees a caption. LLM2CLIP's code (through LLM2Vec) wraps every
# caption of a Llama-3-Instruct model in a user turn written out by hand (not apply_chat_template),
# in stage 1, in the embedding cache and in evaluation alike; the tokenizer adds <|begin_of_text|>
# in front.
LLAMA3_TEMPLATE = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"  # the official string
# LLM2Vec's wrap for Qwen2; SmolLM2-Instruct's chat format
CHATML_TEMPLATE = "<|im_start|>user\n{}<|im_end|>"

def caption_template(tokenizer, setting="auto"):
    """The caption template that `setting` means for this tokenizer: a format string with one "{}",
    or "" for none. "auto": LLAMA3_TEMPLATE when the vocabulary has <|start_header_id|>,
    <|end_header_id|> and <|eot_id|>; else CHATML_TEMPLATE when it has <|im_start|> and <|im_end|>;
    else "" (no chat format). "none" or "": no wrap. Anything else is a template, used as given (it
    must hold "{}" exactly once)."""
    if setting in ("", "none"):
        return ""
    if setting == "auto":
        vocab = tokenizer.get_vocab()  # added (special) tokens included
        if all(t in vocab for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
            return LLAMA3_TEMPLATE
        if all(t in vocab for t in ("<|im_start|>", "<|im_end|>")):
            return CHATML_TEMPLATE
        return ""
    if setting.count("{}") != 1:
        raise ValueError(f"caption template {setting!r}: expected 'auto', 'none', or a format "
                         f"string with one '{{}}' where the caption goes")
    return setting

# how a Llama embeds: LLM2Vec's bidirectional mask, or the decoder's own
ATTENTION = ("bidirectional", "causal")

def tokenize_for_embedding(tokenizer, texts, instruction="", max_length=512, template=""):
    """Texts -> (token id lists, prefix lengths). A row is
        [BOS if the tokenizer adds one] + head + instruction + caption + tail
    where template = head + "{}" + tail (a setting of caption_template: "auto" is resolved here;
    "" = no wrap; the scripts pass their `template` setting, "auto" by default). The prefix (BOS,
    head, instruction) is attended to but left out of the pooling by `skip_instruction`; the
    caption's tokens and the tail are pooled (LLM2CLIP pools Llama 3's <|eot_id|>), so queries (with
    an instruction) and keys (without) pool the same kind of tokens, never BOS, the chat header or
    the instruction (LLM2Vec's rule). Over max_length the caption loses its last tokens and the tail
    is kept (the official code cuts the whole string, tail included: a difference only for captions
    over max_length). Inside a template the caption is stripped of surrounding whitespace, as the
    official wrap does. The pieces are tokenized apart; for the two chat templates that gives the
    ids of the whole string (they meet at special tokens and newlines, where Llama 3's and SmolLM2's
    pre-tokenizers split anyway)."""
    template = caption_template(tokenizer, template)
    head, tail = template.split("{}") if template else ("", "")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    probe = tokenizer("a")["input_ids"]
    bos = ([tokenizer.bos_token_id]
           if tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id else [])
    head_ids, tail_ids, instr = enc(head), enc(tail), enc(instruction)
    if bos and head_ids[:1] == bos:
        raise ValueError(f"caption template {template!r} starts with the BOS token, which the "
                         f"tokenizer adds itself: leave it out of the template")
    prefix = bos + head_ids + instr
    room = max_length - len(prefix) - len(tail_ids)
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for the caption after the "
                         f"template and the instruction")
    if template:
        texts = [t.strip() for t in texts]
    # with an instruction the caption follows it after a space, as in the text "instruction caption"
    captions = tokenizer([" " + t if instruction else t for t in texts],
                         add_special_tokens=False)["input_ids"]
    ids = [prefix + c[:room] + tail_ids for c in captions]
    return ids, [len(prefix)] * len(ids)

def pad_batch(ids, pad_id=0, device=None):
    """Token id lists -> (input_ids, attention_mask), right-padded to the longest."""
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return input_ids.to(device), mask.to(device)

@torch.no_grad()
def embed_texts(llm, tokenizer, texts, instruction="", max_length=512, batch_size=64, template=""):
    """Mean-pooled, L2-normalised fp32 embeddings (N, D) of texts, in their order, each caption
    wrapped in `template` (see tokenize_for_embedding and caption_template). Batches are formed from
    length-sorted texts (little padding); the result does not depend on the order of `texts`'s rows
    beyond that batching. Identical texts are embedded once (the demo's short captions repeat
    ~45x)."""
    template = caption_template(tokenizer, template)  # resolved once, not per batch
    uniq = list(dict.fromkeys(texts))
    if len(uniq) < len(texts):
        where = {t: i for i, t in enumerate(uniq)}
        out = embed_texts(llm, tokenizer, uniq, instruction, max_length, batch_size, template)
        return out[torch.tensor([where[t] for t in texts], device=out.device)]
    ids, n_prefix = tokenize_for_embedding(tokenizer, texts, instruction, max_length, template)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    dev = llm.embed_tokens.weight.device
    out = torch.empty(len(ids), llm.config.hidden_size, dtype=torch.float32, device=dev)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in rows], device=dev)
        pooled = mean_pool(llm(input_ids, mask),
                           skip_instruction(mask, [n_prefix[i] for i in rows]))
        out[torch.tensor(rows, device=dev)] = F.normalize(pooled.float(), dim=-1)
    return out

# -----------------------------------------------------------------------------
# EmbedSpec: how an LLM embeds captions, one record in every file that depends on it

POOLING = ("mean",)  # the mean over the caption's tokens (skip_instruction), the only pooling here

@dataclass(frozen=True)
class EmbedSpec:
    """How an LLM turns a caption into a vector: the same model with other settings gives other
    vectors, silently. The fields sit at the top level of embedder.json, a cache's meta.json and a
    stage-2 text.json. The defaults are what every version did before the field was recorded
    (meta.json before template and attention, text.json before all three); read_spec fills them
    in."""
    instruction: str                  # before each caption, attended to, not pooled; "" = none
    max_length: int                   # tokens per caption (BOS, template and instruction included)
    template: str = ""                # the resolved caption_template; "" = no wrap
    attention: str = "bidirectional"  # one of ATTENTION
    pooling: str = "mean"             # one of POOLING

    def __post_init__(self):
        t = self.template
        want = {"instruction": (isinstance(self.instruction, str), "a string"),
                "max_length": (isinstance(self.max_length, int) and self.max_length > 0,
                               "a positive integer"),
                "template": (t == "" or isinstance(t, str) and t.count("{}") == 1,
                             "'' or a string with one '{}'"),
                "attention": (self.attention in ATTENTION, f"one of {ATTENTION}"),
                "pooling": (self.pooling in POOLING, f"one of {POOLING}")}
        for k, (ok, expected) in want.items():
            if not ok:
                raise ValueError(f"{k} {getattr(self, k)!r}: expected {expected}")

FIELDS = tuple(f.name for f in fields(EmbedSpec))

def put_spec(record, spec):
    """The JSON record `record` (a dict) with the spec's fields added: what embedder.json, meta.json
    and text.json are written from."""
    return {**record, **asdict(spec)}

def read_spec(path, fix=""):
    """(EmbedSpec, the whole record) of a JSON file written through put_spec: embedder.json, a
    cache's meta.json or a stage-2 text.json. Fields an older file lacks take EmbedSpec's defaults,
    in the returned record too. A missing file, one that does not parse, lacks instruction or
    max_length (every version wrote both) or holds a bad value: an error naming the file and the
    key, then `fix` (what to do)."""
    tail = f"; {fix}" if fix else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file{tail}")
    try:
        with open(path) as f:
            rec = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: does not parse ({e}){tail}") from None
    need = ("instruction", "max_length")
    missing = [k for k in need if k not in rec] if isinstance(rec, dict) else list(need)
    if missing:
        raise ValueError(f"{path}: no key {missing[0]!r} (not a record of how an LLM embeds "
                         f"captions){tail}")
    try:
        spec = EmbedSpec(**{k: rec[k] for k in FIELDS if k in rec})
    except ValueError as e:
        raise ValueError(f"{path}: {e}{tail}") from None
    return spec, put_spec(rec, spec)

def check_spec(want, want_src, got, got_src, keys=FIELDS, fix=""):
    """Refuse `got` if it differs from `want` in one of `keys`: a ValueError naming the source of
    each (a file, or "this run"), the key and both values, then `fix` ({key}, {want} filled in)."""
    for k in keys:
        a, b = getattr(want, k), getattr(got, k)
        if a != b:
            note = (" (a template setting is compared as the string it resolves to)"
                    if k == "template" else "")
            raise ValueError(f"{got_src} has {k} {b!r}, but {want_src} has {k} {a!r}{note}"
                             + (f"; {fix.format(key=k, want=a)}" if fix else ""))

EMBEDDER_JSON = "embedder.json"  # beside a stage-1 LLM: its EmbedSpec

def check_embedder(path, spec):
    """Refuse to embed with `spec` an LLM folder that stage 1 trained with another attention,
    template or pooling (its embedder.json; a folder without one, a raw LLM, accepts any). The
    instruction and max length are each use's own: stage 1 puts its instruction on queries only."""
    f = os.path.join(path, EMBEDDER_JSON)
    if os.path.isfile(f):
        check_spec(read_spec(f)[0], f"{f} (how stage 1 trained this LLM)", spec, "this run",
                   ("attention", "template", "pooling"), fix="set {key}={want!r}")
