"""Resumable checkpoints of ``lora-fast train``: ``--save_steps N`` writes them, ``--resume_from_checkpoint``
continues from one.

Layout (``--checkpoint_dir``, default ``<output_dir>-checkpoints`` beside the output directory, which is replaced as
a whole when the run finishes)::

    checkpoint-<step>/
        adapter_config.json, adapter_model.safetensors   the adapter at that step (PEFT's format: loads on its own)
        training_state.pt    what resuming needs (read with ``torch.load(weights_only=True)``: tensors and plain
                             data only): trainable parameters, AdamW, LR schedule, gradient scaler, the torch RNG
                             states of every rank (CPU and the device's: dropout masks), the data position (passes
                             started, micro-batches done in the current one), the metrics so far, the options
        trainer_state.json   step, position and options, for people

A checkpoint is written at the end of every ``save_steps``-th optimizer step (after that step's evaluation), and
when Ctrl-C or SIGTERM stops training (the state of the last finished step: the partial step's gradients are
dropped; in one process a signal during the optimizer update and its bookkeeping is held to that step's end,
``distributed.held_signals``; a KeyboardInterrupt raised inside the update itself writes none). Under torchrun that
is the step boundary at which all ranks stopped together (``lora_fast.distributed``, "stopping"): every rank calls
``save_checkpoint`` there, as at a periodic save. Each is staged in a hidden directory and renamed into place, so a
crash leaves the previous ones intact; ``--save_total_limit`` keeps the newest N. A checkpoint directory holding
another run's checkpoints is refused (``latest`` and the pruning would mix the two runs): a fresh run refuses any, a
resumed run those of a directory its checkpoint is not in. Resuming from a checkpoint older than the newest in its
directory sets the newer ones aside (renamed ``checkpoint-<step>.abandoned``: kept, but no longer ``latest`` nor
counted by the pruning). An unwritable directory is refused before training starts.

Resuming restores all of it and continues at the next micro-batch of the same (seed, pass) permutation, with the
same RNG stream: on the same device, backend and number of processes the resumed run is the uninterrupted run,
bit for bit (the test compares adapters with ``torch.equal``). An evaluation (or a classification pass's accuracy)
that the interrupt cut short is taken on resuming; a TensorBoard ``--logdir`` hides the abandoned steps after the
checkpoint (``purge_step``). The options that shape the run must be the same
(``MUST_MATCH``; an error names those that differ; an option the checkpoint predates counts as its default), and so
must the tokenized training data (sha256 digest), the frozen base model's weights (``base_digest``: a sample of every
frozen tensor) and the number of processes. ``--model`` and ``--dataset`` may name another path when the content is
the same (data staged to a job's own directory). Output, logging, evaluation cadence, device and backend may change
(a different device or backend continues the run, but with other rounding and dropout masks).

Known limits: FSDP runs neither write nor resume checkpoints (the optimizer state is sharded; an error says so).
Under torchrun a signal that is not coordinated (a second one, or one outside the training loop) writes no
checkpoint: resume from the last one. Every rank must see the same ``checkpoint_dir`` (one machine, or a shared
filesystem).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_fast.train_args import OPTIONS, ConfigError
from lora_fast.train_io import StagedDir, check_creatable_dir, peft_task_type

# 2: the HF Trainer's learning-rate schedule, weight-decay groups and character-share validation split (a format-1
# checkpoint would resume into another schedule or optimizer layout, so it is refused by name)
FORMAT = 2
STATE_NAME = "training_state.pt"
INFO_NAME = "trainer_state.json"
_DIR_RE = re.compile(r"checkpoint-(\d+)")
# Options that change nothing of the trajectory (where things go, how often evaluation runs, what is printed) or
# that a user may need to change to resume at all (device, backend, and with them TF32; activation checkpointing,
# which recomputes the same numbers with less memory): everything else must match.
MAY_CHANGE = frozenset({"output_dir", "overwrite", "logdir", "progress", "eval_steps", "eval_batches", "num_workers",
                        "save_steps", "save_total_limit", "checkpoint_dir", "resume_from_checkpoint", "device",
                        "backend", "distributed", "tf32", "gradient_checkpointing"})
MUST_MATCH = tuple(k for k in OPTIONS if k not in MAY_CHANGE)


@dataclass
class Position:
    """Where a run stands at the end of an optimizer step: what a checkpoint restores."""

    step: int  # optimizer steps done
    passes: int  # passes over the training data started (the current one is passes - 1, for set_epoch)
    micro_done: int  # micro-batches of the current pass consumed (== micro-batches per pass: the pass is over)
    tokens_seen: int
    rng: dict  # this rank's torch RNG states, captured at that moment


def checkpoint_root(opts) -> Path:
    return Path(opts.checkpoint_dir or f"{Path(opts.output_dir).expanduser()}-checkpoints").expanduser()


LOCK_NAME = ".lora-fast.lock"  # in the checkpoint root, held by the run writing checkpoints there


@contextlib.contextmanager
def root_held(opts, main: bool = True):
    """Hold the checkpoint root of a run that checkpoints (``--save_steps``) for the whole run: an exclusive
    ``flock`` on ``LOCK_NAME`` there (rank 0 only: the others write no checkpoint). A second run into the same root
    is refused while the first runs: two runs started together both passed ``check_options`` (no checkpoints yet) and
    then replaced each other's ``checkpoint-N`` — one run's output directory beside the other's checkpoints, which
    its resume then refused (options differ). ``train`` calls ``check_options`` again once this is held, which
    refuses a root that another (finished) run filled meanwhile. ``run`` takes it before loading the model (a second
    run is refused at once, not after minutes of loading); ``train`` when called directly. Released when the run
    ends, the lock file removed (and the root, when the run created it and wrote nothing there: an interrupt before
    the first save); a lock taken on a file another run removed meanwhile is taken again on the new one (an inode
    check). Without ``fcntl`` (Windows), or on a filesystem without flock (NFS without lockd, Lustre without -o
    flock: a warning), only that second check applies."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if opts.save_steps is None or not main or fcntl is None:
        yield
        return
    root = checkpoint_root(opts)
    check_creatable_dir(root, "--checkpoint_dir")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_NAME
    fd = _lock_file(fcntl, lock, root)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # removed while held: the root is left as the run's checkpoints
            if fd is not None:
                lock.unlink()
            if created and not any(root.iterdir()):
                root.rmdir()
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock_file(fcntl, lock: Path, root: Path) -> int | None:
    """An open descriptor of ``lock`` holding its exclusive flock, or None where the filesystem has no flock."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"--checkpoint_dir {str(root)!r} is in use by another lora-fast run (pid {holder}) "
                              "writing its checkpoints there; the two would replace each other's: choose another "
                              "--output_dir or --checkpoint_dir, or wait for that run to end") from None
        except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: no flock on this filesystem
            os.close(fd)
            with contextlib.suppress(OSError):
                lock.unlink()
            warnings.warn(f"--checkpoint_dir {str(root)!r}: the filesystem takes no lock ({e}); a second run "
                          "started into it at the same time would not be refused", stacklevel=3)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else: the file was removed by the run that held it, between our open and our flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


def check_options(opts) -> tuple[Path, Path | None]:
    """Check the checkpoint options before anything is loaded; returns (checkpoint root, checkpoint to resume).

    Refused: a root that is a file, lies under a file or cannot be written (found at the first save, that would
    lose the run so far); a fresh run (not resuming) into a root already holding checkpoints — ``latest`` and the
    pruning would mix the two runs' checkpoints; and a resume path that is not a checkpoint.
    """
    root = checkpoint_root(opts)
    resume = find_checkpoint(opts.resume_from_checkpoint, root) if opts.resume_from_checkpoint else None
    if opts.save_steps is None:
        return root, resume
    check_creatable_dir(root, "--checkpoint_dir")
    foreign = sorted(p.name for p in root.iterdir() if _DIR_RE.fullmatch(p.name) and not (p / STATE_NAME).is_file()) \
        if root.is_dir() else []
    if foreign:  # e.g. an HF Trainer's checkpoint-<step>: saving that step would replace it
        raise ConfigError(f"--checkpoint_dir {str(root)!r} holds {', '.join(foreign)}, not written by lora-fast (no "
                          f"{STATE_NAME}); a checkpoint of the same step would replace it: move it, or choose another "
                          "--checkpoint_dir")
    found = list_checkpoints(root)
    if found and (resume is None or not _in_root(resume, root)):
        names = ", ".join(p.name for _, p in found)
        how = ("resume that run with --resume_from_checkpoint" if resume is None else
               f"the resumed checkpoint {str(resume)!r} is not among them: resume from one of them")
        raise ConfigError(f"--checkpoint_dir {str(root)!r} already holds checkpoints of another run ({names}); "
                          f"{how}, delete them, or choose another --checkpoint_dir")
    return root, resume


def _in_root(checkpoint: Path, root: Path) -> bool:
    """Whether ``checkpoint`` (links resolved) is one of ``root``'s checkpoints."""
    return checkpoint.resolve().parent == root.resolve()


