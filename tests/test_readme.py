"""The README's embedding example runs as written, and its commands are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def block_after(marker: str, lang: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", README, re.S)
    assert m, f"no {lang} block after <!-- {marker} --> in README.md"
    return m.group(1)


def test_embedding_example_runs() -> None:
    code = block_after("example", "python")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "completed" in proc.stdout
    assert re.search(r"received \d+ pages, \d+ zero", proc.stdout)


def test_progress_example_runs() -> None:
    code = block_after("progress-example", "python")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    *shown, last = proc.stdout.splitlines()
    assert last == f"completed: 2 rounds, {8192 + 256} pages, 100%", proc.stdout
    assert shown, proc.stdout
    for line in shown:  # each round's own plan, never past 100 %
        m = re.fullmatch(r"round (0|1|2): (\d+\.\d)% of (0|8192|256) pages", line)
        assert m and float(m.group(2)) <= 100.0, line


def test_ci_runs_the_readme_test_command() -> None:
    cmd = block_after("test-command", "bash").strip()
    assert cmd.endswith("pytest"), cmd
    out = subprocess.run(
        [
            "awk",
            "/<!-- test-command -->/{found=1; next} found && /^```/{if (inblock) exit; "
            "inblock=1; next} inblock{print}",
            "README.md",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.strip()
    assert out == cmd
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_ci_checks_the_distributions_before_the_tests() -> None:
    """.ci/run builds and installs the wheels (.ci/dists.sh) before the README's test command."""
    run = (ROOT / ".ci" / "run").read_text()
    assert 0 < run.index("bash .ci/dists.sh") < run.index('bash -euo pipefail -c "$cmd"')
    dists = (ROOT / ".ci" / "dists.sh").read_text()
    for step in ("-m build", "--no-index", "plugins --check", "demo --size 16M", "new-plugin"):
        assert step in dists, step
