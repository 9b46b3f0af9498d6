"""Bad input gets a clear error naming the argument, what was given and what was expected.

One table for every public entry point: the ops, kmeans, the Quantizer (constructor,
forward, decode and the other methods) and the diagnostics. Every case runs against every
CPU backend (the calls that take no backend ignore it). Inputs that must *work* (empty N,
K = 1, D = 1, strided views) are in test_edge_inputs.py, the CLI's bad arguments in test_cli_args.py.
A device mismatch is exercised on CPU with the ``meta`` device.
"""
import pytest
import torch

import vqkernels
from conftest import backend_cases
from vqkernels import Quantizer
from vqkernels import diagnostics as dg

x = torch.randn(10, 4)
cb = torch.randn(6, 4)
idx = torch.arange(10) % 6  # holds 5, the largest code: messages below quote it
META = "meta"


def _with_bad_rows(t, rows, value=float("nan")):
    t = t.clone()
    t[rows] = value
    return t


def _trained(b, **kw):
    torch.manual_seed(0)
    vq = Quantizer(4, 6, backend=b, **kw)
    vq(x)
    return vq


def _nonfinite_codebook(b):
    vq = _trained(b, check_finite="strict")  # the default policy skips such a step instead (test_no_sync.py)
    with torch.no_grad():
        vq.embed[3] = float("nan")
    return vq(x)


def _eval(vq):
    vq.eval()
    return vq


def _set_codebook(vq, codes):
    vq.codebook = codes



