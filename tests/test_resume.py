"""``lora-fast train --save_steps / --resume_from_checkpoint``: a resumed run is the uninterrupted run, bit for bit.

The runs use LoRA dropout 0.1 and GPT-2's own dropout (so the RNG stream matters), an uneven pass (23 training
blocks in micro-batches of 3: 8 micro-batches, the last of 2 rows) and gradient accumulation 3, so a pass is
3 optimizer steps (3 + 3 + 2 micro-batches) and 8 steps cross two pass boundaries. Interruptions land at the end of
a pass, in the middle of one, and in the middle of a step's accumulation. One thread, reference path (CPU).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_fast import load_adapter
from lora_fast.cli import main as cli_main
from lora_fast.train import run
from lora_fast.train_args import parse_train_args

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
STEPS, PER_PASS = 8, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 (dropout on) saved locally, a text file, and the uninterrupted reference run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                               initializer_range=0.3)).save_pretrained(root / "tiny")
    rng = random.Random(0)
    (root / "data.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(20)))
    ref = _run(root, "ref")
    return root, ref


def _args(root, name, *extra):
    return ["--model", str(root / "tiny"), "--dataset", str(root / "data.txt"), "--max_steps", str(STEPS),
            "--max_length", "32", "--batch_size", "3", "--gradient_accumulation_steps", "3", "--dropout", "0.1",
            "--lr", "0.01", "--eval_steps", "4", "--eval_batches", "1", "--target_modules", "c_attn", "c_fc",
            "--backend", "reference", "--device", "cpu", "--no-progress", "--output_dir", str(root / name), *extra]


def _run(root, name, *extra, on_step=None):
    return run(parse_train_args(_args(root, name, *extra)), on_step=on_step, log=lambda msg: None)


def _stop_at(n):
    def on_step(step, metrics):
        if step == n:
            raise KeyboardInterrupt

    return on_step


def _assert_same_run(out, ref_metrics, ref_dir):
    got, want = load_file(out / "adapter_model.safetensors"), load_file(ref_dir / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    m = json.loads((out / "training_metrics.json").read_text())
    for key in ("train_loss", "learning_rate", "eval_steps", "eval_loss", "tokens_seen", "steps"):
        assert m[key] == ref_metrics[key], key
    assert not m["interrupted"]
    return m


def test_the_run_crosses_uneven_passes(setup):
    """The premise of the tests below: 8 micro-batches per pass, the last short; 3 steps per pass."""
    from lora_fast.distributed import DistContext
    from lora_fast.train import _loaders, prepare

    root, _ = setup
    opts = parse_train_args(_args(root, "unused"))
    sizes = [len(b["input_ids"]) for b in _loaders(opts, prepare(opts, log=lambda msg: None), DistContext())["train"]]
    assert sizes == [3] * 7 + [2]


@pytest.mark.parametrize("stop", [PER_PASS, PER_PASS + 2], ids=["end-of-pass", "mid-pass"])
def test_resume_after_interrupt_is_the_uninterrupted_run(setup, stop):
    root, ref = setup
    name = f"stop{stop}"
    first = _run(root, name, "--save_steps", "100", on_step=_stop_at(stop))
    assert first["interrupted"] and first["steps"] == stop
    ckpts = root / f"{name}-checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"checkpoint-{stop}"]  # the interrupt's checkpoint only
    m = _run(root, name, "--overwrite", "--resume_from_checkpoint", "latest")
    assert m["resumed_at_step"] == stop and m["resumed_from"] == str(ckpts / f"checkpoint-{stop}")
    _assert_same_run(root / name, ref, root / "ref")


def test_resume_from_a_periodic_checkpoint_and_pruning(setup):
    """save_steps 2 with save_total_limit 2: 2, 4, 6, 8 written, 6 and 8 kept; each holds the adapter of its step
    (it loads with load_adapter); resuming from 6 — whose pass ends at step 6 — gives the reference again."""
    from transformers import AutoModelForCausalLM

    root, ref = setup
    m = _run(root, "periodic", "--save_steps", "2", "--save_total_limit", "2")
    _assert_same_run(root / "periodic", ref, root / "ref")  # checkpointing changes nothing of the run
    ckpts = root / "periodic-checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    last = load_file(ckpts / "checkpoint-8" / "adapter_model.safetensors")
    final = load_file(root / "periodic" / "adapter_model.safetensors")
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert load_adapter(AutoModelForCausalLM.from_pretrained(root / "tiny"), ckpts / "checkpoint-6") == ([], [])
    info = json.loads((ckpts / "checkpoint-6" / "trainer_state.json").read_text())
    assert (info["step"], info["passes_started"], info["micro_batches_done_in_pass"]) == (6, 2, 8)
    resumed = _run(root, "from6", "--resume_from_checkpoint", str(ckpts / "checkpoint-6"), "--checkpoint_dir",
                   str(root / "from6-checkpoints"))
    assert resumed["resumed_at_step"] == 6 and m["resumed_from"] is None
    _assert_same_run(root / "from6", ref, root / "ref")


def test_a_pruning_cut_short_leaves_no_checkpoint_that_looks_complete(setup, monkeypatch):
    """--save_total_limit removes the oldest checkpoint with rmtree; a kill midway (the adapter files gone,
    training_state.pt not yet) left a checkpoint-N that 'latest' and the pruning counted as complete. Now it is
    renamed out of the checkpoint names first, and the next pruning clears what was left."""
    import lora_fast.train_ckpt as ckpt

    root, _ = setup
    real = shutil.rmtree
    cut_short = []

    def rmtree(path, ignore_errors=False):  # the first removal of a checkpoint stops after one file
        path = Path(path)
        if path.is_dir() and not cut_short and any(path.iterdir()):
            cut_short.append(path)
            next(p for p in path.iterdir() if p.name != ckpt.STATE_NAME).unlink()
            return
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    _run(root, "pruned", "--save_steps", "2", "--save_total_limit", "2", "--overwrite")
    ckpts = root / "pruned-checkpoints"
    assert cut_short and cut_short[0].name == ".checkpoint-2.deleting"
    assert [p.name for _, p in ckpt.list_checkpoints(ckpts)] == ["checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-6", "checkpoint-8"]  # the leftover cleared


def test_interrupt_mid_accumulation_checkpoints_the_last_whole_step(setup, monkeypatch):
    """Ctrl-C during step 6's third micro-batch: the checkpoint is step 5's state (step 6's partial gradients are
    dropped), and resuming redoes step 6 whole."""
    root, ref = setup
    calls = {"n": 0}
    real = torch.nn.utils.clip_grad_norm_

    def clip(*a, **k):  # called once per step, after the step's last micro-batch
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    first = _run(root, "midacc", "--save_steps", "4")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    assert first["interrupted"] and first["steps"] == 5
    assert sorted(p.name for p in (root / "midacc-checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert _run(root, "midacc", "--overwrite", "--resume_from_checkpoint", "latest")["resumed_at_step"] == 5
    _assert_same_run(root / "midacc", ref, root / "ref")


def test_interrupt_inside_the_optimizer_update_writes_no_checkpoint(setup, monkeypatch, capsys):
    """An interrupt inside AdamW's step may leave half-updated parameters: no checkpoint claims that state."""
    root, _ = setup
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    first = _run(root, "inupdate", "--save_steps", "2")
    assert first["interrupted"] and first["steps"] == 3
    assert sorted(p.name for p in (root / "inupdate-checkpoints").iterdir()) == ["checkpoint-2"]
    assert "during an optimizer update: no checkpoint" in capsys.readouterr().err


