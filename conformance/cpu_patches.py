"""CPU stand-ins for the CUDA-only calls of Megatron-Core, so that a plain (non-CUDA) PyTorch
process can build a ``GPTModel`` with the *local* (non Transformer-Engine) layer spec and run it
forward and backward.

Megatron-Core assumes a CUDA device in a handful of places even when
``use_cpu_initialization=True`` and every fusion is turned off.  This module holds the minimal
set of runtime patches that turn those places into their CPU equivalents, and the few CPU-side
helpers that go with them.  Process groups and Megatron's model-parallel state are set up by
:mod:`conformance.parallel`; hiding GPUs and megatron-core's warning filters, which must not
import torch, are in :mod:`conformance.process_setup`.

Public API
----------
``apply_cpu_patches()``
    One idempotent call that installs every patch.  Patches are applied **only
    when ``torch.cuda.is_available()`` is False**: on a machine with a usable GPU
    the call is a no-op, so CUDA behaviour is never altered.  Patches 1-8 each
    turn a code path that would raise on a CUDA-less machine into its CPU
    equivalent; patch 9 swaps ``torch.compile`` (Megatron's ``jit_fuser``) for eager
    execution (no C++ toolchain needed, no per-shape recompiles).
``applied_patches()``
    What :func:`apply_cpu_patches` installed in this process (name -> why).
``CudaDevicesOnCpu``
    Torch function mode that turns a CUDA device named in a call into the CPU device.
``causal_mask(seq_len)``
    Explicit bool mask ``[1, 1, s, s]``, True = masked.  Pass it to
    ``GPTModel.forward(attention_mask=...)``: Megatron's own default causal mask
    is created with ``device="cuda"``.
``one_thread_per_process()``
    One intra-op thread in this process: every process of the suite does this.

Patches are guarded by feature detection (attribute presence), not version
strings, and each records what it replaced in ``_APPLIED_PATCHES``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "apply_cpu_patches",
    "applied_patches",
    "causal_mask",
    "one_thread_per_process",
    "CudaDevicesOnCpu",
]

_CPU = torch.device("cpu")
_LOCK = threading.RLock()
_PATCHED = False
# name -> one-line description of each patch that was actually installed
_APPLIED_PATCHES: dict[str, str] = {}


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def applied_patches() -> dict[str, str]:
    """Copy of the patches installed by :func:`apply_cpu_patches` (name -> why)."""
    return dict(_APPLIED_PATCHES)


def causal_mask(seq_len: int) -> torch.Tensor:
    """Causal attention mask ``[1, 1, s, s]`` (bool, True = masked, i.e. key j > query i).

    Megatron's ``get_default_causal_mask`` hard-codes ``device="cuda"``; the local
    ``DotProductAttention`` accepts this explicit mask instead (it broadcasts over batch
    and heads).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return torch.ones(seq_len, seq_len, dtype=torch.bool).triu(diagonal=1)[None, None]


def _record(name: str, why: str) -> None:
    _APPLIED_PATCHES[name] = why


# --------------------------------------------------------------------------------------
# CPU stand-ins
# --------------------------------------------------------------------------------------


def _cpu_current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device()`` when no GPU exists: the CPU device."""
    return _CPU


def _cpu_get_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    """Stand-in for Megatron's ``_get_cuda_rng_state``: the CPU default generator's state.

    On CPU every random op (dropout, init) draws from the CPU default generator, so it
    plays the role of "the current device generator".
    """
    del device, clone, graph_safe
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Stand-in for Megatron's ``_set_cuda_rng_state`` on the CPU default generator."""
    del device, graph_safe
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class(base: type, default_name: str) -> type:
    """Subclass Megatron's ``CudaRNGStatesTracker`` so that named states live in CPU
    generator states.

    Only ``add`` and ``fork`` touch CUDA in the base class; ``reset`` /
    ``get_states`` / ``set_states`` / ``is_initialized`` are inherited unchanged.
    """

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """Megatron RNG tracker whose named states are CPU generator states."""

        _is_cpu_stand_in = True

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name: str = default_name) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = getattr(self, "_current_state_name", "default-rng")
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    CpuRNGStatesTracker.__qualname__ = CpuRNGStatesTracker.__name__
    return CpuRNGStatesTracker


class _NullEvent:
    """Minimal stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def record(self, stream: Any = None) -> None:
        del stream

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        del stream

    def query(self) -> bool:
        return True


class _NullStream:
    """Minimal stand-in for ``torch.cuda.Stream`` (CPU work is synchronous)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def wait_stream(self, other: Any) -> None:
        del other

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NullEvent()

    def wait_event(self, event: Any) -> None:
        del event

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


