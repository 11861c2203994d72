"""The only reader of params.yaml: a frozen, typed tree that rejects unknown keys and bad values.

`load_params()` validates the whole file before any stage does work, so a typo anywhere fails at
start-up with the key's dotted path and the valid choices. Stages then take a *view* of the
sections they declared in dvc.yaml (`Params.only(...)`): reading any other section raises, which
keeps dvc.yaml's `params:` lists honest (tests/test_dvc_contract.py checks both sides).
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"
CORRECTIONS_DIR = "corrections"   # label fixes live here (data.corrections); dvc.yaml's masks stage depends on it

# Each family's names live once, as the keys of the literal dict in the module that owns the family
# (smp's MODEL_ARCHITECTURES_MAPPING habit). The config reads those keys from the module's source
# instead of importing it: config must load without torch (EDA, split, the leaderboard and the report
# never import it). tests/test_config.py checks each read against the imported dict.
REGISTRIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "model": ("models/factory.py", ("MODELS",)),
    "loss": ("models/losses.py", ("LOSSES",)),
    "optimizer": ("training/optim.py", ("OPTIMIZERS",)),
    "scheduler": ("training/optim.py", ("SCHEDULERS",)),
    "augmentation": ("data/augment.py", ("AUGMENTATIONS",)),
    "TTA view": ("inference/tta.py", ("TTA", "TTA_GROUPS")),
    "loss without class weights": ("models/losses.py", ("NO_CLASS_WEIGHTS",)),
}


@functools.cache
def registry_names(family: str) -> tuple[str, ...]:
    """The names a registry holds: the string keys (or members) of its literal dicts (sets), in order."""
    file, variables = REGISTRIES[family]
    found: dict[str, tuple[str, ...]] = {}
    for node in ast.parse((Path(__file__).parent / file).read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id in variables and isinstance(node.value, (ast.Dict, ast.Set)):
            keys = node.value.keys if isinstance(node.value, ast.Dict) else node.value.elts
            found[target.id] = tuple(k.value for k in keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    missing = [v for v in variables if v not in found]
    if missing:   # a registry written as something other than a literal dict: a developer's error
        raise RuntimeError(f"pipeline/{file}: {', '.join(missing)} must be a literal dict with string keys")
    return tuple(n for v in variables for n in found[v])


def _registered(family: str):
    def check(name: str) -> str:
        if name not in registry_names(family):
            raise ValueError(f"unknown {family} {name!r}; valid: {', '.join(sorted(registry_names(family)))}")
        return name
    return AfterValidator(check)


ModelName = Annotated[str, _registered("model")]
LossName = Annotated[str, _registered("loss")]
OptimizerName = Annotated[str, _registered("optimizer")]
SchedulerName = Annotated[str, _registered("scheduler")]
AugName = Annotated[str, _registered("augmentation")]
TtaView = Annotated[str, _registered("TTA view")]


class ConfigError(ValueError):
    """params.yaml is unreadable or invalid; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    demo: str = "data/demo"
    masks: str = "data/masks"
    eda: str = "reports/eda"
    near_dups: str = "reports/near_dups"
    split: str = "data/split"
    metrics: str = "metrics"
    models: str = "models"
    plots: str = "plots"
    reports: str = "reports"
    submission: str = "submission"
    pseudo: str = "data/pseudo"
    models_round2: str = "models_round2"
    oof: str = "data/oof"
    blend: str = "data/blend"


class Demo(_Section):
    n_train: int = Field(64, ge=4)
    n_test: int = Field(12, ge=0)
    image_size: int = Field(128, ge=32, le=2048)
    seed: int = 0
    label_noise: float = Field(0.06, ge=0, le=0.5)


class Data(_Section):
    root: str = "data/demo"
    # One folder for every json's images, or one per json (COCO: {train: images/train2017, val: ...};
    # Roboflow: {train: train, val: valid, test: test}); roles left out of the mapping use root itself.
    image_dir: str | dict[Literal["train", "val", "test"], str] = ""
    train_json: str = "train.json"
    val_json: Optional[str] = None
    test_json: Optional[str] = "test.json"
    strict: bool = True
    corrections: list[str] = Field(default_factory=list)

    @field_validator("corrections")
    @classmethod
    def _under_corrections(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if Path(f).parts[:1] != (CORRECTIONS_DIR,) or not f.endswith((".csv", ".json"))]
        if bad:
            raise ValueError(f"corrections {bad}: each must be a .csv or .json under {CORRECTIONS_DIR}/ (the folder "
                             "DVC hashes for the masks stage)")
        return v

    def images_of(self, role: Literal["train", "val", "test"]) -> str:
        """The folder (under root) holding the images of the train, val or test json."""
        return self.image_dir if isinstance(self.image_dir, str) else self.image_dir.get(role, "")


