"""Output directories of ``lora-fast train`` / ``sweep`` / ``merge``: all or nothing; and what a run writes there.

Everything a run writes goes into a hidden staging directory beside ``--output_dir`` (same filesystem); only when
the run has finished — or was interrupted and has saved what it trained — is the staging directory renamed onto
the output directory (``os.replace``, atomic on POSIX). A crash or a bad input therefore leaves no half-written
output, and a non-empty existing output directory is never replaced unless ``--overwrite`` is given (then the old
one is moved aside first and deleted only after the new one is in place).
"""

from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lora_fast
from lora_fast.train_args import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _inside(path: Path, out: Path) -> bool:
    return path == out or out in path.parents


def check_creatable_dir(path, what: str) -> Path:
    """Refuse a directory that cannot be created or written: an existing file, a path under a file, or an
    unwritable nearest existing ancestor. Returns the resolved path. ``what`` names it in the message."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is not a directory")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(blocker)!r} is a file")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r} cannot be written: {str(existing)!r} is not writable")
    try:  # access() can say yes where nothing can be created (root on /proc, a read-only mount): try, now
        os.rmdir(tempfile.mkdtemp(prefix=".lora-fast-write-test-", dir=existing))
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be written: nothing can be created in {str(existing)!r} "
                          f"({e.strerror})") from None
    return out


def peft_task_type(opts) -> str:
    """The PEFT task type of a run's adapter."""
    return "SEQ_CLS" if opts.task == "classification" else "CAUSAL_LM"


# Written into every output directory `lora-fast train`/`sweep`/`merge` commits: what --overwrite may replace. A
# file name of the outputs themselves would not do: PEFT's and the HF Trainer's directories hold adapter_config.json,
# every transformers model config.json.
OUTPUT_RECORD = ".lora-fast-output"
DESKTOP_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})  # what a file browser leaves in any directory


def check_path_encoding(paths: dict) -> None:
    """Under a filesystem encoding other than UTF-8 (a non-UTF-8 locale with UTF-8 mode off: ``LC_ALL=C
    PYTHONUTF8=0``), refuse non-ASCII paths ({flag: path}) before anything loads: Python holds them as undecodable
    bytes there, which tokenizers (Rust) and matplotlib reject — a run trained to the end and lost its outputs at the
    tokenizer's save or the loss plot. Given the paths those open (outputs, the model, a checkpoint); a dataset or
    config only Python reads is not refused."""
    encoding = sys.getfilesystemencoding()
    if encoding.lower().replace("-", "").replace("_", "") == "utf8":
        return
    bad = [f"{flag} {str(p)!r}" for flag, p in paths.items() if p and not str(p).isascii()]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not ASCII, and Python's filesystem encoding is {encoding!r} (a non-UTF-8 "
                          "locale with UTF-8 mode off), where tokenizers and matplotlib cannot take such paths; run "
                          "with PYTHONUTF8=1 or a UTF-8 locale (LANG=C.UTF-8), or use ASCII paths")


