"""The library's wording -> the CLI's: ONE table, applied wherever the CLI shows a library message.

The library's messages name its Python parameters (``data``, ``batch_size=16``,
``providers=('cpu',)``, ``unsafe_pickle=True``); the CLI shows them with its flags (``--data``,
``--batch-size 16``, ``--providers cpu``, ``--unsafe-pickle``). :func:`flag_words` rewrites a
message; it is applied to the errors :func:`cli.main.exit_code_for` prints, to the warnings the
CLI prints, and (:func:`worded_report`, :func:`worded_result`) to the report warnings and
verification notes before the CLI renders or writes them.

Every entry is an exact phrase of a library message (with the words around the parameter), never a
bare word, so a model input called ``data`` or a path is never rewritten. A phrase matches only
where it is not preceded by a letter, digit, ``_`` or ``-``, so a flag-worded text is never
rewritten again (:func:`flag_words` is idempotent).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

__all__ = ["flag_words", "worded_report", "worded_result"]

#: exact library phrases -> the CLI's (the phrases of bnfold.api, bnfold.verification,
#: bnfold.onnx.runtime, bnfold.data.sources, bnfold.formulas.stats and bnfold.torch)
_PHRASES: tuple[tuple[str, str], ...] = (
    # bnfold.torch.convert, bnfold.torch.calibrate
    ("device='cuda' was requested", "--device cuda was requested"),
    ("use device='cpu'", "use --device cpu"),
    ("use an .onnx output", "use an .onnx OUTPUT"),
    ("data is needed for a PyTorch model", "--data is needed for a PyTorch model"),
    ("pass calibration data (the data argument)", "pass calibration data with --data"),
    ("its BNs calibrated on data and folded", "its BNs calibrated on --data and folded"),
    ("allow_reused_bn=True", "--allow-reused-bn"),
    # bnfold.api (fold with data keeping corrupt statistics)
    ("from the data with recalibrate='all'", "from the data with --recalibrate all"),
    ("training_graph=True", "--training-graph"),
    # bnfold.formulas.sufficiency
    ("or set the target with target_se=", "or set the target with --target-se"),
    # bnfold.torch.load
    ("pass unsafe_pickle=True only if you trust the file", "pass --unsafe-pickle only if you trust the file"),
    ("unsafe_pickle=True: unpickling", "--unsafe-pickle: unpickling"),
    ("and use load_factory('MODULE:CALLABLE', weights=FILE)", "and use --model-factory MODULE:CALLABLE --weights FILE"),
    ("build the model with load_factory('MODULE:CALLABLE', weights=FILE) and pass this file as FILE: ",
     "build the model with --model-factory MODULE:CALLABLE and pass this file as --weights "),
    # bnfold.verification.feeds
    ("random inputs need static shapes: pass the data argument instead",
     "random inputs need static shapes: pass --data instead"),
    (": pass the data argument instead", ": pass --data instead"),
    ("; pass the data argument to verify", "; pass --data to verify"),
    ("(or verify=False to write it unverified)", "(or --no-verify to write it unverified)"),
    # bnfold.verification.shapes
    ("(its full shape) or the data argument", "(its full shape) or --data"),
    # bnfold.onnx.runtime
    ("use providers=('cpu',) (or allow_missing_providers=True)", "use --providers cpu (or --allow-missing-providers)"),
    # bnfold.data.sources, bnfold.formulas.stats
    ("; use batch_size=N with N >= 1", "; use --batch-size N with N >= 1"),
    ("; use a batch_size of at least 2", "; use --batch-size of at least 2"),
    # bnfold.api (verify's note)
    ("(fold(..., frozen_output='FROZEN.onnx'))", "(bnfold fold --frozen-output FROZEN.onnx)"),
)

#: exact library phrases that carry a value (regular expressions, each with its own guard) -> the CLI's
_PATTERNS: tuple[tuple[str, str], ...] = (
    # bnfold.api
    (r"; use batch_size=(\d+) or export the model", r"; use --batch-size \1 or export the model"),
    # bnfold.verification.feeds
    (r"(?<![\w-])val_range=\(([^,()]*), ([^,()]*)\): LO must not exceed HI; give \(LO, HI\) with LO <= HI",
     r"--val-range \1,\2: LO must not exceed HI; give LO,HI with LO <= HI"),
    # bnfold.verification.tolerances
    (r"(?<![\w-])([ar]tol) names output\(s\) ", r"--\1 names output(s) "),
    # bnfold.verification.shapes
    (r"(?<![\w-])pass input_shapes=\{'([^']*)': '([^']*)'\}", r"pass --input-shape \1:\2"),
)


def _compile(pattern: str, phrase: str) -> re.Pattern[str]:
    """``pattern``, matching only where it is not preceded by a word character or ``-`` when
    ``phrase`` starts with a word character (``data ...`` never matches in ``--data ...``)."""
    return re.compile((r"(?<![\w-])" if re.match(r"\w", phrase) else "") + pattern)


_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    *((_compile(re.escape(library), library), cli.replace("\\", "\\\\")) for library, cli in _PHRASES),
    *((re.compile(library), cli) for library, cli in _PATTERNS),
)


def flag_words(text: str) -> str:
    """``text`` with the library's parameter names in the CLI's flag names."""
    for pattern, cli in _RULES:
        text = pattern.sub(cli, text)
    return text


def worded_result(result: Any) -> Any:
    """A ``VerifyResult`` (or None) with its note and its provider runs' notes in flag words."""
    if result is None:
        return None
    runs = tuple(replace(r, note=flag_words(r.note)) for r in result.runs)
    return replace(result, runs=runs, note=flag_words(result.note))


def worded_report(report: Any) -> Any:
    """A fold ``Report`` with its warnings and its verification in flag words (changed in place:
    the CLI renders and writes this report only)."""
    report.warnings = [flag_words(w) for w in report.warnings]
    report.verification = worded_result(report.verification)
    return report
