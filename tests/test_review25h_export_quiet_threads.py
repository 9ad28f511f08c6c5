"""Review 25h: the export's quiet block swaps process-wide state (the warnings filters and
``showwarning``, ``torch._C._jit_onnx_log``); two threads exporting at once (two
``bnfold.torch.convert`` calls) must leave all of it as it was, not with warnings recorded into a
dead list and filtered "always" for the rest of the process."""
from __future__ import annotations

import threading
import warnings

import pytest

torch = pytest.importorskip("torch")

from bnfold.torch import export  # noqa: E402


def test_overlapping_quiet_blocks_restore_process_state() -> None:
    filters = list(warnings.filters)
    show = warnings._showwarnmsg_impl  # type: ignore[attr-defined]
    log = torch._C._jit_onnx_log
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    notes: list[str] = []

    def first() -> None:
        with export._quiet(notes):
            a_in.set()
            b_in.wait(1)
        a_out.set()

    def second() -> None:
        a_in.wait(5)
        with export._quiet(notes):
            b_in.set()
            a_out.wait(5)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert torch._C._jit_onnx_log is log
    assert warnings._showwarnmsg_impl is show  # type: ignore[attr-defined]
    assert warnings.filters == filters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.warn("still seen", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["still seen"]
