"""Shared benchmark machinery: timing, peak memory, saved-activation bytes, and the results CSV.

Timing (``measure_time``): every repetition runs an untimed ``setup`` (e.g. the forward pass before a timed
backward, or clearing ``.grad``), then the timed call. On CUDA each repetition is bracketed by CUDA events after a
256 MB write that flushes the L2 cache (the same idea as ``triton.testing.do_bench``, which cannot time a backward
without ``retain_graph``); on CPU by ``time.perf_counter``. Results are the 20th/50th/80th percentiles in ms.

Peak memory (``peak_memory_mb``): bytes allocated by one call above what was live before it, in MB. CUDA reads the
caching allocator's counters; CPU has none, so ``LiveBytes`` (a ``TorchDispatchMode``) adds up every new storage an
ATen op creates and subtracts it when the storage is freed. The CPU figure misses memory that bypasses the
dispatcher (Inductor's generated code allocates its buffers directly), so it is not reported for torch.compile.

Saved activations (``saved_activation_bytes``): the distinct storages autograd keeps for backward, seen through
``torch.autograd.graph.saved_tensors_hooks`` (also fires for custom Functions' ``save_for_backward``), parameters
excluded. A view counts its whole storage, which is what stays alive.

Results (``upsert_csv``): one long-format CSV (columns ``CSV_COLUMNS``; the layout of Liger-Kernel's
``benchmark/data/all_benchmark_data.csv``, written here from scratch). A row's identity is ``KEY_COLUMNS``: a rerun of
the same case on the same device replaces its rows; everything else is kept. Written to a temporary file and
renamed, so an interrupted run never leaves a half-written CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CSV = RESULTS_DIR / "results.csv"

CSV_COLUMNS = ["bench", "provider", "mode", "metric", "unit", "config", "p20", "p50", "p80", "device", "torch",
               "triton", "transformers", "commit", "timestamp"]
KEY_COLUMNS = ("bench", "provider", "mode", "metric", "config", "device")
METRIC_UNITS = {"time": "ms", "tflops": "TFLOP/s", "peak_mem": "MB", "saved_bytes": "bytes",
                "tokens_per_s": "tokens/s"}
BENCHES = ("layer", "gpt2")
L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB), as triton.testing.do_bench uses

CPU_TIMING_NOTE = ("CPU timings measure PyTorch's CPU kernels on this machine; they are not the product's GPU "
                   "claims, and Triton-interpreter timings are never reported as kernel speed.")


# --------------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------------
def device_arg(text: str) -> str:
    """argparse ``type`` of --device: ``text`` unchanged if torch parses it as a device, else a usage error that
    names it (torch's own error would surface as a traceback from deep inside the script)."""
    try:
        torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e
    return text


def add_common_args(p) -> None:
    """The options every benchmark script takes: --device, --threads, --csv."""
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="CPU threads for this run (recorded in the config; default torch's)")
    p.add_argument("--csv", default=str(DEFAULT_CSV), help="results CSV to upsert into")


def check_common_args(p, args) -> None:
    """Reject a bad --threads or a CUDA --device where there is none (``p.error`` exits with a usage line)."""
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")


