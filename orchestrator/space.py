"""Search-space files: schema, validation and the plan they expand to.

A space is data. It is validated completely (every searched name is a real config key,
every bound fits that key's range, every grid point makes a valid config) before Ray is
started, and expands to a plan: grid points (label ratio x seed x method switches), each
explored by its own Optuna study (OptunaSearch cannot mix with tune.grid_search).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from buarl.config import Config, base_values, validate, yaml_problem
from orchestrator.names import REPORTED_METRICS
from buarl.errors import BuarlError, ConfigError

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


class SpaceError(BuarlError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Uniform(_Strict):
    type: Literal["uniform"]
    low: float
    high: float


class LogUniform(_Strict):
    type: Literal["loguniform"]
    low: float
    high: float


class IntRange(_Strict):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)


class Categorical(_Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


DISTRIBUTION_TYPES = ("uniform", "loguniform", "int", "categorical")
Distribution = Annotated[Union[Uniform, LogUniform, IntRange, Categorical], Field(discriminator="type")]


# A switch's `row`: the name its trials carry into the tables (tag buarl.row), for rows that
# the config keys alone do not name (BUARL at its defaults and at searched settings, say).
ROW = "row"


class Grid(_Strict):
    labeled: list[int] = Field(min_length=1)
    seed: list[int] = Field(default_factory=lambda: [1337], min_length=1)
    switches: list[dict[str, Any]] = Field(default_factory=lambda: [{}], min_length=1)


class Scheduler(_Strict):
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="evaluations before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1.0)


class Resources(_Strict):
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    # auto: a one-worker trial runs the loop in its Tune trial process (no TorchTrainer, whose
    # controller, worker actor and helper actors cost each trial seconds and CPU; BENCHMARKS.md
    # G6); several workers run under Ray Train (DDP). train: Ray Train for every trial.
    runner: Literal["auto", "train"] = "auto"

    @property
    def loop_in_trial(self) -> bool:
        """Whether a trial runs the loop in its own Tune process (else under a TorchTrainer)."""
        return self.workers == 1 and self.runner == "auto"


class Space(_Strict):
    name: Optional[str] = None
    description: str = ""
    base_config: str = "acdc_cpu"
    phantom_config: str = "phantom"  # used when no data root is given (the embedded default)
    fixed: dict[str, Any] = Field(default_factory=dict)
    phantom_fixed: dict[str, Any] = Field(default_factory=dict)
    grid: Grid
    search: dict[str, Distribution] = Field(default_factory=dict)
    num_samples: int = Field(4, ge=1)
    metric: str = "best_val_dice"
    mode: Literal["max", "min"] = "max"
    scheduler: Optional[Scheduler] = None
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(2, ge=0)
    # BCP's pre-training once per distinct (data, labeled, seed, pre-training settings, code),
    # every trial of that key forked from it (orchestrator/pretrainings.py); false: each
    # trial pre-trains itself.
    shared_pretraining: bool = True

    @model_validator(mode="after")
    def _bounds(self) -> "Space":
        for key, dist in self.search.items():
            if isinstance(dist, (Uniform, LogUniform, IntRange)) and dist.low > dist.high:
                raise ValueError(f"search.{key}: low={dist.low} > high={dist.high}")
            if isinstance(dist, LogUniform) and dist.low <= 0:
                raise ValueError(f"search.{key}: loguniform needs low > 0, got low={dist.low}")
        return self


def _locate(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (SPACES_DIR / name_or_path, SPACES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    raise SpaceError(f"space {name_or_path!r}: no such file, and not one of search_spaces/ ({known})")


def _message(err: dict) -> str:
    parts = [str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union"))]
    if parts[:1] == ["search"] and len(parts) > 2 and parts[2] in DISTRIBUTION_TYPES:
        del parts[2]  # the union's tag: `search.key.step`, not `search.key.int.step`
    loc = ".".join(parts)
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return f"{loc}: distribution type must be one of uniform, loguniform, int, categorical"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg} (got {err.get('input')!r})" if loc else msg


def load_space(name_or_path: str) -> tuple[Space, Path]:
    path = _locate(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(yaml_problem(path, e)) from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping of space keys, got {type(raw).__name__}")
    try:
        space = Space.model_validate(raw)
    except ValidationError as e:
        raise SpaceError(f"{path}: {_message(e.errors()[0])}") from None
    if space.name is None:
        space = space.model_copy(update={"name": path.stem})
    _check_against_config(space, path)
    return space, path


def _kind(annotation) -> str:
    """bool, int, float or choice (a Literal) of a config field's type, Optional unwrapped."""
    import typing
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return "choice"
    return {bool: "bool", int: "int", float: "float"}.get(annotation, "other")


