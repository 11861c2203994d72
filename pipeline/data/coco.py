"""COCO json -> validated tables. Categories are mapped by their position in the `categories` list.

Class index = position of the category's *name* among the unique names, in list order, + 1;
background is 0. Raw category ids are never used as class indices (real datasets use id 0 as a
real class, skip ids, or repeat names).

Every problem found is one row of `Dataset.issues` with the json file, image id, annotation id and
a plain-language detail. Rows have a severity:
  - "error": the record is unusable (e.g. unknown category id, missing image file). With
    `strict=True` loading stops with a DataError listing all of them; with `strict=False` the
    record is skipped and the row stays in the EDA report.
  - "info": worth knowing, nothing lost (image without annotations, duplicate category names that
    are merged, a polygon part with fewer than 3 points, which covers no area anyway).
The user's files are only ever read.
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional, Sequence

import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.data.rle import compressed_rle_counts
from pipeline.labels import BACKGROUND, IGNORE_INDEX, MAX_CLASSES

MAX_SIDE_PX = 1_000_000          # a json width/height beyond this is a typo or an attack, not a photo
ISSUE_COLUMNS = ["severity", "kind", "file", "image_id", "ann_id", "detail", "action"]


class DataError(ValueError):
    """The dataset cannot be used as given; the message names the file and the ids."""


@dataclass
class Dataset:
    """The labelled pool (train json + optional val json), validated.

    images: one row per usable image: key (unique, = normalised file_name), image_id, source
        (json file name), file_name, width, height, path (absolute image path), plus any extra
        image fields from the json (for grouping).
    annotations: one row per usable annotation: ann_id, key (image), class_idx (1..K), iscrowd,
        segmentation (polygon list or RLE dict, as in the json), json_area.
    classes: ["Background", name_1, ..., name_K].
    issues: ISSUE_COLUMNS, every problem and note found.
    """

    images: pd.DataFrame
    annotations: pd.DataFrame
    classes: list[str]
    issues: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ISSUE_COLUMNS))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def annotations_by_key(self) -> dict[str, pd.DataFrame]:
        return {k: g for k, g in self.annotations.groupby("key", sort=False)}


class _Issues:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, severity: str, kind: str, file: str, detail: str, image_id: Any = None, ann_id: Any = None) -> None:
        """An error (the record is skipped, or the load stops when strict) or an info note."""
        self.rows.append(dict(severity=severity, kind=kind, file=file, image_id=image_id,
                              ann_id=ann_id, detail=detail, action="skipped" if severity == "error" else "noted"))

    def frame(self) -> pd.DataFrame:
        """Ids stay as the json wrote them (object dtype): 1, not 1.0; missing ones are empty, not NaN."""
        frame = pd.DataFrame(self.rows, columns=ISSUE_COLUMNS)
        for col in ("image_id", "ann_id"):
            frame[col] = pd.Series([r[col] for r in self.rows], dtype=object, index=frame.index)
        return frame


def read_json(path: Path, labelled: bool = True) -> dict:
    """Parse a COCO json file; a clear DataError if it is missing, not JSON, or lacks the keys
    (`annotations` is required of a labelled file: without it every mask would be background)."""
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'categories', got {type(raw).__name__}")
    for key in ("images", "categories") + (("annotations",) if labelled else ()):
        if key not in raw:
            raise DataError(f"{path}: missing top-level key {key!r} (COCO needs images, annotations, categories)")
        if not isinstance(raw[key], list):
            raise DataError(f"{path}: {key!r} must be a list, got {type(raw[key]).__name__}")
    if not isinstance(raw.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' must be a list, got {type(raw['annotations']).__name__}")
    return raw


def class_names(categories: list, file: str, issues: _Issues) -> tuple[list[str], dict[int, int]]:
    """categories list -> (["Background", unique names...], {raw category id: class index})."""
    names: list[str] = [BACKGROUND]
    by_name: dict[str, int] = {}
    id_to_class: dict[int, int] = {}
    id_to_name: dict[int, str] = {}
    for pos, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(f"{file}: categories[{pos}] needs an integer 'id' and a string 'name', got {cat!r}")
        cid, name = int(cat["id"]), cat["name"].strip()
        if cid in id_to_name:
            if id_to_name[cid] != name:
                raise DataError(f"{file}: category id {cid} is used for both {id_to_name[cid]!r} and {name!r}")
            continue
        if name.lower() == BACKGROUND.lower():
            # Some datasets list the background explicitly; it is class 0 already.
            issues.add("info", "background_category", file, f"category id {cid} {name!r} mapped to class 0")
            id_to_class[cid], id_to_name[cid] = 0, name
            continue
        if name in by_name:
            issues.add("info", "duplicate_category_name", file,
                       f"category id {cid} repeats the name {name!r}; merged into class {by_name[name]}")
        else:
            by_name[name] = len(names)
            names.append(name)
        id_to_class[cid], id_to_name[cid] = by_name[name], name
    if len(names) == 1:
        raise DataError(f"{file}: 'categories' is empty; cannot map annotations to classes")
    if len(names) - 1 > MAX_CLASSES:
        raise DataError(f"{file}: {len(names) - 1} distinct category names; masks are uint8, so at most {MAX_CLASSES} "
                        f"classes fit beside background (0) and ignore ({IGNORE_INDEX}). Merge categories "
                        "(e.g. by supercategory) in a copy of the json")
    return names, id_to_class


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> Optional[float]:
    """A json number as float, or None (missing, not a number, or beyond float range)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) else None


