"""
One way to configure every script: its settings are module globals with defaults; each command-line
argument is either a config file (`config/<name>.py`, plain assignments) or `--key=value`, applied in
order. Keys must already exist and values keep their type (an int may become a float); anything else is
an error naming the key. In a config file, names starting with "_" are private helpers, not settings. Usage, after the settings block of a script:

    from configurator import configure
    config = configure(globals())   # the snapshot of all settings, saved with checkpoints
"""

import ast
import sys

SETTABLE = (bool, int, float, str)

def _coerce(key, value, default, source):
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        ok = isinstance(value, type(default))
    else:  # numbers: an int is fine where a float is expected, a bool is not
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (isinstance(default, float) or isinstance(value, int))
    if not ok:
        raise ValueError(f"{source}: {key}={value!r} is a {type(value).__name__}, expected {type(default).__name__}")
    return type(default)(value)

def configure(g, argv=None):
    keys = {k for k, v in g.items() if not k.startswith("_") and type(v) in SETTABLE}
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
                exec(compile(f.read(), arg, "exec"), scope)  # one namespace, so comprehensions see names
            # settings are the plain values it assigns; imports and helper functions are not settings
            updates = {k: v for k, v in scope.items() if not k.startswith("_") and type(v) in SETTABLE + (list, dict, tuple)}
        for key, value in updates.items():
            if key not in keys:
                raise ValueError(f"{source}: unknown setting {key!r} (settings: {', '.join(sorted(keys))})")
            g[key] = _coerce(key, value, g[key], source)
    return {k: g[k] for k in sorted(keys)}
