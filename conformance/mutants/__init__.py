"""A catalogue of broken bridges ("mutants"): each a small variant of the reference bridge with
one realistic bug, the kind a bridge author under deadline writes. The suite is worth what it
catches: `tests/test_meta_properties.py` requires the ci profile to kill every mutant with the property
named here, and `ernie-conformance kill-matrix` measures which properties kill which mutants,
after how many examples and seconds (docs/kill-matrix.md).

Each mutant names the part of the conversion it breaks (`part`), the property expected to kill
it (`killed_by`), what that failure must be (`expect`: its kind and facts, see
`properties.FAILURE_KINDS`, so that a mutant killed for another reason fails its meta-test), and, in its
docstring, the bug it stands for. Mutants that are right on one rank and wrong only when the
model is split also name the one split layout that reveals them (`reveals_under`); mutants that are
right for fp32 checkpoints and wrong for bf16 ones name that dtype (`reveals_in`); mutants right for
every small config say so (`reveals_in_published_structures`).

The package: `base` (`Mutant`, the `@mutant` registration, `MUTANTS`, `mutant_spec`), one module
per part of a conversion (`config`, `routing`, `mapping`, `layout`, `precision` for precision and
export, `refusal`), and `catalogue`, the same mutants listed as plain data for readers that need
no torch (`CATALOGUE`, `PARTS`).

Every mutant class is importable from the package itself, so that a mutant works as any bridge:
`pytest --pyargs conformance --bridge conformance.mutants:TopKOffByOne`.
"""

from __future__ import annotations

import importlib

from .catalogue import CATALOGUE, PARTS

__all__ = ["CATALOGUE", "MUTANTS", "PARTS", "Mutant", "mutant_spec"]

# The modules of the mutants, in the order of PARTS: importing them in this order registers the
# mutants in MUTANTS in the catalogue's order.
_PART_MODULES = ("config", "routing", "mapping", "layout", "precision", "refusal")
_SUBMODULES = ("base", "catalogue", *_PART_MODULES)


def __getattr__(name: str):
    """The mutant classes, `Mutant`, `MUTANTS` and `mutant_spec`, imported on first use: they need
    torch and megatron, which a reader of the catalogue alone (`conformance.mutants.catalogue`,
    this package's `CATALOGUE`) should not pay for."""
    # Dunders and private names are Python's own lookups, and a submodule's name is looked up
    # before it is imported (`from conformance.mutants import catalogue`): none of them is a mutant.
    if name.startswith("_") or name in _SUBMODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = importlib.import_module(".base", __name__)
    exported = {n: getattr(base, n) for n in base.__all__}
    for module_name in _PART_MODULES:
        module = importlib.import_module(f".{module_name}", __name__)
        exported.update({n: getattr(module, n) for n in module.__all__})
    globals().update(exported)  # later lookups find them without this function
    if name not in exported:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return exported[name]
