"""Drawing one case for the bridge under test, and the scratch directories it needs."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import reject
from hypothesis import strategies as st

from ernie_ref.layout import Layout

from ..bridge import Bridge
from ..plugin import DECLARED_REFUSALS
from ..properties import Case
from ..strategies import configs, inputs, seeds


def draw_case(data: st.DataObject, bridge: Bridge) -> Case:
    """Draw a config, weights seed, inputs and layout; a config the bridge declares unsupported
    is recorded as a declared refusal and the example is rejected (it is not a failure)."""
    cfg = data.draw(configs(), label="config")
    reason = bridge.unsupported(cfg)
    if reason is not None:
        DECLARED_REFUSALS[reason] += 1
        reject()
    return Case(
        config=cfg,
        weights_seed=data.draw(seeds(), label="weights seed"),
        inputs=data.draw(inputs(), label="inputs"),
        layout=Layout(),
    )


@contextmanager
def scratch_dirs(*names: str) -> Iterator[list[Path]]:
    with tempfile.TemporaryDirectory(prefix="ernie-conformance-") as root:
        yield [Path(root) / n for n in names]
