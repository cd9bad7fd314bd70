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

def test_constants_are_not_settings():
    """UPPER_CASE globals are the script's constants: refused by name, and not in the snapshot."""
    g = dict(settings(), LN100=4.6, MUST_MATCH=("lr",), FINGERPRINTS="/x")
    with pytest.raises(ValueError, match="LN100 is a constant of the script, not a setting"):
        configure(g, ["--LN100=5"])
    with pytest.raises(ValueError, match="FINGERPRINTS is a constant"):
        configure(g, ["--FINGERPRINTS=/tmp/y"])
    assert g["LN100"] == 4.6 and g["FINGERPRINTS"] == "/x"
    assert set(configure(g, [])) == {"flag", "lr", "name", "steps"}

def test_no_script_has_an_upper_case_setting():
    """A script's settings are exactly the names assigned in its settings block (between the first two
    dashed lines): the lower-case rule drops no real setting and adds no stray global."""
    import importlib
    for script in ("train_stage1", "train_stage2", "embed_cache", "evaluate", "bench.llama", "bench.data"):
        g = vars(importlib.import_module(script))
        block = open(g["__file__"]).read().split("# " + "-" * 77 + "\n")[1]  # the first settings block
        names = [line.split("=")[0].strip() for line in block.splitlines() if " = " in line and not line[0].isspace()]
        assert names and set(names) == set(configure(dict(g), [])), script

def test_check_names_each_bad_setting(tmp_path):
    from configurator import check
    cfg = dict(batch_size=0, max_steps=10, warmup_steps=20, method="foo", decay=1.5, out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError) as e:
        check(cfg, positive=("batch_size", "max_steps"), choices={"method": ("a", "b")}, within={"decay": (0, 1)},
              rules=[(cfg["warmup_steps"] <= cfg["max_steps"], "warmup_steps=20: more than max_steps=10")],
              folders=("out_dir",))
    assert str(e.value).splitlines() == ["batch_size=0: must be > 0", "method='foo': must be one of a, b",
                                         "decay=1.5: must be within [0, 1]", "warmup_steps=20: more than max_steps=10"]
    assert not (tmp_path / "o").exists()
    # a writable folder passes, and the check leaves no trace: what it made for the test is removed again
    check(dict(out_dir=str(tmp_path / "o" / "p")), folders=("out_dir",))
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    check(dict(out_dir=str(tmp_path / "o")), folders=("out_dir",))
    assert (tmp_path / "o").is_dir() and not list((tmp_path / "o").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^out_dir='.*file/o': cannot write there \(") as e:
        check(dict(out_dir=str(tmp_path / "file" / "o")), folders=("out_dir",))
    with pytest.raises(ValueError, match="out=.*: cannot write there \\(a folder, expected a file path\\)"):
        check(dict(out=str(tmp_path)), files=("out",))
    check(dict(out=str(tmp_path / "new" / "eval.json")), files=("out",))
    assert not (tmp_path / "new").exists()
