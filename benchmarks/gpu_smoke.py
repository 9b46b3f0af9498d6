"""The Python half of benchmarks/gpu_check.sh: environment, optional peers, smoke checks, results.

Each subcommand writes its result into the output folder as soon as it has one, so a run
killed by its time limit still returns every earlier result:

    gpu_smoke.py env     --out DIR                  -> DIR/env.json, DIR/env.txt
    gpu_smoke.py wheels  --out DIR --wheels W --target T
                         install W/*.whl into T with pip (no index, no dependencies), then
                         record which optional peers import    -> DIR/peers.json
    gpu_smoke.py smoke   --out DIR --device cuda --budget 60
                         every op and backend once against the reference on a few shapes
                         (codebook axis, ties, NaN rows, masks); rewritten after every
                         check                                  -> DIR/smoke.json
    gpu_smoke.py record  --out DIR NAME STATUS SECONDS [DETAIL]
                         one phase's outcome (from the shell)  -> DIR/phases/NAME.json
    gpu_smoke.py summary --out DIR                  -> DIR/results.json, DIR/summary.txt

``env``, ``record`` and ``summary`` never import torch at module level (``record`` and
``summary`` run after every phase and must be cheap); ``smoke`` and ``env`` do.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

# Optional peers the benchmarks compare against: (import name, wheel / distribution name).
PEERS = (("faiss", "faiss"), ("vector_quantize_pytorch", "vector-quantize-pytorch"), ("flash_kmeans", "flash-kmeans"))
PHASE_ORDER = ("env", "wheels", "build", "smoke", "tests", "bench_core", "bench_suite", "bench_full")


def _write_json(path: str, payload) -> None:
    """Write atomically (temp file + rename): a kill mid-write never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _run(cmd, timeout=20) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


# --------------------------------------------------------------------------- env


