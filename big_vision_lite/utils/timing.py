"""Wall-clock timing that separates JAX's tracing and XLA compilation from the run itself."""

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

# The events JAX records for one jit compilation: tracing to a jaxpr, lowering to MLIR, and the XLA compile.
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


class CompileSpans:
    """Collects the time spans in which JAX traced, lowered or compiled (via `jax.monitoring`) while recording."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def _listener(self, event: str, start_time: float, end_time: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            self.spans.append((start_time, end_time))

    @contextlib.contextmanager
    def recording(self) -> Iterator["CompileSpans"]:
        jax.monitoring.register_event_time_span_listener(self._listener)
        try:
            yield self
        finally:
            jax.monitoring.unregister_event_time_span_listener(self._listener)

    def seconds_since(self, first: int = 0) -> float:
        """Length of the union of the spans from index `first` on (a trace nested in another counts once)."""
        total, end = 0.0, -np.inf
        for start, stop in sorted(self.spans[first:]):
            if stop > end:
                total += stop - max(start, end)
                end = stop
        return total


@dataclasses.dataclass
class Timing:
    """`total_s`: wall time of the block; `compile_s`: the part JAX spent tracing, lowering and compiling."""

    total_s: float = 0.0
    compile_s: float = 0.0

    @property
    def run_s(self) -> float:
        return max(self.total_s - self.compile_s, 0.0)


@contextlib.contextmanager
def timed() -> Iterator[Timing]:
    """Times the block; the caller must block on its results inside it (e.g. with `np.asarray`)."""
    timing, spans = Timing(), CompileSpans()
    start = time.perf_counter()
    try:
        with spans.recording():
            yield timing
    finally:
        timing.total_s = time.perf_counter() - start
        timing.compile_s = spans.seconds_since()


class Stopwatch:
    """Wall seconds of named steps: `with watch("load"): ...` records `watch.seconds["load"]` (rounded to ms)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
