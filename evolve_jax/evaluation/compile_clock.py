"""Seconds this process spends compiling, summed from JAX's own compile-duration events.

JAX reports tracing, lowering to MLIR and XLA's backend compile as monitoring events; one
listener, registered once per process, adds them up. Threads share the total, so a step's
compile time is the difference of two readings around it. Only this process's compiles count:
sandboxed code-mode workers and the other processes of a multi-host job are not seen.
"""

from __future__ import annotations

import threading

from jax import monitoring

_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)
_lock = threading.Lock()
_total = 0.0
_registered = False


def _listen(event: str, duration: float, **_: object) -> None:
    global _total
    if event in _EVENTS:
        with _lock:
            _total += duration


def seconds() -> float:
    """Compile seconds of this process since the first call (which starts the clock)."""
    global _registered
    with _lock:
        if not _registered:
            monitoring.register_event_duration_secs_listener(_listen)
            _registered = True
        return _total
