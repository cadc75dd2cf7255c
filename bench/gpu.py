"""Issue 12's GPU targets in one command (G1 solo speed and utilisation, G2 packing, G3 LA,
G5 evaluation), a table on stdout and bench/results/gpu_<card>.json.

    python bench/gpu.py --acdc ../shared/data/ACDC [--la ../shared/data/LA] [--iters 300] [--packed 4]
    python bench/gpu.py --smoke          # the same path on the CPU with the phantoms, in seconds

Each measurement is a worker process running buarl's own loop (BUARL: bcp + URL + CRL,
self-training, the `acdc` / `la` paper configs) for `--iters` iterations; its speed is taken
between the log steps after a warm-up, so start-up and the final test evaluation are not in
it. Packed = that many workers at once on the one GPU. GPU utilisation is sampled with
nvidia-smi every 0.5 s and averaged over the same window (packed: while all measured). G5 times the final evaluation of the solo ACDC
worker (all 40 test volumes). With images packed by ../shared/tools/pack_acdc.py (8-bit),
speeds are unchanged; report Dice from such a copy as "8-bit images".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# BENCH_BUARL=DIR measures DIR/buarl (e.g. an earlier commit's, from `git archive`) with this
# bench: a before/after on the same card in one session. Workers inherit it.
sys.path.insert(0, os.environ.get("BENCH_BUARL", str(ROOT)))
PROTOCOL_ITERS = {"acdc": (10000, 30000), "la": (2000, 15000)}  # pre-training, self-training


def worker(kind: str, data_root: str | None, iters: int, device: str, smoke: bool, labeled: int,
           test_cases: int, compile_mode: str = "none", eager_glue: bool = False,
           overrides: dict | None = None) -> dict:
    """One measured run of the loop; prints and returns its speeds. `eager_glue`: a compiled
    run's tensor code around the network (the copy-paste batch, the loss, the pseudo-label
    clean-up) left eager, only the network compiled (the A/B). `overrides`: config keys set on
    top of the bench's own (a baseline's code may predate a key)."""
    import logging

    import torch

    from buarl.config import load_config
    from buarl.train import Reporter, train

    config = {"acdc": "phantom" if smoke else "acdc", "la": "phantom_la" if smoke else "la"}[kind]
    log_every = max(1, iters // 10)
    cfg = load_config(config, {"data_root": data_root, "base": "bcp", "url": True, "crl": True, "pretrain_iters": 0,
                               "iters": iters, "eval_every": 10 ** 9, "log_every": log_every, "device": device,
                               "labeled": labeled, "test_cases": test_cases, "val_cases": 1,
                               "threads": threads_per_worker(), "compile": compile_mode,
                               **(overrides or {})})

    class Clock(Reporter):
        def __init__(self):
            self.marks = []
            self.last = {}

        def log(self, step, scalars):  # the loop syncs (float()) before it logs
            self.marks.append((step, time.perf_counter(), time.time()))
            self.last = scalars

    class Skips(logging.Handler):
        """Inductor's reasons for running a compiled graph without CUDA graphs (a warning each)."""
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage()[:300])

    skips = Skips()
    logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs").addHandler(skips)
    clock = Clock()
    began = time.perf_counter()
    engine = None
    if eager_glue:  # the network compiled, the tensor code around it eager: an engine subclass
        from buarl.data import load_benchmark
        from buarl.engine import Engine

        class EagerGlue(Engine):
            def tensor_code(self, name, fn):
                return self.prepare(name, fn)

            def graph(self, fn):
                return fn

        data = load_benchmark(cfg)
        engine = EagerGlue(cfg, data.dim)
        metrics = train(cfg, clock, data=data, engine=engine)
    else:
        metrics = train(cfg, clock)
    ended = time.perf_counter()
    (s0, t0, w0), (s1, t1, w1) = clock.marks[min(2, len(clock.marks) - 2)], clock.marks[-1]
    out = {"kind": kind, "config": config, "iters": iters, "compile": compile_mode, "eager_glue": eager_glue,
           "overrides": overrides or {},
           "it_per_s": (s1 - s0) / (t1 - t0), "window": [w0, w1], "first_log_s": round(clock.marks[0][1] - began, 1),
           "loss_last": round(clock.last.get("loss", float("nan")), 4),
           "evaluation_s": ended - t1, "evaluation_split_s": metrics.get("seconds"),
           "test_cases": metrics["cases"], "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"}
    if compile_mode != "none":
        from torch._dynamo.utils import counters
        out.update(cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]), skip_reasons=skips.messages[:3],
                   graph_breaks=int(sum(counters["graph_break"].values())))
    print("RESULT " + json.dumps(out), flush=True)
    return out


