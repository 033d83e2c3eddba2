"""Plugin discovery as an author meets it: problems logged as warnings, a forgotten @hookimpl,
the hook API version, unknown-method errors naming only their own problems, ``multifd plugins
--check``, and the registry discovered once per process."""

from __future__ import annotations

import json
import logging
import types

import pytest
from fakesite import METHOD_SRC

from multifd_core import MULTIFD_HOOK_API, hookimpl, load_methods
from multifd_core.cli import main
from multifd_core.errors import PluginLoadError, UnknownMethodError
from multifd_core.hookspecs import OLDEST_HOOK_API
from multifd_core.registry import clear_method_cache

UNMARKED = """
from multifd_core import MultiFDMethod, SendContext, RecvContext


class Forgotten(MultiFDMethod):
    name = "forgotten"
    value = 6

    def send_setup(self, channel):
        return SendContext()

    def recv_setup(self, channel):
        return RecvContext()


def multifd_methods():  # no @hookimpl: pluggy sees no hook here
    return [Forgotten]
"""


def problems_of(registry, dist: str) -> list[str]:
    return [str(p) for p in registry.problems if f"{dist} 1.0" in str(p)]


def test_problems_are_logged_as_warnings(site, caplog):
    site.dist("fake_missing", {"missingz": "mfd_no_such_module_at_all"})
    with caplog.at_level(logging.INFO, logger="multifd_core.registry"):
        load_methods()
    (record,) = [r for r in caplog.records if "fake_missing" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.name == "multifd_core.registry"
    assert record.getMessage().startswith("multifd plugin problem: plugin 'missingz'")


def test_a_forgotten_hookimpl_is_a_problem_naming_the_entry_point(site):
    site.dist("fake_forgot", {"forgotz": site.module("forgot", UNMARKED)})
    site.dist("fake_empty", {"emptyz": site.module("empty", "VALUE = 1\n")})
    site.method_dist("fake_good", "fakezip", 5)
    registry = load_methods()
    (forgot,) = problems_of(registry, "fake_forgot")
    assert f"plugin 'forgotz' (fake_forgot 1.0, entry point forgotz = 'mfd_forgot_{site.tag}')" in (
        forgot
    )
    assert "registers no hook: its multifd_methods is not marked @hookimpl" in forgot
    (empty,) = problems_of(registry, "fake_empty")
    assert "'emptyz'" in empty and "has no @hookimpl multifd_methods function" in empty
    assert registry.get(5).name == "fakezip"
    # asked for by its entry point's name (usually the method's), the error gives the reason
    with pytest.raises(UnknownMethodError, match="not marked @hookimpl"):
        registry.get("forgotz")


def test_a_hook_on_a_program_object_without_marks_is_reported():
    module = types.ModuleType("unmarked_program_plugin")
    module.multifd_methods = lambda: []
    registry = load_methods(entry_points=False, plugins=[module])
    (err,) = registry.problems
    assert type(err) is PluginLoadError
    assert "'unmarked_program_plugin'" in str(err) and "not marked @hookimpl" in str(err)


@pytest.mark.parametrize(
    ("declared", "says"),
    [
        (MULTIFD_HOOK_API + 1, f"newer than this multifd-core's {MULTIFD_HOOK_API}: upgrade"),
        (OLDEST_HOOK_API - 1, f"no longer loads (it loads {OLDEST_HOOK_API}..{MULTIFD_HOOK_API})"),
        ("'1'", "declares MULTIFD_HOOK_API = '1', not an integer"),
        (True, "declares MULTIFD_HOOK_API = True, not an integer"),
    ],
)
def test_a_plugin_for_another_hook_api_is_refused(site, declared, says):
    source = f"MULTIFD_HOOK_API = {declared}\n" + METHOD_SRC.format(
        cls="Later", name="laterzip", value=6
    )
    site.dist("fake_later", {"laterz": site.module("later", source)})
    registry = load_methods()
    (err,) = problems_of(registry, "fake_later")
    assert says in err and err.startswith("plugin 'laterz' (fake_later 1.0")
    with pytest.raises(UnknownMethodError):
        registry.get("laterzip")


@pytest.mark.parametrize("declared", [MULTIFD_HOOK_API, None])
def test_a_plugin_for_this_hook_api_or_undeclared_loads(site, declared):
    head = "" if declared is None else f"MULTIFD_HOOK_API = {declared}\n"
    source = head + METHOD_SRC.format(cls="Now", name="nowzip", value=6)
    site.dist("fake_now", {"nowz": site.module("now", source)})
    registry = load_methods()
    assert not problems_of(registry, "fake_now")
    assert registry.get("nowzip").value == 6


def test_bundled_plugins_declare_this_hook_api():
    import multifd_bz2
    import multifd_lz4
    import multifd_zlib
    import multifd_zstd

    for plugin in (multifd_zlib, multifd_zstd, multifd_lz4, multifd_bz2):
        assert plugin.MULTIFD_HOOK_API == MULTIFD_HOOK_API, plugin.__name__


def test_unknown_method_lists_only_its_own_problems(site):
    site.dist("multifd-isal", {"isal": "mfd_isal_not_importable"})
    site.dist("fake_other", {"otherz": "mfd_other_not_importable"})
    site.method_dist("fake_nine", "ninezip", 9)
    registry = load_methods()
    others = len(registry.problems)
    with pytest.raises(UnknownMethodError) as by_entry_point:
        registry.get("isal")
    msg = str(by_entry_point.value)
    assert "plugin problems: PluginLoadError" not in msg  # str(problem), not its repr
    assert "plugin 'isal' (multifd-isal 1.0) failed to import" in msg
    assert "otherz" not in msg and "ninezip" not in msg
    assert f"; {others - 1} other plugin problem" in msg and "see `multifd plugins`" in msg
    with pytest.raises(UnknownMethodError) as by_name:
        registry.get("ninezip")  # refused for its value: the class's name says it
    assert "outside 0..7" in str(by_name.value) and "isal" not in str(by_name.value)
    with pytest.raises(UnknownMethodError) as by_value:
        registry.get(9)
    assert "ninezip" in str(by_value.value) and "isal" not in str(by_value.value)
    with pytest.raises(UnknownMethodError) as unrelated:
        registry.get("brotli")
    text = str(unrelated.value)
    assert "plugin problems:" not in text
    assert text.endswith(f"; {others} plugin problems not about it (see `multifd plugins`)")


def test_plugins_check_fails_on_any_problem_and_lists_them(site, capsys):
    site.dist("fake_forgot", {"forgotz": site.module("forgot", UNMARKED)})
    site.dist("fake_missing", {"missingz": "mfd_no_such_module_at_all"})
    assert main(["plugins"]) == 0  # listing alone still succeeds
    capsys.readouterr()
    assert main(["plugins", "--check"]) == 1
    out, err = capsys.readouterr()
    assert "zlib" in out
    lines = err.splitlines()
    assert any("problem: PluginLoadError: plugin 'forgotz'" in line for line in lines)
    assert any("problem: PluginLoadError: plugin 'missingz'" in line for line in lines)
    assert lines[-1].startswith("multifd plugins: error: PluginError: ")
    assert lines[-1].endswith("plugin problems (listed above)")
    assert not any("warning" in line for line in lines), "each problem is said once"
    assert main(["plugins", "--check", "--json"]) == 1
    out, err = capsys.readouterr()
    listed = json.loads(out)["problems"]
    assert any("forgotz" in p for p in listed) and any("missingz" in p for p in listed)
    assert err.strip().endswith("plugin problems (listed in the JSON)")


def test_plugins_check_passes_without_problems(capsys):
    assert main(["plugins", "--check", "--allow-method", "none"]) == 0
    assert capsys.readouterr().out.startswith("0  flags 0x00  none")


def test_the_registry_is_discovered_once_per_process(site):
    first = load_methods()
    assert load_methods() is first
    assert load_methods(allow=["none"]) is not first
    assert load_methods(allow=["none"]) is load_methods(allow=("none",))
    site.method_dist("fake_late", "latezip", 6)  # installed while the process runs
    assert load_methods() is first and "latezip" not in {m.name for m in first}
    again = load_methods(reload=True)
    assert again is not first and again.get("latezip").value == 6
    assert load_methods() is again
    clear_method_cache()
    assert load_methods() is not again


def test_registries_of_program_plugins_are_cached_by_identity():
    def plugin(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.multifd_methods = hookimpl(lambda: [])
        module.multifd_methods.__name__ = "multifd_methods"
        return module

    one, two = plugin("one_plugin"), plugin("two_plugin")
    registry = load_methods(entry_points=False, plugins=[one])
    assert load_methods(entry_points=False, plugins=[one]) is registry
    assert load_methods(entry_points=False, plugins=[two]) is not registry
    assert registry.problems == []
