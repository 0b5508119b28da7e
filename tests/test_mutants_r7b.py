"""Tests written against mutants that survived the rest of the suite (round 7b of mutation testing: multi-process and
training-loop code — ``distributed.py``, ``train.py`` and ``train_model.py``). Each pins a documented property (the
module docstrings of ``lora_fast.distributed`` and ``lora_fast.train``, the README's "Scaling out" and training
sections), calling the module's functions on tiny inputs — a launcher's environment set by hand, CUDA and the
collectives replaced by stand-ins where only the choice of rank, device or backend is checked, a 1-process gloo group
where a real collective is — and names the mutation it kills. Nothing is downloaded, no second process is started."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from lora_fast import distributed as D
from lora_fast.train_args import ConfigError, RankConfigError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", D.SIGNAL_AT_ENV)


@pytest.fixture
def no_launcher(monkeypatch):
    """No torchrun variables in the environment (a test sets those it needs)."""
    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------------- launcher environment
def test_torchrun_env_needs_both_rank_and_world_size_and_says_what_is_wrong(no_launcher):
    """D01: a process is under a launcher only when RANK and WORLD_SIZE are both set (a WORLD_SIZE left in a shell
    alone is one process, not a KeyError). D02: LOCAL_RANK, when the launcher does not set it, is the rank (one
    node). D04: variables that are not integers are a ConfigError (a one-line message), not a ValueError's
    traceback."""
    no_launcher.setenv("WORLD_SIZE", "2")
    assert D.torchrun_env() is None
    no_launcher.delenv("WORLD_SIZE")
    no_launcher.setenv("RANK", "1")
    assert D.torchrun_env() is None
    no_launcher.setenv("WORLD_SIZE", "2")
    assert D.torchrun_env() == {"rank": 1, "world_size": 2, "local_rank": 1}
    no_launcher.setenv("LOCAL_RANK", "0")
    assert D.torchrun_env()["local_rank"] == 0
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        with no_launcher.context() as m:
            m.setenv(var, "one")
            with pytest.raises(ConfigError, match="must be integers"):
                D.torchrun_env()


def test_init_takes_the_gpu_of_its_local_rank(no_launcher):
    """``--device auto`` under a launcher where CUDA is available is NCCL on ``cuda:LOCAL_RANK`` (D15: auto gave
    gloo on the CPU), made the current device (D17), and ``device(ctx)`` is that GPU, not ``cuda:RANK`` (D18: rank 3
    of a second node has no GPU 3); a LOCAL_RANK past this node's GPUs is refused (D16: LOCAL_RANK == the GPU
    count); a mode that is none of auto/none/ddp/fsdp is named (D08). CUDA and the process group are stand-ins:
    what is checked is the choice."""
    no_launcher.setenv("RANK", "3")
    no_launcher.setenv("WORLD_SIZE", "4")
    no_launcher.setenv("LOCAL_RANK", "1")
    no_launcher.setattr(torch.cuda, "is_available", lambda: True)
    no_launcher.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    no_launcher.setattr(torch.cuda, "set_device", current.append)
    no_launcher.setattr(torch.distributed, "is_initialized", lambda: True)  # the group exists: nothing is joined
    ctx = D.init("auto", "auto")
    assert (ctx.mode, ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == ("ddp", 3, 4, 1, "nccl")
    assert current == [1]
    assert D.device(ctx) == torch.device("cuda", 1)
    ctx = D.init("ddp", "cpu")  # --device cpu: gloo, whatever the node has
    assert ctx.backend == "gloo" and D.device(ctx) == torch.device("cpu") and current == [1]
    no_launcher.setenv("LOCAL_RANK", "2")
    with pytest.raises(RankConfigError, match="LOCAL_RANK=2 but only 2 GPU"):
        D.init("auto", "auto")
    with pytest.raises(ConfigError, match="distributed must be one of"):  # D08: "dpp" was taken as a mode
        D.init("dpp", "auto")


def test_shutdown_meets_the_other_ranks_only_after_a_run_that_ended_normally(monkeypatch):
    """``shutdown``: a barrier before leaving the group after a normal end (no rank tears its connections down while
    another is in a collective), none after an error (it could wait out the collective timeout); nothing for one
    process. D19: the barrier after errors only. Collectives are stand-ins recording the calls."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    ctx = D.DistContext("ddp", 1, 2, 1, "gloo")
    D.shutdown(ctx)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    D.shutdown(ctx, ok=False)
    assert calls == ["destroy"]
    calls.clear()
    D.shutdown(D.DistContext())
    assert calls == []


# ------------------------------------------------------------------------------------------------ seeds and data
def test_rank_dropout_seeds_stay_clear_of_the_seeds_a_user_tries():
    """Rank k > 0 reseeds with seed + 1_000_003·k (the module docstring): far from the seeds a user tries by hand,
    so rank 1 of a ``--seed 42`` run does not draw the masks of rank 0 of ``--seed 43``, nor rank 2 those of rank 1
    of ``--seed 43`` (D20: seed + k)."""
    tried = range(0, 1000)
    for seed in (0, 42, 1234):
        for rank in (1, 2, 3, 7):
            assert D.seed_for_rank(seed, rank) not in {D.seed_for_rank(s, r) for s in tried for r in range(rank)
                                                       if s != seed}
    assert D.seed_for_rank(42, 0) == 42


def test_rank_zero_keeps_the_stream_it_has_after_the_lora_init():
    """``seed_dropout_rng`` leaves rank 0's (and one process's) torch stream as it is — it continues after the
    LoRA init's draws; D21 reseeded rank 0 too, so its dropout masks replayed the very numbers the init drew."""
    torch.manual_seed(11)
    torch.rand(5)  # the LoRA init's draws
    state = torch.get_rng_state()
    for ctx in (D.DistContext(), D.DistContext("ddp", 0, 2, 0, "gloo")):
        D.seed_dropout_rng(11, ctx)
        assert torch.equal(torch.get_rng_state(), state)
    D.seed_dropout_rng(11, D.DistContext("ddp", 1, 2, 1, "gloo"))
    assert not torch.equal(torch.get_rng_state(), state)


