"""The BUARL training loop, readable top to bottom.

    bcp: pre-train on copy-pasted labeled pairs; self-training starts from the best
         pre-training checkpoint, the teacher a copy of it
    for each iteration:
        draw a two-stream batch (labeled + unlabeled), augment it
        teacher (train mode, as BCP/SSL4MIS): probabilities -> uncertainty U, pseudo-labels
        build the student's inputs, targets, per-pixel weights and source map
            supervised: labeled images only
            mt:  labeled + unlabeled images side by side (pseudo-labels, or MSE to the teacher)
            bcp: copy-paste mixes (one box mask for images, targets, U)
        weights: labeled pixels 1 + lambda_url [U > tau_l]  (URL; url_mode=term: weight 1
                 and a term of its own on [U > tau_l]); unlabeled pixels
                 lambda_crl ramp(t) [U < tau_u]  (CRL; crl_mode=soft: lambda_crl ramp(t) (1 - U))
        loss = (weighted CE + weighted Dice) / 2 per source region; SGD step; EMA teacher
        every eval_every: val Dice and foreground fraction, checkpoint to the reporter,
        keep the best weights, warn when val Dice falls below half its best (a collapse)
    test metrics of the best weights (BCP's result) and of the last iterate

A run may start from a state handed over at the end of pre-training (`start`, from
buarl.pretraining): one pre-training shared by every self-training of the same settings.

The loop does not know who listens: a `Reporter` receives logs and checkpoints and may
hand back a state to resume from. The console/file reporter lives here; the Ray reporter
in `orchestrator/`. DDP comes from the `wrap` callable applied to the student.
"""
from __future__ import annotations

import copy
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from buarl.config import Config
from buarl.data import load_benchmark
from buarl.data.sampling import TwoStreamSampler
from buarl.errors import TrainingDiverged
from buarl.evaluate import evaluate, validation_scores
from buarl.method.losses import mse_consistency, region_loss, term_loss
from buarl.method.mixing import box_mask, mix
from buarl.method.pseudo import pseudo_labels
from buarl.method.teacher import decay_at, ema_update, make_teacher
from buarl.method.uncertainty import entropy_map, mc_probs, perturb
from buarl.method.weights import ramp, tau_u_at, weight_maps
from buarl.nets import build
from buarl.nets.chunk_norm import norms_of, per_chunk
from buarl.runtime import (autocast, compile_mode_of, compiled, device_of, memory_format, precision_of,
                           seed_everything, step_begin, to_device, upload)


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


class SplitForward(nn.Module):
    """Runs the network so that batch norm normalises each of `chunks` parts of the batch by
    its own statistics (BCP forwards its two mixed halves separately). One module call per
    step keeps DDP's one-forward-one-backward contract. `one_call=False`: one call of `core`
    per part. `one_call=True`: one call for the whole batch, its norm layers normalising the
    parts apart (nets/chunk_norm.py): the same numbers, half the convolutions' launches, and
    no sum of two backwards' gradients."""

    def __init__(self, core: nn.Module, one_call: bool = False):
        super().__init__()
        self.core, self.one_call = core, one_call
        self.norms = norms_of(core) if one_call else []

    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        if chunks == 1:
            return self.core(x)
        if self.one_call:
            with per_chunk(self.norms, chunks):
                return self.core(x)
        return torch.cat([self.core(part) for part in x.chunk(chunks)])


