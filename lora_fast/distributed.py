"""Multi-process training for ``lora-fast train``: torchrun's environment, DDP / FSDP2 wrapping, data sharding.

    torchrun --nproc_per_node 4 -m lora_fast.train --model gpt2 --batch_size 8 ...        # DDP (the default)
    torchrun --nproc_per_node 4 -m lora_fast.train --distributed fsdp ...                  # FSDP2 (fully_shard)

torchrun (or ``accelerate launch``, ``python -m torch.distributed.run``) starts one process per device and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init`` reads them and joins the
process group: NCCL with one GPU per process (``cuda:LOCAL_RANK``), gloo on CPU.

What each rank does:
    data        the training set is permuted from (seed, epoch) alone and cut into ``world_size`` interleaved
                shards (``DistributedSampler``: rank k takes positions k, k+W, ...). Step t of the run consumes
                positions [t·G, (t+1)·G) of the permutation, G = batch_size × world_size × grad_accum the global
                batch, whatever the world size: N processes with batch B train like one process with batch N·B.
                (A step never spans two passes: with G past a pass, each step takes the pass, with a warning.)
                The single-process run uses the same sampler (W = 1), so this holds against a plain run too, up
                to the end of each pass: the permutation's last (n mod W) examples are left out of that pass
                (``drop_last``; the permutation changes each pass, so do they) — padding the shards instead
                would repeat examples. A training set smaller than W is an error.
    gradients   DDP only registers parameters with ``requires_grad`` in its reducer: the frozen base is broadcast
                once at wrap time and never all-reduced; the LoRA gradients are averaged across ranks once per
                optimizer step (``no_sync`` on the other micro-steps of gradient accumulation). A DDP comm hook
                counts the elements it reduces (``grad_allreduce_numel_per_step`` in the metrics).
    FSDP2       rank 0's weights are broadcast (as DDP does), then ``fully_shard`` on every block named by the
                model's ``_no_split_modules`` (``GPT2Block``), then on the root. Frozen base and trainable LoRA
                weights share the groups; parameters become DTensors (sharded on dim 0), gradients are
                reduce-scattered, gradient clipping sees the global norm. Saving gathers the full LoRA tensors on
                every rank (``DTensor.full_tensor``, a collective) and rank 0 writes (``adapter.save_adapter``).
                The per-block-then-root layout is the one of PyTorch's FSDP2 tutorial and torchtitan.
    evaluation  rank k evaluates batches k, k+W, ... of the (unsharded, in-order) eval loader and the sums are
                all-reduced; ``--eval_batches`` counts global batches (batch_size × processes × accumulation
                sequences), so runs with the same global batch evaluate the same sequences.
    dropout     LoRA init uses ``--seed`` on every rank (identical replicas); then rank k > 0 reseeds torch with
                ``seed + 1_000_003·k`` so ranks draw different, reproducible dropout masks (rank 0 keeps the
                single-process stream).
    output      rank 0 alone shows the progress bar, logs and writes the output directory; metrics (train loss,
                tokens, evaluation) are all-reduced so they describe the global batch and the whole eval set.
                ``training_metrics.json`` records distributed, world_size, dist_backend, per_device_batch_size
                and global_batch_size. A failing rank exits non-zero and torchrun stops the others.

    stopping    Ctrl-C reaches torchrun's agent, which forwards SIGINT (SIGTERM likewise) to every rank's process
                group. In the training loop the first SIGINT or SIGTERM a rank receives only sets a flag
                (``stop_signals``), carried in the all-reduce each optimizer step already does (loss, tokens): at
                that step's boundary all ranks see it, leave the loop together (``StopRequested``) and do what an
                interrupted single-process run does — the checkpoint of that step (``--save_steps``, DDP), no
                test-set evaluation, the adapter saved (FSDP: gathered on every rank, rank 0 writes), ``interrupted:
                true``, exit status 130 on every rank (torchrun lists their 130s and exits 1). A signal during
                gradient accumulation or an evaluation is seen at the next boundary; after the last step's boundary
                it changes nothing (the run completed its steps: it finishes as completed). A second signal raises
                KeyboardInterrupt at once (uncoordinated, see below); a second Ctrl-C makes torchrun send SIGTERM
                (its interrupted shutdown starts over). The save must fit in the agent's grace period: ranks still
                running ``--shutdown-timeout`` seconds (default 30, or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) after the
                forwarded signal are SIGKILLed — torch 2.13 ``distributed/launcher/api.py:148``
                ``os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")``, used at ``elastic/agent/server/api.py:754``
                ``self._shutdown(e.sigval, timeout=self._shutdown_timeout)``. DataLoader workers (in the rank's
                process group) ignore SIGINT as well as SIGTERM under torchrun: a forked worker happens to inherit the
                rank's flag handler, but a spawned one (macOS, Windows, forkserver) died of KeyboardInterrupt and the
                loader raised "DataLoader worker ... exited unexpectedly" before the boundary. A stopped rank that
                has saved ignores further signals while it exits: torchrun SIGTERMs the ranks still running when one
                exits non-zero, which turned the last rank's 130 into -15 (3 runs out of 3 on CPU).

Known limits: ``--fp16`` is refused with FSDP (``torch.amp.GradScaler`` would check non-finite gradients per
shard and ranks could disagree on skipping a step; use ``--bf16``). A signal outside the training loop (loading,
final saving), SIGHUP, SIGQUIT or a second signal is not coordinated: the rank gets KeyboardInterrupt (SIGINT) or
dies (SIGTERM) where it is; DDP's rank 0 then saves its replica without a checkpoint, FSDP saves nothing. A stop
of one rank only (``kill`` of one process) ends all with 130: a failure to torchrun, which ``--max-restarts`` > 0
restarts. Test hooks: ``LORA_FAST_RANK_STATE_DIR`` makes every rank write its final LoRA tensors there (also after
a coordinated stop); ``LORA_FAST_SIGNAL_AT=RANK:STEP[:INT|TERM]`` makes rank RANK send SIGINT (or SIGTERM) to its
process group (itself and its DataLoader workers, as torchrun's agent does) during optimizer step STEP.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from lora_fast.inject import unwrap_model
from lora_fast.train_args import ConfigError, RankConfigError, env_true

MODES = ("auto", "none", "ddp", "fsdp")
RANK_SEED_STRIDE = 1_000_003  # a prime: rank k's dropout seed is far from the seeds a user tries by hand (42, 43..)
RANK_STATE_ENV = "LORA_FAST_RANK_STATE_DIR"
SIGNAL_AT_ENV = "LORA_FAST_SIGNAL_AT"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class DistContext:
    """Where this process stands: ``mode`` "none" (one process), "ddp" or "fsdp"; ``backend`` gloo or nccl."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> dict | None:
    """``{rank, world_size, local_rank}`` from torchrun's variables, or None outside a launcher."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        env = {k.lower(): int(os.environ[k]) for k in ("RANK", "WORLD_SIZE")}
        env["local_rank"] = int(os.environ.get("LOCAL_RANK", env["rank"]))
    except ValueError:
        raise ConfigError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    if env["world_size"] < 1 or not 0 <= env["rank"] < env["world_size"]:
        raise RankConfigError(f"RANK={env['rank']} / WORLD_SIZE={env['world_size']} are inconsistent")
    return env


def resolve_mode(requested: str) -> str:
    """``--distributed`` → "none", "ddp" or "fsdp": auto is ddp when WORLD_SIZE > 1, none otherwise."""
    if requested not in MODES:
        raise ConfigError(f"distributed must be one of {MODES}, got {requested!r}")
    env = torchrun_env()
    world = env["world_size"] if env else 1
    if requested == "auto":
        return "ddp" if world > 1 else "none"
    if requested == "none" and world > 1:
        raise ConfigError(f"--distributed none but WORLD_SIZE={world}: every process would train alone and write "
                          "the same output directory; use ddp or fsdp, or launch one process")
    if requested in ("ddp", "fsdp") and env is None:
        raise ConfigError(f"--distributed {requested} needs a launcher (torchrun --nproc_per_node N -m "
                          "lora_fast.train ...): RANK and WORLD_SIZE are not set")
    return requested


def check_accelerate_env(requested: str, fp16: bool, bf16: bool) -> None:
    """Refuse what ``accelerate launch`` asked for in the environment and ``lora-fast train`` would silently not do.

    accelerate passes its choices as ``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED`` and
    ``ACCELERATE_MIXED_PRECISION``; lora-fast takes its own options (``--distributed``, ``--bf16``/``--fp16``), so
    ``accelerate launch --use_fsdp`` trained DDP and ``--mixed_precision bf16`` fp32. The same choice made by both
    (``--use_fsdp`` with ``--distributed fsdp``, ``--mixed_precision bf16`` with ``--bf16``) is taken; accelerate's
    other FSDP settings are not read (lora-fast's FSDP2 shards each transformer block).
    """
    if env_true("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("accelerate launch --use_deepspeed: lora-fast train does not run DeepSpeed; launch with "
                          "--multi_gpu (DDP) or pass --distributed fsdp")
    if env_true("ACCELERATE_USE_FSDP") and requested != "fsdp":
        raise ConfigError("accelerate launch --use_fsdp: lora-fast train does not read accelerate's FSDP settings "
                          "and would train DDP replicas; pass --distributed fsdp (lora-fast's FSDP2, each "
                          "transformer block sharded), or launch with --multi_gpu")
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    ours = "fp16" if fp16 else "bf16" if bf16 else "no"
    if mixed not in ("", "no", ours):
        fix = (f"pass --{mixed}" + (f" instead of --{ours}" if ours != "no" else "") if mixed in ("fp16", "bf16") else
               f"lora-fast train has no {mixed}; launch with --mixed_precision no and pass --bf16 or --fp16")
        raise ConfigError(f"accelerate launch --mixed_precision {mixed}: lora-fast train takes its precision from "
                          f"its own options (now: {'--' + ours if ours != 'no' else 'fp32'}), not accelerate's; "
                          f"{fix}")


def init(requested: str, device_name: str, fp16: bool = False) -> DistContext:
    """Join the process group torchrun describes (or do nothing for one process); ``device(ctx)`` is its device.

    Args:
        requested: ``--distributed`` (auto, none, ddp, fsdp).
        device_name: ``--device``: auto / cuda give ``cuda:LOCAL_RANK`` (NCCL) when CUDA is available, cpu gives
            gloo. An explicit ``cuda:N`` is refused: each process owns the GPU of its local rank.
        fp16: ``--fp16`` (refused with FSDP, see the module docstring).
    """
    import torch.distributed as dist

    mode = resolve_mode(requested)
    if mode == "none":
        return DistContext()
    env = torchrun_env()
    if mode == "fsdp" and fp16:
        raise ConfigError("--fp16 is not supported with --distributed fsdp (the gradient scaler would check "
                          "non-finite gradients per shard); use --bf16")
    if device_name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device_name!r} under torchrun: use auto, cuda (each process takes "
                          "cuda:LOCAL_RANK) or cpu")
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RankConfigError("--device cuda requested but CUDA is not available")
    if use_cuda:
        if env["local_rank"] >= torch.cuda.device_count():
            raise RankConfigError(f"LOCAL_RANK={env['local_rank']} but only {torch.cuda.device_count()} GPU(s) here")
        torch.cuda.set_device(env["local_rank"])
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=torch.device("cuda", env["local_rank"]) if use_cuda
                                else None)
    return DistContext(mode, env["rank"], env["world_size"], env["local_rank"], backend)


def device(ctx: DistContext) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo."""
    return torch.device("cuda", ctx.local_rank) if ctx.backend == "nccl" else torch.device("cpu")


def shutdown(ctx: DistContext, ok: bool = True) -> None:
    """Leave the process group (``init``'s counterpart; nothing for one process). After a run that ended normally
    (``ok``) the ranks first meet at a barrier, so none tears its connections down while another is still in a
    collective or writing: a rank exiting early was seen to abort its peer's gloo threads at exit on CPU ("terminate
    called without an active exception", in 2 of about 12 test-suite runs). After an error there is no barrier (it
    could wait out the collective timeout)."""
    import torch.distributed as dist

    if ctx.enabled and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def seed_for_rank(seed: int, rank: int) -> int:
    """The torch seed of rank ``rank`` after LoRA init (see the module docstring); rank 0 keeps ``seed``."""
    return (seed + RANK_SEED_STRIDE * rank) % 2**63


def seed_dropout_rng(seed: int, ctx: DistContext) -> None:
    """Give rank k > 0 its own reproducible torch RNG stream (dropout masks); rank 0's stream is left as is."""
    if ctx.rank > 0:
        torch.manual_seed(seed_for_rank(seed, ctx.rank))


class ShardSampler(DistributedSampler):
    """``DistributedSampler`` that can start a pass at position ``skip`` of its shard (a resumed run)."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


def train_sampler(dataset, ctx: DistContext, seed: int):
    """Shuffled, sharded sampler of the training set: the permutation depends on (seed, epoch) only. Its ``skip``
    attribute (0; a resumed run sets it) leaves out this rank's first ``skip`` positions of the pass; its length
    stays the whole shard's."""
    # drop_last: the permutation's last (n mod W) examples are left out of this pass (a different few each pass)
    # rather than padded with repeats of its first ones, which trained on those twice
    return ShardSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                        drop_last=True)


