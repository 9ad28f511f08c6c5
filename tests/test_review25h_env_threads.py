"""Review 25h: ``guarded_export_load`` forces ``torch.load`` to weights_only through the process
environment; two threads loading at once must neither lift the guard under the other nor leave
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set in the process afterwards."""
from __future__ import annotations

import os
import threading

import pytest

pytest.importorskip("torch")

from bnfold.torch import archive  # noqa: E402


def test_overlapping_guards_restore_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(archive._FORCE, raising=False)
    monkeypatch.delenv(archive._FORCE_NO, raising=False)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, str | None] = {}

    def first() -> None:
        with archive._weights_only_forced():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second() -> None:
        a_in.wait(5)
        with archive._weights_only_forced():
            b_in.set()
            a_out.wait(5)
            seen["inside_after_first_left"] = os.environ.get(archive._FORCE)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["inside_after_first_left"] == "1"  # the guard still holds for the second load
    assert os.environ.get(archive._FORCE) is None  # and nothing is left set in the process
