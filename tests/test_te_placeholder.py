"""The Transformer Engine placeholder of the adapters (conformance/adapters/te_placeholder.py): the
modules an adapter names get it, and no other module does."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from conformance.adapters.te_placeholder import HAVE_TE, show_placeholders_to

pytestmark = pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed: adapters install no placeholder")

_IMPORTER = textwrap.dedent("""
    import transformer_engine
    import transformer_engine.pytorch as te
    from transformer_engine.pytorch import Linear
    from megatron.core.extensions.transformer_engine import TEGroupedLinear, TELinear
    import torch

    LINEAR = Linear
    GROUPED_IS_A_CLASS = isinstance(TEGroupedLinear, type) and isinstance(TELinear, type)
    NOTHING_IS_GROUPED = not isinstance(torch.nn.Linear(1, 1), (TEGroupedLinear, TELinear))
""")


def test_named_modules_get_placeholders_and_no_other_module_does(tmp_path, monkeypatch):
    for package in ("te_shown", "te_hidden"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "importer.py").write_text(_IMPORTER)
    monkeypatch.syspath_prepend(str(tmp_path))
    show_placeholders_to(lambda name: name.startswith("te_shown."), megatron_te_classes=True)

    shown = importlib.import_module("te_shown.importer")
    assert shown.GROUPED_IS_A_CLASS and shown.NOTHING_IS_GROUPED, vars(shown)
    with pytest.raises(RuntimeError, match="placeholder: Transformer Engine is not installed"):
        shown.LINEAR()  # a placeholder class refuses to be built
    assert "transformer_engine" not in sys.modules, "the placeholder must not be visible to other modules"

    with pytest.raises(ImportError, match="transformer_engine"):
        importlib.import_module("te_hidden.importer")  # not named: the real import, which fails
