"""Reusable option groups for bnfold's commands.

Each group is a decorator (in the style of Polygraphy's argument groups): it adds a few click
options to a command and hands the command ONE small frozen config object in their place, so a
command's signature reads ``fold(model, output, data: DataConfig, verify: VerifyConfig, ...)``
and a new command (a future ``bnfold verify``) reuses a group by stacking its decorator.

Validation that click can do (ranges, choices) is done here by click and fails with exit 2.
Nothing in this module imports onnx, onnxruntime or torch.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

ESTIMATORS = ("unbiased", "pooled")


# --------------------------------------------------------------------------- config records


@dataclass(frozen=True)
class DataConfig:
    """Calibration data: where it is and how it is batched."""

    path: Path | None = None  # .npz / .npy / directory; None: no calibration data
    batch_size: int | None = None  # None: the library's default


@dataclass(frozen=True)
class VerifyConfig:
    """Whether and how the folded model is checked against the frozen model."""

    enabled: bool = True
    samples: int = 4
    atol: float | None = None  # None: the library's default for the output dtype
    rtol: float | None = None


@dataclass(frozen=True)
class ReportConfig:
    """Where to write the JSON report (None: no report file)."""

    path: Path | None = None


# --------------------------------------------------------------------------- --debug


@dataclass
class _RunFlags:
    """Set while click parses; read by ``cli.main.main`` when it maps an exception to an exit."""

    debug: bool = False


RUN_FLAGS = _RunFlags()


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        RUN_FLAGS.debug = True
        logging.getLogger("bnfold").setLevel(logging.DEBUG)


def debug_option(f: F) -> F:
    """``--debug``: show tracebacks. Accepted on the group and on every subcommand."""
    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_debug,
        help="Show the full traceback when an error occurs, and debug log messages.",
    )(f)


# --------------------------------------------------------------------------- groups


def _group(options: list[Callable[[F], F]], build: Callable[..., tuple[str, Any]], names: tuple[str, ...]):
    """Make a decorator that adds ``options`` and replaces their values by one config object.

    ``build(**values)`` returns ``(keyword, config)``; ``names`` are the option destinations
    it consumes.
    """

    def decorator(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            keyword, config = build(**values)
            kwargs[keyword] = config
            return f(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorator


data_options = _group(
    [
        click.option(
            "--data",
            "data_path",
            type=click.Path(path_type=Path),
            default=None,
            metavar="PATH",
            help=(
                "Calibration data: a .npz file keyed by input name, a .npy file (single-input "
                "models), or a directory of .npy files named after the inputs. Leading axis = "
                "samples. Required when the model has training-mode BatchNorm."
            ),
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=None,
            metavar="M",
            help=(
                "Samples per calibration batch (the mini-batch size m of the BN statistics). "
                "Needs --data. Default: the library's default."
            ),
        ),
    ],
    lambda data_path, batch_size: ("data", DataConfig(path=data_path, batch_size=batch_size)),
    ("data_path", "batch_size"),
)
data_options.__doc__ = "--data PATH, --batch-size M  ->  data: DataConfig"

verify_options = _group(
    [
        click.option(
            "--no-verify",
            is_flag=True,
            default=False,
            help="Skip verification with onnxruntime (the folded model is written unchecked).",
        ),
        click.option(
            "--verify-samples",
            type=click.IntRange(min=1),
            default=4,
            show_default=True,
            metavar="K",
            help="Number of input samples (batch size 1 each) on which folded and frozen models are compared.",
        ),
        click.option(
            "--atol",
            type=click.FloatRange(min=0.0),
            default=None,
            metavar="X",
            help="Absolute tolerance of the check |folded - frozen| <= atol + rtol*|frozen|. Default: per output dtype.",
        ),
        click.option(
            "--rtol",
            type=click.FloatRange(min=0.0),
            default=None,
            metavar="X",
            help="Relative tolerance of the same check. Default: per output dtype.",
        ),
    ],
    lambda no_verify, verify_samples, atol, rtol: (
        "verify",
        VerifyConfig(enabled=not no_verify, samples=verify_samples, atol=atol, rtol=rtol),
    ),
    ("no_verify", "verify_samples", "atol", "rtol"),
)
verify_options.__doc__ = "--no-verify, --verify-samples K, --atol X, --rtol X  ->  verify: VerifyConfig"

report_options = _group(
    [
        click.option(
            "--report",
            "report_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            metavar="REPORT.json",
            help="Write the JSON report here (also when verification fails, and on --dry-run).",
        ),
    ],
    lambda report_path: ("report", ReportConfig(path=report_path)),
    ("report_path",),
)
report_options.__doc__ = "--report REPORT.json  ->  report: ReportConfig"
