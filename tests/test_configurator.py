"""configurator.py: config files and --key=value, type-checked, unknown keys rejected."""

import pytest

from configurator import configure

def settings():
    return dict(lr=1e-3, steps=10, name="run", flag=True, __name__="x", _private=1)

def test_overrides_keep_types(tmp_path):
    g = settings()
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbase = 4\nsteps = sum(base * i for i in range(3))\nname = 'from-file'\n"
                   "def helper():\n    return 1\n")
    with pytest.raises(ValueError, match="unknown setting 'base'"):
        configure(g, [str(cfg)])  # its local helper value counts as a setting: names must exist
    cfg.write_text("import math\n_base = 4\nsteps = sum(_base * i for i in range(3))\nname = 'from-file'\n")
    out = configure(g, [str(cfg), "--lr=2", "--flag=False", "--name=1e-3"])
    assert out == {"flag": False, "lr": 2.0, "name": "1e-3", "steps": 12}
    assert isinstance(g["lr"], float) and g["name"] == "1e-3"

def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="unknown setting 'lrr'"):
        configure(settings(), ["--lrr=1"])
    with pytest.raises(ValueError, match="steps=0.5 is a float, expected int"):
        configure(settings(), ["--steps=0.5"])
    with pytest.raises(ValueError, match="flag=1 is a int, expected bool"):
        configure(settings(), ["--flag=1"])
    with pytest.raises(ValueError, match="expected --key=value"):
        configure(settings(), ["--lr"])
