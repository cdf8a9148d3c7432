"""``spanfill demo | info | check``: the command line.

``demo`` shows both jobs end to end and checks them against the reference;
``info`` says which path each op takes on this machine; ``check`` is a quick
self-test of every op's Triton kernels (in Triton's interpreter on a CPU).
The benchmarks are not part of the installed package: from a checkout of the
repository, run ``python -m bench.run``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from typing import Sequence

from .backends import interpreting
from .op_path import path_name, pick_device

OPS = ("padded_prefill", "varlen_prefill", "span_prefill", "append_kv")


def _use_interpreter(flag: bool) -> None:
    # Must happen before spanfill.kernels (and so triton.jit) is first imported.
    if flag:
        os.environ["TRITON_INTERPRET"] = "1"


# ----------------------------------------------------------------------------- info

def cmd_info(args: argparse.Namespace) -> int:
    import torch
    import triton

    import spanfill

    device = pick_device(args.device)
    print(f"spanfill {spanfill.__version__}")
    print(f"torch    {torch.__version__}")
    print(f"triton   {triton.__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    if device.type == "cuda":
        print(f"device   {device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})")
    else:
        print(f"device   {device} (no CUDA GPU visible)" if not torch.cuda.is_available()
              else f"device   {device}")
    env = {k: os.environ[k] for k in ("SPANFILL_BACKEND", "TRITON_INTERPRET") if k in os.environ}
    print(f"env      {env or '(no SPANFILL_BACKEND / TRITON_INTERPRET set)'}")
    path = path_name(device)
    for op in OPS:
        print(f"  {op:<16} -> {path}")
    from .backends.explain import example_problems, explain

    print("backend and launch config of typical calls (backend= / SPANFILL_BACKEND override):")
    for label, problem in example_problems(device):
        print(f"  {label}\n{'':18}{explain(problem)}")
    return 0


# ----------------------------------------------------------------------------- check

def _rerun_interpreted(argv: list[str]) -> int:
    """Run ``spanfill <argv>`` in a fresh Python with ``TRITON_INTERPRET=1``; its exit code.

    Triton decides whether a kernel is interpreted when the kernel is defined, and
    this process may have imported the kernels already (a notebook, a test run): only
    a new process is sure to have the variable set first.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    # The same spanfill as this process's, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    print("on the CPU the Triton kernels run in Triton's interpreter: re-running in a "
          "subprocess with TRITON_INTERPRET=1", flush=True)
    return subprocess.run([sys.executable, "-m", "spanfill", *argv], env=env).returncode


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"spanfill check: --device {args.device} but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"spanfill check runs on cuda or cpu, not {device}", file=sys.stderr)
        return 2
    if device.type == "cpu" and not interpreting():
        return _rerun_interpreted(["check", "--device", "cpu"])

    from .selfcheck import kernel_dtypes, run_checks

    if not interpreting():
        where = f"on {torch.cuda.get_device_name(device)}"
    elif device.type == "cpu":
        where = "in Triton's interpreter (TRITON_INTERPRET=1), CPU"
    else:
        where = f"in Triton's interpreter (TRITON_INTERPRET=1), tensors on {device}"
    print(f"spanfill check on {device}")
    print(f"path: triton kernels {where}, against the reference")
    # backend="triton": an op that cannot take the kernel path raises instead of
    # quietly comparing the reference with itself.
    failures = run_checks(device, kernel_dtypes(device), backend="triton", verbose=True)
    print("all ops match the reference" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


# ----------------------------------------------------------------------------- demo

def cmd_demo(args: argparse.Namespace) -> int:
    from .selfcheck import basic_demo

    _use_interpreter(args.interpret)
    device = pick_device(args.device)
    ok = basic_demo(device)
    if args.basic:
        return 0 if ok else 1
    try:
        from .demo import main_demo
    except ImportError as err:
        print(f"\n(the main demo needs the demo extras: {err}; pip install -e '.[demo]')")
        return 0 if ok else 1
    ok = main_demo(device, out=args.out, quick=args.quick) and ok
    return 0 if ok else 1


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spanfill", description=__doc__.splitlines()[0],
        epilog="benchmarks: python -m bench.run, from a checkout of the spanfill repository")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="show both jobs end to end, checked against the reference")
    demo.add_argument("--basic", action="store_true",
                      help="only the small example of both ops (no model)")
    demo.add_argument("--quick", action="store_true", help="a smaller model and prompt")
    demo.add_argument("--out", default="spanfill_demo.png", help="where to write the picture")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--interpret", action="store_true",
                      help="on the CPU, run the Triton kernels in the interpreter")
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="versions, device, and the path each op takes")
    info.add_argument("--device", default=None)
    info.set_defaults(func=cmd_info)

    check = sub.add_parser("check", help="quick self-check of every op's Triton kernels against "
                                         "the reference (on a CPU, in Triton's interpreter)")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
