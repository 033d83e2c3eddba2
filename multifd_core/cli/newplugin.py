"""``multifd new-plugin NAME --value N --output DIR``: write a complete plugin distribution.

What it writes comes from the templates in ``multifd_core/templates/plugin`` (package data, read
with importlib.resources): a pyproject with the ``multifd`` entry point and the dependency on
this core, a package holding a working codec (the standard library's zlib, one stream per
packet) with its hook and its ``MULTIFD_HOOK_API``, ``py.typed``, a README, and tests running the
conformance kit, the installed-plugin checks and option tests. ``pip install DIR && pytest DIR``
passes as written. The NAME must be a lowercase identifier no installed method uses, the value
one that neither an installed plugin nor the table of claimed values holds, and DIR new or empty.
"""

from __future__ import annotations

import argparse
import keyword
import re
import string
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..hookspecs import CLAIMED_VALUES, MULTIFD_HOOK_API
from ..registry import MethodRegistry, load_methods

_NAME = re.compile(r"[a-z][a-z0-9_]*")


def check_name(name: str, registry: MethodRegistry) -> None:
    if not _NAME.fullmatch(name) or keyword.iskeyword(name) or len(name) > 30:
        raise ConfigError(
            f"NAME {name!r} is not a lowercase Python identifier of at most 30 characters "
            "(a-z, 0-9 and _, starting with a letter), e.g. isal"
        )
    for info in registry:
        if name == info.name or name in info.cls.aliases:
            raise ConfigError(f"NAME {name!r} is taken by the method of {info.distribution}")


def claimed(value: int, registry: MethodRegistry) -> str | None:
    """Who claims compression ``value``: an installed method, a conflict, or the table."""
    if value in registry.methods:
        info = registry.methods[value]
        return f"{info.name!r} from {info.distribution} (installed)"
    if value in registry.conflicts:
        return f"two installed plugins ({registry.conflicts[value]})"
    if value in CLAIMED_VALUES:
        name, by = CLAIMED_VALUES[value]
        return f"{name!r} in the table of claimed values ({by})"
    return None


def check_value(value: int, registry: MethodRegistry) -> None:
    if not 0 <= value <= 7:
        raise ConfigError(f"--value {value} is outside 0..7 (the 3-bit compression field)")
    who = claimed(value, registry)
    if who is not None:
        free = [v for v in range(8) if claimed(v, registry) is None]
        raise ConfigError(
            f"compression value {value} is claimed by {who}; free: "
            + (", ".join(map(str, free)) or "none")
        )


def check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        raise ConfigError(f"--output {output} exists and is not empty")


def _templates() -> Traversable:
    return resources.files("multifd_core") / "templates" / "plugin"


def _walk(node: Traversable, parts: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """Every template file under ``node``: (its path parts, its text)."""
    found = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            found.extend(_walk(child, (*parts, child.name)))
        else:
            found.append(((*parts, child.name), child.read_text(encoding="utf-8")))
    return found


def substitutions(name: str, value: int) -> dict[str, str]:
    package = f"multifd_{name}"
    return {
        "name": name,
        "value": str(value),
        "flags": f"{value << 1:#04x}",
        "package": package,
        "distribution": package.replace("_", "-"),
        "Class": "".join(part.capitalize() for part in name.split("_")),
        "hook_api": str(MULTIFD_HOOK_API),
        "core_requirement": f"multifd-core>={'.'.join(__version__.split('.')[:2])}",
    }


def _target(parts: tuple[str, ...], subs: dict[str, str]) -> Path:
    """Where a template file goes: ``package/`` is the package, ``test_plugin`` the test
    module of NAME, ``.tmpl`` comes off."""
    names = [subs["package"] if p == "package" else p for p in parts]
    names[-1] = names[-1].removesuffix(".tmpl").replace("test_plugin", f"test_{subs['name']}")
    return Path(*names)


def write_plugin(name: str, value: int, output: Path) -> list[Path]:
    """Write the plugin ``name`` on compression ``value`` into ``output``; return the files."""
    registry = load_methods()
    check_name(name, registry)
    check_value(value, registry)
    check_output(output)
    subs = substitutions(name, value)
    files = []
    for parts, text in _walk(_templates()):
        path = output / _target(parts, subs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(string.Template(text).substitute(subs), encoding="utf-8")
        files.append(path)
    return files


def cmd_new_plugin(args: argparse.Namespace) -> dict[str, Any]:
    output = Path(args.output)
    files = write_plugin(args.name, args.value, output)
    subs = substitutions(args.name, args.value)
    if not args.json:
        print(
            f"wrote the plugin {subs['distribution']} (method {args.name!r}, compression value "
            f"{args.value}, flags {subs['flags']}) in {output}:"
        )
        for path in files:
            print(f"  {path.relative_to(output)}")
        print(f"next: pip install {output} && pytest {output}")
    return {
        "name": args.name,
        "value": args.value,
        "distribution": subs["distribution"],
        "package": subs["package"],
        "directory": str(output),
        "files": [str(path.relative_to(output)) for path in files],
    }
