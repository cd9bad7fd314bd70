"""
Urban1k -> a manifest for 1:1 long-caption retrieval (docs/design.md, Evaluation): 1,000 urban scenes, one
long caption each.

Run (one process, about a second; the images are not read, only checked to exist):
    python data/urban1k/prepare.py --root=/data/Urban1k --out=/data/eval/urban1k

In:  <root>/image/<i>.jpg and <root>/caption/<i>.txt for i = 1..1000 (Urban1k.zip unpacked; <root> is
     the Urban1k folder inside it).
Out: <out>/test.jsonl   one record per i, in the order 1, 2, ..., 1000:
       {"image": "<absolute path of image/<i>.jpg>", "captions": {"long": [the caption]}}
     Image paths are absolute, to the images where they lie under <root>: nothing is copied.
Protocol: strict 1:1 (one caption per image, plain argmax retrieval).

What the official evaluations do, and what we do (read in their public code): Long-CLIP
(eval/retrieval/Urban1k.py) and LLM2CLIP (data/extract_eval_embedding.py, i = 1..1000) pair caption/<i>.txt
with image/<i>.jpg and take the file's first line, readlines()[0], newline included. We take the first
line without its newline and surrounding whitespace. A caption file with more text after its first line
keeps only the first line, as theirs do; how many files had such text is printed (not confirmed here
whether any real file has it: the data were not downloaded).
The ids are the caption files' names: every caption/<i>.txt must be a whole number, the ids must run
1..N without a gap, each needs its image/<i>.jpg, and an image without a caption is an error too; each
fault names the file, and nothing is written. Hidden files (.DS_Store, ...) are skipped and counted.
N other than 1,000 is printed as a note.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import benchmarks as B

# -----------------------------------------------------------------------------
root = ""  # the Urban1k folder (holds image/ and caption/)
out = ""   # where test.jsonl goes
decode = False  # also decode every image with Pillow before publishing (slower)
overwrite = False  # True: replace outputs this converter did not write (or that were edited)
# -----------------------------------------------------------------------------
EXPECTED = 1000


def listing(folder, ext, faults):
    """{id: file name} of folder/<id><ext>; other names are faults, hidden files are counted."""
    ids, hidden = {}, 0
    if not os.path.isdir(folder):
        sys.exit(f"{folder}: not a folder (expected Urban1k's image/ and caption/ under --root)")
    for name in sorted(os.listdir(folder)):
        stem, e = os.path.splitext(name)
        if name.startswith("."):
            hidden += 1
        elif e != ext or not stem.isdigit() or stem != str(int(stem)):
            faults.append(f"{os.path.join(folder, name)}: expected <i>{ext} with i a whole number")
        else:
            ids[int(stem)] = name
    return ids, hidden


if __name__ == "__main__":
    B.configure(globals())
    faults = []
    cap_dir, img_dir = os.path.join(root, "caption"), os.path.join(root, "image")
    caps, hidden_c = listing(cap_dir, ".txt", faults)
    imgs, hidden_i = listing(img_dir, ".jpg", faults)
    top = max(caps, default=0)
    for i in range(1, top + 1):
        if i not in caps:
            faults.append(f"{os.path.join(cap_dir, f'{i}.txt')}: caption file not found (ids run 1..{top})")
        elif i not in imgs:
            faults.append(f"{os.path.join(img_dir, f'{i}.jpg')}: image file not found (for caption {i}.txt)")
    faults += [f"{os.path.join(img_dir, imgs[i])}: image without a caption/{i}.txt" for i in sorted(imgs) if i not in caps]
    if not caps:
        faults.append(f"{cap_dir}: no caption files")
    records, more_lines = [], 0
    for i in B.progress(sorted(caps), "urban1k"):
        path = os.path.join(cap_dir, caps[i])
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")  # readlines()' lines (splitlines would also cut at \u2028 etc.)
        except UnicodeDecodeError as e:
            faults.append(f"{path}: not UTF-8 text ({e})")
            continue
        if not lines or not lines[0].strip():
            faults.append(f"{path}: the first line is empty (the caption is the first line)")
            continue
        more_lines += any(line.strip() for line in lines[1:])
        records.append({"image": os.path.abspath(os.path.join(img_dir, f"{i}.jpg")), "captions": {"long": [lines[0].strip()]}})
    B.stop_if(faults, root)
    notes = [f"read {len(caps)} caption files under {cap_dir}",
             f"caption files with text after their first line (not used, as in the official evaluations): {more_lines}"]
    if hidden_c or hidden_i:
        notes.append(f"skipped hidden files: {hidden_c} in caption/, {hidden_i} in image/")
    if len(records) != EXPECTED:
        notes.append(f"note: {len(records)} pairs; Urban1k has {EXPECTED}")
    written = B.write_manifest(out, "test.jsonl", records, fields=["long"], decode=decode)
    B.report(notes, written, records, ["long"])