class Runtime(_Section):
    """How the pipeline runs on this machine, not what it computes: no DVC stage declares this
    section, so changing it reruns no stage and retrains no model (a run's identity is its recipe).
    The sections that use a key read it through a property (train.workers is runtime.workers)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"   # training and inference
    devices: int = Field(1, ge=1)          # > 1: DDP, that many training processes under torchrun
    workers: int = Field(0, ge=0)          # training DataLoader processes; 0 = in the training process
    data_workers: int = Field(0, ge=0)     # masks, eda, near-dups processes; 0 = all cores
    infer_batch_size: int = Field(8, ge=1)
    gallery: int = Field(6, ge=0)          # validation images drawn per fold
    save_every_s: float = Field(30.0, ge=0)  # last.pt at most this often (and at every run state's end): an
                                           # interruption retrains at most this much; 0 = after every epoch


class _UsesRuntime(_Section):
    """A section some of whose settings live in `runtime:` (Params wires it in after validation)."""
    _runtime: Runtime = PrivateAttr(default_factory=Runtime)


class Masks(_UsesRuntime):
    overlap: Literal["smaller_on_top", "higher_class_wins"] = "smaller_on_top"
    unknown: Literal["keep", "background", "ignore"] = "keep"
    unknown_name: str = "UNKNOWN"
    max_side: Optional[int] = Field(None, ge=32)
    cache_images: bool = True

    @property
    def workers(self) -> int:
        return self._runtime.data_workers


class Eda(_Section):
    pass


class NearDups(_UsesRuntime):
    enabled: bool = True
    hash_distance: int = Field(8, ge=0, le=64)   # pHash bits that may differ (resizes, re-encodes, brightness)
    min_inliers: int = Field(20, ge=4)           # ORB matches agreeing on one affine map (crops)
    max_disagree: float = Field(0.1, ge=0, le=1)  # share of aligned cells that may differ for a pair to join
    side: int = Field(512, ge=64)                # long side the images are looked at
    n_features: int = Field(1000, ge=50)          # ORB keypoints per image (and as many on its mirror image)
    include_test: bool = True                    # also find test images that repeat labelled ones

    @property
    def workers(self) -> int:
        return self._runtime.data_workers


class GroupPattern(_Section):
    pattern: str   # regex on the json's file_name; its first capture is the group (images not matching: their own)

    @field_validator("pattern")
    @classmethod
    def _one_capture(cls, v: str) -> str:
        import re

        try:
            groups = re.compile(v).groups
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        if groups < 1:
            raise ValueError("needs a capture group, e.g. '^(.+)\\.rf\\.': its first capture names the group")
        return v


class Split(_Section):
    strategy: Literal["multilabel", "random", "given"] = "multilabel"
    n_folds: int = Field(2, ge=1)
    group: Optional[str | GroupPattern] = None   # null | folder | <image field> | {pattern: regex}
    copies_by_name: bool = True             # copies an exporter names as such (Roboflow's .rf.) share a group
    join_near_dups: Optional[bool] = None   # null: when group is null; true/false: always/never
    holdout: float = Field(0.1, ge=0.0, lt=0.9)
    seed: int = 42

    @property
    def joins_near_dups(self) -> bool:
        """join_near_dups, with null meaning: when no group is given."""
        return self.group is None if self.join_near_dups is None else self.join_near_dups

    @model_validator(mode="after")
    def _folds_fit_strategy(self) -> "Split":
        if self.strategy == "given" and self.n_folds != 1:
            raise ValueError("strategy 'given' uses val_json as the single validation fold: set n_folds: 1")
        if self.strategy != "given" and self.n_folds < 2:
            raise ValueError(f"strategy {self.strategy!r} needs n_folds >= 2")
        return self




class Ema(_Section):
    decay: float = Field(0.999, gt=0, lt=1)   # per optimizer step
    warmup: bool = True                      # decay ramps up as min(decay, (1 + n) / (10 + n)) over the first steps


class Train(_UsesRuntime):
    folds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(4, ge=1)
    image_size: int = Field(64, ge=32)
    input: Literal["resize", "crop"] = "resize"
    crop_scale: tuple[float, float] = (0.5, 2.0)
    slide_overlap: float = Field(0.333, ge=0, le=0.9)
    crop_infer: Literal["slide", "whole"] = "slide"
    optimizer: OptimizerName = "adamw"
    lookahead: bool = False
    lr: float = Field(3e-3, gt=0)
    encoder_lr: Optional[float] = Field(None, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: SchedulerName = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    accumulate: int = Field(1, ge=1)
    clip_grad: Optional[float] = Field(1.0, gt=0)
    amp: Literal["off", "bf16", "fp16"] = "bf16"
    channels_last: bool = False
    compile: bool = False
    loss: dict[LossName, float] = Field(default_factory=lambda: {"ce": 1.0, "dice": 0.5})
    class_weights: Literal["none", "inverse", "sqrt_inverse"] = "sqrt_inverse"
    boundary_width: int = Field(3, ge=1)
    boundary_weight: float = Field(2.0, ge=0)
    augment: list[AugName] = Field(default_factory=lambda: ["hflip", "vflip", "scale_rotate", "color"])
    cutmix: float = Field(0.0, ge=0, le=1)
    copy_paste: float = Field(0.0, ge=0, le=1)
    copy_paste_classes: Optional[list[str]] = None
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    deterministic: bool = True
    swa_epochs: int = Field(0, ge=0)
    ema: Optional[Ema] = Field(default_factory=Ema)   # null = off
    scales: Optional[list[float]] = None
    val_every: int = Field(1, ge=1)
    dropout: Optional[float] = Field(None, ge=0, lt=1)

    @field_validator("loss")
    @classmethod
    def _loss_not_empty(cls, v: dict) -> dict:
        if not v or not any(w > 0 for w in v.values()):
            raise ValueError("give at least one loss with a positive weight, e.g. {ce: 1.0}")
        return v

    @property
    def eval_size(self) -> Optional[int]:
        """What validation and inference resize images to: image_size, or None for a model trained on
        crops (whole images at the mask cache's resolution, by sliding windows)."""
        return None if self.input == "crop" else self.image_size

    @field_validator("scales")
    @classmethod
    def _scales_positive(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and (not v or min(v) <= 0):
            raise ValueError(f"scales must be a non-empty list of positive factors, got {v}")
        return v

    def batch_side(self, scale: float) -> int:
        """The input side of a batch trained at `scale` (train.scales): a multiple of 32, at least 32."""
        return max(32, int(round(self.image_size * scale / 32)) * 32)

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high, got {list(v)}")
        return v

    @property
    def workers(self) -> int:
        return self._runtime.workers

    @property
    def device(self) -> str:
        return self._runtime.device

    @property
    def devices(self) -> int:
        return self._runtime.devices

    @property
    def gallery(self) -> int:
        return self._runtime.gallery

    @property
    def save_every_s(self) -> float:
        return self._runtime.save_every_s

    def validates(self, epoch: int, epochs: int) -> bool:
        """Whether 0-based `epoch` of `epochs` is validated: every val_every-th, and always the last."""
        return (epoch + 1) % self.val_every == 0 or epoch + 1 == epochs

    @model_validator(mode="after")
    def _swa_fits(self) -> "Train":
        if self.swa_epochs > self.epochs:
            raise ValueError(f"swa_epochs {self.swa_epochs} > epochs {self.epochs}")
        return self

    @model_validator(mode="after")
    def _fold_list(self) -> "Train":
        if len(set(self.folds)) != len(self.folds) or min(self.folds) < 0:
            raise ValueError(f"folds must be distinct non-negative fold indices, got {self.folds}")
        return self

    @model_validator(mode="after")
    def _seed_list(self) -> "Train":
        if len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        return self


class CrfSection(_Section):
    enabled: bool = False        # refine the final ensemble's probabilities (submit, predict, MLflow model)
    iterations: int = Field(5, ge=1)
    gauss_sxy: float = Field(3.0, gt=0)    # smoothness kernel: reach (pixels) and weight
    gauss_compat: float = Field(3.0, ge=0)
    sxy: float = Field(50.0, gt=0)         # appearance kernel: reach (pixels), colour scale, weight
    srgb: float = Field(13.0, gt=0)
    compat: float = Field(5.0, ge=0)


class Infer(_UsesRuntime):
    # auto: the ensemble stage chooses round, checkpoints, TTA, scales, CRF and post-processing from the
    # out-of-fold predictions (reports/ensemble/choice.json); the values below are the fixed recipe it is
    # judged against on the holdout. fixed: these values are the final ensemble.
    choose: Literal["auto", "fixed"] = "auto"
    tta: list[TtaView] = Field(default_factory=lambda: ["identity", "hflip"], min_length=1)
    scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    checkpoints: list[Literal["best", "last", "swa", "ema"]] = Field(default_factory=lambda: ["best"], min_length=1)
    fold_weights: Optional[list[float]] = None
    amp: Literal["off", "bf16", "fp16"] = "bf16"
    round: Literal[1, 2] = 2
    postprocess: bool = True     # apply the rules the ensemble stage fits out of fold (none kept: no change)
    crf: CrfSection = CrfSection()

    @field_validator("scales")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if min(v) <= 0:
            raise ValueError(f"scales must be positive, got {v}")
        return v

    @property
    def batch_size(self) -> int:
        return self._runtime.infer_batch_size

    @property
    def device(self) -> str:
        return self._runtime.device


class Pseudo(_Section):
    threshold: float = Field(0.9, gt=0, le=1)
    min_kept: float = Field(0.5, ge=0, le=1)
    epochs: int = Field(1, ge=1)


class Oof(_Section):
    max_side: int = Field(128, ge=16)   # out-of-fold probabilities kept at most this many px a side


class Audit(_Section):
    min_confidence: float = Field(0.5, gt=0, le=1)
    min_area: int = Field(12, ge=1)
    top_k: int = Field(25, ge=1)
    gallery: int = Field(12, ge=0)


class Blend(_Section):
    experiments: list[str] = Field(default_factory=list)
    steps: int = Field(25, ge=1)


class MetricSection(_Section):
    kind: Literal["dataset", "per_image"] = "dataset"   # dataset-level mIoU | mean of per-image mIoU
    size: Literal[256, "native"] = "native"            # 256: maps resized nearest to 256x256 first
    bootstrap: int = Field(1000, ge=100)               # resamples of the images for 95 % intervals
    leaderboard_images: int = Field(410, ge=1)         # images per leaderboard half (public, private)
    seed: int = 0


class Submit(_Section):
    size: int = Field(256, ge=1)
    gallery: int = Field(8, ge=0)


# Keys that moved, and where to: the runtime section changes how the pipeline runs, not what it
# computes, and reruns nothing; the oof stage's size is its own (tuning the audit reran the OOF inference).
MOVED = {("train", "workers"): "runtime.workers", ("train", "device"): "runtime.device",
         ("train", "devices"): "runtime.devices", ("train", "gallery"): "runtime.gallery",
         ("infer", "batch_size"): "runtime.infer_batch_size", ("infer", "device"): "runtime.device",
         ("masks", "workers"): "runtime.data_workers", ("near_dups", "workers"): "runtime.data_workers",
         ("audit", "max_side"): "oof.max_side"}


class Params(_Section):
    model: ModelName = "unet"
    encoder: str = "resnet18"
    encoder_weights: Optional[Literal["imagenet"]] = None  # None: offline default; imagenet: online option
    paths: Paths = Paths()
    demo: Demo = Demo()
    data: Data = Data()
    masks: Masks = Masks()
    eda: Eda = Eda()
    near_dups: NearDups = NearDups()
    split: Split = Split()
    train: Train = Train()
    infer: Infer = Infer()
    pseudo: Pseudo = Pseudo()
    oof: Oof = Oof()
    audit: Audit = Audit()
    blend: Blend = Blend()
    submit: Submit = Submit()
    metric: MetricSection = MetricSection()
    runtime: Runtime = Runtime()

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, raw: Any) -> Any:
        moved = [f"{sec}.{key} -> {new}" for (sec, key), new in MOVED.items()
                 if isinstance(raw, dict) and isinstance(raw.get(sec), dict) and key in raw[sec]]
        if moved:
            why = (" (the runtime section says how the pipeline runs here, not what it computes: changing it "
                   "reruns nothing)") if any("-> runtime." in m for m in moved) else ""
            raise ValueError(f"these settings moved: {', '.join(moved)}{why}")
        return raw

    @model_validator(mode="after")
    def _wire_runtime(self) -> "Params":
        for section in (self.masks, self.near_dups, self.train, self.infer):
            section._runtime = self.runtime
        return self

    @field_validator("encoder")
    @classmethod
    def _encoder_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("encoder must be a non-empty encoder name")
        return v

    @model_validator(mode="after")
    def _sections_agree(self) -> "Params":
        """What would otherwise be found only after training, checked before any work."""
        t, i = self.train, self.infer
        if "swa" in i.checkpoints and t.swa_epochs == 0:
            raise ValueError("infer.checkpoints includes swa but train.swa_epochs is 0: no swa.pt is written; "
                             "set train.swa_epochs or drop swa")
        if "swa" in i.checkpoints and i.round == 2:
            raise ValueError("infer.checkpoints includes swa but infer.round is 2: round-2 models (fine-tuned on "
                             "pseudo-labels) keep best/last only; use infer.round: 1 for SWA")
        if "ema" in i.checkpoints and t.ema is None:
            raise ValueError("infer.checkpoints includes ema but train.ema is null: no ema.pt is written; "
                             "set train.ema: {decay: 0.999} or drop ema")
        if "ema" in i.checkpoints and i.round == 2:
            raise ValueError("infer.checkpoints includes ema but infer.round is 2: round-2 models keep best/last "
                             "only; use infer.round: 1 for EMA")
        if i.fold_weights is not None and len(i.fold_weights) != len(t.folds):
            raise ValueError(f"infer.fold_weights has {len(i.fold_weights)} weights for {len(t.folds)} folds "
                             f"(train.folds {t.folds})")
        weighted = [n for n, w in t.loss.items() if w > 0]
        if t.class_weights != "none" and set(weighted) <= set(registry_names("loss without class weights")):
            raise ValueError(f"train.class_weights {t.class_weights!r} has no effect: {', '.join(weighted)} takes no "
                             "class weights; add ce, focal, dice, jaccard, tversky or boundary_ce, or set none")
        return self

    @model_validator(mode="after")
    def _given_needs_val_json(self) -> "Params":
        if self.split.strategy == "given" and not self.data.val_json:
            raise ValueError("split.strategy 'given' needs data.val_json (the validation images)")
        n = 1 if self.split.strategy == "given" else self.split.n_folds
        if max(self.train.folds) >= n:
            raise ValueError(f"train.folds {self.train.folds} name folds that split.n_folds={n} does not make")
        return self

    def only(self, *sections: str) -> "ParamsView":
        """A read-only view exposing just `sections` (the ones a stage declares in dvc.yaml)."""
        unknown = sorted(set(sections) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(f"no params section(s) {unknown}; sections are {sorted(type(self).model_fields)}")
        return ParamsView(self, sections)


class ParamsView:
    """Attribute access to the declared sections of a Params; anything else is a contract error."""

    def __init__(self, params: Params, sections: tuple[str, ...]):
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "sections", tuple(sections))

    def __getattr__(self, name: str) -> Any:
        if name not in self.sections and name != "runtime":   # runtime: every stage may read it, none declares it
            raise ConfigError(
                f"this stage reads params section {name!r} but declares only {list(self.sections)}; "
                "add it to the stage's `params:` in dvc.yaml and to its PARAMS"
            )
        return getattr(self._params, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only")

    def replacing(self, **sections: BaseModel) -> "ParamsView":
        """The same view with some declared sections replaced (the final ensemble's chosen `infer`)."""
        for name in sections:
            getattr(self, name)   # a section the stage did not declare is still a contract error
        return ParamsView(self._params.model_copy(update=sections), self.sections)

    def flat(self) -> dict[str, Any]:
        """The declared sections flattened to dotted keys, e.g. {'masks.overlap': 'smaller_on_top'}."""
        out: dict[str, Any] = {}
        for name in self.sections:
            out.update(flatten({name: getattr(self._params, name)}))
        return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / pydantic models -> {'a.b.c': leaf}."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump()
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _describe(err: dict, source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    where = f"{source}: {loc}" if loc else source
    if err["type"] == "extra_forbidden":
        parent = _model_at([p for p in err["loc"][:-1]])
        valid = sorted(parent.model_fields) if parent else []
        return f"{where}: unknown key (valid keys here: {', '.join(valid)})"
    if err["type"] == "literal_error":
        return f"{where}: {err['input']!r} is not a valid choice; expected {err['ctx']['expected']}"
    got, msg = err.get("input"), err["msg"].removeprefix("Value error, ")
    if isinstance(got, dict):   # a section-level check: the whole section would bury the message
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {got!r})"


def _model_at(loc: list) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate an already-loaded mapping. Raises ConfigError listing every problem at once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err, source) for err in e.errors()]
        raise ConfigError("invalid params:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (the whole file, so typos anywhere fail now)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw, str(path))
