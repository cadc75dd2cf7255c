"""Every run setting, validated, in three sections a reader can tell apart:

- ``method``: what BUARL (or its base) does; changing it changes the method;
- ``protocol``: the experiment around it: data, label ratio, schedule, evaluation, seed;
- ``execution``: device, precision, compile, threads: how a run is computed, not what. They
  still change its rounding (bf16; on the CPU the thread count changes the order of float
  sums), so a run reproduces exactly with the same seed *and* the same execution.

A YAML file may write the sections (``method: {tau_l: 0.3}``, as the shipped configs and a
run's ``config.yaml`` do) or flat keys; a sweep's space and ``--set`` name keys flat
(``tau_l=0.3``), and code reads them flat (``cfg.tau_l``). ``load_config`` resolves a
shipped name or a YAML path, applies overrides and validates the result; every problem
becomes one ``ConfigError`` naming the key, the value and what was expected.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from buarl.errors import ConfigError

SHIPPED = ("acdc", "acdc_cpu", "la", "la_cpu", "phantom", "phantom_la")


class Method(BaseModel):
    """What the method does: the base, URL and CRL with their readings, the teacher, the losses.
    Each choice a reference makes differently is named in docs/method_choices.md."""
    base: Literal["supervised", "mt", "bcp"] = "bcp"
    # mt's unlabeled loss: the teacher's hard pseudo-labels (method.md) or SSL4MIS's MSE
    # between student and teacher softmax, the teacher seeing the input with noise.
    mt_consistency: Literal["pseudo", "mse"] = "pseudo"
    url: bool = True
    crl: bool = True
    tau_l: float = Field(0.5, ge=0.0, le=1.0)
    tau_u: float = Field(0.5, ge=0.0, le=1.0)
    tau_u_start: Optional[float] = Field(None, ge=0.0, le=1.0)
    # How tau_l / tau_u become regions: `threshold`, an absolute level of the normalised
    # entropy; `quantile`, a share of pixels: tau is the per-image quantile of U over the
    # labeled (URL) or unlabeled (CRL) region, so the dose stays fixed as U shrinks.
    region_mode: Literal["threshold", "quantile"] = "threshold"
    # URL's reading: `weight`, the labeled loss weighted 1 + lambda_url on H; `term`, BCP's
    # loss unchanged plus lambda_url * (CE + Dice) / 2 of its own over the uncertain labeled
    # region H.
    url_mode: Literal["weight", "term"] = "weight"
    # CRL's reading: `hard`, pseudo-labels kept only where U < tau_u; `soft`, every
    # pseudo-label kept with a weight falling with U, lambda_crl * (1 - U) (tau_u unused).
    crl_mode: Literal["hard", "soft"] = "hard"
    lambda_url: float = Field(1.0, ge=0.0)
    lambda_crl: float = Field(0.5, ge=0.0)
    ema_decay: float = Field(0.99, ge=0.0, le=1.0)
    # SSL4MIS's warm-up min(1 - 1/(t+1), ema_decay) suits a random-init teacher (mt); BCP's
    # teacher starts pre-trained and keeps a fixed 0.99. None: true for mt, false otherwise.
    ema_warmup: Optional[bool] = None
    # BCP and SSL4MIS never put the EMA model in eval mode: dropout on, batch statistics.
    teacher_mode: Literal["train", "eval"] = "train"
    # BCP forwards each mixed half (and the teacher each unlabeled half) as its own call,
    # so batch norm sees separate statistics; 1 forwards the whole batch at once.
    split_forward: bool = True
    rampup_iters: int = Field(0, ge=0)
    uncertainty: Literal["entropy", "mc_entropy"] = "entropy"
    mc_passes: int = Field(8, ge=1)
    uncertainty_source: Literal["teacher", "student"] = "teacher"
    pseudo_lcc: bool = True
    # skimage's label() default, used by BCP and UA-MT: 8-connectivity in 2-D, 26 in 3-D.
    lcc_connectivity: Literal["full", "face"] = "full"
    dice_smooth: float = Field(1e-10, gt=0.0, description="BCP's ACDC DiceLoss: 1e-10; its LA mask_DiceLoss: 1e-5")
    # BCP's two Dice losses (unset: the dataset's own): `squared`, its ACDC DiceLoss (whole
    # batch per class, p^2 + y^2 below); `linear`, its LA mask_DiceLoss (per image and
    # class, p + y below).
    dice_form: Optional[Literal["squared", "linear"]] = None
    # BCP's pre-training loss (unset: the dataset's own): `regions`, ACDC's mix loss over the
    # two pasted regions (weight 1 each); `whole`, LA's CE + Dice over the whole mixed image.
    pretrain_loss: Optional[Literal["regions", "whole"]] = None
    paste_ratio: float = Field(2 / 3, gt=0.0, lt=1.0)
    # BCP's self-training starts from the best-on-validation pre-training checkpoint (ACDC:
    # with its optimizer state; LA: a fresh optimizer); `last`: the last pre-training iterate.
    self_train_init: Literal["best", "last"] = "best"
    self_train_optimizer: Literal["keep", "reset"] = "keep"


class ChannelNorm(BaseModel):
    """One channel's intensity normalisation (`buarl prepare`): ct clips to the dataset's
    foreground percentiles and z-scores with its statistics; zscore and minmax are per volume."""
    model_config = ConfigDict(extra="forbid")
    scheme: Literal["ct", "zscore", "minmax"]
    clip: Optional[list[float]] = None
    mean: Optional[float] = None
    std: Optional[float] = None


class Protocol(BaseModel):
    """The experiment around the method: data and label ratio, schedule, evaluation, seed."""
    dataset: Literal["acdc", "la"] = "acdc"
    # a prepared dataset's foreground classes (its dataset.yaml, `buarl prepare`); empty: the
    # benchmark's own (ACDC: RV, Myo, LV; LA: LA)
    class_names: list[str] = Field(default_factory=list)
    # input channels (modalities) of a prepared dataset; the benchmarks have one
    in_channels: int = Field(1, ge=1)
    # how a prepared dataset's intensities were normalised, per channel (its dataset.yaml):
    # `predict` applies the same to new scans; empty: the benchmark's own (ACDC min-max, LA z-score)
    normalisation: list[ChannelNorm] = Field(default_factory=list)
    data_root: Optional[str] = None  # None: a generated phantom in the cache folder
    labeled: int = Field(7, ge=1, description="ACDC: patients; LA: scans")
    val_cases: int = Field(0, ge=0, description="0: all; LA: scans held out of train.list")
    test_cases: int = Field(0, ge=0, description="0: all test cases (else the first N)")
    image_size: int = Field(256, ge=16, description="ACDC: square training size")
    patch_size: list[int] = Field(default_factory=lambda: [112, 112, 80])
    batch_size: int = Field(24, ge=1)
    labeled_bs: int = Field(12, ge=1)
    lr: float = Field(0.01, gt=0.0)
    lr_schedule: Literal["poly", "constant", "step"] = "constant"
    lr_step: int = Field(2500, ge=1, description="step schedule: x0.1 every N self-training iterations")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    pretrain_iters: int = Field(10000, ge=0)
    iters: int = Field(30000, ge=1)
    eval_every: int = Field(200, ge=1)
    log_every: int = Field(20, ge=1)
    empty_policy: Literal["reference", "strict"] = "reference"
    la_stride_xy: int = Field(18, ge=1)
    la_stride_z: int = Field(4, ge=1)
    la_lcc: bool = False
    seed: int = Field(1337, ge=0)


# the benchmarks' foreground classes, in label order
BENCHMARK_CLASSES = {"acdc": ["RV", "Myo", "LV"], "la": ["LA"]}


def class_names_of(dataset: str, class_names: list[str]) -> list[str]:
    """Foreground class names: a prepared dataset's, else the benchmark's."""
    return list(class_names) or BENCHMARK_CLASSES[dataset]


def num_classes_of(dataset: str, class_names: list[str]) -> int:
    """Classes with the background."""
    return len(class_names_of(dataset, class_names)) + 1


class Execution(BaseModel):
    """Where and how fast a run goes: the same method and protocol give the same results up
    to rounding; bit for bit (on a CPU) only with the same execution, threads included."""
    precision: Literal["auto", "bf16", "fp32", "amp"] = "auto"
    device: str = "cpu"
    threads: int = Field(0, ge=0, description="torch threads, 0: leave as is")
    # torch.compile of the training step (networks and the tensor code around them);
    # reduce-overhead adds CUDA graphs. auto: reduce-overhead on a bf16 GPU run of one worker,
    # none on CPUs, under DDP and with fp16 AMP (buarl/engine.py). Evaluation stays eager.
    compile: Literal["auto", "none", "default", "reduce-overhead"] = "auto"


class Config(Execution, Protocol, Method):
    """A run's settings: the fields of the three sections, addressed flat (``cfg.tau_l``)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _per_base_and_dataset_defaults(cls, values: Any) -> Any:
        """Unset switches take their reference's value: the EMA warm-up is the mean teacher's
        (SSL4MIS), the Dice form and pre-training loss are BCP's per dataset."""
        if not isinstance(values, dict):
            return values
        la = values.get("dataset") == "la"
        defaults = {"ema_warmup": values.get("base", "bcp") == "mt",
                    "dice_form": "linear" if la else "squared",
                    "pretrain_loss": "whole" if la else "regions"}
        return {**values, **{k: v for k, v in defaults.items() if values.get(k) is None}}

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.labeled_bs > self.batch_size:
            raise ValueError(
                f"labeled_bs={self.labeled_bs} is larger than batch_size={self.batch_size}")
        if self.base == "bcp" and self.labeled_bs % 2:
            raise ValueError(f"base=bcp mixes labeled pairs: labeled_bs={self.labeled_bs} must be even")
        if self.base == "bcp" and (self.batch_size - self.labeled_bs) % 2:
            raise ValueError("base=bcp mixes unlabeled pairs: batch_size - labeled_bs must be even")
        if self.base != "supervised" and self.batch_size == self.labeled_bs:
            raise ValueError(f"base={self.base} needs unlabeled images: batch_size must exceed labeled_bs")
        if self.base == "bcp" and self.batch_size - self.labeled_bs != self.labeled_bs:
            raise ValueError("base=bcp pairs each labeled image with one unlabeled: "
                             "batch_size must be 2 * labeled_bs")
        if self.mt_consistency != "pseudo" and self.base != "mt":
            raise ValueError(f"mt_consistency={self.mt_consistency} applies to base=mt only "
                             f"(base={self.base})")
        if self.normalisation and len(self.normalisation) != self.in_channels:
            raise ValueError(f"normalisation names {len(self.normalisation)} channel(s), in_channels={self.in_channels}")
        for i, n in enumerate(self.normalisation):
            if n.scheme == "ct" and (n.clip is None or len(n.clip) != 2 or n.mean is None or not n.std):
                raise ValueError(f"normalisation[{i}]: scheme ct needs clip [low, high], mean and std > 0")
        if len(self.patch_size) != 3 or min(self.patch_size) < 16:
            raise ValueError(f"patch_size must be three sizes >= 16, got {self.patch_size}")
        return self

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.dataset, self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON values (checkpoints, hashes, MLflow params)."""
        return self.model_dump(mode="json")

    def inapplicable(self) -> frozenset[str]:
        """Keys this run never reads: the other dataset's, and those of a base it does not
        run (what a sweep leaves out of a run's logged params)."""
        keys = {"patch_size", "la_stride_xy", "la_stride_z", "la_lcc"} if self.dataset == "acdc" else {"image_size"}
        if self.base != "mt":
            keys.add("mt_consistency")
        if self.base != "bcp":  # BCP's pre-training, its copy-paste and the hand-over to self-training
            keys |= {"pretrain_iters", "pretrain_loss", "paste_ratio", "self_train_init", "self_train_optimizer"}
        return frozenset(keys)

    def sectioned(self) -> dict[str, dict[str, Any]]:
        """JSON values under their sections, in the order of the model (for files people read)."""
        values = self.to_dict()
        return {name: {k: values[k] for k in keys} for name, keys in SECTIONS.items()}


SECTIONS: dict[str, tuple[str, ...]] = {
    "method": tuple(Method.model_fields), "protocol": tuple(Protocol.model_fields),
    "execution": tuple(Execution.model_fields)}
SECTION_OF = {key: name for name, keys in SECTIONS.items() for key in keys}


def flatten(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Flat keys of a mapping that may hold sections: a key must sit in its own section, and
    may not be given both flat and in a section."""
    flat = {k: v for k, v in values.items() if k not in SECTIONS}
    for name in SECTIONS:
        if name not in values:
            continue
        section = values[name]
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {name!r}: expected a mapping of keys, got {section!r}")
        for key, value in section.items():
            home = SECTION_OF.get(key)
            if home is not None and home != name:
                raise ConfigError(f"{source}: key {key!r} belongs in section {home!r}, not {name!r}")
            if key in flat:
                raise ConfigError(f"{source}: key {key!r} is given twice (flat and in section {name!r})")
            flat[key] = value
    return flat


def yaml_problem(path: Path | str, e: yaml.YAMLError) -> str:
    """`FILE:LINE:COLUMN: not valid YAML (what)`: where an editor jumps to the mistake."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}"
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        context += f" that starts at line {start.line + 1}"
    return f"{where}: not valid YAML ({what}{f', {context}' if context else ''})"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(yaml_problem(path, e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return flatten(data, source=str(path))


def base_values(name_or_path: str) -> dict[str, Any]:
    """Raw values of a shipped config name or a YAML file (not yet validated)."""
    if name_or_path in SHIPPED:
        text = resources.files("buarl.configs").joinpath(f"{name_or_path}.yaml").read_text()
        return flatten(yaml.safe_load(text) or {}, source=f"shipped config {name_or_path!r}")
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"config {name_or_path!r}: no such file, and not a shipped config ({', '.join(SHIPPED)})")
    return _read_yaml(path)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["iters=100", "url=false"]`` -> ``{"iters": 100, "url": False}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


# Keys of earlier versions that changed only speed: a stored config (checkpoint, model
# folder) that has them still loads, without them.
RETIRED = ("split_calls",)


def validate(values: dict[str, Any], source: str = "config", stored: bool = False) -> Config:
    """The config of `values`; `stored`: written by an earlier run, its retired keys dropped."""
    values = flatten(values, source=source)
    if stored:
        values = {k: v for k, v in values.items() if k not in RETIRED}
    try:
        return Config(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown key {key!r}") from None
        given = err.get("input")
        where = f"key {key!r}" if err["loc"] else "config"
        raise ConfigError(f"{source}: {where}: {err['msg']} (got {given!r})") from None


def load_config(name_or_path: str, overrides: Optional[dict[str, Any]] = None) -> Config:
    values = dict(base_values(name_or_path))
    values.update(overrides or {})
    return validate(values, source=f"config {name_or_path!r}")
