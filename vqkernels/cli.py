"""The ``vqkernels`` command: ``demo`` (the paper's finding), ``diagnose`` (a saved quantizer's codebook health), ``bench`` and ``info``."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # not installed, or broken: say which
        return f"not available ({type(exc).__name__})"
    return getattr(mod, "__version__", "installed")


def info_lines() -> list[str]:
    """What ``vqkernels info`` prints: versions, devices, every backend and why it is unavailable."""
    import torch

    import vqkernels
    from vqkernels import _cpu_extension, _extension
    from vqkernels.ops import _dispatch

    lines = [
        f"vqkernels {vqkernels.__version__}",
        f"python    {platform.python_version()} ({platform.machine()}, {platform.system()})",
        f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton    {_version('triton')}",
        f"numpy     {_version('numpy')}",
        f"cpu       {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}    {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("cuda      no CUDA device")
    lines.append(f"extension vqkernels._C: {_extension.status()}")
    lines.append(f"extension vqkernels._C_cpu: {_cpu_extension.status()}")
    lines.append("backends  (device: available / reason)")
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device_type in device_types:
        auto = _dispatch.automatic_order(device_type)
        for name, reason in _dispatch.availability(device_type).items():
            state = "available" if reason is None else f"unavailable: {reason}"
            tag = " (automatic choice order: %d)" % (auto.index(name) + 1) if name in auto and reason is None else ""
            lines.append(f"  {device_type:<5} {name:<10} {state}{tag}")
    try:
        forced = _dispatch.requested_backend(None)
        lines.append(f"VQKERNELS_BACKEND={forced or '(unset: automatic)'}")
    except ValueError as exc:  # a bad value must not hide the rest of the report it is needed with
        lines.append(f"VQKERNELS_BACKEND is invalid (every op call will raise): {exc}")
    return lines


def _info(args) -> int:
    lines = info_lines()
    print("\n".join(lines))
    return 2 if lines[-1].startswith("VQKERNELS_BACKEND is invalid") else 0


def _demo_parser(sub):
    p = sub.add_parser("demo", help="train early vs deferred quantization and compare codebook health")
    try:
        from vqkernels import demo
    except ImportError as exc:  # demo not available in this build
        p.set_defaults(func=lambda a: _missing("demo", exc))
        return
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)


def _diagnose_parser(sub):
    p = sub.add_parser("diagnose", help="codebook health of a saved quantizer (per head / stage); with embeddings, "
                       "usage, shrinkage, coverage and a PNG")
    from vqkernels import diagnose

    diagnose.add_arguments(p)
    p.set_defaults(func=diagnose.run)


def _bench_parser(sub):
    p = sub.add_parser("bench", help="benchmark every backend and installed peer side by side")
    try:
        from vqkernels import bench
    except ImportError as exc:
        p.set_defaults(func=lambda a: _missing("bench", exc))
        return
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)


def _missing(what, exc) -> int:
    print(f"vqkernels {what} is not available: {exc}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _diagnose_parser(sub)
    _bench_parser(sub)
    p = sub.add_parser("info", help="versions, devices and which backends are available (and why not)")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