# ------------------------------------------------------------------------------------------------------- wrapping
def _fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, on_reduce=None) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``device``, LoRA injected); the model itself when not distributed.

    Args:
        on_reduce: optional ``callable(numel)`` called by a DDP comm hook for every gradient bucket it all-reduces.
    """
    if ctx.mode == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if on_reduce is not None:
            def counting_hook(state, bucket):
                on_reduce(bucket.buffer().numel())
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_hook)
        return ddp
    if ctx.mode == "fsdp":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # rank 0's weights everywhere, as DDP does at wrap time (FSDP2 does not)
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        mesh = init_device_mesh(device.type, (ctx.world_size,))
        for block in _fsdp_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, ctx: DistContext, sync: bool):
    """Around one micro-step: with ``sync`` False the gradients stay local (DDP ``no_sync``; FSDP2
    ``set_requires_gradient_sync(False)``) and are reduced with those of the final micro-step."""
    if ctx.mode == "ddp" and not sync:
        with model.no_sync():
            yield
    elif ctx.mode == "fsdp":
        model.set_requires_gradient_sync(sync)
        yield
    else:
        yield


# -------------------------------------------------------------------------------------------------- collectives
def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few numbers (float64); the numbers themselves for one process."""
    if not ctx.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, ctx: DistContext):
    """rank 0's ``obj`` on every rank (pickled)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same(value, ctx: DistContext, what: str) -> None:
    """Raise on every rank when ranks hold different ``value`` (e.g. a digest of the tokenized data)."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"ranks disagree on {what}: {values}")


