"""Residual stacks follow the Quantizer's non-finite policy with no host sync (issue #14, item 3).

A default training step (forward + backward + EMA of every stage, dead-code restarts, a mask,
``check_finite`` on) of ``ResidualQuantizer``, ``GroupedResidualQuantizer`` and
``FactorizedResidualQuantizer`` calls nothing that reads device data back to the host,
counted as in ``test_no_sync.py``. A batch with a non-finite kept row (or a non-finite code of
any stage) leaves every stage's codes, statistics and dead codes bitwise as they were and is
counted in ``nonfinite_batches``; ``check_finite="strict"`` raises at once.
"""
import pytest
import torch

from helpers import assert_states_bitwise_equal
from helpers import snapshot as _snapshot
from test_no_sync import SyncCounter, _batch, _count_syncs
from vqkernels import FactorizedResidualQuantizer, GroupedResidualQuantizer, ResidualQuantizer


def snapshot(module):
    """The state without the ``steps`` counters, which count skipped calls too."""
    return {k: v for k, v in _snapshot(module).items() if not k.endswith("steps")}


MODULES = {
    "residual-kmeans-restarts": lambda: ResidualQuantizer(16, 3, 24, init="kmeans", kmeans_iters=2, dead_code_threshold=2.0),
    "residual-projection-cosine-sizes": lambda: ResidualQuantizer(
        16, 3, (8, 24, 12), codebook_dim=8, metric="cosine", init="random", dead_code_threshold=1.0,
        quantize_dropout=True),
    "residual-shared": lambda: ResidualQuantizer(16, 3, 24, shared_codebook=True, dead_code_threshold=1.0),
    "grouped": lambda: GroupedResidualQuantizer(16, 2, 3, 24, init="random", dead_code_threshold=1.0),
    "grouped-gradient-rotation": lambda: GroupedResidualQuantizer(
        16, 2, 3, 24, codebook_dim=4, learning="gradient", gradient="rotation", metric="cosine"),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_training_step_makes_no_host_sync(name):
    torch.manual_seed(0)
    rq = MODULES[name]()
    x, mask = _batch(1)
    x.requires_grad_(True)
    out = rq(x, mask)  # the first call initialises (a one-off sync): not counted
    (out.quantized.square().mean() + out.losses.sum()).backward()

    def step():
        out = rq(x, mask)
        (out.quantized.square().mean() + out.losses.sum()).backward()

    counter = _count_syncs(step)
    assert not counter.hits, f"{name}: host syncs in a training step:\n{counter.report()}"
    assert int(rq.codebook_state.steps) == 3 and int(rq.nonfinite_batches) == 0


def test_factorized_training_step_makes_no_host_sync():
    torch.manual_seed(0)
    fq = FactorizedResidualQuantizer(16, 3, 24, 4)
    x, _ = _batch(2)
    x.requires_grad_(True)

    def step():
        out = fq(x)
        (out.quantized.square().mean() + out.losses.sum()).backward()

    counter = _count_syncs(step)
    assert not counter.hits, f"host syncs in a training step:\n{counter.report()}"
    assert fq.codebook.grad is not None and torch.isfinite(fq.codebook.grad).all()


def test_the_counter_sees_the_strict_checks():
    """The tests above can fail: the strict policy syncs, in the module (the input) and in
    every stage's assign (the codebook check)."""
    torch.manual_seed(0)
    rq = ResidualQuantizer(16, 3, 24, check_finite="strict")
    x, _ = _batch(3)
    counter = _count_syncs(lambda: rq(x), calls=1)
    where = counter.report()
    assert "residual.py" in where and "assign" in where, where


def _skipping(kind):
    """Dead codes at every step (restarts would touch the codes), EMA that moves a lot."""
    common = dict(init="random", dead_code_threshold=3.0, reset_cluster_size=0.5, decay=0.5)
    if kind == "grouped":
        return GroupedResidualQuantizer(16, 2, 3, 24, **common)
    if kind == "sizes":
        return ResidualQuantizer(16, 3, (8, 24, 12), codebook_dim=8, **common)
    return ResidualQuantizer(16, 3, 24, **common)


@pytest.mark.parametrize("kind", ["plain", "grouped", "sizes"])
@pytest.mark.parametrize("poison", ["nan-row", "inf-row", "nan-code-last-stage"])
def test_a_nonfinite_batch_touches_no_stage(kind, poison):
    torch.manual_seed(0)
    rq = _skipping(kind)
    x, mask = _batch(4)
    rq(x, mask)
    before = snapshot(rq)
    bad = x.clone()
    if poison == "nan-row":
        bad[0, 3, 5] = float("nan")
        mask = mask.clone()
        mask[0, 3] = True
    elif poison == "inf-row":
        bad[1, 7, 0] = float("inf")
        mask = None
    else:  # a code of the last stage (of the last group): only the one sum over all codes sees it
        with torch.no_grad():
            rq.codebook_state.embed[-1, 2, 0] = float("nan")
        before = snapshot(rq)
    counter = SyncCounter()
    with counter:
        out = rq(bad, mask)
    assert not counter.hits, counter.report()
    assert_states_bitwise_equal(before, snapshot(rq), f"{kind}/{poison}: state after a skipped batch")
    assert int(rq.nonfinite_batches) == 1
    if poison != "nan-code-last-stage":
        assert not torch.isfinite(out.losses).all(), "the losses show the bad batch"
        rq(x)  # training carries on from the untouched state
        assert int(rq.nonfinite_batches) == 1
        assert all(torch.isfinite(t).all() for t in rq.state_dict().values() if t.is_floating_point())
        assert not torch.equal(before["codebook_state.embed"], rq.codebook_state.embed)


def test_masked_nonfinite_rows_do_not_skip_the_step():
    torch.manual_seed(0)
    rq = _skipping("plain")
    x, mask = _batch(5)
    rq(x, mask)
    before = rq.codebook_state.embed.clone()
    bad = x.clone()
    bad[~mask] = float("nan")
    out = rq(bad, mask)
    assert int(rq.nonfinite_batches) == 0 and not torch.equal(before, rq.codebook_state.embed), "a masked NaN row is fine"
    assert torch.isfinite(out.losses).all()


def test_deferred_continuous_phase_skips_a_nonfinite_batch():
    rq = ResidualQuantizer(16, 2, 8, deferred_steps=10, reservoir_size=16)
    x, _ = _batch(6)
    rq(x)
    bad = x.clone()
    bad[1, 2, 0] = float("inf")
    before = snapshot(rq)
    counter = SyncCounter()
    with counter:
        rq(bad)
    assert not counter.hits, counter.report()
    assert_states_bitwise_equal(before, snapshot(rq), "the reservoir after a skipped batch")
    assert int(rq.nonfinite_batches) == 1


def test_strict_mode_raises_at_once_and_bad_values_are_refused():
    rq = ResidualQuantizer(16, 3, 24, check_finite="strict")
    x, _ = _batch(7)
    rq(x)
    bad = x.clone()
    bad[0, 2, 0] = float("nan")
    before = snapshot(rq)
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(rows \[2\]\)"):
        rq(bad)
    assert_states_bitwise_equal(before, snapshot(rq), "strict")
    ResidualQuantizer(16, 3, 24, check_finite=False)(bad)
    with pytest.raises(ValueError, match="check_finite must be True, False or 'strict'"):
        GroupedResidualQuantizer(16, 2, 3, 24, check_finite="skip")