def check_output_dir(output_dir: str, overwrite: bool, inputs: dict | None = None, logdir: str | None = None,
                     checkpoint_dir: str | None = None, flag: str = "output_dir") -> Path:
    """Refuse an output directory the run could not replace safely; returns the resolved path.

    Refused: a file, a directory under a file or an unwritable place (``check_creatable_dir``); an existing
    non-empty directory unless ``overwrite``; with ``overwrite``, a directory holding the run's own inputs
    (``inputs``: {flag: path}; hub names, which are no local path, are skipped) or the current directory —
    replacing it would delete them; and a ``logdir`` or
    ``checkpoint_dir`` inside it (written during the run, they would vanish when the finished outputs replace the
    directory). ``overwrite`` replaces only an earlier lora-fast output, one with the ``OUTPUT_RECORD`` file that
    ``StagedDir`` writes: any other non-empty directory (a project folder given by mistake, a PEFT or Trainer output,
    a downloaded model) is refused, never deleted.
    """
    check_path_encoding({flag: output_dir, "--checkpoint_dir": checkpoint_dir,  # what tokenizers/matplotlib open
                         **{k: v for k, v in (inputs or {}).items() if k in ("--model", "--resume_from_checkpoint")}})
    out = check_creatable_dir(output_dir, flag)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} {output_dir!r} exists and is not empty; choose another directory or pass "
                          "--overwrite")
    if logdir and _inside(Path(logdir).expanduser().resolve(), out):
        raise ConfigError(f"--logdir {logdir!r} is inside {flag} {output_dir!r}, which is replaced as a whole "
                          "when the run finishes (deleting the logs); put the logs beside it, e.g. "
                          f"{str(out.parent / (out.name + '-logs'))!r}")
    if checkpoint_dir and _inside(Path(checkpoint_dir).expanduser().resolve(), out):
        raise ConfigError(f"--checkpoint_dir {checkpoint_dir!r} is inside {flag} {output_dir!r}, which is "
                          "replaced as a whole when the run finishes (deleting the checkpoints); leave the default "
                          f"{str(out.parent / (out.name + '-checkpoints'))!r} or choose another directory beside it")
    if overwrite:
        named = {name: p for name, p in (inputs or {}).items() if p and Path(p).expanduser().exists()}
        named["the current directory"] = os.getcwd()
        for name, p in named.items():
            if _inside(Path(p).expanduser().resolve(), out):
                what = name if name.startswith("the ") else f"{name} {str(p)!r}"
                raise ConfigError(f"{flag} {output_dir!r} contains {what}: --overwrite replaces the whole "
                                  f"directory and would delete it; choose another {flag}")
        found = sorted(p.name for p in out.iterdir() if p.name not in DESKTOP_FILES) if out.is_dir() else []
        if found and not (out / OUTPUT_RECORD).is_file():  # a .git or .venv counts: only desktop clutter does not
            raise ConfigError(f"{flag} {output_dir!r} is not an earlier lora-fast output (it holds "
                              f"{', '.join(found[:4])}{', ...' if len(found) > 4 else ''} and no {OUTPUT_RECORD} "
                              "file, which lora-fast train, sweep and merge write): --overwrite replaces a previous "
                              f"run's directory as a whole and would delete these; choose another {flag} or empty it "
                              "first")
    return out


STAGING_LOCK = ".staging.lock"  # in a staging directory: flock'ed by the process staging it, for as long as it lives


def _hold_staging(path: Path) -> int | None:
    """An open descriptor holding the flock of ``path / STAGING_LOCK``; None without flock (Windows, some network
    filesystems). The file is locked under a temporary name and then renamed, so nobody sees it unlocked."""
    try:
        import fcntl
    except ImportError:
        return None
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f"{STAGING_LOCK}.")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, socket.gethostname().encode())  # where a flock counts (node-local on some filesystems)
        os.replace(tmp, path / STAGING_LOCK)
        return fd
    except OSError:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        return None


def dead_staging(parent: Path, pattern: str, remove: bool = True) -> list[Path]:
    """The staging directories matching ``pattern`` in ``parent`` whose process is gone (killed: SIGKILL, the OOM
    killer — nothing ran its cleanup), removed if ``remove``. One is dead when its ``STAGING_LOCK`` can be locked
    from this host, the one that wrote it: the kernel drops a flock when its holder dies, whatever the pid became
    since (another host's lock may be node-local: never judged). One without the lock file (a version before it,
    no flock there, or a commit under way, which takes the file out before its rename) is left alone."""
    try:
        import fcntl
    except ImportError:
        return []
    dead = []
    for path in sorted(parent.glob(pattern)):
        lock = path / STAGING_LOCK
        try:
            fd = os.open(lock, os.O_RDWR)  # NFS grants an exclusive lock on a writable descriptor only
        except OSError:
            continue
        try:
            if os.pread(fd, 256, 0).decode(errors="replace") != socket.gethostname():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # taken out and committed meanwhile
                continue
        except OSError:  # held: its run is alive (or the file went: committed)
            continue
        finally:
            os.close(fd)
        if remove:
            shutil.rmtree(path, ignore_errors=True)
        dead.append(path)
    return dead


