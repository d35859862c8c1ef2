"""DeepSpeed's ``deepspeed.inference`` names over ``zerostep.core.inference``."""

from zerostep.core.inference import InferenceConfig, InferenceEngine, init_inference

DeepSpeedInferenceConfig = InferenceConfig

__all__ = ["DeepSpeedInferenceConfig", "InferenceConfig", "InferenceEngine", "init_inference"]
