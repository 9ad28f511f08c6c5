"""bnfold's command-line application (installed as the ``bnfold`` console script).

The commands parse options into the config records of ``cli/options.py`` and call the library's
public API (``bnfold.fold`` / ``verify`` / ``inspect``; a PyTorch model goes through
``cli/torch_fold.py`` to ``bnfold.torch.convert``) and its renderers (``bnfold.report``); they hold
no logic of their own. Both fold routes end in the same closing steps (:func:`_close_fold`).
``bnfold``'s public names load the pipeline on first use, so ``bnfold --help`` never imports
onnx, onnxruntime or torch.

Exit codes are decided in ONE place, :func:`exit_code_for` below:

    0  success (verify: the models are equivalent)
    1  verification failed (fold: report written, model not written; verify: a mismatch)
    2  usage error (unknown option, bad option value, missing argument)
    3  bad input or a model bnfold cannot process (any BnfoldError with exit_code 3, an
       unreadable/unwritable file), and any unexpected internal error
    4  a requested execution provider is not available (unless --allow-missing-providers)

A missing MODEL file is bad input (exit 3, ``bnfold: error: model file not found: ...``), not a
usage error: bnfold checks it itself instead of letting click's ``exists=True`` answer with 2.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import click

import bnfold
import bnfold.report
from bnfold import __version__
from bnfold.distributed import Group, RankFailed, group_from_environment, share_outcome
from bnfold.distributed.combine import gathers_done, join_missed_gather
from bnfold.errors import BadInputError, BnfoldError, VerificationFailed
from bnfold.outputs import Outputs
from bnfold.report.json_report import to_json, verify_to_json
from bnfold.verification.repro_location import default_location, replaceable
from bnfold.verification.tolerances import parse_tolerances

from . import torch_fold
from .files import (
    check_paths,
    check_step_summary,
    existing_ancestor,
    file_record,
    make_parents,
    not_a_folder,
    remove_empty,
    report_outputs,
    require_data,
    require_model_file,
)
from .gcpause import paused_gc
from .options import (
    OUTPUT_FILE,
    RUN_FLAGS,
    CompareOptions,
    DataConfig,
    FoldCheck,
    RandomInputs,
    ReportConfig,
    TorchOptions,
    compare_options,
    data_options,
    debug_option,
    dist_timeout_option,
    fold_check_options,
    input_shape_option,
    random_input_options,
    recalibrate_option,
    report_options,
    reword,
    target_se_option,
    torch_options,
)
from .outcome import FoldOutcome
from .private_cache import private_cache
from .progress import ProgressBar, calibration_progress, verification_progress
from .signals import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, terminate_as_interrupt
from .wording import flag_words, worded_report, worded_result

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_EPILOG = """\b
Exit codes:
  0  success / equivalent
  1  verification failed (fold writes the report, not the model)
  2  usage error
  3  bad input, a model bnfold cannot process, or an internal error
  4  a requested execution provider is not available
"""
# each command lists the exit codes it can give
_FOLD_EPILOG = """\b
Exit codes:
  0  the model was written (verified, unless --no-verify), or the plan printed (--dry-run)
  1  verification failed: the report is written, the model is not
  2  usage error
  3  bad input, a model bnfold cannot process, or an internal error
  4  a requested execution provider is not available
"""
_VERIFY_EPILOG = """\b
Exit codes:
  0  CANDIDATE computes REFERENCE's function (within the tolerances)
  1  CANDIDATE does not match REFERENCE, or cannot run, or no provider ran
  2  usage error
  3  bad input (an unreadable model or --data, a REFERENCE that cannot run) or an internal error
  4  a requested execution provider is not available
"""
_INSPECT_EPILOG = """\b
Exit codes:
  0  the BNs were listed
  2  usage error
  3  bad input, a model bnfold cannot read, or an internal error
"""


# --------------------------------------------------------------------------- library access
# Only public names. ``bnfold`` resolves fold/inspect/verify/VerifyConfig on first use (the one
# declared lazy import, in bnfold/__init__.py): the pipeline pulls in onnx and onnxruntime, which
# --help and usage errors must not. The accessors are the seams the CLI tests replace.


def _api() -> Any:
    return bnfold


def _summary() -> Any:
    return bnfold.report


# --------------------------------------------------------------------------- small helpers


def _value(x: Any) -> Any:
    """An enum's value, else the object itself (for JSON)."""
    return getattr(x, "value", x)