_NULL_STREAM = _NullStream()


def _cpu_synchronize(device: Any = None) -> None:
    del device


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return False


class CudaDevicesOnCpu(TorchFunctionMode):
    """Torch function mode that turns a CUDA device named in a call (``device="cuda"``, or
    ``tensor.to("cuda")`` positionally) into the CPU device.

    Used around Megatron's pipeline schedules, which allocate a token counter with a
    hard-coded ``device="cuda"``, and by adapters around a bridge's calls that name CUDA
    where a CPU run has none (a declared deviation of theirs).
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _cpu_current_stream(device: Any = None) -> _NullStream:
    del device
    return _NULL_STREAM


@contextlib.contextmanager
def _cpu_stream_ctx(stream: Any = None) -> Iterator[None]:
    del stream
    yield


# --------------------------------------------------------------------------------------
# patch installation
# --------------------------------------------------------------------------------------


def _set_attr(obj: Any, name: str, value: Any, patch_name: str, why: str) -> None:
    setattr(obj, name, value)
    _record(patch_name, why)


def _cpu_tensor_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Stand-in for ``Tensor.cuda()`` without CUDA: the tensor itself, on the CPU."""
    del args, kwargs
    return self


def _patch_torch_cuda() -> None:
    # (1) torch.cuda.current_device(): Megatron passes it as `device=` when allocating
    #     (router buffers such as expert_bias, rotary inv_freq move, TP gather buffers,
    #     GlobalMemoryBuffer, RouterGating weight "move to GPU" in Router.gating).  On a
    #     CUDA-less torch it raises; returning the CPU device turns every such
    #     allocation/move into a CPU one.  torch.cuda is only touched when CUDA is
    #     unavailable, where the original could only raise.
    _set_attr(
        torch.cuda,
        "current_device",
        _cpu_current_device,
        "torch.cuda.current_device",
        "returns torch.device('cpu') instead of raising (device= for Megatron allocations)",
    )
    # (2) torch.cuda.current_stream / stream() / Stream: used by the alltoall token dispatcher
    #     (D2H side stream) and shared-expert overlap.  CPU ops are synchronous, so a
    #     no-op stream object and a null context manager are exact stand-ins.
    _set_attr(
        torch.cuda,
        "current_stream",
        _cpu_current_stream,
        "torch.cuda.current_stream",
        "returns a no-op stream object (alltoall dispatcher / shared-expert overlap)",
    )
    _set_attr(
        torch.cuda,
        "stream",
        _cpu_stream_ctx,
        "torch.cuda.stream",
        "null context manager instead of a CUDA stream context",
    )
    _set_attr(
        torch.cuda,
        "Stream",
        _NullStream,
        "torch.cuda.Stream",
        "no-op stream class (MoEAlltoAllTokenDispatcher.cuda_dtoh_stream)",
    )
    # (3) torch.cuda.synchronize(): called after pipeline p2p batch_isend_irecv.  CPU (gloo)
    # ops have completed once req.wait() returned, so a no-op is exact.
    _set_attr(
        torch.cuda,
        "synchronize",
        _cpu_synchronize,
        "torch.cuda.synchronize",
        "no-op (pipeline p2p communication)",
    )
    # (3b) Tensor.cuda(): LanguageModule.setup_embeddings_and_output_layer moves the tied
    # embedding of the first and last pipeline stages with `weight.data.cuda()` before the
    # all-reduce that makes the two copies equal. Without CUDA the call could only raise;
    # the tensor stays where it is (on the CPU), which is what every other patch assumes.
    _set_attr(
        torch.Tensor,
        "cuda",
        _cpu_tensor_cuda,
        "torch.Tensor.cuda",
        "returns the tensor itself (tied embeddings across pipeline stages)",
    )


