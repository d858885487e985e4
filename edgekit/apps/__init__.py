"""Apps built on the runner, one package each; each adds its commands to the `edgekit` CLI.

An app imports the runtime (`edgekit.runtimes`), never the other way round.
"""

from __future__ import annotations

import importlib

# One line per app: the module whose import registers the app's commands on `edgekit.cli.app`.
APP_COMMANDS: tuple[str, ...] = (
    "edgekit.apps.translate.cli",
)


def register_commands() -> None:
    for module in APP_COMMANDS:
        importlib.import_module(module)
