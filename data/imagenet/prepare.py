"""
ImageNet-1k validation set -> a labelled manifest and the class names and prompts for zero-shot
classification (docs/design.md, Evaluation).

Set up once (clip-benchmark is read by path, never imported; its dependencies are not needed):
    pip install --no-deps clip-benchmark==1.6.2

Run (one process, a few seconds for 50,000 images; they are not read, only checked to exist):
    python data/imagenet/prepare.py --root=/data/imagenet --out=/data/eval/imagenet

In, one of two layouts (the first that applies):
  * flat + val_map.txt: <root>/val_map.txt, one line per image "<name> <label>" (tab or spaces; label
    0..999, the standard class index), the images at <root>/val/<name> if <root>/val/ is a folder, else
    <root>/<name>. This is the zipped-ImageNet layout LLM2CLIP's evaluation reads (val.zip + val_map.txt,
    after Swin Transformer's); unpack val.zip into <root>/val/ first: the manifest needs plain files.
  * ImageFolder: <root>/val/<wnid>/*.JPEG (or <root>/<wnid>/*.JPEG when there is no val/ folder), the
    usual layout after sorting the val tarball into class folders; label = the wnid's index in the 1000
    ImageNet-1k wnids sorted (the standard class index: folders in sorted order). Entries of a
    class folder that are not .jpeg/.jpg/.png files, and files or hidden folders beside the class
    folders, are counted and printed; any other folder there (not one of the 1000 wnids) is a fault.
  (--images=<folder> names the folder holding the images or class folders, if it is neither of these.)
Out: <out>/val.jsonl           one record per image: {"image": "<absolute path>", "label": <0..999>}
                               (val_map.txt's order, or by class then file name); nothing is copied
     <out>/classes.json        {"classes": [1000 names], "templates": [the 80 OpenAI ImageNet prompts],
                               "wnids": [1000 wnids]}: evaluate.py --classes=... (its {"classes", "templates"})
     <out>/classes_single.json the same names with the one prompt "a photo of the {}."
Protocol: zero-shot top-1/top-5 with both prompt sets, class names x templates embedded and averaged.

Read by path from clip-benchmark (datasets/): en_classnames.json["imagenet1k"] (1,000 class names),
en_zeroshot_classification_templates.json["imagenet1k"] (80 templates, "{c}" turned into the "{}"
evaluate.py formats), and the sorted wnid list all_imagenet_wordnet_ids of builder.py (parsed with ast,
not imported). Compared while writing this with LLM2CLIP's training/imagenet_zeroshot_data.py
(imagenet_classnames, openai_imagenet_template): the same 1,000 names and 80 templates, in the same order. The val_map.txt
format ("ILSVRC2012_val_00000001.JPEG<TAB>65") is Swin Transformer's documented one; LLM2CLIP's reader
splits each line on whitespace into name and int label. Not confirmed against real files here (no
ImageNet downloaded): 50,000 images and 1,000 classes are printed as a check, not enforced.
"""
import ast
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import benchmarks as B

# -----------------------------------------------------------------------------
root = ""    # the ImageNet folder (holds val/ or val_map.txt)
out = ""     # where val.jsonl, classes.json and classes_single.json go
images = ""  # the folder holding the images (flat) or the class folders ("" = root/val, else root)
single = "a photo of the {}."  # the one prompt of classes_single.json (the single-template protocol)
decode = False  # also decode every image with Pillow before publishing (minutes for 50,000)
overwrite = False  # True: replace outputs this converter did not write (or that were edited)
# -----------------------------------------------------------------------------
INSTALL = "pip install --no-deps clip-benchmark==1.6.2"
OUTPUTS = ("val.jsonl", "classes.json", "classes_single.json")  # checked before any work
EXPECTED = (50000, 1000)  # images, classes
IMAGE_EXTS = (".jpeg", ".jpg", ".png")


def clip_benchmark_file(name):
    spec = importlib.util.find_spec("clip_benchmark")  # finds, does not execute, its __init__
    path = spec and os.path.join(spec.submodule_search_locations[0], "datasets", name)
    if not path or not os.path.isfile(path):
        sys.exit(f"clip-benchmark's datasets/{name} not found; install it with: {INSTALL}")
    return path