class StagedDir:
    """A temporary directory that becomes ``final`` on ``commit()`` and vanishes on ``discard()``.

    ``overwrite``: whether ``final`` may be replaced when it is not empty at commit time. Without it, a ``final``
    that became non-empty during the run (another run, a user's file) is left alone: ``commit`` keeps this run's
    outputs under a new sibling name and raises, saying where — nobody's files are deleted. ``command`` (``train``,
    ``sweep``, ``merge``): write ``OUTPUT_RECORD`` into the directory, for ``check_output_dir``.

    The staging directory is flock'ed (``STAGING_LOCK``) while its process lives; staging directories of killed
    processes matching ``stale`` (default: ``final``'s own) are removed, with a warning, when the next is made —
    or, ``keep_stale`` (a sweep's: it holds the runs it finished), named in the warning and kept.
    """

    def __init__(self, final: Path, overwrite: bool = False, command: str | None = None, stale: str | None = None,
                 keep_stale: bool = False):
        self.final, self.overwrite, self.command = Path(final), overwrite, command
        self.final.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.final.name}.staging-"
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.final.parent))
        os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp makes 0700; the output should look like a mkdir's
        self._fd = _hold_staging(self.path)
        dead = [p.name for p in dead_staging(self.final.parent, stale or f"{glob.escape(prefix)}*", not keep_stale)]
        if dead:
            n, names = len(dead), ", ".join(dead[:4]) + (", ..." if len(dead) > 4 else "")
            what = f"staging director{'y' if n == 1 else 'ies'} that killed runs left in {str(self.final.parent)!r}"
            warnings.warn(f"kept {n} {what} ({names}): they may hold the runs a killed sweep finished; move out what "
                          "you need and delete them" if keep_stale else
                          f"removed {n} {what} ({names}): partial outputs, never committed", stacklevel=2)

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def commit(self) -> Path:
        if self.command is not None:  # marks the directory as one a later --overwrite may replace
            write_json(self.path / OUTPUT_RECORD, {"written_by": f"lora-fast {self.command}",
                                                   "lora_fast": lora_fast.__version__})
        if self._fd is not None:  # out before the rename, still held through it: no cleaner takes this one
            (self.path / STAGING_LOCK).unlink()
        try:
            return self._commit()
        finally:
            self._release()

    def _commit(self) -> Path:
        for p in self.path.rglob("*"):  # temp-file writers (mkstemp) leave 0600; use the umask's modes
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
        old = None
        if self.final.exists():
            if self.final.is_dir() and not any(self.final.iterdir()):
                self.final.rmdir()
            elif not self.overwrite:
                kept = Path(tempfile.mkdtemp(prefix=f"{self.final.name}.kept-", dir=self.final.parent))
                os.replace(self.path, kept / "outputs")
                raise ConfigError(f"output_dir {str(self.final)!r} became non-empty while this run was going "
                                  f"(another run or process wrote there); it was left as it is and this run's "
                                  f"outputs are in {str(kept / 'outputs')!r}")
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
                os.replace(self.final, old / "previous")
        os.replace(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file via a temporary in the same directory, fsync'ed, and ``os.replace``: after a crash the file is
    the old one or the new one whole (without the fsync a filesystem may commit the rename before the data)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator statistics, or Linux's VmHWM (``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the RSS high-water mark VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(peak MB, what was measured): CUDA's max allocated bytes on a GPU; the process's peak RSS on CPU (Linux's
    VmHWM since ``reset_peak_memory``, else ``ru_maxrss`` over the whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10, "process peak RSS (VmHWM since training started)"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process max RSS (ru_maxrss, whole process)"


def _dir_bytes(path: Path, names) -> int:
    return sum((path / n).stat().st_size for n in names if (path / n).is_file())


def model_comparison(counts: dict, model: torch.nn.Module, adapter_dir: Path) -> str:
    """Text report: total/trainable/frozen parameters and adapter size on disk vs the full model's weights."""
    base = {id(p): p for n, p in model.named_parameters() if ".lora.lora_" not in f".{n}"}  # the merged model's
    full = sum(t.numel() * t.element_size() for t in base.values())
    adapter = _dir_bytes(adapter_dir, ("adapter_model.safetensors", "adapter_config.json"))
    lines = [
        "LoRA vs full fine-tuning",
        "",
        f"total parameters      {counts['total']:>14,}",
        f"trainable parameters  {counts['trainable']:>14,}  ({counts['percentage']:.4f} %)",
        f"frozen parameters     {counts['frozen']:>14,}",
        "",
        f"adapter on disk       {adapter / 2**20:>14.3f} MB  (adapter_model.safetensors + adapter_config.json)",
        f"full model weights    {full / 2**20:>14.3f} MB  (the model without the adapter, at its dtypes, as "
        "save_pretrained writes a fully fine-tuned or merged model)",
        f"adapter / full        {100.0 * adapter / full if full else 0.0:>14.4f} %",
    ]
    return "\n".join(lines) + "\n"


def finish_metrics(m, opts, prep, step, total, tokens_seen, t_start, device, backend_used, interrupted) -> dict:
    """The metrics dict of a run (``training_metrics.json``) from the loop's lists and totals.

    ``final_eval_loss`` is the last evaluation's, taken at ``final_eval_step`` (an interrupted run is not evaluated
    again on the way out: its last evaluation may be older than ``steps``). ``train_tokens_per_sec`` is training
    throughput: tokens of the optimizer steps over their time (evaluations and step 1 — warm-up, kernel builds —
    left out); ``mean_tokens_per_sec`` is all tokens over the whole wall time.
    """
    peak, kind = peak_memory(device)
    timed_tokens, timed_s = m.pop("_timed")
    evals = m.pop("eval")
    m["eval_steps"] = [e["step"] for e in evals]
    m["eval_loss"] = [e["eval_loss"] for e in evals]
    if evals and "eval_perplexity" in evals[0]:
        m["eval_perplexity"] = [e["eval_perplexity"] for e in evals]
    if evals and "eval_accuracy" in evals[0]:
        m["eval_accuracy"] = [e["eval_accuracy"] for e in evals]
    if not m["epochs"]:
        m.pop("epochs")
    wall = time.perf_counter() - t_start
    return {
        **m,
        "final_eval_loss": m["eval_loss"][-1] if m["eval_loss"] else None,
        "final_perplexity": m["eval_perplexity"][-1] if m.get("eval_perplexity") else None,
        "final_eval_step": m["eval_steps"][-1] if m["eval_steps"] else None,
        "steps": step, "planned_steps": total, "interrupted": interrupted, "tokens_seen": tokens_seen,
        "mean_tokens_per_sec": tokens_seen / wall if wall > 0 else None, "wall_time_s": wall,
        "train_tokens_per_sec": timed_tokens / timed_s if timed_s > 0 else None,
        "peak_memory_mb": peak, "peak_memory_kind": kind,
        "backend": opts.backend, "backend_used": backend_used, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "base_model": prep.base_name, "dataset": prep.source, "task": opts.task,
        "torch_version": torch.__version__,
    }


def write_outputs(path: Path, opts, prep, model, metrics: dict) -> None:
    """Everything a run writes into ``path`` (the staging directory): adapter, tokenizer, args, metrics, plots."""
    from lora_fast import count_parameters, save_adapter
    from lora_fast.plots import loss_curve

    save_adapter(model, path, base_model_name_or_path=prep.base_name, task_type=peft_task_type(opts))
    backend = getattr(prep.tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the collator's truncation stays set on a fast tokenizer: tokenizer.json would keep it
        backend.no_truncation()
        backend.no_padding()
    prep.tokenizer.save_pretrained(path)
    args = {k: v for k, v in vars(opts).items()}
    args.update(base_model=prep.base_name, tokenizer_trained=prep.tokenizer_trained, label_names=prep.label_names,
                vocab_size=model.config.vocab_size)
    write_json(path / "training_args.json", args)
    counts = count_parameters(model)
    metrics["parameters"] = counts
    write_json(path / "training_metrics.json", metrics)
    loss_curve(path / "training_loss_curve.png", metrics["train_loss"], metrics["eval_steps"],
               metrics["eval_loss"], title=f"LoRA r={opts.rank} alpha={opts.alpha:g} on {Path(prep.base_name).name}")
    write_atomic(path / "model_comparison.txt", model_comparison(counts, model, path))


def print_summary(metrics: dict) -> None:
    out = metrics["output_dir"]
    status = "interrupted, partial results" if metrics["interrupted"] else "done"
    loss, at = metrics["final_eval_loss"], metrics.get("final_eval_step")
    print(f"\nlora-fast train {status}: {metrics['steps']} steps in {metrics['wall_time_s']:.1f} s"
          + (f", eval loss {loss:.4f}" if loss is not None else "")
          + (f" (at step {at})" if loss is not None and at != metrics["steps"] else "")
          + (f", perplexity {metrics['final_perplexity']:.2f}" if metrics.get("final_perplexity") else "")
          + (f", test accuracy {metrics['test_accuracy']:.2%}" if "test_accuracy" in metrics else ""))
    print(f"Outputs in {out}:")
    for p in sorted(Path(out).iterdir()):
        print(f"  {p}")