def _check_against_config(space: Space, path: Path) -> None:
    fields = Config.model_fields
    gridded = {"labeled", "seed"} | {k for sw in space.grid.switches for k in sw}
    for key, dist in space.search.items():
        if key not in fields:
            raise SpaceError(f"{path}: search.{key}: unknown parameter (not a buarl config key)")
        if key in gridded:
            raise SpaceError(f"{path}: search.{key}: {key} is also set by the grid, which the search would "
                             "silently override; keep it in one of the two")
        kind = _kind(fields[key].annotation)
        if kind in ("bool", "choice") and not isinstance(dist, Categorical):
            raise SpaceError(f"{path}: search.{key}: a {kind} key takes type: categorical (got {dist.type})")
        if kind == "int" and isinstance(dist, (Uniform, LogUniform)):
            raise SpaceError(f"{path}: search.{key}: an integer key takes type: int or categorical "
                             f"(got {dist.type}, a float range)")
        probes = dist.choices if isinstance(dist, Categorical) else [dist.low, dist.high]
        for value in probes:
            try:
                validate({**base_values(space.base_config), key: value}, source="probe")
            except ConfigError as e:
                raise SpaceError(f"{path}: search.{key}: value {value!r} is outside what the config "
                                 f"accepts ({str(e).split(': ', 2)[-1]})") from None
    for section in ("fixed", "phantom_fixed"):
        for key in getattr(space, section):
            if key not in fields:
                raise SpaceError(f"{path}: {section}.{key}: unknown parameter (not a buarl config key)")
    for i, sw in enumerate(space.grid.switches):
        if ROW in sw and (not isinstance(sw[ROW], str) or not sw[ROW].strip()):
            raise SpaceError(f"{path}: grid.switches[{i}].{ROW}: expected a row name (text), got {sw[ROW]!r}")
        for key in sw:
            if key != ROW and key not in fields:
                raise SpaceError(f"{path}: grid.switches[{i}].{key}: unknown parameter")
    if space.metric not in REPORTED_METRICS:
        raise SpaceError(f"{path}: metric: {space.metric!r} is not a metric the trials report "
                         f"(use {', '.join(REPORTED_METRICS)})")


def with_probe(values: dict[str, Any], search: dict) -> dict[str, Any]:
    """`values` with each searched key at a value the search can draw (the first choice or
    the low bound): a config that every sample of the point makes valid when this one is."""
    return {**values, **{k: d.choices[0] if isinstance(d, Categorical) else d.low for k, d in search.items()}}


class GridPoint(BaseModel):
    name: str
    values: dict[str, Any]  # constants of this point: labeled, seed, switches
    row: Optional[str] = None  # the switch's row name for the tables


class Plan(BaseModel):
    space: Space
    space_file: str
    phantom: bool
    base: dict[str, Any]  # the resolved config values shared by every trial
    points: list[GridPoint]
    num_samples: int
    max_concurrent: int
    threads_per_worker: int

    @property
    def trials_per_point(self) -> int:
        return self.num_samples if self.space.search else 1

    @property
    def total_trials(self) -> int:
        return self.trials_per_point * len(self.points)

    @property
    def at_once(self) -> int:
        """Trials running at once: grid points run one after another, so a grid point's own
        trials are all that can overlap."""
        return min(self.max_concurrent, self.trials_per_point)

    def iterations(self, point: GridPoint) -> int:
        """Iterations of one trial of a grid point (pre-training is BCP's alone)."""
        v = {**self.base, **point.values}
        return int(v.get("iters", 0)) + (int(v.get("pretrain_iters", 0)) if v.get("base") == "bcp" else 0)


def point_name(values: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in values.items()]
    return "_".join(parts).replace(" ", "").replace("/", "-")