def imagenet_spec():
    """(wnids, class names, 80 templates with "{}") of ImageNet-1k, from clip-benchmark's files."""
    with open(clip_benchmark_file("en_classnames.json"), encoding="utf-8") as f:
        names = json.load(f)["imagenet1k"]
    with open(clip_benchmark_file("en_zeroshot_classification_templates.json"), encoding="utf-8") as f:
        templates = [t.replace("{c}", "{}") for t in json.load(f)["imagenet1k"]]
    builder = clip_benchmark_file("builder.py")
    wnids = None
    for node in ast.parse(Path(builder).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "all_imagenet_wordnet_ids" for t in node.targets):
            wnids = ast.literal_eval(node.value)
    assert wnids is not None, f"{builder}: no all_imagenet_wordnet_ids list"
    assert len(wnids) == len(set(wnids)) == len(names) == 1000 and wnids == sorted(wnids), "unexpected clip-benchmark data"
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates), "unexpected clip-benchmark templates"
    return wnids, names, templates


def from_val_map(map_path, folder, faults):
    """Records from val_map.txt: "<name> <label>" per line, names relative to `folder`."""
    lines = B.read_lines(map_path, faults)
    records, blank = [], 0
    for n, line in enumerate(B.progress(lines, "val_map.txt"), 1):
        if line is None:  # not UTF-8: a fault already
            continue
        parts = line.split()
        if not parts:
            blank += 1
            continue
        where = f"line {n}"
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            faults.append(f"{where}: expected '<image name> <label>', got {line!r:.80}")
            continue
        label = int(parts[1])
        if not 0 <= label < 1000:
            faults.append(f"{where} ({parts[0]}): label {label} is not in 0..999")
            continue
        img = B.image_at(folder, parts[0], f"{where} ({parts[0]})", faults)
        records.append({"image": img, "label": label})
    notes = [f"read {map_path} ({len(records)} images; images under {folder})"]
    if blank:
        notes.append(f"skipped {blank} blank lines")
    return records, notes


def from_image_folder(folder, wnids, faults):
    """Records from folder/<wnid>/<image>: label = the wnid's index in the sorted 1000."""
    index = {w: i for i, w in enumerate(wnids)}
    classes, loose = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isdir(path) or name.startswith("."):
            loose.append(name)
        elif name not in index:
            faults.append(f"{path}: not an ImageNet-1k class folder (expected a wnid such as n01440764)")
        else:
            classes.append(name)
    records, skipped, empty = [], [], []
    for w in B.progress(classes, "classes"):
        n = len(records)
        for name in sorted(os.listdir(os.path.join(folder, w))):
            path = os.path.join(folder, w, name)
            if os.path.isfile(path) and name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
                records.append({"image": os.path.abspath(path), "label": index[w]})
            else:
                skipped.append(os.path.join(w, name))
        if len(records) == n:
            empty.append(w)
    if not classes and not faults:
        faults.append(f"{folder}: no class folders (<wnid>/) and no val_map.txt under --root")
    notes = [f"read {folder}: {len(classes)} class folders, {len(records)} images"]
    if loose:
        notes.append(f"not used: {len(loose)} files or hidden folders beside the class folders ({', '.join(loose[:5])}{', ...' if len(loose) > 5 else ''})")
    if empty:
        notes.append(f"note: {len(empty)} class folders hold no image ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''})")
    if skipped:
        notes.append(f"not used: {len(skipped)} non-image entries in class folders ({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})")
    return records, notes


if __name__ == "__main__":
    B.configure(globals())
    if single.count("{}") != 1:
        sys.exit(f"--single={single!r}: needs one '{{}}' for the class name")
    wnids, names, templates = imagenet_spec()
    faults = []
    map_path = os.path.join(root, "val_map.txt")
    folder = images or (os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else root)
    if os.path.isfile(map_path):
        records, notes = from_val_map(map_path, folder, faults)
        source = map_path
        if faults and os.path.isfile(os.path.join(root, "val.zip")):
            source += f" (is {os.path.join(root, 'val.zip')} unpacked into {os.path.join(root, 'val')}/?)"
    else:
        records, notes = from_image_folder(folder, wnids, faults)
        source = folder
    B.no_duplicates(records, lambda i: f"record {i}", faults)
    B.stop_if(faults, source)
    n_classes = len({r["label"] for r in records})
    if (len(records), n_classes) != EXPECTED:
        notes.append(f"note: {len(records)} images of {n_classes} classes; the ImageNet-1k val set has "
                     f"{EXPECTED[0]} of {EXPECTED[1]}")
    written = B.write_manifest(out, "val.jsonl", records, label=True, decode=decode)
    B.write_json(os.path.join(out, "classes.json"), {"classes": names, "templates": templates, "wnids": wnids})
    B.write_json(os.path.join(out, "classes_single.json"), {"classes": names, "templates": [single], "wnids": wnids})
    for n in notes:
        print(n)
    print(f"wrote {written}: {len(records)} images, {n_classes} classes")
    print(f"wrote {os.path.join(out, 'classes.json')} (80 templates) and classes_single.json ({single!r})")
