"""The server's parts without a scheduler: rank buckets, slot writes against the float64 formula and ``mixed_delta``,
the pool's LRU eviction and pinning, buckets growing and shrinking as adapters come and go."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

from nora_peft.kernels.mixed import mixed_delta, rank_bucket, stack_adapters
from nora_peft.serve.errors import AdapterError
from nora_peft.serve.layers import MultiAdapterLinear, SlotStacks
from nora_peft.serve.pool import AdapterPool
from nora_peft.tuner.ops import nora_delta_reference

D64 = torch.float64
K, D = 12, 10


@dataclass
class Adapter:
    """What the pool needs of a read checkpoint: a name, an activation and per-module ``(W_up, W_down, scaling)``."""

    name: str
    activation: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(up.shape[0] for up, _, _ in self.modules.values())


def _weights(r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, K, generator=g, dtype=D64), torch.randn(D, r, generator=g, dtype=D64)


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(K, D, dtype=D64)
        self.b = nn.Linear(D, K, dtype=D64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_rank_bucket():
    assert [rank_bucket(r) for r in (1, 2, 8, 9, 16, 17, 64, 200, 256)] == [8, 8, 8, 16, 16, 32, 64, 256, 256]
    with pytest.raises(ValueError, match=">= 1"):
        rank_bucket(0)


def test_layer_equals_formula_per_row_with_mixed_ranks_and_base_rows():
    """Rows on r=2 silu, r=8 relu, r=200 gelu (three buckets... two: 8 and 256) and the base, in one forward."""
    stacks = SlotStacks()
    layer = stacks.wrap(nn.Linear(K, D, dtype=D64))
    specs = {0: (2, "silu", 0.5), 1: (8, "relu", 2.0), 2: (200, "gelu", 0.1)}
    weights = {}
    for slot, (r, act, s) in specs.items():
        stacks.assign(slot, r, act)
        weights[slot] = _weights(r, seed=slot)
        layer.set_slot(slot, *weights[slot], s)
    assert sorted(layer.up) == [8, 256] and stacks.sizes == {8: 2, 256: 1}
    x = torch.randn(5, 3, K, dtype=D64)
    rows = [2, -1, 0, 1, 0]
    mapping = stacks.mapping(rows)
    assert mapping.buckets == (256, 8)  # in order of first appearance; the base row is in no segment
    with stacks.use(mapping):
        out = layer(x)
    assert stacks.current is None  # the mapping is set for the block only
    for b, slot in enumerate(rows):
        want = layer.base(x[b])
        if slot >= 0:
            r, act, s = specs[slot]
            want = want + nora_delta_reference(x[b], *weights[slot], s, act)
        torch.testing.assert_close(out[b], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[1], layer.base(x[1]))  # exactly untouched


def test_one_slot_write_equals_mixed_delta_and_shared_slot_path():
    """A slot written by the layer gives what stack_adapters + mixed_delta give (gathered and one-adapter paths)."""
    stacks = SlotStacks()
    layer = stacks.wrap(nn.Linear(K, D, dtype=D64))
    adapters = [("p", *_weights(3, 7), 1.5, "tanh"), ("q", *_weights(6, 8), 0.25, "identity")]
    for slot, (_, up, down, s, act) in enumerate(adapters):
        stacks.assign(slot, up.shape[0], act)
        layer.set_slot(slot, up, down, s)
    stacked = stack_adapters(adapters)
    x = torch.randn(4, K, dtype=D64)
    for rows in ([0, 1, 1, 0], [1, 1, 1, 1]):  # mixed (gather) and shared (two matmuls)
        with stacks.use(stacks.mapping(rows)):
            got = layer(x) - layer.base(x)
        want = mixed_delta(x, stacked, torch.tensor(rows))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert stacks.mapping([1, 1, 1, 1]).segments[0].slot is not None  # really the shared-slot path


def test_buckets_grow_reuse_and_shrink():
    stacks = SlotStacks()
    layer = stacks.wrap(nn.Linear(K, D, dtype=D64))
    for slot, r in enumerate([8, 4, 256]):
        stacks.assign(slot, r, "silu")
        layer.set_slot(slot, *_weights(r, slot), 1.0)
    small = stacks.nbytes()
    assert stacks.sizes == {8: 2, 256: 1} and stacks.r_max == 256
    stacks.release(2)  # the large adapter leaves: its bucket and its memory go
    assert stacks.sizes == {8: 2} and 256 not in layer.up and stacks.r_max == 8
    assert stacks.nbytes() < small / 10
    stacks.release(0)  # a hole at position 0: kept (slot 1 sits behind it), then reused
    assert stacks.sizes == {8: 2} and torch.count_nonzero(layer.up[8][0]) == 0
    stacks.assign(5, 2, "relu")
    assert stacks.where[5] == (8, 0) and stacks.sizes == {8: 2}
    stacks.release(1)  # trailing position freed: the bucket shrinks
    assert stacks.sizes == {8: 1}
    stacks.assign(5, 30, "relu")  # the same slot with a larger rank moves to its bucket
    assert stacks.where[5] == (32, 0) and stacks.sizes == {32: 1}
    late = stacks.wrap(nn.Linear(K, D, dtype=D64))  # a layer wrapped later gets the current buckets, zeroed
    assert late.up[32].shape == (1, 32, K) and torch.count_nonzero(late.up[32]) == 0


def _adapter(name: str, r: int, seed: int) -> Adapter:
    up, down = _weights(r, seed)
    g = torch.Generator().manual_seed(100 + seed)
    up_b, down_b = torch.randn(r, D, generator=g, dtype=D64), torch.randn(K, r, generator=g, dtype=D64)
    return Adapter(name, "silu", {"a": (up, down, 1.0), "b": (up_b, down_b, 0.5)})


def test_pool_lru_eviction_pinning_and_rank_release():
    model = TwoLinears()
    pool = AdapterPool(model, capacity=2)
    x = torch.randn(1, K, dtype=D64)
    with torch.no_grad():
        base_out = model(x)
    pool.add(_adapter("one", 4, 1))
    pool.add(_adapter("two", 256, 2))
    assert isinstance(model.a, MultiAdapterLinear) and pool.stacks.sizes == {8: 1, 256: 1}
    pool.slot_of("one")  # "one" is now the most recently used: "two" goes first
    pool.add(_adapter("three", 8, 3))
    assert list(pool.slots) == ["one", "three"] and pool.evictions == 1
    assert pool.stacks.sizes == {8: 2}  # the r=256 padding left with the adapter
    with pytest.raises(AdapterError) as err:  # every slot pinned by running rows: 503, nothing evicted
        pool.add(_adapter("four", 8, 4), pinned={"one", "three"})
    assert err.value.status == 503 and list(pool.slots) == ["one", "three"]
    slot = pool.slots["three"]
    with torch.no_grad(), pool.stacks.use(pool.stacks.mapping([slot])):
        got = model(x)
    adapter = _adapter("three", 8, 3)
    h = model.a.base(x) + nora_delta_reference(x, *adapter.modules["a"][:2], 1.0, "silu")
    want = model.b.base(h) + nora_delta_reference(h, *adapter.modules["b"][:2], 0.5, "silu")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    pool.remove("one")
    pool.remove("three")
    assert pool.stacks.sizes == {} and pool.stacks.nbytes() == 0
    with torch.no_grad(), pool.stacks.use(pool.stacks.mapping([-1])):
        assert torch.equal(model(x), base_out)
