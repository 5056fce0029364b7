"""The registry behind every extension point: names in order, lazy built-ins, refusals, live name views."""

import pytest

from nslens.errors import NsLensError
from nslens.registry import Registry


def test_register_get_and_the_error_listing_the_names():
    reg = Registry("widget")
    reg.register("a", int)
    reg.register("b", float)
    assert reg.get("a") is int and reg.names() == ("a", "b") and "b" in reg and list(reg) == ["a", "b"]
    with pytest.raises(NsLensError, match="^unknown widget 'c'; choose one of a, b$"):
        reg.get("c")
    with pytest.raises(NsLensError, match="widget 'a' is already registered; pass replace=True"):
        reg.register("a", str)
    reg.register("a", int)  # the same entry again changes nothing
    reg.register("a", str, replace=True)
    assert reg.get("a") is str and reg.names() == ("a", "b")
    for bad in ("", " a", None):
        with pytest.raises(NsLensError, match="non-empty name"):
            reg.register(bad, int)
    reg.unregister("b")
    assert reg.names() == ("a",)
    with pytest.raises(NsLensError, match="unknown widget 'b'"):
        reg.unregister("b")


def test_lazy_entries_and_live_views():
    reg = Registry("thing")
    reg.register("path", "pathlib:PurePosixPath")  # imported at the first lookup
    reg.register("num", int)
    view = reg.view(lambda cls: cls is not int)
    assert view == ("path",) and len(view) == 1 and "num" not in view and ", ".join(view) == "path"
    from pathlib import PurePosixPath

    assert reg.get("path") is PurePosixPath
    reg.register("more", str)
    assert view == ("path", "more") and view[-1] == "more" and view + ("x",) == ("path", "more", "x")
    assert reg.unknown("z", view).args[0] == "unknown thing 'z'; choose one of path, more"
