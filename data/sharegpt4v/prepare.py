r"""
ShareGPT4V-1k -> a manifest for 1:1 long-caption retrieval (docs/design.md, Evaluation): the first 1,000
entries of ShareGPT4V's Share-Captioner file, one image and one long caption each.

Run (one process, about a second: only the start of the 1.2M-entry file is read):
    python data/sharegpt4v/prepare.py --root=/data/sharegpt4v --out=/data/eval/sharegpt4v

In:  <root>/share-captioner_coco_lcs_sam_1246k_1107.json, a JSON array of
       {"id": ..., "image": "coco/train2017/000000000009.jpg",
        "conversations": [{"from": "human", "value": "<image>\n..."}, {"from": "gpt", "value": caption}]}
     and the images under <root> at the entries' "image" paths (<root>/coco/train2017/..., ...).
     (--ann=<file> names the JSON if it lies elsewhere; --images=<folder> if the image paths are
     relative to another folder than <root>.)
Out: <out>/test.jsonl   one record per entry, in the file's order:
       {"image": "<absolute path>", "captions": {"long": [the gpt turn's text]}}
     Image paths are absolute, to the images where they lie under <root>: nothing is copied.
Protocol: strict 1:1 (one caption per image, plain argmax retrieval), 1,000 images.

What the official evaluations do, and what we do (read in their public code):
  * Long-CLIP (train/sharegpt4v.py, share4v_val_dataset) and LLM2CLIP (data/extract_eval_embedding.py)
    both take json[:1000], the caption conversations[1]["value"] and the image <data folder>/<"image">,
    the data folder being the one that holds the JSON. We do the same, with <root> as that folder.
  * Long-CLIP replaces every "\n" in the caption by a space; LLM2CLIP keeps the text as is. We replace
    newlines by spaces (the Long-CLIP protocol, where ShareGPT4V-1k comes from) and strip surrounding
    whitespace; the count of captions that had newlines is printed.
  * The entries after the first 1,000 are ShareGPT4V's training part (Long-CLIP trains on json[1000:]);
    they are not even read: the array is parsed incrementally up to entry `n`.
Checked per entry: "image" a string and the file present, conversations[1] a {"from": "gpt", "value":
non-empty string}; a fault names the file and the entry index, and nothing is written. An image that
appears in two entries is kept twice (both references do) and counted. Not confirmed against the real
file here (none downloaded): that the first 1,000 entries are all COCO images.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import benchmarks as B

# -----------------------------------------------------------------------------
root = ""    # the ShareGPT4V data folder (holds the JSON and coco/, sam/, llava/, ... image folders)
out = ""     # where test.jsonl goes
ann = ""     # the Share-Captioner JSON ("" = find it under root)
images = ""  # the folder the entries' image paths are relative to ("" = root)
n = 1000     # the first n entries are the evaluation set
decode = False  # also decode every image with Pillow before publishing (slower)
overwrite = False  # True: replace outputs this converter did not write (or that were edited)
# -----------------------------------------------------------------------------
CANDIDATES = ("share-captioner_coco_lcs_sam_1246k_1107.json",)
CHUNK = 1 << 20  # characters read at a time while parsing the head of the array
MAX_ENTRY = 64 << 20  # an entry is a few KB: one still unparsed after this many characters is broken


def head_of_array(path, count):
    """The first `count` items of a top-level JSON array, parsed incrementally: the file holds 1.2M
    long captions, and json.load would hold all of them in memory to return 1,000. Returns fewer items
    if the array is shorter."""
    dec = json.JSONDecoder()
    items, buf, pos, eof = [], "", 0, False
    with open(path, encoding="utf-8") as f:
        def need(k):  # make sure buf[pos:] holds at least k characters, unless the file has ended
            nonlocal buf, pos, eof
            while len(buf) - pos < k and not eof:
                chunk = f.read(CHUNK)
                eof = not chunk
                buf, pos = buf[pos:] + chunk, 0
        def skip_space():
            nonlocal pos
            while True:
                need(1)
                if pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                else:
                    return buf[pos] if pos < len(buf) else ""
        if skip_space() != "[":
            sys.exit(f"{path}: expected a JSON array, starts with {buf[pos:pos + 40]!r}")
        pos += 1
        while len(items) < count:
            c = skip_space()
            if c == "]":
                break
            if items:
                if c != ",":
                    sys.exit(f"{path}: malformed JSON after entry {len(items) - 1}: expected ',' or ']', got {c!r}")
                pos += 1
                skip_space()
            while True:  # decode one item, reading more of the file while it is cut off
                try:
                    item, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if eof or len(buf) - pos > MAX_ENTRY:
                        sys.exit(f"{path}: malformed JSON in entry {len(items)}: {e}")
                    need(len(buf) - pos + CHUNK)
            items.append(item)
            pos = end
    return items


if __name__ == "__main__":
    B.configure(globals())
    path = B.find_input(root, ann, CANDIDATES, "ShareGPT4V Share-Captioner JSON")
    folder = images or root
    entries = head_of_array(path, n)
    faults, records, newlines = [], [], 0
    for i, e in enumerate(B.progress(entries, "sharegpt4v")):
        where = f"entry {i}"
        if not isinstance(e, dict) or "image" not in e or "conversations" not in e:
            faults.append(f"{where}: expected an object with 'image' and 'conversations', got {e!r:.80}")
            continue
        where = f"entry {i} (id {e.get('id')!r}, image {e['image']!r})"
        img = B.image_at(folder, e["image"], where, faults)
        conv = e["conversations"]
        turn = conv[1] if isinstance(conv, list) and len(conv) >= 2 else None
        if not isinstance(turn, dict) or turn.get("from") != "gpt" or not isinstance(turn.get("value"), str) \
                or not turn["value"].strip():
            faults.append(f"{where}: conversations[1] must be {{\"from\": \"gpt\", \"value\": <caption>}}, "
                          f"got {turn if turn is not None else conv!r:.80}")
            continue
        newlines += "\n" in turn["value"]
        if img:
            records.append({"image": img, "captions": {"long": [turn["value"].replace("\n", " ").strip()]}})
    B.stop_if(faults, path)
    notes = [f"read the first {len(entries)} entries of {path} (the rest, ShareGPT4V's training part, not read)",
             f"captions with newlines (replaced by spaces): {newlines}"]
    if len(entries) < n:
        notes.append(f"note: the array has only {len(entries)} entries, fewer than n={n}")
    dup = len(records) - len({r["image"] for r in records})
    if dup:
        notes.append(f"note: {dup} entries repeat an earlier entry's image (kept: one record per entry)")
    written = B.write_manifest(out, "test.jsonl", records, fields=["long"], decode=decode)
    B.report(notes, written, records, ["long"])
