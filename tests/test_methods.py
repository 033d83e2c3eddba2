"""The compression method registry (pluggy + real entry points) and the built-in nocomp."""

from __future__ import annotations

import re
import types
from collections.abc import Sequence

import pytest
from fakesite import METHOD_SRC

from multifd_core import (
    MethodInfo,
    MultiFDMethod,
    RecvContext,
    SendContext,
    hookimpl,
    load_methods,
)
from multifd_core.errors import (
    ConfigError,
    DecompressionError,
    MultiFDError,
    PluginConflictError,
    PluginLoadError,
    UnknownMethodError,
)
from multifd_core.nocomp import Nocomp, NocompRecv, NocompSend


def mine(registry, text: str) -> list:
    """The problems that mention ``text`` (other installed plugins may have their own)."""
    return [p for p in registry.problems if text in str(p)]


# --- the built-in method --------------------------------------------------------------------


def conflicting(site, *dists: tuple[str, str, int], refused: tuple = ()):
    """Install fake method distributions ``(distribution, name, value)``; return the registry
    and its one conflict (there must be exactly one), which every key in ``refused`` raises."""
    for dist in dists:
        site.method_dist(*dist)
    registry = load_methods()
    conflicts = [p for p in registry.problems if isinstance(p, PluginConflictError)]
    assert len(conflicts) == 1, conflicts
    for key in refused:
        with pytest.raises(PluginConflictError) as info:
            registry.get(key)
        assert info.value is conflicts[0]
    return registry, conflicts[0]


def test_nocomp_is_built_in():
    registry = load_methods()
    info = registry.get(0)
    assert isinstance(info, MethodInfo)
    assert (info.value, info.name, info.cls) == (0, "none", Nocomp)
    assert registry.get("none") is info
    assert registry.get("nocomp") is info
    assert info.plugin == "nocomp"
    assert "built-in" in info.distribution
    assert [m.value for m in registry] == sorted(m.value for m in registry)
    assert isinstance(registry.create("nocomp"), Nocomp)


def test_nocomp_without_entry_points():
    registry = load_methods(entry_points=False)
    assert [m.name for m in registry] == ["none"]
    assert registry.problems == []
    registry.check()  # no problem, no raise


def test_unknown_method_lists_installed():
    registry = load_methods(entry_points=False)
    with pytest.raises(UnknownMethodError) as info:
        registry.get("nope")
    assert type(info.value) is UnknownMethodError
    msg = str(info.value)
    assert "'nope'" in msg and "installed: none" in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, MultiFDError)
    with pytest.raises(UnknownMethodError, match="7"):
        registry.get(7)
    with pytest.raises(UnknownMethodError):
        registry.create("zstd")


# --- real entry points ----------------------------------------------------------------------


def test_entry_point_plugin_found(site):
    site.method_dist("fake_good", "fakezip", 5)
    registry = load_methods()
    info = registry.get(5)
    assert info.name == "fakezip"
    assert info.distribution == "fake_good 1.0"
    assert info.plugin == "ep_fake_good"
    assert registry.get("fakezip") is info
    assert registry.get(0).name == "none"
    assert mine(registry, "fake_good") == []
    method = registry.create("fakezip")
    assert isinstance(method, MultiFDMethod) and method.flags == 0xA
    assert isinstance(method.send_setup(0), SendContext)
    with pytest.raises(UnknownMethodError, match="fakezip"):
        registry.get("nope")  # the listing names the plugin's method too


def test_entry_points_can_be_skipped(site):
    site.method_dist("fake_good", "fakezip", 5)
    registry = load_methods(entry_points=False)
    with pytest.raises(UnknownMethodError):
        registry.get(5)


def test_two_distributions_same_value(site):
    registry, conflict = conflicting(
        site,
        ("fake_alpha", "alpha", 5),
        ("fake_beta", "beta", 5),
        ("fake_gamma", "gamma", 6),
        refused=(5, "alpha", "beta"),
    )
    msg = str(conflict)
    assert "fake_alpha 1.0" in msg and "fake_beta 1.0" in msg and "value 5" in msg
    assert registry.get(6).name == "gamma"
    assert registry.get(0).name == "none"
    with pytest.raises(PluginConflictError):
        registry.check()


def test_three_distributions_same_value(site):
    registry, _ = conflicting(
        site,
        ("fake_a", "alpha", 5),
        ("fake_b", "beta", 5),
        ("fake_c", "gamma", 5),
        refused=(5, "alpha", "beta", "gamma"),
    )
    assert registry.get(0).name == "none"


def test_two_distributions_same_name(site):
    _, conflict = conflicting(
        site,
        ("fake_alpha", "samename", 5),
        ("fake_beta", "samename", 6),
        refused=(5, 6, "samename"),
    )
    msg = str(conflict)
    assert "fake_alpha 1.0" in msg and "fake_beta 1.0" in msg and "'samename'" in msg