def test_the_training_permutation_follows_the_seed_and_the_pass():
    """The training set is permuted from (seed, epoch) alone, on every rank alike (the module docstring): a shuffled
    order (D23: shuffle off trained every pass in file order), another one for another ``--seed`` (D24: the
    sampler's seed fixed) and for another pass, the same one again for the same (seed, pass); and the shards of 2
    ranks are cut from the permutation of one process (positions k, k+W, ...)."""
    data = list(range(40))

    def order(seed, epoch, rank=0, world=1):
        sampler = D.train_sampler(data, D.DistContext("ddp" if world > 1 else "none", rank, world), seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = order(7, 0)
    assert sorted(first) == data and first != data
    assert order(7, 0) == first
    assert order(8, 0) != first and order(7, 1) != first and sorted(order(7, 1)) == data
    assert [order(7, 0, rank, 2) for rank in (0, 1)] == [first[0::2], first[1::2]]


# ------------------------------------------------------------------------------------------- wrapping, collectives
def test_gradient_sync_under_fsdp_holds_the_reduction_until_the_last_micro_step():
    """``gradient_sync(sync=False)`` under FSDP2 keeps the gradients local (``set_requires_gradient_sync(False)``),
    the last micro-step reduces them (D30: every micro-step reduce-scattered, G-fold the communication); DDP's
    ``no_sync`` likewise, one process nothing. The wrapped models are stand-ins recording what they are asked."""
    import contextlib

    class Sharded:
        def __init__(self):
            self.asked = []

        def set_requires_gradient_sync(self, flag):
            self.asked.append(flag)

    class Replicated:
        def __init__(self):
            self.held = 0

        @contextlib.contextmanager
        def no_sync(self):
            self.held += 1
            yield

    fsdp, ddp = Sharded(), Replicated()
    for sync in (False, False, True):
        with D.gradient_sync(fsdp, D.DistContext("fsdp", 0, 2, 0, "gloo"), sync):
            pass
        with D.gradient_sync(ddp, D.DistContext("ddp", 0, 2, 0, "gloo"), sync):
            pass
        with D.gradient_sync(object(), D.DistContext(), sync):
            pass
    assert fsdp.asked == [False, False, True] and ddp.held == 2


def test_the_all_reduced_counts_are_exact(one_rank_group):
    """``all_reduce_sum`` sums in float64 (its docstring): token and target counts past 2**24 (a few epochs of
    tokens, an evaluation set's targets) stay exact; float32 (D31) rounded 2**24 + 1 to 2**24."""
    ctx = D.DistContext("ddp", 0, 1, 0, "gloo")
    assert D.all_reduce_sum([2**24 + 1, 2**40 + 3, 0.1], ctx, torch.device("cpu")) == [2**24 + 1, 2**40 + 3, 0.1]


def test_ranks_holding_different_data_are_refused(monkeypatch):
    """``check_same`` raises when any rank's value differs from the others' (D32: only when every other rank
    differed from rank 0 — 3 ranks where one had another tokenizer went on training on different data). The
    gather is a stand-in giving each rank's value."""
    import torch.distributed as dist

    def gather(values):
        def fake(out, value):
            out[:] = values
        return fake

    ctx = D.DistContext("ddp", 0, 3, 0, "gloo")
    monkeypatch.setattr(dist, "all_gather_object", gather(["a", "a", "a"]))
    D.check_same("a", ctx, "the data")
    for values in (["a", "a", "b"], ["a", "b", "a"], ["b", "a", "a"], ["a", "b", "c"]):
        monkeypatch.setattr(dist, "all_gather_object", gather(values))
        with pytest.raises(RuntimeError, match="ranks disagree on the data"):
            D.check_same(values[0], ctx, "the data")


def test_the_data_digest_covers_the_tokenizer_vocabulary():
    """``digest`` fingerprints the training split and the tokenizer's vocabulary (its docstring): the same token
    ids under another tokenizer (a BPE trained differently on one rank, a checkpoint's tokenizer replaced) give
    another digest (D33: the tokenizer left out)."""
    class Tok:
        def __init__(self, vocab):
            self.backend_tokenizer = type("Backend", (), {"to_str": lambda self, v=vocab: v})()

    data = torch.arange(12).view(3, 4)
    a, b = D.digest(data, Tok('{"vocab": {"a": 0}}')), D.digest(data, Tok('{"vocab": {"b": 0}}'))
    assert a != b and a == D.digest(data.clone(), Tok('{"vocab": {"a": 0}}'))
    assert D.digest(data) != D.digest(data + 1)


# ----------------------------------------------------------------------------------------------------- stopping
def test_a_signal_the_process_ignores_stays_ignored_in_the_loop(no_launcher):
    """A stop signal the process ignores (SIGINT in a background job of a script, ``nohup``) stays ignored inside
    ``stop_signals`` and ``held_signals`` (D35: the flag handler replaced SIG_IGN, and a Ctrl-C meant for the
    shell's foreground job stopped the run)."""
    before = {s: signal.getsignal(s) for s in D.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with D.stop_signals(D.DistContext("ddp", 0, 2, 0, "gloo")):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, before[signal.SIGTERM])
        with D.held_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_stop_signal_handling_off_the_main_thread_installs_nothing():
    """``stop_signals`` and ``held_signals`` off the main thread (a training run in a worker thread: a notebook's
    background job) install nothing and run the block (D41, D42: ``signal.signal`` raised ValueError there)."""
    done, errors = [], []

    def body():
        try:
            with D.stop_signals(D.DistContext("ddp", 0, 2, 0, "gloo")) as flag:
                done.append(flag.signum)
            with D.held_signals() as flag:
                done.append(flag.signum)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert not errors and done == [0, 0]


def test_the_signal_test_hook_fires_on_its_rank_at_its_step_only(no_launcher):
    """``LORA_FAST_SIGNAL_AT=RANK:STEP[:INT|TERM]`` makes rank RANK alone send the signal, once, at STEP (D38: every
    rank sent it — not the one-rank stop it stands for); one process ignores it (D43). The signal goes to a
    stand-in of ``os.kill``/``os.killpg``."""
    sent = []
    no_launcher.setattr(os, "kill", lambda pid, sig: sent.append(sig))
    no_launcher.setattr(os, "killpg", lambda pgid, sig: sent.append(sig))
    no_launcher.setenv(D.SIGNAL_AT_ENV, "1:3")
    assert D.signal_hook(D.DistContext("ddp", 0, 2, 0, "gloo")) is None
    with no_launcher.context() as m:
        m.setenv(D.SIGNAL_AT_ENV, "0:3")  # rank 0 of one process: not a torchrun rank
        assert D.signal_hook(D.DistContext()) is None
    hook = D.signal_hook(D.DistContext("ddp", 1, 2, 1, "gloo"))
    for step in (1, 2, 3, 4, 5):
        hook(step)
    assert sent == [signal.SIGINT]
    no_launcher.setenv(D.SIGNAL_AT_ENV, "1:2:TERM")
    D.signal_hook(D.DistContext("ddp", 1, 2, 1, "gloo"))(2)
    assert sent == [signal.SIGINT, signal.SIGTERM]


# ------------------------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2 without dropouts of its own, saved locally, and a small plain-text corpus (a byte-level BPE is
    trained on it in a fraction of a second); ``opts(out, *extra)`` gives a short run's options on them."""
    import random

    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_fast.train_args import parse_train_args

    root = tmp_path_factory.mktemp("r7b")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=32, initializer_range=0.3,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(root / "tiny")
    rng = random.Random(0)
    words = "the a cat dog sat ran on in mat park day good walk code data loop test model token".split()
    (root / "c.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 40)))
                                            for _ in range(40)))

    def opts(out, *extra, steps=2):
        return parse_train_args(["--model", str(root / "tiny"), "--dataset", str(root / "c.txt"), "--max_length", "16",
                                 "--batch_size", "4", "--lr", "0.01", "--eval_batches", "1", "--target_modules",
                                 "c_attn", "--rank", "4", "--no-progress", "--output_dir", str(root / out), *extra,
                                 *(["--max_steps", str(steps)] if steps else [])])

    opts.root = root
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield opts
    torch.set_num_threads(n)


