"""What a run records about where it came from: code version, library versions."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path

import torch

import buarl


def git_commit() -> str | None:
    """The full commit hash of the checkout the package runs from, if it is one."""
    here = Path(buarl.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def code_version() -> str:
    """`git describe` of the checkout the package runs from, or the package version."""
    here = Path(buarl.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    # `git archive` (a code snapshot, an sdist built from one) fills in buarl/COMMIT.
    stamped = (here / "COMMIT").read_text().strip() if (here / "COMMIT").is_file() else ""
    if stamped and not stamped.startswith("$Format"):
        return f"buarl-{buarl.__version__}+g{stamped[:12]}"
    return f"buarl-{buarl.__version__}"


def source_digest(*roots: Path) -> str:
    """12 hex digits of sha256 over the .py / .yaml sources under `roots`: names the code that
    actually runs, also where git cannot (a snapshot, the copy Ray ships to a worker)."""
    h = hashlib.sha256()
    for root in roots:
        root = Path(root).resolve()
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
            h.update(f"{root.name}/{f.relative_to(root).as_posix()}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def environment() -> dict:
    # Named for its scope: a sweep's `buarl.code_digest` also covers orchestrator/.
    return {"code_version": code_version(), "buarl_digest": source_digest(Path(buarl.__file__).parent),
            "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}