def inspection_to_dict(row: Any, drift: bool = False) -> dict[str, Any]:
    """One ``BnInspection`` as the JSON object ``bnfold inspect --json`` prints (with ``drift``,
    its drift record: ``inspect --data``)."""
    d = row.decision
    out = {
        "name": row.name,
        "mode": _value(row.mode),
        "producer": row.producer,
        "producer_op": row.producer_op,
        "channels": row.channels,
        "action": _value(d.action),
        "target": d.target,
        "direction": d.direction,
        "reason": _value(d.reason) if d.reason is not None else None,
        "detail": d.detail,
    }
    if drift:
        out["drift"] = bnfold.report.drift_to_dict(row.drift)
    return out


def _dry_run_rows(rows: list[Any], report: Any) -> list[Any]:
    """``inspect``'s rows (producer, mode) with the decisions of the dry run's report, which are
    the exact ones (a dry run with --data also checks the folded values, e.g. DTYPE_OVERFLOW)."""
    decided = {b.name: b for b in report.bns}
    out = []
    for row in rows:
        b = decided.get(row.name)
        if b is not None:
            decision = replace(row.decision, action=b.action, target=b.target, direction=b.direction,
                               reason=b.reason, detail=b.detail)
            row = replace(row, decision=decision)
        out.append(row)
    return out


def _nothing_ran(v: Any) -> str:
    notes = "; ".join(r.note for r in v.runs if r.note)
    return ("no requested execution provider could run (all skipped under --allow-missing-providers), so nothing "
            "was compared" + (f": {notes}" if notes else ""))


def _verification_message(report: Any, output: Path | None, report_path: Path | None) -> str:
    v = report.verification
    if v is None:
        return "the folded model failed verification"
    failed = [o.name for o in v.outputs if not o.passed]
    where = f" at output(s) {', '.join(failed)}" if failed else ""
    failures = bnfold.report.summary.candidate_failures(v)
    if not v.ran:
        msg = f"the folded model was not verified: {_nothing_ran(v)}"
    elif failures:
        msg = f"the folded model failed verification: {'; '.join(failures).replace('the candidate', 'it', 1)}"
    else:
        msg = (
            f"the folded model failed verification{where} on {v.samples} sample(s): "
            f"max abs diff {v.max_abs:.3g}, max rel diff {v.max_rel:.3g}"
        )
    if output is not None:
        msg += f"; {output} was not written"
    if report_path is not None:
        msg += f"; details in {report_path}"
    return msg


def _repro_dir(compare: CompareOptions, report_path: Path | None) -> Path | None:
    """Where a failing verification writes its repro bundle: ``--repro-dir``, else beside the JSON
    report (``<REPORT>.repro``), else ``./bnfold-repro``; None with ``--no-repro``.

    An explicit ``--repro-dir`` that is a non-empty folder other than an earlier bundle is refused
    here, before any work (exit 2): bnfold replaces only its own bundles and never deletes a
    user's files. A default place that is taken falls back to ``<name>-1``, ... when the bundle is
    written (``bnfold.verification.repro``).
    """
    if compare.no_repro:
        if compare.repro_dir is not None:
            raise click.UsageError("--repro-dir and --no-repro exclude each other.")
        return None
    if compare.repro_dir is None:
        return default_location(report_path)
    folder = existing_ancestor(compare.repro_dir)
    if folder is not None and not folder.is_dir():
        raise BadInputError(not_a_folder(compare.repro_dir, folder))
    if not replaceable(compare.repro_dir):
        raise click.BadParameter(
            f"{compare.repro_dir} exists and is not a bnfold repro bundle; bnfold replaces only an empty folder "
            "or exactly a bundle it wrote, holding nothing else: give a new folder, or --no-repro.",
            param_hint="'--repro-dir'")
    return compare.repro_dir