def _finite(v: Any) -> bool:
    """A json number usable as a coordinate: not NaN/inf, and not an integer beyond float range (10**400)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def safe_relpath(file_name: Any) -> Optional[str]:
    """Normalised relative POSIX path, or None if it is absolute or escapes its folder."""
    if not isinstance(file_name, str) or not file_name.strip():
        return None
    p = PurePosixPath(file_name.replace("\\", "/"))
    if p.is_absolute() or (len(file_name) > 1 and file_name[1] == ":") or ".." in p.parts:
        return None
    return str(p)


def check_segmentation(seg: Any, h: int, w: int) -> tuple[Optional[str], list[str]]:
    """Validate one annotation's segmentation against its image size.

    Returns (problem, notes): problem is None if usable; notes are harmless findings.
    """
    notes: list[str] = []
    if isinstance(seg, list):
        if not seg:
            return "empty segmentation []", notes
        if all(isinstance(v, (int, float)) for v in seg):
            seg = [seg]  # a single flat polygon without the outer list
        good = 0
        xs: list[float] = []
        ys: list[float] = []
        for i, part in enumerate(seg):
            if not isinstance(part, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part):
                return f"polygon part {i} is not a list of numbers", notes
            if not all(_finite(v) for v in part):
                return f"polygon part {i} has NaN, infinite or out-of-range coordinates", notes
            if len(part) % 2:
                return f"polygon part {i} has an odd number of coordinates ({len(part)})", notes
            if len(part) < 6:
                notes.append(f"polygon part {i} has {len(part) // 2} point(s) (< 3), covers no area: dropped")
                continue
            good += 1
            xs += part[0::2]
            ys += part[1::2]
        if not good:
            return "no polygon part has 3 or more points", notes
        if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= w or min(ys) >= h:
            return f"polygon lies entirely outside the {w}x{h} image", notes
        if min(xs) < 0 or min(ys) < 0 or max(xs) > w or max(ys) > h:
            notes.append("polygon extends outside the image: clipped")
        return None, notes
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"RLE 'size' must be [height, width], got {size!r}", notes
        if list(size) != [h, w]:
            return f"RLE size {size} differs from the image size [{h}, {w}]", notes
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                return "RLE counts must be non-negative integers", notes
            if sum(counts) != h * w:
                return f"RLE counts sum to {sum(counts)}, expected height*width = {h * w}", notes
        elif not isinstance(counts, (str, bytes)) or not counts:
            return "RLE 'counts' must be a list of ints or a compressed string", notes
        else:  # pycocotools trusts a compressed string: a malformed one reads past its buffer (segfault)
            runs = compressed_rle_counts(counts)
            if runs is None or min(runs) < 0:
                return "RLE compressed 'counts' string is malformed", notes
            if sum(runs) != h * w:
                return f"RLE counts sum to {sum(runs)}, expected height*width = {h * w}", notes
        return None, notes
    return f"segmentation must be a polygon list or an RLE dict, got {type(seg).__name__}", notes


def _image_records(raw: dict, file: str, source: str, root: Path, image_dir: str, issues: _Issues) -> list[dict]:
    """Usable image rows; key = the image's path under root (image_dir/file_name, normalised), unique
    across json files even when each file's images live in a folder of their own."""
    rows = []
    seen: dict[int, int] = {}
    for pos, im in enumerate(raw["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            issues.add("error", "bad_image_record", file, f"images[{pos}] has no integer 'id': {str(im)[:80]}")
            continue
        iid = int(im["id"])
        w, h = im.get("width"), im.get("height")
        if not (_is_int(w) and _is_int(h) and 0 < w <= MAX_SIDE_PX and 0 < h <= MAX_SIDE_PX):
            issues.add("error", "bad_image_size", file,
                       f"width/height must be integers in 1..{MAX_SIDE_PX}, got {str(w)[:20]!r}x{str(h)[:20]!r}", iid)
            continue
        rel = safe_relpath(im.get("file_name"))
        if rel is None:
            issues.add("error", "unsafe_file_name", file,
                       f"file_name {im.get('file_name')!r} is empty, absolute or leaves the data folder", iid)
            continue
        seen[iid] = seen.get(iid, 0) + 1
        extra = {k: v for k, v in im.items() if k not in ("id", "file_name", "width", "height")
                 and isinstance(v, (str, int, float))}
        key = str(PurePosixPath(image_dir.replace("\\", "/"), rel)) if image_dir else rel
        rows.append(dict(extra, key=key, image_id=iid, source=source, file_name=rel, width=w, height=h,
                         path=str(root / key)))
    dupes = {i for i, n in seen.items() if n > 1}
    for iid in sorted(dupes):
        issues.add("error", "duplicate_image_id", file,
                   f"image id {iid} is used by {seen[iid]} images; its annotations are ambiguous", iid)
    return [r for r in rows if r["image_id"] not in dupes]


def _annotation_records(raw: dict, file: str, images: dict[int, dict], id_to_class: dict[int, int],
                        issues: _Issues) -> list[dict]:
    rows = []
    first_seen: dict[Any, dict] = {}
    for pos, ann in enumerate(raw.get("annotations", [])):
        if not isinstance(ann, dict):
            issues.add("error", "bad_annotation_record", file, f"annotations[{pos}] is not an object")
            continue
        aid, iid, cid = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        if not _is_int(iid) or int(iid) not in images:
            issues.add("error", "unknown_image_id", file, f"annotation refers to image id {iid!r}, not in 'images'"
                       " (or that image was skipped)", iid, aid)
            continue
        im = images[int(iid)]
        if not _is_int(cid) or int(cid) not in id_to_class:
            issues.add("error", "unknown_category_id", file,
                       f"category_id {cid!r} is not in 'categories' (ids: {sorted(id_to_class)})", iid, aid)
            continue
        problem, notes = check_segmentation(ann.get("segmentation"), im["height"], im["width"])
        for note in notes:
            issues.add("info", "polygon_note", file, note, iid, aid)
        if problem:
            issues.add("error", "bad_segmentation", file, problem, iid, aid)
            continue
        bbox = ann.get("bbox")
        if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and _finite(v) for v in bbox):
            x, y, bw, bh = bbox   # 1 px of rounding either side is not "outside"
            if x < -1 or y < -1 or x + bw > im["width"] + 1 or y + bh > im["height"] + 1:
                issues.add("info", "bbox_outside_image", file, f"bbox {bbox} exceeds the image (bbox is not used)", iid, aid)
        rec = dict(ann_id=aid, key=im["key"], class_idx=id_to_class[int(cid)], iscrowd=int(bool(ann.get("iscrowd", 0))),
                   segmentation=ann["segmentation"], json_area=_number(ann.get("area")))
        if aid in first_seen:
            prev = first_seen[aid]
            same = (prev["key"], prev["class_idx"], prev["segmentation"]) == (rec["key"], rec["class_idx"], rec["segmentation"])
            if same:
                issues.add("info", "duplicate_annotation", file, f"annotation id {aid} repeated verbatim: copy dropped", iid, aid)
                continue
            issues.add("info", "duplicate_annotation_id", file,
                       f"annotation id {aid} is reused by different annotations: both kept", iid, aid)
        else:
            first_seen[aid] = rec
        rows.append(rec)
    return rows


JPEG_EOI, PNG_IEND = b"\xff\xd9", b"IEND\xaeB`\x82"
TAIL_BYTES = 1 << 16


def truncated(path: str, fmt: Optional[str]) -> Optional[str]:
    """Why the image file is cut short, or None if it is whole.

    Decoders fill a truncated JPEG with gray and succeed, so the end of the file is checked: a JPEG's
    entropy-coded data cannot contain the end-of-image marker, so finding it in the last 64 KB proves
    the scan finished; a PNG ends with its IEND chunk. Only when that quick look fails (or for other
    formats) is the whole image decoded, which then decides."""
    if fmt in ("JPEG", "MPO", "PNG"):
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            tail = f.read()
        if (JPEG_EOI if fmt != "PNG" else PNG_IEND) in tail:
            return None
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError) as e:
        return str(e)
    return None


