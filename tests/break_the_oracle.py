"""A pytest plugin (`-p break_the_oracle`) that breaks the suite, not the bridge: the oracle raises.
The suite must report that as an error of the suite, never as a verdict on the bridge."""

from __future__ import annotations


def pytest_configure(config) -> None:
    from ernie_ref import model

    def broken(*args, **kwargs):
        raise OSError("break_the_oracle: the oracle's checkpoint reader is broken")

    model.ErnieMoeForCausalLM.from_pretrained = classmethod(lambda cls, *a, **k: broken())
