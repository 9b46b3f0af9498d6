"""A training step with no device-to-host synchronisation (issue #14, item 3).

In the default training configuration (EMA, dead-code restarts, a mask, ``check_finite`` on)
a forward + backward must call nothing that waits for the device. On CPU the test counts,
under a ``TorchDispatchMode``, the aten ops that read device data back to the host. The mode
also looks inside vqkernels' custom ops (it runs their Python implementation under itself),
where the ops' own value checks used to sync. The first training call initialises the
codebook (k-means or random rows: a one-off host sync, checked strictly) and is not counted.

The non-finite policy keeps its promise without a sync: a batch with a non-finite kept row
leaves the codes, statistics and dead codes exactly as they were and is counted in
``nonfinite_batches``; ``check_finite="strict"`` raises at once.
"""
import collections
import traceback

import pytest
import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_states_bitwise_equal
from helpers import snapshot as _snapshot
from vqkernels import Quantizer

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.item.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.equal.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}


class SyncCounter(TorchDispatchMode):
    """Counts host-syncing aten ops (and boolean-mask indexing, whose output shape depends on
    the data), with a short stack of where each came from."""

    def __init__(self):
        super().__init__()
        self.hits = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if func in SYNCING or bool_index:
            self.hits[(str(func), "".join(traceback.format_stack(limit=6)[:-1]))] += 1
        opdef = custom_ops.OPDEFS.get(func._schema.name) if func.namespace == "vqkernels" else None
        if opdef is not None and opdef._init_fn is not None:
            with self:  # see the ops the custom op's implementation calls
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)

    def report(self) -> str:
        return "\n".join(f"{n}x {name} at\n{where}" for (name, where), n in self.hits.items())


def snapshot(vq):
    """The state without ``steps``, which counts every training call, skipped ones too."""
    state = _snapshot(vq)
    state.pop("steps")
    return state


def _count_syncs(step, calls=2):
    counter = SyncCounter()
    with counter:
        for _ in range(calls):
            step()
    return counter


def _batch(seed, n=96, dim=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n // 2, dim, generator=g)
    mask = torch.rand(2, n // 2, generator=g) > 0.25
    return x, mask


CONFIGS = {
    "default-ema-restarts": dict(init="kmeans", kmeans_iters=2, dead_code_threshold=2.0),
    "random-init-projection": dict(init="random", dead_code_threshold=1.0, codebook_dim=8),
    "cosine-rotation": dict(metric="cosine", gradient="rotation", dead_code_threshold=1.0),
    "separate-heads": dict(heads=2, separate_codebook_per_head=True, codebook_dim=8, dead_code_threshold=1.0),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_step_makes_no_host_sync(config):
    torch.manual_seed(0)
    vq = Quantizer(16, 24, **CONFIGS[config])
    x, mask = _batch(1)
    x.requires_grad_(True)
    vq(x, mask).loss.backward()  # the first call initialises: not counted

    def step():
        out = vq(x, mask)
        (out.loss + out.quantized.square().mean()).backward()

    counter = _count_syncs(step)
    assert not counter.hits, f"{config}: host syncs in a training step:\n{counter.report()}"
    assert int(vq.steps) == 3


def test_the_counter_sees_syncs_inside_custom_ops():
    """The test above can fail: the strict policy syncs, inside the assign op (the codebook
    check) as well as in the module."""
    torch.manual_seed(0)
    vq = Quantizer(16, 24, check_finite="strict")
    x, _ = _batch(2)
    counter = _count_syncs(lambda: vq(x), calls=1)
    where = counter.report()
    assert "quantizer.py" in where and "assign" in where, where


def _skip_config():
    return dict(init="random", dead_code_threshold=3.0, reset_cluster_size=0.5, decay=0.5)  # dead codes at every step


@pytest.mark.parametrize("poison", ["nan-row", "inf-row", "nan-code"])
def test_a_nonfinite_batch_is_skipped_without_touching_the_codebook(poison):
    torch.manual_seed(0)
    vq = Quantizer(16, 24, **_skip_config())
    x, mask = _batch(3)
    vq(x, mask)
    before = snapshot(vq)
    bad = x.clone()
    if poison == "nan-row":
        bad[0, 3, 5] = float("nan")
        mask = mask.clone()
        mask[0, 3] = True
    elif poison == "inf-row":
        bad[1, 7] = float("inf")
        mask = None
    else:
        with torch.no_grad():
            vq.embed[4, 0] = float("nan")
        before = snapshot(vq)
    counter = SyncCounter()
    with counter:
        q, idx, loss = vq(bad, mask)
    assert not counter.hits, counter.report()
    assert_states_bitwise_equal(before, snapshot(vq), f"{poison}: state after a skipped batch")
    assert int(vq.nonfinite_batches) == 1
    if poison != "nan-code":
        assert not torch.isfinite(loss), "the loss shows the bad batch"
        vq(x)  # and training carries on from the untouched state
        assert int(vq.nonfinite_batches) == 1
        assert all(torch.isfinite(t).all() for t in vq.state_dict().values() if t.is_floating_point())


def test_masked_nonfinite_rows_do_not_skip_the_step():
    torch.manual_seed(0)
    vq = Quantizer(16, 24, **_skip_config())
    x, mask = _batch(4)
    vq(x, mask)
    before = vq.embed.clone()
    bad = x.clone()
    bad[~mask] = float("nan")
    vq(bad, mask)
    assert int(vq.nonfinite_batches) == 0 and not torch.equal(before, vq.embed), "a masked NaN row is fine"


def test_a_skipped_accumulated_batch_adds_nothing_to_the_pending_sum():
    torch.manual_seed(0)
    a, b = (Quantizer(16, 24, **_skip_config()) for _ in range(2))
    b.load_state_dict(a.state_dict())
    x, mask = _batch(5)
    for vq in (a, b):
        torch.manual_seed(0)  # the same random init rows
        vq(x, mask)
    bad = x.clone()
    bad[0, 0] = float("nan")
    a(bad, accum_ema_update=True)  # skipped: a holds a zero pending sum
    torch.manual_seed(1)
    a(x, mask)
    torch.manual_seed(1)
    b(x, mask)
    assert_states_bitwise_equal(snapshot(b), snapshot(a), "after a skipped accumulated batch")
    assert int(a.nonfinite_batches) == 1


def test_deferred_continuous_phase_skips_a_nonfinite_batch():
    vq = Quantizer(16, 8, deferred_steps=10, reservoir_size=16)
    x, _ = _batch(6)
    vq(x)
    bad = x.clone()
    bad[1, 2, 0] = float("inf")
    before = snapshot(vq)
    counter = SyncCounter()
    with counter:
        vq(bad)
    assert not counter.hits, counter.report()
    assert torch.equal(before["reservoir"], vq.reservoir) and torch.equal(before["reservoir_seen"], vq.reservoir_seen)
    assert int(vq.nonfinite_batches) == 1


def test_strict_mode_raises_at_once_and_false_is_accepted():
    vq = Quantizer(16, 24, check_finite="strict")
    x, _ = _batch(7)
    vq(x)
    bad = x.clone()
    bad[0, 2, 0] = float("nan")
    before = snapshot(vq)
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(rows \[2\]\)"):
        vq(bad)
    assert_states_bitwise_equal(before, snapshot(vq), "strict")
    Quantizer(16, 24, check_finite=False)(bad)
    with pytest.raises(ValueError, match="check_finite must be True, False or 'strict'"):
        Quantizer(16, 24, check_finite="skip")