def digest(data, tokenizer=None) -> str:
    """sha256 of a training split (a token tensor, or (texts, labels)) and of the tokenizer's vocabulary."""
    import hashlib

    h = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        h.update(repr(tuple(data.shape)).encode())
        h.update(data.contiguous().numpy().tobytes())
    else:
        h.update(repr(data).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.hexdigest()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding all of ``t``: ``DTensor.full_tensor()`` (a collective: every rank must call it in
    the same order) for a sharded tensor, ``t`` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def dump_rank_state(model: nn.Module, ctx: DistContext) -> None:
    """With ``LORA_FAST_RANK_STATE_DIR`` set, every rank writes its LoRA tensors to ``rank<k>.safetensors`` there
    (gathered under FSDP, so all ranks must call this). A debugging and test hook; nothing happens otherwise."""
    directory = os.environ.get(RANK_STATE_ENV)
    if not directory:
        return
    from safetensors.torch import save_file

    state = {n: full_tensor(p.detach()).to("cpu", copy=True).contiguous()
             for n, p in unwrap_model(model).named_parameters() if ".lora.lora_" in f".{n}"}
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, f"rank{ctx.rank}.safetensors"))


# ------------------------------------------------------------------------------------------------- stopping
class StopRequested(KeyboardInterrupt):
    """Raised by the training loop on every rank at the same optimizer-step boundary once any rank was signalled: a
    KeyboardInterrupt, so the loop's interrupt handling applies, but one after which collectives are safe."""


