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
