"""The `buarl` command: buarl's own commands (buarl/cli.py) plus what needs the orchestrator's
tracking store (`export --experiment`, from MLflow). buarl/ never imports the orchestrator;
this layer hands its exporter down."""
from __future__ import annotations

import sys


def export_experiment(*args, **kwargs):
    try:
        from orchestrator.export import export_best
    except ImportError as e:  # installed without the orchestrator extras
        from buarl.errors import ConfigError
        raise ConfigError(f"export --experiment needs the orchestrator extras "
                          f"(pip install -e '.[orchestrator]'): {e}") from None
    return export_best(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    from buarl.cli import main as buarl_main
    return buarl_main(argv, export_experiment=export_experiment)


if __name__ == "__main__":
    sys.exit(main())
