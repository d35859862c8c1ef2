"""The facade's gradient reducer with DeepSpeed's backward split: ``bwd_inner`` (autograd) ends and
``bwd_allreduce`` starts when the micro-step's gradients are handed to the reducer.

Installed over ``core._reducer`` only when ``wall_clock_breakdown`` is on. Reductions that the reducer's
gradient hooks start during autograd (overlapped communication) fall inside ``bwd_inner``, as with
DeepSpeed's ``overlap_comm``; ``bwd_allreduce`` is what the reducer does once autograd has returned.
"""

from __future__ import annotations

from typing import Any

from zerostep.core.monitoring.timers import EngineTimers


class TimedReducer:
    def __init__(self, reducer: Any, timers: EngineTimers) -> None:
        self._reducer = reducer
        self._timers = timers

    def add(self, grads: Any, boundary: bool) -> Any:
        t = self._timers
        t.stop_if_running(t.BACKWARD_INNER)
        t.start(t.BACKWARD_REDUCE)
        try:
            return self._reducer.add(grads, boundary)
        finally:
            t.stop(t.BACKWARD_REDUCE)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reducer, name)