def _quiet(msg):
    pass


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def test_a_step_taking_the_whole_pass_evaluates_what_the_same_global_batch_does(lm, monkeypatch):
    """--eval_batches counts global batches, "a pass at most: what a step takes": with accumulation past a pass
    (each step takes the pass) a run evaluates the sequences of a run whose accumulation is exactly the pass, and
    trains the same (T27: the cap took the accumulation asked, evaluating up to 1000 × as many batches). Only the
    run asking past the pass is warned of it (T30: accumulation equal to the pass was too), and ``--save_steps``
    equal to the run's steps writes its checkpoint, without the warning that it exceeds them (T31)."""
    from lora_fast import train as T

    caps = []
    real_evaluate = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: caps.append(a[4]) or real_evaluate(*a, **k))
    opts = lm("pass-exact")
    prep = T.prepare(opts, log=_quiet)
    n_micro = -(-len(prep.data["train"]) // opts.batch_size)
    runs = []
    for name, ga in (("pass-exact", n_micro), ("pass-past", 1000)):
        caps.clear()
        logged = []
        runs.append(T.train(lm(name, "--gradient_accumulation_steps", str(ga), "--save_steps", "2"), prep,
                            log=logged.append))
        runs[-1].update(caps=list(caps), warned=[msg for msg in logged if "exceeds" in msg])
        assert (Path(f"{lm.root / name}-checkpoints") / "checkpoint-2").is_dir()
    exact, past = runs
    assert exact["caps"] == past["caps"] and len(exact["caps"]) == 1
    assert exact["eval_loss"] == past["eval_loss"] and exact["train_loss"] == past["train_loss"]
    assert exact["warned"] == [] and len(past["warned"]) == 1 and "--gradient_accumulation_steps 1000" in past[
        "warned"][0]


def test_ranks_compare_their_training_data_before_training(lm, monkeypatch, one_rank_group):
    """Under torchrun every rank checks that all hold the same training data and tokenizer (its digest) before
    training (T23: the digest was only computed for checkpoints, so the ranks compared None; T24: not compared). A
    1-rank DDP group in this process; the comparison is recorded."""
    from lora_fast import train as T

    compared = []
    monkeypatch.setattr(D, "check_same", lambda value, ctx, what: compared.append((value, what)))
    opts = lm("ddp1", steps=1)
    prep = T.prepare(opts, log=_quiet)
    m = T.train(opts, prep, log=_quiet, ctx=D.DistContext("ddp", 0, 1, 0, "gloo"))
    assert m["distributed"] == "ddp" and m["steps"] == 1
    assert compared == [(D.digest(prep.data["train"], prep.tokenizer), "the training data and tokenizer (digest)")]


def test_an_uncoordinated_interrupt_of_an_fsdp_run_saves_nothing(lm, one_rank_group, capsys):
    """An FSDP rank interrupted outside a coordinated stop (a KeyboardInterrupt, not ``StopRequested``) cannot
    trust a collective, so it saves nothing (the module docstring: "FSDP saves nothing") and the interrupt goes on
    (T50: it gathered the shards — a collective the other ranks, anywhere else, never join: a hang until the
    launcher's kill). A 1-rank FSDP group in this process."""
    from lora_fast import train as T

    def interrupt(step, m):
        raise KeyboardInterrupt

    opts = lm("fsdp-int", steps=3)
    prep = T.prepare(opts, log=_quiet)
    with pytest.raises(KeyboardInterrupt):
        T.train(opts, prep, on_step=interrupt, log=_quiet, ctx=D.DistContext("fsdp", 0, 1, 0, "gloo"))
    assert "an FSDP run cannot gather its shards now, nothing is saved" in capsys.readouterr().err
    assert not os.path.exists(opts.output_dir)


# --------------------------------------------------------------------------------------------------- evaluation
class _ConstLM(torch.nn.Module):
    """A causal-LM stand-in whose loss is the batch's first input id (NaN when no label counts, as transformers'
    mean over no targets); it counts its forwards."""

    def __init__(self):
        super().__init__()
        self.forwards = 0

    def forward(self, input_ids, labels):
        from types import SimpleNamespace

        self.forwards += 1
        counted = (labels[..., 1:] != -100).any()
        loss = input_ids[0, 0].double() if counted else torch.tensor(float("nan"), dtype=torch.float64)
        return SimpleNamespace(loss=loss, logits=torch.zeros(*input_ids.shape, 3))


def _batch(value, rows=1, length=3, labelled=True):
    ids = torch.full((rows, length), value)
    return {"input_ids": ids, "labels": ids.clone() if labelled else torch.full_like(ids, -100)}


def test_evaluation_leaves_the_model_in_the_mode_it_found_and_skips_targetless_batches():
    """``evaluate``: a batch with no target (every label -100) adds nothing instead of making the loss NaN (M27);
    and, directly on the function (the suite kills these through training runs): the model goes back to the mode it
    was found in (M26: a model in eval mode came back training — dropout on in the user's inference),
    ``max_batches`` reads that many batches (M24: one more), a loss past exp's range gives a huge, finite
    perplexity (M28: OverflowError)."""
    from lora_fast.train_model import evaluate

    model, cpu = _ConstLM(), torch.device("cpu")
    amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    for training in (False, True):
        model.train(training)
        evaluate(model, [_batch(2)], cpu, amp)
        assert model.training == training
    assert evaluate(model, [_batch(2), _batch(0, labelled=False), _batch(4)], cpu, amp)["loss"] == 3.0
    assert evaluate(model, [_batch(2), _batch(4), _batch(9)], cpu, amp, max_batches=2)["loss"] == 3.0
    huge = evaluate(model, [_batch(800)], cpu, amp)
    assert huge["loss"] == 800.0 and 1e300 < huge["perplexity"] < float("inf")


def test_fsdp_evaluation_keeps_every_rank_in_lockstep(monkeypatch):
    """Under FSDP every forward is a collective: with 3 evaluation batches over 2 ranks, rank 0 evaluates 2 and rank
    1 one, so rank 1 runs one more, discarded, forward — both ranks run ⌈3/2⌉ = 2 (M25: rank 1 ran 1 and rank 0
    waited forever in its second). The all-reduce is a stand-in (each rank's own sums)."""
    from lora_fast.train_model import evaluate

    monkeypatch.setattr(D, "all_reduce_sum", lambda values, ctx, device: list(values))
    amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    for rank, loss in ((0, 5.0), (1, 4.0)):
        model = _ConstLM()
        r = evaluate(model, [_batch(2), _batch(4), _batch(8)], torch.device("cpu"), amp,
                     ctx=D.DistContext("fsdp", rank, 2, rank, "gloo"))
        assert model.forwards == 2 and r["loss"] == loss, rank


# ------------------------------------------------------------------------------------------- options and labels
def test_accelerate_s_own_spellings_of_true_are_read(no_launcher):
    """``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` are read as accelerate writes them and as a user does
    (``True``, `` 1``, ``yes``, ``on``: accelerate's str_to_bool takes ``on``): D09 took only the exact lowercase
    strings, and ``ACCELERATE_USE_FSDP=True`` trained DDP replicas without a word."""
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION"):
        no_launcher.delenv(k, raising=False)
    for value in ("True", " 1", "YES", "true", "On"):
        no_launcher.setenv("ACCELERATE_USE_FSDP", value)
        with pytest.raises(ConfigError, match="--use_fsdp"):
            D.check_accelerate_env("auto", fp16=False, bf16=False)
    no_launcher.setenv("ACCELERATE_USE_FSDP", "False")
    D.check_accelerate_env("auto", fp16=False, bf16=False)


def test_one_process_commands_refuse_fsdp_as_they_refuse_ddp(no_launcher):
    """``check_one_process``: ``lora-fast sweep``/``merge`` and ``train()`` without a context refuse
    ``--distributed fsdp`` as they refuse ddp (T02: fsdp went through, and the sweep trained one process as if
    sharded); ``none``/``auto`` in one process pass."""
    from types import SimpleNamespace

    from lora_fast.train import check_one_process

    for mode in ("ddp", "fsdp"):
        with pytest.raises(ConfigError, match="lora-fast sweep trains in one process"):
            check_one_process(SimpleNamespace(distributed=mode), "lora-fast sweep")
    for mode in ("none", "auto"):
        check_one_process(SimpleNamespace(distributed=mode), "lora-fast sweep")


def test_a_label2id_that_is_not_a_numbering_of_the_outputs_is_replaced_with_a_warning():
    """A checkpoint's label2id is kept only when it numbers the head's outputs 0..n-1 (``checkpoint_label_order``);
    ids that do not (a hand-edited config: a: 5, b: 1, c: 3) are no output order to keep: the data's sorted order
    is used and the warning says the id2label is replaced (T03: the ids were sorted into an order and the labels
    re-mapped by it, "keeping" an order the head does not have)."""
    from types import SimpleNamespace

    from lora_fast.train import checkpoint_label_order

    said = []
    splits = {"train": (["ta", "tb", "tc"], [0, 1, 2])}
    order, got = checkpoint_label_order(SimpleNamespace(label2id={"a": 5, "b": 1, "c": 3}), ["a", "b", "c"], splits,
                                        "m", said.append)
    assert order == ["a", "b", "c"] and got == splits
    assert len(said) == 1 and "its id2label is replaced by the data's" in said[0]


def test_a_model_directory_s_own_tokenizer_is_checked_against_the_model_and_the_task(lm):
    """A model directory whose tokenizer has exactly as many tokens as the model has embeddings (GPT-2's 50257) is
    taken (T07: refused as "more tokens than embeddings"), one token more is refused; for ``--task classification``
    the model's config gets the tokenizer's pad id, which GPT-2 needs to find each row's last token (T08: left
    None, GPT-2 refuses batches of more than one row); a causal LM whose tokenizer has neither EOS nor SEP is
    refused naming the model and the way out (T70: the tokenizing refused it, naming neither)."""
    import csv

    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_fast import data
    from lora_fast import train as T

    root = lm.root / "own-tokenizer"
    tok = data.train_bpe_tokenizer((lm.root / "c.txt").read_text().split("\n\n"), 300)
    tok.save_pretrained(root)
    for split in ("train", "validation", "test"):
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["Label", "Text"], ["ham", f"the cat {split}"], ["spam", f"data code {split}"]])
    for vocab, refused in ((len(tok) - 1, True), (len(tok), False)):
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32)).save_pretrained(
            root)
        opts = lm("never-written", "--model", str(root))
        if refused:
            with pytest.raises(ConfigError, match=f"has {len(tok)} tokens but the model only {vocab} embeddings"):
                T.prepare(opts, log=_quiet)
            continue
        assert not T.prepare(opts, log=_quiet).tokenizer_trained
        prep = T.prepare(lm("never-written", "--model", str(root), "--task", "classification", "--dataset",
                            str(root)), log=_quiet)
        assert prep.model.config.pad_token_id == prep.tokenizer.pad_token_id is not None
    tok.eos_token = tok.bos_token = None  # nothing to put between documents
    tok.save_pretrained(root)
    with pytest.raises(ConfigError, match=r"own-tokenizer' has no EOS \(or SEP\) token .*; set tokenizer\.eos_token"):
        T.prepare(lm("never-written", "--model", str(root)), log=_quiet)


