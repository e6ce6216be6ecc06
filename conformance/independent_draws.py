"""The suite's examples as independent draws: two changes to Hypothesis' generation, and why.

A suite session (plugin `_enter_suite_mode`) calls `make_draws_independent()` once. Hypothesis
(6.1xx) generates examples in two ways that do not suit the suite:

- It mixes into its draws constants found in the source of every "local" module imported so far
  (not installed packages: an editable checkout's, a user's tests). Which those are depends on what
  the process ran before, so a derandomized profile drew other examples after another test, and
  under xdist by which test a worker ran first: a bridge's known-failures file held in one run and
  not in the next.
- After each freshly generated example it runs up to six mutations of it, each copying one part of
  the example over another part drawn by the same strategy. Those keep the example's top-level
  draws: of the ci profile's 100 examples only about 14 had a layout, dtype and config of their
  own, and the published structures' share (two slots in ten) came from those 14 coin flips (one
  property drew none in 100 examples). The suite's examples each build and convert a model: an
  example should be a fresh draw of every coordinate.

Both are switched off for the whole process. A Hypothesis without either mechanism is left as it
is (the suite pins the version it was measured with in tox.ini).
"""

from __future__ import annotations

__all__ = ["make_draws_independent"]


def make_draws_independent() -> None:
    """Draw without local-module constants and without mutating the previous example."""
    try:
        from hypothesis.internal.conjecture import engine, providers
    except ImportError:
        return
    if callable(getattr(providers, "_get_local_constants", None)) and hasattr(providers, "Constants"):
        no_constants = providers.Constants()
        providers._get_local_constants = lambda: no_constants
        providers.CONSTANTS_CACHE.cache.clear()  # permitted values cached from constants collected before
    if callable(getattr(engine.ConjectureRunner, "generate_mutations_from", None)):
        engine.ConjectureRunner.generate_mutations_from = _no_mutations


def _no_mutations(self, data) -> None:  # noqa: ANN001 - Hypothesis' runner and test case
    """In place of ConjectureRunner.generate_mutations_from: the next example is a fresh draw."""
