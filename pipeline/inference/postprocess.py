"""What happens between the ensemble's probabilities and the class map: a dense CRF (optional) and
post-processing rules fitted out of fold (nnU-Net's rule: keep a rule only if no class gets worse).

Rules, per class c (fitted by pipeline/evaluation/rules.py on out-of-fold probabilities, saved as
json, applied by submit, predict and the MLflow model through `Refiner`):

  bias[c]       added to log P[c] before the argmax (a class the models under- or over-call);
  min_size[c]   connected regions of c smaller than this fraction of the image are removed (their
                pixels take their next most probable class): speckles, not objects;
  fill_holes[c] background enclosed by c becomes c (an object's interior the models missed).

Sizes are fractions of the image, so rules fitted at the out-of-fold resolution apply at any size.

Dense CRF (Krähenbühl & Koltun 2011, pydensecrf2): a Gaussian smoothness kernel and a bilateral
appearance kernel (pixels alike in colour and near each other prefer one label) refine the
probabilities, at the probabilities' resolution, before the rules.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import cv2
import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from pipeline.config import CrfSection


EPS = 1e-4


@dataclass
class Rules:
    bias: list[float]
    min_size: list[float]
    fill_holes: list[bool]

    @classmethod
    def none(cls, n: int) -> "Rules":
        return cls([0.0] * n, [0.0] * n, [False] * n)

    @property
    def active(self) -> bool:
        return any(self.bias) or self.shapes

    @property
    def shapes(self) -> bool:
        """Whether any rule works on regions (sizes, holes) rather than on the probabilities alone."""
        return any(self.min_size) or any(self.fill_holes)

    def changed(self, c: int, **kw) -> "Rules":
        r = Rules(list(self.bias), list(self.min_size), list(self.fill_holes))
        for k, v in kw.items():
            getattr(r, k)[c] = v
        return r

    def describe(self, classes: list[str]) -> list[str]:
        out = [f"{classes[c]}: bias {b:+.1f}" for c, b in enumerate(self.bias) if b]
        out += [f"{classes[c]}: remove regions < {s:.2%} of the image" for c, s in enumerate(self.min_size) if s]
        return out + [f"{classes[c]}: fill holes" for c, f in enumerate(self.fill_holes) if f]


def apply_rules(prob: np.ndarray, rules: Rules) -> np.ndarray:
    """(C, H, W) probabilities -> (H, W) uint8 class map under `rules`."""
    return decide(log_probs(prob), rules)


def log_probs(prob: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 log(P + EPS): what the rules work on (computed once per image by the search)."""
    return np.log(np.asarray(prob, dtype=np.float32) + EPS)


def decide(logp: np.ndarray, rules: Rules) -> np.ndarray:
    """(C, H, W) log-probabilities -> (H, W) uint8 class map under `rules`."""
    if any(rules.bias):
        logp = logp + np.asarray(rules.bias, dtype=np.float32)[:, None, None]
    pred = logp.argmax(0).astype(np.uint8)
    area = pred.size
    for c, frac in enumerate(rules.min_size):
        if not frac or not (pred == c).any():
            continue
        n, comp, stats, _ = cv2.connectedComponentsWithStats((pred == c).astype(np.uint8), connectivity=8)
        small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] < frac * area) + 1
        if len(small):
            gone = np.isin(comp, small)
            others = logp[:, gone].copy()
            others[c] = -np.inf
            pred[gone] = others.argmax(0)
    for c, fill in enumerate(rules.fill_holes):
        if fill and c and (pred == c).any():
            holes = ndimage.binary_fill_holes(pred == c) & (pred == 0)
            pred[holes] = c
    return pred


@dataclass
class Crf:
    iterations: int = 5
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    sxy: float = 50.0
    srgb: float = 13.0
    compat: float = 5.0


def crf_refine(prob: np.ndarray, image: np.ndarray, crf: Crf) -> np.ndarray:
    """(C, H, W) probabilities refined by a dense CRF over `image` ((h, w, 3) uint8 RGB, resized to H x W)."""
    import pydensecrf.densecrf as dcrf   # pydensecrf2 (requirements.txt): imported only when CRF is on
    from pydensecrf.utils import unary_from_softmax

    c, h, w = prob.shape
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.clip(prob, EPS, 1.0).astype(np.float32))))
    d.addPairwiseGaussian(sxy=crf.gauss_sxy, compat=crf.gauss_compat)
    d.addPairwiseBilateral(sxy=crf.sxy, srgb=crf.srgb, rgbim=np.ascontiguousarray(image), compat=crf.compat)
    return np.asarray(d.inference(crf.iterations), dtype=np.float32).reshape(c, h, w)


@dataclass
class Refiner:
    """Probabilities -> class map: CRF (when set), then the rules (when any)."""
    rules: Optional[Rules] = None
    crf: Optional[Crf] = None

    def __call__(self, prob: np.ndarray, image: Callable[[], np.ndarray]) -> np.ndarray:
        if self.crf is not None:
            prob = crf_refine(prob, image(), self.crf)
        if self.rules is not None and self.rules.active:
            return apply_rules(prob, self.rules)
        return np.asarray(prob).argmax(0).astype(np.uint8)

    def to_json(self) -> dict:
        return {"rules": asdict(self.rules) if self.rules else None, "crf": asdict(self.crf) if self.crf else None}

    @classmethod
    def from_json(cls, d: dict) -> "Refiner":
        return cls(Rules(**d["rules"]) if d.get("rules") else None, Crf(**d["crf"]) if d.get("crf") else None)

    @classmethod
    def load(cls, path: str | Path) -> "Refiner":
        return cls.from_json(json.loads(Path(path).read_text()))

    @property
    def active(self) -> bool:
        return self.crf is not None or (self.rules is not None and self.rules.active)


def crf_of(section: "CrfSection") -> Crf:
    """params' infer.crf section -> its Crf settings (whether or not it is enabled)."""
    return Crf(**section.model_dump(exclude={"enabled"}))