def labeled_for(kind: str, smoke: bool, la_labeled: int) -> int:
    """5 % labeled (3 ACDC patients, 4 LA scans); the phantoms have fewer cases."""
    return 2 if smoke else {"acdc": 3, "la": la_labeled}[kind]


def threads_per_worker() -> int:
    """The host's cores shared by the workers running at once (BENCH_WORKERS)."""
    import os

    return max(1, (os.cpu_count() or 1) // int(os.environ.get("BENCH_WORKERS", "1")))


class Utilisation:
    """nvidia-smi sampled every 0.5 s while a phase runs (None without nvidia-smi)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []  # (time.time(), percent)
        self.proc = None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip().split(",")[0])))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()

    def mean(self, window: tuple[float, float] | None = None):
        """Mean busy percent, within the workers' measured window when given: start-up,
        compilation and the final evaluation would dilute it."""
        values = [v for t, v in self.samples if window is None or window[0] <= t <= window[1]]
        return round(sum(values) / len(values), 1) if values else None


def phase(kind: str, data_root, iters: int, n: int, device: str, smoke: bool, labeled: int, test_cases: int,
          compile_mode: str = "none", eager_glue: bool = False,
          overrides: dict | None = None) -> tuple[list[dict], float | None]:
    """n workers at once; test_cases=0 evaluates the whole test set (G5), else that many."""
    cmd = [sys.executable, __file__, "--worker", kind, "--iters", str(iters), "--device", device,
           "--labeled", str(labeled), "--test-cases", str(test_cases), "--compile", compile_mode]
    cmd += ["--smoke"] if smoke else []
    cmd += ["--eager-glue"] if eager_glue else []
    cmd += ["--overrides", json.dumps(overrides)] if overrides else []
    cmd += ["--root", data_root] if data_root else []
    env = {**os.environ, "BENCH_WORKERS": str(n)}
    print(f"bench/gpu.py: {kind}, {n} worker(s) at once, {iters} iterations each, compile={compile_mode} ...",
          flush=True)
    began = time.perf_counter()
    with Utilisation() as util:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for _ in range(n)]
        outs = [p.communicate()[0] for p in procs]
    results = []
    for p, text in zip(procs, outs):
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            raise SystemExit(f"bench/gpu.py: a {kind} worker failed (exit {p.returncode}):\n{text[-3000:]}")
        results.append({**json.loads(lines[-1][len("RESULT "):]), "phase_wall_s": round(time.perf_counter() - began, 1)})
    print(f"bench/gpu.py: ... {kind} x{n} ({compile_mode}) took {time.perf_counter() - began:.0f} s", flush=True)
    # packed: the span where all of them were measuring at once
    window = (max(r["window"][0] for r in results), min(r["window"][1] for r in results)) \
        if all("window" in r for r in results) else None
    return results, util.mean(window if window and window[0] < window[1] else None)


def card_slug(card: str) -> str:
    """The card's name as it appears in result file names (gpu_<slug>.json)."""
    return "".join(c if c.isalnum() else "_" for c in card)[:40]


def protocol_minutes(kind: str, it_per_s: float) -> float:
    """The full protocol (pre-training + self-training) at this speed, start-up and
    evaluations left out: an upper bound on what the speed alone allows."""
    return round(sum(PROTOCOL_ITERS[kind]) / it_per_s / 60, 1)


def _phase_note(name: str, results: list[dict]) -> dict:
    """What a phase cost (start-up, compilation and evaluation included): for planning loans."""
    return {"phase": name, "wall_s": max(r.get("phase_wall_s", 0) for r in results),
            "first_log_s": max(r.get("first_log_s", 0) for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acdc", help="ACDC data root (SSL4MIS layout)")
    p.add_argument("--la", help="LA data root (UA-MT layout); G3 is skipped without it")
    p.add_argument("--iters", type=int, default=300, help="iterations per measured run")
    p.add_argument("--packed", type=int, default=4, help="trials at once for G2")
    p.add_argument("--device", default=None, help="cuda (default) or cpu")
    p.add_argument("--smoke", action="store_true", help="CPU, phantoms, a few iterations: checks the script itself")
    p.add_argument("--la-labeled", type=int, default=4,
                   help="labeled LA scans (4 = 5 %%; fewer for a small subset: the speed is the same)")
    p.add_argument("--compile", default=None,
                   help="also measure with torch.compile: modes tried in order until one works, comma-separated "
                        "(none, default, reduce-overhead; default: reduce-overhead,default on a GPU, "
                        "none with --smoke)")
    p.add_argument("--phases", default="compiled,g2,g3",
                   help="what to measure beside eager G1 + G5 (always: every ratio is to it): comma-separated "
                        "compiled, glue (compiled once more with only the network compiled), g2, g3")
    p.add_argument("--tag", default="", help="names the run in its results file (gpu_<card>_<tag>.json), e.g. mps")
    p.add_argument("--worker", choices=["acdc", "la"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--labeled", type=int, help=argparse.SUPPRESS)
    p.add_argument("--test-cases", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--eager-glue", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", type=json.loads, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    device = a.device or ("cpu" if a.smoke else "cuda")
    if a.worker:
        worker(a.worker, a.root, a.iters, device, a.smoke, a.labeled, a.test_cases, a.compile or "none", a.eager_glue,
               a.overrides)
        return
    phases = set(a.phases.split(",")) - {""}
    if phases - {"compiled", "glue", "g2", "g3"}:
        raise SystemExit(f"bench/gpu.py: --phases {a.phases!r}: expected a comma-separated list of "
                         "compiled, glue, g2, g3")
    known = ("none", "default", "reduce-overhead")
    if any(m not in known for m in (a.compile or "none").split(",")):
        raise SystemExit(f"bench/gpu.py: --compile {a.compile!r}: expected a comma-separated list of {', '.join(known)}")
    if not a.smoke and not a.acdc:
        raise SystemExit("bench/gpu.py: --acdc DATA_ROOT is required (or --smoke)")
    iters = 6 if a.smoke else a.iters
    report: dict = {"command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]]), "device": device,
                    "iters_per_run": iters, "packed": a.packed, "smoke": a.smoke, "tag": a.tag,
                    "buarl_measured": os.environ.get("BENCH_BUARL", "this checkout")}
    baseline = os.environ.get("BENCH_BUARL")
    if baseline and (Path(baseline) / "COMMIT").exists():  # (a baseline folder names its commit there)
        report["buarl_commit"] = (Path(baseline) / "COMMIT").read_text().strip()
    acdc_l = labeled_for("acdc", a.smoke, a.la_labeled)
    path = None

    def save(stage: str) -> None:
        """After each phase: the report so far, on stderr and (on a GPU) in the results file,
        so a session cut short keeps what it measured."""
        nonlocal path
        print(f"bench/gpu.py: {stage}: " + json.dumps({k: v for k, v in report.items() if k.startswith("G")}),
              file=sys.stderr, flush=True)
        if not a.smoke:
            path = ROOT / "bench" / "results" / f"gpu_{card_slug(report['card'])}{'_' + a.tag if a.tag else ''}.json"
            path.write_text(json.dumps(report, indent=2) + "\n")

    def measure(name: str, kind: str, root, n: int, labeled: int, test_cases: int = 1, mode: str = "none",
                eager_glue: bool = False, overrides: dict | None = None):
        """One phase, its cost kept in report["phases"]. A compiled phase that fails is a
        result (its error in report["compile_failures"], None back), not the end of the bench."""
        try:
            results, util = phase(kind, root, iters, n, device, a.smoke, labeled, test_cases, mode, eager_glue,
                                  overrides)
        except SystemExit as e:
            if mode == "none":
                raise
            report.setdefault("compile_failures", {})[name] = str(e)[-2000:]
            save(f"{name} failed")
            return None, None
        report["phases"].append(_phase_note(name, results))
        return results, util

    def packed_report(results, util, solo_speed):
        each = [r["it_per_s"] for r in results]
        return {"trials": a.packed, "it_per_s_each": [round(x, 2) for x in each],
                "min_share_of_solo": round(min(each) / solo_speed, 2), "gpu_util_pct": util,
                "throughput_over_solo": round(sum(each) / solo_speed, 2),
                "target": f">= {a.packed} trials at >= 80 % of solo each"}

    # Phases in order of what a short GPU loan most needs: eager G1 (+ G5) is the baseline on
    # this card; CUDA graphs are the step the profile points to; then packing and LA, eager
    # first (comparable with earlier cards), compiled where compilation worked.
    report["phases"] = []
    solo, util_solo = measure("G1 eager", "acdc", a.acdc, 1, acdc_l, test_cases=0)
    report["card"] = solo[0]["gpu"]
    speed = solo[0]["it_per_s"]
    report["G1_acdc_solo"] = {"it_per_s": round(speed, 2), "gpu_util_pct": util_solo,
                              "target": ">= 45 it/s and >= 70 % utilisation",
                              "protocol_minutes_upper_bound": protocol_minutes("acdc", speed)}
    # seconds: from the last logged step to train's return (the last validation included);
    # split_s: evaluate's own predict (network, zooms) and metrics (host) seconds
    report["G5_evaluation"] = {"seconds": round(solo[0]["evaluation_s"], 2), "cases": solo[0]["test_cases"],
                               "split_s": solo[0].get("evaluation_split_s"), "target": "<= 5 s on a GPU"}
    save("solo")

    modes = [m for m in (a.compile or ("none" if a.smoke else "reduce-overhead,default")).split(",")
             if m != "none" and "compiled" in phases]
    compiled_mode = None
    for mode in modes:  # the first that works
        comp, util_comp = measure(f"G1 {mode}", "acdc", a.acdc, 1, acdc_l, mode=mode)
        if comp is None:
            continue
        compiled_mode, comp_speed = mode, comp[0]["it_per_s"]
        report["G1_acdc_solo_compiled"] = {
            "compile": mode, "it_per_s": round(comp_speed, 2), "gpu_util_pct": util_comp,
            "over_eager": round(comp_speed / speed, 2), "protocol_minutes_upper_bound": protocol_minutes("acdc", comp_speed),
            "loss_last": comp[0].get("loss_last"), "eager_loss_last": solo[0].get("loss_last"),
            **{k: comp[0][k] for k in ("cudagraph_skips", "skip_reasons", "graph_breaks", "first_log_s") if k in comp[0]},
            "note": "speed after the warm-up logs: compilation is not in it (first_log_s is)"}
        save("solo compiled")
        break
    if compiled_mode and "glue" in phases:
        glue, util_glue = measure(f"G1 {compiled_mode}, only the network compiled", "acdc", a.acdc, 1, acdc_l,
                                  mode=compiled_mode, eager_glue=True)
        if glue:
            report["G1_acdc_solo_compiled"].update(
                glue_eager_it_per_s=round(glue[0]["it_per_s"], 2), glue_eager_gpu_util_pct=util_glue,
                over_glue_eager=round(comp_speed / glue[0]["it_per_s"], 2))
            save("solo compiled, glue eager")

    if "g2" in phases:
        packed, util_packed = measure("G2 eager", "acdc", a.acdc, a.packed, acdc_l)
        report["G2_acdc_packed"] = packed_report(packed, util_packed, speed)
        save("packed")
    la = (a.la or a.smoke) and "g3" in phases
    la_l = labeled_for("la", a.smoke, a.la_labeled)
    if la:
        la_solo, la_util = measure("G3 eager", "la", a.la, 1, la_l)
        report["G3_la"] = {"solo_it_per_s": round(la_solo[0]["it_per_s"], 2), "gpu_util_pct": la_util,
                           "protocol_minutes_upper_bound": protocol_minutes("la", la_solo[0]["it_per_s"])}
        save("la solo")
    if compiled_mode and "g2" in phases:
        c_packed, c_util = measure(f"G2 {compiled_mode}", "acdc", a.acdc, a.packed, acdc_l, mode=compiled_mode)
        if c_packed:
            report["G2_acdc_packed_compiled"] = {
                "compile": compiled_mode, **packed_report(c_packed, c_util, comp_speed),
                "throughput_over_eager_solo": round(sum(r["it_per_s"] for r in c_packed) / speed, 2)}
            save("packed compiled")
    if la:
        la_packed, _ = measure("G3 eager x2", "la", a.la, 2, la_l)
        report["G3_la"]["packed_2_it_per_s_each"] = [round(r["it_per_s"], 2) for r in la_packed]
        save("la packed")
    if la and compiled_mode:
        la_comp, la_cutil = measure(f"G3 {compiled_mode}", "la", a.la, 1, la_l, mode=compiled_mode)
        if la_comp:
            report["G3_la"]["compiled"] = {
                "compile": compiled_mode, "solo_it_per_s": round(la_comp[0]["it_per_s"], 2), "gpu_util_pct": la_cutil,
                "protocol_minutes_upper_bound": protocol_minutes("la", la_comp[0]["it_per_s"]),
                **{k: la_comp[0][k] for k in ("cudagraph_skips", "skip_reasons") if k in la_comp[0]}}
            save("la compiled")
    print(json.dumps(report, indent=2))
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
