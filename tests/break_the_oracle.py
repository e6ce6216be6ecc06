"""A pytest plugin (`-p break_the_oracle`) that breaks the suite, not the bridge: the oracle raises.
The suite must report that as an error of the suite, never as a verdict on the bridge. Each call of
the broken oracle is counted as a line of `oracle_calls.txt` in the working directory."""

from __future__ import annotations

from pathlib import Path


def pytest_configure(config) -> None:
    from ernie_ref import model

    def broken(*args, **kwargs):
        with Path("oracle_calls.txt").open("a") as calls:
            calls.write("called\n")
        raise OSError("break_the_oracle: the oracle's checkpoint reader is broken")

    model.ErnieMoeForCausalLM.from_pretrained = classmethod(lambda cls, *a, **k: broken())
