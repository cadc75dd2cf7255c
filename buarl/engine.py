"""How a run uses its hardware, never what it computes: device, precision, compile mode,
memory format, and which implementation of a method function runs (the plain one in
`method/` and `data/`, or its twin in `fast/` on a device). The loop builds one `Engine`
from the config and asks it to prepare every callable of a step; `method/` and `data/`
import nothing from here."""
from __future__ import annotations

import contextlib
import functools
import random
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from buarl.config import Config
from buarl.errors import ConfigError
from buarl.fast import augment as fast_augment
from buarl.fast import components
from buarl.fast.chunk_norm import norms_of, per_chunk, with_chunk_norms
from buarl.method.pseudo import pseudo_labels


def device_of(cfg: Config) -> torch.device:
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key 'device': {cfg.device!r} requested but CUDA is not available "
                          "(use --set device=cpu precision=bf16 for a CPU run)")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 / AMX). Without them oneDNN emulates bf16, far
    slower than fp32 (bench/precision.py)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_of(cfg: Config, device: torch.device) -> str:
    """The precision a run really uses: `auto` picks bf16 on GPUs that have it (no loss
    scaling, so no host sync per step for the scaler's inf check) and fp16 AMP on older ones,
    bf16 on CPUs with native bf16, fp32 elsewhere."""
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "amp"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast, fp16 AMP on CUDA, or plain fp32."""
    precision = precision_of(cfg, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda" and precision == "amp":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def memory_format(cfg: Config, dim: int, device: torch.device | None = None):
    if precision_of(cfg, device or torch.device(cfg.device)) == "fp32":
        return torch.contiguous_format
    return torch.channels_last if dim == 2 else torch.channels_last_3d


def to_device(model: nn.Module, cfg: Config, device: torch.device, dim: int) -> nn.Module:
    return model.to(device=device, memory_format=memory_format(cfg, dim))


def compile_mode_of(cfg: Config, device: torch.device, world: int = 1) -> str:
    """The torch.compile mode a run really uses: `auto` is CUDA graphs on a bf16 GPU with one
    worker (kernel launches bound such an iteration, BENCHMARKS.md), eager elsewhere: on CPUs
    compilation costs more than a short run gains, DDP's hooks fight CUDA-graph trees, and fp16
    AMP with its loss scaler (pre-Ampere cards) is unmeasured with them."""
    if cfg.compile != "auto":
        return cfg.compile
    cuda_graphs = device.type == "cuda" and world == 1 and precision_of(cfg, device) == "bf16"
    return "reduce-overhead" if cuda_graphs else "none"


def upload(values, device: torch.device) -> torch.Tensor:
    """A host tensor (or list of numbers) on `device`, without a host sync. A plain
    `.to("cuda")` of pageable host memory makes the host wait for every kernel already
    queued, which empties the card's queue once per call. From pinned memory the copy is
    queued like a kernel, and PyTorch's caching host allocator keeps the pinned source
    until the copy is done. A tensor already off the host just moves (usually: stays)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SplitForward(nn.Module):
    """The network called on a batch whose `chunks` equal parts batch norm normalises apart
    (BCP forwards its two mixed halves as two calls): one call, its norm layers switched to
    per-part statistics for the call (fast/chunk_norm.py), so DDP sees one forward and one
    backward per step and the convolutions run once on the whole batch."""

    def __init__(self, core: nn.Module, norms: list[nn.Module]):
        super().__init__()
        self.core, self.norms = core, norms

    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        if chunks == 1:
            return self.core(x)
        with per_chunk(self.norms, chunks):
            return self.core(x)


