"""zerostep.arguments: DeepSpeed's add_config_arguments."""

from __future__ import annotations

import argparse

import pytest

from zerostep.arguments import add_config_arguments


def test_deepspeed_flags_defaults_and_help():
    parser = argparse.ArgumentParser()
    assert add_config_arguments(parser) is parser
    defaults = parser.parse_args([])
    assert vars(defaults) == dict(
        deepspeed=False, deepspeed_config=None, deepscale=False, deepscale_config=None, deepspeed_mpi=False
    )
    given = parser.parse_args(
        [
            "--deepspeed",
            "--deepspeed_config",
            "ds.json",
            "--deepscale_config",
            "old.json",
            "--deepscale",
            "--deepspeed_mpi",
        ]
    )
    assert (given.deepspeed, given.deepspeed_config, given.deepscale, given.deepscale_config) == (
        True,
        "ds.json",
        True,
        "old.json",
    )
    group = next(g for g in parser._action_groups if g.title == "DeepSpeed")
    assert group.description == "DeepSpeed configurations"
    helps = {a.dest: a.help for a in group._group_actions}
    assert helps["deepspeed_config"] == "DeepSpeed json configuration file."
    assert (
        helps["deepspeed"] == "Enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)"
    )
    assert helps["deepscale_config"] == "Deprecated DeepSpeed json configuration file."


def test_a_script_that_adds_its_own_deepspeed_mpi_keeps_it():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed_mpi", type=int, default=3)
    add_config_arguments(parser)
    assert parser.parse_args([]).deepspeed_mpi == 3
    with pytest.raises(argparse.ArgumentError):  # the core flags conflict, as with DeepSpeed
        add_config_arguments(parser)
