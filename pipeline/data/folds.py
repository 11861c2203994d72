"""K-fold assignment per image, and how balanced the folds are.

Strategies:
  multilabel: iterative stratification (iterstrat's MultilabelStratifiedKFold) over per-image class
      presence plus a one-hot bin of the image's object count, so folds get similar class mixes
      *and* similar numbers of objects (what a multi-label segmentation split needs; a single-label
      StratifiedKFold cannot see more than one class per image).
  random: plain shuffled KFold (the baseline the report compares against).
  given: the val json's images are fold 0, the train json's images are never validated (fold -1).
With a group key, stratification runs on groups (labels pooled per group), so a group never
straddles folds. Copies join one group too (Links): byte-identical files, copies an exporter named
as one source (pipeline/data/sources.py) and near-duplicate pairs whose pixels agree
(pipeline/data/near_dups.py), so a copy is never validated by a model that trained on another
(except with 'given', where the split is the user's: the split report counts such leaks). The
holdout is drawn first, stratified the same way, and belongs to no fold; groups bigger than the
holdout are never drawn. Stratification balances groups, not images: when groups differ in size the
folds are evened out afterwards (even_out: whole groups move from the fullest fold to the emptiest
until every fold is within FOLD_TOLERANCE of equal size, or no group fits); a group bigger than a
fold's share is reported (oversized_groups), since no split can then be even.

folds.csv: key, image_id, source, file_name, group, fold (-1 = never a validation image), holdout,
duplicate_of (key of the first byte-identical image, else empty).
A training run for fold k trains on `fold != k and not holdout` and validates on `fold == k`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit
from sklearn.model_selection import KFold, ShuffleSplit

from pipeline.config import Split
from pipeline.data.coco import DataError, Dataset
from pipeline.data.sources import copies_by_name, pattern_sources
from pipeline.io import identical_files

IMAGE_QUANTILES = (0.25, 0.5, 0.75)   # count bins that split the images evenly...
MASS_BINS = 5                          # ...plus bins holding equal shares of the objects (the long tail)
FOLD_TOLERANCE = 0.1                   # folds within +-10 % of equal size, whenever the groups allow


@dataclass(frozen=True)
class Links:
    """Images that must share a fold, and why: sets of positions in ds.images."""
    identical: Sequence[Sequence[int]] = ()   # byte-identical files (pipeline.io.identical_files)
    named: Sequence[Sequence[int]] = ()       # copies of one source by file name (sources.copies_by_name)
    near: Sequence[Sequence[int]] = ()        # near-duplicate pairs to keep together (joined ones)

    def all(self) -> list[Sequence[int]]:
        return [*self.identical, *self.named, *self.near]

    def joining(self, named: bool, near: bool) -> "Links":
        """The links a split joins (split.copies_by_name, split.join_near_dups); all of them are
        still counted as leaks by split_summary."""
        return Links(self.identical, self.named if named else (), self.near if near else ())


def group_keys(images: pd.DataFrame, group) -> pd.Series:
    """The grouping value of each image: its folder ('folder'), an image field, the first capture of
    a pattern on file_name (split.group {pattern: ...}; images it does not match are their own
    group), or itself (None)."""
    if group is None:
        return images.key.rename("group")
    pattern = getattr(group, "pattern", None)
    if pattern is not None:
        found = pattern_sources(images.file_name.tolist(), pattern)
        return pd.Series([s or k for s, k in zip(found, images.key)], index=images.index, name="group")
    if group == "folder":
        return images.file_name.map(lambda f: str(Path(f).parent)).rename("group")
    if group not in images.columns:
        fields = sorted(c for c in images.columns if c not in ("key", "path", "source"))
        raise DataError(f"split.group: images have no field {group!r}; use 'folder', {{pattern: ...}} or one of {fields}")
    return images[group].astype(str).rename("group")


def merge_groups(groups: pd.Series, together: Sequence[Sequence[int]]) -> pd.Series:
    """Groups joined so that the images at each position set in `together` share one: every group
    touched by a set becomes the smallest of them (union-find over group values)."""
    parent = {g: g for g in groups.unique()}

    def root(g):
        while parent[g] != g:
            parent[g] = g = parent[parent[g]]
        return g

    for positions in together:
        roots = sorted({root(groups.iloc[i]) for i in positions})
        for r in roots[1:]:
            parent[r] = roots[0]
    return groups.map(root)


def label_matrix(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(presence (N, K-1) uint8 per class 1..K-1, object counts (N,) int) in ds.images order."""
    K = ds.num_classes
    a = ds.annotations
    pos = pd.Series(np.arange(len(ds.images)), index=ds.images.key)
    presence = np.zeros((len(ds.images), K - 1), dtype=np.uint8)
    if len(a):
        presence[pos[a.key].to_numpy(), a.class_idx.to_numpy() - 1] = 1
    counts = ds.images.key.map(a.groupby("key").size()).fillna(0).astype(int).to_numpy()
    return presence, counts