class Probabilities(nn.Module):
    """The network's softmax, in float32: the teacher's output, so that a compiled teacher's
    graph holds the softmax too (eager, two more kernels per step)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x).float(), 1)


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


class Loop:
    def __init__(self, cfg: Config, reporter: Reporter, wrap: Callable[[nn.Module], nn.Module], data=None,
                 start: Optional[dict] = None):
        self.cfg, self.reporter, self.start = cfg, reporter, start
        self.rank, self.world = _rank()
        self.device = device_of(cfg)
        self.data = data if data is not None else load_benchmark(cfg)
        self.data.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        self.dim = self.data.dim
        self.fmt = memory_format(cfg, self.dim)
        seed_everything(cfg.seed)  # every DDP replica starts from the same weights (and teacher)
        core = to_device(build(cfg.dataset, cfg.num_classes), cfg, self.device, self.dim)
        if self.rank:
            seed_everything(cfg.seed + 1000 * self.rank)  # dropout and noise differ per replica
        self.core = core  # the un-wrapped student: teacher, evaluation and checkpoints use it
        self.teacher = make_teacher(core)
        self.compile = compile_mode_of(cfg, self.device, self.world)
        # The student's split stays outside compiled code: with a call per chunk, compiled whole
        # (both calls in one graph), torch 2.13's inductor got the first layers' gradients wrong
        # by several percent; with `split_calls=one`, the norms' chunk count is set around the
        # compiled network's one call. The teacher has no backward, and its split compiled whole
        # computes eager's outputs and running statistics: one graph for all its chunks of a
        # step (tests/test_fast_paths.py). The wrappers share the modules' weights and buffers.
        one_call = cfg.split_calls == "one"
        probs = Probabilities(self.teacher)
        self.teacher_net = (SplitForward(compiled(probs, self.compile), one_call=True) if one_call
                            else compiled(SplitForward(probs), self.compile))
        self.student = wrap(SplitForward(compiled(core, self.compile), one_call))
        # A compiled run also compiles the rest of the step's tensor code: the copy-paste batch
        # with its uncertainty and weight maps, the loss (softmax, CE and Dice per region, and
        # their backward), the pseudo-labels' device clean-up and the device augmentation.
        # Eager, each of their many small ops is a kernel the host launches (BENCHMARKS.md, G1).
        # Without CUDA graphs of their own: their inputs are outputs of this step's graphs.
        self.compile_rest = self.compile != "none"
        rest_mode = "default" if self.compile_rest else "none"
        self.region_loss = compiled(region_loss, rest_mode)
        self.bcp_batch = compiled(self.bcp_batch_eager, rest_mode)
        # fused: one kernel for the whole SGD update on a GPU (the CPU keeps the default path)
        self.optimizer = torch.optim.SGD(core.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(enabled=precision_of(cfg, self.device) == "amp")
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

    # ---- state -------------------------------------------------------------------------
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

    # ---- teacher view ------------------------------------------------------------------
    @torch.no_grad()
    def teacher_probs(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """Teacher softmax, one call per chunk of the batch (BCP: one per unlabeled half)."""
        cfg = self.cfg
        # the student's memory format: a plain NCHW input to channels-last weights makes
        # oneDNN reorder it at every layer
        with autocast(cfg, self.device):
            if cfg.uncertainty == "mc_entropy":
                parts = x.contiguous(memory_format=self.fmt).chunk(chunks)
                return torch.cat([mc_probs(self.teacher, part, cfg.mc_passes, self.gen) for part in parts])
            self.teacher.train(cfg.teacher_mode == "train")
            return self.teacher_net(x.contiguous(memory_format=self.fmt), chunks)

    def schedule(self, t: int) -> torch.Tensor:
        """tau_u and the CRL ramp at step t, as one tensor on the run's device (compiled code
        takes them as inputs: a value that changes per step never recompiles it)."""
        cfg, t_self = self.cfg, t - self.pretrain
        return upload([tau_u_at(t_self, cfg.rampup_iters, cfg.tau_u, cfg.tau_u_start),
                       ramp(t_self, cfg.rampup_iters)], self.device)

    def weights(self, u: torch.Tensor, source: torch.Tensor,
                schedule: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
        """Per-pixel weights: URL on labeled pixels (source 1), CRL on unlabeled (source 0);
        the region of URL's own term (url_mode=term, else None); the dose: the share of
        labeled pixels in H (frac_high), of unlabeled pixels in L (frac_low) and the mean
        share of an unlabeled pixel's pseudo-label CRL keeps (crl_share)."""
        cfg = self.cfg
        return weight_maps(u, source, url=cfg.url, crl=cfg.crl, tau_l=cfg.tau_l, tau_u=schedule[0],
                           lambda_url=cfg.lambda_url, lambda_crl=cfg.lambda_crl, ramp_value=schedule[1],
                           mode=cfg.region_mode, url_mode=cfg.url_mode, crl_mode=cfg.crl_mode)

    # ---- one iteration per base ----------------------------------------------------------
    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        with autocast(self.cfg, self.device):
            return self.student(x.contiguous(memory_format=self.fmt), chunks).float()

    def loss(self, logits, target, weight, source, parts: int = 1, term: Optional[torch.Tensor] = None):
        """BCP's loss per source region; plus lambda_url times URL's own term on `term`'s pixels."""
        cfg = self.cfg
        loss = self.region_loss(logits, target, weight, source, cfg.dice_smooth, cfg.dice_form, parts)
        if term is not None:
            loss = loss + cfg.lambda_url * term_loss(logits, target, term, cfg.dice_smooth, cfg.dice_form, parts)
        return loss

    def pretrain_step(self, x_l, y_l):
        """BCP pre-training: labeled pairs copy-pasted into each other, both regions supervised
        (ACDC: a loss per region; LA: one loss over the whole mixed image)."""
        half = x_l.shape[0] // 2
        m = box_mask(tuple(x_l.shape[2:]), self.cfg.paste_ratio, self.gen, x_l.device)
        x = mix(x_l[:half], x_l[half:], m)
        y = mix(y_l[:half], y_l[half:], m).long()
        source = m.expand_as(y).float() if self.cfg.pretrain_loss == "regions" else torch.ones_like(y, dtype=torch.float)
        loss = self.loss(self.forward(x), y, torch.ones_like(source), source)
        return loss, {}

    def supervised_step(self, x_l, y_l, t):
        logits = self.forward(x_l)
        source = torch.ones(y_l.shape, device=x_l.device)
        u = self.uncertainty(x_l, logits) if self.cfg.url else torch.zeros_like(source)
        w, term, stats = self.weights(u, source, self.schedule(t))
        return self.loss(logits, y_l, w, source, term=term), stats

    def uncertainty(self, x: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.uncertainty_source == "student":
            return entropy_map(torch.softmax(student_logits.detach(), 1))
        return entropy_map(self.teacher_probs(x))

    def mt_step(self, x_l, y_l, x_u, t):
        """Mean teacher: labeled and unlabeled images in one student forward. The unlabeled
        loss is CE + Dice on the teacher's pseudo-labels (`pseudo`) or SSL4MIS's MSE between
        the softmaxes, the teacher seeing a noisy input (`mse`); CRL weights either."""
        cfg = self.cfg
        n = x_l.shape[0]
        logits = self.forward(torch.cat([x_l, x_u]))
        x_t = x_u if cfg.mt_consistency == "pseudo" else perturb(x_u, self.gen)
        probs_t = self.teacher_probs(torch.cat([x_l, x_t]) if cfg.url and cfg.uncertainty_source == "teacher"
                                     else x_t)
        p_u = probs_t[-x_u.shape[0]:]
        if cfg.uncertainty_source == "student":
            u = entropy_map(torch.softmax(logits.detach(), 1))
        else:
            u_u = entropy_map(p_u)
            # Without URL the labeled weights ignore U, so the teacher skips labeled images.
            u_l = entropy_map(probs_t[:n]) if cfg.url else u_u.new_zeros((n,) + u_u.shape[1:])
            u = torch.cat([u_l, u_u])
        source = torch.cat([torch.ones_like(u[:n]), torch.zeros_like(u[n:])])
        w, term, stats = self.weights(u, source, self.schedule(t))
        if cfg.mt_consistency == "mse":
            return (self.loss(logits[:n], y_l, w[:n], source[:n], term=None if term is None else term[:n])
                    + mse_consistency(logits[n:], p_u, w[n:])), stats
        plab = pseudo_labels(p_u, cfg.pseudo_lcc, cfg.lcc_connectivity, compiled=self.compile_rest)
        stats["pseudo_fg"] = (plab > 0).float().mean()
        return self.loss(logits, torch.cat([y_l, plab]), w, source, term=term), stats

    def bcp_step(self, x_l, y_l, x_u, t):
        """Bidirectional copy-paste: a labeled box into an unlabeled image and vice versa."""
        cfg = self.cfg
        chunks = 2 if cfg.split_forward else 1
        # Without URL (or with the student's U) the labeled weights ignore the teacher's U,
        # so the teacher skips the labeled images, as BCP's does. With it, one teacher call
        # sees both: the two batches are of one even size (config), so the 2 * chunks chunks
        # are the unlabeled batch's chunks, then the labeled one's.
        p_l = None
        if cfg.url and cfg.uncertainty_source == "teacher":
            p_u, p_l = self.teacher_probs(torch.cat([x_u, x_l]), 2 * chunks).split([len(x_u), len(x_l)])
        else:
            p_u = self.teacher_probs(x_u, chunks)
        plab = pseudo_labels(p_u, cfg.pseudo_lcc, cfg.lcc_connectivity, compiled=self.compile_rest)
        m = box_mask(tuple(x_l.shape[2:]), cfg.paste_ratio, self.gen, x_l.device)
        schedule = self.schedule(t)
        # With the student's U the weights wait for the student's logits.
        student_u = cfg.uncertainty_source == "student"
        x, target, source, w, term, stats = self.bcp_batch(x_l, y_l, x_u, p_u, p_l, plab, m,
                                                           None if student_u else schedule)
        logits = self.forward(x, chunks)
        if student_u:
            w, term, weight_stats = self.weights(entropy_map(torch.softmax(logits.detach(), 1)), source, schedule)
            stats.update(weight_stats)
        # Two mixed batches, each its own mix loss as in BCP.
        return self.loss(logits, target, w, source, parts=2, term=term), stats

    def bcp_batch_eager(self, x_l, y_l, x_u, p_u, p_l, plab, m, schedule):
        """The student's copy-paste batch: images, targets (pseudo-labels outside the labeled
        box), the source map and, given a `schedule`, the weights from the teacher's mixed
        uncertainty (the labeled images' zero without `p_l`), URL's term region and the
        stats (None without).
        Tensor code only: `self.bcp_batch` is this function compiled into one graph in a
        compiled run."""
        h = x_l.shape[0] // 2
        # mix(a, b, m) keeps a outside the box and b inside it.
        x = torch.cat([mix(x_u[:h], x_l[:h], m), mix(x_l[h:], x_u[h:], m)])
        target = torch.cat([mix(plab[:h], y_l[:h], m), mix(y_l[h:], plab[h:], m)]).long()
        ones = torch.ones_like(plab[:h], dtype=torch.float)
        source = torch.cat([mix(0 * ones, ones, m), mix(ones, 0 * ones, m)])
        w, term, stats = None, None, {}
        if schedule is not None:
            u_u = entropy_map(p_u)
            u_l = entropy_map(p_l) if p_l is not None else torch.zeros_like(u_u)
            u = torch.cat([mix(u_u[:h], u_l[:h], m), mix(u_l[h:], u_u[h:], m)])
            w, term, stats = self.weights(u, source, schedule)
        stats["pseudo_fg"] = (plab > 0).float().mean()
        return x, target, source, w, term, stats

    # ---- the loop ----------------------------------------------------------------------
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
                       iterations=self.step, train_seconds=time.time() - started)
        self.reporter.finish(metrics, weights)
        return metrics

    def run_pretraining(self) -> dict:
        """Pre-training alone; returns the state it hands over to self-training."""
        self.steps(until=self.pretrain)
        return self.state()

    def steps(self, until: int) -> None:
        """Iterations up to `until`, resumed from the reporter's state, else from `start`."""
        cfg, data = self.cfg, self.data
        restored = self.reporter.restore()
        if restored is not None:
            self.load(restored)
        elif self.start is not None:
            self.load(self.start)
        started, first = time.time(), self.step
        if self.compile != "none" and self.step < until:
            print(f"buarl: compiling the training forwards (torch.compile mode {self.compile}); the first "
                  "iterations take a minute or so (compile=none turns it off)", file=sys.stderr, flush=True)
        self.student.train()
        running: dict[str, torch.Tensor] = {}
        while self.step < until:
            t = self.step
            stage = "pretrain" if t < self.pretrain else "self"
            if t == self.pretrain and self.pretrain:
                self.start_self_training()
            stage_t, stage_n = (t, self.pretrain) if stage == "pretrain" else (t - self.pretrain, cfg.iters)
            lr = lr_at(cfg, stage_t, stage_n, stage)
            for g in self.optimizer.param_groups:
                g["lr"] = lr

            step_begin(self.compile)
            lab_idx, unl_idx = self.sampler.next()
            if stage == "pretrain" or cfg.base == "supervised":
                unl_idx = []  # drawn (the sampler's stream goes on) but not used
            # One augmented batch, labeled images first: the draws of two batches in a row,
            # a single set of ops. Unlabeled images' labels are never read.
            # (LA's crops are made on the host: queued behind the running step, not waited for)
            x, y = (upload(v, self.device) for v in data.batch(lab_idx + unl_idx, self.gen, self.compile_rest))
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
                ema_update(self.teacher, self.core, decay_at(t_self, cfg.ema_decay) if cfg.ema_warmup else cfg.ema_decay)
            self.step = t + 1

            values = {"loss": loss, **stats}
            if running.keys() == values.keys():  # one multi-tensor kernel, not a kernel per value
                torch._foreach_add_([running[k] for k in values], [v.detach() for v in values.values()])
            else:  # a window's first step, or the stage changed what it reports
                running = {**running, **{k: running.get(k, 0) + v.detach() for k, v in values.items()}}
            if self.step % cfg.log_every == 0 or self.step == self.total:
                n = (self.step - 1) % cfg.log_every + 1
                scalars = {k: float(v) / n for k, v in running.items()}  # one host sync per log
                running = {}
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
        metrics = {"val_dice": dice, "best_val_dice": max(self.best["dice"], 0.0), "iteration": self.step,
                   "val_fg": scores["fg_pred"], "val_fg_true": scores["fg_true"]}
        self.reporter.checkpoint(self.step, metrics, self.state(), is_best)
        best = max(self.best["dice"], self.pre_best["dice"] if self.pre_best else -1.0)
        if stage == "self" and dice < 0.5 * best:
            self.reporter.warn(self.step, f"val Dice {dice:.3f} is below half of its best {best:.3f}: "
                               f"predicted foreground {scores['fg_pred']:.4f} of val pixels vs "
                               f"{scores['fg_true']:.4f} true (a collapse towards background?)")


def train(cfg: Config, reporter: Optional[Reporter] = None,
          wrap: Callable[[nn.Module], nn.Module] = lambda m: m, data=None, start: Optional[dict] = None) -> dict:
    """Run one configuration to the end, from `start` (a state handed over at the end of
    pre-training, buarl.pretraining) if given; returns the test metrics of the best
    checkpoint, those of the last iterate under `last`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return Loop(cfg, reporter or Reporter(), wrap, data, start).run()
