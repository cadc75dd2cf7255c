from __future__ import annotations

from pathlib import Path

import pytest

from buarl.data import phantom

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def free_port() -> int:
    """A free local port, e.g. for a test cluster's dashboard: another Ray cluster on the
    machine may hold 8265, and without its dashboard a cluster has no State API."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STORE_TEMPLATE: list[Path] = []


def mlflow_store(folder: Path, name: str = "mlflow.db") -> str:
    """The sqlite URI of an MLflow store in `folder`, created as an empty, migrated store if
    it is not there yet. Creating a store runs MLflow's schema migrations (seconds each);
    one per session is made and copied, so the tests open it as any existing store. A test
    of store creation itself names a fresh file instead."""
    import atexit
    import shutil
    import tempfile
    db = Path(folder) / name
    if not db.exists():
        if not _STORE_TEMPLATE:
            home = tempfile.mkdtemp(prefix="buarl-mlflow-template-")
            atexit.register(shutil.rmtree, home, True)
            template = Path(home) / "mlflow.db"
            from mlflow.tracking import MlflowClient
            MlflowClient(f"sqlite:///{template}").search_experiments(max_results=1)
            _STORE_TEMPLATE.append(template)
        shutil.copyfile(_STORE_TEMPLATE[0], db)
    return f"sqlite:///{db}"


def load_bench(name: str):
    """bench/<name>.py as a module (the bench scripts are not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_real_data = pytest.mark.skipif(not (SHARED / "ACDC").is_dir() or not (SHARED / "LA").is_dir(),
                                     reason=f"real data not found at {SHARED}")


@pytest.fixture(scope="session")
def acdc_phantom(tmp_path_factory) -> Path:
    return phantom.make_acdc(tmp_path_factory.mktemp("acdc") / "ACDC", cases=4, seed=0)


@pytest.fixture(scope="session")
def la_phantom(tmp_path_factory) -> Path:
    return phantom.make_la(tmp_path_factory.mktemp("la") / "LA", cases=4, seed=0)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # The phantom cache of "no data root" runs goes to a test folder, not ~/.cache.
    monkeypatch.setenv("BUARL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