def check_image_files(images: pd.DataFrame, issues: _Issues) -> pd.DataFrame:
    """Each image file must be a regular file whose header matches the json and whose data is whole
    (see `truncated`). Headers are read, pixels are not decoded unless the quick end check fails."""
    keep = []
    for row in images.itertuples(index=False):
        keep.append(_check_image_file(row, issues))
    return images[keep] if len(images) else images


def _check_image_file(row: Any, issues: _Issues) -> bool:
    file, iid = row.source, row.image_id
    try:
        mode = os.stat(row.path).st_mode
    except FileNotFoundError:
        issues.add("error", "missing_image", file, f"image file {row.path} not found", iid)
        return False
    except OSError as e:
        issues.add("error", "corrupt_image", file, f"image file {row.path} cannot be read: {e}", iid)
        return False
    if not stat.S_ISREG(mode):   # a FIFO or device would block the reader forever
        issues.add("error", "not_a_file", file, f"{row.path} is not a regular file (a folder, FIFO or device)", iid)
        return False
    try:
        with Image.open(row.path) as im:
            size, fmt = im.size, im.format
            orientation = im.getexif().get(0x0112, 1)
    except Image.DecompressionBombError as e:
        issues.add("error", "image_too_large", file, f"image file {row.path}: {e}", iid)
        return False
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        issues.add("error", "corrupt_image", file, f"image file {row.path} cannot be read: {e}", iid)
        return False
    if size != (row.width, row.height):
        if orientation in (5, 6, 7, 8) and size == (row.height, row.width):
            issues.add("info", "exif_rotated", file,
                       f"{row.file_name} is stored {size[0]}x{size[1]} with EXIF rotation; json size matches the rotated view", iid)
        else:
            issues.add("error", "image_size_mismatch", file,
                       f"{row.file_name} is {size[0]}x{size[1]} but the json says {row.width}x{row.height}", iid)
            return False
    cut = truncated(row.path, fmt)
    if cut:
        issues.add("error", "corrupt_image", file, f"image file {row.path} is truncated or corrupt ({cut})", iid)
        return False
    return True


