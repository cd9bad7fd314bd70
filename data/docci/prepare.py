"""
DOCCI test split -> a manifest for 1:1 long-caption retrieval (docs/design.md, Evaluation): 5,000 images, one
long human-written description each.

Run (one process, a few seconds; the images are not read, only checked to exist):
    python data/docci/prepare.py --root=/data/docci --out=/data/eval/docci

In:  <root>/docci_descriptions.jsonlines, one JSON object a line:
       {"example_id": "test_00001", "split": "test", "image_file": "test_00001.jpg", "description": "...", ...}
     and the images at <root>/images/<image_file> (docci_images.tar.gz unpacked).
     (--ann=<file> names the descriptions file if it lies elsewhere; --images=<folder> if the images
     are in another folder than <root>/images.)
Out: <out>/test.jsonl   one record per line of split `split` ("test"), in the file's order:
       {"image": "<absolute path>", "captions": {"long": [description]}}
     Image paths are absolute, to the images where they lie: nothing is copied.
Protocol: strict 1:1 (one caption per image, plain argmax retrieval). The whole test split, 5,000
images, as LLM2CLIP's evaluation code reads it (data/extract_eval_embedding.py keeps every line with
split == "test"); the LLM2CLIP paper's text speaks of 1.5K images, which we could not trace to any file
or code: we use the 5,000 and say so. Lines of the other splits are counted and printed.

Confirmed from public code: the field names split, image_file and description (example_id only names
entries in error messages), the split name "test" and the image folder images/ (LLM2CLIP's eval_datasets.yaml: img_root
docci/images/). Descriptions are kept as written, surrounding whitespace stripped. Not confirmed against
the real file here (none downloaded): the split sizes (5,000 test images is printed as a check, not
enforced). Every line is checked (JSON, the three fields, and for kept lines the image file) before
anything is written; each fault names the file and the line, and nothing is written.
"""
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import benchmarks as B

# -----------------------------------------------------------------------------
root = ""    # the DOCCI folder (holds docci_descriptions.jsonlines and images/)
out = ""     # where test.jsonl goes
ann = ""     # the descriptions file ("" = find it under root)
images = ""  # the image folder ("" = root/images)
split = "test"  # the split to keep
decode = False  # also decode every image with Pillow before publishing (slower)
overwrite = False  # True: replace outputs this converter did not write (or that were edited)
# -----------------------------------------------------------------------------
CANDIDATES = ("docci_descriptions.jsonlines",)
EXPECTED = 5000  # images in the test split
FIELDS = ("split", "image_file", "description")

if __name__ == "__main__":
    B.configure(globals())
    path = B.find_input(root, ann, CANDIDATES, "DOCCI descriptions file")
    folder = images or os.path.join(root, "images")
    faults, records, splits, blank = [], [], {}, 0
    lines = B.read_lines(path, faults)
    for n, line in enumerate(B.progress(lines, "docci"), 1):
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
        if not isinstance(e, dict):
            faults.append(f"{where}: expected a JSON object, got {type(e).__name__}")
            continue
        bad = [k for k in FIELDS if not isinstance(e.get(k), str) or not e[k].strip()]
        if bad:
            faults.append(f"{where} (example_id {e.get('example_id')!r}): {', '.join(bad)} must be non-empty strings, "
                          f"got {', '.join(f'{k}={e.get(k)!r:.40}' for k in bad)}")
            continue
        splits[e["split"]] = splits.get(e["split"], 0) + 1
        if e["split"] != split:
            continue
        img = B.image_at(folder, e["image_file"], f"{where} (example_id {e['example_id']!r})", faults)
        records.append({"image": img, "captions": {"long": [e["description"].strip()]}})
    B.no_duplicates(records, lambda i: f"kept record {i}", faults)
    if not records and not faults:
        faults.append(f"no line has split {split!r} (splits found: {', '.join(sorted(splits)) or 'none'})")
    B.stop_if(faults, path)
    notes = [f"read {path}: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())),
             f"kept split {split!r}; left out: " + (", ".join(f"{k} {v}" for k, v in sorted(splits.items()) if k != split) or "none")]
    if blank:
        notes.append(f"skipped {blank} blank lines")
    if split == "test" and len(records) != EXPECTED:
        notes.append(f"note: {len(records)} test images; DOCCI's test split has {EXPECTED}")
    written = B.write_manifest(out, "test.jsonl", records, fields=["long"], decode=decode)
    B.report(notes, written, records, ["long"])
