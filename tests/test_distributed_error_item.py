"""What a failed rank tells the others (bnfold.distributed.combine): the same one line its own
report gives. bnfold's own errors are worded for the user and go as they are; any other exception
(a data iterator's KeyError, a bug) names its class, since its message alone ("'image'") says
nothing; an interrupt says so."""
from __future__ import annotations

import pytest

from bnfold.distributed.combine import _error_item
from bnfold.errors import BadInputError, UnsupportedModelError


@pytest.mark.parametrize(("exc", "said", "code"), [
    (BadInputError("calibration data has NaN values; clean it"), "calibration data has NaN values; clean it", 3),
    (UnsupportedModelError("a loop\nover BNs"), "a loop over BNs", UnsupportedModelError.exit_code),
    (KeyError("image"), "KeyError: 'image'", 3),
    (AssertionError(), "AssertionError", 3),
    (ValueError("  "), "ValueError", 3),
    (RuntimeError("shape\n  mismatch"), "RuntimeError: shape mismatch", 3),
    (KeyboardInterrupt(), "interrupted (KeyboardInterrupt)", 3),
])
def test_a_failed_rank_sends_one_line_naming_what_failed(exc: BaseException, said: str, code: int) -> None:
    assert _error_item(exc) == {"error": said, "exit_code": code}


def test_a_long_message_is_cut_after_the_class_name() -> None:
    item = _error_item(TypeError("x" * 1000))
    assert item["error"].startswith("TypeError: xxx") and item["error"].endswith("...")
    assert len(item["error"]) == len("TypeError: ") + 300
