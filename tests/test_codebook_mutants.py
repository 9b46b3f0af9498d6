"""vqkernels.codebook.Codebook against plain definitions: its argument checks, defaults, EMA
closed form, stored codes, the one-off state broadcast, Algorithm R reservoir sampling and
checkpoint loading. Written to kill the mutants of ``make mutation MUTATION_GROUPS=codebook``
that the Quantizer-level tests let through (see docs/testing.md); each test states the
behaviour it pins, not a mutant.
"""
import pytest
import torch

import vqkernels
from helpers import closed_form_ema, randn
from vqkernels import codebook as codebook_module
from vqkernels.codebook import Codebook
from vqkernels.distributed import LOCAL, LocalSync
from vqkernels.ops import _dispatch

K, D = 4, 3

# ---------------------------------------------------------------- argument checks

BAD_ARGS = [
    # (kwargs, exception, fragments the message must contain)
    (dict(codebook_size=0), ValueError, ["codebook_size must be >= 1", "got 0"]),
    (dict(codebook_size=2.0), TypeError, ["codebook_size must be an int"]),
    (dict(dim=0), ValueError, ["codebook_dim must be >= 1"]),
    (dict(num_codebooks=0), ValueError, ["num_codebooks must be >= 1"]),
    (dict(num_codebooks=2, codebook_axis=False), ValueError, ["codebook_axis=False", "num_codebooks=2"]),
    (dict(learning="sgd"), ValueError, ["learning must be one of", "'sgd'"]),
    (dict(init="zeros"), ValueError, ["init must be one of", "'zeros'"]),
    (dict(decay="0.9"), TypeError, ["decay must be a float, got str '0.9'"]),
    (dict(decay=True), TypeError, ["decay must be a float, got bool True"]),
    (dict(eps="1e-5"), TypeError, ["eps must be a float, got str"]),
    (dict(dead_code_threshold=None), TypeError, ["dead_code_threshold must be a float, got NoneType"]),
    (dict(decay=1.5), ValueError, ["decay must be in [0, 1]", "1.5"]),
    (dict(decay=-0.1), ValueError, ["decay must be in [0, 1]", "-0.1"]),
    (dict(eps=0.0), ValueError, ["eps must be > 0", "0.0"]),
    (dict(dead_code_threshold=-1.0), ValueError, ["dead_code_threshold must be >= 0", "-1.0"]),
    (dict(deferred_steps=-1), ValueError, ["deferred_steps must be an int >= 0", "-1"]),
    (dict(deferred_steps=1.5), ValueError, ["deferred_steps must be an int >= 0", "1.5"]),
    (dict(deferred_steps=True), ValueError, ["deferred_steps must be an int >= 0", "True"]),
    (dict(kmeans_iters=-1), ValueError, ["kmeans_iters must be an int >= 0", "-1"]),
    (dict(kmeans_iters=1.5), ValueError, ["kmeans_iters must be an int >= 0", "1.5"]),
    (dict(kmeans_iters=True), ValueError, ["kmeans_iters must be an int >= 0", "True"]),
    (dict(deferred_steps=2, reservoir_size=K - 1), ValueError, [f"reservoir_size must be an int >= codebook_size={K}", "3"]),
    (dict(backend="nope"), ValueError, ["'nope' is not a vqkernels backend"]),
]


