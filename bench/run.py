"""``python -m bench.run``: check every provider against the reference, then time it.

    python -m bench.run [--suite core|sweep|all] [--only NAMES] [--out DIR]
                        [--flashinfer] [--smoke]

A provider that raises, or whose output fails the check, becomes a row of the
CSV and the run goes on. Rows are written (and flushed) as they are measured, so
an interrupted run keeps what it had.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from . import providers as prov
from .providers_base import Unsupported
from .check import padded_checker, segmented_checker, tolerance
from .micro import micro_rows
from .report import COLUMNS, markdown, write_plots
from .timing import L2_FLUSH_NOTE, time_device, time_wall
from .workloads import Workload, core_workloads, sweep_workloads

Row = dict[str, object]


# ----------------------------------------------------------------------------- output

def environment(device: torch.device) -> dict[str, str]:
    """gpu, torch, triton, commit, date columns shared by every row."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu-{platform.machine()}"
    commit = os.environ.get("SPANFILL_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
        except Exception:
            commit = ""
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version,
            "commit": commit or "unknown",
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


class Sink:
    """Appends rows to a CSV (flushed per row) and keeps them for the report."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = env
        self.rows: list[Row] = []
        self._fh = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=COLUMNS)
        self._writer.writeheader()

    def write(self, row: Row) -> None:
        full = {c: "" for c in COLUMNS}
        full.update(self.env)
        full.update({k: ("" if v is None else v) for k, v in row.items()})
        for key in ("p50", "p20", "p80", "tflops"):
            if isinstance(full[key], float):
                full[key] = f"{full[key]:.6g}"
        self.rows.append(full)
        self._writer.writerow(full)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


# ----------------------------------------------------------------------------- running

def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _error_row(sink: Sink, base: Row, provider: str, exc: BaseException) -> None:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
    sink.write({**base, "provider": provider, "metric": "error", "note": msg})
    _say(f"[error] {base.get('workload')} / {provider}: {msg}")


def _skipped_row(sink: Sink, base: Row, provider: str, exc: Unsupported) -> None:
    """A provider that cannot compute this workload: a ``skipped`` row, not an error."""
    msg = f"skipped: {exc}".replace("\n", " ")[:400]
    sink.write({**base, "provider": provider, "metric": "skipped", "note": msg})
    _say(f"[skip] {base.get('workload')} / {provider}: {exc}")


def _release(device: torch.device, collect: bool = True) -> None:
    """Give a finished run's GPU memory back (nothing to do on a CPU)."""
    if device.type != "cuda":
        return
    if collect:  # gc.collect() takes ~0.2 s with torch loaded: once per workload, not per run
        gc.collect()
    torch.cuda.empty_cache()


def run_provider(name: str, fn: Callable, w: Workload, tensors: object, checker: Callable,
                 base: Row, sink: Sink, device: torch.device, dtype: torch.dtype,
                 timing: dict) -> None:
    """Prepare, check, then time one provider; every failure becomes a row."""
    prep = fn(w, tensors)
    window = int(getattr(w, "window_left", -1))
    if window >= 0 and f"window_left={window}" not in prep.note:
        prep.note = f"{prep.note}; window_left={window}" if prep.note else f"window_left={window}"
    t0 = time.perf_counter()
    quant_err = None
    if prep.own_check is not None:
        err = prep.own_check()
    else:
        out = prep.output()
        err = (prep.checker or checker)(out)
        if prep.checker is not None:
            quant_err = checker(out)
        del out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    tol = tolerance(dtype)
    ok = err <= tol
    verdict = "pass" if ok else ("expected wrong" if prep.expect_wrong else "FAIL")
    sink.write({**base, "provider": name, "metric": "check_relerr", "unit": "rel",
                "p50": err if math.isfinite(err) else "inf",
                "note": f"{verdict} (tol {tol:g}); check incl. first call {first:.2f} s; "
                        f"{prep.note}"})
    if quant_err is not None:
        sink.write({**base, "provider": name, "metric": "quant_relerr", "unit": "rel",
                    "p50": quant_err if math.isfinite(quant_err) else "inf",
                    "note": f"vs the reference on the workload's own "
                            f"{str(dtype).removeprefix('torch.')} inputs, same rows: the accuracy "
                            f"cost of the provider's inputs (informational, no tolerance)"})
    if not ok and not prep.expect_wrong:
        _say(f"[check FAIL] {base['workload']} / {name}: relerr {err:.3g} > {tol:g}; not timed")
        return
    stats = time_device(prep.run, device, **timing)
    flops = prep.flops if prep.flops is not None else w.flops
    sink.write({**base, "provider": name, "metric": "kernel_time", "unit": "ms",
                "p50": stats.p50, "p20": stats.p20, "p80": stats.p80,
                "tflops": flops / (stats.p50 * 1e-3) / 1e12,
                "note": f"{prep.note}; {stats.reps} reps; "
                        f"{L2_FLUSH_NOTE if device.type == 'cuda' else 'host clock'}"})
    if prep.tile_work is not None:
        work = prep.tile_work()
        sink.write({**base, "provider": name, "metric": "tile_work", "unit": "x counted",
                    "p50": work.ratio,
                    "note": f"KV positions the kernel's tiles compute (all block_q token slots, "
                            f"whole BLOCK_N steps) / positions the valid rows see; row fill "
                            f"{work.row_fill:.3f} over {work.tiles} tiles per head"})
    if prep.host is not None:
        per_call = _host_time(prep.host, device)
        sink.write({**base, "provider": name, "metric": "host_time", "unit": "ms",
                    "p50": per_call, "p20": per_call, "p80": per_call,
                    "note": f"{prep.note}; host wall clock per call over {HOST_CALLS} calls in a "
                            f"row, no sync inside (the device may run behind)"})
    if prep.plan is not None:
        plan_timing = {k: v for k, v in timing.items() if k != "flush_l2"}
        stats = time_wall(prep.plan, device, **plan_timing)
        sink.write({**base, "provider": name, "metric": "plan_time", "unit": "ms",
                    "p50": stats.p50, "p20": stats.p20, "p80": stats.p80,
                    "note": f"{prep.note}; host wall clock incl. device sync; {stats.reps} reps"})


HOST_CALLS = 50


def _host_time(fn: Callable[[], object], device: torch.device) -> float:
    """Host milliseconds per call of ``fn`` issued back to back (one sync, after)."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return elapsed * 1e3 / HOST_CALLS


def run_workload(w: Workload, names: list[str], sink: Sink, device: torch.device,
                 dtype: torch.dtype, timing: dict, step: Callable[[], None]) -> None:
    """All providers ``names`` on one workload."""
    segmented = w.kind == "segmented"
    registry = prov.SEGMENTED if segmented else prov.PADDED
    base = {"kernel": "span_prefill" if segmented else "padded_prefill", "workload": w.name,
            "x": "" if w.x is None else w.x}
    try:
        tensors = w.make(device, dtype)
        checker = (segmented_checker if segmented else padded_checker)(w, tensors)
    except Exception as exc:
        _error_row(sink, base, "(workload)", exc)
        for _ in names:
            step()
        _release(device)
        return
    for name in names:
        try:
            run_provider(name, registry[name], w, tensors, checker, base, sink, device, dtype,
                         timing)
        except Unsupported as exc:
            _skipped_row(sink, base, name, exc)
        except Exception as exc:
            _error_row(sink, base, name, exc)
            del exc
            _release(device)  # a failed run's tensors can sit in reference cycles
        finally:
            _release(device, collect=False)
            step()
    del tensors, checker
    _release(device)


# ----------------------------------------------------------------------------- CLI

def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("core", "sweep", "all"), default="core")
    p.add_argument("--only", default="",
                   help="comma-separated workload names (few_big, sweep:context or context, "
                        "micro) and/or provider names (spanfill, flex, ...) to keep")
    p.add_argument("--skip", default="",
                   help="comma-separated workload and/or provider names to leave out")
    p.add_argument("--out", default=None, help="results folder (default bench/results; "
                                               "a temporary folder with --smoke)")
    p.add_argument("--flashinfer", action="store_true",
                   help="add the FlashInfer providers (skipped with a line if the import fails)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny workloads on the CPU in fp32, few reps: exercises the code paths")
    p.add_argument("--min-reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _at_home(provider: str, names_w: set[str], wanted_w: set[str], wanted_p: set[str]) -> bool:
    """Whether ``provider`` runs on the workload called ``names_w``: anywhere, unless
    it has :data:`bench.providers.HOME_WORKLOADS`; then there, or where ``--only``
    names both it and the workload."""
    home = prov.HOME_WORKLOADS.get(provider)
    if home is None or names_w & home:
        return True
    return provider in wanted_p and bool(names_w & wanted_w)


def _plan_tasks(args: argparse.Namespace, flashinfer_ok: bool,
                fa4_ok: bool = False) -> tuple[list, list[str]]:
    """Workloads with their provider lists, and whether the micro-benchmarks run."""
    small = args.smoke
    workloads = []
    if args.suite in ("core", "all"):
        workloads += [(w, False) for w in core_workloads(small, args.seed)]
    if args.suite in ("sweep", "all"):
        workloads += [(w, True) for w in sweep_workloads(small, args.seed)]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    all_providers = set(prov.SEGMENTED) | set(prov.PADDED)
    wanted_w = {s for s in only if s not in all_providers}
    wanted_p = only & all_providers
    known_w = {n for w, _ in workloads for n in (w.name, w.name.split(":")[-1])} | {"micro"}
    unknown = wanted_w - known_w
    if unknown:
        raise SystemExit(f"--only: unknown names {sorted(unknown)}; workloads: {sorted(known_w)}, "
                         f"providers: {sorted(all_providers)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - known_w - all_providers
    if unknown:
        raise SystemExit(f"--skip: unknown names {sorted(unknown)}")
    tasks = []
    for w, in_sweep in workloads:
        names_w = {w.name, w.name.split(":")[-1]}
        if (wanted_w and not names_w & wanted_w) or names_w & skip:
            continue
        registry = prov.SEGMENTED if w.kind == "segmented" else prov.PADDED
        names = [n for n in registry
                 if (n in wanted_p if wanted_p else (not in_sweep or n in prov.SWEEP_PROVIDERS))
                 and (flashinfer_ok or n not in prov.FLASHINFER)
                 and (fa4_ok or n not in prov.FA4)
                 and _at_home(n, names_w, wanted_w, wanted_p)
                 and not (args.smoke and n in prov.SMOKE_SKIP) and n not in skip]
        if names:
            tasks.append((w, names))
    micro = args.suite in ("core", "all") and (not only or "micro" in wanted_w) \
        and "micro" not in skip
    return tasks, (["append_kv", "plan_1000_spans"] if micro else [])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from tqdm import tqdm

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # tiny ops: threads only add noise
        timing = {"min_reps": 2, "max_reps": 3, "target_ms": 1.0}
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="spanfill-bench-"))
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run the GPU suite on a GPU, or use --smoke", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        timing = {"min_reps": args.min_reps, "max_reps": max(200, args.min_reps)}
        out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)

    flashinfer_ok = False
    if args.flashinfer and not args.smoke:
        from .providers_flashinfer import available

        flashinfer_ok, why = available()
        print(f"FlashInfer: {why}" if flashinfer_ok else
              f"FlashInfer providers skipped: import flashinfer failed ({why})", file=sys.stderr)
    elif not args.smoke:
        print("FlashInfer providers off (pass --flashinfer to add them)", file=sys.stderr)

    # FA4 needs no flag: its providers run whenever flash_attn.cute imports.
    fa4_ok = False
    if not args.smoke:
        from .providers_fa4 import available as fa4_available

        fa4_ok, why = fa4_available()
        print(f"FA4: {why}" if fa4_ok else
              f"FA4 providers skipped: import flash_attn.cute failed ({why})", file=sys.stderr)

    tasks, micro = _plan_tasks(args, flashinfer_ok, fa4_ok)
    env = environment(device)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    prefix = out / f"{'smoke' if args.smoke else args.suite}_{_slug(env['gpu'])}_{stamp}"
    sink = Sink(prefix.with_suffix(".csv"), env)
    total = sum(len(names) for _, names in tasks) + len(micro)
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr)
    try:
        for name, rows_fn in micro_rows(device, args.smoke, timing):
            if name not in micro:
                continue
            bar.set_postfix_str(name)
            base = {"kernel": "plan" if name.startswith("plan") else "append_kv", "workload": name}
            try:
                for row in rows_fn():
                    sink.write({**base, **row})
            except Exception as exc:
                _error_row(sink, base, "spanfill", exc)
            finally:
                _release(device)
                bar.update(1)
        for w, names in tasks:
            bar.set_postfix_str(w.name if w.x is None else f"{w.name}={w.x:g}")
            run_workload(w, names, sink, device, dtype, timing, lambda: bar.update(1))
    finally:
        bar.close()
        sink.close()
    table = markdown(sink.rows)
    prefix.with_suffix(".md").write_text(table + "\n")
    try:
        plots = write_plots(sink.rows, prefix)
    except Exception as exc:
        plots = []
        print(f"plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"\nCSV: {sink.path}", file=sys.stderr)
    for path in plots:
        print(f"plot: {path}", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