def _engine_config(compare: CompareOptions, report_path: Path | None = None) -> Any:
    """The library's VerifyConfig from the CLI options (tolerance strings parsed here, the repro
    folder decided here: the library writes a bundle only where it is told to)."""
    repro = _repro_dir(compare, report_path)

    tols = {}
    for name in ("atol", "rtol"):
        try:
            tols[name] = parse_tolerances(getattr(compare, name), None)
        except BnfoldError as exc:
            raise click.BadParameter(flag_words(str(exc)), param_hint=f"'--{name}'") from None
    return bnfold.VerifyConfig(
        providers=compare.providers, atol=tols["atol"], rtol=tols["rtol"], error_stat=compare.error_stat,
        quantile=compare.quantile, allow_missing_providers=compare.allow_missing_providers, tf32=compare.tf32,
        repro_dir=str(repro) if repro is not None else None, noise_floor=not compare.no_noise_floor)


def _stage_verification_reports(result: Any, report: ReportConfig, outputs: Outputs, *, write_json: bool,
                                models: dict[str, Any] | None = None, statistics: list[str] | None = None) -> str:
    """Stage JUnit XML, Markdown, HTML and, for ``verify``, the JSON report in ``outputs``; return
    the Markdown summary (for $GITHUB_STEP_SUMMARY, appended once the files are in place).
    ``statistics``: a fold's calibration lines, a section of the Markdown and HTML."""
    if write_json and report.path is not None:
        outputs.write_text(report.path, verify_to_json(result, **(models or {})))
    if report.junit_xml is not None:
        outputs.write_text(report.junit_xml, bnfold.report.junit_to_string(result))
    text: str = bnfold.report.markdown_summary(result, statistics=statistics)
    if report.summary_md is not None:
        outputs.write_text(report.summary_md, text)
    if report.html is not None:
        outputs.write_text(report.html, bnfold.report.render_html(result, statistics=statistics))
    return text


# --------------------------------------------------------------------------- commands


@click.group(context_settings=_CONTEXT, epilog=_EPILOG)
@click.version_option(__version__, "--version", prog_name="bnfold", message="%(prog)s %(version)s")
@debug_option
def cli() -> None:
    """Freeze training-mode BatchNorm with calibrated population statistics, fold BatchNorm
    into neighbouring Conv/ConvTranspose/Gemm/MatMul operators, and verify the folded ONNX
    model against the frozen one with onnxruntime.

    Run 'bnfold COMMAND --help' for a command's options.
    """


@cli.command("fold", context_settings=_CONTEXT, epilog=_FOLD_EPILOG,
             short_help="Freeze, fold and verify the BNs of an ONNX or PyTorch model.")
@click.argument("model", type=click.Path(path_type=Path), metavar="MODEL", required=False, default=None)
@click.option(
    "-o",
    "--output",
    type=OUTPUT_FILE,
    default=None,
    metavar="OUTPUT",
    help="Where to write the folded model (parent folders are created). Required unless --dry-run.",
)
@click.option(
    "--frozen-output",
    type=OUTPUT_FILE,
    default=None,
    metavar="FROZEN",
    help="Also write the frozen, unfolded model (the verification reference), e.g. for 'bnfold verify FROZEN OUTPUT'.",
)
@data_options
@click.option(
    "--estimator",
    type=click.Choice(bnfold.ESTIMATORS),
    default="unbiased",
    show_default=True,
    help=(
        "Population variance written into frozen BNs: 'unbiased' = Algorithm 2 of the BN paper, "
        "'pooled' = variance of all calibration values. Both are computed and compared."
    ),
)
@recalibrate_option
@target_se_option
@report_options
@fold_check_options
@input_shape_option
@compare_options
@click.option(
    "--dry-run",
    is_flag=True,
    default=False,
    help="Print the plan (what would be folded or kept, and why) and write no model.",
)
@torch_options
@dist_timeout_option
@debug_option
def fold_command(
    model: Path | None,
    output: Path | None,
    frozen_output: Path | None,
    data: DataConfig,
    estimator: str,
    recalibrate: str,
    target_se: float,
    report: ReportConfig,
    check: FoldCheck,
    compare: CompareOptions,
    dry_run: bool,
    torch_opts: TorchOptions,
    input_shapes: dict[str, tuple[int, ...]],
    dist_timeout: float | None,
) -> int:
    """Freeze, fold and verify the BatchNorm layers of MODEL (an .onnx file, or a PyTorch model).

    Training-mode BNs are frozen with statistics calibrated on --data, every BN that can be
    folded is folded, and the result is checked against the frozen, unfolded model before it is
    written to OUTPUT. A model that fails the check is not written (exit 1).

    \b
    PyTorch models (see README, "PyTorch models"): MODEL is an ExportedProgram (.pt2), a
    TorchScript archive, or (with --unsafe-pickle) a whole pickled module; or give
    --model-factory MODULE:CALLABLE [--weights STATE_DICT] and omit MODEL (or pass '-').
    OUTPUT's suffix picks the format: .onnx (export, then the ONNX fold and verification),
    .pt2 (torch.export), .pt/.ts/.torchscript (torch.jit.trace).

    \b
    Under torchrun (WORLD_SIZE > 1) the ranks calibrate together (README, "Distributed calibration"):
    batch j goes to rank j mod N; rank 0 alone writes and verifies.
    """
    with group_from_environment(dist_timeout) as group:
        if group is None:
            return _fold(model, output, frozen_output, data, estimator, recalibrate, target_se, report, check, compare,
                         dry_run, torch_opts, input_shapes, None)
        return _fold_on_rank(group, lambda: _fold(model, output, frozen_output, data, estimator, recalibrate,
                                                  target_se, report, check, compare, dry_run, torch_opts,
                                                  input_shapes, group))


