"""zerostep.runtime.config_sources: the config from args.deepspeed_config, config and config_params."""

from __future__ import annotations

import argparse
import base64
import json
import pathlib

import pytest

from zerostep import ConfigError
from zerostep.core import Config
from zerostep.runtime.config_sources import resolve_config_sources

BASE = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}}


@pytest.fixture
def ds_file(tmp_path) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(BASE))
    return str(path)


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"deepspeed_config": None, **kw})


def test_each_source_alone(ds_file, tmp_path):
    assert resolve_config_sources(args=args(deepspeed_config=ds_file)) == BASE
    assert resolve_config_sources(config=ds_file) == BASE
    assert resolve_config_sources(config=pathlib.Path(ds_file)) == BASE
    assert resolve_config_sources(config=BASE) == BASE and resolve_config_sources(config_params=BASE) == BASE
    assert resolve_config_sources(config_params=ds_file) == BASE
    hjson_file = tmp_path / "ds.hjson"
    hjson_file.write_text("{\n  // DeepSpeed reads hjson\n  train_micro_batch_size_per_gpu: 2,\n}\n")
    assert resolve_config_sources(config=str(hjson_file)) == {"train_micro_batch_size_per_gpu": 2}
    encoded = base64.urlsafe_b64encode(json.dumps(BASE).encode()).decode()
    assert resolve_config_sources(args=args(deepspeed_config=encoded)) == BASE  # the launcher's form
    cfg = Config.from_dict(BASE)
    assert Config.from_dict(resolve_config_sources(config=cfg)) == cfg
    given = dict(BASE)
    resolve_config_sources(config=given, config_params={"steps_per_print": 5})
    assert given == BASE  # the caller's dict is not changed


def test_config_params_merge_into_either_and_conflicts_name_both(ds_file):
    extra = {"zero_optimization": {"overlap_comm": True}, "steps_per_print": 7}
    merged = resolve_config_sources(args=args(deepspeed_config=ds_file), config_params=extra)
    assert merged == {**BASE, "zero_optimization": {"stage": 1, "overlap_comm": True}, "steps_per_print": 7}
    assert resolve_config_sources(config=BASE, config_params=extra) == merged
    same = resolve_config_sources(config=BASE, config_params={"zero_optimization": {"stage": 1}})
    assert same == BASE  # equal values agree
    with pytest.raises(ConfigError) as err:
        resolve_config_sources(
            args=args(deepspeed_config=ds_file), config_params={"zero_optimization": {"stage": 3}}
        )
    message = str(err.value)
    assert "zero_optimization.stage" in message and "1" in message and "3" in message
    assert f"args.deepspeed_config (file {ds_file!r})" in message and "config_params" in message
    with pytest.raises(
        ConfigError, match=r"train_micro_batch_size_per_gpu.*config \(a dict\).*config_params"
    ):
        resolve_config_sources(config=BASE, config_params={"train_micro_batch_size_per_gpu": 4})


def test_deepspeed_errors(ds_file):
    with pytest.raises(ConfigError, match="Not sure how to proceed, we were given deepspeed configs in the"):
        resolve_config_sources(args=args(deepspeed_config=ds_file), config=BASE)
    with pytest.raises(ConfigError, match="DeepSpeed requires --deepspeed_config"):
        resolve_config_sources()
    with pytest.raises(ConfigError, match="DeepSpeed requires --deepspeed_config"):
        resolve_config_sources(args=argparse.Namespace(local_rank=0))  # args without the attribute
    with pytest.raises(ConfigError, match="neither an existing config file nor a base64"):
        resolve_config_sources(config="missing.json")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config_sources(config=pathlib.Path("missing.json"))
    with pytest.raises(ConfigError, match="config: int is not a config"):
        resolve_config_sources(config=3)
    with pytest.raises(ConfigError, match="config_params: list is not a config"):
        resolve_config_sources(config=BASE, config_params=["not", "a", "dict"])


def test_deprecated_deepscale_config_moves_to_deepspeed_config(ds_file):
    legacy = args(deepscale_config=ds_file)
    with pytest.warns(FutureWarning, match="deepscale_config is deprecated"):
        assert resolve_config_sources(args=legacy) == BASE
    assert legacy.deepspeed_config == ds_file and legacy.deepscale_config is None  # as DeepSpeed leaves args
    with (
        pytest.warns(FutureWarning),
        pytest.raises(ConfigError, match="both a deepscale_config and deepspeed"),
    ):
        resolve_config_sources(args=args(deepscale_config=ds_file, deepspeed_config=ds_file))


def test_broken_files_are_config_errors_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    with pytest.raises(ConfigError, match="duplicate key 'train_batch_size'"):
        resolve_config_sources(config=str(bad))
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="bad.json"):
        resolve_config_sources(args=args(deepspeed_config=str(bad)))
