"""COCO compressed RLE strings read in numpy: the one decoder of `counts` (pycocotools' rleFrString,
vectorised over many RLEs at once). Loading validates strings with it (pycocotools trusts a
compressed string: a malformed one reads past its buffer), the EDA and the mask painter read runs
with it. Runs alternate 0s and 1s, starting with 0s, over the pixels in column-major order."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def decode_counts(counts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(runs, owner, local) of many compressed `counts` strings at once: every run length (int64),
    the index of the string it came from, and its position within that string's runs."""
    c = np.frombuffer(b"".join(counts), np.uint8).astype(np.int64) - 48
    if not len(c):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    last = np.flatnonzero((c & 0x20) == 0)              # the last character of each number
    first = np.r_[0, last[:-1] + 1]
    width = last - first + 1
    shift = 5 * (np.arange(len(c)) - np.repeat(first, width))
    x = np.add.reduceat((c & 0x1F) << shift, first)
    neg = (c[last] & 0x10) != 0                         # sign bit of the number's last character
    x[neg] -= np.left_shift(1, 5 * width[neg])
    ends = np.cumsum([len(k) for k in counts])          # each string's numbers: the ones ending in its bytes
    per_rle = np.diff(np.r_[0, np.searchsorted(last, ends)])
    owner = np.repeat(np.arange(len(counts)), per_rle)
    local = np.arange(len(x)) - np.repeat(np.cumsum(per_rle) - per_rle, per_rle)
    runs = x.copy()
    for part in (local % 2 == 1, (local % 2 == 0) & (local >= 2)):   # deltas to the number two back
        runs[part] = segmented_cumsum(x[part], owner[part])
    return runs, owner, local


def compressed_rle_counts(counts: str | bytes) -> Optional[list[int]]:
    """The run lengths of one compressed RLE string; None when it is malformed (a character out of
    range, or a number cut short at the end)."""
    try:
        raw = counts.encode("latin-1") if isinstance(counts, str) else bytes(counts)
    except UnicodeEncodeError:   # a character past 255: out of range
        return None
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if len(c) and (c.min() < 0 or c.max() > 63 or c[-1] & 0x20):
        return None
    return decode_counts([raw])[0].tolist()


def rle_runs(rle: dict) -> np.ndarray:
    """A compressed COCO RLE's run lengths as int64."""
    return decode_counts([rle["counts"]])[0]


def rle_spans(rles: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every foreground run of many compressed RLEs at once, decoded in one vectorised pass (one RLE
    at a time costs ~25 us of numpy overhead each: too much at 50,000 per photo).
    Returns (start, length, owner): column-major pixel offset, run length and the RLE's index."""
    runs, owner, local = decode_counts([r["counts"] for r in rles])
    pos = segmented_cumsum(runs, owner)                 # each run's end, within its own RLE
    ones = local % 2 == 1
    return (pos - runs)[ones], runs[ones], owner[ones]


def segmented_cumsum(v: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each new value of the sorted array `segment`."""
    if not len(v):
        return v
    cs = np.cumsum(v)
    start = np.r_[True, segment[1:] != segment[:-1]]
    base = (cs - v)[start]
    return cs - np.repeat(base, np.diff(np.r_[np.flatnonzero(start), len(v)]))


def span_pixels(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The pixel offsets the runs (start, length) cover, run after run."""
    return np.repeat(start - (np.cumsum(length) - length), length) + np.arange(int(length.sum()))