def _quiet_code(exc: BaseException) -> int:
    """The exit code ``exc`` ends a run with (as ``exit_code_for``), without printing."""
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.UsageError):
        return EXIT_USAGE
    if isinstance(exc, BnfoldError):
        return int(exc.exit_code)
    if isinstance(exc, (click.Abort, KeyboardInterrupt)):
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT


def _fold_on_rank(group: Group, run: Any) -> int:
    """One rank of a distributed fold (or inspect): run it (ranks other than 0 print nothing but errors), then end
    with rank 0's exit code on every rank. A rank's own error is raised (and printed) as usual; a rank
    that succeeded where rank 0 failed exits silently with rank 0's code."""
    error: BaseException | None = None
    sink = contextlib.redirect_stdout(io.StringIO()) if group.rank != 0 else contextlib.nullcontext()
    _RANK_QUIET[0] = group.rank != 0
    since = gathers_done()
    _RANK_RUN[0] = (group, since)
    try:
        with sink:
            rv = run()
    except BaseException as exc:  # noqa: BLE001 - its code goes to the other ranks, then it is raised
        error = exc
        rv = EXIT_OK
    finally:
        _RANK_QUIET[0] = False
        _RANK_RUN[0] = None
    if isinstance(error, RankFailed) and error.broken:  # the group is gone: no outcome to share
        raise error
    # a rank that failed before the calibration gather (its data, its model) joins it now: the
    # others stop at once with its error rather than wait out the timeout in a collective it never calls
    error = join_missed_gather(group, since, error)
    if isinstance(error, RankFailed) and error.broken:
        raise error
    try:
        code, _ = share_outcome(group, _quiet_code(error) if error is not None else int(rv or 0), None)
    except RankFailed:
        if error is not None:  # this rank's own failure, not that another rank left meanwhile
            raise error from None
        raise
    if error is not None:
        raise error
    if code != EXIT_OK:
        raise click.exceptions.Exit(code)
    return int(rv or 0)


#: while a rank other than 0 runs: library warnings are not shown (rank 0 shows them)
_RANK_QUIET = [False]
#: while a rank of a distributed fold runs: its group and gathers_done() when the run began
_RANK_RUN: list[tuple[Group, int] | None] = [None]


def _join_before_writing() -> None:
    """On a rank that calibrated nothing (no BN selected, or a run that never reached the gather),
    join the other ranks' calibration gather *before* the outputs move into place: a rank that
    calibrated, or failed, makes this run an error, and then nothing may be written."""
    if _RANK_RUN[0] is None:
        return
    group, since = _RANK_RUN[0]
    error = join_missed_gather(group, since, None)
    if error is not None:
        raise error