def test_interrupt_during_evaluation_resumes_with_that_evaluation(setup, monkeypatch):
    """Ctrl-C inside step 8's evaluation: the checkpoint (step 8) lacks it; the resumed run takes it, so the
    evaluations are the reference's. Resuming from step 4 with a TensorBoard log hides the abandoned steps 5-6."""
    import lora_fast.train as T

    root, ref = setup
    real, calls = T.evaluate, {"n": 0}

    def evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the evaluation at step 8 (eval_steps 4)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "evaluate", evaluate)
    first = _run(root, "ineval", "--save_steps", "100")
    monkeypatch.setattr(T, "evaluate", real)
    assert first["interrupted"] and first["steps"] == 8 and first["eval_steps"] == [4]
    _run(root, "ineval", "--overwrite", "--resume_from_checkpoint", "latest")
    _assert_same_run(root / "ineval", ref, root / "ref")

    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is in the [dev] extra; the purge of replayed steps is checked where it is installed")
    logs = root / "tb-logs"
    _run(root, "tb", "--save_steps", "4", "--logdir", str(logs), on_step=_stop_at(6))
    _run(root, "tb", "--overwrite", "--logdir", str(logs), "--checkpoint_dir", str(root / "tb-checkpoints"),
         "--resume_from_checkpoint", str(root / "tb-checkpoints" / "checkpoint-4"))
    acc = event_accumulator.EventAccumulator(str(logs))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(ref["train_loss"], rel=1e-6)


