"""What one example of the suite is: a `Case` (config, weights, inputs, layout, dtype, and for
the refusal property a `Corruption`; for a drawn checkpoint, its on-disk `CheckpointFormat`). Strategies build cases; properties run them; counterexample
files store them. Each is a frozen dataclass, so a case is a value that can be compared and saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernie_ref import CheckpointFormat, ErnieMoeConfig
from ernie_ref.layout import Layout

__all__ = ["Case", "Corruption", "Inputs", "make_input_ids"]


@dataclass(frozen=True)
class Inputs:
    """A batch of token ids, described by its shape and seed so that a counterexample can store it."""

    batch: int
    seq_len: int
    seed: int

    def input_ids(self, vocab_size: int) -> torch.Tensor:
        return make_input_ids(self.batch, self.seq_len, vocab_size, self.seed)


def make_input_ids(batch: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


@dataclass(frozen=True)
class Corruption:
    """One way to break a checkpoint: `kind` in missing, extra, misshaped, config; `target` names
    the tensor (or, for `config`, the config.json field); `detail` is the shape or the new value."""

    kind: str
    target: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.target}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Case:
    """One drawn example: everything needed to rebuild it exactly.

    `weights_seed` draws the weights of a random checkpoint; with `checkpoint` set instead, the
    example runs on that directory (a user's own checkpoint) and `config` is read from it.
    `corruption` is used by the refusal property only.
    """

    config: ErnieMoeConfig
    weights_seed: int | None
    inputs: Inputs
    layout: Layout = Layout()
    corruption: Corruption | None = None
    checkpoint: str | None = None
    dtype: str = "float32"  # of the drawn weights (the router stays fp32); a user's checkpoint has its own
    checkpoint_format: CheckpointFormat = CheckpointFormat()  # how the drawn checkpoint spells its config, MTP tensors

    def describe(self) -> str:
        weights = (f"checkpoint {self.checkpoint}" if self.checkpoint
                   else f"{self.dtype} weights seed {self.weights_seed}")
        return (
            f"config: {self.config.one_line()}\n"
            f"  {weights}, layout {self.layout}, "
            f"inputs batch {self.inputs.batch} x seq {self.inputs.seq_len} seed {self.inputs.seed}"
            + (f", format: {self.checkpoint_format}" if self.checkpoint_format != CheckpointFormat() else "")
            + (f", corruption: {self.corruption}" if self.corruption else "")
        )
