"""Multi-process training on CPU: ``torchrun -m lora_fast.train`` with DDP and FSDP2 (gloo), 2 processes.

Each distributed run is compared with ONE plain process trained on the same global batch (batch_size × 2), the
same seed and therefore the same data order (``lora_fast.distributed``: the permutation depends on (seed, epoch)
only). The tiny GPT-2 has its own dropouts set to 0 and LoRA dropout is 0, so the runs compute the same function
and differ only by the order of floating-point sums (fp32: ~1e-6 relative after a few AdamW steps).
``LORA_FAST_RANK_STATE_DIR`` makes every rank dump its final LoRA tensors, so both replicas are compared too;
``LORA_FAST_SIGNAL_AT`` makes one rank signal its own process group mid-run (the coordinated stop).
The launcher runs with ``--standalone`` (a free rendezvous port: parallel test runs cannot collide) and a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lora_fast import distributed as D
from lora_fast.train_args import ConfigError
from tests.utils import assert_rel_close

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120  # a 2-process run takes ~10 s on an idle 2-core machine; generous for a loaded one
# the GPU run compiles its fused kernels first (2-8 s each on sm_90, benchmarks/PERF_NOTES.md), on a machine whose 8
# xdist workers compile theirs at the same time (benchmarks/run_gpu.sh): a time-out there would cost a GPU lease
GPU_TIMEOUT_S = 300
# fp32 runs differing only in summation order (DDP/FSDP reduce per rank, then across ranks): ~1e-6 observed.
ADAPTER_TOL = 1e-4
LOSS_TOL = 1e-5
COMMON = ["--max_steps", "4", "--max_length", "32", "--eval_steps", "2", "--eval_batches", "2", "--lr", "0.01",
          "--target_modules", "c_attn", "c_fc", "--rank", "8", "--backend", "reference", "--device", "cpu",
          "--seed", "7", "--no-progress"]
TRAINABLE = 2 * 8 * ((64 + 192) + (64 + 256))  # 2 blocks × r·(in+out) for c_attn (64→192) and c_fc (64→256)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 without dropout (saved locally), a small text file, and the one-process reference run."""
    from pydoc_data.topics import topics

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, initializer_range=0.3,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(root / "tiny")
    (root / "data.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:12]))
    ref = root / "single"
    hf_logging.set_verbosity_error()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from lora_fast.train import main

        assert main(["--model", str(root / "tiny"), "--dataset", str(root / "data.txt"), *COMMON,
                     "--batch_size", "8", "--output_dir", str(ref)]) == 0
    finally:
        torch.set_num_threads(n)
    return root, ref


def _run_launcher(cmd: list[str], env: dict, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a launcher; on a timeout stop it with SIGTERM first. torchrun starts each rank in its own session, so
    killing the launcher alone (what ``subprocess.run(timeout=)`` does) would leave the ranks running; on SIGTERM it
    stops them itself. SIGKILL only if it has not exited 60 s later."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{cmd[:6]}... did not finish in {timeout} s (stopped with SIGTERM)\n{out[-3000:]}\n"
                    f"{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(root: Path, name: str, extra: list[str], launcher=None, common=tuple(COMMON), rc=0, signal_at=None,
              timeout: float = TIMEOUT_S):
    """Launch 2 ranks (torchrun by default); returns (output dir, rank-dump dir, the completed process).
    ``signal_at``: ``LORA_FAST_SIGNAL_AT`` ("RANK:STEP:INT|TERM"); ``rc``: torchrun's expected exit status."""
    out, dump = root / name, root / f"{name}-ranks"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                           "MASTER_ADDR", "MASTER_PORT", D.SIGNAL_AT_ENV)}
    tmp = root / f"{name}-tmp"  # torchrun's own per-run directories (torchelastic_*), which it leaves behind
    tmp.mkdir(exist_ok=True)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TMPDIR=str(tmp),
               **{D.RANK_STATE_ENV: str(dump)})
    if signal_at:
        env[D.SIGNAL_AT_ENV] = signal_at
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, "-m", "lora_fast.train", "--model", str(root / "tiny"), "--dataset", str(root / "data.txt"),
           *common, "--output_dir", str(out), *extra]
    proc = _run_launcher(cmd, env, timeout)
    assert proc.returncode == rc, f"torchrun: {proc.returncode}, not {rc}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, dump, proc


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _check_against_single(ref: Path, out: Path, dump: Path, proc, mode: str, world: int = 2,
                          backend: str = "gloo") -> dict:
    from safetensors.torch import load_file

    ranks = [load_file(dump / f"rank{k}.safetensors") for k in range(world)]
    assert len(ranks[0]) == 8 and all(r.keys() == ranks[0].keys() for r in ranks)
    for k in ranks[0]:  # the replicas (DDP) / the gathered shards (FSDP) are the same, bit for bit
        assert all(torch.equal(ranks[0][k], r[k]) for r in ranks[1:]), k
    single, saved = _adapter(ref), _adapter(out)
    assert single.keys() == saved.keys()
    for k, v in saved.items():
        name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora.lora_A").replace(
            ".lora_B.weight", ".lora.lora_B")
        assert torch.equal(v, ranks[0][name]), k  # rank 0 wrote what it trained
        assert_rel_close(v, single[k], ADAPTER_TOL, f"{mode} vs one process: {k}")
        if "lora_B" in k:
            assert v.abs().max() > 0, k  # it trained (B starts at 0)
    m, m1 = (json.loads((p / "training_metrics.json").read_text()) for p in (out, ref))
    assert (m["distributed"], m["world_size"], m["dist_backend"], m["global_batch_size"]) == (mode, world, backend, 8)
    assert m["tokens_seen"] == m1["tokens_seen"] == 4 * 8 * 32
    assert_rel_close(torch.tensor(m["train_loss"]), torch.tensor(m1["train_loss"]), LOSS_TOL, "train loss")
    # --eval_batches counts global batches: the same sequences are evaluated as by the one process
    assert m["eval_steps"] == m1["eval_steps"]
    assert_rel_close(torch.tensor(m["eval_loss"]), torch.tensor(m1["eval_loss"]), LOSS_TOL, "eval loss")
    assert m["parameters"]["trainable"] == TRAINABLE
    # rank 0 alone reports: one summary, one line per evaluation; no stray staging directories
    assert proc.stdout.count("lora-fast train done") == 1, proc.stdout
    assert (proc.stdout + proc.stderr).count("step 2: eval loss") == 1, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("Loading weights") <= 2, proc.stderr  # rank 0's bar only
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == []
    return m