@pytest.mark.parametrize("kwargs, error, fragments", BAD_ARGS, ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_arguments_raise_naming_the_argument(kwargs, error, fragments):
    args = dict(codebook_size=K, dim=D) | kwargs
    with pytest.raises(error) as info:
        Codebook(args.pop("codebook_size"), args.pop("dim"), **args)
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"


@pytest.mark.parametrize(
    "kwargs",
    [dict(decay=0.0), dict(decay=1.0), dict(decay=1), dict(kmeans_iters=0), dict(dead_code_threshold=0),
     dict(deferred_steps=2, reservoir_size=K), dict(eps=1e-30)],
    ids=str,
)
def test_boundary_arguments_are_accepted(kwargs):
    book = Codebook(K, D, **kwargs)
    assert book.codebook_size == K


def test_kmeans_iters_zero_initialises_from_the_seeding_alone():
    torch.manual_seed(0)
    rows = randn(1, 40, D, seed=1)
    book = Codebook(K, D, init="kmeans", kmeans_iters=0)
    book.initialise_(rows, None, LOCAL)
    assert book.is_initialised and torch.isfinite(book.embed).all()


# ---------------------------------------------------------------- defaults


def test_defaults_quantize_from_the_first_call_without_a_reservoir():
    book = Codebook(K, D)
    assert book.is_quantizing and book.is_initialised and book.switch_due
    assert "reservoir" not in book.state_dict() and "reservoir_seen" not in book.state_dict()


def test_default_reservoir_holds_four_codebooks_of_rows():
    book = Codebook(K, D, num_codebooks=2, deferred_steps=3)
    assert tuple(book.reservoir.shape) == (2, 4 * K, D)
    assert not book.is_quantizing and not book.switch_due


def test_steps_count_training_calls_as_int64():
    book = Codebook(K, D)
    z = randn(1, 10, D, seed=2)
    for _ in range(3):
        book.update_(z, vqkernels.assign(z, book.codes()).indices, None, LOCAL)
    steps = book.state_dict()["steps"]
    assert steps.dtype == torch.int64 and int(steps) == 3


def test_default_ema_step_is_the_closed_form_with_decay_08_and_eps_1e5():
    torch.manual_seed(3)
    book = Codebook(K, D, num_codebooks=2)
    z = randn(2, 30, D, seed=4)
    indices = vqkernels.assign(z, book.codes()).indices
    before = [t.clone() for t in (book.cluster_size, book.embed_avg)]
    counts = torch.stack([torch.bincount(indices[c], minlength=K) for c in range(2)]).double()
    sums = torch.zeros(2, K, D, dtype=torch.float64)
    for c in range(2):
        sums[c].index_add_(0, indices[c], z[c].double())
    size, avg, code = closed_form_ema(*before, counts, sums, 0.8, 1e-5)
    book.update_(z, indices, None, LOCAL)
    torch.testing.assert_close(book.cluster_size.double(), size, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(book.embed_avg.double(), avg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(book.embed.double(), code, rtol=1e-5, atol=1e-6)


def test_default_kmeans_init_runs_ten_lloyd_iterations():
    K8 = 16
    z = torch.rand(1, 1000, 2, generator=torch.Generator().manual_seed(5))  # uniform: Lloyd converges slowly
    torch.manual_seed(6)
    book = Codebook(K8, 2, init="kmeans")
    book.initialise_(z, None, LOCAL)
    got = book.embed[0].clone()
    runs = {}
    for iters in (10, 11):
        torch.manual_seed(6)  # the k-means++ seeding draws the same rows as the book's
        runs[iters] = vqkernels.kmeans(z[0], K8, iters).centroids
    assert not torch.equal(runs[10], runs[11]), "data too easy: 10 and 11 iterations agree"
    assert torch.equal(got, runs[10])


# ---------------------------------------------------------------- the codes


def test_cosine_codes_start_on_the_unit_sphere():
    book = Codebook(16, 5, metric="cosine")
    torch.testing.assert_close(book.codes().norm(dim=-1), torch.ones(1, 16))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_stored_codes_are_unit_rows_for_cosine_and_raw_otherwise(metric, learning):
    book = Codebook(K, D, metric=metric, learning=learning)
    raw = 3.0 * randn(1, K, D, seed=7)
    book.embed.data.copy_(raw)
    codes = book.codes()
    if metric == "cosine" and learning == "gradient":
        torch.testing.assert_close(codes, raw / raw.norm(dim=-1, keepdim=True))
        codes.sum().backward()  # differentiable: the gradient reaches the parameter
        assert book.embed.grad is not None and book.embed.grad.abs().sum() > 0
    else:
        # l2 keeps any codes; EMA + cosine normalises when it writes, never when it reads
        assert torch.equal(codes, raw)


# ---------------------------------------------------------------- dispatch and flags


def _spy_cluster_stats(monkeypatch):
    calls = []
    real = codebook_module.cluster_stats

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(codebook_module, "cluster_stats", spy)
    return calls


@pytest.mark.parametrize("deterministic", [None, True, False])
def test_deterministic_flag_reaches_cluster_stats(monkeypatch, deterministic):
    calls = _spy_cluster_stats(monkeypatch)
    book = Codebook(K, D) if deterministic is None else Codebook(K, D, deterministic=deterministic)
    z = randn(1, 12, D, seed=8)
    book.update_(z, vqkernels.assign(z, book.codes()).indices, None, LOCAL)
    assert len(calls) == 1 and calls[0]["deterministic"] is bool(deterministic)


def _record_backend_choices(monkeypatch) -> list:
    """(op, backend) for every backend selection from now on."""
    chosen = []
    real = _dispatch.select

    def spy(op, *args, **kwargs):
        name = real(op, *args, **kwargs)
        chosen.append((op, name))
        return name

    monkeypatch.setattr(_dispatch, "select", spy)
    return chosen


def test_requested_backend_runs_every_training_op(monkeypatch):
    chosen = _record_backend_choices(monkeypatch)
    book = Codebook(K, D, backend="reference", dead_code_threshold=0.5)
    z = randn(1, 12, D, seed=9)
    book.update_(z, torch.zeros(1, 12, dtype=torch.int64), None, LOCAL)
    ops = {op for op, _ in chosen}
    assert {"cluster_stats", "ema_update"} <= ops, chosen
    assert all(name == "reference" for _, name in chosen), chosen


def test_requested_backend_runs_gradient_learning_kmeans_init_and_the_gated_step(monkeypatch):
    chosen = _record_backend_choices(monkeypatch)
    book = Codebook(K, D, backend="reference", learning="gradient", init="kmeans", kmeans_iters=2)
    book.kmeans_init_(randn(1, 12, D, seed=10), None, LOCAL)
    assert "histogram" in {op for op, _ in chosen}, chosen  # the k-means cluster sizes
    kmeans_ops = len(chosen)
    z = randn(1, 12, D, seed=9)
    book.update_(z, torch.zeros(1, 12, dtype=torch.int64), None, LOCAL)
    assert "histogram" in {op for op, _ in chosen[kmeans_ops:]}, chosen  # the usage counts
    gated = Codebook(K, D, backend="reference")
    before = len(chosen)
    gated.update_(z, torch.zeros(1, 12, dtype=torch.int64), None, LOCAL, finite=torch.tensor(True))
    assert "ema_update" in {op for op, _ in chosen[before:]}, chosen  # the gated (scratch) step
    assert all(name == "reference" for _, name in chosen), chosen


# ---------------------------------------------------------------- broadcast


class _RecordingSync(LocalSync):
    active = True

    def __init__(self):
        self.broadcasts = []

    def broadcast_(self, *tensors):
        self.broadcasts.append(tensors)
        return tensors


@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_first_synced_call_broadcasts_the_state_once(learning):
    book = Codebook(K, D, learning=learning)
    book.broadcast_(LOCAL)  # one process: nothing to send, and it does not count as sent
    sync = _RecordingSync()
    book.broadcast_(sync)
    book.broadcast_(sync)
    assert len(sync.broadcasts) == 1
    sent = sync.broadcasts[0]
    expected = [book.embed.data, book.cluster_size] + ([book.embed_avg] if learning == "ema" else [])
    assert len(sent) == len(expected) and all(s.data_ptr() == e.data_ptr() for s, e in zip(sent, expected))


# ---------------------------------------------------------------- reservoir (Algorithm R)


def _algorithm_r(batches, R, seed):
    """Sequential Algorithm R over the kept rows, fed the same uniform draws as the module
    (one float64 ``torch.rand(N)`` per batch): stream position p goes to slot p while p < R,
    else to slot floor(u (p + 1)) when that is < R. Yields (slot -> row, rows seen) after
    each batch."""
    g = torch.Generator().manual_seed(seed)
    reservoir, seen = {}, 0
    for rows, keep in batches:
        u = torch.rand(rows.shape[1], generator=g, dtype=torch.float64).tolist()
        for i in range(rows.shape[1]):
            if keep is not None and not bool(keep[i]):
                continue
            slot = seen if seen < R else int(u[i] * (seen + 1))
            if slot < R:
                reservoir[slot] = rows[:, i].clone()
            seen += 1
        yield dict(reservoir), seen


@pytest.mark.parametrize("C", [1, 2])
def test_reservoir_is_algorithm_r_with_the_latest_row_winning(C):
    R = 5
    batches = []
    for b, n in enumerate([1, 3, 1, 7, 0, 20, 1, 40]):
        rows = randn(C, n, D, seed=100 + b)
        keep = None if b % 2 else torch.arange(n) % 3 != 1
        batches.append((rows, keep))
    book = Codebook(K, D, num_codebooks=C, deferred_steps=100, reservoir_size=R)
    torch.manual_seed(11)
    # after every batch: a row placed and later overwritten is checked too
    for b, ((rows, keep), (expected, seen)) in enumerate(zip(batches, _algorithm_r(batches, R, 11))):
        book.observe_(rows, keep)
        assert int(book.reservoir_seen) == seen and book._deferred_calls == b + 1
        want = torch.zeros(C, R, D)
        for slot, row in expected.items():
            want[:, slot] = row
        assert torch.equal(book.reservoir, want), f"after batch {b}"
    assert sorted(expected) == list(range(R))


def test_single_row_batches_enter_the_reservoir():
    book = Codebook(K, D, deferred_steps=10, reservoir_size=K, codebook_axis=False)
    rows = randn(1, 2, D, seed=12)
    book.observe_(rows[:, :1], None)
    book.observe_(rows[:, 1:], torch.tensor([True]))
    assert int(book.reservoir_seen) == 2
    assert torch.equal(book.reservoir[:2], rows[0]) and not book.reservoir[2:].any()


# ---------------------------------------------------------------- checkpoints


def _trained(**kwargs):
    torch.manual_seed(13)
    book = Codebook(K, D, **kwargs)
    z = randn(1, 16, D, seed=14)
    if book.is_quantizing:
        book.update_(z, vqkernels.assign(z, book.codes()).indices, None, LOCAL)
    else:
        book.observe_(z, None)
    return book


@pytest.mark.parametrize("deferred_steps", [0, 3])
def test_strict_loading_reports_missing_unexpected_and_misshaped_keys(deferred_steps):
    state = _trained(deferred_steps=deferred_steps).state_dict()
    book = Codebook(K, D, deferred_steps=deferred_steps)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"steps\""):
        book.load_state_dict({k: v for k, v in state.items() if k != "steps"})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*\"bogus\""):
        book.load_state_dict(state | {"bogus": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"size mismatch for embed"):
        book.load_state_dict(state | {"embed": torch.zeros(1, K + 1, D)})
    book.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(book.state_dict()[key], value), key


def test_non_strict_loading_across_deferral_settings():
    deferred = _trained(deferred_steps=3).state_dict()
    plain = Codebook(K, D)
    result = plain.load_state_dict(deferred, strict=False)  # e.g. fine-tuning without deferral
    assert sorted(result.unexpected_keys) == ["reservoir", "reservoir_seen"]
    assert torch.equal(plain.embed, deferred["embed"])
    book = Codebook(K, D, deferred_steps=3)
    result = book.load_state_dict(_trained().state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["reservoir", "reservoir_seen"]


# ---------------------------------------------------------------- per-code EMA weight


def test_callable_ema_weight_sees_the_batch_statistics():
    """A callable ``weight(sums, counts)`` (vector-quantize-pytorch's ema_update_weight) is
    given this step's summed rows ``[C, K, D]`` and counts ``[C, K]``; weight 1 is the plain step."""
    C, N = 2, 20
    z = randn(C, N, D, seed=15)
    torch.manual_seed(16)
    book = Codebook(K, D, num_codebooks=C)
    plain = Codebook(K, D, num_codebooks=C)
    plain.load_state_dict(book.state_dict())
    indices = vqkernels.assign(z, book.codes()).indices
    seen = []
    book.update_(z, indices, None, LOCAL, weight=lambda sums, counts: seen.append((sums.clone(), counts.clone())) or 1.0)
    plain.update_(z, indices, None, LOCAL)
    assert len(seen) == 1
    sums, counts = seen[0]
    want_counts = torch.stack([torch.bincount(indices[c], minlength=K) for c in range(C)]).to(counts.dtype)
    want_sums = torch.zeros(C, K, D)
    for c in range(C):
        want_sums[c].index_add_(0, indices[c], z[c])
    assert torch.equal(counts.view(C, K), want_counts)
    torch.testing.assert_close(sums.view(C, K, D), want_sums)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(book.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("finite", [None, True, False])
def test_gradient_learning_usage_is_an_ema_of_the_counts(finite):
    """learning="gradient": cluster_size (the usage that decides dead codes) is
    decay * usage + (1 - decay) * counts; a batch flagged non-finite leaves it as it was
    and is counted in nonfinite_batches."""
    torch.manual_seed(7)
    book = Codebook(K, D, num_codebooks=2, learning="gradient", decay=0.7)
    book.cluster_size.copy_(torch.rand(2, K, generator=torch.Generator().manual_seed(8)) * 5)
    z = randn(2, 30, D, seed=9)
    indices = vqkernels.assign(z, book.codes()).indices
    before = book.cluster_size.clone()
    counts = torch.stack([torch.bincount(indices[c], minlength=K) for c in range(2)]).float()
    flag = None if finite is None else torch.tensor(finite)
    book.update_(z, indices, None, LOCAL, finite=flag)
    want = before if finite is False else 0.7 * before + 0.3 * counts
    torch.testing.assert_close(book.cluster_size, want, rtol=1e-6, atol=1e-6)
    assert book.nonfinite_batches.item() == (1 if finite is False else 0)


# ---------------------------------------------------------------- the training step's gates


def test_update_rejects_mismatched_shapes_naming_both():
    book = Codebook(K, D, num_codebooks=2)
    for z_shape, idx_shape in (((3, 5, D), (3, 5)), ((2, 5), (2, 5)), ((2, 5, D), (2, 4))):
        z, idx = torch.zeros(z_shape), torch.zeros(idx_shape, dtype=torch.int64)
        want = rf"got z \({', '.join(map(str, z_shape))}\), indices \({', '.join(map(str, idx_shape))}\)"
        with pytest.raises(ValueError, match=r"update_ needs z \[C=2, N, D=3\] and indices \[C, N\]; " + want):
            book.update_(z, idx, None, LOCAL)


def _pair(seed, **kwargs):
    """Two Codebooks with the same state: one to drive, one to compare against."""
    torch.manual_seed(seed)
    book, twin = Codebook(K, D, **kwargs), Codebook(K, D, **kwargs)
    twin.load_state_dict(book.state_dict())
    return book, twin


def _state(book):
    return {k: v.clone() for k, v in book.state_dict().items() if k not in ("steps", "nonfinite_batches")}


def _assert_same_state(book, state):
    for key, value in state.items():
        assert torch.equal(book.state_dict()[key], value), key


def test_a_nonfinite_batch_under_accumulation_adds_nothing_and_is_counted_once():
    """With gradient accumulation, a batch flagged non-finite adds nothing to the pending sum
    and is counted once in nonfinite_batches; the applied step equals one of the good batch alone."""
    book, twin = _pair(21)
    good, bad = randn(1, 12, D, seed=22), randn(1, 12, D, seed=23)
    idx_good = vqkernels.assign(good, book.codes()).indices
    idx_bad = vqkernels.assign(bad, book.codes()).indices
    book.update_(bad, idx_bad, None, LOCAL, accumulate=True, finite=torch.tensor(False))
    assert book.nonfinite_batches.item() == 1
    book.update_(good, idx_good, None, LOCAL, accumulate=True, finite=torch.tensor(True))
    assert book.nonfinite_batches.item() == 1
    book.apply_pending_(LOCAL)
    twin.update_(good, idx_good, None, LOCAL)
    for key, value in twin.state_dict().items():
        if key not in ("steps", "nonfinite_batches"):
            torch.testing.assert_close(book.state_dict()[key], value, msg=key)
    # accumulation without a flag (finite=None): nothing to count
    book.update_(good, idx_good, None, LOCAL, accumulate=True)
    assert book.nonfinite_batches.item() == 1


@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_a_flagged_step_leaves_codes_statistics_and_dead_codes_as_they_were(learning):
    """finite=False on a plain step: no EMA update, no dead-code restart (code 0 is dead),
    counted once in nonfinite_batches."""
    book, _ = _pair(24, learning=learning, dead_code_threshold=1.0)
    book.cluster_size.copy_(torch.tensor([[0.0, 5.0, 5.0, 5.0]]))
    before = _state(book)
    z = randn(1, 12, D, seed=25)
    book.update_(z, vqkernels.assign(z, book.codes()).indices, None, LOCAL, finite=torch.tensor(False))
    _assert_same_state(book, before)
    assert book.nonfinite_batches.item() == 1
    book.update_(z, vqkernels.assign(z, book.codes()).indices, None, LOCAL, finite=torch.tensor(True))
    assert book.nonfinite_batches.item() == 1
    assert any(row.tolist() == book.embed[0, 0].tolist() for row in z[0])  # now re-seeded from a row


def test_cosine_ema_step_is_the_closed_form_renormalised():
    torch.manual_seed(26)
    book = Codebook(K, D, metric="cosine")
    z = randn(1, 30, D, seed=27)
    indices = vqkernels.assign(z, book.codes(), metric="cosine").indices
    counts = torch.bincount(indices[0], minlength=K).double()[None]
    sums = torch.zeros(1, K, D, dtype=torch.float64).index_add_(1, indices[0], z.double())
    _, _, code = closed_form_ema(book.cluster_size.clone(), book.embed_avg.clone(), counts, sums, 0.8, 1e-5)
    book.update_(z, indices, None, LOCAL)
    torch.testing.assert_close(book.embed.double(), code / code.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_decay_zero_moves_a_code_onto_a_single_row():
    """decay 0 keeps only this batch: one kept row makes its code that row (eps aside); the
    codes of a codebook without kept rows stay (covered elsewhere)."""
    book, _ = _pair(28, decay=0.0)
    z = 5.0 + randn(1, 1, D, seed=29)
    idx = vqkernels.assign(z, book.codes()).indices
    book.update_(z, idx, None, LOCAL)
    torch.testing.assert_close(book.embed[0, idx[0, 0]], z[0, 0], rtol=1e-4, atol=1e-4)


def test_steps_after_an_applied_accumulation_use_their_own_statistics():
    book, twin = _pair(30)
    batches = [randn(1, 10, D, seed=31 + i) for i in range(3)]
    book.update_(batches[0], vqkernels.assign(batches[0], book.codes()).indices, None, LOCAL, accumulate=True)
    for z in batches[1:]:
        book.update_(z, vqkernels.assign(z, book.codes()).indices, None, LOCAL)
    size, avg = book.cluster_size.clone(), book.embed_avg.clone()
    z = randn(1, 10, D, seed=40)
    idx = vqkernels.assign(z, book.codes()).indices
    counts = torch.bincount(idx[0], minlength=K).double()[None]
    sums = torch.zeros(1, K, D, dtype=torch.float64).index_add_(1, idx[0], z.double())
    want_size, want_avg, want_code = closed_form_ema(size, avg, counts, sums, 0.8, 1e-5)
    book.update_(z, idx, None, LOCAL)
    torch.testing.assert_close(book.cluster_size.double(), want_size, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(book.embed.double(), want_code, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- dead-code restarts


def test_only_codes_strictly_below_the_threshold_are_restarted():
    book, _ = _pair(41, dead_code_threshold=2.0)
    book.cluster_size.copy_(torch.tensor([[2.0, 1.5, 3.0, 2.0]]))
    before = book.embed.clone()
    z = randn(1, 8, D, seed=42)
    book.restart_dead_codes_(z, None, LOCAL)
    changed = [k for k in range(K) if not torch.equal(book.embed[0, k], before[0, k])]
    assert changed == [1]
    assert any(torch.equal(row, book.embed[0, 1]) for row in z[0])


def test_cosine_restarts_take_the_unit_row():
    book, _ = _pair(43, metric="cosine", dead_code_threshold=1.0)
    book.cluster_size.copy_(torch.tensor([[0.0, 5.0, 5.0, 5.0]]))
    z = 4.0 * randn(1, 1, D, seed=44)
    book.restart_dead_codes_(z, None, LOCAL)
    torch.testing.assert_close(book.embed[0, 0], z[0, 0] / z[0, 0].norm())


def test_restarts_draw_from_kept_rows_only():
    """Every code is dead (threshold 100) but only row 3 is kept: code 0 takes it, the rest
    keep the EMA step's codes (the twin without restarts)."""
    book, twin = _pair(45, dead_code_threshold=100.0)
    twin.dead_code_threshold = 0.0
    z = randn(1, 16, D, seed=46)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[3] = True
    idx = torch.where(keep[None], vqkernels.assign(z, book.codes()).indices, -1)
    book.update_(z, idx, keep, LOCAL)
    twin.update_(z, idx, keep, LOCAL)
    assert torch.equal(book.embed[0, 0], z[0, 3])
    assert torch.equal(book.embed[0, 1:], twin.embed[0, 1:])


# ---------------------------------------------------------------- k-means init


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_init_uses_the_metric_and_scales_sizes_to_batch_rows(metric):
    """Centroids are kmeans(rows, metric); cluster sizes are the k-means counts scaled to
    ``batch_rows`` rows per step (sum = batch_rows)."""
    rows = randn(1, 60, D, seed=47) + torch.tensor([3.0, 0.0, 0.0])
    book = Codebook(K, D, metric=metric, init="kmeans", kmeans_iters=3)
    torch.manual_seed(48)
    book.kmeans_init_(rows, 12.0, LOCAL)
    torch.manual_seed(48)
    ref = vqkernels.kmeans(rows[0], K, 3, metric=metric)
    torch.testing.assert_close(book.embed[0], torch.nn.functional.normalize(ref.centroids, dim=-1) if metric == "cosine" else ref.centroids)
    counts = torch.bincount(ref.indices, minlength=K).float()
    torch.testing.assert_close(book.cluster_size[0], counts * 12.0 / 60)


def test_gradient_learning_usage_takes_a_fractional_ema_weight():
    """usage <- usage + (1 - decay) * w * (counts - usage), w = 0.5 (not rounded to an integer)."""
    torch.manual_seed(49)
    book = Codebook(K, D, learning="gradient", decay=0.6)
    book.cluster_size.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    z = randn(1, 20, D, seed=50)
    indices = vqkernels.assign(z, book.codes()).indices
    counts = torch.bincount(indices[0], minlength=K).double()
    before = book.cluster_size[0].double().clone()
    book.update_(z, indices, None, LOCAL, weight=0.5)
    torch.testing.assert_close(book.cluster_size[0].double(), before + 0.4 * 0.5 * (counts - before), rtol=1e-6, atol=1e-6)


def test_without_dead_code_restarts_a_step_draws_no_random_numbers():
    """dead_code_threshold 0 (the default) never restarts, so the step leaves the global RNG
    stream alone (a user's own draws are the same with or without the quantizer step)."""
    torch.manual_seed(51)
    book = Codebook(K, D)
    z = randn(1, 12, D, seed=52)
    indices = vqkernels.assign(z, book.codes()).indices
    state = torch.get_rng_state()
    book.update_(z, indices, None, LOCAL)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- a group hook, simulated


class _TwinRankSync(LocalSync):
    """A group hook of two ranks in one process: the other rank saw the same batch (its
    statistics equal ours, so the all-reduce doubles them) and raises its own non-finite
    flag, which rides last in the same all-reduce as a [1] tensor (GroupSync's contract)."""

    active = True

    def __init__(self, other_bad: bool):
        self.other_bad = other_bad
        self.calls = []

    def all_reduce_sum_(self, *tensors):
        self.calls.append(tuple(t.shape for t in tensors))
        stats, flag = (tensors[:-1], tensors[-1]) if tensors[-1].shape == (1,) else (tensors, None)
        for t in stats:
            t.mul_(2)
        if flag is not None:
            flag.add_(float(self.other_bad))
        return tensors


def _ema_closed_form(book, z, indices, scale):
    counts = torch.bincount(indices[0], minlength=K).double()[None] * scale
    sums = torch.zeros(1, K, D, dtype=torch.float64).index_add_(1, indices[0], z.double()) * scale
    return closed_form_ema(book.cluster_size.clone(), book.embed_avg.clone(), counts, sums, 0.8, 1e-5)


@pytest.mark.parametrize("finite", [None, True])
def test_group_step_sums_both_ranks_statistics(finite):
    torch.manual_seed(53)
    book = Codebook(K, D)
    z = randn(1, 20, D, seed=54)
    indices = vqkernels.assign(z, book.codes()).indices
    size, _, code = _ema_closed_form(book, z, indices, 2.0)
    sync = _TwinRankSync(other_bad=False)
    book.update_(z, indices, None, sync, finite=None if finite is None else torch.tensor(True))
    flag = [] if finite is None else [(1,)]  # the flag rides in the same collective
    assert sync.calls == [((1, K), (1, K, D), *flag)]
    torch.testing.assert_close(book.cluster_size.double(), size, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(book.embed.double(), code, rtol=1e-5, atol=1e-6)
    assert book.nonfinite_batches.item() == 0


def test_group_step_is_skipped_when_the_other_rank_is_bad():
    torch.manual_seed(55)
    book = Codebook(K, D)
    z = randn(1, 20, D, seed=56)
    before = _state(book)
    book.update_(z, vqkernels.assign(z, book.codes()).indices, None, _TwinRankSync(other_bad=True), finite=torch.tensor(True))
    _assert_same_state(book, before)
    assert book.nonfinite_batches.item() == 1


def test_group_gradient_usage_sums_both_ranks_counts():
    torch.manual_seed(57)
    book = Codebook(K, D, learning="gradient", decay=0.5)
    z = randn(1, 20, D, seed=58)
    indices = vqkernels.assign(z, book.codes()).indices
    before = book.cluster_size.clone()
    sync = _TwinRankSync(other_bad=False)
    book.apply_stats_(torch.bincount(indices[0], minlength=K).float()[None], None, sync)
    assert sync.calls == [((1, K),)]
    counts = torch.bincount(indices[0], minlength=K).float()[None]
    torch.testing.assert_close(book.cluster_size, 0.5 * before + 0.5 * 2 * counts)


# ---------------------------------------------------------------- the Deferred Quantization switch


def _observed(calls, n, reservoir_size=K, seed=60):
    """A deferred codebook fed ``calls`` training calls of ``n`` rows each."""
    book = Codebook(K, D, deferred_steps=100, reservoir_size=reservoir_size)
    torch.manual_seed(seed)
    for c in range(calls):
        book.observe_(randn(1, n, D, seed=seed + 1 + c), None)
    return book


def test_switch_of_a_codebook_without_a_reservoir_raises_naming_deferred_steps():
    book = Codebook(K, D)  # deferred_steps=0: no reservoir; a checkpoint says "not quantizing yet"
    state = book.state_dict()
    state["quantizing"] = torch.tensor(False)
    book.load_state_dict(state)
    with pytest.raises(RuntimeError) as info:
        book.start_quantization_(LOCAL)
    assert str(info.value) == "start_quantization() needs deferred_steps > 0 (there is no reservoir)"


def test_switch_with_too_few_reservoir_rows_says_how_many_and_what_to_do():
    book = _observed(calls=1, n=K - 1)
    with pytest.raises(RuntimeError) as info:
        book.start_quantization_(LOCAL)
    assert str(info.value) == (
        f"Deferred Quantization needs at least codebook_size={K} reservoir rows to k-means-initialise the codebook, "
        f"but only {K - 1} rows were seen in 1 training calls; train longer before switching (raise deferred_steps)"
    )
    assert not book.is_quantizing


def test_switch_counts_every_ranks_reservoir_rows():
    book = _observed(calls=1, n=1)  # 1 row here, 1 on the other rank: 2 < K all ranks together
    sync = _TwinRankSync(other_bad=False)
    with pytest.raises(RuntimeError) as info:
        book.start_quantization_(sync)
    assert f"at least codebook_size={K} reservoir rows (all ranks together) to" in str(info.value)
    assert "only 2 rows were seen in 1 training calls" in str(info.value)
    assert sync.calls == [((2,),)]  # reservoir rows and rows seen, in one all-reduce


def test_switch_with_exactly_codebook_size_rows_initialises():
    book = _observed(calls=1, n=K)
    book.start_quantization_(LOCAL)
    assert book.is_quantizing and book.is_initialised


@pytest.mark.parametrize("calls, n", [(1, 10), (2, 5), (4, 5)])
def test_switch_scales_kmeans_sizes_to_the_mean_batch_seen(calls, n):
    # the reservoir (6 rows) holds fewer rows than were seen: sizes follow the batches, not it
    book = _observed(calls=calls, n=n, reservoir_size=K + 2)
    book.start_quantization_(LOCAL)
    total = book.cluster_size.sum().item()
    assert total == pytest.approx(n), f"sizes sum to {total}, want the mean batch of {n} rows"
    torch.testing.assert_close(book.embed_avg, book.embed * book.cluster_size.unsqueeze(-1))


# ---------------------------------------------------------------- first-batch initialisation, load_codes_


class _TwinTotals(_TwinRankSync):
    """The two-rank hook above, whose row counts add the other rank's (as many rows as ours)."""

    def total(self, n, device=None):
        return 2 * n


@pytest.mark.parametrize("sync, where, n", [(LOCAL, "", K - 1), (_TwinTotals(False), " (all ranks together)", 2)])
def test_kmeans_init_with_too_few_rows_says_how_many_and_what_to_do(sync, where, n):
    book = Codebook(K, D, init="kmeans")
    rows = randn(1, n if sync is LOCAL else 1, D, seed=70)
    with pytest.raises(ValueError) as info:
        book.initialise_(rows, None, sync)
    assert str(info.value) == (
        f"init='kmeans' needs at least codebook_size={K} rows in the first training batch{where}, got {n}; use a "
        "bigger first batch, init='random', or deferred_steps (k-means on a reservoir of reservoir_size rows)"
    )
    assert not book.is_initialised


def test_kmeans_init_with_exactly_codebook_size_rows_initialises():
    book = Codebook(K, D, init="kmeans")
    book.initialise_(randn(1, K, D, seed=71), None, LOCAL)
    assert book.is_initialised and book.cluster_size.sum().item() == pytest.approx(K)


def test_random_init_from_fewer_rows_than_codes_fills_every_code_with_a_row():
    torch.manual_seed(72)
    rows = randn(1, 2, D, seed=73)
    book = Codebook(K, D, init="random")
    book.initialise_(rows, None, LOCAL)
    assert book.is_initialised
    for code in book.embed[0]:  # each of the K codes is one of the 2 rows (drawn with replacement)
        assert any(torch.equal(code, row) for row in rows[0]), code
    assert torch.equal(book.cluster_size, torch.ones(1, K))


def test_load_codes_keeps_cosine_codes_on_the_unit_sphere():
    book = Codebook(K, D, metric="cosine")
    codes = 3.0 * randn(1, K, D, seed=74)
    size = torch.arange(1.0, K + 1)[None]
    book.load_codes_(codes, size)
    unit = codes / codes.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(book.embed, unit)
    torch.testing.assert_close(book.embed_avg, unit * size.unsqueeze(-1))
    assert book.is_initialised and bool(book.initted)