def test_a_device_other_than_cpu_or_cuda_leaves_the_training_state_to_its_allocator(monkeypatch):
    """``check_rank`` compares the training state (16 bytes a parameter) with the CPU's or a CUDA GPU's memory;
    for another device (mps) the allocator decides (its docstring; T17: the host's memory was used, refusing a
    rank the device could hold). Weights alone are still checked against the host, where they are built."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_fast import train as T

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    params = 8 * (32 + 96)  # rank 8 on the one c_attn (32 -> 96)
    monkeypatch.setattr(T.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 8 * params}[name])
    with pytest.raises(ConfigError, match="AdamW's two moments"):
        T.check_rank(model, ["c_attn"], 8, torch.device("cpu"))
    T.check_rank(model, ["c_attn"], 8, torch.device("mps"))
    with pytest.raises(ConfigError, match="more than this machine's"):  # weights: 4 bytes × 3 × params > 8 × params
        T.check_rank(model, ["c_attn"], 24, torch.device("mps"))


def test_the_training_accuracy_reads_every_training_example_in_order_on_every_rank():
    """The per-epoch training accuracy is an evaluation like the others: an unsharded, in-order loader that
    ``evaluate`` shards by batch (the module docstring's "evaluation"); T13 gave it the training sampler, sharded
    and shuffled, so that under DDP each rank evaluated batches of its own half and the accuracy covered a part of
    the training set."""
    from lora_fast import data
    from lora_fast.train import Prepared, _loaders
    from lora_fast.train_args import parse_train_args

    texts = [f"text number {i}" for i in range(10)]
    labels = [i % 3 for i in range(10)]
    tok = data.train_bpe_tokenizer(texts, 300)
    opts = parse_train_args(["--task", "classification", "--batch_size", "3", "--max_length", "8"])
    prep = Prepared(None, "m", tok, True, {"train": (texts, labels), "validation": (texts[:2], labels[:2])}, "src")
    for ctx in (D.DistContext(), D.DistContext("ddp", 1, 2, 1, "gloo")):
        loader = _loaders(opts, prep, ctx)["train_eval"]
        assert torch.cat([b["labels"] for b in loader]).tolist() == labels


def test_fp16_steps_without_overflow_are_updates_and_advance_the_schedule(lm):
    """Under --fp16 only a step whose gradients overflowed (the scaler lowered its scale) is counted as skipped and
    holds the schedule; a step that updated (the scale kept) advances it (T42: a kept scale counted as a skip, so a
    healthy fp16 run reported every step skipped and trained at its first learning rate throughout)."""
    from lora_fast import train as T

    opts = lm("fp16", "--fp16", "--warmup_ratio", "0", "--device", "cpu", steps=3)
    m = T.train(opts, T.prepare(opts, log=_quiet), log=_quiet)
    lr = m["learning_rate"]
    assert m["fp16_skipped_steps"] == 0 and lr == sorted(lr, reverse=True) and lr[0] > lr[1] > lr[2] > 0


def test_a_resumed_run_interrupted_before_its_first_step_writes_nothing(lm, monkeypatch, capsys):
    """A run resumed at step 1 and interrupted before its own first optimizer step has trained nothing: nothing is
    written and the interrupt goes on, the interrupted run's output staying as it was (T49: only step 0 counted as
    "nothing trained", so the resumed run committed the checkpoint's adapter over the output, as a new run)."""
    from lora_fast import train as T

    def stop_at_1(step, metrics):
        if step == 1:
            raise KeyboardInterrupt

    opts = lm("resumed", "--save_steps", "1", "--overwrite", steps=3)
    prep = T.prepare(opts, log=_quiet)
    assert T.train(opts, prep, on_step=stop_at_1, log=_quiet)["steps"] == 1
    out = Path(opts.output_dir)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt)  # in the resumed run's first update
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        T.train(lm("resumed", "--save_steps", "1", "--overwrite", "--resume_from_checkpoint", "latest", steps=3), prep,
                log=_quiet)
    assert "interrupted before the first optimizer step (1/3); nothing to save" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_interrupted_classification_run_has_no_test_accuracy(lm):
    """An interrupted run saves what it trained but is not evaluated on the test split (the module docstring: "no
    test-set evaluation"; the test accuracy is the finished model's): T54 evaluated the interrupted one and
    reported its accuracy as the run's."""
    import csv

    from lora_fast import train as T

    root = lm.root / "cls"
    root.mkdir()
    for split in ("train", "validation", "test"):
        with open(root / f"{split}.csv", "w", newline="") as f:
            rows = [[("ham", "spam")[i % 2], f"{('cat', 'code')[i % 2]} {split} {i}"] for i in range(8)]
            csv.writer(f).writerows([["Label", "Text"], *rows])

    def stop_at_1(step, metrics):
        if step == 1:
            raise KeyboardInterrupt

    opts = lm("cls-int", "--task", "classification", "--dataset", str(root), steps=3)
    m = T.train(opts, T.prepare(opts, log=_quiet), on_step=stop_at_1, log=_quiet)
    assert m["interrupted"] and m["steps"] == 1 and "test_accuracy" not in m


