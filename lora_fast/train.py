"""``lora-fast train`` (also ``python -m lora_fast.train``): LoRA fine-tuning of a GPT-2 style model.

The loop is the one the LoRA tutorials teach, with the pieces a real run needs: AdamW over the LoRA parameters
only (plus the classification head for ``--task classification``), linear warm-up then linear decay to zero,
gradient clipping, gradient accumulation (each step's loss is the mean over its examples, a short last
micro-batch weighted by its size — one big batch's loss, as the HF Trainer's token-weighted accumulation gives; a
pass whose micro-batches do not divide evenly ends with one step on the leftover ones: ``--epochs N`` is N whole
passes), fp16/bf16 autocast
(a gradient scaler with fp16), periodic evaluation (loss over every target token or example, and perplexity, or
accuracy), a tqdm bar with loss, learning rate and tokens/s. Ctrl-C stops the loop, and
what has been trained so far is saved like a finished run (``interrupted: true`` in the metrics, exit status 130;
before the first optimizer step nothing is written);
so does SIGTERM (a scheduler's preemption). Under torchrun the ranks stop together at an optimizer-step boundary
(``lora_fast.distributed``, "stopping"). ``--save_steps`` writes resumable checkpoints
and ``--resume_from_checkpoint`` continues one, bit for bit (``lora_fast.train_ckpt``).

Outputs (``--output_dir``, written all at once, see ``lora_fast.train_io``): ``adapter_model.safetensors`` +
``adapter_config.json`` (PEFT's format: ``PeftModel.from_pretrained(base, output_dir)`` loads it), the tokenizer,
``training_metrics.json``, ``training_args.json`` (resolved options: what ``lora-fast merge`` needs to rebuild the
base), ``training_loss_curve.png`` and ``model_comparison.txt``.

Several processes: ``torchrun --nproc_per_node N -m lora_fast.train ...`` trains with DDP (``--distributed fsdp``
for FSDP2); the global batch is batch_size × N × gradient_accumulation_steps (a pass at most), rank 0 alone writes
and shows progress (see ``lora_fast.distributed``). One process and N processes see the same sequence of global
batches.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_fast.plots import check_plotting
from lora_fast.train_args import ConfigError, RankConfigError, parse_train_args
from lora_fast.train_io import print_summary
from lora_fast.train_model import (
    RANDOM_GPT2,
    Unfailing,
    backend_used,
    check_causal,
    check_tf32,
    evaluate,
    load_base_model,
    load_tokenizer,
    log_stderr,
    position_limit,
    resolve_device,
    set_special_tokens,
    tf32_matmuls,
)


@dataclass
class Prepared:
    """What a run needs before LoRA goes in: reused across the runs of a sweep."""

    model: torch.nn.Module
    base_name: str
    tokenizer: object
    tokenizer_trained: bool
    data: dict  # causal-lm: {"train": (n, T), "validation": (n, T)}; classification: {split: (texts, labels)}
    source: str
    label_names: list[str] | None = None


def check_one_process(opts, command: str, verb: str = "trains") -> None:
    """Refuse ``--distributed ddp|fsdp`` or a launcher of several processes (torchrun, accelerate launch) for a
    command that runs in one process (``train()`` without a context, ``lora-fast sweep``, ``lora-fast merge``: every
    rank would write the one output, all but the first failing and keeping their copy beside it)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 or getattr(opts, "distributed", "none") in ("ddp", "fsdp"):
        launched = f" (WORLD_SIZE={world})" if world > 1 else ""
        raise ConfigError(f"{command} {verb} in one process{launched}; only `lora-fast train` (python -m "
                          "lora_fast.train) runs under torchrun: run it as a plain command")


def checkpoint_label_order(config, names: list[str], splits: dict, model_name: str, log) -> tuple[list, dict]:
    """The label order of a checkpoint that is already a classifier of these labels (its ``label2id``), else the
    data's sorted order. Sorting alone re-mapped a trained head: a spam/ham classifier saved as {0: spam, 1: ham}
    was trained on ham=0, spam=1, every label on the other output, starting at 0 % accuracy. A checkpoint whose
    labels are others than the data's (not transformers' default LABEL_i) is said to be re-labelled."""
    given = {str(k): v for k, v in (getattr(config, "label2id", None) or {}).items()}
    if not given or set(given) == {f"LABEL_{i}" for i in range(len(given))}:
        return names, splits
    if set(given) == set(names) and sorted(given.values()) == list(range(len(names))):
        order = sorted(names, key=given.get)
        if order != names:
            new = [order.index(n) for n in names]  # the data's (sorted) index -> the checkpoint's
            splits = {s: (texts, [new[y] for y in ys]) for s, (texts, ys) in splits.items()}
            log(f"lora-fast: the labels keep {model_name!r}'s own order, id2label {dict(enumerate(order))}")
        return order, splits
    log(f"lora-fast: warning: {model_name!r} is a classifier of labels {sorted(given)}, not the data's {names}: its "
        "id2label is replaced by the data's, and its head's outputs take the new meanings")
    return names, splits


