"""The BUARL training loop, readable top to bottom.

    bcp: pre-train on copy-pasted labeled pairs; self-training starts from the best
         pre-training checkpoint, the teacher a copy of it
    for each iteration:
        draw a two-stream batch (labeled + unlabeled), augment it
        one step of the base (buarl/steps.py): teacher, pseudo-labels, URL and CRL weights, loss
        SGD step; EMA teacher
        every eval_every: val Dice and foreground fraction, checkpoint to the reporter,
        keep the best weights, warn when val Dice falls below half its best (a collapse)
    test metrics of the best weights (BCP's result) and of the last iterate

A run may start from a state handed over at the end of pre-training (`start`, from
buarl.pretraining): one pre-training shared by every self-training of the same settings.

The loop does not know who listens: a `Reporter` receives logs and checkpoints and may
hand back a state to resume from. The console/file reporter is buarl/reporting.py; the Ray
reporter lives in `orchestrator/`. DDP comes from the `wrap` callable applied to the student;
how the hardware is used (device, precision, compilation, fast implementations) from the
`Engine` (buarl/engine.py).
"""
from __future__ import annotations

import copy
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from buarl.config import Config
from buarl.data import load_benchmark, origin
from buarl.data.sampling import TwoStreamSampler
from buarl.engine import Engine, seed_everything
from buarl.errors import TrainingDiverged
from buarl.evaluate import evaluate, validation_scores
from buarl.method.losses import region_loss
from buarl.method.mixing import box_mask
from buarl.method.teacher import decay_at, ema_update, make_teacher
from buarl.method.weights import ramp
from buarl.nets import build
from buarl.steps import Steps


