"""What the sweep needs from Ray's environment, in one place: the environment defaults, the
runtime environment of the workers, and the two private Ray helpers around the bootstrap
address file (`tests/test_ray_env.py` fails if they move). Ray is imported lazily: the
tables and the export never load it."""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

ENV_DEFAULTS = {
    # The classic CLIReporter table (trimmed to the searched parameters and the metrics)
    # instead of the new engine's per-trial result dumps; worker logs stay in Ray's files.
    "RAY_AIR_NEW_OUTPUT": "0",
    # By default Tune catches Ctrl-C, saves its state and returns from fit() as if the grid
    # point had ended, and the sweep would start the next one. Let the interrupt reach the
    # grid loop instead: Tune's periodic state and the trials' checkpoints are what --resume
    # uses (the same as after a killed driver).
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}


def apply_env_defaults() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextmanager
def env_while(env: dict[str, str]):
    """`env` in os.environ while the block runs (a value already set wins), so the processes
    started in it inherit it; afterwards the driver's environment is as it was."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# Ray 2.60 turns a node address of 127.0.0.1 into the machine's routable one and then binds its
# servers to every interface (ray/_private/services.py, resolve_ip_for_localhost ->
# get_node_ip_address). Only with its cluster mode off does a node keep the loopback address,
# and the GCS, raylet, workers and agents then listen on loopback only. The switch is read
# when Ray is imported: the driver sets it before its first `import ray`, and every process
# of the cluster inherits it.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def keep_on_loopback() -> bool:
    """Set the loopback switch for this process and the cluster it starts; False when Ray was
    imported before without it (its servers will then listen beyond loopback)."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    constants = sys.modules.get("ray._private.ray_constants")
    return constants is None or not getattr(constants, "ENABLE_RAY_CLUSTER", False)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6 (`::ffff:127.0.0.1`, how Ray's
    dual-stack servers show a loopback socket)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host == "localhost"
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def local_cluster_env(dashboard: bool) -> dict[str, str]:
    """What a local cluster of the sweep's own leaves out (Ray reads RAY_<setting> when its
    processes start). Ray prestarts idle workers for the first driver, but a trial needs a
    worker with the sweep's runtime environment and gets a new one, so the idle ones only
    take CPU from the trials (ray::IDLE took 3.9 CPU-s of the G6 bench's two-trial sweep). Ray
    Train starts a preemption watcher per worker group, an actor that polls for nodes being
    drained (spot instances, autoscaler): one machine's cluster is never drained, and the
    watchers took 7.4 CPU-s of the `runner: train` sweep. Metrics are collected for the
    dashboard: without one, nothing reads them."""
    env = {"RAY_prestart_worker_first_driver": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    if not dashboard:
        env["RAY_enable_metrics_collection"] = "0"
    return env


def worker_runtime_env(packages: list[Path]) -> dict:
    # Workers on a loaded machine (or a node still starting) can need more than Ray
    # Train's default 60 s to come up; a timeout there looks like a hang of the trial.
    return {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S":
                         os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")},
            # Workers run this driver's buarl and orchestrator (a snapshot, a dirty checkout),
            # never a node's installed copy; their results name the code.
            "py_modules": [str(p) for p in packages], "excludes": ["__pycache__"]}


def bootstrap_file() -> Path:
    """Where `ray start` (and this sweep) name the machine's current cluster."""
    from ray._private.utils import get_ray_address_file
    return Path(get_ray_address_file(None))


def write_bootstrap(address: str) -> None:
    """Ray Train's placement-group cleaner finds the cluster through the bootstrap file that
    `ray start` writes but `ray.init` does not; a stale file from an earlier cluster makes it
    fail and leak the finished trial's resources, so the next trial waits forever."""
    from ray._private.utils import write_ray_address
    write_ray_address(address)


def live_local_cluster(path: Optional[Path] = None) -> Optional[str]:
    """The address of a Ray cluster already running on this machine (the bootstrap file names
    it and its GCS accepts a connection), or None (no file, or a stale one)."""
    path = path or bootstrap_file()
    try:
        address = path.read_text().strip()
        host, _, port = address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=1):
            return address
    except (OSError, ValueError):
        return None