def prepare(opts, log=log_stderr) -> Prepared:
    """Load data, base model and tokenizer (training one when the model has none). Writes nothing. Seeds torch with
    ``--seed`` first: weights ``from_pretrained`` initialises itself (a new classification head, a checkpoint
    lacking some) follow it, in ``train`` and ``sweep`` alike."""
    from lora_fast import data as D

    torch.manual_seed(opts.seed)
    label_names = None
    if opts.task == "classification":
        splits, label_names = D.load_classification(opts.dataset, opts.text_column, opts.seed, opts.val_fraction)
        train_texts, source = splits["train"][0], opts.dataset
    else:
        train_texts, val_texts, source = D.load_texts(opts.dataset, opts.text_column, opts.val_fraction, opts.seed)
    dtype = None if opts.base_dtype == "auto" else getattr(torch, opts.base_dtype)  # LoRA weights: fp32 always
    model, base_name = load_base_model(opts.model, opts.task, len(label_names or [0, 1]), opts.seed, log=log,
                                       dtype=dtype)
    if opts.task == "causal-lm":
        check_causal(model, opts.model)
    if opts.task == "causal-lm" and getattr(model, "loss_type", "") is None:
        # transformers 5 finds no loss in the class name GPT2LMHeadModel, warns "`loss_type=None` was set in the
        # config but it is unrecognized" at the first loss and falls back to ForCausalLM: name that same loss
        model.loss_type = "ForCausalLM"
    tokenizer = load_tokenizer(base_name)
    n_pos = position_limit(model.config)
    if n_pos is not None and opts.max_length > n_pos:  # both tasks: longer inputs would index past wpe
        raise ConfigError(f"max_length={opts.max_length} exceeds the model's {n_pos} positions")
    trained = tokenizer is None
    if trained:
        if opts.model != RANDOM_GPT2:
            log(f"lora-fast: no tokenizer loads for {opts.model!r} (none in its directory, or none cached for a hub "
                f"name); training a byte-level BPE of {model.config.vocab_size} tokens on the training text")
        tokenizer = D.train_bpe_tokenizer(train_texts, model.config.vocab_size)
        set_special_tokens(model, tokenizer.eos_token_id, ("eos_token_id", "bos_token_id", "pad_token_id"))
    elif len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"the tokenizer of {opts.model!r} has {len(tokenizer)} tokens but the model only "
                          f"{model.get_input_embeddings().num_embeddings} embeddings")
    elif opts.task == "classification" and tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {opts.model!r} has no padding token (nor an EOS token to pad with); "
                          "set tokenizer.pad_token and save the tokenizer with the model")
    elif opts.task != "classification" and D.separator_id(tokenizer) is None:
        raise ConfigError(f"the tokenizer of {opts.model!r} has no EOS (or SEP) token to put between documents; "
                          "set tokenizer.eos_token and save the tokenizer with the model")
    if opts.task == "classification":
        set_special_tokens(model, tokenizer.pad_token_id, ("pad_token_id",))  # GPT-2 pools the last non-pad token
        label_names, splits = checkpoint_label_order(model.config, label_names, splits, opts.model, log)
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {n: i for i, n in enumerate(label_names)}
        data = splits
    else:
        data = {"train": D.lm_blocks(tokenizer, train_texts, opts.max_length, "train"),
                "validation": D.lm_blocks(tokenizer, val_texts, opts.max_length, "validation")}
    return Prepared(model, base_name, tokenizer, trained, data, source, label_names)


def worker_ignores_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: a SIGTERM sent to the whole process group (``scancel``, ``timeout``,
    ``kill -TERM -PGID``) must stop the training loop, which saves (``sigterm_as_interrupt``), not kill the workers
    mid-batch, which makes the loader raise instead. The loader still shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_ignores_stop_signals(worker_id: int) -> None:
    """Under torchrun DataLoader workers ignore SIGINT too: the launcher forwards Ctrl-C to each rank's process
    group, and the rank keeps training to the next step boundary (``distributed.stop_signals``), so it still needs
    its workers' batches. (One process stops at the interrupt itself: its workers' SIGINT handling is left as is.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def total_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ⌈epochs × steps per pass⌉ (at least 1), the product rounded
    first so that float noise (1.1 × 50 = 55.000000000000007) does not add a step."""
    return max_steps or max(1, math.ceil(round(epochs * steps_per_epoch, 9)))