class StopFlag:
    """What ``stop_signals`` yields: ``signum`` is the first stop signal this rank received (0: none)."""

    signum = 0


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal.signal raises anywhere else


@contextlib.contextmanager
def stop_signals(ctx: DistContext):
    """Around the training loop of a torchrun rank: the first SIGINT or SIGTERM only sets the yielded flag's
    ``signum`` (the loop shares it with the other ranks at the next step boundary); a second one raises
    KeyboardInterrupt at once, an escape hatch from a stop that does not come. The previous handlers are restored
    on the way out. Nothing is installed for one process (its own interrupt handling is unchanged) or off the main
    thread."""
    if not ctx.enabled or not _on_main_thread():
        yield StopFlag()
        return
    with _flagging_signals() as flag:
        yield flag


@contextlib.contextmanager
def held_signals(active: bool = True):
    """A block a stop signal must not cut (one process: an optimizer update and its step's bookkeeping, the final
    outputs' write): the first SIGINT or SIGTERM in it is held — recorded in the yielded flag's ``signum`` — and,
    when the block ends, raised as KeyboardInterrupt at that consistent point; a second one raises at once (the
    escape hatch). A caller that must finish anyway reads the flag inside the block and clears it. ``active`` False
    (torchrun ranks, whose ``stop_signals`` already hold every signal to a step boundary) or off the main thread:
    nothing is installed."""
    if not active or not _on_main_thread():
        yield StopFlag()
        return
    with _flagging_signals() as flag:
        yield flag
    if flag.signum:
        raise KeyboardInterrupt(f"signal {flag.signum}")