def _fold(model: Path | None, output: Path | None, frozen_output: Path | None, data: DataConfig, estimator: str,
          recalibrate: str, target_se: float, report: ReportConfig, check: FoldCheck, compare: CompareOptions,
          dry_run: bool, torch_opts: TorchOptions, input_shapes: dict[str, tuple[int, ...]],
          group: Group | None) -> int:
    """``fold_command`` on one process, or on one rank of ``group`` (the same checks on every rank,
    then ranks other than 0 calibrate only: a dry run that writes nothing)."""
    quiet = group is not None and group.rank != 0
    if torch_opts.model_factory is not None or (model is not None and str(model) != "-"
                                                and torch_fold.is_torch_model(model)):
        if input_shapes:
            raise click.UsageError("--input-shape: for ONNX models only (a PyTorch model is verified on --data).")
        model = torch_fold.validate(model, output, frozen_output, data, report, dry_run, torch_opts)
        if recalibrate == "all" and not data.given:
            raise click.UsageError("--recalibrate all needs --data.")
        if check.enabled and not dry_run:  # the verification's summary is appended to it
            check_step_summary([(model, "the input MODEL"), (data.path, "the --data file")])
        if quiet:  # rank 0 alone writes: the others calibrate (the same collectives) and write nothing
            output, frozen_output, report, dry_run = _rank_only(output)
        config = _engine_config(compare, report.path)
        created = [] if dry_run or output is None else make_parents(output)
        try:
            with Outputs() as outputs:
                with calibration_progress(_bar_stream(quiet)) as progress, \
                        verification_progress(_bar_stream(quiet)) as vbar:
                    config = replace(config, progress=_after(progress, vbar))
                    outcome = torch_fold.run(model, output, frozen_output, data, estimator, check, config, dry_run,
                                             torch_opts, progress, warn=_warning, outputs=outputs,
                                             recalibrate=recalibrate, target_se=target_se)
                return _close_fold(outcome, output, report, outputs, None if dry_run else frozen_output)
        finally:
            if output is not None and not output.exists():
                remove_empty(created)

    if torch_opts.weights is not None:
        raise click.UsageError("--weights needs --model-factory (the state_dict is loaded into the factory's model).")
    if model is None or str(model) == "-":
        raise click.UsageError("Missing argument 'MODEL'.")
    if torch_opts.given():
        raise click.UsageError(f"{', '.join(torch_opts.given())}: for PyTorch models only; {model} is read as an "
                               "ONNX model.")
    if output is None and not dry_run:
        raise click.UsageError("Missing option '-o' / '--output' (required unless --dry-run).")
    if data.batch_size is not None and not data.given:
        raise click.UsageError("--batch-size needs --data.")
    if recalibrate == "all" and not data.given:
        raise click.UsageError("--recalibrate all needs --data.")
    require_model_file(model)
    if data.path is not None:
        require_data(data.path)
    check_paths([(model, "the input MODEL"), (data.path, "the --data file")],
                [(output, "'-o' / '--output'"), (frozen_output, "'--frozen-output'"), *report_outputs(report)])
    if check.enabled and not dry_run:  # the verification's summary is appended to it
        check_step_summary([(model, "the input MODEL"), (data.path, "the --data file")])
    if quiet:  # rank 0 alone writes: the others calibrate (the same collective) and write nothing
        output, frozen_output, report, dry_run = None, None, ReportConfig(), True

    api = _api()
    config = _engine_config(compare, report.path)
    created = [] if dry_run or output is None else make_parents(output)
    try:
        with Outputs() as outputs, calibration_progress(_bar_stream(quiet)) as progress, \
                verification_progress(_bar_stream(quiet)) as vbar:
            config = replace(config, progress=_after(progress, vbar))
            result = api.fold(
                model,
                output=output,
                data=data.source(),
                batch_size=data.batch_size,
                estimator=estimator,
                recalibrate=recalibrate,
                target_se=target_se,
                verify=check.enabled,
                dry_run=dry_run,
                verify_samples=check.samples,
                progress=progress,
                verify_config=config,
                frozen_output=None if dry_run else frozen_output,
                outputs=outputs,
                input_shapes=input_shapes,
            )
            return _close_fold(FoldOutcome(report=result.report, ok=result.ok,
                                           plan_rows=result.rows if dry_run else None), output, report, outputs,
                               None if dry_run else frozen_output)
    finally:
        if output is not None and not output.exists():
            remove_empty(created)


def _bar_stream(quiet: bool) -> TextIO | None:
    """Where a progress bar goes: nowhere on a rank other than 0 (not a terminal: no bar), else stderr."""
    return io.StringIO() if quiet else None