def run_with_threads(threads: int | None, fn: Callable[[], int]) -> int:
    """Run ``fn`` with ``torch.set_num_threads(threads)`` (None: as is), restoring the thread count after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def device_name(device: torch.device | str) -> str:
    """The GPU's name (``torch.cuda.get_device_name``) for a CUDA device, else ``cpu``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def git_commit() -> str:
    """``git rev-parse --short HEAD``, with ``-dirty`` when tracked or untracked files outside
    ``benchmarks/results`` differ from HEAD (the results being written do not make a run dirty); ``unknown`` when
    git cannot tell. ``LORA_FAST_BENCH_COMMIT`` overrides it: on a machine that receives a copy of the working tree
    but a stale ``.git`` (the lent GPU machines do), the launcher names the commit it sent."""
    if os.environ.get("LORA_FAST_BENCH_COMMIT"):
        return os.environ["LORA_FAST_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def env_info(device: torch.device | str) -> dict[str, str]:
    """The provenance columns of every row: device, library versions, commit, UTC timestamp. PEFT's version, which
    every "vs peft" figure depends on, goes into the ``transformers`` column (``5.17.0 (peft 0.21.0)``): the issue
    fixes the columns, and the report compares the column whole, so a PEFT upgrade shows as mixed provenance."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import transformers

    try:
        import peft

        hf = f"{transformers.__version__} (peft {peft.__version__})"
    except ImportError:
        hf = f"{transformers.__version__} (no peft)"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "transformers": hf, "commit": git_commit(),
            "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def config_json(config: dict) -> str:
    """Canonical JSON for the ``config`` column (sorted keys, no spaces), so equal configs compare equal."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the sanity check run before timing a provider)."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------
def quantiles(samples: Iterable[float], qs: Iterable[float] = (0.2, 0.5, 0.8)) -> tuple[float, ...]:
    """Linear-interpolation quantiles (numpy's default method) of a non-empty sample."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("quantiles of an empty sample")
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return tuple(out)


def measure_time(fn: Callable[[], object], setup: Callable[[], object] | None = None, *, warmup: int = 3,
                 rep: int = 20, device: torch.device | str = "cpu") -> tuple[float, float, float]:
    """Time ``fn`` (ms): ``warmup`` untimed calls, then ``rep`` timed ones, each after an untimed ``setup()``.

    Returns:
        (p20, p50, p80) in milliseconds.
    """
    if rep < 1 or warmup < 0:
        raise ValueError(f"need rep >= 1 and warmup >= 0, got rep={rep}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
        stream = torch.cuda.current_stream(device)  # --device cuda:1's stream, not the current device's
        for start, end in events:
            if setup is not None:
                setup()
            flush.zero_()
            start.record(stream)
            fn()
            end.record(stream)
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(rep):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


# --------------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ATen ops while active, and their peak.

    An op output that shares storage with one of its inputs (views, in-place and ``out=`` ops) is not a new
    allocation. A new storage is counted until Python frees it (``weakref.finalize`` on the storage object, which
    PyTorch keeps unique per storage).
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._live:
                continue
            self._live.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_memory_mb(fn: Callable[[], object], setup: Callable[[], object] | None = None, *,
                   device: torch.device | str = "cpu") -> float:
    """Peak bytes allocated during one ``fn()`` (after an untimed ``setup()``) above those live before it, in MB."""
    device = torch.device(device)
    if device.type == "cuda":
        if setup is not None:
            setup()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with LiveBytes() as tracker:  # setup inside too: what fn frees of it (a forward's saved tensors) counts, as on CUDA
        if setup is not None:
            setup()
        before = tracker.peak = tracker.current
        fn()
    return (tracker.peak - before) / 2**20


def saved_activation_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves during ``forward()``, excluding those of ``exclude``
    (the parameters and frozen weights: they are not activations)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


# --------------------------------------------------------------------------------------------------------------------
# Results CSV
# --------------------------------------------------------------------------------------------------------------------
def make_row(bench: str, provider: str, mode: str, metric: str, config: dict, values: Iterable[float],
             env: dict[str, str]) -> dict[str, str]:
    """One CSV row. ``values`` is (p20, p50, p80), or a single value for a metric without spread."""
    if bench not in BENCHES:
        raise ValueError(f"bench must be one of {BENCHES}, got {bench!r}")
    if metric not in METRIC_UNITS:
        raise ValueError(f"metric must be one of {sorted(METRIC_UNITS)}, got {metric!r}")
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{bench}/{provider}/{mode}/{metric}: need 1 or 3 finite values, got {values}")
    row = {"bench": bench, "provider": provider, "mode": mode, "metric": metric, "unit": METRIC_UNITS[metric],
           "config": config_json(config), "p20": f"{values[0]:.6g}", "p50": f"{values[1]:.6g}",
           "p80": f"{values[2]:.6g}"}
    missing = [c for c in CSV_COLUMNS[9:] if c not in env]
    if missing:
        raise ValueError(f"env is missing {missing}")
    row.update({c: env[c] for c in CSV_COLUMNS[9:]})
    return row


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a results CSV ([] when it does not exist). A file with other columns is an error, not overwritten."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != CSV_COLUMNS:
            raise ValueError(f"{path} does not have the results columns: expected {CSV_COLUMNS}, found "
                             f"{reader.fieldnames}; the file is left untouched")
        return list(reader)


def upsert_csv(path: str | os.PathLike, rows: list[dict[str, str]]) -> int:
    """Merge ``rows`` into the CSV at ``path``: existing rows with the same ``KEY_COLUMNS`` are replaced, the rest
    kept. Rows are sorted for stable diffs and written atomically. Returns the number of rows in the file."""
    for row in rows:
        if list(row) != CSV_COLUMNS:
            raise ValueError(f"row columns {list(row)} differ from {CSV_COLUMNS}")
    new_keys = {tuple(r[c] for c in KEY_COLUMNS) for r in rows}
    with _csv_lock(path):
        kept = [r for r in read_csv(path) if tuple(r[c] for c in KEY_COLUMNS) not in new_keys]
        _write_csv(path, kept + rows)
    return len(kept) + len(rows)


@contextlib.contextmanager
def _csv_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the CSV's directory across a read-modify-write: two benchmarks writing the same
    CSV at once (bench_layer and bench_gpt2 in two shells) would otherwise each write back what it read, dropping
    the other's rows. ``flock`` on the directory needs no lock file; where there is no ``fcntl`` (Windows), no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    directory = Path(path).parent
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # NFS (EBADF: it emulates flock with write locks), some FUSE/SMB mounts (ENOLCK)
            import warnings

            warnings.warn(f"{path}: cannot lock its directory ({e}); writing without a lock, so do not run two "
                          "benchmarks into this CSV at once", stacklevel=4)
        yield
    finally:
        os.close(fd)  # releases the lock


def drop_failed(path: str | os.PathLike, bench: str, device: str, config: dict, provider: str) -> list[dict]:
    """Remove the rows of ``provider`` at ``config`` on ``device`` from the CSV at ``path``: called when its
    measurement failed, so that figures of an earlier run (another commit) do not stand in the summary for code that
    no longer produces them. Returns the rows removed (the file is untouched when there are none)."""
    ident = (bench, device, config_json(config), provider)
    with _csv_lock(path):
        rows = read_csv(path)
        gone = [r for r in rows if (r["bench"], r["device"], r["config"], r["provider"]) == ident]
        if gone:
            _write_csv(path, [r for r in rows if (r["bench"], r["device"], r["config"], r["provider"]) != ident])
    return gone


def note_dropped(rows: list[dict], provider: str) -> None:
    """Say what ``drop_failed`` removed."""
    if rows:
        commits = ", ".join(sorted({r["commit"] for r in rows}))
        print(f"  {provider:<14}removed its {len(rows)} earlier rows of this configuration (commit {commits}): "
              "this run could not reproduce them", flush=True)


def _write_csv(path: str | os.PathLike, rows: list[dict[str, str]]) -> None:
    """Write ``rows`` sorted (stable diffs), atomically, keeping an existing file's permissions."""
    path = Path(path)
    rows = sorted(rows, key=lambda r: (r["bench"], r["device"], r["config"], r["provider"], r["mode"], r["metric"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:  # what open() would give a new file (mkstemp's own 0600 would hide the results from others)
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".csv", dir=path.parent)
    os.fchmod(fd, mode)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Providers that run lora_fast's Triton path with a kernel variant forced (kernels/lora_fwd.fwd_variant and
# lora_bwd.bwd_variant read these variables on every launch), next to ``lora_fast`` with the default rules (for
# which both variables are unset while it runs, so an inherited one cannot relabel a forced route as the default).
_VARIANT_VARS = ("LORA_FAST_FWD_VARIANT", "LORA_FAST_BWD_VARIANT")
VARIANT_PROVIDERS = {
    "lora_fast_cublas": dict(zip(_VARIANT_VARS, ("cublas", "cublas"), strict=True)),  # cuBLAS GEMMs + LoRA terms
    "lora_fast_one_pass": dict(zip(_VARIANT_VARS, ("one_pass", "fused"), strict=True)),  # xa inside the GEMM pass
    "lora_fast_xa_first": dict(zip(_VARIANT_VARS, ("xa_first", "fused"), strict=True)),  # skinny xa kernel first
    # the backward's dx and dA terms from a dy pass first (then a plain dgrad loop); the forward by the default rule
    "lora_fast_gb_first": dict(zip(_VARIANT_VARS, (None, "gb_first"), strict=True)),
    # xa_first and the fused backward with their large tiles moved by TMA; then the forward with a persistent grid
    # and the gb_first backward, with TMA
    "lora_fast_tma": dict(zip(_VARIANT_VARS, ("tma", "tma"), strict=True)),
    "lora_fast_tma_persistent": dict(zip(_VARIANT_VARS, ("tma_persistent", "gb_first_tma"), strict=True)),
}
# PEFT's own model with ``lora_fast.patch_peft``: its LoRA layers on lora_fast's Triton path (the default rules)
PATCHED_PROVIDERS = ("peft_patched",)
TRITON_PROVIDERS = ("lora_fast", *PATCHED_PROVIDERS, *VARIANT_PROVIDERS)  # CUDA only: never timed in the interpreter


def patch_peft_fused(model: torch.nn.Module) -> torch.nn.Module:
    """``model``'s PEFT LoRA layers routed through lora_fast's Triton path (``patch_peft``), for ``peft_patched``.

    Raises:
        RuntimeError: a LoRA layer would stay on PEFT's own path: its timings would be PEFT's, recorded under this
            provider's name.
    """
    from lora_fast.peft_compat import _peft_lora_layers, is_patched, patch_peft

    patch_peft(model, backend="triton")
    left = [name or "(the model)" for name, m in _peft_lora_layers(model).items() if not is_patched(m)]
    if left:
        raise RuntimeError(f"patch_peft left {len(left)} LoRA layer(s) on PEFT's own path: {', '.join(left[:4])}")
    return model


def timeable_providers(providers: Iterable[str], device: torch.device) -> list[str]:
    """The providers this run can time, saying why each other is left out: off a GPU the Triton providers' kernels
    would run in the interpreter (numpy), whose timings are never kernel timings, so they are skipped.

    Raises:
        SystemExit: a GPU run asked for a Triton provider with ``TRITON_INTERPRET`` set: its figures would be the
            interpreter's, recorded under the GPU's name; or, off a GPU, every provider asked for is a Triton one
            (nothing would be timed: the run printed the shapes and exited 0, writing nothing).
    """
    providers = list(providers)
    triton = [p for p in providers if p in TRITON_PROVIDERS]
    if device.type == "cuda":
        from lora_fast.kernels.launch import interpreting

        if triton and interpreting():
            raise SystemExit(f"TRITON_INTERPRET is set: providers {', '.join(triton)} would time the Triton "
                             "interpreter, not the kernels; unset it for a GPU benchmark")
        return providers
    print("note: " + CPU_TIMING_NOTE)
    for name in triton:
        print(f"note: provider {name} skipped: without a GPU its Triton kernels run in the interpreter, whose "
              "timings are never kernel timings. Run this on a GPU (benchmarks/run_gpu.sh).")
    kept = [p for p in providers if p not in triton]
    if providers and not kept:
        raise SystemExit(f"nothing to time on {device}: the providers asked for ({', '.join(triton)}) run Triton "
                         "kernels, timed on a GPU only; add a PyTorch provider (base, reference, peft) or run this "
                         "on a GPU")
    return kept


@contextlib.contextmanager
def provider_env(provider: str) -> Iterator[None]:
    """Set the environment a provider's kernels read for the duration of its measurements (restored after)."""
    default = dict.fromkeys(_VARIANT_VARS) if provider in ("lora_fast", *PATCHED_PROVIDERS) else {}
    with env_vars(VARIANT_PROVIDERS.get(provider, default)):
        yield


@contextlib.contextmanager
def env_vars(settings: dict[str, str | None]) -> Iterator[None]:
    """Set environment variables (None: unset) for the duration of the block; each is restored (or removed)
    after."""
    old = {k: os.environ.get(k) for k in settings}
    for k, v in settings.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
