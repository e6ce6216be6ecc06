"""The published ERNIE 4.5 MoE structures (ernie_ref.published): a bridge that declares one of them
unsupported cannot convert the models people use, and does not conform."""

from __future__ import annotations

import pytest

from conformance.properties import check_published_structure
from ernie_ref.published import PUBLISHED_STRUCTURES


@pytest.mark.parametrize("structure", list(PUBLISHED_STRUCTURES))
def test_published_structure_is_supported(bridge, structure: str) -> None:
    check_published_structure(bridge, structure)
