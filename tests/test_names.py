"""The project's import names must not collide with an installed distribution's.

Every script runs from the repository root, so the root (and, under pytest, tests/) comes first on
sys.path: a folder or module here with the same name as an installed package hides that package from
every library that imports it. transformers 5.25 began importing Hugging Face's `kernels` package, and our
old `kernels/` folder broke every script; this test names the next such clash before a user meets it.
"""

import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_names():
    """Top-level import names the project takes: {name: path}. Root modules and folders holding Python
    (packages and namespace packages alike), and the modules in tests/, which pytest puts on sys.path."""
    names = {}
    for folder in (ROOT, os.path.join(ROOT, "tests")):
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.startswith("."):
                continue
            if entry.endswith(".py"):
                names[entry[:-3]] = os.path.relpath(path, ROOT)
            elif os.path.isdir(path) and folder == ROOT and any(
                    f.endswith(".py") for _, _, fs in os.walk(path) for f in fs):
                names[entry] = os.path.relpath(path, ROOT) + "/"
    return names


def test_project_names_are_found():
    names = project_names()
    for expected in ("model", "manifest", "images", "evaluate", "data", "tests", "fused_losses", "tiny"):
        assert expected in names, expected


def test_no_import_name_shared_with_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = [f"{name} ({path}) is also a top-level module of the installed distribution(s) "
               f"{', '.join(sorted(set(installed[name])))}"
               for name, path in project_names().items() if name in installed]
    assert not clashes, ("rename the project's module, or the import resolves to the wrong one:\n  "
                         + "\n  ".join(clashes))


def test_transformers_imports_from_the_root():
    # transformers.activations pulls in its hub-kernels integration, the import that broke.
    code = "import transformers.activations, transformers; print(transformers.__version__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