def environment() -> dict:
    """The benchmark runner's machine description (``vqkernels.bench.runner.machine_info``),
    plus what the GPU check needs on top: the interpreter, test tools, nvcc, nvidia-smi.
    No field raises: a reason instead, since this is the first thing a run records."""
    env = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "executable": sys.executable}
    try:
        from vqkernels.bench.runner import machine_info

        env.update(machine_info())
    except Exception as exc:
        env.update(python=sys.version.split()[0], platform=platform.platform(), cpu_count=os.cpu_count(),
                   machine_error=f"{type(exc).__name__}: {exc}")
    for name in ("torch", "triton", "numpy", "pytest", "xdist", "hypothesis", "ninja"):
        try:
            mod = importlib.import_module(name)
            env[name] = getattr(mod, "__version__", "present")
        except Exception as exc:
            env[name] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
    except Exception as exc:
        env.update(cuda_available=False, torch_error=str(exc))
    env["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else "not on PATH"
    env["ninja_bin"] = shutil.which("ninja") or "not on PATH"
    env["nvidia_smi"] = _run(["nvidia-smi"]) if shutil.which("nvidia-smi") else "not on PATH"
    return env


def cmd_env(args) -> int:
    env = environment()
    _write_json(os.path.join(args.out, "env.json"), env)
    with open(os.path.join(args.out, "env.txt"), "w") as f:
        for k, v in env.items():
            f.write(f"{k}: {v}\n" if k != "nvidia_smi" else f"{k}:\n{v}\n")
    gpu = env.get("gpu")
    print(f"python {env['python']} torch {env['torch']} (cuda {env.get('cuda')}) triton {env['triton']}; "
          + (f"{gpu} sm {env.get('capability')} {env.get('sm_count')} SMs" if gpu else "no CUDA device"))
    return 0


# --------------------------------------------------------------------------- wheels / peers


def install_wheels(wheel_dir: str, target: str, timeout: float = 120) -> dict:
    """pip-install every wheel of ``wheel_dir`` into ``target`` with no package index and no
    dependencies (a bare machine has no registry). Returns what happened."""
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {wheel_dir}/", "wheels": []}
    os.makedirs(target, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--upgrade", "--target", target, *wheels]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PIP_NO_INDEX="1"))
        ok = proc.returncode == 0
        log = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        ok, log = False, f"pip timed out after {timeout}s"
    return {"status": "ok" if ok else "failed", "wheels": [os.path.basename(w) for w in wheels], "target": target,
            "log": log}


def peer_status(target: str | None = None) -> dict:
    """{peer: version or 'skipped: reason'} for the optional peers, with ``target`` on the path."""
    if target and os.path.isdir(target) and target not in sys.path:
        sys.path.insert(0, target)
    out = {}
    for module, dist in PEERS:
        try:
            mod = importlib.import_module(module)
            out[dist] = {"status": "ok", "version": getattr(mod, "__version__", "present"),
                         "path": os.path.dirname(getattr(mod, "__file__", "") or "")}
        except Exception as exc:
            out[dist] = {"status": "skipped", "reason": f"not importable: {type(exc).__name__}: {exc}"[:300]}
    return out


def cmd_wheels(args) -> int:
    result = install_wheels(args.wheels, args.target)
    result["peers"] = peer_status(args.target)
    _write_json(os.path.join(args.out, "peers.json"), result)
    peers = ", ".join(f"{k} {v.get('version', v['status'])}" for k, v in result["peers"].items())
    print(f"wheels: {result['status']} ({result.get('reason') or ' '.join(result['wheels'])}); peers: {peers}")
    return 0 if result["status"] != "failed" else 1


# --------------------------------------------------------------------------- smoke


def _cases(small: bool = False):
    """(name, op, builder) for the smoke checks; builders take (device, dtype, gen).

    ``small`` (the CPU rehearsal): every size divided down so the whole list runs in seconds
    on a loaded 2-core machine; the cases and code paths stay the same."""
    import torch

    def n(v):  # sizes scale down on the CPU, never below the tie/range structure they test
        return max(16, v // 64) if small else v

    def rand(*shape, g, device, dtype):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    def assign_plain(N, K, D):
        def build(device, dtype, g):
            return dict(x=rand(N, D, g=g, device=device, dtype=dtype),
                        codebook=rand(K, D, g=g, device=device, dtype=dtype))
        return build

    def assign_axis(device, dtype, g):  # three codebooks, each shifted so a mix-up changes the answer
        shift = torch.arange(3).view(3, 1, 1).to(device)
        return dict(x=(rand(3, 200, 40, g=g, device=device, dtype=dtype) + shift).to(dtype),
                    codebook=(rand(3, 700, 40, g=g, device=device, dtype=dtype) + shift).to(dtype))

    def assign_ties(device, dtype, g):  # exact copies 1, 64, 128, 256 and 512 codes later
        c = torch.randint(-4, 5, (1100, 16), generator=g).float()
        for dup in (1, 64, 128, 256, 512):
            c[7 + dup] = c[7]
        x = torch.cat([c[7:8], torch.randint(-4, 5, (50, 16), generator=g).float()])
        return dict(x=x.to(dtype).to(device), codebook=c.to(dtype).to(device), expect_first=7)

    def assign_nan_rows(device, dtype, g):
        x = torch.randn(300, 24, generator=g)
        x[5, 3] = float("nan")
        x[77] = float("inf")
        return dict(x=x.to(dtype).to(device), codebook=rand(500, 24, g=g, device=device, dtype=dtype))

    def indices(N, K, C=None, weights=False):
        def build(device, dtype, g):
            shape = (C, N) if C else (N,)
            idx = torch.randint(-1, K, shape, generator=g)  # -1: masked rows
            idx.view(-1)[: N // 3] = K // 2  # a collapsed code: long runs for the sort / piece paths
            out = dict(indices=idx.to(device), K=K, codebook_axis=C is not None)
            if weights:
                out["weights"] = torch.rand(shape, generator=g).to(device)
            return out
        return build

    def stats(N, K, D, C=None):
        def build(device, dtype, g):
            d = indices(N, K, C)(device, dtype, g)
            x = torch.randn(*((C, N, D) if C else (N, D)), generator=g)
            x[(d["indices"].cpu() < 0)] = float("nan")  # masked rows must stay out of the sums
            d["x"] = x.to(dtype).to(device)
            return d
        return build

    def ema(C, K, D):
        def build(device, dtype, g):
            return dict(cluster_size=torch.rand(C, K, generator=g).to(device) + 0.1,
                        embed_avg=torch.randn(C, K, D, generator=g).to(device),
                        codebook=torch.randn(C, K, D, generator=g).to(dtype).to(device),
                        counts=torch.randint(0, 5, (C, K), generator=g).float().to(device),
                        sums=torch.randn(C, K, D, generator=g).to(device), decay=0.9)
        return build

    return [
        (f"assign N={n(4096)} K={n(16384)} D=256", "assign", assign_plain(n(4096), n(16384), 256)),
        (f"assign N={n(8192)} K={n(4096)} D=8", "assign", assign_plain(n(8192), n(4096), 8)),
        ("assign N=77 K=300 D=33", "assign", assign_plain(77, 300, 33)),
        (f"assign N=16 K={n(65536)} D=64 (split ranges)", "assign", assign_plain(16, n(65536), 64)),
        ("assign C=3 codebook axis", "assign", assign_axis),
        ("assign ties across tiles", "assign", assign_ties),
        ("assign NaN/Inf rows", "assign", assign_nan_rows),
        ("histogram K=1000 masked", "histogram", indices(n(100_000), 1000)),
        ("histogram K>2048 masked (sort path)", "histogram", indices(n(100_000), 3000 if small else 70_000)),
        ("histogram C=4 weighted", "histogram", indices(n(5000), 300, C=4, weights=True)),
        ("cluster_stats K=512 D=64 masked NaN rows", "cluster_stats", stats(n(20_000), 512, 64)),
        ("cluster_stats C=3 K=100 D=33", "cluster_stats", stats(n(3000), 100, 33, C=3)),
        ("ema_update_ C=2 K=1000 D=64", "ema_update_", ema(2, 1000, 64)),
    ]


def _check(op: str, backend: str, args: dict, deterministic: bool = False) -> str:
    """Run ``op`` on ``backend`` and the reference (fp64 where it matters); '' when they agree."""
    import torch
    import vqkernels
    from vqkernels.ops.assign import tolerance
    from vqkernels.ops import _metrics

    if op == "assign":
        problems = []
        x, c = args["x"], args["codebook"]
        x3 = x if x.dim() == 3 else x.unsqueeze(0)  # [C, N, D]
        c3 = c if c.dim() == 3 else c.unsqueeze(0)  # [C, K, D]
        for metric in ("l2", "cosine", "dot"):
            got = vqkernels.assign(x, c, metric, backend=backend)
            ref = vqkernels.assign(x.double(), c.double(), metric, backend="reference")
            g_idx, r_dist = got.indices.reshape(x3.shape[:2]), ref.distances.reshape(x3.shape[:2])
            g_dist = got.distances.reshape(x3.shape[:2])
            for ci in range(x3.shape[0]):
                finite = torch.isfinite(x3[ci]).all(-1)
                if not bool((g_idx[ci][~finite] == -1).all()):
                    problems.append(f"{metric}: non-finite rows of codebook {ci} not marked -1")
                xs, cs = x3[ci][finite], c3[ci]
                idx = g_idx[ci][finite]
                if not bool(((idx >= 0) & (idx < cs.shape[0])).all()):
                    problems.append(f"{metric}: indices out of range in codebook {ci}")
                    continue
                chosen = _metrics.paired_distance(xs.double(), cs.double()[idx], metric)
                bad = chosen > r_dist[ci][finite] + tolerance(xs, cs, metric)
                if bool(bad.any()):
                    problems.append(f"{metric}: {int(bad.sum())} rows of codebook {ci} not nearest "
                                    f"(first {bad.nonzero()[:3].flatten().tolist()})")
                derr = (g_dist[ci][finite].double() - chosen).abs()
                if derr.numel() and not float(derr.max()) <= 1e-3 * (1 + float(chosen.abs().max())):
                    problems.append(f"{metric}: distances of codebook {ci} off by {float(derr.max()):.3g}")
            first = int(got.indices.reshape(-1)[0])
            if "expect_first" in args and metric == "l2" and first != args["expect_first"]:
                problems.append(f"tie went to {first}, not the lowest index {args['expect_first']}")
        return "; ".join(problems)
    if op == "histogram":
        kw = dict(weights=args.get("weights"), codebook_axis=args["codebook_axis"])
        got = vqkernels.histogram(args["indices"], args["K"], backend=backend, **kw)
        ref = vqkernels.histogram(args["indices"], args["K"], backend="reference", **kw)
        ok = torch.equal(got, ref) if kw["weights"] is None else torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
        return "" if ok else f"counts differ (max {float((got.double() - ref.double()).abs().max()):.3g})"
    if op == "cluster_stats":
        problems = []
        for det in (False, True):
            got = vqkernels.cluster_stats(args["x"], args["indices"], args["K"], deterministic=det,
                                          codebook_axis=args["codebook_axis"], backend=backend)
            ref = vqkernels.cluster_stats(args["x"].double(), args["indices"], args["K"],
                                          codebook_axis=args["codebook_axis"], backend="reference")
            if not torch.equal(got.counts.double(), ref.counts):
                problems.append(f"deterministic={det}: counts differ")
            err = float((got.sums.double() - ref.sums).abs().max()) if got.sums.numel() else 0.0
            if not err <= 1e-3 * (1 + float(ref.sums.abs().max())):  # NaN fails too
                problems.append(f"deterministic={det}: sums off by {err:.3g}")
        return "; ".join(problems)
    if op == "ema_update_":
        mine = [args[k].clone() for k in ("cluster_size", "embed_avg", "codebook")]
        ref = [args[k].clone().double() for k in ("cluster_size", "embed_avg", "codebook")]
        vqkernels.ema_update_(*mine, args["counts"], args["sums"], args["decay"], backend=backend)
        vqkernels.ema_update_(*ref, args["counts"].double(), args["sums"].double(), args["decay"], backend="reference")
        tol = 1e-2 if args["codebook"].dtype != torch.float32 else 1e-4
        bad = [n for n, a, b in zip(("cluster_size", "embed_avg", "codebook"), mine, ref)
               if not torch.allclose(a.double(), b, rtol=tol, atol=tol)]
        return f"{', '.join(bad)} differ" if bad else ""
    raise ValueError(f"unknown op {op!r}")


def smoke(device: str, backends: list, dtypes: list, budget: float, out_path: str | None = None,
          only: str | None = None) -> dict:
    """Every case x backend x dtype once, within ``budget`` seconds; the result is written to
    ``out_path`` after every check (so a kill keeps what was done)."""
    import torch

    from vqkernels.ops import _dispatch

    start = time.time()
    result = {"device": device, "budget_s": budget, "checks": [], "skipped": [], "done": False}
    usable = []
    for b in backends:
        why = _dispatch.BACKENDS[b].unavailable(device) if b in _dispatch.BACKENDS else f"no backend {b!r}"
        if why is None:
            usable.append(b)
        else:
            result["skipped"].append({"backend": b, "reason": why})
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for name, op, build in _cases(small=device == "cpu"):
        if only and only not in name:
            continue
        for b in usable:
            for dname in dtypes:
                dtype = dt[dname]
                if op in ("histogram",) and dname != dtypes[0]:
                    continue  # no float input: once per backend
                why = _dispatch.BACKENDS[b].refusal(device, dtype)
                if why is not None:
                    result["skipped"].append({"case": name, "backend": b, "dtype": dname, "reason": why})
                    continue
                if time.time() - start > budget:
                    result["skipped"].append({"case": name, "backend": b, "dtype": dname,
                                              "reason": "time budget spent"})
                    continue
                t0 = time.time()
                try:
                    args = build(device, dtype, torch.Generator().manual_seed(len(name)))
                    problem = _check(op, b, args)
                    if device == "cuda":
                        torch.cuda.synchronize()
                except Exception as exc:
                    problem = f"raised {type(exc).__name__}: {exc}"[:600] + "\n" + traceback.format_exc()[-1200:]
                result["checks"].append({"case": name, "op": op, "backend": b, "dtype": dname, "ok": not problem,
                                         "problem": problem, "seconds": round(time.time() - t0, 3)})
                if out_path:
                    _write_json(out_path, result)
    result["done"] = True
    result["seconds"] = round(time.time() - start, 2)
    result["passed"] = sum(c["ok"] for c in result["checks"])
    result["failed"] = sum(not c["ok"] for c in result["checks"])
    if out_path:
        _write_json(out_path, result)
    return result


def cmd_smoke(args) -> int:
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("smoke: no CUDA device", file=sys.stderr)
            return 2
    res = smoke(args.device, args.backends.split(","), args.dtypes.split(","), args.budget,
                os.path.join(args.out, "smoke.json"), args.only)
    for c in res["checks"]:
        if not c["ok"]:
            print(f"FAILED {c['case']} [{c['backend']} {c['dtype']}]: {c['problem'].splitlines()[0]}")
    print(f"smoke on {args.device}: {res['passed']} passed, {res['failed']} failed, {len(res['skipped'])} skipped "
          f"in {res['seconds']}s")
    return 1 if res["failed"] else 0


# --------------------------------------------------------------------------- phases and summary


def cmd_record(args) -> int:
    _write_json(os.path.join(args.out, "phases", f"{args.name}.json"),
                {"phase": args.name, "status": args.status, "seconds": float(args.seconds), "detail": args.detail,
                 "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return 0


def summarize(out: str) -> tuple[dict, str]:
    """results.json's dict and summary.txt's text from whatever the phases have written."""
    phases = {}
    for path in glob.glob(os.path.join(out, "phases", "*.json")):
        p = _read_json(path)
        if p:
            phases[p["phase"]] = p
    order = [n for n in PHASE_ORDER if n in phases] + sorted(set(phases) - set(PHASE_ORDER))
    results = {"phases": [phases[n] for n in order]}
    for name in ("env", "peers", "smoke"):
        results[name] = _read_json(os.path.join(out, f"{name}.json"))
    lines = []
    env = results["env"] or {}
    lines.append(f"machine: {env.get('gpu') or 'no CUDA device'} {env.get('capability') or ''}; python {env.get('python')}"
                 f" torch {env.get('torch')} triton {env.get('triton')}")
    for p in results["phases"]:
        lines.append(f"{p['phase']:<12} {p['status']:<8} {p['seconds']:>6.0f}s  {p['detail']}")
    sm = results["smoke"]
    if sm:
        lines.append(f"smoke: {sm.get('passed', sum(c['ok'] for c in sm['checks']))} passed, "
                     f"{sum(not c['ok'] for c in sm['checks'])} failed, {len(sm['skipped'])} skipped"
                     + ("" if sm.get("done") else " (cut short)"))
        for c in sm["checks"]:
            if not c["ok"]:
                first_line = c["problem"].splitlines()[0][:200]
                lines.append(f"  FAILED {c['case']} [{c['backend']} {c['dtype']}]: {first_line}")
    if results["peers"]:
        lines.append("peers: " + ", ".join(f"{k}: {v.get('version') or v.get('reason')}"
                                           for k, v in results["peers"].get("peers", {}).items()))
    bench = []
    for name in ("bench_core", "bench_full"):
        data = _read_json(os.path.join(out, name, "gpu_bench.json"))
        if data:
            rows = data.get("rows", data if isinstance(data, list) else [])
            bench.append(f"{name}: {len(rows)} rows in {name}/gpu_bench.json")
    lines.extend(bench)
    results["ok"] = bool(results["phases"]) and all(p["status"] in ("ok", "skipped") for p in results["phases"])
    return results, "\n".join(lines) + "\n"


def cmd_summary(args) -> int:
    results, text = summarize(args.out)
    _write_json(os.path.join(args.out, "results.json"), results)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text)
    if not args.quiet:
        print(text, end="")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p = sub.add_parser("wheels")
    p.add_argument("--out", required=True)
    p.add_argument("--wheels", default=".whl")
    p.add_argument("--target", required=True)
    p = sub.add_parser("smoke")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--backends", default="triton,cuda,chunked")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--budget", type=float, default=60.0)
    p.add_argument("--only", help="only cases whose name contains this")
    p = sub.add_parser("record")
    p.add_argument("--out", required=True)
    p.add_argument("name")
    p.add_argument("status", choices=["ok", "failed", "skipped", "timeout"])
    p.add_argument("seconds")
    p.add_argument("detail", nargs="?", default="")
    p = sub.add_parser("summary")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return {"env": cmd_env, "wheels": cmd_wheels, "smoke": cmd_smoke, "record": cmd_record,
            "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
