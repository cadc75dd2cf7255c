"""What a run records about where it came from: code version, library versions."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

import buarl


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


def environment() -> dict:
    return {"code_version": code_version(), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}
