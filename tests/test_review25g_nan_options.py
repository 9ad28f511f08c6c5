"""Review 25g: click's FloatRange lets NaN through, and --val-range took inf: `--quantile nan` was
exit 3 (not a usage error), `--dist-timeout nan` was accepted, `--val-range 0,inf` was an internal
error and `--val-range nan,1` exit 3. Each is a bad option value: exit 2, one usage error, no run."""
from __future__ import annotations

import pytest
from cli_run import run_cli

U = "sample_models/unfoldable.onnx"


@pytest.mark.parametrize("args", [
    ["verify", U, U, "--check-error-stat", "quantile", "--quantile", "nan"],
    ["fold", U, "--dry-run", "--quantile", "nan"],
    ["inspect", U, "--dist-timeout", "nan"],
    ["fold", U, "--dry-run", "--dist-timeout", "nan"],
    ["verify", U, U, "--val-range", "nan,1"],
    ["verify", U, U, "--val-range", "0,inf"],
    ["verify", U, U, "--val-range", "-inf,0"],
])
def test_non_finite_option_values_are_usage_errors(args: list[str]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert "Invalid value for" in r.stderr
    assert r.stdout == ""