def test_classification_resume_at_a_pass_end_keeps_the_epoch_accuracies(tmp_path):
    """Classification: the checkpoint at the end of pass 1 is taken before that pass's accuracy; the resumed run
    takes it, and the epochs table (accuracies, losses) is the uninterrupted run's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.test_train import _spam_csvs

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=64,
                               initializer_range=0.3)).save_pretrained(tmp_path / "tiny")
    data = _spam_csvs(tmp_path)
    args = ["--task", "classification", "--model", str(tmp_path / "tiny"), "--dataset", str(data), "--epochs", "2",
            "--batch_size", "8", "--gradient_accumulation_steps", "3", "--lr", "0.01", "--max_length", "24",
            "--dropout", "0.1", "--eval_steps", "100", "--device", "cpu", "--no-progress"]
    ref = run(parse_train_args(args + ["--output_dir", str(tmp_path / "ref")]), log=lambda msg: None)
    assert [e["step"] for e in ref["epochs"]] == [3, 6]
    out = str(tmp_path / "cls")
    first = run(parse_train_args(args + ["--output_dir", out, "--save_steps", "3"]), on_step=_stop_at(3),
                log=lambda msg: None)
    assert first["interrupted"] and "epochs" not in first  # stopped before pass 1's accuracy
    m = run(parse_train_args(args + ["--output_dir", out, "--overwrite", "--resume_from_checkpoint", "latest"]),
            log=lambda msg: None)
    assert m["epochs"] == ref["epochs"] and m["train_loss"] == ref["train_loss"]
    assert m["test_accuracy"] == ref["test_accuracy"]


@pytest.mark.parametrize("extra, message", [
    (["--rank", "4"], "rank (checkpoint 8, now 4)"),
    (["--lr", "0.02", "--seed", "1"], "lr (checkpoint 0.01, now 0.02); seed (checkpoint 42, now 1)"),
    (["--max_steps", "9"], "max_steps (checkpoint 8, now 9)"),
])
def test_resume_refuses_changed_options(setup, capsys, extra, message):
    root, _ = setup
    ck = root / "periodic-checkpoints" / "checkpoint-8"
    if not ck.is_dir():
        _run(root, "periodic", "--save_steps", "8", "--overwrite")
    rc = cli_main(["train", *_args(root, "changed", "--resume_from_checkpoint", str(ck), *extra)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "options differ" in err, err
    assert not (root / "changed").exists()


def _edited_checkpoint(root, tmp_path, **fields):
    """A copy of the periodic checkpoint-8 whose training state has ``fields`` changed (each to a new value)."""
    import shutil

    ck = root / "periodic-checkpoints" / "checkpoint-8"
    if not ck.is_dir():
        _run(root, "periodic", "--save_steps", "8", "--overwrite")
    edited = tmp_path / "checkpoint-8"
    shutil.copytree(ck, edited)
    state = torch.load(edited / "training_state.pt", weights_only=True)
    assert all(state[k] != v for k, v in fields.items())
    torch.save({**state, **fields}, edited / "training_state.pt")
    return edited


def test_resume_refuses_an_older_checkpoint_format(setup, tmp_path, capsys):
    """A checkpoint written before the schedule / optimizer-group / split changes (format 1) would resume into
    another schedule or fail on the optimizer's groups: refused by name, nothing written."""
    root, _ = setup
    old = _edited_checkpoint(root, tmp_path, format=1)
    assert cli_main(["train", *_args(root, "old", "--resume_from_checkpoint", str(old))]) == 2
    assert "written by an older lora-fast (checkpoint format 1, now 2" in capsys.readouterr().err
    assert not (root / "old").exists()