def _loaders(opts, prep: Prepared, ctx):
    """DataLoaders; the training one shuffles with ``ctx``'s shard of a (seed, epoch) permutation (any world size,
    one process included), the evaluation ones are in order (``evaluate`` shards them by batch)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lora_fast.data import ClassificationCollator, lm_collate
    from lora_fast.distributed import train_sampler

    kw = {"batch_size": opts.batch_size, "num_workers": opts.num_workers}
    if opts.num_workers > 0:
        kw["worker_init_fn"] = worker_ignores_stop_signals if ctx.enabled else worker_ignores_sigterm
    if opts.task == "classification":
        collate = ClassificationCollator(prep.tokenizer, opts.max_length)
        datasets = {s: list(zip(*prep.data[s], strict=True)) for s in prep.data}
    else:
        collate = lm_collate  # module-level callables: workers on spawn platforms (macOS, Windows) pickle them
        datasets = {s: TensorDataset(prep.data[s]) for s in prep.data}

    def mk(split, shuffle):
        sampler = train_sampler(datasets[split], ctx, opts.seed) if shuffle else None
        return DataLoader(datasets[split], collate_fn=collate, sampler=sampler, **kw)

    loaders = {s: mk(s, s == "train") for s in datasets}
    if opts.task == "classification":
        loaders["train_eval"] = mk("train", False)
    return loaders


def lr_schedule(optimizer, warmup_ratio: float, total: int):
    """transformers' linear schedule, as the Trainer builds it (``TrainingArguments.get_warmup_steps``): warm-up
    over ceil(ratio·total) steps from 0, then linear decay to 0 at ``total`` — the same learning rate per step as
    an HF Trainer run with ``warmup_ratio`` (so its first step, with warm-up, runs at lr 0, as the Trainer's)."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total), total)


def check_rank(model, target_modules, rank: int, device: torch.device | None = None) -> None:
    """Refuse a rank whose LoRA training state would not fit in memory: an absurd rank (10¹²) ended in the
    allocator's traceback, and one whose weights fit but whose training state did not (fp32 weights, gradients and
    AdamW's two moments: 16 bytes a parameter) was killed by the kernel's OOM killer without a word, the whole sweep
    with it. Compared with the total memory (never refusing a run that could fit): the host's for the weights,
    built there, and the training ``device``'s (the host's for a CPU or None; a CUDA GPU's own) for the state. Any
    rank that fits is accepted, as PEFT does (above a layer's min(in, out) it adds parameters and no capacity, but
    a ported config may hold one)."""
    from lora_fast.inject import find_target_modules, unwrap_model

    inner = unwrap_model(model)
    names = find_target_modules(inner, target_modules)
    params = sum(rank * sum(w.shape) for n in names
                 if (w := getattr(inner.get_submodule(n), "weight", None)) is not None and w.dim() == 2)
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the allocator decides
        host = None
    head = f"rank={rank}: the LoRA weights of the {len(names)} targeted layers would take {4 * params / 2**30:.3g} GiB"
    if host is not None and 4 * params > host:
        raise ConfigError(f"{head}, more than this machine's {host / 2**30:.3g} GiB of memory")
    where, have = "this machine's", host
    if device is not None and device.type == "cuda":
        where, have = f"{device}'s", torch.cuda.get_device_properties(device).total_memory
    elif device is not None and device.type != "cpu":
        have = None  # mps and others: the allocator decides
    if have is not None and 16 * params > have:
        raise ConfigError(f"{head}, and training them {16 * params / 2**30:.3g} GiB (fp32 weights, gradients and "
                          f"AdamW's two moments), more than {where} {have / 2**30:.3g} GiB of memory")


def _inject(opts, model, device: torch.device | None = None):
    from lora_fast import apply_lora
    from lora_fast.checkpointing import enable_checkpointing
    from lora_fast.inject import SEQ_CLS_HEAD_NAMES, _head_of

    heads = None
    if opts.task == "classification":  # trained whole, as PEFT's SEQ_CLS modules_to_save (classifier, score)
        if _head_of(model, SEQ_CLS_HEAD_NAMES) is None:
            raise ConfigError(f"{type(model).__name__} has no classification head named one of "
                              f"{SEQ_CLS_HEAD_NAMES}")
        names = [n for n, _ in model.named_modules()]
        heads = [h for h in SEQ_CLS_HEAD_NAMES if any(n.endswith(h) for n in names)]
    try:
        check_rank(model, opts.target_modules, opts.rank, device)
        apply_lora(model, opts.target_modules, opts.rank, opts.alpha, opts.dropout, use_rslora=opts.use_rslora,
                   backend=opts.backend, modules_to_save=heads)
        if getattr(opts, "gradient_checkpointing", False):
            enable_checkpointing(model)
    except ValueError as e:
        cli = (f"; lora-fast train --task classification trains its head ({', '.join(heads)}) whole: leave it out "
               "of --target_modules") if heads and "modules_to_save" in str(e) else ""
        raise ConfigError(f"{e}{cli}") from None


def _tensorboard(logdir, log, purge_step=None):
    """A SummaryWriter on ``logdir``; ``purge_step``: a resumed run's first step (events of the abandoned
    continuation from there on are hidden, so replayed steps are not shown twice)."""
    if not logdir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("lora-fast: tensorboard is not installed, --logdir ignored (pip install tensorboard, or "
            "'lora-fast[train]')")
        return None
    return SummaryWriter(str(Path(logdir).expanduser()), purge_step=purge_step)  # --logdir=~/tb: no ./~ directory


def train(opts, prep: Prepared, on_step=None, log=log_stderr, copy_model: bool = True, ctx=None,
          root_is_held: bool = False) -> dict:
    """Run the loop on ``prep.model`` (a copy of it by default) and write the outputs; returns the metrics dict.
    fp32 matmuls run as ``--tf32`` asks (``tf32_matmuls``; torch's setting restored after).

    Args:
        opts: validated options (``parse_train_args``).
        prep: from ``prepare``; its model is left unmodified when ``copy_model`` (a sweep reuses it).
        on_step: optional ``callable(step, metrics)`` after every optimizer step (tests raise KeyboardInterrupt).
        log: one-line messages (stderr by default).
        ctx: ``lora_fast.distributed.DistContext`` from ``distributed.init`` (``run`` does that); None: one process.
            Under torchrun a stop signal ends the loop on every rank at one step boundary; after that stop the rank
            ignores SIGINT and SIGTERM (``distributed.ignore_stop_signals``: it is leaving).
        root_is_held: the caller holds the checkpoint root already (``train_ckpt.root_held``: ``run`` takes it
            before loading, so that a second run into the same root is refused before minutes of loading).
    """
    from lora_fast import distributed as D
    from lora_fast.train_ckpt import root_held

    device = D.device(ctx) if ctx is not None and ctx.enabled else resolve_device(opts.device)
    hold = not root_is_held and (ctx is None or ctx.is_main)
    with tf32_matmuls(getattr(opts, "tf32", None), device), root_held(opts, hold):
        return _train(opts, prep, on_step, log, copy_model, ctx, device)  # checks the held root's checkpoints


def check_fsdp_checkpointing(opts, ctx) -> None:
    """FSDP runs do not checkpoint: refused (by ``run`` before the model loads, and by ``train``)."""
    if (opts.save_steps is not None or opts.resume_from_checkpoint is not None) and ctx.mode == "fsdp":
        raise ConfigError("--save_steps / --resume_from_checkpoint: FSDP runs do not checkpoint (the optimizer "
                          "state is sharded); use DDP (the default under torchrun)")


def _train(opts, prep: Prepared, on_step, log, copy_model: bool, ctx, device: torch.device) -> dict:
    """``train``'s loop on ``device`` (resolved by ``train``), with torch's TF32 switch already set."""

    from tqdm.auto import tqdm

    from lora_fast import distributed as D
    from lora_fast import train_ckpt as C
    from lora_fast.inject import unwrap_model
    from lora_fast.train_io import StagedDir, check_output_dir, finish_metrics, reset_peak_memory, write_outputs

    if ctx is None:
        check_one_process(opts, "this command")
        ctx = D.DistContext()
    out_dir = check_output_dir(opts.output_dir, opts.overwrite, run_inputs(opts), opts.logdir, opts.checkpoint_dir)
    check_fsdp_checkpointing(opts, ctx)
    check_plotting()  # train() called directly: before training, not at the end
    checkpointing = opts.save_steps is not None or opts.resume_from_checkpoint is not None
    ckpt_root, resume_path = C.check_options(opts)
    main = ctx.is_main
    log = log if main else (lambda msg: None)
    torch.manual_seed(opts.seed)  # the same LoRA init on every rank
    model = copy.deepcopy(prep.model) if copy_model else prep.model
    _inject(opts, model, device)
    model.to(device).train()
    amp_dtype = torch.float16 if opts.fp16 else torch.bfloat16 if opts.bf16 else None
    used = backend_used(opts.backend, model, device, amp_dtype)
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=opts.fp16)
    loaders = _loaders(opts, prep, ctx)
    digest = D.digest(prep.data["train"], prep.tokenizer) if ctx.enabled or checkpointing else None
    base = C.base_digest(model) if checkpointing else None  # before wrapping: the frozen tensors, whole
    if ctx.enabled:  # e.g. a tokenizer trained differently on two ranks would silently train on different data
        D.check_same(digest, ctx, "the training data and tokenizer (digest)")
    reduced = [0]  # gradient elements all-reduced by DDP (its comm hook counts them)
    model = D.wrap_model(model, ctx, device, on_reduce=lambda n: reduced.__setitem__(0, reduced[0] + n))
    plain = unwrap_model(model)  # what evaluation (DDP: no collectives needed) and saving see
    eval_model = model if ctx.mode == "fsdp" else plain
    D.seed_dropout_rng(opts.seed, ctx)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP2 swaps in DTensors
    # weight decay as the HF Trainer: not on biases and norm weights (1-D), only on matrices (LoRA A/B, a head's W)
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": [p for p in params if p.ndim >= 2]}] + ([{"params": no_decay, "weight_decay": 0.0}]
                                                                   if no_decay else [])
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    n_micro, ga = len(loaders["train"]), opts.gradient_accumulation_steps  # micro-batches per pass (per rank)
    n_rows, bs = len(loaders["train"].sampler), opts.batch_size  # examples per pass (per rank; equal on all ranks)
    if n_micro == 0:
        raise ConfigError(f"the training set has {len(loaders['train'].dataset)} examples, fewer than the "
                         f"{ctx.world_size} processes: each needs at least one")
    # --eval_batches counts global batches (batch_size × processes × accumulation sequences, a pass at most: what
    # a step takes), so that runs with the same global batch evaluate the same sequences; evaluate() takes
    # per-device loader batches over all ranks
    eval_cap = opts.eval_batches * ctx.world_size * min(ga, n_micro) if opts.eval_batches else None
    steps_per_epoch = max(1, -(-n_micro // ga))  # ceil: a pass's leftover micro-batches make one more step
    if ga > n_micro:  # a step never spans two passes (as the HF Trainer's): the whole pass is each step's batch
        log(f"lora-fast: warning: --gradient_accumulation_steps {ga} exceeds the {n_micro} micro-batches of one "
            f"pass over the training data: each optimizer step takes the whole pass, {n_rows * ctx.world_size} "
            f"sequences, not the {bs * ctx.world_size * ga} asked; use a smaller --gradient_accumulation_steps or "
            "more data")
    total = total_steps(opts.max_steps, opts.epochs, steps_per_epoch)
    if opts.save_steps and opts.save_steps > total:
        log(f"lora-fast: warning: --save_steps {opts.save_steps} exceeds the run's {total} optimizer steps: no "
            "periodic checkpoint will be written (an interrupt still writes one; the output directory gets the "
            "final adapter)")
    resumed = C.load_checkpoint(resume_path, opts, digest, ctx, total, base) if resume_path else None
    if resumed:
        C.load_trainable(plain, resumed["trainable"], resume_path)  # DDP replicas: every rank loads the same
        if main and opts.save_steps:  # every rank found its checkpoint before check_same's collective above
            C.set_aside_newer(ckpt_root, resume_path, log)
    sched = lr_schedule(optimizer, opts.warmup_ratio, total)
    if total == 1 and opts.warmup_ratio > 0 and not resumed:  # HF's schedule: warm-up's first step runs at lr 0
        log(f"lora-fast: warning: a 1-step run with warmup_ratio {opts.warmup_ratio:g} trains at learning rate 0 "
            "(warm-up starts from 0, as the HF Trainer's): the adapter stays as initialised; pass --warmup_ratio 0")
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
    writer = _tensorboard(opts.logdir, log, resumed["step"] + 1 if resumed else None) if main else None
    reset_peak_memory(device)
    is_cls = opts.task == "classification"
    m = {"train_loss": [], "learning_rate": [], "tokens_per_sec": [], "eval": [], "epochs": [], "_timed": [0, 0.0]}
    step, tokens_seen, interrupted, passes, skip, pending_rng = 0, 0, False, 0, 0, None
    if resumed:  # continue at the checkpoint's position, with its RNG stream
        m, step, tokens_seen = resumed["metrics"], resumed["step"], resumed["tokens_seen"]
        passes, skip, pending_rng = resumed["passes"], resumed["micro_done"], resumed["rng"][ctx.rank]
        if skip >= n_micro:  # that pass was over: the next one starts as it would have
            skip = 0
            C.restore_rng(pending_rng, device)
            pending_rng = None
        else:  # re-enter the pass; its RNG state is restored after the loader's iterator draws its seed
            passes -= 1
        log(f"lora-fast: resuming from {resume_path} at step {step}/{total}")
    start_step, boundary, in_update, last_saved, together = step, None, False, step, False
    signal_hook = D.signal_hook(ctx)
    t_start = time.perf_counter()
    err = Unfailing(sys.stderr)  # the bar and the lines above it: stderr (tqdm.write's default is stdout, where
    # ``lora-fast train | head -1`` ended the run with BrokenPipeError), never ending the run
    bar = tqdm(total=total, initial=step, disable=not (opts.progress and main), dynamic_ncols=True, desc="train",
               file=err)
    say = (lambda msg: bar.write(msg, file=err)) if main else (lambda msg: None)

    def do_eval():
        r = evaluate(eval_model, loaders["validation"], device, amp, eval_cap, ctx)
        m["eval"].append({"step": step, **{f"eval_{k}": v for k, v in r.items()}})
        if writer:
            for k, v in r.items():
                writer.add_scalar(f"eval/{k}", v, step)
        # an accuracy in percent, as the epoch and test lines give it ("eval accuracy 1" read as one example)
        say(f"step {step}: " + ", ".join(f"eval {k} {v:.2%}" if k == "accuracy" else f"eval {k} {v:.4g}"
                                         for k, v in r.items()))

    def epoch_accuracy():
        tr = evaluate(eval_model, loaders["train_eval"], device, amp, eval_cap, ctx)
        va = evaluate(eval_model, loaders["validation"], device, amp, eval_cap, ctx)
        ep = round(step / steps_per_epoch, 3)
        m["epochs"].append({"epoch": ep, "step": step, "train_accuracy": tr["accuracy"],
                            "val_accuracy": va["accuracy"], "val_loss": va["loss"]})
        say(f"epoch {ep:g}: train accuracy {tr['accuracy']:.2%}, validation accuracy {va['accuracy']:.2%}")

    def checkpoint(pos):
        return C.save_checkpoint(ckpt_root, pos, model=plain, optimizer=optimizer, scheduler=sched, scaler=scaler,
                                 metrics=m, opts=opts, prep=prep, total=total, digest=digest, ctx=ctx,
                                 limit=opts.save_total_limit, base=base)

    staged = StagedDir(out_dir, opts.overwrite, command="train") if main else None
    final = batches = None
    try:
        try:
            with D.stop_signals(ctx) as stop:  # torchrun: a signal is a flag, shared at the next step boundary
                acc_loss, acc_tokens, t_step = 0.0, 0, time.perf_counter()
                due = step % opts.eval_steps == 0 or step == total
                if resumed and due and (not m["eval"] or m["eval"][-1]["step"] != step):
                    do_eval()  # an interrupt during that step's evaluation wrote the checkpoint without it
                if is_cls and resumed and skip == 0 and step < total and (not m["epochs"] or m["epochs"][-1]["step"]
                                                                         != step):
                    epoch_accuracy()  # the checkpoint ended a pass before that pass's accuracy was taken
                while step < total:
                    sampler = loaders["train"].sampler
                    sampler.set_epoch(passes)  # a new (seed, pass) permutation, the same on all ranks
                    start, skip, passes = skip, 0, passes + 1
                    sampler.skip = start * bs  # a resumed pass starts after its consumed micro-batches
                    batches = iter(loaders["train"])  # draws the workers' base seed from torch's RNG
                    if pending_rng is not None:
                        C.restore_rng(pending_rng, device)
                        pending_rng = None
                    for j, batch in enumerate(batches, start=start):
                        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                        first = j // ga * ga  # the step's first micro-batch; fewer than ga at a pass's end
                        rows = sum(min(bs, n_rows - i * bs) for i in range(first, min(first + ga, n_micro)))
                        last = (j + 1) % ga == 0 or j + 1 == n_micro
                        with D.gradient_sync(model, ctx, last):
                            with amp():  # the step's gradient: mean over its examples (a short micro-batch weighs less)
                                loss = model(**batch).loss * (len(batch["input_ids"]) / rows)
                            scaler.scale(loss).backward()
                        acc_loss += loss.item()
                        acc_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
                            else batch["input_ids"].numel()
                        if signal_hook is not None and j == first:
                            signal_hook(step + 1)
                        if not last:
                            continue
                        if opts.max_grad_norm > 0:
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
                        lr = optimizer.param_groups[0]["lr"]
                        # one process: a signal in the update and its bookkeeping is held to the step's
                        # boundary (then raised there: the interrupt handler checkpoints that boundary)
                        with D.held_signals(not ctx.enabled) as held:
                            in_update = True  # from here to the boundary an interrupt leaves no consistent state
                            scale = scaler.get_scale() if scaler.is_enabled() else None
                            scaler.step(optimizer)
                            scaler.update()
                            optimizer.zero_grad(set_to_none=True)
                            if scale is not None and scaler.get_scale() < scale:  # inf/NaN gradients: no update
                                m["fp16_skipped_steps"] = m.get("fp16_skipped_steps", 0) + 1
                            else:  # as accelerate's scheduler (HF Trainer): the schedule advances with updates only
                                sched.step()
                            step += 1
                            if ctx.enabled:  # the global batch (mean loss over ranks, tokens of all ranks); stopping
                                acc_loss, acc_tokens, stopping = D.all_reduce_sum(
                                    [acc_loss / ctx.world_size, acc_tokens, float(stop.signum > 0)], ctx, device)
                                acc_tokens = int(acc_tokens)
                            now = time.perf_counter()
                            tps = acc_tokens / max(now - t_step, 1e-9)
                            if step > start_step + 1 or total == 1:  # throughput: the first step (warm-up) left out
                                m["_timed"][0] += acc_tokens
                                m["_timed"][1] += now - t_step
                            m["train_loss"].append(acc_loss)
                            m["learning_rate"].append(lr)
                            m["tokens_per_sec"].append(tps)
                            tokens_seen += acc_tokens
                            if writer:
                                writer.add_scalar("train/loss", acc_loss, step)
                                writer.add_scalar("train/lr", lr, step)
                            bar.set_postfix(loss=f"{acc_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                            refresh=False)  # update() redraws at tqdm's pace, not every step
                            bar.update(1)
                            acc_loss, acc_tokens = 0.0, 0
                            if checkpointing:
                                boundary = C.Position(step, passes, j + 1, tokens_seen, C.capture_rng(device))
                            in_update = False
                            if held.signum and step >= total:  # every step is done: it completes (as torchrun's)
                                say(f"lora-fast: signal {held.signum} after the last optimizer step; the run completes")
                                held.signum = 0
                        if ctx.enabled and stopping and step < total:  # at the last step the run is complete: it ends
                            raise D.StopRequested(f"a stop signal reached {int(stopping)} of {ctx.world_size} ranks; "
                                                  f"all stopped at step {step}/{total}")
                        if step % opts.eval_steps == 0 or step == total:
                            do_eval()
                        if opts.save_steps and step % opts.save_steps == 0:
                            checkpoint(boundary)
                            last_saved = step
                        if on_step is not None:
                            on_step(step, m)
                        t_step = time.perf_counter()
                        if step >= total:
                            break
                    else:  # a full pass over the training data
                        if is_cls:
                            epoch_accuracy()
                            t_step = time.perf_counter()  # evaluation time is not training time
                if is_cls and (not m["epochs"] or m["epochs"][-1]["step"] != step):
                    epoch_accuracy()  # the last, partial epoch
        except KeyboardInterrupt as e:
            interrupted = True
            together = isinstance(e, D.StopRequested)  # every rank is here, at the same boundary: collectives work
            if step == start_step:  # nothing trained: committing would replace an --overwrite'd finished run by it
                say(f"lora-fast: interrupted before the first optimizer step ({step}/{total}); nothing to save")
                raise
            if ctx.mode == "fsdp" and not together:  # the ranks may be anywhere: no collective (gather) can be trusted
                say(f"lora-fast: interrupted at step {step}/{total}; an FSDP run cannot gather its shards now, "
                    "nothing is saved")
                raise
            say(f"lora-fast: {e}; saving what has been trained" if together else
                f"lora-fast: interrupted at step {step}/{total}; saving what has been trained")
            if opts.save_steps and (together or not ctx.enabled) and step > last_saved:
                if in_update or boundary is None or boundary.step != step:
                    last = (f"resume from the checkpoint of step {last_saved}" if last_saved > 0 else
                            "no checkpoint was written before it")
                    say(f"lora-fast: the interrupt came during an optimizer update: no checkpoint of this step "
                        f"({last})")
                else:
                    say(f"lora-fast: checkpoint written to {checkpoint(boundary)}")
            elif not opts.save_steps and step > start_step:
                say("lora-fast: no resumable checkpoint is written (--save_steps not given): the output holds the "
                    "adapter trained so far")
        if not interrupted and stop.signum:  # it came after the last step's boundary: every step is done
            log_stderr(f"lora-fast: rank {ctx.rank}: signal {stop.signum} after the last optimizer step; the run "
                       "completes")
        bar.close()
        model.eval()
        if is_cls and "test" in loaders and not interrupted:
            try:
                m["test_accuracy"] = evaluate(eval_model, loaders["test"], device, amp, None, ctx)["accuracy"]
                log(f"test accuracy {m['test_accuracy']:.2%}")
            except KeyboardInterrupt:  # training is complete: keep it, without a test accuracy
                if ctx.mode == "fsdp":
                    raise
                interrupted = True
                say("lora-fast: interrupted during the test-set evaluation; saving the trained adapter without a "
                    "test accuracy")
        metrics = finish_metrics(m, opts, prep, step, total, tokens_seen, t_start, device, used,
                                 interrupted)
        if opts.fp16:
            metrics["fp16_skipped_steps"] = m.get("fp16_skipped_steps", 0)
            if metrics["fp16_skipped_steps"]:
                log(f"fp16: {metrics['fp16_skipped_steps']} of {step} optimizer steps were skipped (inf/NaN "
                    "gradients; the gradient scaler lowered its scale and the schedule waited)")
        per_step = reduced[0] / max(step - start_step, 1) if ctx.mode == "ddp" else None  # this process's steps
        metrics.update(distributed=ctx.mode, world_size=ctx.world_size, dist_backend=ctx.backend,
                       per_device_batch_size=opts.batch_size,  # what a step takes (a pass at most)
                       global_batch_size=min(bs * opts.gradient_accumulation_steps, n_rows) * ctx.world_size,
                       grad_allreduce_numel_per_step=per_step,
                       resumed_from=str(resume_path) if resume_path else None,
                       resumed_at_step=start_step if resume_path else None)
        if resumed and metrics["wall_time_s"] > 0:  # this process's tokens over this process's time
            metrics["mean_tokens_per_sec"] = (tokens_seen - resumed["tokens_seen"]) / metrics["wall_time_s"]
        if not interrupted or together:
            D.dump_rank_state(model, ctx)
        if main:
            with D.held_signals() as held:  # the run is complete: a signal now must not discard it
                write_outputs(staged.path, opts, prep, plain, metrics)
                final = staged.commit()
                if held.signum:
                    held.signum = 0
                    say(f"lora-fast: a stop signal came while the outputs were written; they are complete ({final})")
        elif ctx.mode == "fsdp":
            from lora_fast.adapter import save_adapter

            save_adapter(plain, out_dir)  # the gather (a collective) rank 0's save needs; only rank 0 writes
    except BaseException:
        if staged is not None:  # a failing rank exits non-zero and torchrun stops the others: no collective here
            staged.discard()
        raise
    finally:
        # The loader's iterator shuts its workers down when it is freed. Dropped here, not left to the traceback,
        # which keeps this frame's locals alive to interpreter exit: multiprocessing's exit handler then SIGTERMs
        # the workers, which ignore SIGTERM (worker_ignores_sigterm), and joins them forever — a run failing with
        # --num_workers > 0 (an OOM, a bad batch) hung instead of exiting.
        batches = None  # noqa: F841
        if writer:
            writer.close()
    if ctx.enabled and (not interrupted or together):
        final = D.broadcast_object(str(final) if main else None, ctx)  # and the ranks leave together
    if together:
        D.ignore_stop_signals()  # all is saved; a signal now would only turn this rank's exit status 130 into a kill
    metrics["output_dir"] = str(final)
    return metrics


def run_inputs(opts) -> dict:
    """The run's local inputs an ``--overwrite`` of the output directory must never delete: {flag: path}."""
    return {"--model": opts.model, "--dataset": opts.dataset, "--config": getattr(opts, "config", None),
            "--resume_from_checkpoint": getattr(opts, "resume_from_checkpoint", None)}


def run(opts, on_step=None, log=log_stderr) -> dict:
    """``prepare`` then ``train``: one complete ``lora-fast train`` (one process, or one rank under torchrun).
    Returns the metrics (with ``output_dir``)."""
    from lora_fast import distributed as D
    from lora_fast.train_ckpt import check_options, root_held
    from lora_fast.train_io import check_output_dir

    check_output_dir(opts.output_dir, opts.overwrite, run_inputs(opts), opts.logdir,  # before minutes of loading
                     opts.checkpoint_dir)
    check_options(opts)
    D.check_accelerate_env(getattr(opts, "distributed", "auto"), opts.fp16, opts.bf16)
    ctx = D.init(getattr(opts, "distributed", "auto"), opts.device, opts.fp16)
    try:
        with transformers_bars(opts.progress):
            check_fsdp_checkpointing(opts, ctx)  # before minutes of loading, on every rank
            check_plotting()
            check_tf32(getattr(opts, "tf32", None), D.device(ctx) if ctx.enabled else resolve_device(opts.device))
            with quiet_unless(ctx.is_main), root_held(opts, ctx.is_main):  # a second run refused before loading
                prep = prepare(opts, log if ctx.is_main else (lambda msg: None))
                metrics = train(opts, prep, on_step, log, copy_model=False, ctx=ctx, root_is_held=True)
    except BaseException:
        D.shutdown(ctx, ok=False)
        raise
    D.shutdown(ctx)
    return metrics


def _shown_nowhere(*args, **kwargs) -> None:
    """``warnings.showwarning`` on ranks other than 0 (``quiet_unless``)."""


@contextlib.contextmanager
def quiet_unless(main: bool):
    """Rank 0 speaks for all: on the other ranks no loading bars, transformers' logging at errors only, and no
    Python warnings shown (transformers', torch's, lora_fast's: one line each, not one per rank) — by replacing
    ``showwarning``, not by an "ignore" filter, so that a user's ``-W error`` raises on every rank as on rank 0.
    Everything is put back as it was after the block."""
    if main:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _shown_nowhere
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def transformers_bars(on: bool):
    """transformers' progress bars off for the block unless ``on`` (``--no-progress`` also hides its "Loading
    weights" bar), then as they were."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """In a single-process run, SIGTERM (a scheduler's preemption, ``kill``) stops training like Ctrl-C: what was
    trained is saved. That includes ``torchrun --nproc_per_node 1``, which forwards the signal to its one rank.
    With several ranks the training loop handles the signals itself (``distributed.stop_signals``: every rank stops
    at the same step), so nothing changes here; nor off the main thread, where signal handlers cannot be set."""
    from lora_fast.distributed import torchrun_env

    env = torchrun_env()
    if (env is not None and env["world_size"] > 1) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


RANK_ERROR_GRACE_S = 10.0
"""How long a rank other than 0 waits before printing an option error that every rank meets alike. Rank 0 prints
it; the launcher (torchrun, accelerate launch) then ends the other ranks during their wait, so the message shows
once. A rank that fails first must not leave at once: torchrun would end rank 0 before it printed (a slower
import, a busy node), and the job would end with exit codes and no message. Still alive after the wait (rank 0
did not fail, or a launcher that ends no one), a rank prints the error itself, naming its rank."""


def _rank_for_messages() -> int:
    """This process's torchrun rank, which decides who prints; 0 outside torchrun or when its variables are bad
    (then every process prints that error)."""
    from lora_fast.distributed import torchrun_env

    try:
        return (torchrun_env() or {}).get("rank", 0)
    except ConfigError:
        return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lora-fast train``; returns the exit status (0, 2 bad input, 130 interrupted)."""
    try:
        with sigterm_as_interrupt():
            metrics = run(parse_train_args(argv))
    except ConfigError as e:
        rank = _rank_for_messages()
        if rank and not isinstance(e, RankConfigError):
            time.sleep(RANK_ERROR_GRACE_S)  # rank 0 says it, the launcher ends this rank
        print(f"lora-fast train: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-fast train: interrupted before training started (or while saving); nothing was written",
              file=sys.stderr)
        return 130
    if metrics.get("world_size", 1) == 1 or _rank_for_messages() == 0:
        print_summary(metrics)
    return 130 if metrics["interrupted"] else 0


if __name__ == "__main__":  # python -m lora_fast.train (torchrun's usual form)
    from lora_fast.cli import run_console

    sys.exit(run_console(main))
