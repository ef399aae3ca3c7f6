"""One registry per pipeline stage (planner, generator, segmenter, scorer).

A backend is chosen by name in config. Built-in backends are listed as ``module:attr`` strings and imported only
when asked for, so ``import acp_data`` never pulls in diffusers, transformers or open_clip. External backends are
given by import path ``package.module:Name`` or registered with ``@GENERATORS.register("name")``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def import_object(path: str) -> Any:
    """Import ``package.module:Name`` (or ``package.module.Name``)."""
    if ":" in path:
        mod, attr = path.split(":", 1)
    else:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise RegistryError(f"import path {path!r} must look like 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise RegistryError(f"cannot import module {mod!r} for {path!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"module {mod!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


class Registry:
    """Name -> backend class (or factory). ``get`` accepts a registered name or an import path."""

    def __init__(self, stage: str, builtins: dict[str, str] | None = None) -> None:
        self.stage = stage
        self._lazy: dict[str, str] = dict(builtins or {})
        self._objs: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def deco(o: T) -> T:
            if name in self._objs and self._objs[name] is not o:
                raise RegistryError(f"{self.stage} backend {name!r} is already registered")
            self._objs[name] = o
            return o

        return deco if obj is None else deco(obj)

    def names(self) -> list[str]:
        return sorted(set(self._lazy) | set(self._objs))

    def __contains__(self, name: str) -> bool:
        return name in self._objs or name in self._lazy

    def get(self, name: str) -> Any:
        if name in self._objs:
            return self._objs[name]
        if name in self._lazy:
            obj = import_object(self._lazy[name])
            self._objs[name] = obj
            return obj
        if ":" in name:
            return import_object(name)
        raise RegistryError(
            f"unknown {self.stage} {name!r}; registered: {', '.join(self.names())} "
            "(or give an import path 'package.module:Name')"
        )

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        factory: Callable[..., Any] = self.get(name)
        return factory(*args, **kwargs)


PLANNERS = Registry("planner", {
    "prior": "acp_data.plan.prior:PriorPlanner",
    "hf": "acp_data.plan.hf:HFPlanner",
    "openai": "acp_data.plan.openai:OpenAIPlanner",
})
GENERATORS = Registry("generator", {
    "gligen": "acp_data.generate.gligen:GligenGenerator",
    "shapes": "acp_data.shapes.generator:ShapesGenerator",
})
SEGMENTERS = Registry("segmenter", {
    "sam": "acp_data.segment.sam:SamSegmenter",
    "shapes": "acp_data.shapes.segmenter:ShapesSegmenter",
})
SCORERS = Registry("scorer", {
    "clip": "acp_data.clis.image:ClipScorer",
    "vlm": "acp_data.clis.image:VLMScorer",
})
