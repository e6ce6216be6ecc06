"""The catalogue's plain listing (`conformance/mutants/catalogue.py`) says what the mutant classes
say, and reads without torch or megatron, so that the kill matrix can list the mutants without
importing them."""

from __future__ import annotations

import importlib
import subprocess
import sys

from conformance.mutants import CATALOGUE, MUTANTS, mutant_spec
from conformance.mutants.catalogue import Listing


def listing_of(cls) -> Listing:
    """What the catalogue should list for the registered mutant class `cls`."""
    return Listing(cls.name, cls.__name__, cls.part, cls.killed_by, cls.bug(), reveals_under=cls.reveals_under,
                   reveals_in=cls.reveals_in, reveals_in_published_structures=cls.reveals_in_published_structures)


def test_catalogue_lists_the_registered_mutants_as_they_are() -> None:
    assert list(CATALOGUE) == list(MUTANTS), "the catalogue lists the registered mutants, in their order"
    for name, cls in MUTANTS.items():
        assert CATALOGUE[name] == listing_of(cls), f"catalogue.py should list {name} as\n    {listing_of(cls)!r}"


def test_a_listings_spec_is_the_mutants_bridge_and_resolves_to_its_class() -> None:
    for name, cls in MUTANTS.items():
        spec = CATALOGUE[name].spec
        assert spec == mutant_spec(name) == f"conformance.mutants:{cls.__name__}", spec
        module, _, attribute = spec.partition(":")
        assert getattr(importlib.import_module(module), attribute) is cls, spec


def test_catalogue_and_kill_matrix_read_without_megatron() -> None:
    """In a fresh process: the catalogue imports neither torch nor megatron, and the kill matrix
    (which imports the properties, and torch with them) no mutant class and no megatron."""
    probe = (
        "import sys\n"
        "import conformance.mutants\n"
        "from conformance.mutants.catalogue import CATALOGUE\n"
        "assert CATALOGUE and not {'torch', 'megatron'} & {m.split('.')[0] for m in sys.modules}, sorted(sys.modules)\n"
        "import conformance.kill_matrix\n"
        "loaded = {m for m in sys.modules if m.startswith(('megatron', 'conformance.mutants.'))}\n"
        "assert loaded == {'conformance.mutants.catalogue'}, sorted(loaded)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
