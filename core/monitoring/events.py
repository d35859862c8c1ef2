"""The events DeepSpeed's engine writes to its monitors, x axis = samples seen (``global_samples``)."""

from __future__ import annotations

from zerostep.core.monitoring.timers import (
    BACKWARD_GLOBAL_TIMER,
    BACKWARD_INNER_GLOBAL_TIMER,
    BACKWARD_REDUCE_GLOBAL_TIMER,
    FORWARD_GLOBAL_TIMER,
    STEP_GLOBAL_TIMER,
)

Event = tuple[str, float, int]

# DeepSpeed's _write_monitor tags for the global timers
TIMER_TAGS = {
    FORWARD_GLOBAL_TIMER: "Train/Samples/elapsed_time_ms_forward",
    BACKWARD_GLOBAL_TIMER: "Train/Samples/elapsed_time_ms_backward",
    BACKWARD_INNER_GLOBAL_TIMER: "Train/Samples/elapsed_time_ms_backward_inner",
    BACKWARD_REDUCE_GLOBAL_TIMER: "Train/Samples/elapsed_time_ms_backward_allreduce",
    STEP_GLOBAL_TIMER: "Train/Samples/elapsed_time_ms_step",
}


def step_events(samples: int, loss: float, lr: float, loss_scale: float | None) -> list[Event]:
    """After an optimizer step: the window's mean loss, the first group's lr, the fp16 loss scale."""
    events = [("Train/Samples/train_loss", loss, samples), ("Train/Samples/lr", lr, samples)]
    if loss_scale is not None:
        events.append(("Train/Samples/loss_scale", loss_scale, samples))
    return events


def timer_events(window_ms: dict[str, float], samples: int) -> list[Event]:
    return [(TIMER_TAGS[name], ms, samples) for name, ms in window_ms.items() if name in TIMER_TAGS]
