"""Device, precision and seeding: the few places where hardware shows through."""
from __future__ import annotations

import contextlib
import functools
import random

import numpy as np
import torch
from torch import nn

from buarl.config import Config
from buarl.errors import ConfigError


def device_of(cfg: Config) -> torch.device:
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key 'device': {cfg.device!r} requested but CUDA is not available "
                          "(use --set device=cpu precision=bf16 for a CPU run)")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 / AMX). Without them oneDNN emulates bf16,
    which measured ~9x *slower* than fp32 for the UNet on the AVX2-only CI machines."""
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
    worker (measured 2.0-2.2x on an H200), eager elsewhere: on CPUs compilation costs more than
    a short run gains, DDP's hooks fight CUDA-graph trees, and fp16 AMP with its loss scaler
    (pre-Ampere cards) was never measured with them."""
    if cfg.compile != "auto":
        return cfg.compile
    cuda_graphs = device.type == "cuda" and world == 1 and precision_of(cfg, device) == "bf16"
    return "reduce-overhead" if cuda_graphs else "none"


def compiled(model, mode: str):
    """The module (or function) as training calls it: itself, or torch.compile'd in `mode`.
    A compiled module's wrapper shares its parameters and buffers (the EMA and checkpoints
    keep using the module); shapes are fixed per call site, so no dynamic-shape graphs."""
    if mode == "none":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


@functools.cache
def graph_of(fn):
    """`fn`, tensor code around the networks, compiled into one graph (a break is an error):
    inductor for fixed shapes, without CUDA graphs (its inputs are outputs of the step's own
    graphs). One compiled function per `fn` in a process."""
    return torch.compile(fn, dynamic=False, fullgraph=True)


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


def step_begin(mode: str) -> None:
    """Tells CUDA-graph trees a new iteration starts: the previous one's graph outputs may be
    overwritten (the loop keeps none of them across iterations)."""
    if mode in ("reduce-overhead", "max-autotune"):
        torch.compiler.cudagraph_mark_step_begin()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
