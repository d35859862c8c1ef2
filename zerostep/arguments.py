"""DeepSpeed's command-line arguments: ``add_config_arguments(parser)``.

The same group, flags, defaults and help as DeepSpeed 0.19's ``deepspeed.add_config_arguments``:
``--deepspeed`` and ``--deepspeed_config``, and the deprecated ``--deepscale`` / ``--deepscale_config``.
``--deepspeed`` is only a flag for the script itself; ``--deepspeed_config`` is what ``initialize(args=)``
reads (``zerostep.runtime.config_sources``).

``--deepspeed_mpi`` (DeepSpeed until 0.13; 0.19 dropped it) is added too, unless the parser already has
it, so older launch command lines still parse; MPI launches are discovered from the environment with or
without it (``zerostep.comm.launcher_env``).
"""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's argument group to ``parser`` and return it."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument(
        "--deepspeed",
        default=False,
        action="store_true",
        help="Enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)",
    )
    group.add_argument(
        "--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file."
    )
    group.add_argument(
        "--deepscale",
        default=False,
        action="store_true",
        help="Deprecated enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)",
    )
    group.add_argument(
        "--deepscale_config", default=None, type=str, help="Deprecated DeepSpeed json configuration file."
    )
    if "--deepspeed_mpi" not in parser._option_string_actions:
        group.add_argument(
            "--deepspeed_mpi",
            default=False,
            action="store_true",
            help="Run via MPI, this will attempt to discover the necessary variables to initialize torch "
            "distributed from the MPI environment",
        )
    return parser