def test_ddp_two_ranks_equal_one_process(setup):
    """DDP, batch 2 × accumulation 2 × 2 ranks = the reference's batch 8; only LoRA gradients are all-reduced,
    once per optimizer step (``no_sync`` on the first micro-step): the DDP comm hook saw exactly the trainable
    element count per step (the frozen base, 141k elements, was never reduced; without no_sync it would be 2×)."""
    root, ref = setup
    out, dump, proc = _torchrun(root, "ddp", ["--batch_size", "2", "--gradient_accumulation_steps", "2"])
    m = _check_against_single(ref, out, dump, proc, "ddp")
    assert m["grad_allreduce_numel_per_step"] == TRAINABLE
    assert m["per_device_batch_size"] == 2


def _rank_states(dump: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(dump / f"rank{k}.safetensors") for k in range(2)]


def _rank_exit_codes(proc) -> list[int]:
    """The workers' exit statuses in torchrun's failure report (it lists every rank that exited non-zero)."""
    return sorted(int(c) for c in re.findall(r"^\s*exitcode\s*:\s*(-?\d+) \(pid", proc.stdout + proc.stderr, re.M))


def _check_stopped_together(out: Path, dump: Path, proc, steps: int, planned: int = 4) -> dict:
    """A coordinated stop: every rank exited 130, both stopped after ``steps`` optimizer steps holding the same LoRA
    tensors (a rank one step ahead would differ), and rank 0 saved those as an interrupted run."""
    assert _rank_exit_codes(proc) == [130, 130], proc.stderr[-3000:]  # no -15: no rank killed while it exited
    log = proc.stdout + proc.stderr
    assert log.count(f"all stopped at step {steps}/{planned}") == 1, log[-3000:]  # rank 0 alone reports it
    m = json.loads((out / "training_metrics.json").read_text())
    assert m["interrupted"] and m["steps"] == steps and len(m["train_loss"]) == steps and m["planned_steps"] == planned
    ranks, saved = _rank_states(dump), _adapter(out)
    assert len(saved) == len(ranks[0]) == 8 and ranks[0].keys() == ranks[1].keys()
    for k, v in saved.items():
        name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora.lora_A").replace(
            ".lora_B.weight", ".lora.lora_B")
        assert torch.equal(v, ranks[0][name]) and torch.equal(v, ranks[1][name]), k
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == []
    return m


