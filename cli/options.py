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
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from bnfold.data.factory import call_data_factory
from bnfold.distributed import resolve_group
from bnfold.errors import BadInputError
from bnfold.formulas.sufficiency import MIN_TARGET_SE
from bnfold.verification.shape_spec import normalize_input_shapes

F = TypeVar("F", bound=Callable[..., Any])

class OutputFile(click.Path):
    """A file bnfold writes: ``click.Path(dir_okay=False)``, and a path that ends with a separator
    (``-o newdir/``, which pathlib would quietly turn into a file named ``newdir``) is a usage error."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = os.fsdecode(value) if isinstance(value, (str, bytes)) else None
        if text is not None and text.endswith(("/", os.sep)):
            self.fail(f"{text!r} ends with a path separator, so it names a folder; bnfold writes one file: give a "
                      f"file path such as {text}model.onnx", param, ctx)
        return super().convert(value, param, ctx)


OUTPUT_FILE = OutputFile()

# --------------------------------------------------------------------------- config records


@dataclass(frozen=True)
class DataConfig:
    """Calibration data: where it is and how it is batched."""

    path: Path | None = None  # .npz / .npy / directory; None: no calibration data
    batch_size: int | None = None  # None: the library's default
    factory: str | None = None  # --data-factory MODULE:CALLABLE (excludes path)

    @property
    def given(self) -> bool:
        """Data was given, as a path (--data) or a factory (--data-factory)."""
        return self.path is not None or self.factory is not None

    def source(self) -> Any:
        """What the library's ``data`` argument gets: the path, or the iterable the factory returns
        (called now; on a rank of a distributed run, ``rank``/``world_size`` reach it when it accepts
        them, else each rank keeps batches j mod N of its stream: ``bnfold.data.factory``)."""
        if self.factory is not None:
            group = resolve_group("auto")
            return call_data_factory(self.factory, rank=group.rank if group else None,
                                     world_size=group.world_size if group else None)
        return self.path


@dataclass(frozen=True)
class FoldCheck:
    """Whether fold checks the folded model, and on how many samples."""

    enabled: bool = True
    samples: int = 4


@dataclass(frozen=True)
class CompareOptions:
    """How two models are compared (shared by ``fold`` and ``verify``); strings parsed later."""

    providers: tuple[str, ...] = ("cpu",)
    atol: str | None = None  # "X", "NAME:X", comma-separated
    rtol: str | None = None
    error_stat: str = "max"
    quantile: float = 0.99
    allow_missing_providers: bool = False
    tf32: bool = False
    repro_dir: Path | None = None  # None: the default place (see cli.main._repro_dir)
    no_repro: bool = False  # --no-repro: no bundle at all
    no_noise_floor: bool = False  # --no-noise-floor: the tolerance rule alone (strict)


@dataclass(frozen=True)
class RandomInputs:
    """Seeded random inputs for ``verify`` without --data."""

    seed: int = 0
    val_range: tuple[float, float] = (0.0, 1.0)
    iterations: int | None = None


@dataclass(frozen=True)
class ReportConfig:
    """Where to write the reports (None: not written)."""

    path: Path | None = None
    junit_xml: Path | None = None
    summary_md: Path | None = None
    html: Path | None = None


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


def _group(options: list[Callable[[F], F]], build: Callable[..., tuple[str, Any]], names: tuple[str, ...]
           ) -> Callable[[F], F]:
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
                "Input data: a .npz file keyed by input name, a .npy file (single-input models), or a "
                "directory of such files (read in sorted name order); leading axis = samples. fold: the "
                "calibration data (required for training-mode BatchNorm); verify: the inputs compared on."
            ),
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=None,
            metavar="M",
            help=(
                "Samples per batch. fold: the calibration mini-batch (needs --data; default: all samples "
                "in one batch, or the model's fixed batch size). verify: the batch size of the compared "
                "inputs (default 1)."
            ),
        ),
        click.option(
            "--data-factory",
            default=None,
            callback=lambda ctx, param, value: _factory(ctx, param, value),
            metavar="MODULE:CALLABLE",
            help=(
                "Input data from your own loader instead of --data: this callable (imported like "
                "--model-factory, the current folder on sys.path) returns an iterable of batches: dicts of "
                "input name -> numpy array or torch tensor (a generator, a list, a DataLoader), or bare arrays "
                "for a one-input model. --batch-size re-chunks the stream (default: its batches as given)."
            ),
        ),
    ],
    lambda data_path, batch_size, data_factory: ("data", _data_config(data_path, batch_size, data_factory)),
    ("data_path", "batch_size", "data_factory"),
)
data_options.__doc__ = "--data PATH, --batch-size M, --data-factory MODULE:CALLABLE  ->  data: DataConfig"


def _data_config(path: Path | None, batch_size: int | None, factory: str | None) -> DataConfig:
    if path is not None and factory is not None:
        raise click.UsageError("--data and --data-factory are mutually exclusive: give one of them.")
    return DataConfig(path=path, batch_size=batch_size, factory=factory)

def _target_se(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not (value > 0.0 and value != float("inf")):  # also refuses nan, which click's FloatRange lets through
        raise click.BadParameter(f"{value!r}: give a positive fraction, e.g. 0.01 for 1 %")
    if value < MIN_TARGET_SE:  # finer than float32 statistics hold; (worst/target)^2 would overflow
        raise click.BadParameter(f"{value!r}: give at least {MIN_TARGET_SE:g}, e.g. 0.01 for 1 %")
    return float(value)


target_se_option = click.option(
    "--target-se",
    type=float,
    default=0.01,
    show_default=True,
    callback=_target_se,
    metavar="FRACTION",
    help=(
        "The standard error the calibrated statistics should reach: SE of each channel's mean in units of its "
        "sigma and relative SE of its variance, from the batch-to-batch spread. The report gives each BN's "
        "figures and the samples that would reach the target; a warning names the BNs that miss it."
    ),
)


recalibrate_option = click.option(
    "--recalibrate",
    type=click.Choice(["training", "all"]),
    default="training",
    show_default=True,
    help=(
        "Which BNs --data re-estimates: 'training' = only those that normalise with batch statistics "
        "(ONNX training_mode=1 or the decomposed pattern; PyTorch train() or track_running_stats=False), "
        "inference BNs keep their stored statistics; 'all' = every BN (BN re-estimation), with each one's "
        "drift from its stored statistics in the report."
    ),
)

def _not_nan(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click's FloatRange lets NaN through (every comparison with it is false)."""
    if value is not None and math.isnan(value):
        raise click.BadParameter("nan is not a number; give a number in the documented range")
    return value


