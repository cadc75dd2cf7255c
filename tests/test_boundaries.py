"""Package boundaries: buarl/ (the method) imports neither the orchestrator nor Ray nor MLflow."""
import ast

from tests.conftest import ROOT

FORBIDDEN = ("orchestrator", "ray", "mlflow", "optuna")


def test_buarl_imports_no_orchestrator_ray_or_mlflow():
    found = []
    for path in sorted((ROOT / "buarl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert found == []


def test_export_by_experiment_is_refused_by_buarl_alone(tmp_path, capsys):
    from buarl.cli import main
    assert main(["export", "--experiment", "x", "--out", str(tmp_path / "m")]) == 2
    assert "run it through the `buarl` command" in capsys.readouterr().err


def test_method_and_data_import_nothing_of_the_engine_or_its_fast_twins():
    """The method's math and the data readers sit below the engine: no compile flags, no
    device paths travel into them (the engine chooses and prepares)."""
    found = []
    for folder in ("method", "data", "nets"):
        for path in sorted((ROOT / "buarl" / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("buarl.engine", "buarl.fast")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
                if isinstance(node, ast.arg) and node.arg == "compiled":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} parameter `compiled`")
    assert found == []


def test_a_stored_config_with_a_retired_speed_key_still_loads():
    import pytest

    from buarl.config import load_config, validate
    from buarl.errors import ConfigError

    values = {**load_config("phantom").to_dict(), "split_calls": "one"}
    assert validate(values, stored=True) == load_config("phantom")
    with pytest.raises(ConfigError, match="split_calls"):  # a new config may not use it
        validate(values)