def test_ddp_signal_on_one_rank_stops_all_ranks_at_one_step_and_resumes(setup):
    """2 ranks, LoRA dropout 0.1 (each rank draws its own masks), a checkpoint every 2 steps. Rank 1 alone gets
    SIGINT (to its process group, DataLoader worker included, as torchrun forwards Ctrl-C) during step 3, between
    its two accumulation micro-steps: both ranks finish step 3 and stop there, exit 130, write checkpoint-3 and the
    adapter of step 3. Resuming from that checkpoint with 2 ranks gives the uninterrupted run's adapter and losses
    bit for bit: the data position and every rank's own RNG state come back (rank 1 restoring rank 0's stream would
    draw other masks). (Resuming from a periodic checkpoint is the same save: test_resume.py covers those.)
    The reference run gets SIGTERM on rank 1 during its last step: a run that completed all its steps is reported
    as completed (final evaluation and checkpoint, exit status 0)."""
    root, _ = setup
    extra = ["--batch_size", "2", "--gradient_accumulation_steps", "2", "--dropout", "0.1", "--save_steps", "2"]
    want_dir, _, proc = _torchrun(root, "ddp-ckpt", extra, signal_at="1:4:TERM")  # the uninterrupted run
    assert "rank 1: signal 15 after the last optimizer step; the run completes" in proc.stderr
    assert sorted(p.name for p in (root / "ddp-ckpt-checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    out, dump, proc = _torchrun(root, "ddp-stop", [*extra, "--num_workers", "1"], rc=1, signal_at="1:3:INT")
    m = _check_stopped_together(out, dump, proc, steps=3)
    assert m["eval_steps"] == [2] and "checkpoint-3" in proc.stdout + proc.stderr
    ck = root / "ddp-stop-checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    state = torch.load(ck / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])
    assert all(torch.equal(state["trainable"][n], t) for n, t in _rank_states(dump)[0].items())  # step 3's
    resumed, _, _ = _torchrun(root, "ddp-resumed", [*extra, "--resume_from_checkpoint", str(ck / "checkpoint-3"),
                                                    "--checkpoint_dir", str(root / "ddp-resumed-checkpoints")])
    want, got = _adapter(want_dir), _adapter(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    m, m1 = (json.loads((p / "training_metrics.json").read_text()) for p in (resumed, want_dir))
    assert m["train_loss"] == m1["train_loss"] and m["resumed_at_step"] == 3
    assert not m["interrupted"] and not m1["interrupted"] and m1["steps"] == 4
    assert m["eval_steps"] == m1["eval_steps"] == [2, 4]
    assert m["grad_allreduce_numel_per_step"] == TRAINABLE  # per step of the resumed process


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs CUDA GPUs: runs in the GPU job (run_gpu.sh "
                    "tests) with as many ranks as GPUs, up to 2 (the lent machines have one: a 1-rank NCCL group)")
def test_ddp_nccl_gpu_equals_one_cpu_process(setup):
    """DDP over NCCL, one rank per GPU (up to 2), fused Triton path in fp32 (IEEE dots unless torch allows TF32),
    global batch 8 as the one-process CPU reference run: the same adapter within fp32 summation-order error."""
    root, ref = setup
    world = min(2, torch.cuda.device_count())
    common = [a for a in COMMON]
    common[common.index("--backend") + 1], common[common.index("--device") + 1] = "triton", "cuda"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    out, dump, proc = _torchrun(root, f"ddp-nccl{world}", ["--batch_size", str(8 // (2 * world)),
                                                          "--gradient_accumulation_steps", "2",
                                                          "--distributed", "ddp"],  # DDP even with one rank
                                launcher=launcher, common=tuple(common), timeout=GPU_TIMEOUT_S)
    _check_against_single(ref, out, dump, proc, "ddp", world=world, backend="nccl")


def test_fsdp_two_ranks_equal_one_process(setup):
    """FSDP2 (fully_shard per GPT2Block + root, frozen base and LoRA in the same groups) on gloo; the adapter is
    gathered from DTensor shards for saving and loads back with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, ref = setup
    out, dump, proc = _torchrun(root, "fsdp", ["--batch_size", "4", "--distributed", "fsdp"])
    _check_against_single(ref, out, dump, proc, "fsdp")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "tiny"), out)  # a valid PEFT adapter


def test_fsdp_sigterm_on_one_rank_stops_all_ranks_and_saves_the_gathered_adapter(setup):
    """FSDP2, rank 1 alone gets SIGTERM during step 3: both ranks stop after step 3 (the flag rides on the step's
    loss all-reduce), gather the adapter together (a collective: no rank may be elsewhere) and exit 130. The first 3
    losses are the one-process run's: stopping changed nothing before the stop."""
    root, ref = setup
    out, dump, proc = _torchrun(root, "fsdp-stop", ["--batch_size", "4", "--distributed", "fsdp"], rc=1,
                                signal_at="1:3:TERM")
    m = _check_stopped_together(out, dump, proc, steps=3)
    m1 = json.loads((ref / "training_metrics.json").read_text())
    assert_rel_close(torch.tensor(m["train_loss"]), torch.tensor(m1["train_loss"][:3]), LOSS_TOL, "train loss")
    assert m["eval_steps"] == [2] and m["distributed"] == "fsdp"


def _spam_like_csvs(root: Path) -> Path:
    """Label/Text CSVs (train 64, validation 16, test 16 rows); the classes use disjoint words."""
    import csv
    import random

    words = {"spam": "win free prize cash claim urgent offer".split(), "ham": "see you at lunch tomorrow ok".split()}
    rng = random.Random(0)
    for split, n in (("train", 64), ("validation", 16), ("test", 16)):
        with (root / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Label", "Text"])
            for i in range(n):
                label = ("spam", "ham")[i % 2]
                w.writerow([label, " ".join(rng.choices(words[label], k=rng.randint(3, 9)))])
    return root


def test_fsdp_classification_two_epochs_equal_one_process(setup):
    """Sequence classification under FSDP2 for two epochs (the sampler's set_epoch, sharded evaluation of every
    split, a new ``score`` head that is trainable and saved as ``modules_to_save``): adapter, head, losses and
    accuracies equal a one-process run with the global batch."""
    from lora_fast.train import main

    root, _ = setup
    data = _spam_like_csvs(root)
    args = ["--task", "classification", "--dataset", str(data), "--epochs", "2", "--eval_steps", "100"]
    drop = {COMMON.index("--max_steps"), COMMON.index("--eval_batches")}  # epochs instead; every split whole
    cls_common = [a for i, a in enumerate(COMMON) if i not in drop and i - 1 not in drop]
    ref = root / "cls-single"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--model", str(root / "tiny"), *cls_common, *args, "--batch_size", "8",
                     "--output_dir", str(ref)]) == 0
    finally:
        torch.set_num_threads(n)
    out, dump, _ = _torchrun(root, "cls-fsdp", ["--distributed", "fsdp", "--batch_size", "4", *args],
                             common=cls_common)
    single, saved = _adapter(ref), _adapter(out)
    assert single.keys() == saved.keys() and any(".score." in k for k in saved)
    for k in saved:
        assert_rel_close(saved[k], single[k], ADAPTER_TOL, f"fsdp classification vs one process: {k}")
    m, m1 = (json.loads((p / "training_metrics.json").read_text()) for p in (out, ref))
    assert_rel_close(torch.tensor(m["train_loss"]), torch.tensor(m1["train_loss"]), LOSS_TOL, "train loss")
    # --eval_batches counts global batches: the same sequences are evaluated as by the one process
    assert m["eval_steps"] == m1["eval_steps"]
    assert_rel_close(torch.tensor(m["eval_loss"]), torch.tensor(m1["eval_loss"]), LOSS_TOL, "eval loss")
    assert len(m["train_loss"]) == 16 and [e["epoch"] for e in m["epochs"]] == [1.0, 2.0]
    for e, e1 in zip(m["epochs"], m1["epochs"], strict=True):  # 2 × 4 = 8 rows per global batch, like batch 8
        assert e["train_accuracy"] == e1["train_accuracy"] and e["val_accuracy"] == e1["val_accuracy"]
        assert e["val_loss"] == pytest.approx(e1["val_loss"], rel=ADAPTER_TOL)  # 16 fp32 steps: ~1e-5 apart
    assert m["test_accuracy"] == m1["test_accuracy"]


# ---------------------------------------------------------------------------------------- in-process, no launcher
def _tiny_lora_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_fast import apply_lora

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32))
    apply_lora(model, ["c_attn"], rank=4, alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # B non-zero too, so the saved values say something
    return model


def test_save_adapter_gathers_dtensor_params(one_rank_group, tmp_path):
    """save_adapter on an FSDP2-sharded model (DTensor parameters) writes the full tensors (it used to fail with
    "invalid python storage" and leave an empty directory)."""
    import copy

    from torch.distributed.tensor import DTensor

    from lora_fast.adapter import save_adapter

    model = _tiny_lora_model()
    plain = copy.deepcopy(model)
    ctx = D.DistContext("fsdp", 0, 1, 0, "gloo")
    D.wrap_model(model, ctx, torch.device("cpu"))
    assert isinstance(model.transformer.h[0].attn.c_attn.lora.lora_A, DTensor)
    save_adapter(model, tmp_path / "sharded")
    save_adapter(plain, tmp_path / "plain")
    a, b = _adapter(tmp_path / "sharded"), _adapter(tmp_path / "plain")
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = lambda p: json.loads((p / "adapter_config.json").read_text())  # noqa: E731
    assert cfg(tmp_path / "sharded") == cfg(tmp_path / "plain")


def test_adapter_added_under_ddp_or_fully_shard_is_refused(one_rank_group, tmp_path):
    """DDP fixes the parameters it all-reduces, and fully_shard those it shards, when they are built: LoRA layers
    added afterwards (apply_lora, or a trainable load_adapter, on the wrapped model) trained on each rank apart
    without a word (a reviewer saw the ranks' adapters drift apart with 2 gloo ranks). Refused by name, the model
    untouched; what adds nothing trainable (re-applying the same adapter, an inference load) still works."""
    from torch.nn.parallel import DistributedDataParallel
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_fast import apply_lora, load_adapter, lora_layers
    from lora_fast.adapter import save_adapter

    def base():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32))

    save_adapter(_tiny_lora_model(), tmp_path / "ad")
    ddp = DistributedDataParallel(base())
    with pytest.raises(ValueError, match=r"already wrapped in DistributedDataParallel.*2 new LoRA layer"):
        apply_lora(ddp, ["c_attn"], rank=4, alpha=8)
    with pytest.raises(ValueError, match=r"load_adapter: the model is already wrapped in DistributedDataParallel"):
        load_adapter(ddp, tmp_path / "ad")
    assert not lora_layers(ddp.module)  # untouched by either
    load_adapter(ddp, tmp_path / "ad", is_trainable=False)  # inference: nothing to synchronise
    assert len(lora_layers(ddp.module)) == 2
    with pytest.raises(ValueError, match=r"4 frozen parameter\(s\) made trainable"):
        load_adapter(ddp, tmp_path / "ad")  # the frozen layers made trainable: DDP never saw them trainable

    ddp = DistributedDataParallel(_tiny_lora_model())  # the right order: the adapter first, then DDP
    apply_lora(ddp, ["c_attn"], rank=4, alpha=8)  # nothing new
    load_adapter(ddp, tmp_path / "ad")  # into the layers DDP synchronises
    ddp(torch.randint(0, 128, (2, 8)))[0].sum().backward()

    sharded = base()
    D.wrap_model(sharded, D.DistContext("fsdp", 0, 1, 0, "gloo"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"already wrapped in FSDP2 \(fully_shard\)"):
        apply_lora(sharded, ["c_attn"], rank=4, alpha=8)


def test_save_adapter_failure_leaves_no_directory(tmp_path, monkeypatch):
    import safetensors.torch

    from lora_fast.adapter import save_adapter

    def broken(*a, **k):
        raise RuntimeError("simulated serialisation failure")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        save_adapter(_tiny_lora_model(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_stop_signals_first_sets_a_flag_second_raises():
    """Under torchrun the first SIGINT/SIGTERM in the loop only sets the flag; a second raises KeyboardInterrupt
    (the escape hatch); the previous handlers come back afterwards. One process: nothing is installed."""
    before = {s: signal.getsignal(s) for s in D.STOP_SIGNALS}
    with D.stop_signals(D.DistContext()) as flag:
        assert {s: signal.getsignal(s) for s in D.STOP_SIGNALS} == before and flag.signum == 0
    with D.stop_signals(D.DistContext("ddp", 0, 2, 0, "gloo")) as flag:
        installed = [signal.getsignal(s) for s in D.STOP_SIGNALS]
        assert all(callable(h) and h is not signal.default_int_handler for h in installed), installed
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # would end the test run without a handler (checked above)
            time.sleep(0.01)  # the Python handler runs at the next bytecode, at the latest during the sleep
        except KeyboardInterrupt:
            pytest.fail("the first stop signal raised instead of setting the flag")
        assert flag.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="second stop signal"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in D.STOP_SIGNALS} == before
    try:
        D.ignore_stop_signals()  # a stopped rank leaving: torchrun's SIGTERM must not change its exit status
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in D.STOP_SIGNALS)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_dataloader_workers_ignore_sigint_under_torchrun():
    """torchrun forwards Ctrl-C to each rank's process group, DataLoader workers included, while the rank trains on
    to the step boundary: its workers ignore SIGINT as well as SIGTERM (checked in a real worker). A spawned worker
    that did not died of KeyboardInterrupt and the loader raised "DataLoader worker ... exited unexpectedly"."""
    from lora_fast.train import Prepared, _loaders
    from lora_fast.train_args import parse_train_args

    blocks = torch.arange(64).view(4, 16)
    opts = parse_train_args(["--batch_size", "2", "--max_length", "16", "--num_workers", "1"])
    loader = _loaders(opts, Prepared(None, "m", None, True, {"train": blocks, "validation": blocks}, "src"),
                      D.DistContext("ddp", 0, 2, 0, "gloo"))["train"]

    class Probe(torch.utils.data.Dataset):  # reports the stop signals' dispositions inside the worker process
        def __len__(self):
            return 1

        def __getitem__(self, i):  # never raises: a failing worker held by the traceback would hang pytest's exit
            return torch.tensor([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)])

    probe = torch.utils.data.DataLoader(Probe(), num_workers=1, worker_init_fn=loader.worker_init_fn)
    ignored = next(iter(probe)).tolist()  # the iterator, and its worker, end here
    assert ignored == [[True, True]]  # SIGINT, SIGTERM
    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN  # the rank keeps its own


