"""bench/ray_overhead.py's CPU accounting per process (the runs themselves: `--smoke`)."""
import pytest

from tests.conftest import load_bench

pytest.importorskip("psutil")


def _load():
    return load_bench("ray_overhead")


def test_cpu_is_counted_under_the_full_title_a_process_last_had(monkeypatch):
    """Ray retitles a worker (ray::IDLE -> ray::RayTrainWorker): its CPU goes to the new
    title. An exiting process shows only its kernel name, cut at 15 characters: its CPU must
    stay with its full title, or a Train worker's seconds count as Ray's own."""
    bench = _load()
    samples = iter([{1: ("ray::IDLE", 1.0), 2: ("raylet", 0.5)},
                    {1: ("ray::RayTrainWorker", 4.0), 2: ("raylet", 0.7)},
                    {1: ("ray::RayTrainWo", 9.0), 2: ("raylet", 0.75), 3: ("ray::RayTrainWo", 2.0)}])
    watch = bench.CpuWatch(period=0.0)

    def sample():
        try:
            return next(samples)
        except StopIteration:
            watch.stop = True
            return {}

    monkeypatch.setattr(bench, "cpu_seconds", sample)
    watch.run()
    # pid 3 was never seen under a longer title: it keeps the cut one
    assert watch.by_name() == {"ray::RayTrainWorker": pytest.approx(8.0), "ray::RayTrainWo": 2.0,
                               "raylet": pytest.approx(0.25)}
