"""
What the evaluation-set converters (data/<set>/prepare.py) share: their settings, the list of faults
in the input, the BLIP/Karpathy caption JSON of Flickr30k and COCO, and the checked, atomic write of
the output. Each converter reads its own format and says in its docstring what it assumes.

The rules every converter keeps:
  * every entry of the input is checked before anything is written; each fault names the input file
    and the entry (index, line or key), and all of them are reported at once (the first MAX_LISTED in
    full), then the converter exits with status 1 and writes nothing;
  * nothing is dropped silently: what a protocol leaves out (other splits, entries past the first
    1,000, ...) is counted and printed;
  * image paths in the manifest are absolute (the images stay where they were downloaded), so the
    manifest works from any folder;
  * the manifest is written under a temporary name, passed through manifest.Manifest.check, then
    renamed, so a killed or failed run never leaves a half-written <name>;
  * no output replaces a file the converter did not write (filecheck.check_out_file): each output
    is recorded, with its bytes and sha256, in <out>/written.json; an existing output that another
    command wrote, or that was edited since, is refused before any work unless --overwrite=True;
  * line-based inputs are read as bytes and split at "\n" only (never at \u2028 or \x1c), so a
    fault names the line an editor shows; a line that is not UTF-8 is a fault of that line.
"""
import json
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # configurator.py and manifest.py

MAX_LISTED = 20  # faults listed in full; the rest are counted
OUT = {"command": "", "overwrite": False}  # who writes the outputs (set by configure)


def configure(g):
    """Apply --key=value to a converter's settings (configurator.py, as every script here; the
    UPPER_CASE constants are not settings), then require root (an existing folder) and out, and
    refuse outputs this converter may not replace (its OUTPUTS, default test.jsonl; the setting
    overwrite). Returns the snapshot of the settings."""
    from configurator import configure as apply
    settings = {k: v for k, v in g.items() if not k.isupper()}
    try:
        config = apply(settings)
    except ValueError as e:
        sys.exit(str(e))
    g.update(config)
    script = os.path.relpath(g["__file__"], ROOT) if "__file__" in g else "prepare.py"
    if not g["root"] or not g["out"]:
        sys.exit(f"usage: python {script} --root=<the folder as downloaded> --out=<folder>")
    if not os.path.isdir(g["root"]):
        sys.exit(f"--root={g['root']}: not a folder")
    OUT.update(command=script, overwrite=g.get("overwrite", False))
    for name in g.get("OUTPUTS", ("test.jsonl",)):
        claim(os.path.join(g["out"], name))
    return config


def claim(path):
    """Exit (status 1) if `path` exists and this converter did not write it, or it changed since."""
    from filecheck import check_out_file
    try:
        check_out_file(path, OUT["command"], OUT["overwrite"])
    except ValueError as e:
        sys.exit(str(e))


