"""Caption templates: each caption wrapped as the official LLM2CLIP code feeds Llama 3 (through LLM2Vec),
embedder.caption_template's "auto" rule, and the pooling rule around a template: the prefix (BOS, the
template's head, the instruction) attended to but never pooled, the caption and the template's tail
(<|eot_id|>, as the official code pools it) pooled, truncation cutting the caption and never the tail.
Tokenizers are tiny copies of the real ones' shape (tests/chat_tokenizers.py); the real SmolLM2 tokenizer
is checked too when data/smollm2/hf exists."""

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import embedder as EM  # noqa: E402
import llama as LM  # noqa: E402
import model as M  # noqa: E402
from chat_tokenizers import chatml_tokenizer, llama3_tokenizer  # noqa: E402
from tiny import ROOT, word_tokenizer  # noqa: E402

# written out here, not imported: the test pins the official strings
LLAMA3 = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"  # LLM2Vec's Llama-3-Instruct wrap
CHATML = "<|im_start|>user\n{}<|im_end|>"                              # LLM2Vec's Qwen2 wrap
INSTR = "Given a caption, retrieve a similar relevant caption."
CAPTIONS = ["A red shirt on the left of a small blue bag.", "  the large white coat \n", "boot", "a"]

@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    llama3_tokenizer(str(root / "llama3"))
    chatml_tokenizer(str(root / "chatml"))
    word_tokenizer(str(root / "plain"))
    return {k: M.load_tokenizer(str(root / k)) for k in ("llama3", "chatml", "plain")}

def enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]

def test_auto_resolves_by_vocabulary(toks, tmp_path):
    assert EM.caption_template(toks["llama3"], "auto") == LLAMA3
    assert EM.caption_template(toks["chatml"], "auto") == CHATML
    assert EM.caption_template(toks["plain"], "auto") == ""
    for tok in toks.values():
        assert EM.caption_template(tok, "none") == "" and EM.caption_template(tok, "") == ""
        assert EM.caption_template(tok, "Caption: {}.") == "Caption: {}."  # anything with one {} as given
    for bad in ("a caption", "{} and {}", "Auto"):
        with pytest.raises(ValueError, match=f"caption template '{bad}': expected 'auto', 'none', or a format string"):
            EM.caption_template(toks["plain"], bad)
    # the rule is the vocabulary: a word-level tokenizer gains the Llama 3 wrap with its three tokens only
    word_tokenizer(str(tmp_path))
    tok = M.load_tokenizer(str(tmp_path))
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>"], special_tokens=True)
    assert EM.caption_template(tok, "auto") == ""
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    assert EM.caption_template(tok, "auto") == CHATML
    tok.add_tokens(["<|eot_id|>"], special_tokens=True)
    assert EM.caption_template(tok, "auto") == LLAMA3  # Llama 3's wins when both are there

@pytest.mark.parametrize("kind", ["llama3", "chatml"])
def test_ids_are_the_official_string(toks, kind):
    """Tokenized in pieces, each row equals the tokenization of the whole official string: BOS (Llama 3's
    tokenizer adds it, SmolLM2's adds none) + head + [instruction + " "] + caption.strip() + tail."""
    tok, tpl = toks[kind], {"llama3": LLAMA3, "chatml": CHATML}[kind]
    head, tail = tpl.split("{}")
    keys, _ = EM.tokenize_for_embedding(tok, CAPTIONS, template="auto")
    queries, _ = EM.tokenize_for_embedding(tok, CAPTIONS, INSTR, template="auto")
    for c, k, q in zip(CAPTIONS, keys, queries):
        assert k == tok(head + c.strip() + tail)["input_ids"]
        assert q == tok(head + INSTR + " " + c.strip() + tail)["input_ids"]
    first = tok.bos_token_id if kind == "llama3" else tok.convert_tokens_to_ids("<|im_start|>")
    assert keys[0][0] == first and keys[0][1] != first  # one BOS, never two

@pytest.mark.parametrize("kind", ["llama3", "chatml", "plain"])
def test_pooled_span_is_caption_and_tail(toks, kind):
    tok = toks[kind]
    tpl = EM.caption_template(tok, "auto")
    head, tail = tpl.split("{}") if tpl else ("", "")
    keys, nk = EM.tokenize_for_embedding(tok, CAPTIONS, template="auto")
    queries, nq = EM.tokenize_for_embedding(tok, CAPTIONS, INSTR, template="auto")
    bos = keys[0][:len(keys[0]) - len(enc(tok, head + CAPTIONS[0].strip() + tail))]  # [] or [BOS]
    for c, k, n, q, m in zip(CAPTIONS, keys, nk, queries, nq):
        c = c.strip() if tpl else c
        # pooled: exactly the caption's tokens and the tail (LLM2Vec's embed mask for this string)
        assert k[n:] == enc(tok, c + tail)
        assert kind == "plain" or tok.decode(k[n:]) == c + tail  # (the word-level one decodes to <unk>s)
        # attended, not pooled: BOS, the head and, for queries, the instruction: and nothing else
        assert k[:n] == bos + enc(tok, head)
        # an instruction changes only the prefix: the head is followed by the instruction's tokens, and the
        # pooled span is the same caption (after a space, as in the official "instruction caption" text)
        assert q[:m] == bos + enc(tok, head) + enc(tok, INSTR)
        assert q[m:] == enc(tok, " " + c + tail)
    if kind == "plain":  # a whitespace tokenizer has no space-marked tokens: the pooled ids are identical
        assert [q[m:] for q, m in zip(queries, nq)] == [k[n:] for k, n in zip(keys, nk)]
    # what embed_texts pools, through pad_batch and skip_instruction: the same spans
    ids, mask = EM.pad_batch(queries + keys)
    pool = EM.skip_instruction(mask, nq + nk)
    assert pool.sum(1).tolist() == [len(x) - n for x, n in zip(queries + keys, nq + nk)]

