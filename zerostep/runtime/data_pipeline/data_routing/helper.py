"""DeepSpeed's random-LTD helpers, at DeepSpeed's path (machinery: core/random_ltd.py).

``convert_to_random_ltd(model, LayerClass)`` wraps the layers in place; call it on the model before
``zerostep.initialize``, which binds the wrappers listed in ``random_ltd_layer_id`` to the config's
schedule (converting after initialize would rename the parameters the engine was built on).
"""

from collections import OrderedDict

from torch import nn

from zerostep.core.random_ltd import convert_to_random_ltd, remove_random_ltd_state_dict


def save_without_random_ltd(model: nn.Module) -> OrderedDict:
    """The model's state dict with the wrappers' ``.random_ltd_layer`` taken out of its keys."""
    return remove_random_ltd_state_dict(getattr(model, "module", model).state_dict())


__all__ = ["convert_to_random_ltd", "remove_random_ltd_state_dict", "save_without_random_ltd"]
