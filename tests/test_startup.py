"""Start-up cost (issue 15): ``import multifd_core`` and ``multifd --help`` load none of the heavy
dependencies (each command imports what it needs when it runs), and the lazily loaded names of
the package (PEP 562) are the objects of their modules. Each check runs a fresh interpreter:
this one has long imported everything. No timing here: what is loaded, not how long it took."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import MULTIFD, TIMEOUT

import multifd_core

ROOT = Path(__file__).resolve().parent.parent
#: What neither the import nor ``--help`` may load: top-level module names.
HEAVY = frozenset({"numpy", "trio", "ssl", "_ssl", "rich", "xxhash", "pluggy"})
#: The plugins of this repository (entry points of the ``multifd`` group).
PLUGINS = frozenset({"multifd_zlib", "multifd_zstd", "multifd_lz4", "multifd_bz2"})


def fresh(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter, from a directory with no package in it."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT / "docs",
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def loaded_after(code: str) -> set[str]:
    """The top-level names of every module loaded in a fresh interpreter after ``code``."""
    out = fresh(f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))").stdout
    return {name.split(".")[0] for name in json.loads(out.splitlines()[-1])}


def loaded_by_command(tmp_path: Path, *argv: str) -> set[str]:
    """The top-level names of every module loaded when the ``multifd ARGV`` command (its
    installed script, else ``python -m multifd_core.cli``) exits, in a fresh interpreter: its
    ``sys.modules`` at exit, written to a file by an ``atexit`` hook."""
    out = tmp_path / "modules.json"
    if MULTIFD[0] == sys.executable:
        start = "runpy.run_module('multifd_core.cli', run_name='__main__', alter_sys=True)"
    else:
        start = f"sys.argv[0] = {MULTIFD[0]!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    code = f"""
import atexit, json, runpy, sys
atexit.register(lambda: open({str(out)!r}, "w").write(json.dumps(sorted(sys.modules))))
sys.argv[1:] = {list(argv)!r}
{start}
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: multifd") or argv[0] != "--help", proc.stdout
    return {name.split(".")[0] for name in json.loads(out.read_text())}


def test_the_check_sees_a_heavy_import() -> None:
    """The checks below could fail: a fresh interpreter that uses a name does load trio."""
    assert "trio" in loaded_after("import multifd_core\nmultifd_core.open_source")


def test_importing_the_package_loads_nothing_heavy() -> None:
    loaded = loaded_after("import multifd_core")
    assert not loaded & (HEAVY | PLUGINS), sorted(loaded & (HEAVY | PLUGINS))


def test_the_cli_package_loads_nothing_heavy() -> None:
    loaded = loaded_after("import multifd_core.cli")
    assert not loaded & (HEAVY | PLUGINS), sorted(loaded & (HEAVY | PLUGINS))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["demo", "--help"]])
def test_help_loads_nothing_heavy(tmp_path: Path, argv: list[str]) -> None:
    loaded = loaded_by_command(tmp_path, *argv)
    assert "argparse" in loaded
    assert not loaded & (HEAVY | PLUGINS), sorted(loaded & (HEAVY | PLUGINS))


def test_the_plugins_command_loads_pluggy_and_the_plugins(tmp_path: Path) -> None:
    """The same check on a command that needs them: they are loaded when it runs."""
    loaded = loaded_by_command(tmp_path, "plugins")
    assert {"pluggy", "multifd_zstd", "multifd_zlib"} <= loaded
    assert not loaded & {"trio", "numpy", "ssl"}, sorted(loaded & {"trio", "numpy", "ssl"})


def test_each_lazy_name_is_its_modules_object() -> None:
    """In a fresh interpreter, each name of ``__all__``, looked up on the package first (so
    through ``__getattr__``), is the very object its module holds."""
    code = """
import importlib, json, multifd_core as m
found = {name: getattr(m, name) for name in m.__all__}  # before any module is imported
module = {name: importlib.import_module("multifd_core." + m._MODULE_OF[name]) for name in found}
wrong = [name for name, value in found.items() if value is not getattr(module[name], name)]
print(json.dumps([len(found), wrong]))
"""
    count, wrong = json.loads(fresh(code).stdout)
    assert count == len(multifd_core.__all__) > 60
    assert wrong == []


def test_from_import_of_every_name_in_a_fresh_interpreter() -> None:
    code = "from multifd_core import *\nimport multifd_core\n" + "\n".join(
        f"assert {name} is multifd_core.{name}" for name in multifd_core.__all__
    )
    fresh(code)


def test_the_type_checkers_imports_name_every_lazy_name() -> None:
    """The ``if TYPE_CHECKING:`` imports (what mypy and IDEs see) are ``_EXPORTS`` (what runs)."""
    tree = ast.parse((ROOT / "multifd_core" / "__init__.py").read_text())
    (block,) = [
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    ]
    seen: dict[str, tuple[str, ...]] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        seen[node.module] = tuple(a.name for a in node.names)
    assert seen == multifd_core._EXPORTS
    assert sorted(multifd_core.__all__) == sorted(n for ns in seen.values() for n in ns)


def test_unknown_names_and_submodules() -> None:
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = multifd_core.no_such_name  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        from multifd_core import no_such_name  # type: ignore[attr-defined]  # noqa: F401
    assert set(multifd_core.__all__) <= set(dir(multifd_core))
    # a submodule is an attribute once asked for, as when the package imported them all
    fresh("import multifd_core\nassert multifd_core.wire.MULTIFD_MAGIC == 0x11223344")
    assert importlib.import_module("multifd_core.errors").ConfigError is multifd_core.ConfigError
