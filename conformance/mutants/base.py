"""What every mutant is: `Mutant` (a reference bridge with one bug, and the class attributes that
say which part it breaks, which property must kill it and with what failure), the `@mutant`
decorator that registers a mutant in `MUTANTS`, and `mutant_spec`, a registered mutant's --bridge
value. The mutants themselves live in one module per part of a conversion (`PARTS`)."""

from __future__ import annotations

from ernie_ref.megatron import ReferenceBridge

from .catalogue import PARTS, bridge_spec

__all__ = ["MUTANTS", "Mutant", "mutant", "mutant_spec"]


class Mutant(ReferenceBridge):
    """A reference bridge with one bug; subclasses set the class attributes below."""

    part: str = ""
    killed_by: str = ""
    # Facts the killing failure must have: {"kind": ..., fact: value}. A string matches as a
    # substring (of a list fact: of one element); a tuple lists the values allowed.
    expect: dict = {}
    reveals_under: str | None = None  # a layout of several ranks, for bugs only a split shows
    reveals_in: str | None = None  # a checkpoint dtype ("bfloat16"), for bugs only that dtype shows
    reveals_in_published_structures: bool = False  # for bugs only a published structure's size shows

    @classmethod
    def mismatch(cls, failure: dict | None) -> str | None:
        """Why `failure` ({"kind", "facts"} of a recorded failure) is not the one this mutant's bug
        should cause, or None when it is."""
        if not failure:
            return "no failure was recorded"
        seen = {"kind": failure.get("kind"), **failure.get("facts", {})}
        for key, wanted in cls.expect.items():
            actual = seen.get(key)
            values = actual if isinstance(actual, list) else [actual]
            if isinstance(wanted, tuple):
                ok = any(v in wanted for v in values)
            else:
                ok = any(isinstance(v, str) and wanted in v for v in values)
            if not ok:
                return f"{key} is {actual!r}, expected {wanted!r} (failure: {seen})"
        return None

    @classmethod
    def bug(cls) -> str:
        return " ".join((cls.__doc__ or "").split())


# Mutant name -> class, in the order the part modules register them (the package imports them in
# the order of PARTS).
MUTANTS: dict[str, type[Mutant]] = {}


def mutant(cls: type[Mutant]) -> type[Mutant]:
    """Register `cls` in the catalogue under its `name`."""
    assert cls.part in PARTS and cls.killed_by and cls.expect.get("kind") and cls.name not in MUTANTS, cls
    MUTANTS[cls.name] = cls
    return cls


def mutant_spec(name: str) -> str:
    """The --bridge value of the mutant called `name`."""
    return bridge_spec(MUTANTS[name].__name__)