def _patch_rng_tracker() -> None:
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    base = getattr(rnd, "CudaRNGStatesTracker", None)
    if base is None or getattr(base, "_is_cpu_stand_in", False):
        return
    cpu_cls = _make_cpu_tracker_class(
        base, getattr(rnd, "_MODEL_PARALLEL_RNG_TRACKER_NAME", "model-parallel-rng")
    )
    # (4) initialize_rng_tracker() looks the tracker class up by this module-global
    #     name at call time, so every tracker Megatron creates from now on (including
    #     model_parallel_cuda_manual_seed(force_reset_rng=True) and the inference
    #     tracker subclass) keeps its named states as CPU generator states instead of
    #     calling torch.cuda.get_rng_state / manual_seed.  isinstance checks against the
    #     name still hold (it is a subclass).
    _set_attr(
        rnd,
        "CudaRNGStatesTracker",
        cpu_cls,
        "tensor_parallel.random.CudaRNGStatesTracker",
        "subclass whose add()/fork() use CPU generator states",
    )
    # If a tracker instance already exists (created before patching), drop it so the
    # next get_cuda_rng_tracker() builds a CPU one.
    if getattr(rnd, "_CUDA_RNG_STATE_TRACKER", None) is not None and not isinstance(
        rnd._CUDA_RNG_STATE_TRACKER, cpu_cls
    ):
        rnd._CUDA_RNG_STATE_TRACKER = None
        rnd._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    # (5) _get_cuda_rng_state/_set_cuda_rng_state: used by activation recompute
    #     (tensor_parallel.checkpoint / CheckpointFunction) to save and replay the device
    #     RNG; on CPU the device generator *is* the CPU default generator.
    if hasattr(rnd, "_get_cuda_rng_state"):
        _set_attr(
            rnd,
            "_get_cuda_rng_state",
            _cpu_get_rng_state,
            "tensor_parallel.random._get_cuda_rng_state",
            "returns the CPU generator state (activation recompute)",
        )
    if hasattr(rnd, "_set_cuda_rng_state"):
        _set_attr(
            rnd,
            "_set_cuda_rng_state",
            _cpu_set_rng_state,
            "tensor_parallel.random._set_cuda_rng_state",
            "sets the CPU generator state (activation recompute)",
        )


def _patch_moe_utils() -> None:
    try:
        moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    except ImportError:  # pragma: no cover - very old megatron without MoE
        return
    # (6) Without Transformer Engine the `from ...transformer_engine import (...)` block
    #     fails and these names are never bound, yet RouterGatingLinearFunction tests
    #     `te_general_gemm is not None` -> NameError.  Binding the missing names to None
    #     selects the plain torch.mm path (the fused_* ones are additionally guarded by
    #     HAVE_TE).  Only names that are missing are bound; nothing is overwritten.
    names = (
        "te_general_gemm",
        "fused_compute_score_for_moe_aux_loss",
        "fused_moe_aux_loss",
        "fused_permute",
        "fused_permute_with_probs",
        "fused_sort_chunks_by_index",
        "fused_sort_chunks_by_index_with_probs",
        "fused_topk_with_score_function",
        "fused_unpermute",
    )
    missing = [n for n in names if n not in vars(moe_utils)]
    for n in missing:
        setattr(moe_utils, n, None)
    if missing:
        _record(
            "moe_utils.<TE names>",
            "bound missing TE-only names to None: " + ", ".join(missing),
        )


