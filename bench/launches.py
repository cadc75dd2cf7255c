"""What the host launches per iteration of a compiled GPU run, counted on a CPU: a stand-in
for G1's profile when no GPU is lent.

    python bench/launches.py --acdc DATA [--baseline FOLDER ...] [--small] [--iters 5]

G1 is bound by the host: every kernel that eager code launches, every compiled graph called
and every wait for the card costs host time the GPU idles through (BENCHMARKS.md). Those
counts do not depend on the card: this script runs BUARL self-training (`acdc` config, 256²,
batch 24) on the CPU in a compiled run with the GPU's code paths (the pseudo-labels' device
clean-up, the augmentation's one grid_sample per batch, fused SGD), profiles a few
iterations with torch.profiler and counts, per iteration and per part of the step:
- `launches`: eager ATen ops outside compiled graphs that compute (the innermost ones: a
  view, an allocation or a dispatcher that only calls another op launches nothing); on a
  GPU each is about one kernel launch;
- `graph_calls`: calls of compiled graphs, forward and backward (on a GPU under
  reduce-overhead the network's are one CUDA-graph replay each, the rest a few Triton
  kernels each);
- `host_reads`: values read back on the host (`.item()`, `float()`, `bool()` of a tensor):
  on a GPU each waits for the card.
The random draws (sampler, augmentation parameters, copy-paste box) stay on the host in a
GPU run and are counted apart (`host_ops`), as are host-to-device copies (`uploads`),
which a CPU run cannot see as copies. Each variant also times its iterations unprofiled
(`ms_per_iteration`, the median); `--small` runs every variant again at 32², batch 8,
where the network's arithmetic is small and a CPU's time per iteration is mostly the
host's: Python, dispatch, compiled graphs' guards and wrappers (not a GPU's launch latency,
which `launches` stands for). Each variant (`--variants` on this checkout, each
`--baseline`'s `buarl/`) runs in its own process, in one run: compare within it.
Writes bench/results/launches.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# BENCH_BUARL=DIR counts DIR/buarl (an earlier commit's, from `git archive`), as bench/gpu.py
# measures one; `bench` comes from this checkout either way
sys.path[:0] = [os.environ.get("BENCH_BUARL", str(ROOT)), str(ROOT)]
from bench.iterations import iterations_only  # noqa: E402 (after the path: run as a script)

# ATen ops that launch no kernel: views, allocations, metadata, and host-side conversions
NO_LAUNCH = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select",
    "aten::as_strided", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::t", "aten::transpose", "aten::chunk", "aten::split", "aten::split_with_sizes", "aten::unbind",
    "aten::narrow", "aten::flatten", "aten::unflatten", "aten::detach", "aten::detach_", "aten::alias",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::resize_", "aten::set_", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::contiguous", "aten::to", "aten::view_as", "aten::result_type", "aten::is_nonzero",
    "aten::pin_memory", "aten::_pin_memory", "aten::is_pinned", "aten::record_stream", "aten::item",
}
# one multi-tensor kernel on a GPU (a few for long lists), a loop of per-tensor ops on a CPU
MULTI_TENSOR = ("aten::_foreach_", "aten::_fused_")
HOST_READS = {"aten::_local_scalar_dense", "aten::equal", "aten::nonzero"}
RANDOM = {"aten::rand", "aten::randint", "aten::randperm", "aten::random_", "aten::uniform_", "aten::normal_"}
COMPILED_CALL = "## Call CompiledFxGraph"
# where the network's arithmetic is small, a CPU's time per iteration is mostly the host's
SMALL = {"image_size": 32, "batch_size": 8, "labeled_bs": 4}
BACKWARD = "autograd::engine::evaluate_function"


def count(events, begin_us: float, end_us: float) -> dict:
    """Per part of the step (the innermost `part:` range around an op; `backward` for the
    autograd engine's work): launches, graph calls, host reads, host ops and uploads."""
    children = collections.defaultdict(list)
    for e in events:
        if e.cpu_parent is not None:
            children[id(e.cpu_parent)].append(e)

    parts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def launches(e) -> int:
        if e.name.startswith(MULTI_TENSOR):
            return 1
        below = sum(launches(c) for c in children[id(e)] if not c.name.startswith(COMPILED_CALL))
        if below or not e.name.startswith("aten::") or e.name in NO_LAUNCH | HOST_READS | RANDOM:
            return below
        return 1

    def visit(e, part: str, previous: str = "") -> None:
        if e.name in {"aten::item"} | HOST_READS and previous in RANDOM:
            parts[part]["host_ops"] += 1  # `int(torch.randint(..., generator=gen))`: a host draw's value
            return
        if e.name.startswith("part:"):
            part = e.name[len("part:"):]
            if part == "upload":
                parts[part]["uploads"] += 1
                return
        elif e.name.startswith(BACKWARD) and part == "other":
            part = "backward"
        if part == "host":
            if e.name.startswith("aten::") and not children[id(e)]:
                parts[part]["host_ops"] += 1
            visit_all(children[id(e)], part)
            return
        if e.name.startswith(COMPILED_CALL):
            parts[part]["graph_calls"] += 1
            return
        if e.name in HOST_READS:
            parts[part]["host_reads"] += 1
            return
        if e.name in RANDOM:
            parts[part]["host_ops"] += 1
            return
        if e.name.startswith("aten::"):
            n = launches(e)
            if n:
                parts[part]["launches"] += n
                ops[part][e.name] += n
            # host reads below an op (e.g. `.item()` inside another op) still count
            stack = list(children[id(e)])
            while stack:
                c = stack.pop()
                if c.name in HOST_READS:
                    parts[part]["host_reads"] += 1
                stack.extend(children[id(c)])
            return
        visit_all(children[id(e)], part)

    def visit_all(siblings, part: str) -> None:
        previous = ""
        for e in sorted(siblings, key=lambda e: e.time_range.start):
            visit(e, part, previous)
            previous = e.name

    visit_all([e for e in events if e.cpu_parent is None and begin_us <= e.time_range.start < end_us], "other")
    return {"parts": {k: dict(v) for k, v in sorted(parts.items())},
            "top_ops": {k: dict(v.most_common(8)) for k, v in sorted(ops.items())}}


def worker(data_root: str, iters: int, timed: int, overrides: dict) -> dict:
    """One variant, in this process (`buarl` from BENCH_BUARL, else this checkout)."""
    import functools

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from buarl.engine import Engine

    def part(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with record_function("part:" + name):
                return fn(*args, **kwargs)
        return wrapped

    marks = []
    # host work in a GPU run, counted apart: the sampler's and the augmentation's draws
    parts = {"draws": "host", "pseudo_labels": "pseudo_labels", "batch": "batch", "teacher": "teacher_probs",
             "student": "forward", "loss": "loss", "bcp_batch": "bcp_batch", "box_mask": "box_mask", "ema": "ema"}

    class Counted(Engine):
        """The GPU's code paths on the CPU (fast twins, fused SGD), every step callable
        wrapped in a profiler range named after its part, and the iterations marked."""

        def __init__(self, *args):
            super().__init__(*args)
            self.device_paths = True

        def prepare(self, name, fn):
            return part(parts.get(name, name), fn)

        def upload(self, values):
            with record_function("part:upload"):
                return super().upload(values)

        def step_begin(self):
            with record_function("iteration"):
                marks.append(time.perf_counter())
            super().step_begin()

        def optimizer(self, params, lr, momentum, weight_decay):
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)

    loop, steps = iterations_only("acdc", {"data_root": data_root, "labeled": 3, "device": "cpu",
                                           "compile": "default", **overrides}, Counted)
    loop.sampler.next = part("host", loop.sampler.next)
    loop.schedule = part("schedule", loop.schedule)

    began = time.perf_counter()
    steps(3)  # compilation
    warm_s = time.perf_counter() - began
    marks.clear()
    steps(timed + 1)  # unprofiled; the last iteration's start closes the timed ones
    per_step = sorted(b - a for a, b in zip(marks, marks[1:]))
    # one more iteration than counted: its start closes the last counted one
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(iters + 1)
    events = list(prof.events())
    starts = sorted(e.time_range.start for e in events if e.name == "iteration")[-(iters + 1):]
    counted = count(events, starts[0], starts[-1])
    per_iter = {part: {k: round(v / iters, 2) for k, v in c.items()} for part, c in counted["parts"].items()}
    totals = collections.Counter()
    for c in per_iter.values():
        totals.update(c)
    from torch._dynamo.utils import counters
    return {"per_iteration": {k: round(v, 2) for k, v in sorted(totals.items())}, "by_part": per_iter,
            "top_ops_per_iteration": {p: {k: round(v / iters, 2) for k, v in c.items()}
                                      for p, c in counted["top_ops"].items()},
            "graph_breaks": int(sum(counters["graph_break"].values())), "warmup_s": round(warm_s, 1),
            "ms_per_iteration": round(1000 * per_step[len(per_step) // 2], 2),
            "profiled_ms_per_iteration": round(1000 * (starts[-1] - starts[0]) / 1e6 / iters, 1),
            "overrides": overrides, "iters": iters, "timed": timed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acdc", required=True, help="ACDC data root")
    p.add_argument("--baseline", type=Path, action="append", default=[],
                   help="a folder holding an earlier commit's buarl/ and its name in COMMIT (repeatable)")
    p.add_argument("--iters", type=int, default=5, help="iterations counted per variant")
    p.add_argument("--timed", type=int, default=10, help="iterations timed per variant (median), unprofiled")
    p.add_argument("--small", action="store_true",
                   help="also time every variant at 32², batch 8: the host's time per iteration, nearly")
    p.add_argument("--small-timed", type=int, default=200, help="iterations timed per variant at 32²")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of the 32² variants, one after another in each (this machine drifts)")
    p.add_argument("--variants", default='{"default": {}}',
                   help="JSON: name -> config overrides, each run on this checkout")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "launches.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON overrides: run one variant here
    a = p.parse_args()
    if a.worker is not None:
        print("RESULT " + json.dumps(worker(a.acdc, a.iters, a.timed, json.loads(a.worker))), flush=True)
        return

    import torch
    runs = [(name, ROOT, overrides) for name, overrides in json.loads(a.variants).items()]
    for i, folder in enumerate(a.baseline):
        commit = (folder / "COMMIT").read_text().strip()
        runs.insert(i, (f"baseline_{commit}", folder.resolve(), {}))

    def run(name: str, code: Path, overrides: dict, timed: int) -> dict:
        print(f"launches: {name} ...", file=sys.stderr, flush=True)
        env = {k: v for k, v in os.environ.items() if k != "BENCH_BUARL"}
        env.update({"BENCH_BUARL": str(code)} if code != ROOT else {})
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--acdc", a.acdc, "--iters",
                              str(a.iters), "--timed", str(timed), "--worker", json.dumps(overrides)],
                             env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"launches: variant {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        print(f"  {name}: {result['per_iteration']}, {result['ms_per_iteration']} ms", file=sys.stderr, flush=True)
        return result

    results = {name: run(name, code, overrides, a.timed) for name, code, overrides in runs}
    if a.small:
        small = [(name + "@32px", code, {**overrides, **SMALL}) for name, code, overrides in runs]
        for _ in range(a.rounds):
            for name, code, overrides in small:
                result = run(name, code, overrides, a.small_timed)
                rounds = results.get(name, {}).get("ms_per_iteration_rounds", []) + [result["ms_per_iteration"]]
                results[name] = {**result, "ms_per_iteration_rounds": rounds,
                                 "ms_per_iteration": sorted(rounds)[len(rounds) // 2]}
    # "-dirty": the variants ran on uncommitted changes
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    report = {"machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__,
                          # oneDNN's kernels, and so the layout of a convolution's weight gradients,
                          # follow the vector ISA: where it differs from the parameters' layout the
                          # backward copies each gradient, one launch per convolution. Counts
                          # compare only between machines of the same capability.
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()},
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "commit": head.stdout.strip(), "config": "acdc (256², batch 24), BUARL self-training, compile=default, CPU",
              "variants": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