def read_lines(path, faults):
    """The lines of a text file, split at "\n" only (a trailing "\r" dropped), as str; a line that
    is not UTF-8 is a fault naming the line and the byte, and None in its place."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for n, b in enumerate(raw, 1):
        try:
            lines.append(b.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            faults.append(f"line {n}: not UTF-8 ({e.reason} at byte {e.start} of the line: "
                          f"{b[max(0, e.start - 20):e.start + 4]!r})")
            lines.append(None)
    return lines


def progress(items, desc):
    """tqdm over a pass through the input (a list); silent for small inputs (the tests' miniatures)."""
    return tqdm(items, desc=desc, unit="entry", disable=len(items) < 1000, leave=False)


def stop_if(faults, source):
    """Exit (status 1, nothing written) listing every fault found in `source`, if there are any."""
    if not faults:
        return
    shown = ["  " + f for f in faults[:MAX_LISTED]]
    if len(faults) > MAX_LISTED:
        shown.append(f"  ... and {len(faults) - MAX_LISTED} more")
    sys.exit(f"{source}: {len(faults)} fault(s), nothing written:\n" + "\n".join(shown))


def find_input(root, given, candidates, what):
    """The annotation file: `given` if set, else the one of `candidates` (paths relative to root)
    that exists. None or several found is an error naming what was looked for."""
    if given:
        if not os.path.isfile(given):
            sys.exit(f"--ann={given}: file not found")
        return os.path.abspath(given)
    found = [os.path.join(root, c) for c in candidates if os.path.isfile(os.path.join(root, c))]
    if not found:
        sys.exit(f"no {what} under --root={root} (looked for {', '.join(candidates)}); "
                 f"pass --ann=<file> if it has another name")
    if len(found) > 1:
        sys.exit(f"more than one {what} under --root={root}: {', '.join(found)}; choose one with --ann=<file>")
    return os.path.abspath(found[0])


def read_json(path):
    """A whole JSON file; a parse error names the file and the position."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        sys.exit(f"{path}: not valid JSON: {e}")


def image_at(folder, rel, where, faults):
    """Absolute path of image `rel` under `folder`; a fault naming the entry if it is not a file."""
    if not isinstance(rel, str) or not rel:
        faults.append(f"{where}: image must be a non-empty string, got {rel!r:.80}")
        return None
    path = os.path.abspath(os.path.join(folder, rel))
    if not os.path.isfile(path):
        faults.append(f"{where}: image file not found: {path}")
    return path


def caption_list(value, where, faults, key="caption"):
    """A non-empty list of non-empty strings, each stripped of surrounding whitespace; else a fault."""
    if not isinstance(value, list) or not value:
        faults.append(f"{where}: {key!r} must be a non-empty list of strings, got {value!r:.80}")
        return None
    bad = [j for j, t in enumerate(value) if not isinstance(t, str) or not t.strip()]
    if bad:
        faults.append(f"{where}: {key}[{bad[0]}] must be a non-empty string, got {value[bad[0]]!r:.80}")
        return None
    return [t.strip() for t in value]


def no_duplicates(records, where_of, faults):
    """Multi-caption sets: an image listed twice would compete with itself in retrieval."""
    first = {}
    for i, r in enumerate(records):
        if r["image"] in first:
            faults.append(f"{where_of(i)}: image {r['image']} is also {where_of(first[r['image']])}")
        first.setdefault(r["image"], i)


def blip_or_karpathy(path, images, field, karpathy_dir="", split="test"):
    """Records from a Flickr30k/COCO caption file in either of its two public shapes:
      BLIP      a JSON array of {"image": "<path under images>", "caption": [strings], ...}
      Karpathy  {"images": [{"filename", "filepath" (COCO only), "split", "sentences": [{"raw"}, ...]}, ...]}
                (dataset_flickr30k.json / dataset_coco.json), only split == `split` kept; the image is
                images/<filepath or karpathy_dir>/<filename>
    Every caption of an image is kept, in order. Returns (records, notes)."""
    data = read_json(path)
    faults, records, notes = [], [], []
    if isinstance(data, list):
        for i, e in enumerate(progress(data, os.path.basename(path))):
            where = f"entry {i}"
            if not isinstance(e, dict) or "image" not in e or "caption" not in e:
                faults.append(f"{where}: expected an object with 'image' and 'caption', got {e!r:.80}")
                continue
            where = f"entry {i} (image {e['image']!r})"
            img = image_at(images, e["image"], where, faults)
            caps = caption_list(e["caption"], where, faults)
            if img and caps:
                records.append({"image": img, "captions": {field: caps}})
        kind = "BLIP JSON array"
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        other = {}
        for i, e in enumerate(progress(data["images"], os.path.basename(path))):
            where = f"images[{i}]"
            if not isinstance(e, dict) or not all(k in e for k in ("filename", "split", "sentences")):
                faults.append(f"{where}: expected an object with 'filename', 'split' and 'sentences', got {e!r:.80}")
                continue
            if e["split"] != split:
                other[e["split"]] = other.get(e["split"], 0) + 1
                continue
            where = f"images[{i}] (filename {e['filename']!r})"
            rel = e["filename"]
            if isinstance(rel, str) and rel:
                rel = os.path.join(e.get("filepath") or karpathy_dir, rel)
            img = image_at(images, rel, where, faults)
            sents = e["sentences"]
            raw = [s.get("raw") if isinstance(s, dict) else None for s in sents] if isinstance(sents, list) else sents
            caps = caption_list(raw, where, faults, key="sentences[].raw")
            if img and caps:
                records.append({"image": img, "captions": {field: caps}})
        kind = f"Karpathy JSON, split {split!r}"
        notes.append(f"left out (other splits): {', '.join(f'{k} {v}' for k, v in sorted(other.items())) or 'none'}")
    else:
        sys.exit(f"{path}: neither a BLIP caption file (a JSON array) nor a Karpathy one ({{\"images\": [...]}}), "
                 f"got a JSON {type(data).__name__}")
    no_duplicates(records, lambda i: f"record {i}", faults)
    stop_if(faults, path)
    notes.insert(0, f"read {path} ({kind})")
    return records, notes


def write_manifest(out, name, records, fields=None, label=False, decode=False):
    """Write records as <out>/<name> (JSONL), passed through Manifest.check before it appears.
    The check runs on a copy in a private folder (<out>/.<name>.partial/), so whatever it leaves beside
    the manifest it checks stays there, and is deleted with it; then the file is renamed into place."""
    os.makedirs(out, exist_ok=True)
    final = os.path.join(out, name)
    work = os.path.join(out, f".{name}.partial")
    shutil.rmtree(work, ignore_errors=True)  # left by a killed run
    os.makedirs(work)
    tmp = os.path.join(work, name)
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    from manifest import Manifest  # imports torch: only once the input is known to be good
    try:
        Manifest(tmp).check(fields=fields, label=label, decode=decode)
    except ValueError as e:
        shutil.rmtree(work)
        sys.exit(f"the converted manifest fails Manifest.check, nothing written:\n{e}")
    claim(final)  # (again: nothing may have appeared there meanwhile)
    os.replace(tmp, final)
    shutil.rmtree(work)
    record(final)
    return final


def record(path):
    from filecheck import record_out_file
    record_out_file(path, OUT["command"])


def write_json(path, obj):
    """A JSON file written atomically (temporary name, then rename)."""
    claim(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)
    record(path)


def report(notes, path, records, fields):
    """What was read, left out and written: one line each."""
    for n in notes:
        print(n)
    counts = {f: sum(len(r["captions"][f]) for r in records) for f in fields}
    per = ", ".join(f"{f} {c}" for f, c in counts.items()) if len(fields) <= 4 else \
        f"{len(fields)} fields, {min(counts.values())}-{max(counts.values())} each, {sum(counts.values())} in all"
    print(f"wrote {path}: {len(records)} images; captions: {per}")
