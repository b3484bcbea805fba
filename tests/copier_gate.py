"""The ``copier_gate`` fixture: holds a Checkpointer's background (lazy) copies while a test looks.

Tests never assert timing: where a test needs the lazy copies to be still pending (to edit the state in place
and check that nothing leaks, or to check that ``optimizer.step()`` waits), it holds them behind this gate.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import pytest
import torch

import ckpt.stager  # noqa: F401 - binds the eager ``copy_all`` at import, before the gate patches staging's
import ckpt.staging


@pytest.fixture
def copier_gate(monkeypatch: pytest.MonkeyPatch) -> Iterable[threading.Event]:
    """Holds the background copier (the lazy copies) until the test sets the returned event; ``clear()`` it
    again to hold a later snapshot's copies.

    Patches ``ckpt.staging.copy_all`` as the copier thread sees it; the eager copies in ``save`` are bound
    separately (``ckpt.stager.copy_all``) and stay synchronous.
    """
    ev = threading.Event()
    real = ckpt.staging.copy_all

    def held(copies: list[tuple[torch.Tensor, torch.Tensor]], *args: Any) -> None:
        assert ev.wait(60), "the test never released the copier"
        real(copies, *args)

    monkeypatch.setattr(ckpt.staging, "copy_all", held)
    yield ev
    ev.set()
