"""Codebook sync over torch.distributed: 2 and 3 Gloo processes on CPU, each with its own shard.

One spawn per world size runs every scenario (process start-up and ``import torch`` cost a
few seconds each); each rank saves what it ended with, and the test compares the ranks
with each other and with a single process fed the concatenated batches. A hang (a rank
missing a collective) fails the test after a timeout instead of blocking CI.
"""
import os

import pytest
import torch
import torch.distributed as dist

from helpers import run_gloo_ranks

import vqkernels
from vqkernels import distributed as vqdist
from vqkernels.codebook import Codebook
from vqkernels.quantizer import Quantizer

TIMEOUT_S = 180
DIM = 6


# ---------------------------------------------------------------- shared data (worker and test)
def ema_data(world, steps=12):
    """``data[step][rank] = (x, mask)``: uneven rows per rank; the last rank has every row
    masked at some steps, rank 1 gets an empty batch at step 5."""
    g = torch.Generator().manual_seed(10 + world)
    data = []
    for s in range(steps):
        per_rank = []
        for r in range(world):
            rows = 0 if (r == 1 and s == 5) else 20 + 9 * r + s % 3
            x = torch.randn(rows, DIM, generator=g) * (1 + 0.1 * r)
            mask = torch.rand(rows, generator=g) > 0.25
            if r == world - 1 and s % 4 == 1:
                mask = torch.zeros(rows, dtype=torch.bool)
            per_rank.append((x, mask))
        data.append(per_rank)
    return data


def restart_data(world, rank, steps=10):
    """Data that moves away from the k-means codes after 3 steps, so codes die and restart.
    The last rank never has a valid row (all masked)."""
    g = torch.Generator().manual_seed(100 * world + rank)
    out = []
    for s in range(steps):
        x = torch.randn(32 + 5 * rank, DIM, generator=g) + (0.0 if s < 3 else 6.0)
        mask = torch.ones(x.shape[0], dtype=torch.bool)
        if rank == world - 1:
            mask[:] = False
        out.append((x, mask))
    return out


def kmeans_union(world):
    """Six separated blobs; uneven shards, the last rank of a 3-world holds no row."""
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(6, 4, generator=g) * 25
    x = torch.cat([c + 0.5 * torch.randn(40, 4, generator=g) for c in centres])
    x = x[torch.randperm(x.shape[0], generator=g)]
    if world == 2:
        bounds = [0, 90, 240]
    else:
        bounds = [0, 150, 240, 240]
    return x, centres, [x[bounds[r] : bounds[r + 1]] for r in range(world)]


# ---------------------------------------------------------------- scenarios (in each rank)
def scenario_ema(rank, world):
    """EMA sync vs a single process on the concatenated batches (ranks built with different
    random codes: the first call broadcasts rank 0's)."""
    out = {}
    for metric in ("l2", "cosine"):
        torch.manual_seed(100 + rank)
        vq = Quantizer(DIM, 16, metric=metric, decay=0.9, commitment_weight=0.25)
        steps = []
        for per_rank in ema_data(world):
            x, mask = per_rank[rank]
            q, idx, loss = vq(x, mask=mask)
            steps.append((idx, q))
        out[metric] = dict(state={k: v.clone() for k, v in vq.state_dict().items()}, steps=steps)
    return out


def scenario_restart(rank, world):
    """k-means init and dead-code restarts with a rank whose rows are all masked."""
    out = {}
    configs = {
        "kmeans-ema": dict(init="kmeans", kmeans_iters=4, dead_code_threshold=1.0),
        "random-gradient": dict(init="random", learning="gradient", dead_code_threshold=1.0, decay=0.5),
    }
    for name, kwargs in configs.items():
        torch.manual_seed(1000 + rank)  # every rank draws different random numbers
        vq = Quantizer(DIM, 16, **kwargs)
        for x, mask in restart_data(world, rank):
            vq(x, mask=mask)
        out[name] = {k: v.clone() for k, v in vq.state_dict().items()}
    return out


def scenario_deferred(rank, world):
    """Deferred Quantization: per-rank reservoirs, one k-means over their union at the switch."""
    torch.manual_seed(2000 + rank)
    vq = Quantizer(DIM, 8, deferred_steps=3, reservoir_size=40, kmeans_iters=5)
    g = torch.Generator().manual_seed(300 + rank)
    centre = torch.full((DIM,), 10.0 * rank)  # each rank's data sits elsewhere
    history = []
    for s in range(6):
        x = centre + torch.randn(25 + 4 * rank, DIM, generator=g)
        mask = torch.ones(x.shape[0], dtype=torch.bool)
        if rank == world - 1 and s == 0:
            mask[:] = False  # nothing from this rank at the first step
        _, idx, _ = vq(x, mask=mask)
        history.append(bool((idx >= 0).all()))
    return dict(state={k: v.clone() for k, v in vq.state_dict().items()}, quantizing=history)


