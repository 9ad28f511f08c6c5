"""Sufficiency through the real CLI on a sample model: the JSON record, the summary line, the
warning, --target-se, and the null record with a reason for a single batch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import bnfold
from bnfold.formulas.sufficiency import approx_samples
from tests.cli_run import run_cli

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MODEL, DATA = SAMPLES / "resnet_train.onnx", SAMPLES / "resnet_calib.npz"
pytestmark = pytest.mark.skipif(not (MODEL.exists() and DATA.exists()), reason="sample models not built")


def _fold(tmp_path: Path, *extra: str) -> tuple[object, dict]:
    report = tmp_path / "r.json"
    res = run_cli("fold", MODEL, "--data", DATA, "-o", tmp_path / "out.onnx", "--report", report, *extra)
    assert res.returncode == 0, res.stderr
    return res, json.loads(report.read_text())


def test_json_summary_and_warning(tmp_path: Path) -> None:
    res, doc = _fold(tmp_path, "--batch-size", "8")
    api = bnfold.fold(MODEL, data=DATA, batch_size=8, dry_run=True)  # the same run through the API
    want = {b.name: b.stats.sufficiency for b in api.report.bns if b.stats is not None}
    with np.load(DATA) as npz:
        samples = int(npz["images"].shape[0])  # leading-axis items, not values per channel
    rows = {b["name"]: b["stats"]["sufficiency"] for b in doc["bns"] if b["stats"] is not None}
    assert rows.keys() == want.keys() and rows
    for name, row in rows.items():
        s = want[name]
        assert row["batches"] == 8 and row["target"] == 0.01 and row["reason"] == ""
        assert row["samples"] == s.samples == samples == 64
        assert row["mean_se_sigma_max"] == s.mean_se_sigma_max and row["var_rse_max"] == s.var_rse_max
        assert row["worst_channel"] == s.worst_channel and row["samples_for_target"] == s.samples_for_target
        worst = max(row["mean_se_sigma_max"], row["var_rse_max"])
        assert row["samples_for_target"] == math.ceil(row["samples"] * (worst / 0.01) ** 2)
        assert row["met"] is (worst <= 0.01)
    # 64 samples are far from 1 %: every BN misses it, and the one needing most is named
    neediest = max(rows, key=lambda n: rows[n]["samples_for_target"])
    need = approx_samples(rows[neediest]["samples_for_target"])
    # k = 8 batches of 8: the estimate is good to about sqrt(2 / 7) = 53 % (sufficiency.need_spread)
    k = rows[neediest]["batches"]
    assert k == 8
    line = f"Sufficiency: 0 of {len(rows)} BN within 1 % after 64 samples; {neediest} needs ~{need} (from 8 batches: +-53%)"
    assert line + "\n" in res.stdout
    warning = [w for w in doc["warnings"] if "standard-error target" in w]
    assert len(warning) == 1 and f"miss the 1 % standard-error target at {len(rows)} BN" in warning[0]
    assert f"'{neediest}'" in warning[0] and "--target-se" in warning[0] and "target_se=" not in warning[0]
    assert "standard-error target" in res.stdout + res.stderr


def test_loose_target_meets_and_warns_nothing(tmp_path: Path) -> None:
    res, doc = _fold(tmp_path, "--batch-size", "8", "--target-se", "0.5")
    rows = [b["stats"]["sufficiency"] for b in doc["bns"] if b["stats"] is not None]
    assert all(r["met"] is True and r["target"] == 0.5 and r["samples_for_target"] < 64 for r in rows)
    assert "Sufficiency: statistics within 50 % after 64 samples (worst: " in res.stdout
    assert not [w for w in doc["warnings"] if "standard-error target" in w]


def test_one_batch_has_null_figures_with_a_reason(tmp_path: Path) -> None:
    res, doc = _fold(tmp_path, "--batch-size", "64")
    rows = [b["stats"]["sufficiency"] for b in doc["bns"] if b["stats"] is not None]
    assert rows and all(r["batches"] == 1 and r["met"] is None for r in rows)
    assert all(r[k] is None for r in rows for k in ("mean_se_sigma_max", "var_rse_max", "worst_channel",
                                                    "samples_for_target"))
    assert all("at least 2 batch" in r["reason"] for r in rows)
    assert "Sufficiency: not estimated (1 calibration batch:" in res.stdout
    assert not [w for w in doc["warnings"] if "standard-error target" in w]


@pytest.mark.parametrize("bad", ["0", "-0.1", "nan", "inf"])
def test_bad_target_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    res = run_cli("fold", MODEL, "--data", DATA, "-o", tmp_path / "out.onnx", "--target-se", bad)
    assert res.returncode == 2 and "--target-se" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_markdown_and_html_of_a_fold_carry_the_calibration_lines(tmp_path: Path) -> None:
    """A CI job reads the Markdown (job summary) and the HTML: the statistics and sufficiency
    lines of the text summary are there too, word for word, under "Calibration"; a `verify` run,
    which calibrates nothing, has no such section."""
    import html as html_lib

    md, page = tmp_path / "s.md", tmp_path / "s.html"
    frozen = tmp_path / "frozen.onnx"
    res, doc = _fold(tmp_path, "--batch-size", "8", "--summary-md", str(md), "--html", str(page),
                     "--frozen-output", str(frozen))
    stdout = res.stdout.splitlines()
    stats = [ln for ln in stdout if ln.startswith(("Statistics:", "Sufficiency:"))]
    assert len(stats) == 2 and "Sufficiency: " in stats[1] and "after 64 samples" in stats[1]
    text = md.read_text()
    assert "### Calibration" in text
    section = text.split("### Calibration", 1)[1].split("\n\n", 2)[1].splitlines()
    assert [ln.rstrip() for ln in section] == [ln.replace("_", "\\_").replace("*", "\\*") for ln in stats]
    body = page.read_text()
    cal = body.split('<section id="calibration"><h2>Calibration</h2>', 1)[1].split("</section>", 1)[0]
    assert [html_lib.unescape(p) for p in cal.replace("\n", "").removeprefix("<p>").removesuffix("</p>")
            .split("</p><p>")] == stats
    verify_md = tmp_path / "v.md"
    v = run_cli("verify", frozen, tmp_path / "out.onnx", "--data", DATA, "--summary-md", str(verify_md))
    assert v.returncode == 0, v.stderr
    assert "Calibration" not in verify_md.read_text()