def test_same_entry_point_name_in_two_distributions(site):
    # two plugins both publishing ``zstd = ...`` but claiming the same value: a conflict that
    # names both distributions, not a silent drop of one of them
    site.dist("fake_one", {"fakez": site.method_module("one", "fakez", 6)})
    site.dist("fake_two", {"fakez": site.method_module("two", "fakez", 6)})
    registry = load_methods()
    problems = mine(registry, "fake_one 1.0")
    assert problems and all("fake_two 1.0" in str(p) for p in problems)
    with pytest.raises(PluginConflictError):
        registry.get(6)


def test_plugin_import_error(site):
    broken = site.module("broken", 'raise ImportError("needs libfake.so.1")\n')
    site.dist("fake_broken", {"brokenz": broken})
    site.dist("fake_missing", {"missingz": "mfd_no_such_module_at_all"})
    site.method_dist("fake_good", "fakezip", 5)
    registry = load_methods()
    (err,) = mine(registry, "fake_broken")
    assert type(err) is PluginLoadError
    assert "fake_broken 1.0" in str(err) and "'brokenz'" in str(err)
    assert "ImportError: needs libfake.so.1" in str(err)
    (missing,) = mine(registry, "fake_missing")
    assert type(missing) is PluginLoadError and "ModuleNotFoundError" in str(missing)
    assert registry.get(5).name == "fakezip"
    assert registry.get(0).name == "none"
    with pytest.raises(PluginLoadError):
        registry.check()
    with pytest.raises(UnknownMethodError, match=r"plugin problems: .*fake_broken"):
        registry.get("brokenz")


def test_plugin_value_out_of_range(site):
    site.method_dist("fake_nine", "ninezip", 9)
    site.method_dist("fake_bool", "boolzip", True)
    site.method_dist("fake_good", "fakezip", 5)
    registry = load_methods()
    (err,) = mine(registry, "fake_nine")
    assert type(err) is PluginLoadError
    assert "outside 0..7" in str(err) and "9" in str(err)
    (err_bool,) = mine(registry, "fake_bool")
    assert type(err_bool) is PluginLoadError
    assert {m.name for m in registry} >= {"none", "fakezip"}
    assert "ninezip" not in {m.name for m in registry}
    assert "boolzip" not in {m.name for m in registry}
    with pytest.raises(PluginLoadError):
        registry.check()


def test_plugin_returning_non_method(site):
    mod = site.module(
        "notamethod",
        """
        from multifd_core import hookimpl

        class NotAMethod:
            name = "bogus"
            value = 7

        @hookimpl
        def multifd_methods():
            return [NotAMethod, "zlib"]
        """,
    )
    site.dist("fake_bogus", {"bogus": mod})
    registry = load_methods()
    errs = mine(registry, "fake_bogus")
    assert len(errs) == 2 and all(type(e) is PluginLoadError for e in errs)
    assert all("not a MultiFDMethod subclass" in str(e) for e in errs)
    with pytest.raises(UnknownMethodError):
        registry.get("bogus")


def test_plugin_without_name(site):
    site.method_dist("fake_noname", "", 7)
    registry = load_methods()
    (err,) = mine(registry, "fake_noname")
    assert type(err) is PluginLoadError and "no name" in str(err)


def test_plugin_hook_raising(site):
    mod = site.module(
        "raising",
        """
        from multifd_core import hookimpl

        @hookimpl
        def multifd_methods():
            raise RuntimeError("boom in hook")
        """,
    )
    site.dist("fake_raising", {"raising": mod})
    site.method_dist("fake_good", "fakezip", 5)
    registry = load_methods()
    (err,) = mine(registry, "fake_raising")
    assert type(err) is PluginLoadError and "boom in hook" in str(err)
    assert registry.get(5).name == "fakezip"


def test_plugin_unknown_hook_name(site):
    mod = site.module(
        "typo",
        METHOD_SRC.format(cls="Typo", name="typozip", value=6)
        + """

@hookimpl
def multifd_method():  # typo: no such hook
    return []
""",
    )
    site.dist("fake_typo", {"typo": mod})
    site.method_dist("fake_good", "fakezip", 5)
    registry = load_methods()
    (err,) = mine(registry, "fake_typo")
    assert type(err) is PluginLoadError
    assert "multifd_method" in str(err)
    # the whole invalid plugin is dropped, the others stay
    with pytest.raises(UnknownMethodError):
        registry.get(6)
    assert registry.get(5).name == "fakezip"
    assert registry.get(0).name == "none"