def test_checkpoint_option_errors(setup, tmp_path, capsys):
    root, _ = setup
    cases = [
        (["train", *_args(root, "none", "--resume_from_checkpoint", "latest", "--checkpoint_dir", str(tmp_path))],
         "no checkpoint in"),
        (["train", *_args(root, "none", "--resume_from_checkpoint", str(tmp_path))], "is not a checkpoint"),
        (["train", *_args(root, "none", "--save_steps", "2", "--checkpoint_dir", str(root / "none" / "ck"))],
         "is inside output_dir"),
        (["train", *_args(root, "none", "--save_steps", "0")], "save_steps must be a positive integer"),
        (["train", *_args(root, "none", "--save_steps", "2", "--checkpoint_dir", str(root / "data.txt"))],
         "exists and is not a directory"),
        (["train", *_args(root, "none", "--save_steps", "2", "--checkpoint_dir", str(root / "data.txt" / "x"))],
         "cannot be created: "),
        (["train", *_args(root, "none", "--save_total_limit", "2")], "save_total_limit needs save_steps"),
        (["train", *_args(root, "none", "--checkpoint_dir", str(tmp_path))], "checkpoint_dir needs save_steps"),
        (["sweep", "--model", str(root / "tiny"), "--save_steps", "2", "--ranks", "2", "--output_dir",
          str(tmp_path / "sweep")], "sweep does not checkpoint (--save_steps)"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, err
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "training_state.pt").write_bytes(b"truncated")
    assert cli_main(["train", *_args(root, "none", "--save_steps", "2", "--checkpoint_dir", str(tmp_path))]) == 2
    assert "already holds checkpoints of another run (checkpoint-3)" in capsys.readouterr().err
    assert cli_main(["train", *_args(root, "none", "--resume_from_checkpoint", "latest", "--checkpoint_dir",
                                     str(tmp_path))]) == 2
    assert "cannot read" in capsys.readouterr().err
    hf = tmp_path / "hf-run"  # another tool's checkpoint-<step> (an HF Trainer's): never replaced
    (hf / "checkpoint-2").mkdir(parents=True)
    (hf / "checkpoint-2" / "model.safetensors").write_bytes(b"weights")
    assert cli_main(["train", *_args(root, "none", "--save_steps", "2", "--checkpoint_dir", str(hf))]) == 2
    assert "holds checkpoint-2, not written by lora-fast (no training_state.pt)" in capsys.readouterr().err
    assert (hf / "checkpoint-2" / "model.safetensors").read_bytes() == b"weights"
    assert not (root / "none").exists()


def test_resume_compares_local_paths_resolved(setup):
    """`--model tiny/../tiny` names the same directory as `--model tiny`: not a changed option."""
    from lora_fast.train_ckpt import _options

    root, _ = setup
    plain = parse_train_args(_args(root, "x"))
    other = parse_train_args([str(root / "tiny" / ".." / "tiny") if a == str(root / "tiny") else a
                              for a in _args(root, "x")])
    assert other.model != plain.model and _options(other) == _options(plain)
    assert _options(parse_train_args(_args(root, "x", "--rank", "4"))) != _options(plain)


def test_load_trainable_refuses_names_and_shapes_that_do_not_fit(tmp_path):
    """The backstop behind the options check (a checkpoint edited or from another model): a tensor that would
    broadcast into the parameter (1 row for r rows) is refused as firmly as a missing or unexpected name."""
    from lora_fast import LinearWithLoRA
    from lora_fast.train_args import ConfigError
    from lora_fast.train_ckpt import load_trainable

    model = torch.nn.Sequential(LinearWithLoRA(torch.nn.Linear(6, 5), rank=3))
    good = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    a = next(n for n in good if n.endswith("lora_A"))
    for bad, what in (({**good, a: good[a][:1]}, a), ({k: v for k, v in good.items() if k != a}, a),
                      ({**good, "extra.lora_A": good[a]}, "extra.lora_A")):
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ConfigError, match=rf"do not fit the model \(1 missing, unexpected or mis-shaped: {what}"):
            load_trainable(model, bad, tmp_path)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # nothing copied
    load_trainable(model, good, tmp_path)
    assert all(torch.equal(p, good[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("field, value, message", [
    ("world_size", 2, "written by 2 process(es), resumed with 1"),
    ("digest", "another corpus", "the tokenized training data (or tokenizer) differs"),
])
def test_resume_refuses_another_world_size_or_other_data(setup, tmp_path, capsys, field, value, message):
    """Same options, but the checkpoint was written by 2 processes (other shards and RNG streams), or from data
    that tokenizes differently (the file at the same path edited): continuing would silently train on something
    else, so it is refused by name and nothing is written."""
    root, _ = setup
    edited = _edited_checkpoint(root, tmp_path, **{field: value})
    assert cli_main(["train", *_args(root, f"edited-{field}", "--resume_from_checkpoint", str(edited))]) == 2
    assert message in capsys.readouterr().err
    assert not (root / f"edited-{field}").exists()


def test_latest_checkpoint_is_the_highest_step_and_incomplete_ones_are_skipped(tmp_path):
    """'latest' and --save_total_limit order by step number (checkpoint-10 after checkpoint-9, not before it), and
    a directory without its state file (a crash mid-write, a stray copy) is not a checkpoint."""
    from lora_fast.train_ckpt import STATE_NAME, find_checkpoint, list_checkpoints

    for step in (2, 9, 10, 11):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_NAME).write_bytes(b"")
    (tmp_path / "checkpoint-11" / STATE_NAME).unlink()  # incomplete
    (tmp_path / "checkpoint-x").mkdir()
    assert list_checkpoints(tmp_path) == [(s, tmp_path / f"checkpoint-{s}") for s in (2, 9, 10)]
    assert find_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-10"


def _periodic_checkpoint(root):
    ck = root / "periodic-checkpoints" / "checkpoint-8"
    if not ck.is_dir():
        _run(root, "periodic", "--save_steps", "8", "--overwrite")
    return ck


def test_a_signal_inside_the_update_is_held_to_the_steps_boundary(setup, monkeypatch, capsys):
    """One process: a SIGTERM arriving while AdamW updates (with the bookkeeping after it, ~5 % of a step) used to
    stop the run there with no checkpoint at all (none written yet) and an output labelled one step short. It is
    now held to the step's boundary, which is checkpointed: resuming gives the uninterrupted run."""
    import os
    import signal

    from lora_fast.train import sigterm_as_interrupt

    root, ref = setup
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once: inside the update window
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with sigterm_as_interrupt():
        first = _run(root, "held", "--save_steps", "5")
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    assert first["interrupted"] and first["steps"] == 3
    assert sorted(p.name for p in (root / "held-checkpoints").iterdir()) == ["checkpoint-3"]
    assert _run(root, "held", "--overwrite", "--resume_from_checkpoint", "latest")["resumed_at_step"] == 3
    _assert_same_run(root / "held", ref, root / "ref")


def test_a_signal_while_the_outputs_are_written_keeps_the_finished_run(setup, monkeypatch, capsys):
    """SIGTERM while a finished run writes its outputs (the loss plot alone takes ~0.5 s) discarded them all:
    the run is complete, so the write now finishes and the run ends normally."""
    import os
    import signal

    from lora_fast import train_io
    from lora_fast.train import sigterm_as_interrupt

    root, ref = setup
    real = train_io.write_outputs

    def write(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train_io, "write_outputs", write)
    with sigterm_as_interrupt():
        m = _run(root, "finalsig")
    assert not m["interrupted"]
    _assert_same_run(root / "finalsig", ref, root / "ref")
    assert "while the outputs were written; they are complete" in capsys.readouterr().err


def test_a_resumed_run_refuses_another_runs_checkpoint_dir(setup, tmp_path, capsys):
    """Resuming with --checkpoint_dir naming another run's checkpoints used to prune them and replace the one of
    the same step: refused, as a fresh run is, and nothing there is touched."""
    import shutil

    root, _ = setup
    ck = _periodic_checkpoint(root)
    other = tmp_path / "other-run"
    shutil.copytree(ck, other / "checkpoint-2")
    rc = cli_main(["train", *_args(root, "into-other", "--resume_from_checkpoint", str(ck), "--save_steps", "2",
                                   "--save_total_limit", "1", "--checkpoint_dir", str(other))])
    assert rc == 2 and "is not among them" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["checkpoint-2"]


def test_resuming_an_older_checkpoint_sets_the_abandoned_ones_aside(setup):
    """Resumed from step 4 of a run that went to 8: its checkpoints 6 and 8 (the abandoned continuation) are
    renamed, so ``latest`` is this run's newest and the pruning counts this run's own."""
    from lora_fast.train_ckpt import find_checkpoint

    root, _ = setup
    _run(root, "branch", "--save_steps", "2")
    ckpts = root / "branch-checkpoints"
    _run(root, "branch", "--overwrite", "--save_steps", "2", "--save_total_limit", "2", "--resume_from_checkpoint",
         str(ckpts / "checkpoint-4"), on_step=_stop_at(5))
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "checkpoint-4", "checkpoint-5", "checkpoint-6.abandoned", "checkpoint-8.abandoned"]
    assert find_checkpoint("latest", ckpts).name == "checkpoint-5"


def test_resume_checks_the_base_weights_and_accepts_moved_inputs(setup, tmp_path, capsys):
    """The base model's weights are part of a run's identity (a model re-saved at the same path used to resume
    silently onto other weights); its path and the dataset's are not: copies elsewhere (a job's staging
    directory) resume, since the data digest and the base digest say they are the same."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_fast.train_ckpt import base_digest

    root, _ = setup
    ck = _periodic_checkpoint(root)
    assert torch.load(ck / "training_state.pt", weights_only=True)["base_digest"]
    shutil.copytree(root / "tiny", tmp_path / "tiny-copy")
    shutil.copy(root / "data.txt", tmp_path / "data-copy.txt")
    moved = [a.replace(str(root / "tiny"), str(tmp_path / "tiny-copy")).replace(
        str(root / "data.txt"), str(tmp_path / "data-copy.txt")) for a in _args(root, "moved")]
    assert cli_main(["train", *moved, "--resume_from_checkpoint", str(ck)]) == 0, capsys.readouterr().err
    edited = _edited_checkpoint(root, tmp_path / "edited", base_digest="0" * 64)
    assert cli_main(["train", *_args(root, "rebased", "--resume_from_checkpoint", str(edited))]) == 2
    assert "the base model's weights differ from the checkpointed run's" in capsys.readouterr().err
    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    torch.manual_seed(0)
    a = GPT2LMHeadModel(cfg).requires_grad_(False)
    torch.manual_seed(1)
    b = GPT2LMHeadModel(cfg).requires_grad_(False)
    assert base_digest(a) != base_digest(b) and base_digest(a) == base_digest(a.to(torch.float32))
    big = torch.nn.Embedding(2**24 + 4, 1).requires_grad_(False)  # a float32 linspace of positions ran past the
    assert len(base_digest(big)) == 64  # end above 2**24 elements (GPT-2's embedding: 38.6M): an IndexError


def test_damaged_newer_and_older_checkpoint_files_are_named(setup, tmp_path, capsys):
    """A state without a field resuming reads is 'damaged' (it was a KeyError traceback); a newer format says so;
    an option the checkpoint predates counts as its default (it made every older checkpoint unresumable)."""
    root, _ = setup
    ck = _periodic_checkpoint(root)
    state = torch.load(ck / "training_state.pt", weights_only=True)
    cases = [({k: v for k, v in state.items() if k != "optimizer"}, 2, "is damaged: no optimizer"),
             ({**state, "format": 3}, 2, "was written by a newer lora-fast (checkpoint format 3"),
             ({**state, "options": {k: v for k, v in state["options"].items() if k != "use_rslora"}}, 0, "")]
    for i, (edited, rc, message) in enumerate(cases):
        path = tmp_path / f"c{i}" / "checkpoint-8"
        path.mkdir(parents=True)
        torch.save(edited, path / "training_state.pt")
        assert cli_main(["train", *_args(root, f"dmg{i}", "--resume_from_checkpoint", str(path))]) == rc
        assert message in capsys.readouterr().err


def test_set_aside_follows_a_symlinked_checkpoint(tmp_path):
    """``--resume_from_checkpoint best`` with ``best -> checkpoint-2``: the later checkpoints are set aside as for
    the target itself (the link's own name has no step)."""
    from lora_fast.train_ckpt import STATE_NAME, find_checkpoint, set_aside_newer

    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_NAME).write_bytes(b"state")
    (tmp_path / "best").symlink_to(tmp_path / "checkpoint-2")
    moved = set_aside_newer(tmp_path, tmp_path / "best", log=lambda msg: None)
    assert sorted(p.name for p in moved) == ["checkpoint-4.abandoned", "checkpoint-6.abandoned"]
    assert find_checkpoint("latest", tmp_path).name == "checkpoint-2"


def test_held_signals_leave_an_ignored_signal_ignored():
    """A run started with SIGINT ignored (a background job of a script) must not stop on one that lands in a held
    block; a signal it does handle is held to the block's end and raised there."""
    import os
    import signal

    from lora_fast.distributed import held_signals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with held_signals():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    reached = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # handled, also where pytest started with
    try:  # SIGINT ignored (a background job: `nohup pytest &`), as this test's first half does
        with pytest.raises(KeyboardInterrupt, match="signal 2"):
            with held_signals():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append(True)  # held: the block runs to its end
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reached == [True]


def test_two_runs_started_together_cannot_share_a_checkpoint_dir(setup, capsys):
    """Two runs into one output directory started together both passed the start-time check (no checkpoints yet),
    then replaced each other's checkpoint-N: the run that kept the output directory found the other's checkpoints
    under its name (its resume refused them: options differ). The run writing checkpoints holds the root; the
    second is refused, naming the first's pid, and the first's checkpoints are its own."""
    import os

    root, _ = setup
    second = {}

    def on_step(step, metrics):
        if step == 1:  # the first run holds the root, no checkpoint written yet: the second starts now
            second["rc"] = cli_main(["train", *_args(root, "together", "--save_steps", "2", "--seed", "7")])
            second["err"] = capsys.readouterr().err

    _run(root, "together", "--save_steps", "2", on_step=on_step)
    assert second["rc"] == 2, second["err"]
    assert f"is in use by another lora-fast run (pid {os.getpid()})" in second["err"]
    found = sorted((root / "together-checkpoints").glob("checkpoint-*"))
    assert found and all(json.loads((c / "trainer_state.json").read_text())["options"]["seed"] != 7 for c in found)
    assert cli_main(["train", *_args(root, "together-2", "--save_steps", "2", "--seed", "7")]) == 0  # released


def test_the_checkpoint_root_is_held_and_left_as_found(tmp_path):
    """``root_held``: a second holder of one root is refused while the first holds it; the lock file goes when the
    run ends, and a root the run created and never wrote a checkpoint into (an interrupt before the first save)
    with it."""
    from lora_fast.train_args import ConfigError
    from lora_fast.train_ckpt import LOCK_NAME, checkpoint_root, root_held

    opts = parse_train_args(["--output_dir", str(tmp_path / "out"), "--save_steps", "2"])
    root = checkpoint_root(opts)
    with root_held(opts):
        assert (root / LOCK_NAME).is_file()
        with pytest.raises(ConfigError, match="is in use by another lora-fast run"), root_held(opts):
            pass
        with root_held(opts, main=False):  # ranks other than 0 write no checkpoint: they hold nothing
            pass
    assert not root.exists()
    root.mkdir()
    (root / "checkpoint-2").mkdir()
    with root_held(opts):
        pass
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"]


def test_a_filesystem_without_flock_checkpoints_with_a_warning(tmp_path, monkeypatch):
    """NFS without lockd (ENOLCK) or Lustre without -o flock (ENOSYS): flock raising there ended every
    checkpointing run after its loading; the run goes on without the lock, warned, and leaves no lock file."""
    import errno
    import fcntl

    from lora_fast.train_ckpt import checkpoint_root, root_held

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    opts = parse_train_args(["--output_dir", str(tmp_path / "out"), "--save_steps", "2"])
    root = checkpoint_root(opts)
    with pytest.warns(UserWarning, match="the filesystem takes no lock"), root_held(opts):
        (root / "checkpoint-2").mkdir()
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"]


def test_a_held_checkpoint_root_is_refused_before_the_model_loads(setup, capsys, monkeypatch):
    """The second run into a held root was refused only in ``train``, after ``prepare`` had loaded the model and
    tokenized the data (minutes for a real model): ``run`` now takes the root before loading."""
    import os

    import lora_fast.train as T
    from lora_fast.train_ckpt import root_held

    root, _ = setup

    def loads(*args, **kwargs):
        raise AssertionError("prepare ran: the model was loaded before the held root was refused")

    opts = parse_train_args(_args(root, "held-before-loading", "--save_steps", "2"))
    with root_held(opts):
        monkeypatch.setattr(T, "prepare", loads)
        rc = cli_main(["train", *_args(root, "held-before-loading", "--save_steps", "2")])
        err = capsys.readouterr().err
    assert rc == 2, err
    assert f"is in use by another lora-fast run (pid {os.getpid()})" in err