class Reporter:
    """Receives what the loop produces. Subclasses override what they need."""

    def log(self, step: int, scalars: dict) -> None:
        pass

    def checkpoint(self, step: int, metrics: dict, state: dict, is_best: bool) -> None:
        pass

    def restore(self) -> Optional[dict]:
        return None

    def finish(self, metrics: dict, best_weights: dict) -> None:
        pass

    def warn(self, step: int, message: str) -> None:
        print(f"buarl: warning at iteration {step}: {message}", file=sys.stderr, flush=True)


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def lr_at(cfg: Config, t: int, stage_iters: int, stage: str = "self") -> float:
    """The learning rate of step t of a stage. poly (SSL4MIS) restarts per stage; step is
    BCP's LA schedule: constant pre-training, x0.1 every lr_step self-training iterations."""
    if cfg.lr_schedule == "poly":
        return cfg.lr * (1.0 - t / max(stage_iters, 1)) ** 0.9
    if cfg.lr_schedule == "step" and stage == "self":
        return cfg.lr * 0.1 ** (t // cfg.lr_step)
    return cfg.lr


class RunningMeans:
    """Sums a log window's scalars on the device; one host sync when the window is read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        if self.sums.keys() == values.keys():  # one multi-tensor kernel, not a kernel per value
            torch._foreach_add_([self.sums[k] for k in values], [v.detach() for v in values.values()])
        else:  # a window's first step, or the stage changed what it reports
            self.sums = {**self.sums, **{k: self.sums.get(k, 0) + v.detach() for k, v in values.items()}}
        self.n += 1

    def read(self) -> dict[str, float]:
        values = torch.stack([v.float() for v in self.sums.values()]).tolist()  # the one host read
        means = {k: v / self.n for k, v in zip(self.sums, values)}
        self.sums, self.n = {}, 0
        return means


class Loop(Steps):
    def __init__(self, cfg: Config, reporter: Reporter, wrap: Callable[[nn.Module], nn.Module], data=None,
                 start: Optional[dict] = None, engine: Optional[Engine] = None):
        self.cfg, self.reporter, self.start = cfg, reporter, start
        self.rank, self.world = _rank()
        self.data = data if data is not None else load_benchmark(cfg)
        self.engine = engine = engine or Engine(cfg, self.data.dim, self.world)
        self.device = engine.device
        seed_everything(cfg.seed)  # every DDP replica starts from the same weights (and teacher)
        self.core = engine.place(build(cfg.dataset, cfg.num_classes, cfg.in_channels))  # teacher, evaluation, checkpoints
        if self.rank:
            seed_everything(cfg.seed + 1000 * self.rank)  # dropout and noise differ per replica
        self.teacher = make_teacher(self.core)
        # what a step calls, each prepared by the engine: eager here, compiled on a GPU
        self.teacher_forward = engine.teacher(self.teacher)
        self.student = engine.student(self.core, wrap)
        self.region_loss = engine.tensor_code("loss", region_loss)
        self.bcp_batch = engine.tensor_code("bcp_batch", self.copy_paste_batch)
        self.pseudo_labels = engine.pseudo_labels(cfg.num_classes, cfg.pseudo_lcc, cfg.lcc_connectivity)
        self.batch = engine.batches(self.data)
        self.box_mask = engine.prepare("box_mask", box_mask)
        self.ema = engine.prepare("ema", ema_update)
        self.optimizer = engine.optimizer(self.core.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(enabled=engine.precision == "amp")
        unlabeled_bs = 0 if cfg.base == "supervised" else cfg.batch_size - cfg.labeled_bs
        self.sampler = TwoStreamSampler(self.data.labeled_idx, self.data.unlabeled_idx,
                                        cfg.labeled_bs, unlabeled_bs, cfg.seed + 1000 * self.rank)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1 + 1000 * self.rank)
        self.pretrain = cfg.pretrain_iters if cfg.base == "bcp" else 0
        self.total = self.pretrain + cfg.iters
        self.step = 0
        self.best = {"dice": -1.0, "step": -1, "weights": None}
        # the best pre-training checkpoint: weights and optimizer state (BCP's self-training start)
        self.pre_best: Optional[dict] = None

    def state(self) -> dict:
        return {"step": self.step, "student": self.core.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "best_dice": self.best["dice"], "best_step": self.best["step"],
                "best_weights": self.best["weights"], "pre_best": self.pre_best, "config": self.cfg.to_dict()}

    def load(self, state: dict) -> None:
        self.core.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.best = {"dice": float(state["best_dice"]), "step": int(state["best_step"]),
                     "weights": state["best_weights"]}
        self.pre_best = state.get("pre_best")

    def run(self) -> dict:
        """The whole run (from the start state, if one was given), then the test metrics of
        the best-on-validation weights and, under `last`, of the last iterate."""
        started = time.time()
        self.steps(until=self.total)
        weights = self.best["weights"] or copy.deepcopy(self.core.state_dict())
        final_model = copy.deepcopy(self.core)
        final_model.load_state_dict(weights)
        metrics = evaluate(final_model, self.data.test, self.cfg, self.device)
        # the best checkpoint is often the last iterate itself: its metrics, not a second pass
        last_is_best = self.best["weights"] is None or self.best["step"] == self.step
        metrics["last"] = (dict(metrics) if last_is_best
                           else evaluate(copy.deepcopy(self.core), self.data.test, self.cfg, self.device))
        metrics.update(best_val_dice=self.best["dice"], best_step=self.best["step"],
                       iterations=self.step, train_seconds=time.time() - started, data=origin(self.cfg))
        self.reporter.finish(metrics, weights)
        return metrics

    def run_pretraining(self) -> dict:
        """Pre-training alone; returns the state it hands over to self-training."""
        self.steps(until=self.pretrain)
        return self.state()

    def steps(self, until: int) -> None:
        """Iterations up to `until`, resumed from the reporter's state, else from `start`."""
        cfg = self.cfg
        restored = self.reporter.restore()
        if restored is not None:
            self.load(restored)
        elif self.start is not None:
            self.load(self.start)
        started, first = time.time(), self.step
        if self.engine.compile != "none" and self.step < until:
            print(f"buarl: compiling the training forwards (torch.compile mode {self.engine.compile}); the "
                  "first iterations take a minute or so (compile=none turns it off)", file=sys.stderr, flush=True)
        self.student.module.train()
        running = RunningMeans()
        while self.step < until:
            t = self.step
            stage = "pretrain" if t < self.pretrain else "self"
            if t == self.pretrain and self.pretrain:
                self.start_self_training()
            stage_t, stage_n = (t, self.pretrain) if stage == "pretrain" else (t - self.pretrain, cfg.iters)
            lr = lr_at(cfg, stage_t, stage_n, stage)
            for g in self.optimizer.param_groups:
                g["lr"] = lr

            self.engine.step_begin()
            lab_idx, unl_idx = self.sampler.next()
            if stage == "pretrain" or cfg.base == "supervised":
                unl_idx = []  # drawn (the sampler's stream goes on) but not used
            # One augmented batch, labeled images first: the draws of two batches in a row,
            # a single set of ops. Unlabeled images' labels are never read.
            x, y = self.batch(lab_idx + unl_idx, self.gen)
            n = len(lab_idx)
            x_l, y_l, x_u = x[:n], y[:n], x[n:]
            if stage == "pretrain":
                loss, stats = self.pretrain_step(x_l, y_l)
            elif cfg.base == "supervised":
                loss, stats = self.supervised_step(x_l, y_l, t)
            else:
                step_fn = self.mt_step if cfg.base == "mt" else self.bcp_step
                loss, stats = step_fn(x_l, y_l, x_u, t)

            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if stage == "self":
                t_self = t - self.pretrain
                self.ema(self.teacher, self.core, decay_at(t_self, cfg.ema_decay) if cfg.ema_warmup else cfg.ema_decay)
            self.step = t + 1

            running.add({"loss": loss, **stats})
            if self.step % cfg.log_every == 0 or self.step == self.total:
                scalars = running.read()  # one host sync per log
                if any(v != v or abs(v) == float("inf") for v in scalars.values()):
                    raise TrainingDiverged(f"loss became {scalars['loss']} by iteration {self.step} "
                                           f"(lr={cfg.lr}); lower the learning rate")
                scalars.update(lr=lr, stage=stage, ramp=ramp(max(0, t - self.pretrain), cfg.rampup_iters),
                               it_per_s=(self.step - first) / max(time.time() - started, 1e-9))
                self.reporter.log(self.step, scalars)
            if self.step % cfg.eval_every == 0 or self.step in (self.pretrain, self.total):
                self.validate(stage)

    def start_self_training(self) -> None:
        """BCP: student and teacher start from the best pre-training checkpoint (ACDC: with
        its optimizer state); `self_train_init=last` keeps the last pre-training iterate."""
        cfg = self.cfg
        if cfg.self_train_init == "best" and self.pre_best is not None:
            self.core.load_state_dict(self.pre_best["weights"])
            if cfg.self_train_optimizer == "keep":
                self.optimizer.load_state_dict(self.pre_best["optimizer"])
        if cfg.self_train_optimizer == "reset":
            self.optimizer.state.clear()
        self.teacher.load_state_dict(self.core.state_dict())

    def validate(self, stage: str) -> None:
        scores = validation_scores(self.core, self.data.val, self.cfg, self.device)
        dice = scores["dice"]
        if stage == "pretrain" and (self.pre_best is None or dice > self.pre_best["dice"]):
            self.pre_best = {"dice": dice, "step": self.step, "weights": copy.deepcopy(self.core.state_dict()),
                             "optimizer": copy.deepcopy(self.optimizer.state_dict())}
        # The best self-training checkpoint is the run's result; pre-training ones seed self-training.
        is_best = stage == "self" and dice > self.best["dice"]
        if is_best:
            self.best = {"dice": dice, "step": self.step, "weights": copy.deepcopy(self.core.state_dict())}
        # best so far of the stage: pre-training's best is what self-training will start from
        best_so_far = self.best["dice"] if stage == "self" else self.pre_best["dice"] if self.pre_best else dice
        metrics = {"val_dice": dice, "best_val_dice": max(best_so_far, 0.0), "iteration": self.step,
                   "val_fg": scores["fg_pred"], "val_fg_true": scores["fg_true"]}
        self.reporter.checkpoint(self.step, metrics, self.state(), is_best)
        best = max(self.best["dice"], self.pre_best["dice"] if self.pre_best else -1.0)
        if stage == "self" and dice < 0.5 * best:
            self.reporter.warn(self.step, f"val Dice {dice:.3f} is below half of its best {best:.3f}: "
                               f"predicted foreground {scores['fg_pred']:.4f} of val pixels vs "
                               f"{scores['fg_true']:.4f} true (a collapse towards background?)")


def train(cfg: Config, reporter: Optional[Reporter] = None, wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
          data=None, start: Optional[dict] = None, engine: Optional[Engine] = None) -> dict:
    """Run one configuration to the end, from `start` (a state handed over at the end of
    pre-training, buarl.pretraining) if given; returns the test metrics of the best
    checkpoint, those of the last iterate under `last`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return Loop(cfg, reporter or Reporter(), wrap, data, start, engine).run()
