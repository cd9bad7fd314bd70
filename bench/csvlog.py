"""Rows appended to a CSV as they are measured, so a run cut short keeps what it had measured.

    append_row(path, {"op": "contrastive", "ms": 1.5})  # the header too when the file is new
    read_rows(path)                                      # [] when the file does not exist
"""

import csv
import os


def append_row(path, row):
    """Append one dict as a row under the file's header (a new file: the dict's keys); keys the
    header lacks are dropped, columns the dict lacks are left empty."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = list(row)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f))
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        if f.tell() == 0:
            w.writeheader()
        w.writerow(row)


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