def test_mode_resolution_and_errors(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.resolve_mode("auto") == "none"
    with pytest.raises(ConfigError, match="needs a launcher"):
        D.resolve_mode("fsdp")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert D.resolve_mode("auto") == "ddp" and D.resolve_mode("fsdp") == "fsdp"
    with pytest.raises(ConfigError, match="every process would train alone"):
        D.resolve_mode("none")
    with pytest.raises(ConfigError, match="--fp16 is not supported with --distributed fsdp"):
        D.init("fsdp", "cpu", fp16=True)
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        D.init("ddp", "cuda:1")
    from lora_fast.train import train
    from lora_fast.train_args import parse_train_args

    with pytest.raises(ConfigError, match="only `lora-fast train`"):  # e.g. `lora-fast sweep` under torchrun
        train(parse_train_args(["--output_dir", "/nonexistent/never-written"]), prep=None)
    fsdp = D.DistContext(mode="fsdp", world_size=2, backend="gloo")
    for flag, value in (("--save_steps", "2"), ("--resume_from_checkpoint", "latest")):
        with pytest.raises(ConfigError, match="FSDP runs do not checkpoint"):  # refused before anything happens
            train(parse_train_args(["--output_dir", "/nonexistent/never-written", flag, value]), prep=None, ctx=fsdp)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="inconsistent"):
        D.torchrun_env()


