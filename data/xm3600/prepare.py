"""
Crossmodal-3600 (XM3600) -> a manifest for multilingual multi-caption retrieval (docs/design.md, Evaluation):
3,600 images, captions in 36 languages, one caption field per language.

Run (one process, a few seconds; the images are not read, only checked to exist):
    python data/xm3600/prepare.py --root=/data/xm3600 --out=/data/eval/xm3600

In:  <root>/captions.jsonl (captions.zip unpacked), one JSON object a line, one line per image:
       {"image/key": "<hex id>", "ar": {"caption": [strings], ...}, "bn": {...}, ..., "zh": {...}}
     and the images at <root>/images/<image/key>.jpg (images.tgz unpacked into images/).
     (--ann=<file> names the captions file if it lies elsewhere; --images=<folder> if the images are
     in another folder than <root>/images.)
Out: <out>/test.jsonl   one record per line, in the file's order:
       {"image": "<absolute path>", "captions": {"ar": [...], "bn": [...], ..., "zh": [...]}}
     The caption fields are the language codes, each with every caption of that language (XM3600 has
     one or more per image and language). Image paths are absolute: nothing is copied.
Protocol: multi-caption recall per language; evaluate.py's `multilingual` takes the codes as fields.

A language is a top-level key whose value is an object with a "caption" list; its other entries
(tokenised captions, if any) are not used. Other top-level keys besides "image/key" are counted
and printed. Every line must have the same languages as the first (a missing one is a fault naming the
line, the key and the language); captions are stripped of surrounding whitespace.

Confirmed from public code: the captions.jsonl shape, "image/key", <lang>["caption"], images/<key>.jpg,
and the 36 language codes (big_vision's and clip-benchmark's XM3600 readers; clip-benchmark keeps only the
first caption of a language, big_vision all of them, as we do). Not found: LLM2CLIP's own multilingual
evaluation code is not public (its repository has no XM3600 reader), so how it picks captions is
unknown; we keep all. Not confirmed against the real file here (none downloaded): whether every image
has every language (a gap is reported as a fault, not filled).
"""
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import benchmarks as B

# -----------------------------------------------------------------------------
root = ""    # the XM3600 folder (holds captions.jsonl and images/)
out = ""     # where test.jsonl goes
ann = ""     # the captions file ("" = find it under root)
images = ""  # the image folder ("" = root/images)
decode = False  # also decode every image with Pillow before publishing (slower)
overwrite = False  # True: replace outputs this converter did not write (or that were edited)
# -----------------------------------------------------------------------------
CANDIDATES = ("captions.jsonl",)
EXPECTED = (3600, 36)  # images, languages


def languages_of(entry):
    return sorted(k for k, v in entry.items() if isinstance(v, dict) and "caption" in v)


if __name__ == "__main__":
    B.configure(globals())
    path = B.find_input(root, ann, CANDIDATES, "XM3600 captions file")
    folder = images or os.path.join(root, "images")
    faults, records, langs, other_keys, blank = [], [], None, {}, 0
    lines = B.read_lines(path, faults)
    for n, line in enumerate(B.progress(lines, "xm3600"), 1):
        where = f"line {n}"
        if line is None:  # not UTF-8: a fault already
            continue
        if not line.strip():
            blank += 1
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            faults.append(f"{where}: malformed JSON ({err})")
            continue
        if not isinstance(e, dict) or not isinstance(e.get("image/key"), str) or not e["image/key"]:
            faults.append(f"{where}: expected an object with a string 'image/key', got {line!r:.80}")
            continue
        key = e["image/key"]
        where = f"line {n} (image/key {key!r})"
        found = languages_of(e)
        if langs is None:
            langs = found
            if not langs:
                faults.append(f"{where}: no language (a key whose value is {{\"caption\": [...]}})")
        if found != langs:
            missing, extra = sorted(set(langs) - set(found)), sorted(set(found) - set(langs))
            faults.append(f"{where}: languages differ from the first line's: "
                          + "; ".join(s for s in (f"missing {', '.join(missing)}" if missing else "",
                                                  f"extra {', '.join(extra)}" if extra else "") if s))
            continue
        for k in e:
            if k != "image/key" and k not in found:
                other_keys[k] = other_keys.get(k, 0) + 1
        caps = {lang: B.caption_list(e[lang]["caption"], where, faults, key=f"{lang}.caption") for lang in langs}
        img = B.image_at(folder, f"{key}.jpg", where, faults)
        if img and all(caps.values()):
            records.append({"image": img, "captions": caps})
    B.no_duplicates(records, lambda i: f"record {i}", faults)
    if not records and not faults:
        faults.append("no lines")
    B.stop_if(faults, path)
    langs = langs or []
    notes = [f"read {path}: {len(records)} images, {len(langs)} languages: {', '.join(langs)}"]
    if other_keys:
        notes.append("top-level keys not used: " + ", ".join(f"{k} ({v} lines)" for k, v in sorted(other_keys.items())))
    if blank:
        notes.append(f"skipped {blank} blank lines")
    if (len(records), len(langs)) != EXPECTED:
        notes.append(f"note: {len(records)} images and {len(langs)} languages; XM3600 has {EXPECTED[0]} and {EXPECTED[1]}")
    written = B.write_manifest(out, "test.jsonl", records, fields=langs, decode=decode)
    B.report(notes, written, records, langs)
