"""Run bnfold on the three shipped sample models and compare the results of two trees.

    python benchmarks/compare_sample_folds.py run DIR      # fold, inspect, dry-run into DIR
    python benchmarks/compare_sample_folds.py compare A B  # byte-identical models, equal reports

`run` calls the installed `bnfold` command (so it measures whatever tree is installed) and writes
every model, report (JSON, JUnit XML, Markdown, HTML), the terminal output and `inspect --json`
into DIR. `compare` requires the ONNX files to be byte-identical and every other file to be equal
once time stamps, durations, absolute paths and the environment block are masked. It exits 1 and
lists the differing files otherwise. Used to show that a restructure changed no behaviour.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"

JOBS = {
    "resnet": ["resnet_train.onnx", "--data", "resnet_calib.npz", "--batch-size", "16"],
    "unfoldable": ["unfoldable.onnx"],
    "trs": ["resnet_trs.onnx", "--data", "trs_calib.npz", "--batch-size", "8"],
}

# Keys whose values legitimately change between runs or machines.
_VOLATILE_KEYS = {"created", "timestamp", "time", "seconds", "duration_s", "elapsed_s", "environment",
                  "wall_s", "path", "output", "model_path", "frozen_path", "repro_dir", "command"}
_VOLATILE_TEXT = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?"), "<time>"),
    (re.compile(r"time=\"[0-9.]+\""), 'time="<t>"'),
    (re.compile(r"timestamp=\"[^\"]*\""), 'timestamp="<t>"'),
    (re.compile(r"hostname=\"[^\"]*\""), 'hostname="<h>"'),
    (re.compile(r"\d+(\.\d+)? ?(s|ms)\b"), "<dur>"),
]


def _bnfold(args: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = subprocess.run(["bnfold", *args], cwd=cwd, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in JOBS.items():
        model, *rest = spec
        rest = [str(SAMPLES / r) if r.endswith(".npz") else r for r in rest]
        job = [
            "fold", str(SAMPLES / model), *rest,
            "-o", f"{name}_folded.onnx", "--frozen-output", f"{name}_frozen.onnx",
            "--report", f"{name}_report.json", "--junit-xml", f"{name}_junit.xml",
            "--summary-md", f"{name}_summary.md", "--html", f"{name}_report.html", "--no-repro",
        ]
        runs = {
            "fold": job,
            "dryrun": ["fold", str(SAMPLES / model), *rest, "--dry-run", "-o", f"{name}_dry.onnx"],
            "inspect": ["inspect", str(SAMPLES / model), "--json"],
            "inspect_text": ["inspect", str(SAMPLES / model)],
        }
        for what, args in runs.items():
            rc, stdout, stderr = _bnfold(args, out)
            (out / f"{name}_{what}.stdout").write_text(f"rc={rc}\n{stdout}")
            (out / f"{name}_{what}.stderr").write_text(stderr)
            print(f"{name} {what}: rc={rc}")


def _mask(value):
    if isinstance(value, dict):
        return {k: ("<masked>" if k in _VOLATILE_KEYS else _mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str):
        return _mask_text(value)
    return value


def _mask_text(text: str) -> str:
    for pattern, repl in _VOLATILE_TEXT:
        text = pattern.sub(repl, text)
    return text.replace(str(SAMPLES), "<samples>")


def _normalised(path: Path) -> str:
    if path.suffix == ".onnx":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    text = path.read_text()
    if path.suffix == ".json" or path.name.endswith("_inspect.stdout"):
        body = text.split("\n", 1)[1] if text.startswith("rc=") else text
        try:
            return json.dumps(_mask(json.loads(body)), sort_keys=True, indent=1)
        except json.JSONDecodeError:
            pass
    return _mask_text(text)


def compare(a: Path, b: Path) -> int:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    bad = []
    for name in names:
        pa, pb = a / name, b / name
        if not (pa.exists() and pb.exists()):
            bad.append(f"{name}: only in {'A' if pa.exists() else 'B'}")
        elif _normalised(pa) != _normalised(pb):
            bad.append(f"{name}: differs")
    print(f"{len(names)} files compared, {len(bad)} differ")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "run":
        run(Path(argv[1]).resolve())
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