def test_a_resumed_run_does_not_evaluate_its_checkpoint_s_step_again(lm):
    """Resuming from the checkpoint of a step that was evaluated (an ``--eval_steps`` multiple) does not evaluate
    it again: the resumed run's evaluations are the uninterrupted run's (T69: the step was evaluated twice, two
    entries for step 2 in the metrics)."""
    from lora_fast import train as T

    opts = lm("eval-resume", "--save_steps", "2", "--eval_steps", "2", "--overwrite", steps=4)
    prep = T.prepare(opts, log=_quiet)
    assert T.train(opts, prep, log=_quiet)["eval_steps"] == [2, 4]
    ckpt = f"{opts.output_dir}-checkpoints/checkpoint-2"
    m = T.train(lm("eval-resume", "--save_steps", "2", "--eval_steps", "2", "--overwrite", "--resume_from_checkpoint",
                   ckpt, steps=4), prep, log=_quiet)
    assert m["resumed_at_step"] == 2 and m["eval_steps"] == [2, 4]


def test_a_relative_path_of_several_directories_is_a_missing_directory_not_a_hub_name(monkeypatch):
    """``--model runs/exp1/final`` that does not exist is named as a missing directory, without asking the hub: a
    hub name has one slash at most (M08: it was looked up on the hub, a 3-second probe and then "not a local
    directory and not in the Hugging Face cache")."""
    from lora_fast import train_model as TM

    def asked(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(TM, "hub_reachable", asked)
    with pytest.raises(ConfigError, match="model directory 'runs/exp1/final' does not exist"):
        TM.load_base_model("runs/exp1/final")


def test_an_encoder_saved_as_a_decoder_trains_as_a_causal_lm():
    """``check_causal`` refuses an encoder as a causal LM unless its config says ``is_decoder`` (its docstring; the
    README's "a checkpoint saved with is_decoder true"): M10 refused every BERT-family model, decoder or not. XLM's
    own flag is ``causal`` (its comment): an XLM trained as a causal LM (``xlm-clm-*``) is a decoder (M11: every
    XLM was refused)."""
    from types import SimpleNamespace

    from lora_fast.train_model import check_causal

    check_causal(SimpleNamespace(model_type="bert", is_decoder=True), "bert-as-decoder")
    check_causal(SimpleNamespace(model_type="gpt2"), "gpt2")
    check_causal(SimpleNamespace(model_type="xlm", causal=True), "xlm-clm")
    with pytest.raises(ConfigError, match="is an encoder"):
        check_causal(SimpleNamespace(model_type="bert", is_decoder=False), "bert")
    with pytest.raises(ConfigError, match="is an encoder"):
        check_causal(SimpleNamespace(model_type="xlm", causal=False), "xlm-mlm")


def test_a_tokenizer_without_pad_or_eos_pads_with_its_sep():
    """``pad_with_eos``: no pad token → EOS, else SEP (BERT-style tokenizers), unchanged when it has one (M16: SEP
    never taken, a BERT-style tokenizer without a pad token stayed without one and was refused)."""
    from types import SimpleNamespace

    from lora_fast.train_model import pad_with_eos

    for given, want in (({"eos_token": "</s>", "sep_token": "[SEP]"}, "</s>"),
                        ({"eos_token": None, "sep_token": "[SEP]"}, "[SEP]"),
                        ({"eos_token": "</s>", "pad_token": "<pad>"}, "<pad>")):
        tok = SimpleNamespace(**{"pad_token": None, "eos_token": None, "sep_token": None, **given})
        pad_with_eos(tok)
        assert tok.pad_token == want, given


def test_a_signal_inside_the_last_update_lets_the_run_complete(lm, monkeypatch, capsys):
    """One process: a SIGINT arriving during the last optimizer update is held to that step's boundary, where every
    step is done — the run completes, as a torchrun run signalled after its last boundary (T47: the held signal was
    raised there and the finished run was saved as interrupted, exit status 130)."""
    from lora_fast import train as T

    calls = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled at once: inside the update window of the last step
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    opts = lm("last-update", steps=2)
    m = T.train(opts, T.prepare(opts, log=_quiet), log=_quiet)
    assert not m["interrupted"] and m["steps"] == 2
    assert "signal 2 after the last optimizer step; the run completes" in capsys.readouterr().err


def test_run_leaves_the_process_group_without_a_barrier_after_an_error(monkeypatch, tmp_path):
    """``run``: an error on a rank leaves the group at once (``shutdown(ok=False)``: no barrier, which would wait out
    the collective timeout for ranks that will never come); a run that ends normally meets them (T59: the barrier
    after an error too). The group and the loading are stand-ins."""
    from lora_fast import train as T
    from lora_fast.train_args import parse_train_args

    left = []
    monkeypatch.setattr(D, "init", lambda *a, **k: D.DistContext("ddp", 0, 2, 0, "gloo"))
    monkeypatch.setattr(D, "shutdown", lambda ctx, ok=True: left.append(ok))

    def failing(opts, log):
        raise RuntimeError("simulated loading failure")

    monkeypatch.setattr(T, "prepare", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        T.run(parse_train_args(["--output_dir", str(tmp_path / "out"), "--no-progress"]))
    assert left == [False]


def test_the_command_s_switches_are_put_back_as_they_were(no_launcher):
    """``transformers_bars`` turns transformers' bars off for the block and back on only if they were on (T61: they
    were turned on after a block whatever they were, undoing a user's ``disable_progress_bar``);
    ``sigterm_as_interrupt`` puts the previous SIGTERM handler back (T63: its own stayed, raising
    KeyboardInterrupt in whatever ran next)."""
    from transformers.utils import logging as hf_logging

    from lora_fast.train import sigterm_as_interrupt, transformers_bars

    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()
        with transformers_bars(False):
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
        hf_logging.enable_progress_bar()
        with transformers_bars(False):
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_only_rank_zero_holds_the_checkpoint_root(monkeypatch, tmp_path):
    """``train`` called with a context: rank 0 alone holds the checkpoint root (its lock), which every other run is
    refused (T72: every rank took it, and rank 1 of the same job was refused as "another running run"). The loop
    is a stand-in; what is checked is who holds the root."""
    from lora_fast import train as T
    from lora_fast import train_ckpt
    from lora_fast.train_args import parse_train_args

    held = []
    real = train_ckpt.root_held
    monkeypatch.setattr(train_ckpt, "root_held", lambda opts, hold: held.append(hold) or real(opts, False))
    monkeypatch.setattr(T, "_train", lambda *a, **k: {})
    opts = parse_train_args(["--output_dir", str(tmp_path / "out"), "--save_steps", "2"])
    for rank in (0, 1):
        T.train(opts, None, ctx=D.DistContext("ddp", rank, 2, rank, "gloo"))
    T.train(opts, None, ctx=D.DistContext("ddp", 0, 2, 0, "gloo"), root_is_held=True)
    assert held == [True, False, False]


def test_a_training_set_smaller_than_the_processes_is_an_error(lm, monkeypatch):
    """With fewer training examples than processes each rank's shard is empty: an error naming both (the module
    docstring), where T73 looped over empty passes for ever. Two ranks simulated in one process: the collectives
    and the wrapper are stand-ins (the refusal comes before any other); a pass counter stops a loop."""
    from lora_fast import train as T

    passes = []

    def set_epoch(self, epoch):
        passes.append(epoch)
        if len(passes) > 3:
            raise AssertionError("the loop went round empty passes")

    monkeypatch.setattr(D.ShardSampler, "set_epoch", set_epoch)
    monkeypatch.setattr(D, "check_same", lambda *a: None)
    monkeypatch.setattr(D, "wrap_model", lambda model, *a, **k: model)
    opts = lm("too-small")
    prep = T.prepare(opts, log=_quiet)
    prep.data["train"] = prep.data["train"][:1]
    with pytest.raises(ConfigError, match="the training set has 1 examples, fewer than the 2 processes"):
        T.train(opts, prep, log=_quiet, ctx=D.DistContext("ddp", 0, 2, 0, "gloo"))


def test_a_coordinated_stop_is_an_interrupted_run_not_a_completed_one(lm, no_launcher, one_rank_group, capsys):
    """A torchrun rank signalled during step 2 of 3 (the ``LORA_FAST_SIGNAL_AT`` hook, a 1-rank DDP group in this
    process) stops at that step's boundary with every rank: interrupted, the adapter of step 2 saved, and not told
    that the signal came "after the last optimizer step; the run completes" (T75: that line followed every
    coordinated stop too)."""
    from lora_fast import train as T

    before = {s: signal.getsignal(s) for s in D.STOP_SIGNALS}
    no_launcher.setenv(D.SIGNAL_AT_ENV, "0:2")
    opts = lm("stopped", steps=3)
    try:
        m = T.train(opts, T.prepare(opts, log=_quiet), log=_quiet, ctx=D.DistContext("ddp", 0, 1, 0, "gloo"))
    finally:
        for s, h in before.items():  # a stopped rank ignores stop signals from then on (it is leaving)
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert m["interrupted"] and m["steps"] == 2 and "all stopped at step 2/3" in err
    assert "the run completes" not in err
    assert (Path(opts.output_dir) / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------- train_model.py: hub probe, base, devices
@pytest.fixture
def hub_probes(monkeypatch):
    """The addresses ``hub_reachable`` connects to (each connection a stand-in that succeeds), from an environment
    without hub, proxy or offline variables."""
    from lora_fast import train_model as TM

    asked = []

    class Connection:
        def close(self):
            pass

    def connect(address, timeout=None):
        asked.append(address)
        return Connection()

    monkeypatch.setattr(TM.socket, "create_connection", connect)
    monkeypatch.setattr(TM, "hub_offline_flag", lambda: False)
    for var in ("HF_ENDPOINT", "REQUEST_METHOD", *(f"{s}_proxy" for s in ("https", "http", "all", "no"))):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)

    def probe():
        assert TM.hub_reachable()
        return asked[-1]
    return probe


def test_the_hub_probe_connects_to_the_endpoint_s_port_or_to_the_proxy(hub_probes, monkeypatch):
    """``hub_reachable`` opens a TCP connection to the endpoint (``HF_ENDPOINT`` overrides it) or, when one is set,
    to the HTTPS proxy — ``HTTPS_PROXY`` or the usual lower-case ``https_proxy``, which wins as in urllib (and so
    httpx and requests) — at the URL's port, else the scheme's (http 80, https 443). M01: an http endpoint without a
    port was probed at 443; M02: ``https_proxy`` was not read; M03: the proxy was never probed (behind one, the hub
    counted as unreachable and ``gpt2`` fell back to random weights)."""
    assert hub_probes() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example")
    assert hub_probes() == ("hub.example", 80)
    monkeypatch.delenv("HF_ENDPOINT")
    monkeypatch.setenv("HTTPS_PROXY", "http://upper.example")
    assert hub_probes() == ("upper.example", 80)
    monkeypatch.setenv("https_proxy", "proxy.example:3128")
    assert hub_probes() == ("proxy.example", 3128)


def test_the_hub_probe_follows_all_proxy_and_no_proxy(hub_probes, monkeypatch):
    """The probe goes where huggingface_hub's client would: to ``ALL_PROXY`` when no HTTPS proxy is set, and
    straight to an endpoint that ``NO_PROXY`` names (a local mirror beside a proxy for the rest). The probe once
    read ``HTTPS_PROXY`` alone: it asked a proxy the client never uses, and with that proxy down ``gpt2`` fell back
    to random weights while the mirror was up."""
    monkeypatch.setenv("ALL_PROXY", "http://all.example:8080")
    assert hub_probes() == ("all.example", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_probes() == ("proxy.example", 3128)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.internal:8443")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    assert hub_probes() == ("mirror.internal", 8443)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    assert hub_probes() == ("proxy.example", 3128)


def test_the_random_base_is_drawn_from_its_seed_without_moving_the_caller_s_stream(monkeypatch):
    """``random_gpt2`` draws the weights from ``seed`` alone, in a forked random stream: the same seed gives the same
    base whatever the caller's stream, and the caller's stream continues as if no model had been built (M05: the
    draws moved it; lora_fast's own commands seed again before drawing, a library caller would not). GPT2Config's
    defaults are shrunk to one tiny layer (what is checked is the random stream, not the 124M architecture; the
    class itself is patched, as transformers' lazy module hands out its own binding of the name)."""
    from transformers import GPT2Config

    from lora_fast.train_model import random_gpt2

    init = GPT2Config.__init__
    monkeypatch.setattr(GPT2Config, "__init__", lambda self, **kw: init(
        self, **{"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 8, "vocab_size": 16, **kw}))
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    a = random_gpt2(seed=3)
    assert a.transformer.wte.weight.shape == (16, 8)
    assert torch.equal(torch.rand(4), expected)
    b = random_gpt2(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_gpt2_random_is_refused_as_a_model_of_another_task():
    """``gpt2-random`` is GPT-2 with a causal-LM or a sequence-classification head: a merge of a token-classification
    (or QA, seq2seq) adapter into it is refused, naming why (M06: a GPT-2 LM, without the adapter's head, was built
    and returned for every task)."""
    from lora_fast.train_model import load_base_model

    for task in ("token-classification", "question-answering", "seq2seq-lm", "feature-extraction"):
        with pytest.raises(ConfigError, match=f"causal-LM or sequence-classification GPT-2, not a {task} model"):
            load_base_model("gpt2-random", task)


def test_a_token_classifier_gets_the_number_of_labels_asked(lm):
    """``num_labels`` reaches both labelled heads (``LABELLED_TASKS``): a token-classification base (``lora-fast
    merge`` of a TOKEN_CLS adapter) has as many outputs as the adapter's labels (M35: only sequence classification
    got them; a 5-label token classifier was built with the config's 2)."""
    from lora_fast.train_model import load_base_model

    for task in ("token-classification", "classification"):
        model, _ = load_base_model(str(lm.root / "tiny"), task, num_labels=5)
        head = model.classifier if task == "token-classification" else model.score
        assert model.config.num_labels == head.out_features == 5, task


def test_a_stream_closed_under_a_message_drops_it():
    """``Unfailing`` drops a write to a closed stream (its docstring: "ValueError: closed"), as it drops OSError's
    (M17: the ValueError of a closed stderr ended the training run)."""
    import io

    from lora_fast.train_model import Unfailing

    closed = io.StringIO()
    closed.close()
    stream = Unfailing(closed)
    assert stream.write("a line") == 0
    stream.flush()


def test_tf32_is_taken_from_compute_capability_8_0(monkeypatch):
    """``--tf32`` needs compute capability 8.0 or newer (``check_tf32``'s docstring: Ampere): an A100 (8.0) and an
    RTX 3090 (8.6) take it, a T4 (7.5) does not (M20: 8.x was refused too). CUDA is a stand-in: what is checked is
    the decision."""
    from lora_fast.train_model import check_tf32

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    for capability, ok in (((8, 0), True), ((8, 6), True), ((9, 0), True), ((7, 5), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        if ok:
            check_tf32(True, torch.device("cuda", 0))
        else:
            with pytest.raises(ConfigError, match="compute capability 8.0"):
                check_tf32(True, torch.device("cuda", 0))
