"""
Flickr30k 1K test (Karpathy split) -> a manifest for multi-caption retrieval (docs/design.md, Evaluation).

Run (one process, a few seconds; the images are not read, only checked to exist):
    python data/flickr30k/prepare.py --root=/data/flickr30k --out=/data/eval/flickr30k

In:  <root>/flickr30k-images/<id>.jpg (the Flickr30k images) and one caption file, found under <root>:
       flickr30k_test.json | test.json | annotations/test.json   BLIP's file, a JSON array of
           {"image": "flickr30k-images/<id>.jpg", "caption": [5 strings]} (LLM2CLIP's eval renames it test.json)
       dataset_flickr30k.json   Karpathy's, {"images": [{"filename": "<id>.jpg", "split", "sentences":
           [{"raw": ...}, ...]}, ...]}: only split == "test" is kept, images at flickr30k-images/<filename>
     (--ann=<file> names it if it has another name; --images=<folder> if the image paths in it are
     relative to another folder than <root>.)
Out: <out>/test.jsonl   one record per image, in the file's order:
       {"image": "<absolute path>", "captions": {"short": [every caption of the image]}}
     Image paths are absolute, to the images where they lie under <root>: nothing is copied.
Protocol: multi-caption recall (an image->text hit if any of its captions is in the top k); 1,000 images,
5,000 captions. Captions are kept as written (surrounding whitespace stripped); BLIP's evaluation
lower-cases them and drops punctuation on the fly, we leave text processing to the tokenizer.

Confirmed from public code: the BLIP file's shape and that its image paths start with
"flickr30k-images/" (BLIP-derived loaders join them to the Flickr30k root; LLM2CLIP's
setup_eval_datasets.sh downloads it as flickr30k/test.json beside flickr30k-images/). Karpathy's field
names (filename, split, sentences[].raw) from loaders that read it. Not confirmed against the real
files here (none downloaded): the counts (1,000 / 5,000) are printed as a check, not enforced.
Every entry is checked before anything is written; a missing image or a malformed entry is reported
with the file and the entry index, and nothing is written.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import benchmarks as B

# -----------------------------------------------------------------------------
root = ""    # the Flickr30k folder as downloaded (holds flickr30k-images/ and the caption file)
out = ""     # where test.jsonl goes
ann = ""     # the caption file ("" = find it under root)
images = ""  # the folder the caption file's image paths are relative to ("" = root)
decode = False  # also decode every image with Pillow before publishing (slower)
overwrite = False  # True: replace outputs this converter did not write (or that were edited)
# -----------------------------------------------------------------------------
CANDIDATES = ("flickr30k_test.json", "test.json", "annotations/test.json", "annotations/flickr30k_test.json",
              "dataset_flickr30k.json")
EXPECTED = (1000, 5000)  # images, captions of the 1K test split

if __name__ == "__main__":
    B.configure(globals())
    path = B.find_input(root, ann, CANDIDATES, "Flickr30k caption file")
    # Karpathy's entries name the file only; BLIP's carry the folder: both resolve under root
    records, notes = B.blip_or_karpathy(path, images or root, "short", karpathy_dir="flickr30k-images")
    n_caps = sum(len(r["captions"]["short"]) for r in records)
    if (len(records), n_caps) != EXPECTED:
        notes.append(f"note: {len(records)} images and {n_caps} captions; the 1K test split has "
                     f"{EXPECTED[0]} and {EXPECTED[1]}")
    written = B.write_manifest(out, "test.jsonl", records, fields=["short"], decode=decode)
    B.report(notes, written, records, ["short"])
