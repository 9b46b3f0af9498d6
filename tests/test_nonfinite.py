"""The strict non-finite policy (``check_finite="strict"``): a training batch with NaN/Inf is
rejected before any state (or the global RNG) changes (the default policy, which skips such a
batch without a host sync, is tested in test_no_sync.py); masked non-finite rows are allowed and stay out of every statistic and
the loss; eval and check_finite=False give such rows index -1; a codebook that became
non-finite is reported with its rows."""
import pytest
import torch

import vqkernels
from conftest import backend_cases
from helpers import assert_states_bitwise_equal, bitwise_equal, randn, snapshot
from vqkernels import Quantizer
from vqkernels import diagnostics as dg

ALL = backend_cases()
QUANTIZER_CONFIGS = {
    "ema": dict(init="kmeans", kmeans_iters=2),
    "ema-dead-codes": dict(init="random", dead_code_threshold=5.0),
    "gradient": dict(learning="gradient", gradient="rotation"),
    "deferred-continuous": dict(deferred_steps=5, reservoir_size=32),
    "not-yet-initialised": dict(init="kmeans"),  # the bad batch is the first: k-means must not see it
}


@pytest.mark.parametrize("config", list(QUANTIZER_CONFIGS))
def test_training_rejects_a_nonfinite_batch_before_touching_state(config):
    torch.manual_seed(0)
    vq = Quantizer(4, 8, check_finite="strict", **QUANTIZER_CONFIGS[config])
    good = randn(24, 4, seed=32)
    if config != "not-yet-initialised":
        vq(good)
    before, rng = snapshot(vq), torch.get_rng_state()
    bad = good.clone()
    bad[5, 1] = float("nan")
    bad[9] = float("inf")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(rows \[5, 9\]\)"):
        vq(bad)
    assert_states_bitwise_equal(before, snapshot(vq), f"{config}: state after a rejected batch")
    assert torch.equal(rng, torch.get_rng_state()), "a rejected batch must not consume random numbers"
    # masked non-finite rows are allowed: they are not used, and come out unchanged
    keep = torch.isfinite(bad).all(1)
    q, idx, loss = vq(bad, mask=keep)
    assert bool((idx[~keep] == -1).all()) and bitwise_equal(q[~keep], bad[~keep])
    for name, t in vq.state_dict().items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{config}: {name} poisoned by a masked NaN row"
    vq(good)  # and training carries on


@pytest.mark.parametrize("config", ["ema", "gradient"])
def test_masked_nonfinite_rows_stay_out_of_the_loss(config):
    torch.manual_seed(0)
    vq = Quantizer(4, 8, **QUANTIZER_CONFIGS[config])
    x = randn(24, 4, seed=32)
    vq(x)
    x[5, 1] = float("nan")
    keep = torch.ones(24, dtype=torch.bool)
    keep[5] = False
    _, _, loss = vq(x, mask=keep, return_loss_breakdown=False)
    assert torch.isfinite(loss), f"loss {float(loss)} from a masked NaN row"


@pytest.mark.parametrize("batch", ["empty", "fully-masked"])
def test_a_batch_without_kept_rows_never_poisons_the_codebook_even_with_decay_0(batch):
    torch.manual_seed(0)
    vq = Quantizer(4, 6, decay=0.0)
    vq(randn(12, 4, seed=37))
    if batch == "empty":
        vq(torch.zeros(0, 4))
    else:
        vq(randn(12, 4, seed=38), mask=torch.zeros(12, dtype=torch.bool))
    assert torch.isfinite(vq.codebook).all(), f"codebook after an {batch} batch: {vq.codebook}"


@pytest.mark.parametrize("backend,device", ALL)
def test_nonfinite_rows_in_eval_and_unchecked_training_get_minus_one(backend, device):
    torch.manual_seed(0)
    vq = Quantizer(4, 6, backend=backend).to(device)
    x = randn(10, 4, seed=33, device=device)
    x[2, 0] = float("nan")
    x[7, 3] = float("-inf")
    vq.eval()  # eval never raises: non-finite rows follow assign's policy and pass through
    before = snapshot(vq)
    q, idx, loss = vq(x)
    assert idx[[2, 7]].tolist() == [-1, -1] and bool((idx[[0, 1, 3, 4, 5, 6, 8, 9]] >= 0).all())
    assert bitwise_equal(q[[2, 7]], x[[2, 7]]) and float(loss) == 0.0
    assert_states_bitwise_equal(before, snapshot(vq), "eval")
    unchecked = Quantizer(4, 6, check_finite=False, backend=backend).to(device)
    q, idx, _ = unchecked(x)
    assert idx[[2, 7]].tolist() == [-1, -1]
    for name, t in unchecked.state_dict().items():  # -1 rows stay out of the EMA statistics
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_a_codebook_that_became_nonfinite_is_reported_with_its_codes(backend, device, learning):
    torch.manual_seed(0)
    vq = Quantizer(4, 8, learning=learning, backend=backend, check_finite="strict").to(device)
    x = randn(16, 4, seed=34, device=device)
    vq(x)
    with torch.no_grad():  # e.g. an fp16 overflow or a diverged optimiser step
        vq.embed[2, 1] = float("nan")
        vq.embed[5] = float("inf")
    before = snapshot(vq)
    with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(rows \[2, 5\]\)"):
        vq(x)
    assert_states_bitwise_equal(before, snapshot(vq), "state after the codebook check failed")
    with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(rows \[2, 5\]\)"):
        dg.coverage(x, vq.codebook.detach(), backend=backend)
    with pytest.raises(ValueError, match=r"codebook contains NaN or Inf \(rows \[2, 5\]\)"):
        vqkernels.assign(x, vq.codebook.detach(), backend=backend)