def make_plan(space: Space, space_file: Path, data_root: Optional[str], num_samples: Optional[int],
              max_concurrent: int, cpus: int) -> Plan:
    phantom = data_root is None
    base = dict(base_values(space.phantom_config if phantom else space.base_config))
    if not phantom:  # a prepared root (`buarl prepare`) decides its kind, classes and split
        from buarl.prepare import settings
        base.update(settings(Path(data_root).expanduser()))
    base.update(space.fixed)
    if phantom:
        base.update(space.phantom_fixed)
    base["data_root"] = data_root
    points = []
    for labeled, seed, switches in itertools.product(space.grid.labeled, space.grid.seed, space.grid.switches):
        row = switches.get(ROW)
        values = {"labeled": labeled, "seed": seed, **{k: v for k, v in switches.items() if k != ROW}}
        probe = with_probe({**base, **values}, space.search)
        try:
            validate(probe, source=f"{space_file}: grid point {point_name(values)}")
        except ConfigError as e:
            raise SpaceError(str(e)) from None
        name = point_name(values) if row is None else f"{point_name({'labeled': labeled, 'seed': seed})}_row={row}"
        points.append(GridPoint(name=name.replace(" ", "-"), values=values, row=row))
    plan = Plan(space=space, space_file=str(space_file), phantom=phantom, base=base, points=points,
                num_samples=num_samples or space.num_samples, max_concurrent=max_concurrent, threads_per_worker=1)
    given = {**space.fixed, **(space.phantom_fixed if phantom else {})}
    if "threads" in given:  # the space's own choice (validated above); --threads still overrides it
        plan.threads_per_worker = int(given["threads"])
    elif space.resources.workers * space.resources.cpus_per_worker <= cpus:
        plan.threads_per_worker = max(1, int(cpus // max(1, plan.at_once * space.resources.workers)))
    return plan


def describe(plan: Plan) -> str:
    s, r = plan.space, plan.space.resources
    budgets = [plan.iterations(p) for p in plan.points]
    per_trial = f"{min(budgets)}" if min(budgets) == max(budgets) else f"{min(budgets)}-{max(budgets)}"
    lines = [f"space {s.name} ({plan.space_file})",
             f"  data: {'built-in phantom (no --data-root)' if plan.phantom else plan.base['data_root']}",
             f"  base config: {s.phantom_config if plan.phantom else s.base_config} + fixed {s.fixed or '{}'}"
             + (f" + phantom_fixed {s.phantom_fixed}" if plan.phantom and s.phantom_fixed else ""),
             f"  grid points ({len(plan.points)}), one Optuna study each:" if s.search
             else f"  grid points ({len(plan.points)}), one trial each (no search):"]
    lines += [f"    - {p.name}" for p in plan.points]
    if s.search:
        lines.append("  searched parameters:")
        for key, d in s.search.items():
            rng = f"choices {d.choices}" if isinstance(d, Categorical) else f"[{d.low}, {d.high}]"
            lines.append(f"    - {key}: {d.type} {rng}")
    lines += [f"  trials: {plan.trials_per_point} per grid point, {plan.total_trials} in total",
              f"  iteration budget: {per_trial} per trial, {sum(budgets) * plan.trials_per_point} in total",
              f"  metric: {s.metric} ({s.mode})" + (f", ASHA grace {s.scheduler.grace_period} evaluations" if s.scheduler else ""),
              f"  resources: {r.workers} worker(s) x {r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU per trial; "
              f"{plan.at_once} trial(s) at once; {plan.threads_per_worker} torch thread(s) per worker; "
              + ("the loop runs in each Tune trial" if r.loop_in_trial
                 else f"each trial runs under a Ray Train TorchTrainer ({'DDP' if r.workers > 1 else 'runner: train'})")]
    if 0 < r.gpus_per_worker < 1:
        lines.append(f"  GPU packing: {int(1 / r.gpus_per_worker)} trial(s) share each GPU "
                     f"({r.gpus_per_worker:g} GPU per worker); --max-concurrent up to "
                     f"{int(1 / r.gpus_per_worker)} x the number of GPUs keeps them all busy; start NVIDIA MPS "
                     "on the GPU nodes (nvidia-cuda-mps-control -d) or they take turns on the card (docs/cluster.md)")
    if plan.max_concurrent > plan.at_once:
        lines.append(f"  note: --max-concurrent {plan.max_concurrent} applies within a grid point, which has "
                     f"{plan.trials_per_point} trial(s), and grid points run one after another; to run grid "
                     "points at once, start one cluster and a sweep per share of the grid "
                     "(--only GLOB --address auto --threads N)")
    return "\n".join(lines)
