"""A search's winner (by validation, never test) promoted to a row of a paired evaluation."""
import yaml

from orchestrator.promote import main
from orchestrator.space import load_space
from tests.conftest import mlflow_store


def test_the_validation_winner_becomes_a_row_on_the_evaluation_grid(tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("evidence_search", artifact_location=(tmp_path / "art").as_uri())
    for trial, (val, test, tau_l, mode) in enumerate([(0.70, 0.50, 0.2, "soft"), (0.60, 0.90, 0.8, "hard")]):
        run = client.create_run(exp, tags={"buarl.role": "trial", "buarl.trial_id": str(trial)}).info.run_id
        params = {"base": "bcp", "url": True, "crl": True, "labeled": 3, "seed": 2001, "dataset": "acdc",
                  "region_mode": "quantile", "tau_l": tau_l, "tau_u": 0.4, "url_mode": "term", "crl_mode": mode,
                  "lambda_url": 1.5, "lambda_crl": 0.7, "ema_decay": 0.95}
        for k, v in params.items():
            client.log_param(run, k, v)
        client.log_metric(run, "best_val_dice", val)
        client.log_metric(run, "test_dice", test)
        client.set_terminated(run)
    out = tmp_path / "tuned.yaml"
    assert main(["--experiment", "evidence_search", "--evaluation", "evidence", "--row", "BUARL searched",
                 "--tracking-uri", uri, "--out", str(out)]) == 0
    space, _ = load_space(str(out))
    assert space.grid.seed == [11, 12, 13, 14, 15, 16, 17, 18] and space.grid.labeled == [3, 7]
    (switch,) = space.grid.switches
    assert switch == {"row": "BUARL searched", "base": "bcp", "url": True, "crl": True, "region_mode": "quantile",
                      "tau_l": 0.2, "tau_u": 0.4, "url_mode": "term", "crl_mode": "soft", "lambda_url": 1.5,
                      "lambda_crl": 0.7, "ema_decay": 0.95}
    assert "best of 2 FINISHED trials by validation" in out.read_text()
    assert main(["--experiment", "evidence_search", "--evaluation", "evidence", "--row", "x",
                 "--tracking-uri", uri, "--out", str(out)]) == 2  # never overwrites
    assert yaml.safe_load(out.read_text())["grid"]["switches"][0]["row"] == "BUARL searched"
