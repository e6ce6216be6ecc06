"""Stand-ins for Transformer Engine, shown only to the modules of a bridge package that import it
although a conversion on a CPU never runs it.

Bridge packages are built for GPUs with Transformer Engine (TE) installed, and some import it
without a guard. Without TE, an adapter names those modules (`show_placeholders_to`), and from then
on their imports of `transformer_engine` get a placeholder module whose classes refuse to be built.
Nothing enters `sys.modules`, so megatron-core and every other module still see no Transformer
Engine. Where TE is installed (`HAVE_TE`), adapters install nothing.
"""

from __future__ import annotations

import builtins
import importlib.util
import threading
import types
from collections.abc import Callable
from typing import Any

__all__ = ["HAVE_TE", "show_placeholders_to"]

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

_TE_PACKAGES = frozenset({"transformer_engine", "transformer_engine_torch"})
_MEGATRON_TE = "megatron.core.extensions.transformer_engine"


class _TEPlaceholder(types.ModuleType):
    """Stands in for transformer_engine: any attribute is a class that raises when instantiated
    (import time only needs the names)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{type(self).__module__}.{name} is a placeholder: Transformer Engine is not installed")

        value = type(name, (), {"__init__": refuse, "__module__": self.__name__})
        setattr(self, name, value)
        return value


def _placeholders() -> dict[str, types.ModuleType]:
    te, pytorch, ops, torch_ext = (_TEPlaceholder(n) for n in ("transformer_engine", "transformer_engine.pytorch",
                                                               "transformer_engine.pytorch.ops",
                                                               "transformer_engine_torch"))
    te.pytorch, pytorch.ops = pytorch, ops
    return {m.__name__: m for m in (te, pytorch, ops, torch_ext)}


class _MegatronTEClasses(types.ModuleType):
    """megatron-core's Transformer Engine wrappers as a TE-less process has them, except that the
    `TE*` names which are no class there (None, or a mock in megatron-core 0.16) are classes that
    nothing is an instance of: a module that patches them or tests `isinstance` against them then
    works, and finds no TE module, which is the truth."""

    def __init__(self, real: types.ModuleType):
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._real, name)
        if name.startswith("TE") and not isinstance(value, type):
            value = type(name, (), {"__module__": self.__name__})
            setattr(self, name, value)
        return value


_LOCK = threading.Lock()
_IMPORTERS: list[tuple[Callable[[str], bool], bool]] = []  # (is_importer(module name), megatron_te_classes)
_PLACEHOLDERS: dict[str, types.ModuleType] = {}
_MEGATRON_VIEW: list[types.ModuleType] = []
_real_import = builtins.__import__


def _scoped_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and importer:
        for is_importer, megatron_te_classes in _IMPORTERS:
            if not is_importer(importer):
                continue
            if name.split(".")[0] in _TE_PACKAGES:
                # `import a.b` binds `a`; `from a.b import c` reads c from a.b.
                return _PLACEHOLDERS.get(name, _PLACEHOLDERS["transformer_engine"]) if fromlist \
                    else _PLACEHOLDERS[name.split(".")[0]]
            if megatron_te_classes and name == _MEGATRON_TE and fromlist:
                if not _MEGATRON_VIEW:
                    _MEGATRON_VIEW.append(_MegatronTEClasses(_real_import(name, globals, locals, fromlist, level)))
                return _MEGATRON_VIEW[0]
    return _real_import(name, globals, locals, fromlist, level)


def show_placeholders_to(is_importer: Callable[[str], bool], *, megatron_te_classes: bool = False) -> None:
    """From now on, modules whose name `is_importer` accepts import the placeholder for
    `transformer_engine` (and `transformer_engine_torch`); with `megatron_te_classes`, they also
    see megatron-core's missing TE wrapper classes as classes that nothing is an instance of.
    Does nothing where Transformer Engine is installed."""
    if HAVE_TE:
        return
    with _LOCK:
        if not _PLACEHOLDERS:
            _PLACEHOLDERS.update(_placeholders())
        if (is_importer, megatron_te_classes) not in _IMPORTERS:
            _IMPORTERS.append((is_importer, megatron_te_classes))
        if builtins.__import__ is not _scoped_import:
            builtins.__import__ = _scoped_import
