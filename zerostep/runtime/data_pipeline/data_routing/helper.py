"""DeepSpeed's random-LTD helpers, at DeepSpeed's path (machinery: core/random_ltd.py).

``convert_to_random_ltd(model, LayerClass)``: on an ``nn.Module`` before ``initialize`` it wraps the
layers in RandomLayerTokenDrop (DeepSpeed's wrapper); on the facade engine after ``zerostep.initialize``
(DeepSpeed's usual order) it converts them in place, keeping the parameter names the engine was built
on, and binds them to the config's schedule.
"""

from collections import OrderedDict

from torch import nn

from zerostep.core.random_ltd import convert_to_random_ltd, remove_random_ltd_state_dict


def save_without_random_ltd(model: nn.Module) -> OrderedDict:
    """The model's state dict with the wrappers' ``.random_ltd_layer`` taken out of its keys."""
    return remove_random_ltd_state_dict(getattr(model, "module", model).state_dict())


__all__ = ["convert_to_random_ltd", "remove_random_ltd_state_dict", "save_without_random_ltd"]
