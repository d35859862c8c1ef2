"""DeepSpeed's ``deepspeed.utils``: ``groups`` (the sequence-parallel accessors)."""

from zerostep.utils import groups

__all__ = ["groups"]