def _patch_alltoall_dispatcher() -> None:
    try:
        td = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    except ImportError:  # pragma: no cover
        return
    original = getattr(td, "maybe_move_tensor_to_cpu", None)
    if original is None or getattr(original, "_cpu_stand_in", False):
        return

    # (7) The alltoall dispatcher turns its split sizes (input_splits, output_splits,
    #     output_splits_tp) into host numpy arrays with
    #     maybe_move_tensor_to_cpu(t, as_numpy=True), which only converts tensors that are
    #     on CUDA.  On CPU they would stay torch tensors and reach all_to_all_single /
    #     `sum(...)` as tensors; this wrapper also converts CPU tensors when a numpy array
    #     was asked for.  Patched in the dispatcher's namespace only (it imported the name).
    def maybe_move_tensor_to_cpu(
        tensor: Any, as_numpy: bool = False, record_stream: bool = False
    ) -> Any:
        out = original(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        return out

    maybe_move_tensor_to_cpu._cpu_stand_in = True  # type: ignore[attr-defined]
    maybe_move_tensor_to_cpu.__wrapped__ = original  # type: ignore[attr-defined]
    _set_attr(
        td,
        "maybe_move_tensor_to_cpu",
        maybe_move_tensor_to_cpu,
        "token_dispatcher.maybe_move_tensor_to_cpu",
        "as_numpy=True also converts CPU tensors (alltoall split sizes must be host arrays)",
    )


def _patch_pipeline_schedules() -> None:
    try:
        sched = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    except ImportError:  # pragma: no cover
        return
    # (8) Every forward_backward_* schedule allocates
    #     `torch.zeros([], dtype=torch.int, device="cuda")` (token counter).  A string
    #     device cannot be redirected through torch.cuda.current_device, so the schedule
    #     functions run under a torch-function mode that maps device="cuda" to the CPU.
    #     get_forward_backward_func() looks these names up in the module at call time.
    names = [
        n
        for n in (
            "forward_backward_no_pipelining",
            "forward_backward_pipelining_with_interleaving",
            "forward_backward_pipelining_without_interleaving",
        )
        if callable(getattr(sched, n, None))
        and not getattr(getattr(sched, n), "_cpu_stand_in", False)
    ]
    for n in names:
        fn = getattr(sched, n)

        def wrapper(*args: Any, __fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
            with CudaDevicesOnCpu():
                return __fn(*args, **kwargs)

        functools.update_wrapper(wrapper, fn)
        wrapper._cpu_stand_in = True  # type: ignore[attr-defined]
        setattr(sched, n, wrapper)
    if names:
        _record(
            "pipeline_parallel.schedules.forward_backward_*",
            "run under a torch-function mode mapping device='cuda' to CPU: " + ", ".join(names),
        )


def _eager(obj: Any) -> Any:
    """The eager original of a ``torch.compile``-wrapped function, else ``None``."""
    orig = getattr(obj, "_torchdynamo_orig_callable", None)
    return orig if callable(orig) else None


def _patch_jit_fuser() -> None:
    try:
        jit = importlib.import_module("megatron.core.jit")
    except ImportError:  # pragma: no cover
        return
    # (9) megatron.core.jit.jit_fuser is torch.compile on torch >= 2.2.  It decorates e.g.
    #     TopKRouter._apply_expert_bias and the MoE experts' activation-with-probs.  On CPU
    #     that means an inductor C++ compile (needs a toolchain; ~1.4 s on the first
    #     forward of every process, recompiles for every new token count, slightly
    #     different rounding from eager).  Replace it by megatron's own no-op decorator
    #     for modules imported later, rebind the name in already-imported megatron modules
    #     (functions decorated at construction time look it up there), and swap
    #     already-compiled module functions / class attributes back to their eager
    #     originals.
    noop = getattr(jit, "noop_decorator", None) or (lambda f: f)
    if getattr(jit, "jit_fuser", None) is not noop:
        jit.jit_fuser = noop
    count = 0
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "megatron.core" or name.startswith("megatron.core.")):
            continue
        mod_vars = vars(mod)
        if "jit_fuser" in mod_vars and mod_vars["jit_fuser"] is not noop:
            mod.jit_fuser = noop
        for attr, obj in list(mod_vars.items()):
            orig = _eager(obj)
            if orig is not None:
                setattr(mod, attr, orig)
                count += 1
            elif isinstance(obj, type) and getattr(obj, "__module__", None) == name:
                for cattr, cobj in list(vars(obj).items()):
                    if isinstance(cobj, (staticmethod, classmethod)):
                        corig = _eager(cobj.__func__)
                        if corig is not None:
                            setattr(obj, cattr, type(cobj)(corig))
                            count += 1
                        continue
                    corig = _eager(cobj)
                    if corig is not None:
                        setattr(obj, cattr, corig)
                        count += 1
    _record(
        "megatron.core.jit.jit_fuser",
        f"torch.compile -> no-op decorator; {count} compiled megatron functions set back to eager",
    )


def one_thread_per_process() -> None:
    """One intra-op thread in this process, as in every process of the suite (pytest and its xdist
    workers, certify's, the rank processes). The suite's tensors are tiny and its processes share
    few cores; with a thread per core each, OpenMP's waiting threads take the cores from each other
    and a small scatter_add takes milliseconds instead of microseconds (measured on 2 cores beside
    one busy process: the oracle's forward of a published structure, 28 layers of 64 experts,
    0.08 s with one thread, 1.6 s in fp32 and 11 s in float64 with two)."""
    torch.set_num_threads(1)


def apply_cpu_patches() -> None:
    """Install every CPU patch once (idempotent, thread-safe).

    Does nothing when ``torch.cuda.is_available()`` is True: on a machine with a usable
    GPU Megatron's CUDA paths are left untouched.  Call it before building any Megatron
    module (it imports the megatron-core modules it patches).
    """
    global _PATCHED
    with _LOCK:
        if _PATCHED:
            return
        if torch.cuda.is_available():
            _PATCHED = True
            return
        _patch_torch_cuda()
        _patch_rng_tracker()
        _patch_moe_utils()
        _patch_alltoall_dispatcher()
        _patch_pipeline_schedules()
        _patch_jit_fuser()
        _PATCHED = True
