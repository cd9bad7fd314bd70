"""
One way to configure every script: its settings are module globals with defaults; each command-line
argument is either a config file (`config/<name>.py`, plain assignments) or `--key=value`, applied
in order. Keys must already exist and values keep their type (an int may become a float); anything
else is an error naming the key. Usage, after the settings block of a script:

    from configurator import configure
    config = configure(globals())   # the snapshot of all settings, saved with checkpoints

What is a setting: a module global of type bool, int, float or str whose name is not upper-case and
does not start with "_". UPPER_CASE globals are the script's constants (LN100, MUST_MATCH, DTYPES):
setting one is an error that says so, and they are not in the snapshot. In a config file, names
starting with "_" are private helpers, not settings.

Then each script checks the values at the top of main(), before any work (`check`): counts and
intervals positive, names among those supported, output folders writable; one line per bad setting,
naming it and what it may be.
"""

import ast
import os
import sys

SETTABLE = (bool, int, float, str)

def is_setting(key, value):
    return not key.startswith("_") and not key.isupper() and type(value) in SETTABLE

def _coerce(key, value, default, source):
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        ok = isinstance(value, type(default))
    else:  # numbers: an int is fine where a float is expected, a bool is not
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and (isinstance(default, float) or isinstance(value, int)))
    if not ok:
        raise ValueError(f"{source}: {key}={value!r} is a {type(value).__name__}, "
                         f"expected {type(default).__name__}")
    return type(default)(value)

def configure(g, argv=None):
    keys = {k for k, v in g.items() if is_setting(k, v)}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"argument {arg!r}: expected --key=value")
            updates, source = {key: raw}, arg
            try:
                updates[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                pass  # a bare string, e.g. --out_dir=out/x
            if isinstance(g.get(key), str):
                updates[key] = raw  # strings are taken literally, even "1e-3" or "True"
        else:
            source = arg
            scope = {}
            with open(arg) as f:
                # one namespace, so comprehensions see names
                exec(compile(f.read(), arg, "exec"), scope)
            # settings: the plain values it assigns; imports and helper functions are not settings
            updates = {k: v for k, v in scope.items()
                       if not k.startswith("_") and type(v) in SETTABLE + (list, dict, tuple)}
        for key, value in updates.items():
            if key not in keys:
                if key in g and key.isupper():
                    raise ValueError(f"{source}: {key} is a constant of the script, not a setting "
                                     f"(settings are its lower-case globals: "
                                     f"{', '.join(sorted(keys))})")
                raise ValueError(f"{source}: unknown setting {key!r} "
                                 f"(settings: {', '.join(sorted(keys))})")
            g[key] = _coerce(key, value, g[key], source)
    return {k: g[k] for k in sorted(keys)}

# -----------------------------------------------------------------------------
# checks of the values, at the start of main()

def _writable_folder(path):
    """None if this process can create files in the folder `path`, else why not. Tried for real: the
    missing folders are made, a file is created and removed, and the folders made are removed again,
    so a run refused later leaves nothing behind."""
    made, p = [], os.path.abspath(path)
    while not os.path.lexists(p):  # the folders that would be created, deepest first
        made.append(p)
        p = os.path.dirname(p)
    try:
        for d in reversed(made):
            os.mkdir(d)
        probe = os.path.join(path, f".write-test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    finally:
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                pass
    return None

def check(config, positive=(), nonnegative=(), choices=None, within=None, rules=(), folders=(),
          files=()):
    """Refuse settings the script cannot run with, before it does any work: ValueError with one line
    per bad setting, each naming it, its value and what it may be (the first line names the first
    one).

    positive / nonnegative: names of numbers that must be > 0 / >= 0 (counts, steps, intervals,
              rates).
    choices:  {name: allowed values} (methods, dtypes).
    within:   {name: (lo, hi)}, inclusive.
    rules:    (ok, message) pairs for what involves several settings (e.g. warm-up within the run).
    folders:  names of output folders: a file must be creatable in them (tried, and undone), so an
              unwritable output fails now rather than after the work. files: names of output files
              (their folder is checked the same way; an existing folder of that name is refused).
              Under torchrun rank 0 alone tries (the others would race it), and its refusal ends the
              job."""
    bad = []
    for k in positive:
        if not config[k] > 0:
            bad.append(f"{k}={config[k]!r}: must be > 0")
    for k in nonnegative:
        if not config[k] >= 0:
            bad.append(f"{k}={config[k]!r}: must be >= 0")
    for k, allowed in (choices or {}).items():
        if config[k] not in allowed:
            bad.append(f"{k}={config[k]!r}: must be one of {', '.join(map(str, allowed))}")
    for k, (lo, hi) in (within or {}).items():
        if not lo <= config[k] <= hi:
            bad.append(f"{k}={config[k]!r}: must be within [{lo}, {hi}]")
    bad += [msg for ok, msg in rules if not ok]
    if not bad and int(os.environ.get("RANK", "0")) == 0:
        for k in folders:
            why = _writable_folder(config[k]) if config[k] else "empty"
            if why:
                bad.append(f"{k}={config[k]!r}: cannot write there ({why})")
        for k in files:
            path = config[k]
            why = "empty" if not path else (
                "a folder, expected a file path" if os.path.isdir(path) else
                _writable_folder(os.path.dirname(path) or "."))
            if why:
                bad.append(f"{k}={path!r}: cannot write there ({why})")
    if bad:
        raise ValueError("\n".join(bad))
