"""DeepSpeed's ``RandomLayerTokenDrop`` wrapper, at DeepSpeed's path (machinery: core/random_ltd.py)."""

from zerostep.core.random_ltd import RandomLayerTokenDrop

__all__ = ["RandomLayerTokenDrop"]
