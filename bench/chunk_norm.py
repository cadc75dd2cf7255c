"""G1 (issue 12): the network called once for both chunks, its batch norms normalising each
chunk apart (`buarl/fast/chunk_norm.py`, the engine's `SplitForward`), against one call
per chunk:

- accuracy: outputs, parameter gradients and running statistics of each way (eager and
  compiled) against the same computation in float64 (one call per chunk), as the largest
  difference relative to the largest value; the UNet on 2 x 2 images of 64², the VNet on
  2 x 2 volumes of 32³; dropout off (its masks are random draws);
- CPU time of a bf16 forward and backward at the `acdc_cpu` shape (UNet, 128², batch 16,
  2 chunks), both ways alternated, eager and compiled (inductor, default mode). (On a GPU:
  not measured.)

Writes bench/results/chunk_norm.json (or --out).

    python bench/chunk_norm.py [--repeats 5] [--no-vnet]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from buarl.nets import build
from buarl.engine import SplitForward
from buarl.fast.chunk_norm import norms_of, with_chunk_norms


def split(core: torch.nn.Module, one_call: bool):
    """x, chunks -> the network on each chunk: one call, its norms per chunk (the fast twin),
    or a call per chunk (the plain computation)."""
    if one_call:
        return SplitForward(core, norms_of(with_chunk_norms(core)))
    return lambda x, chunks: torch.cat([core(part) for part in x.chunk(chunks)])


def _no_dropout(net: torch.nn.Module) -> torch.nn.Module:
    for module in net.modules():
        module.train(not isinstance(module, torch.nn.modules.dropout._DropoutNd))
    return net


def _run(net: torch.nn.Module, x: torch.Tensor, one_call: bool, compile: bool):
    net = copy.deepcopy(net)
    core = torch.compile(net, dynamic=False) if compile else net
    out = split(core, one_call)(x, 2)
    out.square().mean().backward()
    return out, net


def accuracy(dataset: str, shape: tuple) -> dict:
    torch.manual_seed(0)
    net = _no_dropout(build(dataset, 4 if dataset == "acdc" else 2))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    x[shape[0] // 2:] = 3 * x[shape[0] // 2:] + 1  # the chunks' statistics differ
    ref_out, ref = _run(net.double(), x.double(), one_call=False, compile=False)
    ref_out = ref_out.detach()
    net = net.float()
    grad_scale = max(p.grad.abs().max() for p in ref.parameters())
    rows = {}
    for name, one_call, compile in (("per chunk, eager", False, False), ("per chunk, compiled", False, True),
                                    ("one call, eager", True, False), ("one call, compiled", True, True)):
        out, got = _run(net, x, one_call, compile)
        out = out.detach()
        rows[name] = {
            "output": float((out.double() - ref_out).abs().max() / ref_out.abs().max()),
            "gradient": float(max((a.grad.double() - b.grad).abs().max() for a, b in
                                  zip(got.parameters(), ref.parameters())) / grad_scale),
            "running_stats": float(max((a.double() - b).abs().max() for a, b in
                                       zip(got.buffers(), ref.buffers()) if a.is_floating_point())),
        }
        print(f"{dataset} {name:>20}: output {rows[name]['output']:.1e}, gradient {rows[name]['gradient']:.1e}, "
              f"running stats {rows[name]['running_stats']:.1e}", flush=True)
    return {"input": list(shape), "relative_to_float64": rows}


def cpu_time(repeats: int) -> dict:
    torch.manual_seed(0)
    net = build("acdc", 4).to(memory_format=torch.channels_last)
    x = torch.randn(16, 1, 128, 128).contiguous(memory_format=torch.channels_last)
    out = {"shape": "UNet, 16 x 1 x 128², 2 chunks, bf16 autocast, forward + backward"}
    for mode in ("eager", "compiled"):
        nets = {one_call: copy.deepcopy(net) for one_call in (False, True)}
        ways = {("one call" if one_call else "per chunk"):
                split(torch.compile(n, dynamic=False) if mode == "compiled" else n, one_call)
                for one_call, n in nets.items()}

        def step(way):
            with torch.autocast("cpu", torch.bfloat16):
                y = ways[way](x, 2)
            y.float().square().mean().backward()

        times = {way: [] for way in ways}
        for way in ways:
            step(way), step(way)  # warm-up (compilation, oneDNN's first calls)
        for _ in range(repeats):
            for way in ways:
                started = time.perf_counter()
                step(way)
                times[way].append(time.perf_counter() - started)
        median = {way: sorted(t)[len(t) // 2] for way, t in times.items()}
        print(f"{mode} bf16 step: per chunk {median['per chunk']:.3f} s, one call {median['one call']:.3f} s",
              flush=True)
        out[mode] = {"median_s": median, "one_call_over_per_chunk": median["one call"] / median["per chunk"],
                     "all_s": times}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-vnet", action="store_true", help="skip the VNet (its compilation takes ~1 minute)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "chunk_norm.json"))
    args = p.parse_args()
    results = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(),
               "command": "python bench/chunk_norm.py" + (" --no-vnet" if args.no_vnet else "")
               + f" --repeats {args.repeats}",
               "unet": accuracy("acdc", (4, 1, 64, 64))}
    if not args.no_vnet:
        results["vnet"] = accuracy("la", (4, 1, 32, 32, 32))
    results["cpu_time"] = cpu_time(args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