def _rank_only(output: Path | None) -> tuple[Path | None, None, ReportConfig, bool]:
    """A torch fold on a rank other than 0: nothing written. A dry run keeps OUTPUT (its suffix
    picks the route, so every rank calibrates the same way)."""
    return output, None, ReportConfig(), True


def _after(first: ProgressBar | None, second: ProgressBar | None) -> Any:
    """``second``'s callback that first ends ``first``'s line (fold: calibration, then verification)."""
    if second is None or first is None:
        return second

    def progress(done: int, total: int) -> None:
        first.close()
        second(done, total)

    return progress


def _close_fold(outcome: FoldOutcome, output: Path | None, report: ReportConfig, outputs: Outputs,
                frozen_output: Path | None = None) -> int:
    """The closing steps of ``fold`` (both routes): the reports staged with the models, all moved
    into place together; then the plan table (dry run), the route's lines, the summary; exit 1
    (VerificationFailed) when a check failed. The report's warnings and verification notes are
    shown and written in flag words."""
    rep = worded_report(outcome.report)
    if report.path is not None:
        outputs.write_text(report.path, to_json(rep))
    markdown = None
    if rep.verification is not None:
        markdown = _stage_verification_reports(rep.verification, report, outputs, write_json=False,
                                               statistics=bnfold.report.statistics_lines(rep))
    _join_before_writing()
    outputs.commit()
    if markdown is not None:
        bnfold.report.append_github_step_summary(markdown)
    summary = _summary()
    if outcome.plan_rows is not None:
        click.echo(summary.plan_table(_dry_run_rows(outcome.plan_rows, rep)))
        click.echo()
    for line in outcome.lines:
        click.echo(line)
    click.echo(summary.summary_text(rep))
    if frozen_output is not None and frozen_output.is_file():  # written also when verification failed
        click.echo(f"Wrote frozen model {frozen_output}")
    if report.path is not None:
        click.echo(f"Wrote report {report.path}")
    if not outcome.ok:
        if outcome.failure:
            where = f"; details in {report.path}" if report.path is not None else ""
            raise VerificationFailed(outcome.failure + where)
        raise VerificationFailed(_verification_message(rep, output, report.path))
    return EXIT_OK  # the summary's last lines name the written model ("Wrote OUTPUT")


@cli.command("verify", context_settings=_CONTEXT, epilog=_VERIFY_EPILOG,
             short_help="Check that CANDIDATE computes REFERENCE's function.")