def set_aside_newer(root: Path, resume: Path, log) -> list[Path]:
    """Resuming from ``resume`` in ``root``: rename the checkpoints of later steps (the abandoned continuation) to
    ``checkpoint-<step>.abandoned`` — kept, but no longer ``latest`` nor pruned in place of this run's own."""
    m = _DIR_RE.fullmatch(resume.resolve().name)  # a symlink (best -> checkpoint-2) names its target's step
    if m is None or not _in_root(resume, root):
        return []
    step = int(m.group(1))
    moved = []
    for s, path in list_checkpoints(root):
        if s > step:
            dest, n = path.with_name(f"{path.name}.abandoned"), 1
            while dest.exists():
                n += 1
                dest = path.with_name(f"{path.name}.abandoned-{n}")
            path.rename(dest)
            moved.append(dest)
    if moved:
        log(f"lora-fast: resuming from step {step}: the later checkpoints of the abandoned continuation are set "
            f"aside as {', '.join(p.name for p in moved)}")
    return moved


def capture_rng(device: torch.device) -> dict:
    """This process's torch RNG states: CPU, and the CUDA device's (``device``) when training there."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _options(opts) -> dict:
    """The options a resumed run must share; local paths (model, dataset) resolved, so ``./tiny`` is ``tiny``."""
    out = {k: getattr(opts, k) for k in MUST_MATCH}
    for k in ("model", "dataset"):
        if isinstance(out[k], str) and Path(out[k]).expanduser().exists():
            out[k] = str(Path(out[k]).expanduser().resolve())
    return out


def base_digest(model: torch.nn.Module) -> str:
    """A fingerprint of the frozen weights (the base model): sha256 over every frozen tensor's name, shape, dtype
    and up to 1024 of its values at evenly spaced positions. Exact values, no sums (whose rounding would change
    with the device or thread count a resumed run may use); a base re-saved with other weights changes nearly
    every sampled value."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        n, k = flat.numel(), min(flat.numel(), 1024)
        idx = torch.arange(k, dtype=torch.int64) * max(n - 1, 0) // max(k - 1, 1)  # exact integers (a float32
        # linspace rounds past the end above 2**24 elements: GPT-2's embedding has 38.6M)
        h.update(f"{name}{tuple(p.shape)}{p.dtype};".encode())
        h.update(flat[idx.to(flat.device)].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


def _gather_rng(rng: dict, ctx) -> list[dict]:
    """Every rank's RNG states, on every rank (a collective under torchrun)."""
    if not ctx.enabled:
        return [rng]
    import torch.distributed as dist

    out = [None] * ctx.world_size
    dist.all_gather_object(out, rng)
    return out


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, pos: Position, *, model, optimizer, scheduler, scaler, metrics: dict, opts, prep,
                    total: int, digest: str, ctx, limit: int | None, base: str | None = None) -> Path | None:
    """Write ``root/checkpoint-<step>`` (staged, then renamed into place; one already there is replaced) and prune
    to the newest ``limit``. Under torchrun every rank must call this (the RNG states are gathered); rank 0 writes
    and returns the path, the others return None.
    """
    from lora_fast.adapter import save_adapter

    rngs = _gather_rng(pos.rng, ctx)
    if not ctx.is_main:
        return None
    state = {
        "format": FORMAT, "step": pos.step, "passes": pos.passes, "micro_done": pos.micro_done,
        "tokens_seen": pos.tokens_seen, "planned_steps": total, "world_size": ctx.world_size, "digest": digest,
        "options": _options(opts), "rng": rngs, "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "metrics": copy.deepcopy(metrics), "base_digest": base, "versions": _versions(),
    }
    final = root / f"checkpoint-{pos.step}"
    # one already there (a resumed run passing it again) is replaced; a killed run's staged checkpoints are removed
    staged = StagedDir(final, overwrite=True, stale=".checkpoint-*.staging-*")
    tmp = staged.path
    try:
        save_adapter(model, tmp, base_model_name_or_path=prep.base_name, task_type=peft_task_type(opts))
        torch.save(state, tmp / STATE_NAME)
        info = {"step": pos.step, "planned_steps": total, "passes_started": pos.passes,
                "micro_batches_done_in_pass": pos.micro_done, "world_size": ctx.world_size,
                "versions": state["versions"], "options": state["options"]}
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    if limit:
        for leftover in root.glob(".checkpoint-*.deleting"):  # a removal cut short by an earlier crash
            shutil.rmtree(leftover, ignore_errors=True)
        for _, path in list_checkpoints(root)[:-limit]:
            if path != final:
                # renamed first: a removal cut short (a kill mid-rmtree) must not leave a checkpoint-N that
                # list_checkpoints (and --resume_from_checkpoint latest) takes for complete with files gone
                doomed = path.with_name(f".{path.name}.deleting")
                shutil.rmtree(doomed, ignore_errors=True)
                try:
                    os.replace(path, doomed)
                except OSError as e:  # the checkpoint just written is in place: a failed pruning must not end the run
                    warnings.warn(f"save_total_limit: could not remove {str(path)!r} ({e}); it is kept", stacklevel=2)
                    continue
                shutil.rmtree(doomed, ignore_errors=True)
    return final


