"""The Ray environment the sweep relies on, and the refusal of a second local cluster."""
import inspect
import socket

from orchestrator import ray_env
from orchestrator.sweep import main as sweep_main
from tests.conftest import mlflow_store


def test_the_private_ray_helpers_the_sweep_uses_still_exist():
    """The bootstrap-address helpers are private Ray API: an upgrade that moves them must fail here."""
    from ray._private import utils
    assert list(inspect.signature(utils.write_ray_address).parameters)[:1] == ["ray_address"]
    assert ray_env.bootstrap_file().name == "ray_current_cluster"


def test_a_live_cluster_is_found_and_a_stale_bootstrap_file_is_not(tmp_path):
    file = tmp_path / "ray_current_cluster"
    assert ray_env.live_local_cluster(file) is None  # no file
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        file.write_text(address)
        assert ray_env.live_local_cluster(file) == address
    assert ray_env.live_local_cluster(file) is None  # the cluster is gone: a stale file
    file.write_text("garbage")
    assert ray_env.live_local_cluster(file) is None


def test_a_second_local_sweep_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("orchestrator.sweep.live_local_cluster", lambda: "127.0.0.1:6379")
    rc = sweep_main(["--space", "phantom_tiny", "--storage", str(tmp_path / "ray"),
                     "--tracking-uri", mlflow_store(tmp_path, "m.db")])
    err = capsys.readouterr().err
    assert rc == 2 and "another Ray cluster is running on this machine (127.0.0.1:6379)" in err
    assert "--address auto" in err
    assert not (tmp_path / "ray" / "phantom_tiny").exists()  # no sweep state: a later run starts clean


def _idle_workers() -> list:
    import psutil
    return [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::IDLE")]


def test_a_sweeps_own_cluster_prestarts_no_idle_workers():
    """Ray prestarts idle workers for the first driver; a trial needs a worker with the
    sweep's runtime environment, so they only took CPU from the trials. The sweep's local
    cluster starts none, its workers (where a trial starts Ray Train) see Ray Train's
    preemption watcher switched off, and the driver's environment is left as it was."""
    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR
    import os
    import time

    import ray
    from orchestrator import sweep

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # Ray's default
    try:
        start = time.time()
        while not _idle_workers() and time.time() - start < 20:
            time.sleep(0.2)
        waited = time.time() - start
        assert _idle_workers(), "a default local cluster prestarts idle workers (what this test looks for)"
    finally:
        ray.shutdown()
    args = sweep.parser().parse_args(["--space", "phantom_tiny"])
    plan, _ = sweep.prepare(args)
    sweep.start_ray(args, plan, {})
    try:
        time.sleep(waited + 2)
        assert not _idle_workers()
        worker_env = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in (
            ENABLE_PREEMPTION_WATCHER_ENV_VAR, "RAY_prestart_worker_first_driver")}).remote())
        assert worker_env == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_prestart_worker_first_driver": "0"}
        assert "RAY_prestart_worker_first_driver" not in os.environ
        assert ENABLE_PREEMPTION_WATCHER_ENV_VAR not in os.environ
    finally:
        ray.shutdown()