def test_train_shards_never_repeat_an_example():
    """27 examples over 2 ranks: each pass both shards hold 13 distinct examples and no example twice (the last
    one of the pass's permutation is left out) — a padded sampler trained one example twice per pass."""
    dataset = list(range(27))
    for epoch in range(3):
        shards = []
        for rank in range(2):
            sampler = D.train_sampler(dataset, D.DistContext(mode="ddp", rank=rank, world_size=2), seed=7)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert [len(s) for s in shards] == [13, 13]
        assert len(set(shards[0]) | set(shards[1])) == 26
    one = D.train_sampler(dataset, D.DistContext(), seed=7)
    assert sorted(one) == dataset  # one process: every example, each once


def test_rank_dropout_streams_differ_and_reproduce():
    """Rank k > 0 reseeds after LoRA init: different masks from rank 0, the same ones on a rerun; rank 0 keeps
    the single-process stream."""
    def masks(rank):
        torch.manual_seed(5)
        D.seed_dropout_rng(5, D.DistContext("ddp", rank, 4, rank, "gloo"))
        return torch.rand(1000) >= 0.5

    torch.manual_seed(5)
    single = torch.rand(1000) >= 0.5
    m0, m1, m2 = masks(0), masks(1), masks(2)
    assert torch.equal(m0, single)
    assert not torch.equal(m0, m1) and not torch.equal(m1, m2) and not torch.equal(m0, m2)
    assert torch.equal(masks(1), m1)