def _versions() -> dict:
    """The lora-fast and torch versions a checkpoint records (for people, and for a newer format's message)."""
    from importlib import metadata

    try:
        mine = metadata.version("lora_fast")
    except metadata.PackageNotFoundError:
        mine = None
    return {"lora_fast": mine, "torch": str(torch.__version__)}  # a plain str: weights_only loads it


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _DIR_RE.fullmatch(p.name)
        if m and p.is_dir() and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(spec: str, root: Path) -> Path:
    """``spec``: a checkpoint directory, or 'latest' (the newest complete one in ``root``)."""
    if spec == "latest":
        found = list_checkpoints(root)
        if not found:
            raise ConfigError(f"resume_from_checkpoint latest: no checkpoint in {str(root)!r} (checkpoint-<step> "
                              f"directories with {STATE_NAME}); give its path, or --checkpoint_dir")
        return found[-1][1]
    path = Path(spec).expanduser()
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"resume_from_checkpoint {spec!r} is not a checkpoint (no {STATE_NAME} in it)")
    return path


# what resuming reads from a format-2 state (``base_digest`` and ``versions`` are newer: absent in older files)
_STATE_KEYS = ("step", "passes", "micro_done", "tokens_seen", "planned_steps", "world_size", "digest", "options",
               "rng", "trainable", "optimizer", "scheduler", "scaler", "metrics")


