"""
COCO 5K test (Karpathy split) -> a manifest for multi-caption retrieval (docs/design.md, Evaluation).

Run (one process, a few seconds; the images are not read, only checked to exist):
    python data/coco/prepare.py --root=/data/coco --out=/data/eval/coco

In:  <root>/val2014/COCO_val2014_<12 digits>.jpg (the COCO 2014 val images; the Karpathy test split is
     5,000 of them) and one caption file, found under <root>:
       coco_karpathy_test.json | annotations/coco_karpathy_test.json   BLIP's file, a JSON array of
           {"image": "val2014/COCO_val2014_<12 digits>.jpg", "caption": [5 or more strings], "image_id"?}
       dataset_coco.json   Karpathy's, {"images": [{"filepath": "val2014", "filename", "split",
           "sentences": [{"raw": ...}, ...]}, ...]}: only split == "test" is kept
     (--ann=<file> names it if it has another name; --images=<folder> if the image paths in it are
     relative to another folder than <root>, e.g. LLM2CLIP's layout <root>/images/val2014/.)
Out: <out>/test.jsonl   one record per image, in the file's order:
       {"image": "<absolute path>", "captions": {"short": [every caption of the image]}}
     Image paths are absolute, to the images where they lie under <root>: nothing is copied.
Protocol: multi-caption recall over 5,000 images and 25,010 captions. Some images have six captions or
more and every one is kept, in order (a ragged list per image). Read in their public code: Long-CLIP's
COCO evaluation (eval/retrieval/coco.py) uses val2017 and cuts every image to its first 5 captions;
LLM2CLIP's feature extraction (data/extract_eval_embedding.py) reshapes the flat caption embeddings to
(-1, len(first image's captions), D), which misaligns captions and images as soon as the counts differ
(25,010 captions at 5 a row make 5,002 rows for 5,000 images). Neither is the 5K/25,010 protocol, so we
follow the data. Captions keep their text; only surrounding whitespace is stripped (some COCO captions
end in a space).

Confirmed from public code: the BLIP file's shape and its "val2014/COCO_val2014_..." image paths (LLM2CLIP's
setup_eval_datasets.sh downloads it and its eval joins them to an image root); Karpathy's field names.
Not confirmed against the real files here (none downloaded): the counts (5,000 / 25,010) are printed
as a check, not enforced. Every entry is checked before anything is written; a missing image or a
malformed entry is reported with the file and the entry index, and nothing is written.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import benchmarks as B

# -----------------------------------------------------------------------------
root = ""    # the COCO folder as downloaded (holds val2014/ and the caption file)
out = ""     # where test.jsonl goes
ann = ""     # the caption file ("" = find it under root)
images = ""  # the folder the caption file's image paths are relative to ("" = root)
decode = False  # also decode every image with Pillow before publishing (slower)
overwrite = False  # True: replace outputs this converter did not write (or that were edited)
# -----------------------------------------------------------------------------
CANDIDATES = ("coco_karpathy_test.json", "annotations/coco_karpathy_test.json", "dataset_coco.json")
EXPECTED = (5000, 25010)  # images, captions of the 5K test split

if __name__ == "__main__":
    B.configure(globals())
    path = B.find_input(root, ann, CANDIDATES, "COCO caption file")
    records, notes = B.blip_or_karpathy(path, images or root, "short")
    n_caps = sum(len(r["captions"]["short"]) for r in records)
    more = sum(len(r["captions"]["short"]) > 5 for r in records)
    notes.append(f"images with more than 5 captions (all kept): {more}")
    if (len(records), n_caps) != EXPECTED:
        notes.append(f"note: {len(records)} images and {n_caps} captions; the 5K test split has "
                     f"{EXPECTED[0]} and {EXPECTED[1]}")
    written = B.write_manifest(out, "test.jsonl", records, fields=["short"], decode=decode)
    B.report(notes, written, records, ["short"])
