"""Which images are copies of one source photo, read from their file names.

Exporters that augment a dataset write each source photo several times and say so in the name:
Roboflow's "×3 augmentation" writes `<stem>_<ext>.rf.<32 hex>.jpg` for every copy (and for the
unaugmented export too, one copy per source). A copy validated by a model that trained on its
sibling scores the photo, not the skill, so the split keeps a source's copies in one group.

Known namings live in EXPORTERS (name -> regex; the first capture is the source). The file's base
name is matched, so copies in train/ and valid/ of one export join too. `split.group:
{pattern: '...'}` adds a pattern of one's own (matched against the json's `file_name`).
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Optional, Sequence

import pandas as pd

EXPORTERS = {
    # Roboflow: "IMG_0042_jpg.rf.0a1b...ef.jpg" (uploaded IMG_0042.jpg; the dot became "_jpg")
    "roboflow": r"^(.+?)\.rf\.[0-9a-fA-F]{16,}\.[A-Za-z0-9]+$",
}


def pattern_sources(file_names: Sequence[str], pattern: str) -> list[Optional[str]]:
    """'pattern:<first capture>' of a user's regex searched in each whole file_name, or None where
    it does not match (or captures nothing). split.group {pattern: ...} groups by it."""
    rx = re.compile(pattern)
    return [f"pattern:{m.group(1)}" if (m := rx.search(str(f))) and m.group(1) else None for f in file_names]


def source_names(file_names: Sequence[str], pattern: Optional[str] = None) -> pd.Series:
    """The source photo of each file name, or None where no naming applies.

    pattern: a user's regex (pattern_sources), tried first; then every EXPORTERS regex on the base
    name. Sources are prefixed with the naming that found them, so two namings never join by accident."""
    mine = pattern_sources(file_names, pattern) if pattern else [None] * len(file_names)
    known = [(name, re.compile(rx)) for name, rx in EXPORTERS.items()]
    out = []
    for f, own in zip(file_names, mine):
        base = PurePosixPath(str(f).replace("\\", "/")).name
        hit = next(((n, m) for n, rx in known if (m := rx.match(base))), None)
        out.append(own or (f"{hit[0]}:{hit[1].group(1)}" if hit else None))
    return pd.Series(out, dtype=object, name="source")


def copies_by_name(file_names: Sequence[str], pattern: Optional[str] = None) -> list[list[int]]:
    """Positions of the images that share a named source, one list per source with 2+ images."""
    src = source_names(file_names, pattern)
    groups = src.dropna().groupby(src.dropna()).groups
    return [sorted(int(i) for i in idx) for idx in groups.values() if len(idx) > 1]


def naming_summary(file_names: Sequence[str], pattern: Optional[str] = None) -> dict:
    """How many images carry a recognised source name, how many sources, and copies per source."""
    src = source_names(file_names, pattern).dropna()
    per = src.value_counts()
    namings = src.str.split(":", n=1).str[0].value_counts()
    return {"images_named": int(len(src)), "sources": int(len(per)),
            "sources_with_copies": int((per > 1).sum()),
            "images_in_named_groups": int(per[per > 1].sum()),
            "max_copies": int(per.max()) if len(per) else 0,
            "namings": {str(k): int(v) for k, v in namings.items()}}
