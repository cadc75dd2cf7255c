"""bench/gpu.py's report from its measured phases (the phases themselves run buarl's loop;
`python bench/gpu.py --smoke` runs them for real on the CPU)."""
import json
import sys

from tests.conftest import ROOT, load_bench


def _load_gpu():
    return load_bench("gpu")


def test_report_has_every_target_with_its_figures(monkeypatch, capsys):
    gpu = _load_gpu()
    speeds = {"acdc": 50.0, "la": 8.0}

    def fake_phase(kind, root, iters, n, device, smoke, labeled, test_cases, compile_mode="none", eager_glue=False,
                   overrides=None):
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

    def fake_phase(kind, root, iters, n, device, smoke, labeled, test_cases, compile_mode="none", eager_glue=False,
                   overrides=None):
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
    # eager baseline, compiled solo, eager packing, LA, then packing and LA compiled
    assert calls == [("acdc", 1, "none"), ("acdc", 1, "reduce-overhead"), ("acdc", 4, "none"), ("la", 1, "none"),
                     ("acdc", 4, "reduce-overhead"), ("la", 2, "none"), ("la", 1, "reduce-overhead")]
    assert report["G1_acdc_solo_compiled"]["over_eager"] == 2.0
    assert report["G1_acdc_solo_compiled"]["protocol_minutes_upper_bound"] == round(40000 / 100 / 60, 1)
    assert report["G2_acdc_packed_compiled"]["min_share_of_solo"] == 1.0
    assert report["G2_acdc_packed_compiled"]["throughput_over_eager_solo"] == 8.0
    assert report["G3_la"]["compiled"]["solo_it_per_s"] == 100.0
    fail, calls[:] = True, []
    gpu.main()
    report = json.loads(capsys.readouterr().out)
    assert "skipping cudagraphs" in report["compile_failures"]["G1 reduce-overhead"]
    assert "G1_acdc_solo_compiled" not in report and "G2_acdc_packed_compiled" not in report
    assert "G2_acdc_packed" in report and "G3_la" in report  # the bench went on, eager only
    assert ("acdc", 4, "reduce-overhead") not in calls


def test_a_failed_compile_mode_falls_back_to_the_next(monkeypatch, capsys):
    gpu = _load_gpu()
    calls = []

    def fake_phase(kind, root, iters, n, device, smoke, labeled, test_cases, compile_mode="none", eager_glue=False,
                   overrides=None):
        calls.append((kind, n, compile_mode))
        if compile_mode == "reduce-overhead":
            raise SystemExit("bench/gpu.py: a acdc worker failed (exit 1):\nCUDA graphs")
        each = 50.0 * (1.5 if compile_mode == "default" else 1.0)
        return [{"it_per_s": each, "evaluation_s": 4.0, "test_cases": 40, "gpu": "NVIDIA H100"}] * n, 75.0
    monkeypatch.setattr(gpu, "phase", fake_phase)
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--smoke", "--compile", "reduce-overhead,default"])
    gpu.main()
    report = json.loads(capsys.readouterr().out)
    assert calls[1:3] == [("acdc", 1, "reduce-overhead"), ("acdc", 1, "default")]
    assert report["G1_acdc_solo_compiled"]["compile"] == "default" and report["G1_acdc_solo_compiled"]["over_eager"] == 1.5
    assert ("acdc", 4, "default") in calls and "CUDA graphs" in report["compile_failures"]["G1 reduce-overhead"]


def test_an_unknown_compile_mode_is_refused_before_any_phase(monkeypatch):
    gpu = _load_gpu()
    monkeypatch.setattr(gpu, "phase", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a phase ran")))
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--smoke", "--compile", "reduce_overhead"])
    import pytest
    with pytest.raises(SystemExit, match="reduce_overhead"):
        gpu.main()


def test_gpu_profile_reports_speed_and_where_the_time_goes(tmp_path, monkeypatch):
    """bench/gpu_profile.py on the CPU with the phantom: iterations only (no evaluation), a
    header with the speeds and the profiler's tables."""
    prof = load_bench("gpu_profile")
    out = tmp_path / "profile.txt"
    monkeypatch.setattr(sys, "argv", ["gpu_profile.py", "--device", "cpu", "--iters", "2", "--warmup", "1",
                                      "--out", str(out)])
    import buarl.train as train_module
    evaluate = train_module.evaluate
    prof.main()
    assert train_module.evaluate is evaluate  # the loop's evaluation is back for everything after
    text = out.read_text()
    assert "compile=none, config phantom" in text and "unprofiled:" in text and "GPU busy 0.0 ms" in text
    assert "aten::convolution" in text and text.count("Self CPU time total") == 2


def test_a_later_compiled_phase_that_fails_is_recorded_and_the_bench_goes_on(monkeypatch, capsys):
    gpu = _load_gpu()

    def fake_phase(kind, root, iters, n, device, smoke, labeled, test_cases, compile_mode="none", eager_glue=False,
                   overrides=None):
        if compile_mode != "none" and n > 1:
            raise SystemExit("bench/gpu.py: a acdc worker failed (exit 1):\nout of memory")
        return [{"it_per_s": 50.0, "evaluation_s": 4.0, "test_cases": 40, "gpu": "NVIDIA H100"}] * n, 75.0
    monkeypatch.setattr(gpu, "phase", fake_phase)
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--smoke", "--compile", "reduce-overhead"])
    gpu.main()
    report = json.loads(capsys.readouterr().out)
    assert "out of memory" in report["compile_failures"]["G2 reduce-overhead"]
    assert "G2_acdc_packed_compiled" not in report and report["G3_la"]["compiled"]["solo_it_per_s"] == 50.0
    assert [p["phase"] for p in report["phases"]] == ["G1 eager", "G1 reduce-overhead", "G2 eager", "G3 eager",
                                                      "G3 eager x2", "G3 reduce-overhead"]


def test_result_files_are_named_after_the_card():
    gpu = _load_gpu()
    names = [p.name for p in (ROOT / "bench" / "results").glob("gpu_*")]
    for card, slug in (("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3"), ("NVIDIA H200", "NVIDIA_H200")):
        assert gpu.card_slug(card) == slug
        assert f"gpu_{slug}.json" in names  # the committed results carry it, and gpu_profile.py's too
        assert any(n.startswith(f"gpu_profile_{slug}_") or n == f"gpu_profile_{slug}.txt" for n in names)