def test_accelerate_launch_runs_ddp(setup):
    """``accelerate launch --multi_gpu`` sets torchrun's variables (it runs torch.distributed.run): on CPU it gives
    the same 2-rank DDP run (``--device cpu``: gloo)."""
    import shutil

    exe = shutil.which("accelerate")
    if exe is None:
        pytest.skip("accelerate is not installed here; the torchrun tests above cover the same code path")
    root, ref = setup
    launcher = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no", "--main_process_port", "0"]  # port 0: the OS picks a free one
    out, dump, proc = _torchrun(root, "accelerate", ["--batch_size", "4"], launcher)
    m = _check_against_single(ref, out, dump, proc, "ddp")
    assert m["grad_allreduce_numel_per_step"] == TRAINABLE


def test_errors_of_one_rank_are_printed_by_that_rank(monkeypatch, capsys):
    """Bad options fail on every rank alike, so rank 0 prints them, and another rank waits RANK_ERROR_GRACE_S
    before printing them itself: torchrun ends it during the wait once rank 0 has failed, so the message shows once;
    leaving at once, it had torchrun end a slower rank 0 before rank 0 printed, and the job ended with exit codes
    alone (seen under accelerate launch). An error that can arise on some ranks only (LOCAL_RANK past this node's
    GPUs, no CUDA on this node) is printed at once by the rank it arose on, which says so — it used to be printed by
    nobody (torchrun showed an exit status 2 and nothing else)."""
    from lora_fast import train as T
    from lora_fast.train_args import RankConfigError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    slept = []
    monkeypatch.setattr(T.time, "sleep", slept.append)
    for error, printed, waits in ((ConfigError("bad option"), "lora-fast train: error (rank 1): bad option\n", 1),
                                  (RankConfigError("LOCAL_RANK=1 but only 1 GPU(s) here"),
                                   "lora-fast train: error (rank 1): LOCAL_RANK=1 but only 1 GPU(s) here\n", 0)):
        def failing(opts, error=error):
            raise error
        monkeypatch.setattr(T, "run", failing)
        slept.clear()
        assert T.main(["--output_dir", "/nonexistent/never-written"]) == 2
        assert capsys.readouterr().err == printed and len(slept) == waits
        assert all(t >= 5 for t in slept)  # a slower import or a busy node delays rank 0 by seconds
    monkeypatch.setenv("RANK", "0")  # rank 0 prints at once
    assert T.main(["--output_dir", "/nonexistent/never-written"]) == 2
    assert capsys.readouterr().err.startswith("lora-fast train: error: LOCAL_RANK=1") and slept == []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RankConfigError, match="LOCAL_RANK=1 but only 1 GPU"):  # what D.init raises there
        D.init("ddp", "cuda")
    monkeypatch.setenv("RANK", "2")  # torchrun's variables inconsistent: every process says so
    monkeypatch.setattr(T, "run", lambda opts: D.torchrun_env())
    assert T.main(["--output_dir", "/nonexistent/never-written"]) == 2
    assert "error: RANK=2 / WORLD_SIZE=2 are inconsistent" in capsys.readouterr().err


