"""Stage registries: names, decorator registration, lazy built-ins, import paths, clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from acp_data.registry import GENERATORS, PLANNERS, SCORERS, SEGMENTERS, Registry, RegistryError, import_object


class Dummy:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def test_register_get_build():
    reg = Registry("generator")

    @reg.register("dummy")
    class Local(Dummy):
        pass

    assert reg.get("dummy") is Local
    assert "dummy" in reg and "other" not in reg
    obj = reg.build("dummy", 1, steps=2)
    assert isinstance(obj, Local) and obj.args == (1,) and obj.kwargs == {"steps": 2}
    reg.register("dummy", Local)  # same object again: fine
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("dummy", Dummy)


def test_unknown_name_lists_registered():
    reg = Registry("segmenter", {"sam": "nowhere.module:Sam"})
    reg.register("box", Dummy)
    with pytest.raises(RegistryError) as e:
        reg.get("samm")
    msg = str(e.value)
    assert "unknown segmenter 'samm'" in msg and "box, sam" in msg and "package.module:Name" in msg
    assert not msg.startswith('"')  # shown plainly, not KeyError-quoted


def test_import_path_backend():
    reg = Registry("scorer")
    assert reg.get("test_registry:Dummy") is Dummy
    assert import_object("collections:OrderedDict") is __import__("collections").OrderedDict
    assert import_object("os.path.join") is __import__("os").path.join
    assert import_object("collections.abc:Mapping.get") is __import__("collections.abc").abc.Mapping.get


@pytest.mark.parametrize("path, match", [
    ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
    ("collections:NoSuchThing", "has no attribute 'NoSuchThing'"),
    ("justaname", "must look like"),
])
def test_import_path_errors(path, match):
    with pytest.raises(RegistryError, match=match):
        import_object(path)


def test_lazy_builtin_error_names_the_module():
    reg = Registry("planner", {"ghost": "acp_data.no_such_planner:Ghost"})
    assert reg.names() == ["ghost"]
    with pytest.raises(RegistryError, match="acp_data.no_such_planner"):
        reg.get("ghost")


def test_builtin_names():
    assert {"prior", "hf", "openai"} <= set(PLANNERS.names())
    assert {"gligen", "shapes"} <= set(GENERATORS.names())
    assert {"sam", "shapes"} <= set(SEGMENTERS.names())
    assert {"clip", "vlm"} <= set(SCORERS.names())


def test_listing_builtins_imports_no_backend():
    code = textwrap.dedent("""
        import sys
        from acp_data.registry import GENERATORS, PLANNERS, SCORERS, SEGMENTERS
        for r in (GENERATORS, PLANNERS, SCORERS, SEGMENTERS):
            r.names(); "gligen" in r
        heavy = [m for m in ("torch", "diffusers", "transformers", "open_clip") if m in sys.modules]
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