class Probabilities(nn.Module):
    """The network's softmax in float32: the teacher's output, so that a compiled teacher's
    graph holds the softmax too."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x).float(), 1)


class Forward:
    """x, chunks -> a network's float32 output under the run's autocast, the input in the
    network's memory format (a plain NCHW input to channels-last weights makes oneDNN reorder
    it at every layer). `module` is what the step calls: DDP's wrapper for the student."""

    def __init__(self, module: nn.Module, engine: "Engine"):
        self.module, self.engine = module, engine

    def __call__(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        with self.engine.autocast():
            return self.module(x.contiguous(memory_format=self.engine.fmt), chunks).float()


class Engine:
    """Built once per run from the config and the data's dimension. The loop hands it its
    networks and tensor code and calls what comes back; `prepare` is the one seam every step
    callable passes through (a benchmark subclasses the engine and wraps them there)."""

    def __init__(self, cfg: Config, dim: int, world: int = 1):
        self.cfg, self.dim = cfg, dim
        self.device = device_of(cfg)
        self.precision = precision_of(cfg, self.device)
        self.compile = compile_mode_of(cfg, self.device, world)
        self.fmt = memory_format(cfg, dim, self.device)
        # The fast twins (fast/) where they pay: on a device, where every host round trip
        # stalls the card; on a CPU the plain code is the faster one.
        self.device_paths = self.device.type != "cpu"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once

    # ---- the seam --------------------------------------------------------------------------
    def prepare(self, name: str, fn: Callable) -> Callable:
        """Every callable of a training step, by name (`teacher`, `student`, `loss`,
        `bcp_batch`, `pseudo_labels`, `batch`, `draws`, `box_mask`, `ema`), returned as is."""
        return fn

    def step_begin(self) -> None:
        """Tells CUDA-graph trees a new iteration starts: the previous one's graph outputs may
        be overwritten (the loop keeps none of them across iterations)."""
        if self.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def upload(self, values) -> torch.Tensor:
        return upload(values, self.device)

    def autocast(self):
        return autocast(self.cfg, self.device)

    # ---- networks --------------------------------------------------------------------------
    def place(self, net: nn.Module) -> nn.Module:
        """The network on the device in the run's memory format, its batch norms able to
        normalise parts of a batch apart (plain batch norm until a split forward asks)."""
        return to_device(with_chunk_norms(net), self.cfg, self.device, self.dim)

    def network(self, net: nn.Module) -> nn.Module:
        """A module as training calls it: itself, or torch.compile'd. The compiled wrapper
        shares the module's parameters and buffers (the EMA and checkpoints keep using it);
        shapes are fixed per call site, so no dynamic-shape graphs."""
        if self.compile == "none":
            return net
        return torch.compile(net, mode=None if self.compile == "default" else self.compile, dynamic=False)

    def teacher(self, net: nn.Module) -> Forward:
        """x, chunks -> the teacher's probabilities, batch norm per chunk."""
        return self.prepare("teacher", Forward(SplitForward(self.network(Probabilities(net)), norms_of(net)), self))

    def student(self, net: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> Forward:
        """The student as the step calls it. The norms' chunk count is set around the
        (compiled) network's call, never inside a graph: compiled whole with its backward, the
        split made inductor (torch 2.13) get the first layers' gradients wrong."""
        module = wrap(SplitForward(self.network(net), norms_of(net)))
        return self.prepare("student", Forward(module, self))

    # ---- tensor code around the networks ----------------------------------------------------
    def tensor_code(self, name: str, fn: Callable) -> Callable:
        """`fn` (tensor code: the loss, the copy-paste batch) compiled in a compiled run,
        without CUDA graphs of its own (its inputs are outputs of this step's graphs); eager,
        each of its small ops is a kernel the host launches."""
        return self.prepare(name, fn if self.compile == "none" else torch.compile(fn, dynamic=False))

    def graph(self, fn: Callable) -> Callable:
        """`fn` as one compiled graph (a break is an error) in a compiled run, else itself."""
        return fn if self.compile == "none" else _graph(fn)

    def pseudo_labels(self, classes: int, lcc: bool, connectivity: str) -> Callable:
        """probs -> the teacher's labels, with `lcc` each foreground class its largest
        component: scipy on a CPU, device label propagation elsewhere (no host round trip)."""
        if lcc and self.device_paths:
            largest = components.KeepLargest(classes, connectivity, self.graph)
            return self.prepare("pseudo_labels", lambda probs: largest(probs.argmax(1)))
        return self.prepare("pseudo_labels", lambda probs: pseudo_labels(probs, lcc, connectivity))

    def batches(self, data) -> Callable:
        """idx, gen -> a training batch (images, labels) on the device, augmented. On a device,
        square 2-D slices are kept there and go through one batched grid sample
        (fast/augment.py); elsewhere the data's own batch (host augmentation), uploaded."""
        on_device = self.device_paths and data.dim == 2 and data.images.shape[-1] == data.images.shape[-2]
        if not on_device:
            return self.prepare("batch", lambda idx, gen: tuple(self.upload(v) for v in data.batch(idx, gen)))
        images, labels = data.images.to(self.device), data.labels.to(self.device)
        sample = self.graph(fast_augment.sample)
        draws = self.prepare("draws", fast_augment.draw_thetas)  # host work, no kernels

        def batch(idx, gen):
            ix = self.upload(idx)
            theta = self.upload(draws(len(idx), gen))
            return sample(images[ix], labels[ix].long(), theta)
        return self.prepare("batch", batch)

    def optimizer(self, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
        # fused: one kernel for the whole SGD update on a GPU (the CPU keeps the default path)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               fused=self.device.type == "cuda")


@functools.cache
def _graph(fn):
    """One compiled function per `fn` in a process: inductor for fixed shapes, fullgraph."""
    return torch.compile(fn, dynamic=False, fullgraph=True)