def load_checkpoint(path: Path, opts, digest: str, ctx, total: int, base: str | None = None) -> dict:
    """Read and check a checkpoint against this run (``base``: this run's ``base_digest``); raises ``ConfigError``
    naming what does not fit."""
    where = str(path / STATE_NAME)
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"resume_from_checkpoint: cannot read {where!r} (truncated, damaged or not a checkpoint): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if isinstance(fmt, int) and fmt < FORMAT:
        raise ConfigError(f"resume_from_checkpoint: {where!r} was written by an older lora-fast "
                          f"(checkpoint format {fmt}, now {FORMAT}: the learning-rate schedule, optimizer "
                          "groups and validation split changed); resuming would not continue that run. Resume with "
                          "the lora-fast version that wrote it, or start a new run")
    if isinstance(fmt, int) and fmt > FORMAT:
        raise ConfigError(f"resume_from_checkpoint: {where!r} was written by a newer lora-fast (checkpoint format "
                          f"{fmt}; this one reads format {FORMAT}{_written_by(state)}); resume with that version")
    if fmt != FORMAT:
        raise ConfigError(f"resume_from_checkpoint: {where!r} is not a lora-fast checkpoint of format {FORMAT}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing or not isinstance(state["options"], dict):
        raise ConfigError(f"resume_from_checkpoint: {where!r} is damaged: "
                          + (f"no {', '.join(missing)}" if missing else "its options are not a mapping"))
    saved, now = state["options"], _options(opts)
    saved = {k: saved.get(k, OPTIONS[k][1]) for k in MUST_MATCH}  # an option the checkpoint predates: its default
    same_data = state["digest"] == digest
    same_base = base is not None and state.get("base_digest") == base
    relocated = {"dataset": same_data, "model": same_base}  # another path to the same content
    differ = [f"{k} (checkpoint {saved[k]!r}, now {now[k]!r})" for k in MUST_MATCH
              if saved[k] != now[k] and not relocated.get(k)]
    if differ:
        raise ConfigError(f"resume_from_checkpoint {str(path)!r}: options differ from the checkpointed run: "
                          f"{'; '.join(differ)}. Resuming continues that run; start a new run to change them")
    if state["world_size"] != ctx.world_size:
        raise ConfigError(f"resume_from_checkpoint {str(path)!r}: written by {state['world_size']} process(es), "
                          f"resumed with {ctx.world_size}; the data shards and RNG streams need the same number")
    if not same_data:
        raise ConfigError(f"resume_from_checkpoint {str(path)!r}: the tokenized training data (or tokenizer) "
                          "differs from the checkpointed run's")
    if base is not None and state.get("base_digest") not in (None, base):
        raise ConfigError(f"resume_from_checkpoint {str(path)!r}: the base model's weights differ from the "
                          f"checkpointed run's (--model {now['model']!r} was changed or re-saved since); resuming "
                          "would train the adapter on another model")
    if state["planned_steps"] != total:
        raise ConfigError(f"resume_from_checkpoint {str(path)!r}: the run was planned for {state['planned_steps']} "
                          f"steps, this one for {total}")
    return state


def _written_by(state: dict) -> str:
    """", written by lora-fast X" when the state records its version, else nothing."""
    v = state.get("versions")
    return f", written by lora-fast {v.get('lora_fast')}" if isinstance(v, dict) and v.get("lora_fast") else ""


def load_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    """Copy the checkpoint's trainable parameters into ``model`` (names and shapes must be those it trains)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bad = sorted(params.keys() ^ saved.keys()) + [n for n in params if n in saved and params[n].shape != saved[n].shape]
    if bad:
        raise ConfigError(f"resume_from_checkpoint {str(path)!r}: its trainable parameters do not fit the model "
                          f"({len(bad)} missing, unexpected or mis-shaped: {', '.join(bad[:3])}...)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
