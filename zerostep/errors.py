"""Errors shared by every subpackage.

``ConfigError`` lives here, below ``core``, because ``optim.from_config`` raises it too and
``optim`` must not import ``core`` (dependencies point one way; see DESIGN.md).
"""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key path, the value and the rule."""
