"""Review 25g: the README's Report section named schema "2.0" (and "2.1" in its outline) while
bnfold writes and the schema fixes "2.2", and its outline left out the fold report's `calibration`."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_schema_version_matches_schema() -> None:
    schema = json.loads((ROOT / "docs/report-schema.json").read_text())
    version = schema["properties"]["schema_version"]["const"]
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r'schema version `"(\d+\.\d+)"`', readme)) | set(
        re.findall(r'schema_version\s+"(\d+\.\d+)"', readme)) | set(re.findall(r"JSON, schema (\d+\.\d+)", readme))
    assert named == {version}


def test_readme_outline_lists_every_fold_field() -> None:
    schema = json.loads((ROOT / "docs/report-schema.json").read_text())
    required = list(schema["$defs"]["fold_report"]["properties"])
    readme = (ROOT / "README.md").read_text()
    outline = readme[readme.index("## Report"):readme.index("## Sample models")]
    missing = [f for f in required if not re.search(rf"^{f}\b|[ ,]{f}\b", outline, re.M)]
    assert not missing
