"""bench/gpu.py's report from its measured phases (the phases themselves run buarl's loop;
`python bench/gpu.py --smoke` runs them for real on the CPU)."""
import importlib.util
import json
import sys

from tests.conftest import ROOT


def _load_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    return gpu


def test_report_has_every_target_with_its_figures(monkeypatch, capsys):
    gpu = _load_gpu()
    speeds = {"acdc": 50.0, "la": 8.0}

    def fake_phase(kind, root, iters, n, device, smoke, labeled, test_cases, compile_mode="none"):
        assert compile_mode == "none"
        each = speeds[kind] * (0.9 if n > 1 else 1.0)
        return [{"it_per_s": each, "evaluation_s": 4.0, "test_cases": 40, "gpu": "NVIDIA H100"}] * n, 75.0
    monkeypatch.setattr(gpu, "phase", fake_phase)
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--smoke", "--packed", "4"])
    gpu.main()
    report = json.loads(capsys.readouterr().out)
    assert report["G1_acdc_solo"] == {"it_per_s": 50.0, "gpu_util_pct": 75.0, "target": ">= 45 it/s and >= 70 % utilisation",
                                      "protocol_minutes_upper_bound": round(40000 / 50 / 60, 1)}
    assert report["G2_acdc_packed"]["min_share_of_solo"] == 0.9 and report["G2_acdc_packed"]["throughput_over_solo"] == 3.6
    assert report["G3_la"]["protocol_minutes_upper_bound"] == round(17000 / 8 / 60, 1)
    assert report["G5_evaluation"]["seconds"] == 4.0


def test_compiled_phase_is_measured_beside_eager_and_its_failure_is_a_result(monkeypatch, capsys):
    gpu = _load_gpu()
    calls = []

    def fake_phase(kind, root, iters, n, device, smoke, labeled, test_cases, compile_mode="none"):
        calls.append((kind, n, compile_mode))
        if compile_mode == "reduce-overhead" and fail:
            raise SystemExit("bench/gpu.py: a acdc worker failed (exit 1):\nskipping cudagraphs")
        each = 50.0 * (2.0 if compile_mode != "none" else 1.0)
        return [{"it_per_s": each, "evaluation_s": 4.0, "test_cases": 40, "gpu": "NVIDIA H100"}] * n, 75.0
    monkeypatch.setattr(gpu, "phase", fake_phase)
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--smoke", "--compile", "reduce-overhead"])
    fail = False
    gpu.main()
    report = json.loads(capsys.readouterr().out)
    assert calls[:3] == [("acdc", 1, "none"), ("acdc", 1, "reduce-overhead"), ("acdc", 4, "none")]
    assert report["G1_acdc_solo_compiled"]["over_eager"] == 2.0
    assert report["G1_acdc_solo_compiled"]["protocol_minutes_upper_bound"] == round(40000 / 100 / 60, 1)
    fail, calls[:] = True, []
    gpu.main()
    report = json.loads(capsys.readouterr().out)
    assert "skipping cudagraphs" in report["G1_acdc_solo_compiled"]["error"]
    assert "G2_acdc_packed" in report and "G3_la" in report  # the bench went on