def count_edges(counts: np.ndarray) -> np.ndarray:
    """Upper edges of the object-count bins: image quartiles, plus edges that give each bin an equal
    share of all objects. Real counts are long-tailed (most photos hold 1-3 objects, a few hold 90):
    quartiles alone put 4..90 in one bin, and the folds' object totals then drift apart."""
    if not len(counts):
        return np.zeros(0)
    c = np.sort(counts)
    mass = np.cumsum(c) / max(c.sum(), 1)
    by_mass = c[np.minimum(np.searchsorted(mass, np.arange(1, MASS_BINS) / MASS_BINS), len(c) - 1)]
    return np.unique(np.r_[np.quantile(counts, IMAGE_QUANTILES), by_mass])


def _strat_labels(presence: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Class presence + one-hot bin of the object count (balances objects per fold too)."""
    edges = count_edges(counts)
    bins = np.digitize(counts, edges, right=True)
    return np.hstack([presence, np.eye(len(edges) + 1, dtype=np.uint8)[bins]])


def _by_group(groups: pd.Series, presence: np.ndarray, counts: np.ndarray):
    codes, uniq = pd.factorize(groups, sort=True)
    g_presence = np.zeros((len(uniq), presence.shape[1]), dtype=np.uint8)
    np.maximum.at(g_presence, codes, presence)
    g_counts = np.bincount(codes, weights=counts, minlength=len(uniq)).astype(int)
    return codes, len(uniq), g_presence, g_counts


def _kfold(strategy: str, n_folds: int, seed: int, labels: np.ndarray) -> np.ndarray:
    """Fold index per row of `labels` (rows are groups)."""
    n = len(labels)
    if n < n_folds:
        raise DataError(f"split: {n} images/groups left for {n_folds} folds; lower split.n_folds or split.holdout")
    splitter = (MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
                if strategy == "multilabel" else KFold(n_splits=n_folds, shuffle=True, random_state=seed))
    fold = np.full(n, -1)
    for k, (_, val) in enumerate(splitter.split(np.zeros(n), labels)):
        fold[val] = k
    return fold


def _holdout(strategy: str, frac: float, seed: int, labels: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Boolean mask over groups: which are held out (drawn among `eligible` only)."""
    out = np.zeros(len(labels), bool)
    idx = np.nonzero(eligible)[0]
    if frac <= 0:
        return out
    if len(idx) < 2:
        raise DataError("split.holdout: too few images/groups to set any aside")
    splitter = (MultilabelStratifiedShuffleSplit(n_splits=1, test_size=frac, random_state=seed)
                if strategy == "multilabel" else ShuffleSplit(n_splits=1, test_size=frac, random_state=seed))
    _, test = next(splitter.split(np.zeros(len(idx)), labels[idx]))
    out[idx[test]] = True
    return out


def even_out(g_fold: np.ndarray, g_size: np.ndarray, g_labels: np.ndarray, tolerance: float = FOLD_TOLERANCE) -> np.ndarray:
    """Fold per group (-1 = none) with whole groups moved from the fullest fold to the emptiest until
    every fold's images are within `tolerance` of equal, or no group's move narrows the gap.

    g_size: (G,) images per group; g_labels: (G, L) label counts per group (the stratification
    labels). Among the groups whose move narrows the gap, the one closest to half the gap moves,
    ties broken by the least change to the two folds' label mix. Folds already even are untouched
    (the usual case: iterative stratification of same-sized groups is even to one image)."""
    fold = g_fold.copy()
    ks = np.unique(fold[fold >= 0])
    if len(ks) < 2:
        return fold
    target = g_size[fold >= 0].sum() / len(ks)
    labels = g_labels.astype(float)
    # labels per image, pool-wide: moves stay inside the pool, so it never changes
    rate = labels[fold >= 0].sum(0) / max(g_size[fold >= 0].sum(), 1)
    for _ in range(len(fold)):
        sizes = np.array([g_size[fold == k].sum() for k in ks])
        if sizes.max() <= target * (1 + tolerance) and sizes.min() >= target * (1 - tolerance):
            break
        big, small = ks[sizes.argmax()], ks[sizes.argmin()]
        gap = sizes.max() - sizes.min()
        cand = np.flatnonzero((fold == big) & (g_size < gap))
        if not len(cand):
            break
        harm = np.abs(labels[cand] - rate * g_size[cand, None]).sum(1) / np.maximum(g_size[cand], 1)
        pick = cand[np.lexsort((harm, np.abs(g_size[cand] - gap / 2)))[0]]
        fold[pick] = small
    return fold


def make_folds(ds: Dataset, s: Split, val_source: Optional[str] = None, links: Links = Links()) -> pd.DataFrame:
    """Assign every labelled image a fold (see the module docstring for the columns).
    s: the split section (strategy, n_folds, group, holdout, seed); val_source: data.val_json, which
    'given' validates on. links: image sets to keep together (byte-identical files, copies by name,
    joined near-duplicates); with 'given' they are only counted (split_summary), never joined."""
    groups = group_keys(ds.images, s.group)
    if s.strategy != "given":
        groups = merge_groups(groups, links.all())
    first = {i: ds.images.key.iloc[d[0]] for d in links.identical for i in d[1:]}
    presence, counts = label_matrix(ds)
    codes, n_groups, g_presence, g_counts = _by_group(groups, presence, counts)
    labels = _strat_labels(g_presence, g_counts)
    g_size = np.bincount(codes, minlength=n_groups)
    # a group bigger than the whole holdout would take it over: such groups are always cross-validated
    fits_holdout = g_size <= max(1.0, s.holdout * len(codes))
    g_fold = np.full(n_groups, -1)
    if s.strategy == "given":
        if val_source is None:
            raise DataError("split.strategy 'given' needs data.val_json")
        is_val = ds.images.source.to_numpy() == val_source
        g_val = np.zeros(n_groups, bool)
        np.logical_or.at(g_val, codes, is_val)
        g_train = np.zeros(n_groups, bool)
        np.logical_or.at(g_train, codes, ~is_val)
        if (g_val & g_train).any():
            raise DataError(f"split.group {s.group!r} puts train and val images in the same group; "
                            "with strategy 'given' groups must not straddle the two files")
        g_hold = _holdout("multilabel", s.holdout, s.seed, labels, ~g_val & fits_holdout)
        g_fold[g_val] = 0
    else:
        g_hold = _holdout(s.strategy, s.holdout, s.seed, labels, fits_holdout)
        rest = np.nonzero(~g_hold)[0]
        g_fold[rest] = _kfold(s.strategy, s.n_folds, s.seed, labels[rest])
        g_classes = np.zeros((n_groups, presence.shape[1]))
        np.add.at(g_classes, codes, presence)   # images per class per group
        g_fold = even_out(g_fold, g_size, g_classes)
    return pd.DataFrame({"key": ds.images.key, "image_id": ds.images.image_id, "source": ds.images.source,
                         "file_name": ds.images.file_name, "group": groups.to_numpy(),
                         "fold": g_fold[codes], "holdout": g_hold[codes],
                         "duplicate_of": [first.get(i, "") for i in range(len(ds.images))]})


def duplicates_apart(folds: pd.DataFrame) -> int:
    """Images whose byte-identical first copy has another fold or holdout status: validation leaks
    (0 unless the split was 'given')."""
    dup = folds[folds.duplicate_of.fillna("") != ""]
    first = folds.set_index("key").loc[dup.duplicate_of, ["fold", "holdout"]].to_numpy()
    return int((first != dup[["fold", "holdout"]].to_numpy()).any(axis=1).sum())


def near_pairs(keys: pd.Series, pairs: pd.DataFrame, joined_only: bool = True) -> list[list[int]]:
    """Positions in `keys` of each near-duplicate pair (columns key_a, key_b, and `joined`: only
    those unless joined_only is False) whose images are both there."""
    if joined_only and "joined" in pairs and len(pairs):
        pairs = pairs[pairs.joined.astype(bool)]
    pos = {k: i for i, k in enumerate(keys)}
    return [[pos[a], pos[b]] for a, b in zip(pairs.key_a, pairs.key_b) if a in pos and b in pos]


def leaky_keys(folds: pd.DataFrame, sets: Sequence[Sequence[str]]) -> set[str]:
    """Validation and holdout images that have a partner in their set (keys; keys outside `folds`,
    e.g. test images, are ignored) among the images trained on when they are judged: a holdout
    image, by any partner outside the holdout (every fold model trains on it); a validation image of
    fold f, by any partner outside the holdout and outside fold f."""
    side = folds.set_index("key")[["fold", "holdout"]]
    fold, hold = side.fold.to_dict(), side.holdout.astype(bool).to_dict()
    leaky: set[str] = set()
    for members in sets:
        inside = [k for k in dict.fromkeys(members) if k in fold]
        if len(inside) < 2:
            continue
        trained = [(fold[k], hold[k]) for k in inside]
        for k in inside:
            others = [(f, h) for m, (f, h) in zip(inside, trained) if m != k]
            if hold[k]:
                bad = any(not h for _, h in others)
            else:
                bad = fold[k] >= 0 and any(not h and f != fold[k] for f, h in others)
            if bad:
                leaky.add(k)
    return leaky


def leak_report(folds: pd.DataFrame, sets_by_signal: dict[str, Sequence[Sequence[str]]]) -> dict:
    """leaky_images (any signal) and leaks per signal (leaky_keys of each signal's sets): what a
    score on this split is inflated by, whatever the split joined."""
    by = {name: leaky_keys(folds, sets) for name, sets in sets_by_signal.items()}
    return {"leaky_images": len(set().union(*by.values())) if by else 0,
            "leaks_by_signal": {name: len(keys) for name, keys in by.items()}}


def oversized_groups(folds: pd.DataFrame, limit: int = 5) -> list[dict]:
    """Groups with more images than a fold's share of the pool (1/n_folds of the non-holdout images),
    largest first: {group, images, share (of the pool), fold}. No split can be even around them."""
    pool = folds[~folds.holdout.astype(bool)]
    ks = sorted(set(pool.fold) - {-1})
    if len(ks) < 2:
        return []
    sizes = pool.groupby("group").size().sort_values(ascending=False, kind="stable")
    big = sizes[sizes > len(pool) / len(ks)]
    fold_of = pool.groupby("group").fold.first()
    return [{"group": str(g), "images": int(n), "share": round(float(n / len(pool)), 4), "fold": int(fold_of[g])}
            for g, n in big.head(limit).items()]


def split_warnings(summary: dict) -> list[str]:
    """Sentences for the user when folds are uneven, their class mix is worse than random KFold's,
    or a group is bigger than a fold's share."""
    out = []
    sizes = summary["fold_images"]
    n_folds = len(sizes)
    if len(sizes) > 1:
        target = sum(sizes.values()) / len(sizes)
        off = {k: v / target - 1 for k, v in sizes.items()}
        if max(abs(v) for v in off.values()) > FOLD_TOLERANCE:
            out.append("folds are uneven: " + ", ".join(f"fold {k} {v} images ({off[k]:+.0%})" for k, v in sizes.items())
                       + f" against {target:.0f} each")
    bal = summary.get("balance") or {}
    if bal.get("class_dev", 0) > max(1.2 * bal.get("random_class_dev", 0), bal.get("random_class_dev", 0) + 0.005):
        out.append(f"the folds' class mix strays from the pool's more than random KFold's does on the same groups "
                   f"(class_dev {bal['class_dev']:.4f} vs {bal['random_class_dev']:.4f}): few distinct label sets "
                   "or large groups leave stratification little to work with; see balance.csv")
    for g in summary["groups"]["oversized"]:
        out.append(f"group {g['group']!r} holds {g['images']} images ({g['share']:.0%} of the pool), more than a "
                   f"fold's share (1/{n_folds}); it forces fold {g['fold']}'s size. Check reports/near_dups "
                   "(clusters) or split.group")
    return out


def split_summary(folds: pd.DataFrame, balance: dict, links: Links, pairs: pd.DataFrame, joined: bool) -> dict:
    """The split stage's metrics: fold sizes, balance, groups (from names, oversized), how copies and
    near-duplicates were kept, and the validation/holdout images with a trained-on partner by any
    signal (leak_report: same source by name, byte-identical, near-duplicate joined or not)."""
    counts = folds[~folds.holdout].fold.value_counts()
    keys = folds.key.to_numpy()
    inside = pairs[pairs.key_a.isin(folds.key) & pairs.key_b.isin(folds.key)]
    side = folds.set_index("key")[["fold", "holdout"]]
    apart = (side.loc[inside.key_a].to_numpy() != side.loc[inside.key_b].to_numpy()).any(axis=1)
    joined_pairs = inside.joined.astype(bool).to_numpy() if "joined" in inside else np.ones(len(inside), bool)
    sets = {"same_source": [keys[list(g)] for g in links.named], "identical": [keys[list(g)] for g in links.identical],
            "near_dup": list(zip(inside.key_a, inside.key_b))}
    sizes = folds.groupby("group").size()
    summary = {"images": len(folds), "holdout_images": int(folds.holdout.sum()),
            "fold_images": {str(k): int(n) for k, n in sorted(counts.items()) if k >= 0}, "balance": balance,
            "groups": {"groups": int(len(sizes)), "from_names": len(links.named),
                       "images_in_named_groups": int(sum(len(g) for g in links.named)),
                       "largest": int(sizes.max()) if len(sizes) else 0, "oversized": oversized_groups(folds)},
            "duplicate_images": sum(len(c) - 1 for c in links.identical), "duplicates_apart": duplicates_apart(folds),
            "near_dups": {"joined": joined, "pairs": int(len(inside)), "pairs_joined": int(joined_pairs.sum()),
                          "pairs_apart": int(apart.sum())},
            **leak_report(folds, sets)}
    return {**summary, "warnings": split_warnings(summary)}


def split_dataset(ds: Dataset, s: Split, val_source: Optional[str], pairs: pd.DataFrame
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Stage split's one call: link images by every signal (the same file under two names, an
    exporter's named copies, near-duplicate `pairs` whose pixels agree), draw folds that keep the linked
    images together, and compare them with random KFold. Returns (folds, balance table, summary)."""
    links = Links(identical=identical_files(ds.images.path), named=copies_by_name(ds.images.file_name),
                  near=near_pairs(ds.images.key, pairs))
    folds = make_folds(ds, s, val_source, links.joining(s.copies_by_name, s.joins_near_dups))
    table, balance = balance_report(ds, folds, s)
    return folds, table, split_summary(folds, balance, links, pairs, s.joins_near_dups)


def fold_balance(fold: np.ndarray, pool: np.ndarray, presence: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """Per validation fold: how far its class mix and object share stray from the pool's.

    fold: (N,) fold index per image (-1 = not validated); pool: (N,) bool, images that take part
    (not held out). Returns one row per fold: images, objects, class_dev (mean |presence rate in
    the fold - rate in the pool| over classes present in the pool), object_dev (|fold's share of
    objects - its share of images|), missing_classes (pool classes absent from the fold).
    """
    p_pool = presence[pool].mean(axis=0)
    present = p_pool > 0
    rows = []
    for k in sorted(set(fold[pool]) - {-1}):
        val = pool & (fold == k)
        p_fold = presence[val].mean(axis=0)
        rows.append(dict(fold=int(k), images=int(val.sum()), objects=int(counts[val].sum()),
                         class_dev=float(np.abs(p_fold - p_pool)[present].mean()) if present.any() else 0.0,
                         object_dev=float(abs(counts[val].sum() / max(counts[pool].sum(), 1) - val.sum() / pool.sum())),
                         missing_classes=int((present & (p_fold == 0)).sum())))
    return pd.DataFrame(rows)


def balance_report(ds: Dataset, folds: pd.DataFrame, s: Split) -> tuple[pd.DataFrame, dict]:
    """Balance of the chosen folds vs plain random KFold on the same (non-holdout) images.

    For 'given', the baseline is a random split with the same number of validation images.
    Returns (per-fold table with a `strategy` column, summary dict for DVC/MLflow metrics).
    """
    presence, counts = label_matrix(ds)
    pool = ~folds.holdout.to_numpy()
    codes, n_groups, _, _ = _by_group(folds.group, presence, counts)
    rng_fold = np.full(len(folds), -1)
    g_pool = np.zeros(n_groups, bool)
    g_pool[codes[pool]] = True
    idx = np.nonzero(g_pool)[0]
    if s.strategy == "given":
        n_val = (folds.fold.to_numpy() == 0).sum()
        _, test = next(ShuffleSplit(1, test_size=int(n_val), random_state=s.seed).split(idx))
        g_rand = np.full(n_groups, -1)
        g_rand[idx[test]] = 0
    else:
        g_rand = np.full(n_groups, -1)
        g_rand[idx] = _kfold("random", s.n_folds, s.seed, np.zeros((len(idx), 1)))
    rng_fold = g_rand[codes]
    chosen = fold_balance(folds.fold.to_numpy(), pool, presence, counts).assign(strategy=s.strategy)
    random = fold_balance(rng_fold, pool, presence, counts).assign(strategy="random_baseline")
    table = pd.concat([chosen, random], ignore_index=True)
    summary = {
        "class_dev": float(chosen.class_dev.mean()), "random_class_dev": float(random.class_dev.mean()),
        "object_dev": float(chosen.object_dev.mean()), "random_object_dev": float(random.object_dev.mean()),
        "missing_classes": int(chosen.missing_classes.sum()), "random_missing_classes": int(random.missing_classes.sum()),
    }
    return table, summary


def plot_balance(ds: Dataset, folds: pd.DataFrame, out: Path) -> Path:
    """Heatmap: class presence rate per validation fold (rows) vs the pool (last row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presence, _ = label_matrix(ds)
    pool = ~folds.holdout.to_numpy()
    fold = folds.fold.to_numpy()
    ks = sorted(set(fold[pool]) - {-1})
    rates = np.array([presence[pool & (fold == k)].mean(axis=0) for k in ks] + [presence[pool].mean(axis=0)])
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * len(rates)))
    im = ax.imshow(rates, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(ds.classes) - 1), ds.classes[1:], rotation=45, ha="right")
    ax.set_yticks(range(len(rates)), [f"fold {k}" for k in ks] + ["all"])
    for (i, j), v in np.ndenumerate(rates):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k", fontsize=7)
    fig.colorbar(im, ax=ax, label="share of images containing the class")
    ax.set_title("Class presence per validation fold")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
