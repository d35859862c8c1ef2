"""DeepSpeed's ``DeepSpeedDataSampler`` at DeepSpeed's path (machinery: core/data_sampler.py)."""

from zerostep.core.data_sampler import DeepSpeedDataSampler, StepBatchSampler

__all__ = ["DeepSpeedDataSampler", "StepBatchSampler"]