def test_plugin_bad_hook_signature(site):
    mod = site.module(
        "badsig",
        """
        from multifd_core import hookimpl

        @hookimpl
        def multifd_methods(channel_count):
            return []
        """,
    )
    site.dist("fake_badsig", {"badsig": mod})
    registry = load_methods()
    (err,) = mine(registry, "fake_badsig")
    assert type(err) is PluginLoadError and "channel_count" in str(err)


def test_plugin_overriding_nocomp_value(site):
    site.method_dist("fake_override", "mynone", 0)
    registry = load_methods()
    (err,) = mine(registry, "fake_override")
    assert type(err) is PluginConflictError
    assert "value 0" in str(err) and "built-in" in str(err)
    # registration order: the built-in came first
    assert str(err).index("'none'") < str(err).index("'mynone'")
    for key in (0, "none", "nocomp", "mynone"):
        with pytest.raises(PluginConflictError):
            registry.get(key)


def test_plugin_reusing_nocomp_name(site):
    site.method_dist("fake_rename", "none", 6)
    registry = load_methods()
    (err,) = mine(registry, "fake_rename")
    assert type(err) is PluginConflictError and "'none'" in str(err)
    with pytest.raises(PluginConflictError):
        registry.get("none")


def test_allow_filters(site):
    site.method_dist("fake_good", "fakezip", 5)
    only_none = load_methods(allow=["none"])
    assert [m.name for m in only_none] == ["none"]
    with pytest.raises(UnknownMethodError):
        only_none.get("fakezip")
    only_fake = load_methods(allow=["fakezip"])
    assert [m.name for m in only_fake] == ["fakezip"]
    with pytest.raises(UnknownMethodError):
        only_fake.get(0)
    # an alias names the method as well as its name does
    assert [m.name for m in load_methods(allow=["nocomp"])] == ["none"]
    assert list(load_methods(allow=[])) == []


def test_allow_skips_conflicts_of_filtered_methods(site):
    site.method_dist("fake_override", "mynone", 0)
    registry = load_methods(allow=["none"])
    assert registry.get(0).name == "none"
    assert not [p for p in registry.problems if isinstance(p, PluginConflictError)]


# --- plugins registered by the program --------------------------------------------------------


class Embedded(MultiFDMethod):
    name = "embedded"
    value = 7
    aliases = ("emb",)

    def send_setup(self, channel):
        return SendContext()

    def recv_setup(self, channel):
        return RecvContext()


def test_plugins_module_object():
    module = types.ModuleType("embedded_mfd_plugin")

    @hookimpl
    def multifd_methods():
        return [Embedded]

    module.multifd_methods = multifd_methods
    registry = load_methods(entry_points=False, plugins=[module])
    info = registry.get("emb")
    assert info is registry.get(7) is registry.get("embedded")
    assert info.cls is Embedded
    assert info.plugin == "embedded_mfd_plugin"
    assert "embedded_mfd_plugin" in info.distribution and "program" in info.distribution
    assert registry.get(0).name == "none"
    assert registry.problems == []


def test_plugins_plain_object():
    class Plugin:
        @hookimpl
        def multifd_methods(self):
            return [Embedded]

    registry = load_methods(entry_points=False, plugins=[Plugin()])
    assert registry.get(7).cls is Embedded
    assert registry.get(7).plugin == "plugin-0"


def test_plugins_registered_twice():
    module = types.ModuleType("embedded_twice")
    module.multifd_methods = hookimpl(lambda: [Embedded])
    module.multifd_methods.__name__ = "multifd_methods"
    registry = load_methods(entry_points=False, plugins=[module, module])
    (err,) = registry.problems
    assert type(err) is PluginLoadError and "embedded_twice" in str(err)
    assert registry.get(7).cls is Embedded


# --- the method base class ------------------------------------------------------------------


class RawMethod(MultiFDMethod):
    name = "raw"
    value = 6
    raw_payload = True

    def send_setup(self, channel):
        return SendContext()

    def recv_setup(self, channel):
        return RecvContext()


class SqueezeMethod(RawMethod):
    name = "squeeze"
    value = 3
    raw_payload = False


def test_method_rejects_options_by_default():
    with pytest.raises(ConfigError) as info:
        Nocomp(level="3")
    assert type(info.value) is ConfigError
    assert "'none'" in str(info.value) and "level" in str(info.value)
    assert Nocomp().options == {}
    registry = load_methods(entry_points=False)
    with pytest.raises(ConfigError, match="level"):
        registry.create("none", level="1")


def test_payload_size_raw_and_compressed():
    assert RawMethod().payload_size(8192) == (8192, 8192)
    assert Nocomp().payload_size(4096 * 128) == (4096 * 128, 4096 * 128)
    low, high = SqueezeMethod().payload_size(4096 * 128)
    assert low == 1
    # room for incompressible pages plus the compressor's framing
    assert high >= 4096 * 128 + 4096 * 128 // 100 + 64
    assert SqueezeMethod().payload_size(4096)[1] > 4096


