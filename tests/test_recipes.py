"""Every settings file in config/ is accepted by its script's configurator (an unknown key or a value of the
wrong type is an error there), and the paper-scale recipes say what their comments say."""

import glob
import importlib
import os

import pytest

from configurator import configure
from tiny import ROOT

SCRIPTS = {"stage1_": "train_stage1", "stage2_": "train_stage2", "embed_cache": "embed_cache", "eval": "evaluate"}
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))

def script_of(path):
    name = os.path.basename(path)
    for prefix, script in SCRIPTS.items():
        if name.startswith(prefix):
            return script
    raise AssertionError(f"{name}: no script for this name (config files start with one of {sorted(SCRIPTS)})")

def settings(path):
    """The script's settings after the config file: configure() on a copy of the script module's globals
    (importing a script runs its settings block only; main() is behind __name__ == "__main__")."""
    g = dict(vars(importlib.import_module(script_of(path))))
    return configure(g, [path])

@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_accepted_by_its_script(path):
    settings(path)

def test_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "stage2_typo.py"
    bad.write_text("batch_size = 512\nlayer_decy = 0.85\n")
    with pytest.raises(ValueError, match="stage2_typo.py: unknown setting 'layer_decy'"):
        settings(str(bad))

CC3M, CC12M = 2_873_538, 10_000_225  # run.sh's --train-num-samples-list
GPUS = 8

def test_paper_recipes_numbers():
    cfg = lambda name: settings(os.path.join(ROOT, "config", name))  # noqa: E731
    for name in ("stage2_llm2clip_vitl14_224.py", "stage2_llm2clip_vitl14_336.py", "stage2_proclip_paper.py"):
        c = cfg(name)
        assert c["batch_size"] * GPUS == 4096
        assert c["max_steps"] == int(4 * (CC3M + CC12M) / 4096)  # 4 epochs: 12,572.03 -> 12572
        opt = (c["lr"], c["weight_decay"], c["layer_decay"], c["grad_clip"], c["warmup_steps"])
        assert opt == (1e-5, 0.05, 0.85, 5.0, 0)
    assert cfg("stage2_llm2clip_vitl14_224.py")["embed_dim"] == 1280
    assert cfg("stage2_proclip_paper.py")["embed_dim"] == 0  # CLIP's own width
    for name in ("stage1_llm2clip_llama32_1b.py", "stage1_llm2clip_llama3_8b.py"):
        c = cfg(name)
        assert c["batch_size"] * GPUS == 512 and c["max_steps"] == -(-CC3M // 512)  # 1 epoch, rounded up
        assert (c["lr"], c["warmup_steps"], c["lora_r"], c["lora_alpha"], c["max_length"]) == (2e-4, 300, 16, 32, 512)
    assert cfg("stage1_proclip_paper.py")["max_steps"] == (CC3M + CC12M) // 4096
    c = cfg("embed_cache_paper.py")
    assert (c["max_length"], c["instruction"], c["dtype"]) == (512, "", "bfloat16")
