"""The console/file reporter used by `buarl train` (the Ray one lives in orchestrator/)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from buarl import run_folder
from buarl.config import Config
from buarl.train import Reporter


def fmt(scalars: dict) -> str:
    parts = []
    for k, v in scalars.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class LocalReporter(Reporter):
    """Prints progress, appends it to OUT/train.log, keeps OUT/best.pt, writes OUT/metrics.json.

    On a terminal progress is one updating line (iteration/total, it/s, ETA, loss, last val
    Dice) with evaluations printed above it; elsewhere (a log file, CI) a plain line per
    log step that carries the same facts. train.log always gets the plain lines."""

    def __init__(self, cfg: Config, out: Path, stream: TextIO | None = None, total: int | None = None):
        self.cfg, self.out, self.stream = cfg, Path(out), stream or sys.stdout
        self.log_file = (self.out / run_folder.LOG).open("a")
        self.started = time.time()
        self.total = total or cfg.iters + (cfg.pretrain_iters if cfg.base == "bcp" else 0)
        self.last_val: float | None = None
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, file=self.stream, unit="it", dynamic_ncols=True, leave=True)

    def _say(self, line: str, console: bool = True) -> None:
        line = f"[{time.time() - self.started:7.1f}s] {line}"
        if console:
            if self.bar is not None:
                self.bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def log(self, step: int, scalars: dict) -> None:
        elapsed = time.time() - self.started
        eta = (self.total - step) * elapsed / max(step, 1)
        val = f" val_dice={self.last_val:.4f}" if self.last_val is not None else ""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"{scalars.get('stage', '')} loss={scalars['loss']:.4g}{val}", refresh=True)
            self._say(f"it {step:>6} {fmt(scalars)}", console=False)
        else:
            self._say(f"it {step:>6}/{self.total} {fmt(scalars)}{val} eta={eta / 60:.1f}min")

    def checkpoint(self, step: int, metrics: dict, state: dict, is_best: bool) -> None:
        self.last_val = metrics["val_dice"]
        mark = " (best, saved best.pt)" if is_best else ""
        self._say(f"it {step:>6} val_dice={metrics['val_dice']:.4f} val_fg={metrics['val_fg']:.4f}"
                  f" (true {metrics['val_fg_true']:.4f}){mark}")
        if is_best:
            run_folder.write_best(self.out, state["best_weights"], self.cfg, step, metrics["val_dice"])

    def warn(self, step: int, message: str) -> None:
        self._say(f"WARNING it {step}: {message}")

    def close(self) -> None:
        """Ends the progress line and the log (a run that stops before `finish`: pre-training only)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.log_file.close()

    def finish(self, metrics: dict, best_weights: dict) -> None:
        if not (self.out / run_folder.BEST).exists():  # no validation improved: keep the final weights
            run_folder.write_best(self.out, best_weights, self.cfg, metrics["iterations"], float("nan"))
        run_folder.write_metrics(self.out, metrics)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._say("test " + fmt({k: metrics[k] for k in ("dice", "jaccard", "hd95", "asd")})
                  + f" empty_predictions={metrics['empty_predictions']}/{metrics['structures']}"
                  + (f" (last iterate: dice={metrics['last']['dice']:.4g})" if "last" in metrics else ""))
        self.log_file.close()
