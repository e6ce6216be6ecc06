"""The bridge protocol: what a converter under test provides, and how `--bridge NAME` finds it."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ernie_ref import ErnieMoeConfig
from ernie_ref.layout import Layout

__all__ = ["Bridge", "Layout", "BridgeError", "BridgeNotFound", "ENTRY_POINT_GROUP", "bridge_call", "resolve_bridge",
           "registered_bridges"]

ENTRY_POINT_GROUP = "ernie_conformance.bridges"


@runtime_checkable
class Bridge(Protocol):
    """A HuggingFace <-> Megatron-Core converter for Ernie4_5_MoeForCausalLM."""

    name: str

    def version(self) -> str:
        """Package version, plus git commit where known."""

    def unsupported(self, config: ErnieMoeConfig) -> str | None:
        """Why this config is declared unsupported, or None. A declared refusal is not a failure."""

    def load(self, hf_dir: Path, layout: Layout) -> list[torch.nn.Module]:
        """Build this rank's GPTModel chunk(s) from an HF checkpoint directory and load its weights.

        Called inside an initialised Megatron parallel state for `layout`. Must raise on a
        checkpoint that does not fit its config.
        """

    def export(self, chunks: list[torch.nn.Module], out_dir: Path) -> None:
        """Write an HF checkpoint directory (config.json + safetensors) from the model."""


class BridgeNotFound(LookupError):
    pass


def registered_bridges() -> dict[str, str]:
    """Registered bridge names -> their `module:attribute` targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_bridge(name: str) -> Bridge:
    """A registered name, or an import path `package.module:attribute` (a class or an instance)."""
    target = registered_bridges().get(name, name)
    if ":" not in target:
        raise BridgeNotFound(
            f"--bridge {name!r}: not a registered bridge ({', '.join(sorted(registered_bridges())) or 'none'}) "
            "and not an import path of the form package.module:attribute"
        )
    module_name, _, attribute = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise BridgeNotFound(f"--bridge {name!r}: cannot import {target!r}: {e}") from e
    missing = [m for m in ("name", "version", "unsupported", "load", "export") if not hasattr(obj, m)]
    if missing:
        raise BridgeNotFound(f"--bridge {name!r}: {target} lacks {', '.join(missing)} of the bridge protocol")
    if not isinstance(obj, type):
        return obj
    try:
        return obj()
    except Exception as e:  # noqa: BLE001 - whatever stops construction, say which bridge
        raise BridgeNotFound(f"--bridge {name!r}: {target}() failed: {type(e).__name__}: {e}") from e


def on_ranks(ranks: tuple[int, ...] | list[int]) -> str:
    """" on rank 1", " on ranks 0, 1", or "" for no ranks (this process): for messages."""
    return f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks else ""


class BridgeError(Exception):
    """An exception raised by the bridge under test itself: in `call` ("load", "export", the
    "forward" of its model, or "unsupported"), on `ranks` (empty: in this process).

    Only these count against a bridge; any other exception inside a property is an error of the
    suite. The bridge's traceback travels as text, since it may come from another process.
    """

    def __init__(self, call: str, exception: str, message: str, traceback_text: str, ranks: tuple[int, ...] = ()):
        super().__init__(call, exception, message, traceback_text, tuple(ranks))
        self.call, self.exception, self.message, self.traceback_text, self.ranks = (
            call, exception, message, traceback_text, tuple(ranks))

    def __str__(self) -> str:
        return f"{self.exception} in {self.call}{on_ranks(self.ranks)}: {self.message}"

    def with_ranks(self, ranks: tuple[int, ...]) -> BridgeError:
        return BridgeError(self.call, self.exception, self.message, self.traceback_text, ranks)


def bridge_call(call: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, a call into the bridge under test: whatever it raises becomes a
    `BridgeError` naming `call`, with the bridge's traceback kept. (Rank stacks that show this
    function's name were inside the bridge when they hung: see `conformance.distributed`.)"""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - everything the bridge raises is attributed to it
        raise BridgeError(call, type(e).__name__, str(e).strip(), portable_traceback(e)) from e


def portable_traceback(error: BaseException) -> str:
    """`error`'s traceback with each file named as Python imports it (`megatron/core/...`,
    `conformance/mutants/refusal.py`) rather than by this machine's paths: it goes into counterexamples
    and certificates that are read elsewhere."""
    import sys
    import traceback

    lines = traceback.format_exception(error)
    files = {f.filename for f in traceback.extract_tb(error.__traceback__)}
    # An editable install is no sys.path entry: name a loaded module's file by the module.
    by_module = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file in files:
            by_module[file] = module.__name__.replace(".", "/") + ("/__init__.py" if file.endswith("__init__.py") else ".py")
    roots = sorted({str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir()}, key=len, reverse=True)

    def portable(filename: str) -> str:
        if filename in by_module:
            return by_module[filename]
        resolved = str(Path(filename).resolve()) if filename.startswith("/") else filename
        for root in roots:
            if resolved.startswith(root + "/"):
                return resolved[len(root) + 1:]
        return Path(filename).name if filename.startswith("/") else filename

    return "".join(re.sub(r'File "([^"]+)"', lambda m: f'File "{portable(m.group(1))}"', line) for line in lines)