@click.argument("reference", type=click.Path(path_type=Path), metavar="REFERENCE")
@click.argument("candidate", type=click.Path(path_type=Path), metavar="CANDIDATE")
@data_options
@random_input_options
@input_shape_option
@compare_options
@report_options
@debug_option
def verify_command(reference: Path, candidate: Path, data: DataConfig, inputs: RandomInputs,
                   compare: CompareOptions, report: ReportConfig, input_shapes: dict[str, tuple[int, ...]]) -> int:
    """Run REFERENCE and CANDIDATE (.onnx files) in onnxruntime with graph optimisations off on the
    same inputs (--data, or seeded random values) on each requested provider, and compare every
    output with |candidate - reference| <= atol + rtol*|reference|. Fold sites (tensors both models
    share after a BN) are compared too, to name the first layer where they part. Exit 0 when
    equivalent, 1 on a mismatch, 4 when a requested provider cannot run."""
    for path in (reference, candidate):
        require_model_file(path)
    if data.path is not None:
        require_data(data.path)
    check_paths([(reference, "REFERENCE"), (candidate, "CANDIDATE"), (data.path, "the --data file")],
                 report_outputs(report))
    check_step_summary([(reference, "REFERENCE"), (candidate, "CANDIDATE"), (data.path, "the --data file")])
    if input_shapes and data.given:
        raise click.UsageError("--input-shape applies to random inputs; with --data the data's shapes are fed.")
    config = _engine_config(compare, report.path)
    with verification_progress() as vbar:  # a bar on a terminal: 8192 samples take seconds
        result = _api().verify(
            reference, candidate, data=data.source(), batch_size=data.batch_size or 1, seed=inputs.seed,
            val_range=inputs.val_range, iterations=inputs.iterations, config=replace(config, progress=vbar),
            input_shapes=input_shapes)
    result = worded_result(result)
    with Outputs() as outputs:
        staged_reports = [p for p, _ in report_outputs(report) if p is not None]
        for what, path in (("REFERENCE", reference), ("CANDIDATE", candidate)) if staged_reports else ():
            # a report never replaces a model or its data (read the models' data-file names only when
            # a report is written: api.verify parsed them already)
            model_file, *data_files = _api().model_files(path)
            outputs.protect(what, model_file)
            outputs.protect(f"a data file of {what} {model_file}", *data_files, named=True)
        markdown = _stage_verification_reports(
            result, report, outputs, write_json=True,
            models={"reference": file_record(reference), "candidate": file_record(candidate)})
        outputs.commit()
    bnfold.report.append_github_step_summary(markdown)
    click.echo(_summary().verify_summary_text(result))
    for written in (report.path, report.junit_xml, report.summary_md, report.html):
        if written is not None:
            click.echo(f"Wrote {written}")
    if not result.ran:  # every provider skipped under --allow-missing-providers: no verdict, exit 1
        raise VerificationFailed(_nothing_ran(result))
    failures = bnfold.report.summary.candidate_failures(result)
    if failures:  # one line on stderr that says why, not "max abs diff 0"
        raise VerificationFailed("; ".join(failures))
    if not result.passed:
        raise VerificationFailed(
            f"CANDIDATE does not match REFERENCE: max abs diff {result.max_abs:.3g}, max rel diff "
            f"{result.max_rel:.3g}" + (f"; first divergent fold site {result.first_divergent_site}"
                                       if result.first_divergent_site else "")
            + (f"; {result.note}" if result.note else "")
            # an output of another dtype (int32 for int64) fails with every difference 0: say why
            + "".join(f"; {n}" for n in dict.fromkeys(r.note for r in result.ran if r.outputs and r.note)))
    return EXIT_OK


reword(verify_command, {
    "data_path": "The inputs both models are compared on: a .npz file keyed by input name, a .npy file "
                 "(single-input models), or a directory of such files (read in sorted name order); leading axis = "
                 "samples. Default: seeded random inputs (--seed, --val-range).",
    "batch_size": "Samples per compared batch (default 1).",
    "repro_dir": "Where a failing verification writes its repro bundle: the paths of REFERENCE and CANDIDATE, the "
                 "inputs as test_data_set_0/*.pb and repro.json with the 'bnfold verify' command. Default: "
                 "REPORT.repro beside --report REPORT.json, else ./bnfold-repro. An earlier bundle there is "
                 "replaced; another existing non-empty folder is an error. Nothing is written when CANDIDATE "
                 "matches.",
    "report_path": "Write the JSON report here (also when verification fails).",
})


@cli.command("inspect", context_settings=_CONTEXT, epilog=_INSPECT_EPILOG,
             short_help="List every BN with its mode and the fold decision.")
@click.argument("model", type=click.Path(path_type=Path), metavar="MODEL")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    help="Print a JSON list (name, mode, producer, producer_op, channels, action, target, direction, reason, detail; "
         "with --data also drift).",
)
@data_options
@dist_timeout_option
@debug_option
def inspect_command(model: Path, as_json: bool, data: DataConfig, dist_timeout: float | None) -> int:
    """List every BatchNorm of MODEL: its producer, its mode (training / inference), and what
    'bnfold fold' would do with it, with the reason code. With --data, also how far each BN's
    stored statistics are from the data's (drift; README, "Drift of stored statistics").
    Reads the model (and the data) only.

    \b
    Under torchrun (WORLD_SIZE > 1) the ranks calibrate --data together, as 'bnfold fold' does;
    rank 0 alone prints."""
    if data.batch_size is not None and not data.given:
        raise click.UsageError("--batch-size needs --data.")
    with group_from_environment(dist_timeout) as group:
        if group is None:
            return _inspect(model, as_json, data)
        return _fold_on_rank(group, lambda: _inspect(model, as_json, data))