# (label, call, exception type, words the message must contain[, reason for a strict xfail])
CASES = [
    # --------------------------------------------------------------- assign
    ("assign: x not a tensor", lambda b: vqkernels.assign([[1.0]], cb, backend=b), TypeError, ["x", "torch.Tensor"]),
    ("assign: integer x", lambda b: vqkernels.assign(x.long(), cb, backend=b), TypeError, ["x", "floating", "int64"]),
    ("assign: bool x", lambda b: vqkernels.assign(x > 0, cb, backend=b), TypeError, ["x", "floating", "bool"]),
    ("assign: complex x", lambda b: vqkernels.assign(x.to(torch.complex64), cb, backend=b), TypeError, ["x", "complex64"]),
    ("assign: integer codebook", lambda b: vqkernels.assign(x, cb.long(), backend=b), TypeError, ["codebook", "floating"]),
    ("assign: complex codebook", lambda b: vqkernels.assign(x, torch.randn(6, 4, dtype=torch.complex64), backend=b), TypeError, ["codebook"]),
    ("assign: x/codebook dtype mismatch", lambda b: vqkernels.assign(x, cb.double(), backend=b), TypeError, ["codebook", "float64", "float32"]),
    ("assign: 0-dim x", lambda b: vqkernels.assign(torch.tensor(1.0), cb, backend=b), ValueError, ["x", "at least 1", "()"]),
    ("assign: 1-D codebook", lambda b: vqkernels.assign(x, torch.randn(6), backend=b), ValueError, ["codebook", "2 or 3", "(6,)"]),
    ("assign: D mismatch", lambda b: vqkernels.assign(x, torch.randn(6, 5), backend=b), ValueError, ["x has 4 features", "[..., 5]"]),
    ("assign: K = 0", lambda b: vqkernels.assign(x, torch.randn(0, 4), backend=b), ValueError, ["K >= 1"]),
    ("assign: D = 0", lambda b: vqkernels.assign(torch.randn(3, 0), torch.randn(2, 0), backend=b), ValueError, ["D >= 1"]),
    ("assign: unknown metric", lambda b: vqkernels.assign(x, cb, "euclid", backend=b), ValueError, ["metric", "euclid", "cosine"]),
    ("assign: NaN codebook", lambda b: vqkernels.assign(x, torch.full((6, 4), float("nan")), backend=b), ValueError, ["codebook", "NaN", "rows [0, 1"]),
    ("assign: one Inf code", lambda b: vqkernels.assign(x, _with_bad_rows(cb, 2, float("inf")), backend=b), ValueError, ["codebook", "NaN or Inf", "rows [2]"]),
    ("assign: heads mismatch", lambda b: vqkernels.assign(x, torch.randn(2, 6, 4), backend=b), ValueError, ["2 heads", "[H=2"]),
    ("assign: device mismatch", lambda b: vqkernels.assign(x, cb.to(META), backend=b), ValueError, ["codebook is on meta", "x is on cpu", "same device"]),
    ("assign: unknown backend", lambda b: vqkernels.assign(x, cb, backend="fast"), ValueError, ["backend=", "fast", "chunked"]),
    # --------------------------------------------------------------- histogram
    ("histogram: indices not a tensor", lambda b: vqkernels.histogram([0, 1], 6, backend=b), TypeError, ["indices", "torch.Tensor", "list"]),
    ("histogram: float indices", lambda b: vqkernels.histogram(idx.float(), 6, backend=b), TypeError, ["indices", "int64"]),
    ("histogram: bool indices", lambda b: vqkernels.histogram(idx > 2, 6, backend=b), TypeError, ["indices", "bool"]),
    ("histogram: K = 0", lambda b: vqkernels.histogram(idx, 0, backend=b), ValueError, ["K", ">= 1", "0"]),
    ("histogram: float K", lambda b: vqkernels.histogram(idx, 6.0, backend=b), TypeError, ["K", "int", "float"]),
    ("histogram: index >= K", lambda b: vqkernels.histogram(idx, 3, backend=b), ValueError, ["indices", "index 5", "[0, 3)"]),
    ("histogram: weights shape", lambda b: vqkernels.histogram(idx, 6, torch.ones(3), backend=b), ValueError, ["weights", "(3,)", "(10,)"]),
    ("histogram: integer weights", lambda b: vqkernels.histogram(idx, 6, torch.ones(10, dtype=torch.int64), backend=b), TypeError, ["weights", "floating"]),
    ("histogram: NaN weights", lambda b: vqkernels.histogram(idx, 6, _with_bad_rows(torch.ones(10), 4), backend=b), ValueError, ["weights", "NaN", "rows [4]"]),
    ("histogram: weights device mismatch", lambda b: vqkernels.histogram(idx, 6, torch.ones(10, device=META), backend=b), ValueError, ["weights is on meta", "indices is on cpu"]),
    ("histogram: heads on a scalar", lambda b: vqkernels.histogram(torch.tensor(1), 6, heads=True, backend=b), ValueError, ["heads=True", "[H, ...]"]),
    # --------------------------------------------------------------- cluster_stats
    ("cluster_stats: indices shape", lambda b: vqkernels.cluster_stats(x, idx[:5], 6, backend=b), ValueError, ["indices", "(5,)", "(10,)"]),
    ("cluster_stats: index >= K", lambda b: vqkernels.cluster_stats(x, idx, 4, backend=b), ValueError, ["indices", "index 5", "[0, 4)"]),
    ("cluster_stats: float indices", lambda b: vqkernels.cluster_stats(x, idx.float(), 6, backend=b), TypeError, ["indices", "int64"]),
    ("cluster_stats: integer x", lambda b: vqkernels.cluster_stats(x.int(), idx, 6, backend=b), TypeError, ["x", "floating"]),
    ("cluster_stats: complex x", lambda b: vqkernels.cluster_stats(x.to(torch.complex64), idx, 6, backend=b), TypeError, ["x", "complex64"]),
    ("cluster_stats: bool K", lambda b: vqkernels.cluster_stats(x, idx, True, backend=b), TypeError, ["K", "int", "bool"]),
    ("cluster_stats: Inf in an unmasked row", lambda b: vqkernels.cluster_stats(torch.where(idx.view(-1, 1) == idx[0], float("inf"), x), idx, 6, backend=b), ValueError, ["x", "NaN or Inf", "rows [0"]),
    ("cluster_stats: device mismatch", lambda b: vqkernels.cluster_stats(x, idx.to(META), 6, backend=b), ValueError, ["indices is on meta", "x is on cpu"]),
    # --------------------------------------------------------------- ema_update_
    ("ema_update_: cluster_size shape", lambda b: vqkernels.ema_update_(torch.ones(5), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), 0.9, backend=b), ValueError, ["cluster_size", "(5,)", "(6,)"]),
    ("ema_update_: sums shape", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 3), 0.9, backend=b), ValueError, ["sums", "(6, 3)", "(6, 4)"]),
    ("ema_update_: decay > 1", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), 1.5, backend=b), ValueError, ["decay", "[0, 1]", "1.5"]),
    ("ema_update_: bool decay", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), True, backend=b), ValueError, ["decay", "True"]),
    ("ema_update_: eps = 0", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), 0.9, 0.0, backend=b), ValueError, ["eps", "> 0"]),
    ("ema_update_: fp16 statistics", lambda b: vqkernels.ema_update_(torch.ones(6).half(), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.ones(6, 4), 0.9, backend=b), TypeError, ["cluster_size", "float32"]),
    ("ema_update_: integer counts", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6, dtype=torch.int64), torch.ones(6, 4), 0.9, backend=b), TypeError, ["counts", "floating"]),
    ("ema_update_: 1-D codebook", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), torch.ones(6), torch.ones(6), torch.ones(6, 4), 0.9, backend=b), ValueError, ["codebook", "2 or 3", "(6,)"]),
    ("ema_update_: non-contiguous codebook", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone().t().contiguous().t(), torch.ones(6), torch.ones(6, 4), 0.9, backend=b), ValueError, ["codebook", "contiguous"]),
    ("ema_update_: NaN sums", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6), torch.full((6, 4), float("nan")), 0.9, backend=b), ValueError, ["sums", "NaN"]),
    ("ema_update_: device mismatch", lambda b: vqkernels.ema_update_(torch.ones(6), torch.ones(6, 4), cb.clone(), torch.ones(6, device=META), torch.ones(6, 4), 0.9, backend=b), ValueError, ["counts is on meta", "codebook is on cpu"]),
    # --------------------------------------------------------------- kmeans
    ("kmeans: fewer rows than K", lambda b: vqkernels.kmeans(x, 11, backend=b), ValueError, ["K=11", "10 rows"]),
    ("kmeans: empty x", lambda b: vqkernels.kmeans(x[:0], 1, backend=b), ValueError, ["K=1", "0 rows"]),
    ("kmeans: K = 0", lambda b: vqkernels.kmeans(x, 0, backend=b), ValueError, ["K", ">= 1", "0"]),
    ("kmeans: integer x", lambda b: vqkernels.kmeans(x.long(), 3, backend=b), TypeError, ["x", "floating", "int64"]),
    ("kmeans: NaN row", lambda b: vqkernels.kmeans(_with_bad_rows(x, 4), 3, backend=b), ValueError, ["x", "NaN", "rows [4]"]),
    ("kmeans: unknown init", lambda b: vqkernels.kmeans(x, 3, init="best", backend=b), ValueError, ["init", "kmeans++"]),
    ("kmeans: dot metric", lambda b: vqkernels.kmeans(x, 3, metric="dot", backend=b), ValueError, ["metric", "dot"]),
    ("kmeans: iters < 0", lambda b: vqkernels.kmeans(x, 3, iters=-1, backend=b), ValueError, ["iters", ">= 0"]),
    ("kmeans: tol < 0", lambda b: vqkernels.kmeans(x, 3, tol=-1.0, backend=b), ValueError, ["tol", ">= 0", "-1"]),
    ("kmeans: init_centroids shape", lambda b: vqkernels.kmeans(x, 3, init_centroids=torch.randn(2, 4), backend=b), ValueError, ["init_centroids", "(3, 4)"]),
    ("kmeans: NaN init_centroids", lambda b: vqkernels.kmeans(x, 3, init_centroids=torch.full((3, 4), float("nan")), backend=b), ValueError, ["init_centroids", "NaN"]),
    # --------------------------------------------------------------- Quantizer(...)
    ("Quantizer: dim = 0", lambda b: Quantizer(0, 6, backend=b), ValueError, ["dim", ">= 1", "0"]),
    ("Quantizer: float codebook_size", lambda b: Quantizer(4, 6.0, backend=b), TypeError, ["codebook_size", "int", "float"]),
    ("Quantizer: codebook_dim = 0", lambda b: Quantizer(4, 6, codebook_dim=0, backend=b), ValueError, ["codebook_dim", "0"]),
    ("Quantizer: dot metric", lambda b: Quantizer(4, 6, metric="dot", backend=b), ValueError, ["metric", "dot"]),
    ("Quantizer: decay > 1", lambda b: Quantizer(4, 6, decay=1.5, backend=b), ValueError, ["decay", "[0, 1]", "1.5"]),
    ("Quantizer: decay as a string", lambda b: Quantizer(4, 6, decay="0.9", backend=b), TypeError, ["decay", "'0.9'"]),
    ("Quantizer: eps = 0", lambda b: Quantizer(4, 6, eps=0.0, backend=b), ValueError, ["eps", "> 0"]),
    ("Quantizer: unknown learning", lambda b: Quantizer(4, 6, learning="adam", backend=b), ValueError, ["learning", "adam"]),
    ("Quantizer: unknown gradient", lambda b: Quantizer(4, 6, gradient="sgd", backend=b), ValueError, ["gradient", "sgd", "rotation"]),
    ("Quantizer: unknown init", lambda b: Quantizer(4, 6, init="pca", backend=b), ValueError, ["init", "pca", "kmeans"]),
    ("Quantizer: deferred_steps < 0", lambda b: Quantizer(4, 6, deferred_steps=-1, backend=b), ValueError, ["deferred_steps", "-1"]),
    ("Quantizer: float kmeans_iters", lambda b: Quantizer(4, 6, kmeans_iters=1.5, backend=b), ValueError, ["kmeans_iters", "1.5"]),
    ("Quantizer: dead_code_threshold < 0", lambda b: Quantizer(4, 6, dead_code_threshold=-1, backend=b), ValueError, ["dead_code_threshold", "-1"]),
    ("Quantizer: commitment_weight < 0", lambda b: Quantizer(4, 6, commitment_weight=-1, backend=b), ValueError, ["commitment_weight=-1"]),
    ("Quantizer: reservoir < K", lambda b: Quantizer(4, 6, deferred_steps=2, reservoir_size=5, backend=b), ValueError, ["reservoir_size", "codebook_size=6", "5"]),
    ("Quantizer: unknown backend", lambda b: Quantizer(4, 6, backend="fast"), ValueError, ["backend=", "fast"]),
    # --------------------------------------------------------------- Quantizer forward
    ("forward: x not a tensor", lambda b: Quantizer(4, 6, backend=b)([[1.0] * 4]), TypeError, ["x", "torch.Tensor", "list"]),
    ("forward: integer x", lambda b: Quantizer(4, 6, backend=b)(x.long()), TypeError, ["x", "floating", "int64"]),
    ("forward: complex x", lambda b: Quantizer(4, 6, backend=b)(x.to(torch.complex64)), TypeError, ["x", "complex64"]),
    ("forward: 0-dim x", lambda b: Quantizer(4, 6, backend=b)(torch.tensor(1.0)), ValueError, ["x", "at least 1", "()"]),
    ("forward: wrong dim", lambda b: Quantizer(4, 6, backend=b)(torch.randn(3, 5)), ValueError, ["5 features", "dim=4"]),
    ("forward: channel-first 1-D x", lambda b: Quantizer(4, 6, channel_last=False, backend=b)(torch.randn(4)), ValueError, ["x", "at least 2", "(4,)"]),
    ("forward: channel-first wrong dim", lambda b: Quantizer(4, 6, channel_last=False, backend=b)(torch.randn(2, 3, 4)), ValueError, ["3 features", "second", "dim=4"]),
    ("forward: float mask", lambda b: Quantizer(4, 6, backend=b)(x, mask=torch.ones(10)), TypeError, ["mask", "bool", "float32"]),
    ("forward: mask not a tensor", lambda b: Quantizer(4, 6, backend=b)(x, mask=[True] * 10), TypeError, ["mask", "torch.Tensor"]),
    ("forward: mask shape", lambda b: Quantizer(4, 6, backend=b)(x, mask=torch.ones(9, dtype=torch.bool)), ValueError, ["mask", "(9,)", "(10,)"]),
    ("forward: NaN rows in strict training", lambda b: Quantizer(4, 6, backend=b, check_finite="strict")(_with_bad_rows(x, [4, 7])), ValueError, ["x", "NaN or Inf", "rows [4, 7]"]),
    ("forward: non-finite codebook in strict training", _nonfinite_codebook, ValueError, ["codebook", "NaN", "rows [3]"]),
    ("forward: x on another device (eval)", lambda b: _eval(Quantizer(4, 6, backend=b))(x.to(META)), ValueError, ["meta", "cpu", "same device"]),
    ("forward: x on another device (training)", lambda b: Quantizer(4, 6, backend=b)(x.to(META)), ValueError, ["x", "meta", "cpu"]),
    ("forward: mask on another device", lambda b: Quantizer(4, 6, backend=b)(x, mask=torch.ones(10, dtype=torch.bool, device=META)), ValueError, ["mask", "meta", "cpu"]),
    ("forward: kmeans init, first batch < K rows", lambda b: Quantizer(4, 6, init="kmeans", backend=b)(x[:3]), ValueError, ["init='kmeans'", "codebook_size=6", "got 3"]),
    ("forward: random init, all rows masked", lambda b: Quantizer(4, 6, init="random", backend=b)(x, mask=torch.zeros(10, dtype=torch.bool)), ValueError, ["init='random'", "unmasked"]),
    # --------------------------------------------------------------- Quantizer methods
    ("decode: index >= K", lambda b: Quantizer(4, 6, backend=b).decode(torch.tensor([0, 6])), ValueError, ["indices", "6", "[0, 6)"]),
    ("get_codes_from_indices: index >= K", lambda b: Quantizer(4, 6, backend=b).get_codes_from_indices(torch.tensor([100])), ValueError, ["indices", "100", "[0, 6)"]),
    ("decode: float indices", lambda b: Quantizer(4, 6, backend=b).decode(torch.tensor([1.0])), TypeError, ["indices", "int64", "float32"]),
    ("get_codes_from_indices: not a tensor", lambda b: Quantizer(4, 6, backend=b).get_codes_from_indices([1]), TypeError, ["indices", "torch.Tensor"]),
    ("codebook setter: shape", lambda b: _set_codebook(Quantizer(4, 6, backend=b), torch.randn(5, 4)), ValueError, ["codes", "(5, 4)", "(6, 4)"]),
    ("codebook setter: integer codes", lambda b: _set_codebook(Quantizer(4, 6, backend=b), torch.ones(6, 4, dtype=torch.long)), TypeError, ["codes", "floating", "int64"]),
    ("codebook setter: NaN codes", lambda b: _set_codebook(Quantizer(4, 6, backend=b), _with_bad_rows(cb, 2)), ValueError, ["codes", "NaN", "rows [2]"]),
    ("init_codebook: fewer rows than K", lambda b: Quantizer(4, 6, backend=b).init_codebook(x[:3]), ValueError, ["codebook_size=6", "got 3"]),
    ("init_codebook: integer x", lambda b: Quantizer(4, 6, backend=b).init_codebook(x.long()), TypeError, ["x", "floating"]),
    ("init_codebook: NaN x", lambda b: Quantizer(4, 6, backend=b).init_codebook(_with_bad_rows(x, 1)), ValueError, ["x", "NaN", "rows [1]"]),
    ("init_codebook: wrong dim", lambda b: Quantizer(4, 6, backend=b).init_codebook(torch.randn(10, 5)), ValueError, ["x", "5 features", "dim=4"]),
    ("start_quantization: reservoir < K rows", lambda b: (lambda vq: (vq(x[:3]), vq.start_quantization()))(Quantizer(4, 6, deferred_steps=5, backend=b)), RuntimeError, ["at least codebook_size=6", "3 rows"]),
    # --------------------------------------------------------------- diagnostics
    ("usage: float indices", lambda b: dg.usage(idx.float(), 6), TypeError, ["indices", "int64", "float32"]),
    ("usage: codebook_size = 0", lambda b: dg.usage(idx, 0), ValueError, ["codebook_size", ">= 1", "0"]),
    ("usage: index >= K", lambda b: dg.usage(idx, 3), ValueError, ["indices", "index 5", "[0, 3)"]),
    ("usage_from_counts: 2-D counts", lambda b: dg.usage_from_counts(torch.ones(2, 3)), ValueError, ["counts", "1 dimensions", "(2, 3)"]),
    ("usage_from_counts: negative count", lambda b: dg.usage_from_counts(torch.tensor([1.0, -2.0])), ValueError, ["counts", "negative", ">= 0"]),
    ("usage_from_counts: NaN count", lambda b: dg.usage_from_counts(torch.tensor([1.0, float("nan")])), ValueError, ["counts", "NaN", "rows [1]"]),
    ("usage_from_counts: no codes", lambda b: dg.usage_from_counts(torch.zeros(0)), ValueError, ["counts", "K >= 1", "(0,)"]),
    ("CodebookMonitor: codebook_size = 0", lambda b: dg.CodebookMonitor(0), ValueError, ["codebook_size", "0"]),
    ("CodebookMonitor.update: float indices", lambda b: dg.CodebookMonitor(6).update(idx.float()), TypeError, ["indices", "float32"]),
    ("CodebookMonitor.update: index >= K", lambda b: dg.CodebookMonitor(3).update(idx), ValueError, ["indices", "index 5", "[0, 3)"]),
    ("coverage: integer embeddings", lambda b: dg.coverage(x.long(), cb, backend=b), TypeError, ["embeddings", "int64"]),
    ("coverage: D mismatch", lambda b: dg.coverage(x, torch.randn(6, 5), backend=b), ValueError, ["embeddings has 4 features", "codebook has 5"]),
    ("coverage: dot metric", lambda b: dg.coverage(x, cb, "dot", backend=b), ValueError, ["metric", "dot", "cosine"]),
    ("coverage: empty codebook", lambda b: dg.coverage(x, torch.randn(0, 4), backend=b), ValueError, ["codebook", "K >= 1"]),
    ("coverage: device mismatch", lambda b: dg.coverage(x, cb.to(META), backend=b), ValueError, ["codebook is on meta", "embeddings is on cpu"]),
    ("coverage: non-finite codebook", lambda b: dg.coverage(x, _with_bad_rows(cb, 4), backend=b), ValueError, ["codebook", "NaN", "rows [4]"]),
    ("effective_rank: integer x", lambda b: dg.effective_rank(x.long()), TypeError, ["x", "int64"]),
    ("total_variance: complex x", lambda b: dg.total_variance(x.to(torch.complex64)), TypeError, ["x", "complex64"]),
    ("variance_ratio: D mismatch", lambda b: dg.variance_ratio(torch.randn(6, 5), x), ValueError, ["embeddings has 4 features", "codebook has 5"]),
    ("class_coverage: label count", lambda b: dg.class_coverage(idx, torch.zeros(9), 6), ValueError, ["labels", "9", "10"]),
    ("class_coverage: index >= K", lambda b: dg.class_coverage(idx, idx % 2, 3), ValueError, ["indices", "index 5", "[0, 3)"]),
    ("class_coverage: codebook_size = 0", lambda b: dg.class_coverage(idx, idx % 2, 0), ValueError, ["codebook_size", "0"]),
    ("report: codebook not a tensor", lambda b: dg.report(x, "codes", print_table=False, backend=b), TypeError, ["codebook", "[K, D]", "str"]),
    ("report: 1-D codebook", lambda b: dg.report(x, torch.randn(6), print_table=False, backend=b), ValueError, ["codebook", "2 dimensions", "(6,)"]),
    ("report: D mismatch", lambda b: dg.report(x, torch.randn(6, 5), print_table=False, backend=b), ValueError, ["embeddings has 4 features", "codebook has 5"]),
    ("report: indices count", lambda b: dg.report(x, cb, indices=idx[:5], print_table=False, backend=b), ValueError, ["indices", "5 entries", "10 rows"]),
    ("report: index >= K", lambda b: dg.report(x, cb, indices=idx + 6, print_table=False, backend=b), ValueError, ["indices", "[0, 6)"]),
    ("report: dot metric", lambda b: dg.report(x, cb, metric="dot", print_table=False, backend=b), ValueError, ["metric", "dot"]),
    ("report: a module that is not a Quantizer", lambda b: dg.report(x, torch.nn.Linear(4, 4), print_table=False, backend=b), TypeError, ["codebook", "Quantizer"]),
    ("report: embeddings vs Quantizer dim", lambda b: dg.report(torch.randn(10, 5), Quantizer(4, 6, backend=b), print_table=False, backend=b), ValueError, ["embeddings has 5 features", "dim=4"]),
    ("report: integer embeddings", lambda b: dg.report(x.long(), cb, print_table=False, backend=b), TypeError, ["embeddings", "int64"]),
]


def _param(case):
    label, call, exc, words, *xfail = case
    marks = [pytest.mark.xfail(strict=True, reason=xfail[0])] if xfail else []
    return pytest.param(call, exc, words, id=label, marks=marks)


@pytest.mark.parametrize("backend,device", [c for c in backend_cases() if c.values[1] == "cpu"])
@pytest.mark.parametrize("call,exc,words", [_param(c) for c in CASES])
def test_bad_input_raises_clear_error(call, exc, words, backend, device):
    with pytest.raises(exc) as info:
        call(backend)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_state_untouched_by_failed_ema_update():
    buffers = [torch.ones(6), torch.ones(6, 4), torch.randn(6, 4)]
    before = [b.clone() for b in buffers]
    with pytest.raises(ValueError, match=r"sums contains NaN or Inf \(rows \[0, 1, 2, 3, 4, 5\]\); expected finite values"):
        vqkernels.ema_update_(*buffers, torch.ones(6), torch.full((6, 4), float("inf")), 0.9)
    for b, a in zip(buffers, before):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mismatch")
@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(ValueError, match="codebook is on cuda"):
        vqkernels.assign(x, cb.cuda())
