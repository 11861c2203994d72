"""Turn a YOLO-segmentation export (data.yaml; <split>/images/*.jpg with <split>/labels/*.txt of
`class x1 y1 x2 y2 ...`, coordinates as fractions of the image) into COCO jsons beside the images,
so `bench.near_dups --data` can measure it (the trash-bag export of docs/data.md was published this way).
Writes <split>/images/_annotations.coco.json; category ids are the YOLO class + 1 (0 = a parent).

    python -m bench.yolo_seg_to_coco ROOT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from PIL import Image


def convert(root: Path) -> None:
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    for split in ("train", "valid", "test"):
        folder = root / split
        if not folder.exists():
            continue
        images, annotations = [], []
        for i, path in enumerate(sorted((folder / "images").glob("*.jpg"))):
            w, h = Image.open(path).size
            images.append(dict(id=i, file_name=path.name, width=w, height=h))
            label = folder / "labels" / f"{path.stem}.txt"
            for line in label.read_text().splitlines() if label.exists() else []:
                v = line.split()
                if len(v) < 7:          # a class and at least three points
                    continue
                xy = [float(c) * (w if k % 2 == 0 else h) for k, c in enumerate(v[1:])]
                xs, ys = xy[0::2], xy[1::2]
                annotations.append(dict(id=len(annotations), image_id=i, category_id=int(v[0]) + 1, iscrowd=0,
                                        segmentation=[xy], area=0,
                                        bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]))
        categories = [dict(id=0, name="objects", supercategory="none")] + [
            dict(id=k + 1, name=n, supercategory="objects") for k, n in enumerate(names)]
        out = folder / "images" / "_annotations.coco.json"
        out.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
        print(f"{out}: {len(images)} images, {len(annotations)} annotations")


if __name__ == "__main__":
    convert(Path(sys.argv[1]))