dist_timeout_option = click.option(
    "--dist-timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=_not_nan,
    default=None,
    envvar="BNFOLD_DIST_TIMEOUT",
    metavar="SECONDS",
    help=(
        "Under torchrun (WORLD_SIZE > 1): how long a rank waits for the others at a collective before it "
        "fails (a rank that died or hangs). Must exceed the spread of the ranks' calibration times and rank 0's "
        "verification. Default 300 (env BNFOLD_DIST_TIMEOUT)."
    ),
)


def _providers(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(p.strip().lower() for p in value.split(",") if p.strip())
    bad = [p for p in names if p not in ("cpu", "cuda")]
    if bad or not names:
        raise click.BadParameter(f"{','.join(bad) or value!r}: use cpu, cuda or cpu,cuda")
    return tuple(dict.fromkeys(names))


def _val_range(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give LO,HI, e.g. 0,1") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise click.BadParameter(f"{value!r}: LO and HI must be finite numbers, e.g. 0,1")
    if lo > hi:
        raise click.BadParameter(f"{value!r}: LO must not exceed HI")
    return (lo, hi)


_TOL_HELP = ("{what} tolerance of the rule |candidate - reference| <= atol + rtol*|reference|: X for every "
             "output, NAME:X for one output, comma-separated (e.g. 1e-4,logits:1e-3). Default: per output "
             "dtype (float32 1e-4, float16 1e-2, bfloat16 5e-2, float64 1e-9).")

compare_options = _group(
    [
        click.option("--providers", default="cpu", show_default=True, callback=_providers, metavar="LIST",
                     help="Execution providers to compare on: cpu, cuda or cpu,cuda. With two, the reference "
                          "is also compared across providers (the noise floor)."),
        click.option("--atol", default=None, metavar="SPEC", help=_TOL_HELP.format(what="Absolute")),
        click.option("--rtol", default=None, metavar="SPEC", help=_TOL_HELP.format(what="Relative")),
        click.option("--check-error-stat", "error_stat", type=click.Choice(("max", "mean", "median", "quantile")),
                     default="max", show_default=True,
                     help="Statistic the verdict applies the rule to: max = every element must pass; "
                          "mean/median/quantile = that statistic of |a-b| - rtol*|ref| must be <= atol."),
        click.option("--quantile", type=click.FloatRange(0.0, 1.0), default=0.99, callback=_not_nan,
                     show_default=True,
                     help="q for --check-error-stat quantile."),
        click.option("--allow-missing-providers", is_flag=True, default=False,
                     help="Record a requested provider that cannot run as skipped instead of failing with exit 4."),
        click.option("--tf32", is_flag=True, default=False,
                     help="Allow TF32 in CUDA convolutions (off by default: it moves fp32 results by 1e-4..1e-3)."),
        click.option("--repro-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
                     help="Where a failing verification writes its repro bundle: the models' paths (fold: the "
                          "models), the inputs as test_data_set_0/*.pb and repro.json with a 'bnfold verify' "
                          "command. Default: REPORT.repro beside --report REPORT.json, else ./bnfold-repro. An "
                          "earlier bundle there is replaced; another existing non-empty folder is an error. "
                          "Nothing is written when verification passes."),
        click.option("--no-repro", is_flag=True, default=False,
                     help="Write no repro bundle when verification fails."),
        click.option("--no-noise-floor", is_flag=True, default=False,
                     help="Strict check: the tolerance rule alone. By default an element also passes when "
                          "|candidate - reference| <= 4 x the reference's own float noise floor (estimated "
                          "per output channel; see README, 'Verification')."),
    ],
    lambda providers, atol, rtol, error_stat, quantile, allow_missing_providers, tf32, repro_dir, no_repro,
    no_noise_floor: (
        "compare",
        CompareOptions(providers, atol, rtol, error_stat, quantile, allow_missing_providers, tf32, repro_dir,
                       no_repro, no_noise_floor),
    ),
    ("providers", "atol", "rtol", "error_stat", "quantile", "allow_missing_providers", "tf32", "repro_dir",
     "no_repro", "no_noise_floor"),
)
compare_options.__doc__ = "--providers, --atol, --rtol, --check-error-stat, ...  ->  compare: CompareOptions"

fold_check_options = _group(
    [
        click.option("--no-verify", is_flag=True, default=False,
                     help="Skip verification with onnxruntime (the folded model is written unchecked)."),
        click.option("--verify-samples", type=click.IntRange(min=1), default=4, show_default=True, metavar="K",
                     help="Samples (batch size 1 each) on which folded and frozen models are compared."),
    ],
    lambda no_verify, verify_samples: ("check", FoldCheck(enabled=not no_verify, samples=verify_samples)),
    ("no_verify", "verify_samples"),
)
fold_check_options.__doc__ = "--no-verify, --verify-samples K  ->  check: FoldCheck"

def _input_shapes(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
                  ) -> dict[str, tuple[int, ...]]:
    try:
        return normalize_input_shapes(value)
    except BadInputError as exc:
        raise click.BadParameter(str(exc)) from None


def input_shape_option(f: F) -> F:
    """``--input-shape NAME:DIMS`` (repeatable)  ->  input_shapes: {name: shape}."""
    return click.option(
        "--input-shape", "input_shapes", multiple=True, callback=_input_shapes, metavar="NAME:DIMS",
        help="Shape to verify an input with dynamic dimensions at, batch included (Polygraphy's NAME:1x3x640x640); "
             "repeat for several inputs. Default: the model's hints (metadata input_shapes / imgsz), else the "
             "first probe size it runs at (224, 256, 320, ... or a size its layers fix); see README "
             "'Input shapes'.")(f)


random_input_options = _group(
    [
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random inputs (without --data)."),
        click.option("--val-range", default=None, callback=_val_range, metavar="LO,HI",
                     help="Range of the random inputs (without --data). Default: 0,1."),
        click.option("--iterations", type=click.IntRange(min=1), default=None, metavar="K",
                     help="Number of input batches: random batches (default 1), or the first K batches of --data "
                          "(default all)."),
    ],
    lambda seed, val_range, iterations: ("inputs", RandomInputs(seed, val_range or (0.0, 1.0), iterations)),
    ("seed", "val_range", "iterations"),
)
random_input_options.__doc__ = "--seed N, --val-range LO,HI, --iterations K  ->  inputs: RandomInputs"

report_options = _group(
    [
        click.option("--report", "report_path", type=OUTPUT_FILE, default=None,
                     metavar="REPORT.json",
                     help="Write the JSON report here (also when verification fails, and on --dry-run)."),
        click.option("--junit-xml", type=OUTPUT_FILE, default=None, metavar="OUT.xml",
                     help="Write the verification as JUnit XML (one test case per provider x output)."),
        click.option("--summary-md", type=OUTPUT_FILE, default=None, metavar="OUT.md",
                     help="Write a Markdown summary (also appended to $GITHUB_STEP_SUMMARY when that is set)."),
        click.option("--html", type=OUTPUT_FILE, default=None, metavar="OUT.html",
                     help="Write a self-contained HTML page with error plots per fold site and output."),
    ],
    lambda report_path, junit_xml, summary_md, html: ("report", ReportConfig(report_path, junit_xml, summary_md, html)),
    ("report_path", "junit_xml", "summary_md", "html"),
)
report_options.__doc__ = "--report, --junit-xml, --summary-md, --html  ->  report: ReportConfig"


# --------------------------------------------------------------------------- PyTorch models


@dataclass(frozen=True)
class TorchOptions:
    """How ``fold`` reads a PyTorch model and where it calibrates it."""

    model_factory: str | None = None  # "package.module:callable"
    weights: Path | None = None  # a state_dict for the factory's model
    unsafe_pickle: bool = False
    device: str | None = None  # cpu | cuda; None: cuda when torch sees one, else cpu
    allow_reused_bn: bool = False
    training_graph: bool = False  # calibrate on the training-time forward (aux heads), Dropout off

    def given(self) -> list[str]:
        """The flags given on the command line (for 'applies to PyTorch models only')."""
        flags = []
        if self.model_factory is not None:
            flags.append("--model-factory")
        if self.weights is not None:
            flags.append("--weights")
        if self.unsafe_pickle:
            flags.append("--unsafe-pickle")
        if self.device is not None:
            flags.append("--device")
        if self.allow_reused_bn:
            flags.append("--allow-reused-bn")
        if self.training_graph:
            flags.append("--training-graph")
        return flags


def _factory(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    module_name, sep, attr = value.partition(":")
    names = module_name.split(".") + attr.split(".")
    if not sep or not all(n.isidentifier() for n in names):
        raise click.BadParameter(f"{value!r}: give MODULE:CALLABLE, e.g. mypkg.models:build_model")
    return value


torch_options = _group(
    [
        click.option("--model-factory", default=None, callback=_factory, metavar="MODULE:CALLABLE",
                     help="PyTorch: build the model by calling this (imported with importlib, the current folder "
                          "on sys.path) instead of reading MODEL; MODEL is then omitted or '-'."),
        click.option("--weights", type=click.Path(path_type=Path), default=None, metavar="FILE",
                     help="PyTorch: a state_dict (torch.save(model.state_dict())) loaded into the --model-factory "
                          "model with torch.load(weights_only=True), strict."),
        click.option("--unsafe-pickle", is_flag=True, default=False,
                     help="PyTorch: allow MODEL to be a whole pickled module (torch.save(model)). UNSAFE: "
                          "unpickling runs arbitrary code from the file; use only on files you trust."),
        click.option("--device", type=click.Choice(("cpu", "cuda")), default=None,
                     help="PyTorch: where the model is calibrated and folded. Default: cuda when torch sees a GPU, "
                          "else cpu. cuda without a GPU is exit 4."),
        click.option("--allow-reused-bn", is_flag=True, default=False,
                     help="PyTorch: a BN module applied at several places per forward is calibrated on all its "
                          "calls pooled (refused otherwise)."),
        click.option("--training-graph", is_flag=True, default=False,
                     help="PyTorch: calibrate on the model's training-time forward (its `if self.training` branches, "
                          "e.g. GoogLeNet/Inception auxiliary heads) with Dropout, DropPath and StochasticDepth "
                          "off, so BNs that run only in training mode get population statistics too. Needs --data."),
    ],
    lambda model_factory, weights, unsafe_pickle, device, allow_reused_bn, training_graph: (
        "torch_opts", TorchOptions(model_factory, weights, unsafe_pickle, device, allow_reused_bn, training_graph)),
    ("model_factory", "weights", "unsafe_pickle", "device", "allow_reused_bn", "training_graph"),
)
torch_options.__doc__ = ("--model-factory, --weights, --unsafe-pickle, --device, --allow-reused-bn, --training-graph"
                         "  ->  torch_opts: TorchOptions")


# --------------------------------------------------------------------------- one command's words


def reword(command: click.Command, texts: dict[str, str]) -> click.Command:
    """Give the options of ``command`` named in ``texts`` (by destination, e.g. ``data_path``) this
    command's help text: a group shared by fold and verify describes its options in fold's words,
    and verify's help must describe only what verify does."""
    unknown = set(texts) - {p.name for p in command.params}
    assert not unknown, f"{command.name} has no option(s) {sorted(unknown)}"
    for param in command.params:
        if param.name in texts and isinstance(param, click.Option):
            param.help = texts[param.name]
    return command