@contextlib.contextmanager
def _flagging_signals():
    """SIGINT and SIGTERM set the yielded flag (the first) or raise KeyboardInterrupt (a second); the previous
    handlers come back on the way out."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.signum:
            raise KeyboardInterrupt(f"signal {signum} (a second stop signal)")
        flag.signum = signum

    # a signal the process ignores (SIGINT in a background job of a script) stays ignored
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield flag
    finally:
        for s, h in previous.items():  # None: a handler not set from Python, which cannot be put back
            signal.signal(s, signal.SIG_DFL if h is None else h)


def ignore_stop_signals() -> None:
    """A stopped rank that has saved everything ignores SIGINT and SIGTERM from then on (it is leaving): torchrun
    SIGTERMs the ranks still running when one exits non-zero (130), and would record a signal death instead of
    their 130. (A hung exit still ends: the agent SIGKILLs after its grace period.)"""
    if _on_main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def signal_hook(ctx: DistContext):
    """``LORA_FAST_SIGNAL_AT=RANK:STEP[:INT|TERM]`` (a test hook): on rank RANK, a ``callable(step)`` the loop calls
    with the optimizer step in progress after its first micro-batch, that sends the signal once, at STEP; None
    elsewhere. The signal goes to the rank's process group when the rank leads one (torchrun starts each rank in
    its own session and forwards signals to the group, so DataLoader workers get it too)."""
    spec = os.environ.get(SIGNAL_AT_ENV)
    if not spec or not ctx.enabled:
        return None
    rank, at, *name = spec.split(":")
    if int(rank) != ctx.rank:
        return None
    signum = getattr(signal, f"SIG{(name or ['INT'])[0]}")

    def hook(step: int) -> None:
        if step != int(at):
            return
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signum)
        else:
            os.kill(os.getpid(), signum)

    return hook
