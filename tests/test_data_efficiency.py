"""data_efficiency: random-LTD's config, schedule (hand-computed values), layer wrapper, and training with
it on the functional API and the facade; data_sampling's own tests are in test_data_sampling.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zerostep
from zerostep.core import Config, ConfigError, initialize
from zerostep.core.config import ConfigWarning
from zerostep.core.random_ltd import Router, consumed_layer_tokens, kept_token_indices, reserved_length
from zerostep.runtime.data_pipeline.data_routing.basic_layer import RandomLayerTokenDrop
from zerostep.runtime.data_pipeline.data_routing.helper import convert_to_random_ltd, save_without_random_ltd


def ltd_block(low=4, high=16, steps=6, per_step=4, **extra) -> dict:
    block = {
        "enabled": True,
        "total_layer_num": 3,
        "random_ltd_layer_num": 2,
        "random_ltd_layer_id": [1, 2],
        "model_mask_name": "attention_mask",
        "model_type": "decoder",
        "hidden_state_order": "batch_seq_dim",
        "random_ltd_schedule": {
            "min_value": low,
            "max_value": high,
            "schedule_type": "fixed_linear",
            "schedule_config": {"require_steps": steps, "seq_per_step": per_step},
        },
        "layer_token_lr_schedule": {"enabled": False, "total_layer_tokens": 10**9, "warmup_type": "linear"},
    }
    block.update(extra)
    return block


def cfg(ltd: dict | None = None, **extra) -> dict:
    d = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    if ltd is not None:
        d["data_efficiency"] = {"enabled": True, "data_routing": {"enabled": True, "random_ltd": ltd}}
    d.update(extra)
    return d


def parse(ltd: dict, **extra) -> Config:
    return Config.from_dict(cfg(ltd, **extra), world_size=1)


def test_config_keys_defaults_and_round_trip():
    c = parse(ltd_block())
    ltd = c.data_efficiency.data_routing.random_ltd
    assert ltd.random_ltd_layer_id == (1, 2) and ltd.model_mask_name == "attention_mask"
    assert ltd.random_ltd_schedule.schedule_config.seq_per_step == 4 and c.data_efficiency.seed == 1234
    assert Config.from_dict(c.to_dict(), world_size=1) == c
    off = Config.from_dict(cfg(), world_size=1)
    assert not off.data_efficiency.data_routing.random_ltd.enabled
    assert Config.from_dict(off.to_dict(), world_size=1) == off
    with pytest.warns(ConfigWarning, match="random-LTD runs, as in DeepSpeed"):
        Config.from_dict(cfg(data_efficiency={"data_routing": {"random_ltd": ltd_block()}}), world_size=1)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"random_ltd_layer_num": 3}, "must equal the length of random_ltd_layer_id"),
        ({"random_ltd_layer_id": [1, 3]}, "must be < total_layer_num"),
        ({"model_type": "seq2seq"}, "must be one of decoder, encoder"),
        ({"hidden_state_order": "bsh"}, "batch_seq_dim, seq_batch_dim"),
        ({"model_type": "encoder", "model_mask_name": None}, "name the layer's mask argument"),
        ({"layer_token_lr_schedule": {"enabled": True}}, "not implemented"),
        ({"random_ltd_layer_idx": [1]}, "did you mean 'random_ltd_layer_id'"),
    ],
)
def test_bad_random_ltd_keys(change, needle):
    with pytest.raises(ConfigError, match=needle):
        parse(ltd_block(**change))


def test_bad_schedules_and_missing_keys_and_data_sampling():
    with pytest.raises(ConfigError, match="must be >= schedule_config.seq_per_step"):
        parse(ltd_block(low=2, per_step=4))
    with pytest.raises(ConfigError, match="max_value"):
        parse(ltd_block(low=8, high=4))
    bad = ltd_block()
    bad["random_ltd_schedule"]["schedule_type"] = "fixed_root"
    with pytest.raises(ConfigError, match='must be "fixed_linear"'):
        parse(bad)
    missing = ltd_block()
    del missing["hidden_state_order"]
    with pytest.raises(ConfigError, match="hidden_state_order = null: is required"):
        parse(missing)
    sampling = {"enabled": True, "data_sampling": {"curriculum_learning": {"enabled": True}}}
    with pytest.raises(ConfigError, match="data_cluster_path = null: is required"):
        Config.from_dict(cfg(data_efficiency=sampling))  # the curriculum: tests/test_data_sampling.py
    off = {"data_sampling": {"enabled": False, "num_workers": 2}}
    assert not Config.from_dict(cfg(data_efficiency=off)).data_efficiency.enabled


def test_schedule_and_consumed_tokens_against_hand_computed_values():
    s = parse(ltd_block()).data_efficiency.data_routing.random_ltd
    # floor(t / 6 * 12 + 4) rounded down to a multiple of 4, capped at 16
    assert [reserved_length(s.random_ltd_schedule, t) for t in range(8)] == [4, 4, 8, 8, 12, 12, 16, 16]
    # max_value not a multiple of seq_per_step: 8 at the ramp's end, max_value once the rounding passes it
    odd = parse(ltd_block(high=10, steps=4)).data_efficiency.data_routing.random_ltd.random_ltd_schedule
    assert [reserved_length(odd, t) for t in range(7)] == [4, 4, 4, 8, 8, 8, 10]
    # batch 2 * (kept * 2 dropping layers + 16 * 1 full layer) per step
    assert consumed_layer_tokens(s, 3, 2) == 2 * ((4 + 4 + 8) * 2 + 16 * 3) == 160
    assert consumed_layer_tokens(s, 10, 2) == 2 * (112 * 2 + 16 * 10) == 768
    assert consumed_layer_tokens(s, 0, 2) == 0


class Attend(nn.Module):
    """A toy attention layer: mixes tokens through the mask, so a wrong mask or order shows."""

    def __init__(self, width=8):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.seen: list[tuple[int, torch.Tensor | None]] = []

    def forward(self, h, attention_mask=None):
        self.seen.append((h.shape[1], attention_mask))
        scores = h @ h.transpose(-1, -2) / h.shape[-1] ** 0.5
        if attention_mask is not None:
            scores = scores + attention_mask[:, 0].to(scores.dtype)
        return h + torch.tanh(self.proj(scores.softmax(-1) @ h))


def bound(layer, ltd: dict, keep: int) -> RandomLayerTokenDrop:
    wrapper = RandomLayerTokenDrop(layer)
    router = Router(parse(ltd).data_efficiency.data_routing.random_ltd)
    router.reserved = keep
    wrapper.init_config(router, 0)
    return wrapper


def test_layer_keeps_a_sorted_subset_and_passes_the_rest():
    torch.manual_seed(0)
    layer = Attend()
    h = torch.randn(3, 10, 8, requires_grad=True)
    causal = torch.full((10, 10), -1e9).triu(1).expand(3, 1, 10, 10)
    wrapper = bound(layer, ltd_block(), keep=4)
    torch.manual_seed(5)
    out = wrapper(h, attention_mask=causal)
    torch.manual_seed(5)
    idx = kept_token_indices(4, 10, 3, h.device)
    assert (idx.diff(dim=1) > 0).all()
    part = torch.stack([h[b, idx[b]] for b in range(3)])
    want = Attend.forward(layer, part, attention_mask=causal[..., :4, :4])
    dropped = torch.ones(3, 10, dtype=torch.bool)
    for b in range(3):
        dropped[b, idx[b]] = False
        torch.testing.assert_close(out[b, idx[b]], want[b])
    assert torch.equal(out[dropped], h[dropped])
    assert layer.seen[0][0] == 4 and torch.equal(layer.seen[0][1], causal[..., :4, :4])
    out.sum().backward()
    assert torch.equal(h.grad[dropped], torch.ones_like(h.grad[dropped]))  # identity for dropped tokens
    wrapper.eval()  # no drop outside training
    assert layer.seen.clear() is None and wrapper(h, attention_mask=causal).shape == h.shape
    assert layer.seen[0][0] == 10


def test_layer_seq_batch_order_and_encoder_mask():
    torch.manual_seed(0)
    seen = []

    class Rows(nn.Module):  # (seq, batch, width) in, records the mask
        def forward(self, h, attention_mask=None):
            seen.append(attention_mask)
            return h * 2

    mask = torch.randn(2, 1, 6, 6)
    wrapper = bound(Rows(), ltd_block(hidden_state_order="seq_batch_dim", model_type="encoder"), keep=3)
    h = torch.randn(6, 2, 4)
    torch.manual_seed(1)
    out = wrapper(h, attention_mask=mask)
    torch.manual_seed(1)
    idx = kept_token_indices(3, 6, 2, h.device)
    for b in range(2):
        kept = idx[b]
        torch.testing.assert_close(out[kept, b], 2 * h[kept, b])
        rest = [i for i in range(6) if i not in kept.tolist()]
        assert torch.equal(out[rest, b], h[rest, b])
        assert torch.equal(seen[0][b, 0], mask[b, 0][kept][:, kept])
    with pytest.raises(TypeError, match="without that keyword argument"):
        wrapper(h)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attend = Attend()

    def forward(self, h, attention_mask=None):
        return self.attend(h, attention_mask=attention_mask)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 16)

    def forward(self, ids):
        mask = torch.full((ids.shape[1], ids.shape[1]), -1e9).triu(1)[None, None]
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h, attention_mask=mask)
        return self.head(h)


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))


def widths(model) -> list[list[int]]:
    out = [[w for w, _ in b.random_ltd_layer.attend.seen] for b in model.blocks]
    for b in model.blocks:
        b.random_ltd_layer.attend.seen.clear()
    return out


def test_engine_trains_with_random_ltd_functional():
    model = convert_to_random_ltd(TinyLM(), Block)
    assert all(isinstance(b, RandomLayerTokenDrop) for b in model.blocks)
    engine = initialize(model, cfg(ltd_block()), loss_fn=lm_loss, compile=False)
    state = engine.init(seed=0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 16, (2, 11), generator=gen) for _ in range(6)]
    losses = []
    for ids in batches:
        state = engine.step(state, ids)
        losses.append(float(state.metrics.loss))
    want = [min(reserved_length(engine.random_ltd.config.random_ltd_schedule, t), 10) for t in range(6)]
    assert want == [4, 4, 8, 8, 10, 10]  # 10 tokens: counts of 12 and 16 keep every token
    seen = widths(model)
    assert seen[0] == [10] * 6 and seen[1] == seen[2] == want  # layer 0 is converted but not listed
    assert all(torch.isfinite(torch.tensor(losses)))
    # equal states give equal steps (the tokens come from the state's seed and step)
    twin = initialize(
        convert_to_random_ltd(TinyLM(), Block), cfg(ltd_block()), loss_fn=lm_loss, compile=False
    )
    again = twin.init(seed=0)
    for ids in batches[:2]:
        again = twin.step(again, ids)
    assert float(again.metrics.loss) == losses[1]
    keys = save_without_random_ltd(model).keys()
    assert "blocks.1.attend.proj.weight" in keys and not any("random_ltd_layer" in k for k in keys)
    plain = initialize(TinyLM(), cfg(ltd_block()), loss_fn=lm_loss, compile=False)
    with pytest.raises(ValueError, match="no converted layer"):
        plain.step(plain.init(seed=0), batches[0])


def test_facade_random_ltd_converted_after_initialize():
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = cfg(ltd_block(low=4, high=8, steps=2))
        engine, *_ = zerostep.initialize(model=model, config=config, compile=False)
    names = [n for n, _ in model.named_parameters()]
    assert engine.random_ltd_scheduler.get_current_seq() == 4  # min_value before the first step
    assert convert_to_random_ltd(engine, Block) is engine  # DeepSpeed's order: after initialize
    assert [n for n, _ in model.named_parameters()] == names  # converted in place, names kept
    gen = torch.Generator().manual_seed(2)
    current = []
    for _ in range(3):
        ids = torch.randint(0, 16, (2, 11), generator=gen)
        logits = engine(ids[:, :-1])
        current.append(engine.random_ltd_scheduler.get_current_seq())  # this step's, as in DeepSpeed
        engine.backward(F.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1)))
        engine.step()
    seen = [[w for w, _ in b.attend.seen] for b in model.blocks]
    assert seen[0] == [10] * 3 and seen[1] == seen[2] == current == [4, 4, 8]  # floor(t / 2 * 4 + 4)
    scheduler = engine.random_ltd_scheduler
    assert engine.random_ltd_enabled() and scheduler.get_current_seq() == 8
    assert scheduler.state_dict()["consumed_layer_tokens"] == 2 * ((4 + 4 + 8) * 2 + 8 * 3)
    assert scheduler.get_total_layer_tokens(3) == 2 * ((4 + 4 + 8) * 2 + 8 * 3)
    engine.eval()
    model.blocks[1].attend.seen.clear()
    engine(torch.zeros(2, 10, dtype=torch.long))
    assert model.blocks[1].attend.seen[0][0] == 10  # no drop outside training
