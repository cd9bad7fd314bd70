"""embedder.EmbedSpec, the one record of how an LLM embeds captions: written into a JSON record
(put_spec), read back (read_spec: older files with the defaults of the fields they lack, bad
files named), two specs checked against each other (check_spec: both sources, key, values)."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from embedder import EmbedSpec, check_embedder, check_spec, put_spec, read_spec  # noqa: E402

CHATML = "<|im_start|>user\n{}<|im_end|>"

def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)

def test_round_trip(tmp_path):
    spec = EmbedSpec("find it", 77, CHATML, "causal")
    f = write(tmp_path / "meta.json", put_spec({"model": "m", "dim": 32}, spec))
    got, record = read_spec(f)
    assert got == spec
    assert record == {"model": "m", "dim": 32, "instruction": "find it", "max_length": 77,
                      "template": CHATML, "attention": "causal", "pooling": "mean"}

def test_older_files_read_with_the_defaults(tmp_path):
    # a text.json from before template, attention and pooling were recorded: no wrap, bidirectional
    f = write(tmp_path / "text.json", {"llm": "m", "instruction": "", "max_length": 512})
    spec, record = read_spec(f)
    assert spec == EmbedSpec("", 512, "", "bidirectional", "mean")
    assert (record["template"], record["attention"], record["llm"]) == ("", "bidirectional", "m")

def test_bad_files_are_named(tmp_path):
    f = write(tmp_path / "a.json", {"max_length": 512})  # every version wrote the instruction
    with pytest.raises(ValueError, match=rf"{f}: no key 'instruction'"):
        read_spec(f)
    f = write(tmp_path / "b.json", {"instruction": "", "max_length": 512, "attention": "sideways"})
    with pytest.raises(ValueError, match=rf"{f}: attention 'sideways': expected one of "
                                         rf"\('bidirectional', 'causal'\)"):
        read_spec(f)
    f = write(tmp_path / "c.json", '{"instruction": ')
    with pytest.raises(ValueError, match=rf"{f}: does not parse \(.*\); rebuild it"):
        read_spec(f, fix="rebuild it")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/none.json: no such file"):
        read_spec(str(tmp_path / "none.json"))

def test_check_names_both_sources_the_key_and_both_values():
    want, got = EmbedSpec("", 512, CHATML), EmbedSpec("", 512, "")
    check_spec(want, "a/text.json", want, "b/meta.json")  # the same: nothing to say
    with pytest.raises(ValueError) as e:
        check_spec(want, "a/text.json", got, "b/meta.json", fix="use {key}={want!r}")
    assert str(e.value) == (f"b/meta.json has template '', but a/text.json has template {CHATML!r} "
                            f"(a template setting is compared as the string it resolves to); "
                            f"use template={CHATML!r}")
    check_spec(want, "a", EmbedSpec("other", 512, CHATML), "b", keys=("template",))  # only keys

def test_check_embedder(tmp_path):
    check_embedder(str(tmp_path), EmbedSpec("", 512, "", "causal"))  # no embedder.json: any spec
    stage1 = EmbedSpec("Given a caption", 512, CHATML, "causal")
    write(tmp_path / "embedder.json", put_spec({}, stage1))
    check_embedder(str(tmp_path), EmbedSpec("", 64, CHATML, "causal"))  # instruction: each use's
    with pytest.raises(ValueError, match=rf"this run has attention 'bidirectional', but {tmp_path}/"
                                         rf"embedder.json \(how stage 1 trained this LLM\) has "
                                         rf"attention 'causal'; set attention='causal'"):
        check_embedder(str(tmp_path), EmbedSpec("", 512, CHATML))
