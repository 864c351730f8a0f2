"""Running the ``protege`` CLI in-process from a test: exit code and stderr (whitespace folded)."""

from __future__ import annotations

import sys


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``protege ARGS`` through :func:`protege.cli.main`, as the console script runs it."""
    from protege import cli

    monkeypatch.setattr(sys, "argv", ["protege", *args])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, " ".join(capsys.readouterr().err.split())
