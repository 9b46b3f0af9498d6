"""Helpers shared by the Triton kernels of every op (imported only by ``ops/<op>/triton.py``).

Nothing here runs at ``import vqkernels``: the dispatcher imports a Triton backend module
on first use, and that module imports this one.

* :func:`interpreting` — True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors,
  slowly): launchers then use one small fixed config instead of autotuning, because
  timing configs in the interpreter measures Python, not the kernel.
* :func:`dot_precision` — the ``tl.dot(input_precision=...)`` that honours
  ``torch.get_float32_matmul_precision()`` for fp32 inputs.
* :func:`num_programs` — a persistent-style grid size (a few programs per SM).
* :func:`smem_bytes_ok` — config pruning by a shared-memory estimate.
* :func:`block_and` — ``mask & scalar_condition`` in a form the interpreter accepts.
* :func:`compile_resources` / ``python -m vqkernels.ops._triton_utils`` — compile every
  kernel variant the launchers can choose for sm_90 on a machine without a GPU and report
  its shared memory, registers and spills (each op's ``compile_cases()`` lists them).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile

import torch
import triton
import triton.language as tl

# Largest shared memory we plan a config for. Hopper allows 227 KiB per block; staying
# under 200 KiB leaves room for the compiler's own scratch (reductions, layout changes).
SMEM_BUDGET = 200 * 1024

# torch.get_float32_matmul_precision() -> tl.dot input_precision for fp32 operands.
# "highest" promises fp32 products (no tensor-core rounding): "ieee". "high" allows a
# little rounding: "tf32x3" (three tf32 products, about fp32 accuracy at a third of the
# tf32 rate). "medium" allows tf32: one tf32 product, 10-bit mantissas.
_FP32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for a ``tl.dot`` on ``dtype`` operands (a constexpr of the kernels).

    fp16/bf16 products are exact in the fp32 accumulator, so the setting only matters
    for fp32; they get "ieee", which Triton ignores for 16-bit operands, so that one
    compiled variant serves every precision setting.
    """
    if dtype != torch.float32:
        return "ieee"
    return _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def uses_tf32(dtype: torch.dtype) -> bool:
    """True when fp32 ``assign`` scores are computed with tf32-rounded operands."""
    return dtype == torch.float32 and dot_precision(dtype) != "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 for CPU tensors (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Grid size for a grid-stride kernel: enough programs to fill the GPU, no more than the work."""
    return max(1, min(work_items, per_sm * sm_count(device)))


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def smem_bytes_ok(nbytes: int) -> bool:
    return nbytes <= SMEM_BUDGET


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@triton.jit
def div_rn(a, b):
    """``a / b`` rounded to nearest (IEEE): fp32 ``/`` compiles to the approximate
    ``div.full.f32`` (2 ulp), so fp32 takes ``tl.div_rn``; fp64 ``/`` is already ``div.rn.f64``
    (and ``tl.div_rn`` takes fp32 only)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def block_and(block_mask, cond):
    """``block_mask & cond`` for a scalar ``cond``, broadcast explicitly (the interpreter
    rejects a mask built from a block and a scalar boolean)."""
    return block_mask & ((block_mask.to(tl.int32) * 0 + cond.to(tl.int32)) != 0)


# --------------------------------------------------------------------------- compile check

# What one thread block may use on sm_90 (H100 / H200): 227 KiB of shared memory (of the
# 228 KiB per SM, 1 KiB is reserved) and 255 registers per thread. A config above either
# fails to launch (shared memory) or spills to local memory (registers) on the GPU.
SM90_SMEM_LIMIT = 227 * 1024
SM90_REG_LIMIT = 255
SM90_REGS_PER_SM = 65536


def compile_case(name: str, fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    """One kernel variant to compile: the raw ``@triton.jit`` function, its argument types
    (``"*bf16"``, ``"i32"``, ...) and constexpr values, as the launcher would pass them."""
    return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                num_stages=num_stages)


def _cuobjdump():
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def compile_resources(case: dict, capability: int = 90) -> dict:
    """Compile one case for ``sm_<capability>`` (no GPU needed) and read its resources.

    Returns ``{"shared": bytes, "regs": int | None, "spill": local-memory bytes | None}``;
    registers and spills come from ``cuobjdump --dump-resource-usage`` of the cubin (None
    when no cuobjdump is found). Raises whatever the compiler raises."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, consts = case["fn"], case["signature"], case["constexprs"]
    # Pointers 16-byte aligned, as torch allocations are (and as Triton specialises them).
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
    full = dict(sig, **{k: "constexpr" for k in consts})
    kernel = triton.compile(ASTSource(fn, full, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))
    out = {"shared": int(kernel.metadata.shared), "regs": None, "spill": None}
    tool = _cuobjdump()
    if tool and "cubin" in kernel.asm:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", usage)
        local = re.search(r"LOCAL:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        if regs:
            out["regs"] = int(regs.group(1))
        if local:  # local memory (and a stack frame) in a kernel with no local arrays: spills
            out["spill"] = int(local.group(1)) + (int(stack.group(1)) if stack else 0)
    return out


def fits_sm90(res: dict) -> list:
    """Why a compiled variant cannot run well on sm_90 (empty list: it fits)."""
    why = []
    if res["shared"] > SM90_SMEM_LIMIT:
        why.append(f"shared memory {res['shared']} B > {SM90_SMEM_LIMIT} B")
    if res["regs"] is not None and res["regs"] > SM90_REG_LIMIT:
        why.append(f"{res['regs']} registers > {SM90_REG_LIMIT}")
    if res["spill"]:
        why.append(f"{res['spill']} B of register spills")
    return why


def ctas_per_sm(res: dict, num_warps: int) -> int:
    """Thread blocks of this variant resident per SM on sm_90 (registers and shared memory)."""
    threads = 32 * num_warps
    regs = res["regs"] or 0
    # registers are allocated per warp in units of 256 (8 per thread)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM90_REGS_PER_SM // (per_warp * num_warps) if regs else 32
    by_smem = (228 * 1024) // max(res["shared"] + 1024, 1)
    return max(0, min(by_regs, by_smem, 2048 // threads, 32))


def all_compile_cases() -> list:
    """Every kernel variant of every op that a launcher can choose (see each ``compile_cases``)."""
    from .assign import triton as assign_t
    from .cluster_stats import triton as stats_t
    from .ema_update import triton as ema_t
    from .histogram import triton as hist_t
    from .residual_assign import triton as rassign_t

    return [*assign_t.compile_cases(), *hist_t.compile_cases(), *stats_t.compile_cases(), *ema_t.compile_cases(),
            *rassign_t.compile_cases()]


def _describe(case: dict) -> str:
    consts = ",".join(f"{k}={v}" for k, v in case["constexprs"].items() if k != "INTERP")
    ptrs = ",".join(sorted({v for v in case["signature"].values() if v.startswith("*")}))
    return f"{case['name']}[{consts}; w{case['num_warps']} s{case['num_stages']}; {ptrs}]"


def _compile_one(i: int):
    case = all_compile_cases()[i]
    try:
        res = compile_resources(case)
        return dict(case=_describe(case), kernel=case["name"], **res, ctas_per_sm=ctas_per_sm(res, case["num_warps"]),
                    problems=fits_sm90(res))
    except Exception as exc:  # a compiler error is a result too: report it with the case
        return dict(case=_describe(case), kernel=case["name"], shared=None, regs=None, spill=None, ctas_per_sm=0,
                    problems=[f"compile error: {type(exc).__name__}: {str(exc)[:400]}"])


def compile_report(workers: int = 0) -> list:
    """Compile every case (in ``workers`` processes; 0: one per CPU) and return one row each."""
    import concurrent.futures as cf
    import multiprocessing as mp

    n = len(all_compile_cases())
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_compile_one(i) for i in range(n)]
    from vqkernels.ops import _triton_utils as this  # by package name: picklable from ``python -m``

    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(this._compile_one, range(n)))


def main(argv=None) -> int:
    """``python -m vqkernels.ops._triton_utils [--json PATH] [--workers N]``: the sm_90 table."""
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    rows = compile_report(args.workers)
    for r in rows:
        shared, regs, spill = ("-" if r[k] is None else r[k] for k in ("shared", "regs", "spill"))
        print(f"{shared:>7} B smem {regs:>4} regs {spill:>5} spill {r['ctas_per_sm']:>2} CTA/SM  {r['case']}"
              + (f"  <-- {'; '.join(r['problems'])}" if r["problems"] else ""))
    bad = [r for r in rows if r["problems"]]
    print(f"{len(rows)} variants compiled for sm_90 in {time.time() - start:.0f}s; {len(bad)} do not fit")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    raise SystemExit(main())
