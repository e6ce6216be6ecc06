"""How a rank answers a task, shared by the two ways the suite runs a function on every rank: the
built-in pool of rank processes (:mod:`conformance.rank_pool`) and a torchrun world
(:mod:`conformance.torchrun`).

A task is ``(fn, args)``, pickled once by value (:func:`encode_task`) so that every rank gets the
same bytes. A rank answers with a reply tuple: ``("ok", result)`` (:func:`ok_reply`) or
``("err", formatted traceback, the pickled exception or None)`` (:func:`error_reply`), pickled
before anything is sent (:func:`encode_reply`). The caller collects the failing ranks' tracebacks
and exceptions (:func:`exception_of`) into a :class:`conformance.rank_pool.RankFailure`, whose
message names the ranks with :func:`rank_list`. Rank 0's store listens on a port that
:func:`pick_free_port` finds.

Torch-free: the rank pool's parent process imports it and must not import torch.
"""

from __future__ import annotations

import pickle
import socket
import traceback
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ERROR", "OK", "encode_reply", "encode_task", "error_reply", "exception_of", "ok_reply",
           "pick_free_port", "rank_list"]

# The first item of a reply: the task returned, or raised.
OK, ERROR = "ok", "err"


def encode_task(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """``(fn, args)`` in plain pickle, by value.

    Not ``multiprocessing.Connection.send``'s ForkingPickler: torch registers reducers with it that
    move tensors through shared memory by passing a file descriptor once, which breaks when the same
    task bytes go to several ranks, and leaks handles when a rank is killed.
    """
    return pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)


def ok_reply(result: Any) -> tuple[str, Any]:
    """The reply of a rank whose task returned ``result``."""
    return (OK, result)


def error_reply(exc: BaseException) -> tuple[str, str, bytes | None]:
    """The reply of a rank whose task raised ``exc``: its formatted traceback, and the exception
    itself, pickled, where it pickles (else None: the traceback text is enough)."""
    text = "".join(traceback.format_exception(exc))
    try:
        exc_bytes: bytes | None = pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - any pickling error: the text alone goes back
        exc_bytes = None
    return (ERROR, text, exc_bytes)


def encode_reply(reply: tuple[Any, ...]) -> bytes:
    """``reply`` pickled, or, where it does not pickle (a result that cannot travel), the error reply
    of that pickling error: pickled before anything is sent, so that such a result becomes this
    rank's error instead of an exception that leaves the caller waiting for an answer."""
    try:
        return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001
        return pickle.dumps(error_reply(exc), protocol=pickle.HIGHEST_PROTOCOL)


def exception_of(reply: tuple[Any, ...]) -> BaseException | None:
    """The exception an error reply carries, or None where it did not pickle on the rank or does not
    unpickle here (e.g. a class this process cannot import)."""
    if reply[2] is None:
        return None
    try:
        return pickle.loads(reply[2])
    except Exception:  # noqa: BLE001 - the traceback text still tells what happened
        return None


def rank_list(ranks: Iterable[int]) -> str:
    """"rank 1" or "ranks 0, 2" (sorted): the ranks a message is about."""
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now, for rank 0's store.

    Only needed for world size > 1, where a launcher must tell every rank the same port (set
    ``MASTER_PORT`` before starting them); world size 1 never needs it, its store binds port 0
    itself. The port is free only until another process takes it: the rank pool retries once,
    on a new port, where rank 0 finds it taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