def test_method_flags():
    assert Nocomp().flags == 0
    assert SqueezeMethod().flags == 0x6
    assert RawMethod().flags == 0xC


def test_base_contexts_are_abstract():
    with pytest.raises(NotImplementedError):
        SendContext().send_prepare([])
    with pytest.raises(NotImplementedError):
        RecvContext().recv_pages(memoryview(b""), [])
    with pytest.raises(TypeError):
        MultiFDMethod()  # abstract


# --- nocomp contexts ------------------------------------------------------------------------


def test_nocomp_send_prepare_returns_the_pages():
    method = Nocomp()
    ctx = method.send_setup(0)
    assert isinstance(ctx, NocompSend)
    pages = [memoryview(bytes([i]) * 4096) for i in range(3)]
    parts = ctx.send_prepare(pages)
    assert len(parts) == 3
    assert all(a is b for a, b in zip(parts, pages, strict=True))
    assert b"".join(parts) == b"\0" * 4096 + b"\1" * 4096 + b"\2" * 4096
    ctx.send_cleanup()
    assert method.raw_payload and not method.threaded


def test_nocomp_recv_pages_fills_exactly():
    ctx = Nocomp().recv_setup(1)
    assert isinstance(ctx, NocompRecv)
    memory = bytearray(b"\xee" * (4 * 4096))
    view = memoryview(memory)
    pages = [view[4096:8192], view[12288:16384]]
    payload = b"A" * 4096 + b"B" * 4096
    ctx.recv_pages(memoryview(payload), pages)
    assert memory == b"\xee" * 4096 + b"A" * 4096 + b"\xee" * 4096 + b"B" * 4096
    ctx.recv_cleanup()


@pytest.mark.parametrize("length", [0, 8191, 8193, 3 * 4096])
def test_nocomp_recv_pages_wrong_length(length):
    ctx = Nocomp().recv_setup(0)
    memory = bytearray(2 * 4096)
    pages = [memoryview(memory)[:4096], memoryview(memory)[4096:]]
    with pytest.raises(DecompressionError) as info:
        ctx.recv_pages(memoryview(b"\x55" * length), pages)
    assert type(info.value) is DecompressionError
    assert f"{length} bytes" in str(info.value) and "8192" in str(info.value)
    assert memory == bytes(2 * 4096)  # nothing written


def test_int_option_takes_its_option_out() -> None:
    from multifd_core import int_option

    opts: dict[str, object] = {"level": "3", "other": 1}
    assert int_option(opts, "m", "level", 1, 0, 9) == 3
    assert opts == {"other": 1}  # taken out: what is left is unknown to the method
    assert int_option(opts, "m", "level", 7, 0, 9) == 7  # absent: the default
    assert int_option({"level": 4.0}, "m", "level", 1, 0, 9) == 4  # an integral float
    for bad, message in (
        (True, "m option level=True is not an integer"),
        ("x", "m option level='x' is not an integer"),
        ("2.5", "m option level='2.5' is not an integer"),
        (2.5, "m option level=2.5 is not an integer"),  # was silently 2
        (10, "m option level=10 is outside 0..9"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            int_option({"level": bad}, "m", "level", 1, 0, 9)


def test_scatter_fills_each_page_in_order() -> None:
    from multifd_core import scatter

    buf = bytearray(5 * 8)
    pages = [memoryview(buf)[0:8], memoryview(buf)[16:32], memoryview(buf)[32:40]]
    scatter(bytes(range(32)), pages)
    assert bytes(buf) == bytes(range(8)) + bytes(8) + bytes(range(8, 32))
    one = bytearray(8)
    scatter(b"abcdefgh", [memoryview(one)])
    assert one == b"abcdefgh"


def test_stream_recv_refuses_everything_after_a_failure() -> None:
    from multifd_core.methods import StreamRecv

    class Flaky(StreamRecv):
        calls = 0

        def decode(self, payload: memoryview, pages: Sequence[memoryview]) -> None:
            self.calls += 1
            if bytes(payload) == b"bad":
                raise DecompressionError("corrupt block")
            pages[0][:] = payload

    rx = Flaky("flaky")
    page = memoryview(bytearray(2))
    rx.recv_pages(memoryview(b"ok"), [page])
    with pytest.raises(DecompressionError, match="corrupt block"):
        rx.recv_pages(memoryview(b"bad"), [page])
    with pytest.raises(DecompressionError, match="flaky stream unusable after an earlier error"):
        rx.recv_pages(memoryview(b"ok"), [page])
    assert rx.calls == 2
