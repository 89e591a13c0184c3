"""Wall-clock timing that separates JAX's tracing and XLA compilation from the run itself."""

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import jax

# The events JAX records for one jit compilation: tracing to a jaxpr, lowering to MLIR, and the XLA compile.
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


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
    timing = Timing()

    def listener(event: str, duration: float, **_: object) -> None:
        if event in COMPILE_EVENTS:
            timing.compile_s += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing.total_s = time.perf_counter() - start
        jax.monitoring.unregister_event_duration_listener(listener)