class _Loaded(Exception):
    pass


def test_run_refuses_fsdp_checkpointing_before_loading_and_quiets_other_ranks(monkeypatch, tmp_path):
    """``--distributed fsdp --save_steps`` is refused by ``run`` before the model loads (it was refused after the
    load and the tokenizer's training, minutes on every rank); and ranks other than 0 show no Python warnings
    (lora_fast's tied-lm_head warning appeared once per rank), while rank 0 shows them."""
    from lora_fast import train as T
    from lora_fast.train_args import parse_train_args

    loaded = []

    def fake_prepare(opts, log):
        loaded.append(1)
        warnings.warn("a warning from loading", UserWarning, stacklevel=1)
        raise _Loaded  # the test ends the run once loading ran

    monkeypatch.setattr(T, "prepare", fake_prepare)
    opts = parse_train_args(["--output_dir", str(tmp_path / "out"), "--save_steps", "2"])
    monkeypatch.setattr(D, "init", lambda *a, **k: D.DistContext("fsdp", 0, 2, 0, "gloo"))
    with pytest.raises(ConfigError, match="FSDP runs do not checkpoint"):
        T.run(opts)
    assert not loaded
    opts = parse_train_args(["--output_dir", str(tmp_path / "out")])
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    for rank, shown in ((1, False), (0, True)):
        monkeypatch.setattr(D, "init", lambda *a, rank=rank, **k: D.DistContext("ddp", rank, 2, rank, "gloo"))
        with warnings.catch_warnings(record=True) as record, pytest.raises(_Loaded):
            warnings.simplefilter("always")
            T.run(opts)
        assert any("a warning from loading" in str(w.message) for w in record) == shown, rank
        with warnings.catch_warnings(), pytest.raises(UserWarning, match="a warning from loading"):
            warnings.simplefilter("error")  # -W error: every rank raises, as rank 0 does (an ignore filter hid it)
            T.run(opts)
        assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars), rank
    assert len(loaded) == 4