def _fmt_id(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)[:24]


def describe_errors(issues: pd.DataFrame, limit: int = 25) -> str:
    """The error rows as lines naming file, kind, image id and annotation id."""
    errors = issues[issues.severity == "error"]
    lines = [f"{r.file}: {r.kind}: image_id={_fmt_id(r.image_id)} ann_id={_fmt_id(r.ann_id)}: {r.detail}"
             for r in errors.head(limit).itertuples()]
    more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
    return "  " + "\n  ".join(lines) + more


def raise_on_errors(issues: pd.DataFrame, what: str, limit: int = 25) -> None:
    errors = issues[issues.severity == "error"]
    if errors.empty:
        return
    raise DataError(f"{what}: {len(errors)} problem(s) in the dataset:\n" + describe_errors(issues, limit) +
                    "\nFix them, or set data.strict: false to skip these records and list them in the EDA report.")


def load_dataset(root: str | Path, json_files: Iterable[str], image_dir: str | Sequence[str] = "", strict: bool = True,
                 check_files: bool = True) -> Dataset:
    """Load and validate the labelled pool from one or more COCO json files under `root`.

    image_dir: the folder (under root) holding the images of every json file, or one folder per json
    file (the standard COCO layout: images/train2017, images/val2017; Roboflow: beside each json).
    All files must share the same category names (in order); image keys (image_dir/file_name) must be
    unique across files. With strict=True any "error" issue raises DataError listing them all.
    """
    root = Path(root)
    json_files = list(json_files)
    dirs = [image_dir] * len(json_files) if isinstance(image_dir, str) else list(image_dir)
    if len(dirs) != len(json_files):
        raise ValueError(f"{len(json_files)} json files but {len(dirs)} image folders")
    issues = _Issues()
    classes: Optional[list[str]] = None
    all_images: list[dict] = []
    all_anns: list[dict] = []
    for name, folder in zip(json_files, dirs):
        path = root / name
        raw = read_json(path)
        file = name
        names, id_to_class = class_names(raw["categories"], file, issues)
        if classes is None:
            classes = names
        elif names != classes:
            raise DataError(f"{file}: categories {names[1:]} differ from those of the first json file {classes[1:]}")
        imgs = _image_records(raw, file, file, root, folder, issues)
        by_id = {r["image_id"]: r for r in imgs}
        all_anns += _annotation_records(raw, file, by_id, id_to_class, issues)
        all_images += imgs
    images = pd.DataFrame(all_images)
    if images.empty:
        raise DataError(f"{root}: no usable images in {json_files}; an empty dataset cannot be split or trained on"
                        + (":\n" + describe_errors(issues.frame()) if issues.rows else ""))
    dup = images.key.duplicated(keep=False)
    for r in images[dup].itertuples():
        issues.add("error", "duplicate_file_name", r.source, f"image {r.key!r} appears more than once", r.image_id)
    images = images[~dup]
    if check_files:
        images = check_image_files(images, issues)
    anns = pd.DataFrame(all_anns, columns=["ann_id", "key", "class_idx", "iscrowd", "segmentation", "json_area"])
    anns = anns[anns.key.isin(set(images.key))]
    annotated = set(anns.key)
    for r in images.itertuples():
        if r.key not in annotated:
            issues.add("info", "no_annotations", r.source, f"{r.file_name} has no annotations: kept as all background", r.image_id)
    frame = issues.frame()
    if strict:
        raise_on_errors(frame, str(root))
    if images.empty:   # lenient, yet nothing left: no EDA report will be written, so say it all here
        raise DataError(f"{root}: every image was skipped ({len(frame[frame.severity == 'error'])} problems):\n"
                        + describe_errors(frame))
    return Dataset(images=images.reset_index(drop=True), annotations=anns.reset_index(drop=True),
                   classes=classes or [BACKGROUND], issues=frame)


