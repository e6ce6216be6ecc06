"""Mutants of refusal: bridges that accept a checkpoint they should refuse (missing, misshaped
or extra tensors; biases silently skipped), and one that refuses every checkpoint, the intact one
included."""

from __future__ import annotations

import torch

from ernie_ref.checkpoint import CheckpointError, TensorReader, expected_keys, read_config

from .base import Mutant, mutant

__all__ = ["LoadAlwaysRaises", "LenientLoader", "ExtraTensorsIgnored", "BiasesDropped"]


@mutant
class LoadAlwaysRaises(Mutant):
    """load raises on every checkpoint (a dependency it cannot import, say). When any error of
    load counted as refusing a corruption, such a bridge passed the refusal property."""

    name, part, killed_by = "load-always-raises", "refusal", "refusal"
    expect = {"kind": "bridge raised", "call": "load", "exception": "ModuleNotFoundError"}

    def load(self, hf_dir, layout):
        raise ModuleNotFoundError("load-always-raises: No module named 'a_dependency_of_the_bridge'")


@mutant
class LenientLoader(Mutant):
    """Takes what it finds: missing or misshaped tensors become zeros, extra tensors are ignored."""

    name, part, killed_by = "lenient-loader", "refusal", "refusal"
    expect = {"kind": "accepted corruption"}

    def read_checkpoint(self, hf_dir):
        return read_config(hf_dir), TensorReader(hf_dir)

    def to_megatron(self, cfg, hf):
        shapes = expected_keys(cfg)
        complete = {k: hf[k] if k in hf and tuple(hf[k].shape) == v else torch.zeros(v) for k, v in shapes.items()}
        return super().to_megatron(cfg, complete)


@mutant
class ExtraTensorsIgnored(Mutant):
    """Checks that every expected tensor is present and well shaped, but not that nothing else is."""

    name, part, killed_by = "extra-tensors-ignored", "refusal", "refusal"
    expect = {"kind": "accepted corruption", "corruption": "extra"}

    def read_checkpoint(self, hf_dir):
        cfg, reader = read_config(hf_dir), TensorReader(hf_dir)
        for name, shape in expected_keys(cfg).items():
            if name not in reader.shapes or tuple(reader.shapes[name]) != shape:
                raise CheckpointError(f"tensor {name!r}: expected shape {list(shape)}")
        return cfg, reader


@mutant
class BiasesDropped(Mutant):
    """use_bias read as false without saying so: the checkpoint's biases are skipped."""

    name, part, killed_by = "biases-dropped", "refusal", "round_trip"
    expect = {"kind": "checkpoint differs", "diff": "config", "names": "use_bias"}

    def read_checkpoint(self, hf_dir):
        cfg, reader = super().read_checkpoint(hf_dir)
        return cfg.replace(use_bias=False), reader
