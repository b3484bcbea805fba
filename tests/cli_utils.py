"""Run the ``ckpt`` CLI in-process, as the tests do (a torch import per subprocess would cost seconds)."""

from __future__ import annotations

import contextlib
import io
import subprocess


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``ckpt ARGS...`` in this process: its exit code (argparse's usage errors included), stdout and stderr."""
    from ckpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())
