"""Tiny tokenizers shaped like two real chat tokenizers, built in seconds (no hub): byte-level BPE trained
on a few sentences, with the special tokens and pre-tokenization of the real ones.

- llama3_tokenizer: Llama 3's pre-tokenizer regex (tiktoken's cl100k pattern) + byte-level, BOS
  <|begin_of_text|> added by a template post-processor, the chat tokens <|start_header_id|>,
  <|end_header_id|>, <|eot_id|> (and <|end_of_text|>), no pad token: as Llama-3.2-1B-Instruct's
  tokenizer.json and the tokenizer files LLM2CLIP's released LLM ships.
- chatml_tokenizer: GPT-2-style byte-level BPE with <|im_start|>, <|im_end|> and no BOS added, as
  SmolLM2-Instruct's (whose bos_token is <|im_start|>, never added by the tokenizer).
"""

import transformers

from tiny import WORDS

# Llama 3's split pattern (from its tokenizer.json; the same as tiktoken's cl100k_base)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [" ".join(WORDS), "Given a caption, retrieve a similar relevant caption.", "user assistant system",
          "A red shirt on the left of a small blue bag.", "The large white coat, with black boots!",
          "user\n\nA green dress\n\n"] * 20

def _train(tk, special, vocab_size=400):
    from tokenizers import decoders, trainers
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return tk

def llama3_tokenizer(path):
    """Save a Llama-3-like tokenizer to `path`; returns its vocabulary size."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    _train(tk, special)
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                                               eos_token="<|eot_id|>")  # no pad token, as the real one
    tok.save_pretrained(path)
    return tk.get_vocab_size()

def chatml_tokenizer(path):
    """Save a SmolLM2-like tokenizer (ChatML special tokens, no BOS added) to `path`; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    _train(tk, special)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                               pad_token="<|im_end|>")
    tok.save_pretrained(path)
    return tk.get_vocab_size()
