"""Review 25h: Ctrl-C in the first ~0.2 s of ``bnfold`` (its modules still importing) printed a
KeyboardInterrupt traceback and died by the signal; it must end as an interrupted run does."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

_CODE = """
import sys
class Stop:
    def find_spec(self, name, path=None, target=None):
        if name == "bnfold.cli.main":
            raise KeyboardInterrupt
        return None
from bnfold.cli.entry import main
sys.meta_path.insert(0, Stop())
sys.exit(main(["--help"]))
"""


def test_console_script_uses_the_light_entry() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["bnfold"] == "bnfold.cli.entry:main"


def test_interrupt_while_importing_is_one_line() -> None:
    done = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "bnfold: interrupted"
    assert "Traceback" not in done.stderr
