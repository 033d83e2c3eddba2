"""``multifd new-plugin``: what it refuses, what it writes, and that what it writes installs and
passes its own tests as generated (pip-installed into this venv, then uninstalled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest

from multifd_core import load_methods
from multifd_core.cli import main
from multifd_core.cli.newplugin import claimed
from multifd_core.hookspecs import CLAIMED_VALUES

ROOT = Path(__file__).resolve().parent.parent


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one error line of ``multifd new-plugin ARGV``, which must exit 1."""
    assert main(["new-plugin", *argv]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("multifd new-plugin: error: ConfigError: "), line
    return line.removeprefix("multifd new-plugin: error: ConfigError: ")


@pytest.mark.parametrize(
    "name", ["Isal", "is-al", "1sal", "_isal", "class", "isal!", "é", "a" * 31]
)
def test_a_name_that_is_not_a_lowercase_identifier_is_refused(capsys, tmp_path, name):
    msg = refused(capsys, name, "--value", "5", "--output", str(tmp_path / "out"))
    assert msg.startswith(f"NAME {name!r} is not a lowercase Python identifier")
    assert not (tmp_path / "out").exists()


def test_a_name_an_installed_method_uses_is_refused(capsys, tmp_path):
    out = str(tmp_path / "out")
    assert refused(capsys, "nocomp", "--value", "5", "--output", out) == (
        "NAME 'nocomp' is taken by the method of multifd-core (built-in)"
    )


@pytest.mark.parametrize("value", ["8", "-1"])
def test_a_value_outside_the_field_is_refused(capsys, tmp_path, value):
    msg = refused(capsys, "isal", "--value", value, "--output", str(tmp_path / "out"))
    assert msg == f"--value {value} is outside 0..7 (the 3-bit compression field)"


def test_a_value_an_installed_plugin_claims_is_refused_naming_it(site, capsys, tmp_path):
    site.method_dist("fake_five", "fivezip", 5)
    msg = refused(capsys, "isal", "--value", "5", "--output", str(tmp_path / "out"))
    assert msg.startswith("compression value 5 is claimed by 'fivezip' from fake_five 1.0")
    assert msg.endswith("(installed); free: 6, 7")
    assert not (tmp_path / "out").exists()


def test_the_table_claims_values_of_plugins_not_installed():
    bare = load_methods(entry_points=False)
    for value, (name, _) in CLAIMED_VALUES.items():
        assert claimed(value, bare) is not None and name in str(claimed(value, bare))
    assert claimed(1, bare) == (
        "'zlib' in the table of claimed values (multifd-zlib; QEMU's multifd-compression=zlib)"
    )
    assert claimed(5, bare) is None


def test_an_existing_non_empty_directory_is_refused(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    msg = refused(capsys, "isal", "--value", "5", "--output", str(tmp_path))
    assert msg == f"--output {tmp_path} exists and is not empty"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    msg = refused(capsys, "isal", "--value", "5", "--output", str(tmp_path / "notes.txt"))
    assert msg.endswith("notes.txt exists and is not a directory")


def test_it_writes_a_distribution_that_lints_clean(capsys, tmp_path):
    (tmp_path / "out").mkdir()  # an existing empty directory is fine
    assert main(["new-plugin", "isal", "--value", "6", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote the plugin multifd-isal (method 'isal', compression value 6,")
    assert out.rstrip().endswith(f"pip install {tmp_path / 'out'} && pytest {tmp_path / 'out'}")
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert files == [
        "README.md",
        "multifd_isal",
        "multifd_isal/__init__.py",
        "multifd_isal/py.typed",
        "pyproject.toml",
        "tests",
        "tests/test_isal.py",
    ]
    pyproject = (tmp_path / "out" / "pyproject.toml").read_text()
    assert '[project.entry-points.multifd]\nisal = "multifd_isal"' in pyproject
    assert 'dependencies = ["multifd-core>=0.1"]' in pyproject
    code = (tmp_path / "out" / "multifd_isal" / "__init__.py").read_text()
    assert "MULTIFD_HOOK_API = 1\n" in code and "value = 6  # flags = 6 << 1 = 0x0c" in code
    assert "$" not in code + pyproject, "a template variable was left unsubstituted"
    ruff = Path(sys.executable).with_name("ruff")
    for check in (["check", "--select", "E,F,W,I,B,UP,RUF"], ["format", "--check"]):
        proc = subprocess.run(
            [str(ruff), *check, "."], cwd=tmp_path / "out", capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = ["new-plugin", "other", "--value", "7", "--output", str(tmp_path / "j"), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["files"][0] == "README.md"


def site_packages() -> set[str]:
    return set(os.listdir(sysconfig.get_paths()["purelib"]))


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_generated_plugin_installs_and_passes_its_tests(tmp_path):
    """``pip install DIR && pytest DIR``, as an author would, into this venv (no network: its
    build backend is the venv's own setuptools); the venv is as it was afterwards."""
    name = f"tpl{uuid.uuid4().hex[:8]}"  # a distribution nothing else installs
    value = next(v for v in range(8) if claimed(v, load_methods()) is None)
    out = tmp_path / name
    assert main(["new-plugin", name, "--value", str(value), "--output", str(out)]) == 0
    before = site_packages()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    install = run(
        *pip, "install", "--no-deps", "--no-build-isolation", "-q", str(out), cwd=tmp_path
    )
    try:
        assert install.returncode == 0, install.stdout + install.stderr
        tests = run(
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(out), cwd=tmp_path
        )
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
        assert " passed" in tests.stdout.splitlines()[-1] and "failed" not in tests.stdout
        listed = run(sys.executable, "-m", "multifd_core.cli", "plugins", "--check", cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert f"{value}  flags {value << 1:#04x}  {name}" in listed.stdout
    finally:
        removed = run(*pip, "uninstall", "-y", "-q", f"multifd-{name}", cwd=tmp_path)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert site_packages() == before


def test_the_guide_lists_the_claimed_values():
    """docs/writing-a-plugin.md's table is hookspecs.CLAIMED_VALUES, and every value 0..7."""
    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    table = guide.split("<!-- claimed-values", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[3:]]
    assert [int(row[0]) for row in rows] == list(range(8))
    for value, flags, method, by in (map(str.strip, row) for row in rows):
        assert flags == f"`{int(value) << 1:#x}`"
        if int(value) in CLAIMED_VALUES:
            assert (method, by) == (
                f"`{CLAIMED_VALUES[int(value)][0]}`",
                CLAIMED_VALUES[int(value)][1],
            )
        else:
            assert (method, by) == ("", "free")
