"""What a process of the suite sets up before torch and megatron-core start: GPUs hidden for
``--device cpu``, and which of megatron-core's warnings it ignores.

Torch-free on purpose: hiding GPUs only works before torch initialises CUDA (torchrun's ranks and
the benchmarks hide them before they import torch), and the rank pool's parent process, which
passes the warning filters to its fork server, stays torch-free. The CPU stand-ins for CUDA-only
calls are in :mod:`conformance.cpu_patches`; process groups and model-parallel state in
:mod:`conformance.parallel`.

The warning filters are defined once, in ``MEGATRON_WARNINGS``, and take three forms: installed in
this process (:func:`ignore_megatron_warnings`), as pytest ``filterwarnings`` lines
(:func:`megatron_warning_lines`, the plugin marks the suite's tests with them) and as ``-W``
options of a new interpreter (:func:`megatron_warning_options`, for the rank pool's fork server).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

__all__ = [
    "MEGATRON_WARNINGS",
    "WarningFilter",
    "hide_gpus",
    "ignore_megatron_warnings",
    "megatron_warning_lines",
    "megatron_warning_options",
]


def hide_gpus() -> None:
    """Hide every GPU from this process and from the processes it starts (``CUDA_VISIBLE_DEVICES``
    empty): what ``--device cpu`` means.

    The bridges' model code puts a model on a GPU whenever it sees one, so a CPU run must not let
    it see any. Call it before torch initialises CUDA: CUDA reads the variable once, when it starts.
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@dataclass(frozen=True)
class WarningFilter:
    """Warnings to ignore: those of ``category`` whose message starts with ``message`` and, when
    ``module`` is given, that are attributed to a module whose name starts with ``module``.

    ``message`` and ``module`` are plain text (empty: any); the forms below escape them where the
    receiving side reads regular expressions.
    """

    category: type[Warning]
    message: str = ""
    module: str = ""

    def install(self) -> None:
        """Ignore these warnings in this process."""
        warnings.filterwarnings("ignore", message=re.escape(self.message), category=self.category,
                                module=re.escape(self.module))

    def pytest_line(self) -> str:
        """The filter as a pytest ``filterwarnings`` line (ini option or mark), e.g.
        ``ignore::UserWarning:megatron``."""
        fields = ["ignore", re.escape(self.message), self.category.__name__]
        return ":".join([*fields, re.escape(self.module)] if self.module else fields)

    def warn_option(self) -> str | None:
        """The filter as the text of a ``-W`` option, or None for a filter that names a module:
        ``-W`` matches a module's whole name only, never a package and its submodules."""
        return None if self.module else f"ignore:{self.message}:{self.category.__name__}"


# Warnings that megatron-core raises about itself on import and on every model build (no Apex or
# Transformer Engine, deprecations of its own options): noise in a report about a bridge.
MEGATRON_WARNINGS: tuple[WarningFilter, ...] = (
    WarningFilter(UserWarning, module="megatron"),
    WarningFilter(DeprecationWarning, module="megatron"),
    WarningFilter(FutureWarning, module="megatron"),
    # The import-time ones again by message, for where a module cannot be named (-W options).
    WarningFilter(UserWarning, "Transformer Engine and Apex are not installed"),
    WarningFilter(UserWarning, "Apex is not installed"),
    # Raised with stacklevel=2: attributed to whoever builds the MLP, a bridge's module included.
    WarningFilter(DeprecationWarning, "MLP requires ffn_hidden_size"),
    # Megatron-core's token dispatcher calls a torch collective that torch declares deprecated;
    # torch attributes that warning to itself.
    WarningFilter(FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
)


def ignore_megatron_warnings() -> None:
    """Ignore ``MEGATRON_WARNINGS`` in this process (``warnings.filterwarnings``)."""
    for warning_filter in MEGATRON_WARNINGS:
        warning_filter.install()


def megatron_warning_lines() -> tuple[str, ...]:
    """``MEGATRON_WARNINGS`` as pytest ``filterwarnings`` lines."""
    return tuple(warning_filter.pytest_line() for warning_filter in MEGATRON_WARNINGS)


def megatron_warning_options() -> tuple[str, ...]:
    """``MEGATRON_WARNINGS`` as ``-W`` options (the text after ``-W``), for a new interpreter, such
    as the rank pool's fork server, that imports megatron-core before it could install filters.
    Those naming a module are left out (see :meth:`WarningFilter.warn_option`); megatron-core's
    import-time warnings are matched by message."""
    options = (warning_filter.warn_option() for warning_filter in MEGATRON_WARNINGS)
    return tuple(option for option in options if option is not None)