def scenario_kmeans(rank, world):
    """Sharded k-means: fixed start (comparable with one process), seeded k-means++ and
    random seeding, an empty cluster re-seeded from the farthest rows, too few rows."""
    union, _, shards = kmeans_union(world)
    mine = shards[rank]
    start = union[:6].clone()
    out = {"fixed": vqkernels.kmeans(mine, 6, iters=20, init_centroids=start, tol=0, distributed=True)}
    far_start = torch.cat([union[:5], torch.full((1, 4), 1e3)])
    out["empty"] = vqkernels.kmeans(mine, 6, iters=3, init_centroids=far_start, tol=0, distributed=True)
    torch.manual_seed(rank)  # seed=None: rank 0's choices must still win everywhere
    out["kmeans++"] = vqkernels.kmeans(mine, 6, iters=10, distributed=True)
    out["random"] = vqkernels.kmeans(mine, 6, iters=10, init="random", seed=3, distributed=True)
    try:
        vqkernels.kmeans(mine[:1], 16, iters=2, distributed=True)
        out["too_few"] = None
    except ValueError as e:
        out["too_few"] = str(e)
    bad = mine.clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    try:
        vqkernels.kmeans(bad, 6, iters=2, distributed=True)
        out["nan"] = None
    except ValueError as e:
        out["nan"] = str(e)
    rows, sizes = vqdist.all_gather_rows(mine + rank)
    out["gathered"] = (rows, sizes)
    return out


def codebook_data(world, rank, steps=10):
    """``[C=2, n, DIM]`` rows per step (codebook c around 20 c, moving by +6 after step 3) and
    a row mask; the last rank never has a kept row."""
    g = torch.Generator().manual_seed(500 * world + rank)
    out = []
    for s in range(steps):
        z = torch.randn(2, 24 + 5 * rank, DIM, generator=g) + 20.0 * torch.arange(2).view(2, 1, 1) + (0.0 if s < 3 else 6.0)
        keep = torch.rand(z.shape[1], generator=g) > 0.2
        if rank == world - 1:
            keep[:] = False
        out.append((z, keep))
    return out


def train_codebooks(book, data, sync):
    """The codebook state's training step, as a layer with C codebooks drives it."""
    book.broadcast_(sync)
    for z, keep in data:
        if not book.is_initialised:
            book.initialise_(z, keep, sync)
        indices = vqkernels.assign(z, book.codes()).indices.masked_fill(~keep, -1)
        book.update_(z, indices, keep, sync)
    return {k: v.clone() for k, v in book.state_dict().items()}


def scenario_codebooks(rank, world):
    """A Codebook with C = 2 under the group hook: EMA statistics of both codebooks in one
    all-reduce; k-means init, and dead-code restarts of both codebooks from all ranks' rows."""
    sync = vqdist.sync_for(True)
    torch.manual_seed(3000 + rank)  # different random codes per rank: the first call broadcasts rank 0's
    ema = Codebook(8, DIM, num_codebooks=2, decay=0.9, deterministic=True)
    torch.manual_seed(4000 + rank)
    restart = Codebook(8, DIM, num_codebooks=2, init="kmeans", kmeans_iters=3, dead_code_threshold=2.0)
    data = codebook_data(world, rank)
    return {"ema": train_codebooks(ema, data[:3], sync), "restart": train_codebooks(restart, data, sync)}


def scenario_nonfinite(rank, world):
    """The default non-finite policy under the group hook: at step 2 the last rank's batch
    holds a NaN kept row; every rank skips that step (the flag rides in the statistics'
    all-reduce), with restarts on, so the codebooks stay identical and equal to a run that
    never saw step 2."""
    data = restart_data(world, rank, steps=5)
    out = {}
    for name, poison in (("poisoned", True), ("clean", False)):
        torch.manual_seed(6000)  # the same codes everywhere; restarts draw the same rows
        vq = Quantizer(DIM, 8, decay=0.5, dead_code_threshold=1.0)
        for s, (x, _) in enumerate(data):
            if s == 2:
                if not poison:
                    continue
                if rank == world - 1:
                    x = x.clone()
                    x[3, 1] = float("nan")
            vq(x)
        out[name] = {k: v.clone() for k, v in vq.state_dict().items()}
        out[name]["nonfinite_batches"] = vq.nonfinite_batches.clone()
    return out


