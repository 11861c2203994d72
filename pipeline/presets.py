"""Named recipes. A preset is presets/<name>.yaml: a few keys of params.yaml's sections, checked
against the params tree, and printed as DVC `-S` flags so one experiment picks it in one line:

    dvc exp run -n photos $(python -m pipeline.presets photos)
    python -m pipeline.presets --list

`dvc exp show` then lists exactly the params the preset changed. (To make a preset the project's
default instead, copy its keys into params.yaml.)
"""
from __future__ import annotations

import argparse
import shlex
import sys
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from pipeline.config import PARAMS_FILE, ConfigError, Params, parse_params

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def load_preset(name: str, base: str | Path = PARAMS_FILE) -> dict:
    """The preset's keys as a nested dict; fails naming the key if params.yaml + preset is invalid."""
    path = PRESETS / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available())}")
    preset = yaml.safe_load(path.read_text()) or {}
    merged = yaml.safe_load(Path(base).read_text()) if Path(base).exists() else {}
    for key, value in leaves(preset).items():
        *parents, leaf = key.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    parse_params(merged, f"{PARAMS_FILE} + {path.name}")
    return preset


def leaves(preset: dict) -> dict:
    """{'train.lr': 0.001, 'train.loss': {...}}: dotted keys down to each param; a dict-valued param
    (train.loss) is one value, replaced whole — not merged key by key."""
    return _dotted(preset, stop=dict_params(Params))


def dict_params(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted names of the params whose value is a mapping (train.loss), not a section."""
    out = set()
    for name, f in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out |= dict_params(f.annotation, key)
        elif typing.get_origin(f.annotation) is dict:
            out.add(key)
    return out


def _dotted(tree: dict, prefix: str = "", stop: frozenset | set = frozenset()) -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and name not in stop:
            out.update(_dotted(value, name, stop))
        else:
            out[name] = value
    return out


def flags(preset: dict) -> list[str]:
    """['-S', 'train.input=crop', ...]: one flag per param, values in YAML flow style (what DVC parses).
    A dict-valued param is removed, then added whole (`-S ~train.loss -S '+train.loss={ce: 1.0}'`):
    DVC merges a plain `train.loss={...}` into the old dict and refuses keys it did not have."""
    out = []
    for key, value in leaves(preset).items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        out += ["-S", f"~{key}", "-S", f"+{key}={text}"] if isinstance(value, dict) else ["-S", f"{key}={text}"]
    return out


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?")
    ap.add_argument("--list", action="store_true", help="the presets there are, with their first comment line")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for name in available():
            first = (PRESETS / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"{name:12s} {first}")
        return
    try:
        print(" ".join(shlex.quote(f) for f in flags(load_preset(args.name))))
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