def _inspect(model: Path, as_json: bool, data: DataConfig) -> int:
    require_model_file(model)
    if data.given:
        if data.path is not None:
            require_data(data.path)
            check_paths([(model, "the input MODEL"), (data.path, "the --data file")], [])
        with calibration_progress(_bar_stream(_RANK_QUIET[0])) as progress:
            rows = _api().inspect(model, data=data.source(), batch_size=data.batch_size, progress=progress)
    else:
        rows = _api().inspect(model)
    if as_json:
        click.echo(json.dumps([inspection_to_dict(r, drift=data.given) for r in rows], indent=2))
    else:
        click.echo(_summary().plan_table(rows))
        if data.given:
            click.echo()
            click.echo(_summary().drift_table(rows))
    return EXIT_OK

reword(inspect_command, {  # the group shared by fold and verify, in inspect's words
    "data_path": "Data to check the stored statistics against: a .npz file keyed by input name, a .npy file "
                 "(single-input models), or a directory of such files; leading axis = samples. Adds each BN's "
                 "drift (stored vs the data's Algorithm 2 statistics); nothing is written.",
    "batch_size": "Samples per batch of --data (default: all samples in one batch, or the model's fixed batch size).",
    "dist_timeout": "Under torchrun (WORLD_SIZE > 1): how long a rank waits for the others at a collective before "
                    "it fails (a rank that died or hangs). Must exceed the spread of the ranks' calibration times. "
                    "Default 300 (env BNFOLD_DIST_TIMEOUT).",
})


# --------------------------------------------------------------------------- exit codes


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _err(text: str) -> None:
    click.echo(text, err=True)


def _warning(message: str) -> None:
    """A library warning as a ``bnfold: warning: ...`` line, in flag words."""
    if _RANK_QUIET[0]:
        return
    _err(f"bnfold: warning: {_one_line(flag_words(message))}")


def exit_code_for(exc: BaseException) -> int:
    """THE mapping from an exception that ended a run to bnfold's exit code (and its message)."""
    debug = RUN_FLAGS.debug
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.UsageError):  # BadParameter, NoSuchOption, MissingParameter, ...
        exc.show()
        return EXIT_USAGE
    if isinstance(exc, click.ClickException):  # e.g. click.FileError: a file we cannot open
        _err(f"bnfold: error: {_one_line(exc.format_message())}")
        return EXIT_BAD_INPUT
    if isinstance(exc, Terminated):
        _err("bnfold: terminated")
        return EXIT_TERMINATED
    if isinstance(exc, (click.Abort, KeyboardInterrupt)):
        _err("bnfold: interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):  # e.g. `bnfold inspect m.onnx | head`: not an error
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, BnfoldError):
        _err(f"bnfold: error: {_one_line(flag_words(str(exc))) or type(exc).__name__}")
        return int(exc.exit_code)
    if isinstance(exc, OSError):  # a file the user named cannot be read or written
        what = exc.strerror or _one_line(str(exc))
        where = f": {exc.filename}" if exc.filename else ""
        _err(f"bnfold: error: {what}{where}")
        return EXIT_BAD_INPUT
    hint = "" if debug else " (rerun with --debug for the traceback)"
    _err(f"bnfold: internal error: {type(exc).__name__}: {_one_line(str(exc))}{hint}")
    return EXIT_BAD_INPUT


# --------------------------------------------------------------------------- entry point


class _EchoHandler(logging.Handler):
    """Library log records as ``bnfold: warning: ...`` lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _err(f"bnfold: {record.levelname.lower()}: {_one_line(flag_words(record.getMessage()))}")
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_logging() -> None:
    log = logging.getLogger("bnfold")
    log.setLevel(logging.WARNING)
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        log.addHandler(_EchoHandler())
    log.propagate = False


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    if RUN_FLAGS.debug:
        _err(warnings.formatwarning(message, category, filename, lineno, line).rstrip())
    else:
        _warning(str(message))


def main(argv: Sequence[str] | None = None) -> int:
    """Run bnfold with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    RUN_FLAGS.debug = False
    _setup_logging()
    with warnings.catch_warnings(), paused_gc(), terminate_as_interrupt(), private_cache():
        warnings.showwarning = _show_warning
        try:
            rv = cli.main(args=list(argv) if argv is not None else None, prog_name="bnfold", standalone_mode=False)
        except BaseException as exc:  # noqa: BLE001 - every ending is mapped to an exit code
            return exit_code_for(exc)
    return rv if isinstance(rv, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