SCENARIOS = {
    "ema": scenario_ema,
    "nonfinite": scenario_nonfinite,
    "restart": scenario_restart,
    "deferred": scenario_deferred,
    "kmeans": scenario_kmeans,
    "codebooks": scenario_codebooks,
}


def _worker(rank, world, init_file, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: fn(rank, world) for name, fn in SCENARIOS.items()}
        results["world_info"] = tuple(vqdist.world_info())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(world, tmp_path):
    """Start ``world`` Gloo ranks of the scenario worker and load their results."""
    return run_gloo_ranks(_worker, world, tmp_path, "test_distributed", TIMEOUT_S)


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request, tmp_path_factory):
    world = request.param
    return world, run_world(world, tmp_path_factory.mktemp(f"dist{world}"))


# ---------------------------------------------------------------- checks (in the test process)
def assert_same_across_ranks(states, what, skip=()):
    for r, state in enumerate(states[1:], start=1):
        for k, v in states[0].items():
            if k in skip:
                continue
            assert torch.equal(v, state[k]), f"{what}: {k} differs between rank 0 and rank {r}"


def test_world_info(world_results):
    world, results = world_results
    assert [r["world_info"] for r in results] == [(rank, world) for rank in range(world)]
    assert vqdist.world_info() == (0, 1) and not vqdist.is_distributed()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ema_sync_matches_single_process_on_concatenated_batches(world_results, metric):
    world, results = world_results
    assert_same_across_ranks([r["ema"][metric]["state"] for r in results], f"ema {metric}")
    torch.manual_seed(100)  # rank 0's construction seed: its codes are the ones broadcast
    ref = Quantizer(DIM, 16, metric=metric, decay=0.9, commitment_weight=0.25)
    for step, per_rank in enumerate(ema_data(world)):
        x = torch.cat([p[0] for p in per_rank])
        mask = torch.cat([p[1] for p in per_rank])
        q, idx, _ = ref(x, mask=mask)
        offset = 0
        for r in range(world):
            r_idx, r_q = results[r]["ema"][metric]["steps"][step]
            n = r_idx.shape[0]
            assert torch.equal(r_idx, idx[offset : offset + n]), f"step {step}, rank {r}: indices differ"
            torch.testing.assert_close(r_q, q[offset : offset + n], atol=1e-5, rtol=1e-5)
            offset += n
    state = results[0]["ema"][metric]["state"]
    for k in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(state[k], getattr(ref, k), atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    assert int(state["steps"]) == int(ref.steps) == 12


def test_init_and_dead_code_restart_identical_with_a_masked_out_rank(world_results):
    world, results = world_results
    for name in ("kmeans-ema", "random-gradient"):
        states = [r["restart"][name] for r in results]
        assert_same_across_ranks(states, name)
        embed = states[0]["embed"]
        # the data moved to ~6 after step 3: restarted codes were drawn from it (kept rows only)
        moved = (embed.mean(1) > 3).sum()
        assert int(moved) >= 8, f"{name}: only {int(moved)} codes were re-seeded from the moved data"
        assert bool(states[0]["initted"])


def test_a_nonfinite_batch_on_one_rank_is_skipped_by_every_rank(world_results):
    world, results = world_results
    poisoned = [r["nonfinite"]["poisoned"] for r in results]
    assert_same_across_ranks(poisoned, "nonfinite")
    clean = results[0]["nonfinite"]["clean"]
    for k in ("embed", "embed_avg", "cluster_size"):
        assert torch.equal(poisoned[0][k], clean[k]), f"{k}: the skipped step changed the codebook"
    assert all(int(p["nonfinite_batches"]) == 1 for p in poisoned) and int(clean["nonfinite_batches"]) == 0


def test_deferred_switch_uses_all_ranks_reservoirs(world_results):
    world, results = world_results
    # each rank counts the rows its own reservoir saw; everything else is shared
    assert_same_across_ranks([r["deferred"]["state"] for r in results], "deferred", skip=("reservoir_seen",))
    for r in results:
        assert r["deferred"]["quantizing"] == [False, False, False, True, True, True]
    embed = results[0]["deferred"]["state"]["embed"]
    for rank in range(world):  # every rank's region holds codes: k-means saw the union
        near = (embed - 10.0 * rank).norm(dim=1).min()
        assert float(near) < 3.0, f"no code near rank {rank}'s data"


def test_codebook_axis_sync_matches_single_process_and_restarts_from_all_ranks(world_results):
    world, results = world_results
    for name in ("ema", "restart"):
        assert_same_across_ranks([r["codebooks"][name] for r in results], f"codebooks {name}")
    torch.manual_seed(3000)  # rank 0's construction seed: its codes are the ones broadcast
    ref = Codebook(8, DIM, num_codebooks=2, decay=0.9, deterministic=True)
    per_rank = [codebook_data(world, r)[:3] for r in range(world)]
    union = [(torch.cat([d[s][0] for d in per_rank], 1), torch.cat([d[s][1] for d in per_rank])) for s in range(3)]
    want = train_codebooks(ref, union, vqdist.LOCAL)
    got = results[0]["codebooks"]["ema"]
    for k in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    embed = results[0]["codebooks"]["restart"]["embed"]
    for c in range(2):  # re-seeded from the moved rows of codebook c's own view (around 20 c + 6)
        moved = ((embed[c] - (20.0 * c + 6.0)).norm(dim=1) < 4).sum()
        assert int(moved) >= 5, f"codebook {c}: only {int(moved)} codes re-seeded from the moved data"


def test_distributed_kmeans_matches_single_process_on_the_union(world_results):
    world, results = world_results
    union, centres, shards = kmeans_union(world)
    for name, init in (("fixed", union[:6]), ("empty", torch.cat([union[:5], torch.full((1, 4), 1e3)]))):
        iters = 20 if name == "fixed" else 3
        single = vqkernels.kmeans(union, 6, iters=iters, init_centroids=init, tol=0)
        for r, res in enumerate(results):
            got = res["kmeans"][name]
            torch.testing.assert_close(got.centroids, single.centroids, atol=1e-4, rtol=1e-5)
            assert got.n_iter == single.n_iter
            torch.testing.assert_close(torch.tensor(got.inertia_history), torch.tensor(single.inertia_history), rtol=1e-5, atol=1e-3)
            lo = sum(s.shape[0] for s in shards[:r])
            assert torch.equal(got.indices, single.indices[lo : lo + shards[r].shape[0]]), f"{name}: rank {r} indices"
    assert bool((results[0]["kmeans"]["empty"].centroids.abs() < 100).all()), "the empty cluster was re-seeded"
    for name in ("kmeans++", "random"):
        first = results[0]["kmeans"][name]
        for res in results[1:]:
            assert torch.equal(res["kmeans"][name].centroids, first.centroids), f"{name}: centroids differ across ranks"
            assert res["kmeans"][name].inertia == first.inertia
    # seeding drew from every shard (k-means++ may, rarely, put two seeds in one blob)
    nearest = torch.cdist(centres, results[0]["kmeans"]["kmeans++"].centroids).min(1).values
    assert int((nearest < 1.0).sum()) >= 5, nearest
    for res in results:  # errors that depend on all ranks' data are raised on every rank: no hang
        assert res["kmeans"]["too_few"] is not None and "across all ranks" in res["kmeans"]["too_few"]
    assert "rows [0]" in results[1]["kmeans"]["nan"]
    assert all("another rank" in res["kmeans"]["nan"] for r, res in enumerate(results) if r != 1)


def test_all_gather_rows_handles_uneven_and_empty_shards(world_results):
    world, results = world_results
    _, _, shards = kmeans_union(world)
    want = torch.cat([s + r for r, s in enumerate(shards)])
    for res in results:
        rows, sizes = res["kmeans"]["gathered"]
        assert sizes == [s.shape[0] for s in shards]
        assert torch.equal(rows, want)


def test_single_process_helpers_are_local():
    x = torch.randn(5, 3)
    counts, sums = torch.ones(4), torch.ones(4, 3)
    assert vqdist.all_reduce_sum_(counts, sums)[0] is counts and torch.equal(counts, torch.ones(4))
    rows, sizes = vqdist.all_gather_rows(x)
    assert rows is x and sizes == [5]
    picked = vqdist.sample_rows(x, 3, generator=torch.Generator().manual_seed(0))
    assert picked.shape == (3, 3) and all(any(torch.equal(p, r) for r in x) for p in picked)
    assert vqdist.sample_rows(x, 9, replacement=True).shape == (9, 3)
    assert vqdist.sample_rows(x, 9).shape == (5, 3)
    # kmeans(distributed=True) without a process group is the plain single-process k-means
    a = vqkernels.kmeans(x.repeat(10, 1), 2, iters=3, seed=0)
    b = vqkernels.kmeans(x.repeat(10, 1), 2, iters=3, seed=0, distributed=True)
    assert torch.equal(a.centroids, b.centroids)
    with pytest.raises(ValueError, match="sync_codebook"):
        Quantizer(4, 8, sync_codebook="yes")