def test_a_finished_rank_leaves_without_the_interpreters_teardown(monkeypatch, capsys):
    """A torchrun rank (``WORLD_SIZE`` > 1) run as a process (the ``lora-fast`` script, ``python -m lora_fast`` or
    ``lora_fast.train``: ``cli.run_console``) ends by ``os._exit`` with its status, streams flushed: the
    interpreter's teardown destroyed objects holding the gloo process group after the C++ state their threads use,
    and a rank aborted now and then (exit -6, "terminate called without an active exception"), so torchrun reported
    a finished run as failed. One process, and ``train.main`` called as a function, return as before. (The abort
    was never reproduced on demand: this pins the path, the two-rank tests above its exit statuses.)"""
    from lora_fast import cli
    from lora_fast import train as T

    left = []

    class Left(Exception):
        pass

    def fake_exit(status):
        left.append(status)
        raise Left

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(T, "print_summary", lambda m: print("summary"))
    argv = ["--output_dir", "/nonexistent/never-written"]
    for world, interrupted, status in ((2, False, 0), (2, True, 130), (1, True, 130)):
        monkeypatch.setattr(T, "run", lambda opts, w=world, i=interrupted: {"world_size": w, "interrupted": i})
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
        assert T.main(argv) == status  # a function returns
        if world > 1:
            with pytest.raises(Left):
                cli.run_console(T.main, argv)
            assert left.pop() == status
        else:
            assert cli.run_console(T.main, argv) == status and not left
    assert capsys.readouterr().out.count("summary") == 6


def test_load_adapter_into_a_sharded_model_copies_into_its_dtensors(one_rank_group, tmp_path):
    """load_adapter into an FSDP2-sharded model that already holds its LoRA layers (DTensor parameters: an inference
    load, or a trainable one into the layers fully_shard manages) failed in the copy ("aten.copy_.default got mixed
    torch.Tensor and DTensor"), after it had frozen the adapter and switched the model to eval mode: a training loop
    caught the error and went on training nothing. Each rank now copies its own shard of the file's tensors (no
    collective): the load gives the plain model's adapter and outputs."""
    import copy

    from torch.distributed.tensor import DTensor

    from lora_fast import load_adapter
    from lora_fast.adapter import save_adapter

    source = _tiny_lora_model()
    save_adapter(source, tmp_path / "ad")
    torch.manual_seed(1)
    model = _tiny_lora_model()  # other LoRA values
    plain = copy.deepcopy(model)
    D.wrap_model(model, D.DistContext("fsdp", 0, 1, 0, "gloo"), torch.device("cpu"))
    assert isinstance(model.transformer.h[0].attn.c_attn.lora.lora_A, DTensor)
    want = {n: p for n, p in source.named_parameters() if p.requires_grad}
    for trainable in (True, False):  # into the layers fully_shard manages, then for inference
        load_adapter(model, tmp_path / "ad", is_trainable=trainable)
        got = {n: p for n, p in model.named_parameters() if ".lora.lora_" in n}
        assert got.keys() == want.keys() and all(isinstance(p, DTensor) for p in got.values())
        for n, p in got.items():
            assert torch.equal(p.full_tensor(), want[n]), n
            assert p.requires_grad == trainable, n
    load_adapter(plain, tmp_path / "ad")
    x = torch.randint(0, 128, (2, 8))
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)


def test_accelerate_settings_lora_fast_would_ignore_are_refused(monkeypatch, tmp_path, capsys):
    """``accelerate launch`` passes its FSDP, DeepSpeed and mixed-precision choices in the environment
    (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED, ACCELERATE_MIXED_PRECISION), which ``lora-fast train`` does not
    read: ``accelerate launch --use_fsdp --num_processes 2 -m lora_fast.train`` trained plain DDP (full replicas,
    metrics ``distributed: ddp``) and ``--mixed_precision bf16`` trained in fp32, without a word. Refused now before
    the model loads, naming the lora-fast option that does it; the same choice made by both is accepted."""
    from lora_fast.train import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
              "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(k, raising=False)
    D.check_accelerate_env("auto", fp16=False, bf16=False)  # no accelerate: nothing to check
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's default
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    D.check_accelerate_env("auto", fp16=False, bf16=True)
    for env, opts, message in (
        ({"ACCELERATE_USE_FSDP": "true"}, ("auto", False, False), r"--use_fsdp.*pass --distributed fsdp"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, ("auto", False, False), r"--use_deepspeed.*does not run DeepSpeed"),
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ("auto", False, False), r"--mixed_precision bf16.*pass --bf16"),
        ({"ACCELERATE_MIXED_PRECISION": "fp16"}, ("auto", False, True), r"--mixed_precision fp16.*pass --fp16"),
        ({"ACCELERATE_MIXED_PRECISION": "fp8"}, ("auto", False, False), r"--mixed_precision fp8.*no fp8"),
    ):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.raises(ConfigError, match=message):
                D.check_accelerate_env(*opts[:1], fp16=opts[1], bf16=opts[2])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    D.check_accelerate_env("fsdp", fp16=False, bf16=True)  # asked of lora-fast too: taken
    out = tmp_path / "never-written"
    assert main(["--model", str(tmp_path / "no-model-needed"), "--output_dir", str(out), "--no-progress"]) == 2
    assert "accelerate launch --use_fsdp" in capsys.readouterr().err  # refused before the model loads
    assert not out.exists()
