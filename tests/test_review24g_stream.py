"""review24g: a generator that was already read (partly, e.g. by an earlier call that stopped on a
bad batch, or wholly) is refused with one line, instead of calibrating silently on what is left."""
from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from test_data_stream import _model, _x

import bnfold
from bnfold.errors import BadInputError


def _gen(x: np.ndarray, step: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(x), step):
        yield {"x": x[i:i + step]}


def test_generator_left_half_read_by_a_failed_call_is_refused(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng, 11)
    x[5, 0, 0, 0] = np.nan  # batch 2 stops the first call; batch 3 is still in the generator
    g = _gen(x, 4)
    with pytest.raises(BadInputError, match="NaN"):
        bnfold.fold(model, data=g, dry_run=True, verify=False)
    with pytest.raises(BadInputError, match="already read") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bnfold.fold(model, data=g, dry_run=True, verify=False)
    assert "\n" not in str(info.value) and "new generator" in str(info.value)


def test_exhausted_generator_says_it_was_read(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng, 8)
    g = _gen(x, 4)
    list(g)
    with pytest.raises(BadInputError, match="already read"):
        bnfold.fold(model, data=g, dry_run=True, verify=False)


def test_fresh_generator_still_works(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = bnfold.fold(model, data=_gen(x, 4), dry_run=True, verify=False)
    [rec] = [b for b in r.report.bns if b.stats is not None]
    assert rec.stats.batches == 2