@pytest.mark.parametrize("kind", ["llama3", "chatml"])
def test_truncation_cuts_the_caption_and_keeps_the_tail(toks, kind):
    tok = toks[kind]
    tail = enc(tok, EM.caption_template(tok, "auto").split("{}")[1])
    long = " ".join(["a red shirt and a blue bag"] * 30)
    for instruction in ("", INSTR):
        full, n = EM.tokenize_for_embedding(tok, [long], instruction, 10 ** 6, "auto")
        cut, n2 = EM.tokenize_for_embedding(tok, [long], instruction, n[0] + len(tail) + 7, "auto")
        assert n2 == n and len(cut[0]) == n[0] + len(tail) + 7
        assert cut[0] == full[0][:n[0] + 7] + tail  # the prefix, the caption's first 7 tokens, the whole tail
        with pytest.raises(ValueError, match=f"max_length {n[0] + len(tail)} leaves no room for the caption "
                                             f"after the template and the instruction"):
            EM.tokenize_for_embedding(tok, [long], instruction, n[0] + len(tail), "auto")

def test_no_template_is_unchanged_and_bos_is_not_doubled(toks):
    for tok in toks.values():
        plain = EM.tokenize_for_embedding(tok, CAPTIONS, INSTR)  # the default: no wrap, captions as given
        assert EM.tokenize_for_embedding(tok, CAPTIONS, INSTR, template="none") == plain
        bos = [tok.bos_token_id] if tok("a")["input_ids"][0] == tok.bos_token_id else []
        assert plain[0][1] == bos + enc(tok, INSTR) + enc(tok, " " + CAPTIONS[1])
    with pytest.raises(ValueError, match="starts with the BOS token, which the tokenizer adds itself"):
        EM.tokenize_for_embedding(toks["llama3"], ["a"], template="<|begin_of_text|>" + LLAMA3)
    # SmolLM2-like: <|im_start|> is its bos_token, but the tokenizer adds none, so the ChatML head may start with it
    EM.tokenize_for_embedding(toks["chatml"], ["a"], template=CHATML)

@pytest.mark.parametrize("kind", ["llama3", "chatml"])
def test_embed_texts_pools_caption_and_tail(toks, kind):
    """embed_texts (length-sorted padded batches) equals, caption by caption alone, the mean of the hidden
    states over the last len(caption + tail) tokens of the official string (LLM2Vec's pooling)."""
    tok = toks[kind]
    head, tail = EM.caption_template(tok, "auto").split("{}")
    torch.manual_seed(0)
    cfg = LM.LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    llm = LM.Llama(cfg).eval()
    texts = CAPTIONS + ["a small green dress"]
    for instruction in ("", INSTR):
        got = EM.embed_texts(llm, tok, texts, instruction, batch_size=3, template="auto")
        for i, c in enumerate(texts):
            body = (instruction + " " if instruction else "") + c.strip()
            ids = torch.tensor([tok(head + body + tail)["input_ids"]])
            k = len(enc(tok, (" " if instruction else "") + c.strip() + tail))
            with torch.no_grad():
                want = F.normalize(llm(ids)[0, -k:].mean(0), dim=-1)
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    # the template is part of the embedding: without it the same captions embed differently
    wrapped = EM.embed_texts(llm, tok, texts, template="auto")
    assert (EM.embed_texts(llm, tok, texts, template="none") - wrapped).abs().max() > 1e-2

def test_real_smollm2_tokenizer():
    """SmolLM2-135M-Instruct's own tokenizer (when data/smollm2/prepare.py has run): auto is ChatML, and the
    pieces give the ids of the whole official string."""
    path = os.path.join(ROOT, "data", "smollm2", "hf")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        pytest.skip("data/smollm2/hf not prepared")
    tok = M.load_tokenizer(path)
    assert EM.caption_template(tok, "auto") == CHATML
    ids, n = EM.tokenize_for_embedding(tok, CAPTIONS, INSTR, template="auto")
    for c, x, k in zip(CAPTIONS, ids, n):
        assert x == tok("<|im_start|>user\n" + INSTR + " " + c.strip() + "<|im_end|>")["input_ids"]
        assert tok.decode(x[k:]) == " " + c.strip() + "<|im_end|>"

def test_missing_tokenizer_folder_is_named(tmp_path):
    """A path that is not a folder is refused naming it (transformers would call it a bad hub repo id)."""
    with pytest.raises(FileNotFoundError, match="no_such_llm"):
        M.load_tokenizer(str(tmp_path / "no_such_llm"))
