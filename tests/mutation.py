"""Mutation testing of the definitions and the portable fast paths: `make mutation`.

    python tests/mutation.py [GROUP ...] [--jobs N] [--list]

Each GROUP (default: every group whose files exist) names source files to mutate and the
fast subset of tests that covers them. mutmut 3 runs on a COPY: for each group this script
copies vqkernels/, tests/ and pyproject.toml into mutants/<group>/ (git-ignored), writes a
setup.cfg with that group's [mutmut] section there and runs mutmut inside it, so nothing in
the working tree is ever rewritten. It then prints, per source file, the mutants killed,
the survivors with their diffs, and the score (killed / tested).

Mutants that cannot change behaviour (equivalent mutants) are listed in docs/testing.md;
the score there discounts them. To mutate another module, add or edit a group below.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_TRITON = "not triton and not cuda"

# group: (files to mutate, pytest arguments selecting the tests that cover them). The test
# lists are the fast, backend-independent checks; mutmut then runs, per mutant, only the
# selected tests that called the mutated function.
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "assign": (
        ["vqkernels/ops/assign/reference.py", "vqkernels/ops/assign/chunked.py"],
        ["tests/test_definitions.py", "tests/test_ops.py", "tests/test_assign_ties.py", "tests/test_assign_mutants.py",
         "-k", f"assign and {NOT_TRITON}"],
    ),
    "histogram": (
        ["vqkernels/ops/histogram/reference.py", "vqkernels/ops/histogram/chunked.py"],
        ["tests/test_definitions.py", "tests/test_ops.py", "tests/test_histogram_mutants.py",
         "-k", f"histogram and {NOT_TRITON}"],
    ),
    "cluster_stats": (
        ["vqkernels/ops/cluster_stats/reference.py", "vqkernels/ops/cluster_stats/chunked.py"],
        ["tests/test_definitions.py", "tests/test_ops.py", "tests/test_cluster_stats_mutants.py",
         "-k", f"cluster_stats and {NOT_TRITON}"],
    ),
    "ema_update": (
        ["vqkernels/ops/ema_update/reference.py", "vqkernels/ops/ema_update/chunked.py"],
        ["tests/test_definitions.py", "tests/test_ops.py", "tests/test_ema_update_mutants.py",
         "-k", f"ema_update and {NOT_TRITON}"],
    ),
    # The fused residual encoder: the stage loop every stage-by-stage backend shares
    # (reference.staged) and the chunked entry; its op tests, then the quantizers' fused eval.
    "residual_assign": (
        ["vqkernels/ops/residual_assign/reference.py", "vqkernels/ops/residual_assign/chunked.py"],
        ["tests/test_residual_assign.py", "tests/test_residual_fused_eval.py", "tests/test_residual_sizes.py",
         "-k", NOT_TRITON],
    ),
    # The codebook state: EMA update, k-means init, dead-code restart and the Deferred
    # Quantization reservoir + switch (vqkernels/codebook.py; vqkernels/quantizer.py before
    # the split). Slower: each mutant runs Quantizer training steps.
    "codebook": (
        ["vqkernels/codebook.py"],
        [
            "tests/test_codebook_mutants.py", "tests/test_codebook_axis.py", "tests/test_quantizer.py",
            "tests/test_nonfinite.py", "tests/test_determinism.py", "tests/test_errors.py", "tests/test_kmeans.py",
            "tests/test_checkpoints.py", "tests/test_resume.py", "tests/test_residual_quantizer.py", "tests/test_dropin.py",
            # dynamo cannot trace mutmut's trampolines with fullgraph=True (its stats pass fails)
            "-k", f"{NOT_TRITON} and not test_options_compile_fullgraph_and_match_eager",
        ],
    ),
    # The index helpers every histogram / cluster_stats backend shares (masked entries, the
    # flat C * K bins): their own tests, then the ops that use them.
    "indices": (
        ["vqkernels/ops/_indices.py"],
        ["tests/test_indices.py", "tests/test_definitions.py", "tests/test_codebook_axis.py", "-k", NOT_TRITON],
    ),
}

# a mutant that hangs (timeout) or crashes the interpreter (segfault) was detected too
STATUS_KILLED = {"killed", "caught by type check", "timeout", "segfault"}
STATUS_UNTESTED = {"no tests", "skipped", "not checked"}


def _undecorate_no_grad(path: Path) -> int:
    """mutmut 3 does not mutate decorated functions: in the COPY, turn each method decorated
    only with ``@torch.no_grad()`` into the same method whose body (after its docstring) runs
    under ``with torch.no_grad():``. Same behaviour; returns how many were rewritten."""
    import ast

    lines = path.read_text().splitlines(keepends=True)
    found = []
    for node in ast.walk(ast.parse("".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.decorator_list) == 1:
            if ast.unparse(node.decorator_list[0]) == "torch.no_grad()":
                found.append(node)
    for node in sorted(found, key=lambda n: n.lineno, reverse=True):  # bottom up: line numbers stay valid
        body = node.body
        if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and len(body) > 1:
            body = body[1:]  # keep the docstring outside the with
        first, last = body[0].lineno - 1, node.end_lineno
        indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
        block = [("    " + ln if ln.strip() else ln) for ln in lines[first:last]]
        lines[first:last] = [f"{indent}with torch.no_grad():\n"] + block
        deco = node.decorator_list[0].lineno - 1
        del lines[deco]
    path.write_text("".join(lines))
    return len(found)


def _prepare(group: str, files: list[str], tests: list[str], jobs: int) -> Path:
    work = ROOT / "mutants" / group
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", "mutation.py")
    shutil.copytree(ROOT / "vqkernels", work / "vqkernels", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    for f in files:
        n = _undecorate_no_grad(work / f)
        if n:
            print(f"{f}: {n} @torch.no_grad() methods rewritten as `with torch.no_grad():` in the copy (mutmut skips decorated functions)")
    # the C++ sources: the cpu backend (JIT-built, reused from the cache for unchanged sources)
    # runs in the copy too, so its tests exercise the Python code it shares (staged, chunked calls)
    shutil.copytree(ROOT / "csrc", work / "csrc", ignore=ignore)
    if "[tool.mutmut]" in (work / "pyproject.toml").read_text():
        sys.exit("pyproject.toml holds a [tool.mutmut] section, which would override the group's setup.cfg")
    lines = ["[mutmut]", "source_paths = vqkernels", "also_copy =", "    csrc", "only_mutate ="]
    lines += [f"    {f}" for f in files]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {a}" for a in tests]
    # -p no:cacheprovider: the copy must not write .pytest_cache next to the real one
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider"]
    # torch is not fork-safe once its thread pools started: fork workers from a clean server
    lines += ["process_isolation = forkserver", "use_git_change_detection = false", ""]
    (work / "setup.cfg").write_text("\n".join(lines))
    return work


def _mutmut(work: Path, *args: str, capture: bool = False) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([str(exe), *args], cwd=work, env=env, text=True, capture_output=capture)
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(f"mutmut {' '.join(args)} failed in {work} (exit {proc.returncode})")
    return proc.stdout if capture else ""


def _report(group: str, work: Path, files: list[str]) -> dict[str, Counter]:
    out = _mutmut(work, "results", "--all", "true", capture=True)
    by_file: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    for line in out.splitlines():
        m = re.match(r"\s+(\S+): (.+)$", line)
        if not m:
            continue
        name, status = m.groups()
        module = name.split(".x_")[0].split(".x\u01c1")[0]
        by_file[module][status] += 1
        if status not in STATUS_KILLED and status not in STATUS_UNTESTED:
            survivors.append((name, status))
    print(f"\n=== {group}: per module")
    for module, counts in sorted(by_file.items()):
        killed = sum(counts[s] for s in STATUS_KILLED)
        tested = sum(n for s, n in counts.items() if s not in STATUS_UNTESTED)
        score = 100.0 * killed / tested if tested else float("nan")
        print(f"{module}: {killed}/{tested} killed ({score:.1f}%)  {dict(counts)}")
    for name, status in survivors:
        print(f"\n--- {status}: {name}")
        print(_mutmut(work, "show", name, capture=True).strip())
    return by_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="*", help=f"groups to run (default: all whose files exist): {', '.join(GROUPS)}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="mutants tested in parallel")
    parser.add_argument("--list", action="store_true", help="print the groups, their files and tests, and exit")
    parser.add_argument(
        "--only", nargs="+", metavar="MUTANT", default=[],
        help="run only these mutants (names as mutmut prints them; * wildcards), e.g. to re-check survivors",
    )
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; expected some of {list(GROUPS)}")
    chosen = args.groups or [g for g, (files, _) in GROUPS.items() if all((ROOT / f).exists() for f in files)]
    for group in chosen:
        files, tests = GROUPS[group]
        missing = [f for f in files if not (ROOT / f).exists()]
        if args.list or missing:
            print(f"{group}: mutate {files}{' (MISSING: ' + str(missing) + ')' if missing else ''}; tests {tests}")
            continue
        work = _prepare(group, files, tests, args.jobs)
        print(f"=== {group}: mutmut in {work.relative_to(ROOT)}", flush=True)
        _mutmut(work, "run", "--max-children", str(args.jobs), *args.only)
        _report(group, work, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
