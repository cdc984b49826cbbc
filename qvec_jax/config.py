"""Config files and command-line overrides: the one config mechanism of the project.

A config is a Python file that defines ``get_config() -> ml_collections.ConfigDict``
(the big_vision / Flax-examples convention). Overrides are ``key.sub=value`` strings;
the value is parsed as a Python literal (``3``, ``1e-5``, ``None``, ``(1, 2)``,
``'fp'``) and falls back to a plain string (``mode=qat``). Keys must already exist in
the config, and ConfigDict's type checks apply (an int field accepts ``2`` but not
``'two'``), so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence

import ml_collections


def load_config(
    path: str | os.PathLike, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """Load ``get_config()`` from the Python file ``path`` and apply ``overrides``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config file {path!r} does not exist; pass a Python file defining get_config(), "
            "e.g. configs/demo_tiny.py"
        )
    name = "qvec_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not path.endswith(".py"):
        raise ValueError(f"config file {path!r} is not a Python file (.py) defining get_config()")
    try:  # the file's own errors (syntax, a failing get_config) name the file, not a traceback
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        cfg = get_config() if callable(get_config) else None
    except Exception as e:
        raise ValueError(f"config file {path!r}: {type(e).__name__}: {e}") from e
    if not callable(get_config):
        raise ValueError(f"config file {path!r} defines no get_config() function")
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(
            f"get_config() in {path!r} returned {type(cfg).__name__}, expected a ConfigDict"
        )
    return apply_overrides(cfg, overrides)


def parse_value(text: str):
    """A Python literal if ``text`` is one, else ``text`` itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, object]]:
    """``["a.b=1", "mode=qat"]`` -> ``[("a.b", 1), ("mode", "qat")]``."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        parsed.append((key.strip(), parse_value(value.strip())))
    return parsed


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str] | Sequence[tuple[str, object]]
) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with overrides (strings ``k=v`` or ``(k, value)`` pairs) applied."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    pairs = [o for o in overrides if not isinstance(o, str)]
    pairs += parse_overrides(o for o in overrides if isinstance(o, str))
    for key, value in pairs:
        *parents, leaf = key.split(".")
        node = cfg
        for i, part in enumerate(parents):
            child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                raise ValueError(_unknown(cfg, ".".join(parents[: i + 1]), key))
            node = child
        if leaf not in node:
            raise ValueError(_unknown(cfg, key, key))
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(
                f"override {key}={value!r}: {e}. Give a value of the field's type."
            ) from None
    return cfg


def _unknown(cfg: ml_collections.ConfigDict, bad: str, key: str) -> str:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"override key {bad!r} is not in the config{hint}"


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """Canonical JSON of a config (sorted keys), used to compare runs."""
    return json.dumps(cfg.to_dict(), sort_keys=True, default=list)


#: Top-level sections that no training run reads (only ``qvec demo`` does: task sets, the
#: grid's lambdas, the report's strategy...). A run's identity ignores them: resuming a
#: fine-tune and the FP/QAT recipe checks of the grid.
NOT_TRAINING = ("demo",)


#: Keys that change how fast a run goes, never its numbers (``tests/test_feed.py`` checks
#: bit-identical params): a run's identity ignores them, so a run resumes under other
#: values, and configs written before a key existed still match.
SPEED_ONLY = ("data.workers", "data.device_bytes", "steps_per_dispatch")


def training_diff(a, b) -> list[str]:
    """:func:`diff` without the keys under :data:`NOT_TRAINING` and those in :data:`SPEED_ONLY`."""
    return [k for k in diff(a, b) if k.split(".")[0] not in NOT_TRAINING and k not in SPEED_ONLY]


def training_json(cfg: ml_collections.ConfigDict) -> dict:
    """The config as a JSON-able dict without :data:`NOT_TRAINING` and :data:`SPEED_ONLY`:
    what makes two runs the same computation."""
    out = {k: v for k, v in json.loads(to_json(cfg)).items() if k not in NOT_TRAINING}
    for key in SPEED_ONLY:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def diff(a: ml_collections.ConfigDict | dict, b: ml_collections.ConfigDict | dict) -> list[str]:
    """Dotted keys whose values differ between two configs (as JSON-able dicts)."""
    a = json.loads(to_json(a)) if isinstance(a, ml_collections.ConfigDict) else a
    b = json.loads(to_json(b)) if isinstance(b, ml_collections.ConfigDict) else b
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += [f"{k}.{d}" for d in diff(va, vb)]
        elif va != vb:
            out.append(k)
    return out


def pretext_config(cfg: ml_collections.ConfigDict, task: str, epochs: float):
    """The pretext run of a demo-style config (``cfg.demo.pretext_*``): the same model,
    from random init, for ``epochs`` on ``task``, with its own optimizer numbers. The demo
    and the studies train their shared backbone with it."""
    d = cfg.demo
    return apply_overrides(
        cfg,
        [
            ("task", task),
            ("mode", "fp"),
            ("init.kind", "random"),
            ("total_steps", -1),
            ("epochs", float(epochs)),
            ("optim.lr", float(d.pretext_lr)),
            ("optim.head_lr_mult", 1.0),
            ("optim.weight_decay", float(d.pretext_weight_decay)),
            ("optim.warmup_steps", int(d.pretext_warmup_steps)),
        ],
    )