def load_test_set(data: Any) -> pd.DataFrame:
    """The test json's images (json order), checked like the labelled ones; any problem is an error,
    since a submission needs every test image. Columns: image_id (the json's file_name, as the
    submission names it), key, path, width, height, id (the json's image id)."""
    if not data.test_json:
        raise DataError("data.test_json is null: there are no test images")
    root, file = Path(data.root), data.test_json
    raw = read_json(root / file, labelled=False)
    issues = _Issues()
    rows = pd.DataFrame(_image_records(raw, file, file, root, data.images_of("test"), issues))
    if not rows.empty:
        for r in rows[rows.key.duplicated(keep=False)].itertuples():
            issues.add("error", "duplicate_file_name", file, f"image {r.key!r} appears more than once", r.image_id)
        rows = check_image_files(rows[~rows.key.duplicated(keep=False)], issues)
    frame = issues.frame()
    if (frame.severity == "error").any():
        raise DataError(f"{root / file}: {int((frame.severity == 'error').sum())} unusable test image(s) "
                        "(a submission needs every one):\n" + describe_errors(frame))
    if rows.empty:
        raise DataError(f"{root / file}: no test images")
    return pd.DataFrame({"image_id": rows.file_name, "key": rows.key, "path": rows.path, "width": rows.width,
                         "height": rows.height, "id": rows.image_id}).reset_index(drop=True)
