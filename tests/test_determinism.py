"""Determinism: a training run with deterministic=True is bitwise reproducible on every
backend, and deterministic statistics do not depend on the thread count."""
import pytest
import torch
import torch.nn.functional as F

import vqkernels
from conftest import backend_cases, interpreted
from helpers import assert_states_bitwise_equal, bitwise_equal, gen, randn, snapshot
from vqkernels import Quantizer

ALL = backend_cases()


@pytest.fixture
def deterministic_algorithms(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it under deterministic algorithms
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


TRAINING_CONFIGS = {
    "ema-kmeans-dead-codes": dict(init="kmeans", kmeans_iters=2, dead_code_threshold=1.0),
    "deferred": dict(deferred_steps=2, reservoir_size=48, dead_code_threshold=1.0),
    "gradient-rotation": dict(learning="gradient", gradient="rotation", init="random"),
}


def _training_run(backend, device, config, steps=5):
    """A small tokenizer step loop: encoder -> Quantizer -> decoder, masks, Adam."""
    torch.manual_seed(0)
    small = interpreted(backend, device)
    rows, K = (24, 6) if small else (64, 12)
    encoder, decoder = torch.nn.Linear(6, 4).to(device), torch.nn.Linear(4, 6).to(device)
    vq = Quantizer(4, K, deterministic=True, decay=0.8, backend=backend, **TRAINING_CONFIGS[config]).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters(), *vq.parameters()], lr=1e-2)
    record = []
    for step in range(steps):
        g = gen(100 + step)
        x = torch.randn(rows, 6, generator=g).to(device)
        mask = (torch.rand(rows, generator=g) > 0.2).to(device)
        z = encoder(x)
        q, idx, loss = vq(z, mask=mask)
        total = F.mse_loss(decoder(q), x) + loss
        opt.zero_grad()
        total.backward()
        opt.step()
        record += [idx.clone(), loss.detach().clone(), q.detach().clone()]
    state = {f"vq.{k}": v for k, v in snapshot(vq).items()}
    state.update({f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items()})
    return record, state


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("config", list(TRAINING_CONFIGS))
def test_training_run_is_bitwise_reproducible(backend, device, config, deterministic_algorithms):
    if interpreted(backend, device) and config != "ema-kmeans-dead-codes":
        pytest.skip("the Triton interpreter is slow; one configuration covers its kernels")
    first, state1 = _training_run(backend, device, config)
    second, state2 = _training_run(backend, device, config)
    for i, (a, b) in enumerate(zip(first, second)):
        assert bitwise_equal(a, b), f"step {i // 3}, output {i % 3} differs between runs"
    assert_states_bitwise_equal(state1, state2, "final state")


@pytest.mark.parametrize("backend,device", [c for c in ALL if c.values[0] in ("reference", "chunked")])
def test_deterministic_statistics_do_not_depend_on_the_thread_count(backend, device):
    """deterministic=True sums each code's rows in input order, whatever the parallelism."""
    x = randn(5000, 16, seed=35, device=device)
    idx = torch.randint(-1, 5, (5000,), generator=gen(36)).to(device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(vqkernels.cluster_stats(x, idx, 5, deterministic=True, backend=backend))
            cs, ea, cb = torch.ones(5, device=device), torch.zeros(5, 16, device=device), torch.zeros(5, 16, device=device)
            vqkernels.ema_update_(cs, ea, cb, *results[-1], 0.9, backend=backend)
            results.append((cs, ea, cb))
    finally:
        torch.set_num_threads(threads)
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:]):
        for u, v in zip(a, b):
            assert bitwise_equal(u, v)
