"""Unit tests of ``benchmarks/utils.py``: timing, memory accounting, the results CSV, the environment helpers and
the options every benchmark script shares. Fake clocks and CUDA counters stand in for hardware; nothing is timed."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess

import pytest
import torch

from benchmarks import bench_gpt2, bench_layer, utils
from tests.utils import MISSING

ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "t", "triton": "t", "transformers": "t", "commit": "abc1234",
       "timestamp": "2026-01-01T00:00:00Z"}


def row(provider="base", mode="fwd", metric="time", config=None, value=1.0, bench="layer", **env):
    return utils.make_row(bench, provider, mode, metric, config or {"M": 64}, [value], {**ENV, **env})


def csv_rows(path) -> list[dict]:
    return utils.read_csv(path)


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------
def test_quantiles_default_to_p20_p50_p80_with_linear_interpolation():
    """The CSV's p20/p50/p80 columns: the 20th, 50th and 80th percentiles (numpy's default linear method, which
    ``statistics.quantiles(method="inclusive")`` also implements), whatever the input order."""
    xs = [float(v * v) for v in (5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 0, 11)]  # unevenly spaced, unsorted
    deciles = statistics.quantiles(xs, n=10, method="inclusive")  # 10 %, 20 %, ..., 90 %
    assert utils.quantiles(xs) == pytest.approx((deciles[1], deciles[4], deciles[7]))
    with pytest.raises(ValueError, match="empty"):
        utils.quantiles([])


def test_measure_time_reports_ms_of_fn_alone(monkeypatch):
    """A fake clock: each timed call takes a known time, each untimed ``setup()`` a whole second, each warm-up call
    ten. The result is the timed calls' percentiles in milliseconds; setup runs before every call."""
    clock, calls = [0.0], []
    durations = iter([10.0, 10.0, 0.004, 0.001, 0.003, 0.002, 0.005])  # seconds: 2 warm-up, then 5 timed
    monkeypatch.setattr(utils.time, "perf_counter", lambda: clock[0])

    def setup():
        calls.append("setup")
        clock[0] += 1.0

    def fn():
        calls.append("fn")
        clock[0] += next(durations)

    got = utils.measure_time(fn, setup, warmup=2, rep=5)
    want = statistics.quantiles([1.0, 2.0, 3.0, 4.0, 5.0], n=10, method="inclusive")
    assert got == pytest.approx((want[1], want[4], want[7]))
    assert calls == ["setup", "fn"] * 7


def test_measure_time_records_cuda_events_on_the_measured_devices_stream(monkeypatch):
    """``--device cuda:1``: the events bracketed the current device's stream (cuda:0, idle), timing nothing but
    the host gap. Fake CUDA: each event remembers the stream it was recorded on."""
    recorded = []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            recorded.append(stream)

        def elapsed_time(self, end):
            return 1.0

    class Flush:
        def zero_(self):
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: Flush())
    assert utils.measure_time(lambda: None, warmup=0, rep=3, device="cuda:1") == (1.0, 1.0, 1.0)
    assert recorded == ["stream of cuda:1"] * 6


@pytest.mark.parametrize("rep, warmup", [(0, 1), (1, -1)])
def test_measure_time_rejects_no_repetitions(rep, warmup):
    with pytest.raises(ValueError, match=f"rep >= 1 and warmup >= 0, got rep={rep}, warmup={warmup}"):
        utils.measure_time(lambda: None, rep=rep, warmup=warmup)


# --------------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------------
def test_live_bytes_counts_new_storages_until_freed_and_keeps_the_peak():
    x = torch.ones(1024)  # created before: never counted
    nbytes = x.numel() * x.element_size()
    out = torch.empty(1024)
    with utils.LiveBytes() as t:
        x.add_(1)  # in place
        x.view(32, 32).t()  # views
        torch.add(x, 1, out=out)  # out=: writes an existing storage
        assert (t.current, t.peak) == (0, 0)
        y = x * 2
        z = x + 1
        assert (t.current, t.peak) == (2 * nbytes, 2 * nbytes)
        del y, z
        assert t.current == 0
        small = torch.ones(16)
        assert (t.current, t.peak) == (16 * small.element_size(), 2 * nbytes)  # the peak is the maximum so far


def test_peak_memory_cpu_excludes_setup_and_what_was_live_before():
    keep = []

    def setup():
        keep.append(torch.ones(2**18))  # 1 MB, allocated before the measured call

    def fn():
        a = torch.ones(2**19)  # 2 MB
        del a
        b = torch.ones(2**18)  # 1 MB
        return b

    assert utils.peak_memory_mb(fn, setup) == pytest.approx(2.0)


def test_peak_memory_cpu_counts_what_fn_frees_of_setups_tensors_as_cuda_does():
    """A backward frees the forward's saved tensors (made by setup) and allocates as much: nothing above what was
    live before, as the CUDA figure says. Setup ran outside the tracker, so its frees went uncounted (a review
    measured the CPU bwd peak about 3× the CUDA semantics')."""
    saved = []

    def setup():
        saved.append(torch.ones(2**18))  # 1 MB, live before the measured call

    def fn():
        saved.pop()  # freed by the measured call
        return torch.ones(2**18)  # 1 MB

    assert utils.peak_memory_mb(fn, setup) == pytest.approx(0.0)


def test_peak_memory_cuda_is_the_peak_above_the_memory_allocated_before(monkeypatch):
    """The caching allocator's counters, simulated: 7 MB live after setup (and before), fn allocates 3 MB and frees
    1 MB of them. The figure is fn's own 3 MB, not the 10 MB peak of the process."""
    mb = 2**20
    state = {"alloc": 100 * mb, "peak": 100 * mb}

    def alloc(n):
        state["alloc"] += n
        state["peak"] = max(state["peak"], state["alloc"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["alloc"]))
    got = utils.peak_memory_mb(lambda: (alloc(3 * mb), alloc(-mb)), lambda: alloc(7 * mb), device="cuda")
    assert got == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------------------------------
# Results CSV
# --------------------------------------------------------------------------------------------------------------------
def test_upsert_replaces_only_rows_with_the_same_identity(tmp_path):
    """Rows that differ in any one identity column (device, mode, provider, metric, config, bench) are different
    results and never overwrite each other, even when written by separate runs; a rerun of one replaces it alone.
    The returned count is the number of rows in the file."""
    path = tmp_path / "results.csv"
    first = row()
    others = [row(device="NVIDIA A100-SXM4-80GB"), row(mode="bwd"), row(provider="peft"), row(metric="tflops"),
              row(config={"M": 128}), row(bench="gpt2")]
    assert utils.upsert_csv(path, [first]) == 1
    for i, other in enumerate(others, start=2):  # one run each
        assert utils.upsert_csv(path, [other]) == i == len(csv_rows(path))
    rerun = row(value=7.0, commit="def5678")
    assert utils.upsert_csv(path, [rerun]) == 1 + len(others) == len(csv_rows(path))
    got = csv_rows(path)
    assert [r for r in got if r["commit"] == "def5678"] == [rerun]
    assert sorted(map(str, got)) == sorted(map(str, [rerun, *others]))


def _upsert_many(path, bench, n):
    for i in range(n):
        utils.upsert_csv(path, [row(bench=bench, config={"i": i})])
        utils.drop_failed(path, bench, "cpu", {"i": -1}, "lora_fast")  # a read-modify-write that finds nothing


def test_two_processes_writing_one_csv_keep_every_row(tmp_path):
    """bench_layer and bench_gpt2 in two shells, one CSV: each upsert is a read-modify-write, and without a lock
    one writer's rows were written over by the other's stale copy (a reviewer's run kept 299 of 400)."""
    import multiprocessing

    path = tmp_path / "results.csv"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_upsert_many, args=(path, bench, 60)) for bench in ("layer", "gpt2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = csv_rows(path)
    assert sorted((r["bench"], r["config"]) for r in got) == sorted(
        (b, utils.config_json({"i": i})) for b in ("layer", "gpt2") for i in range(60))


def test_a_directory_that_cannot_be_locked_still_gets_its_rows_with_a_warning(tmp_path, monkeypatch):
    """NFS refuses flock on a directory opened read-only (EBADF), some mounts have no locks (ENOLCK): the CSV is
    written anyway, with a warning that says two writers at once are not safe there."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = tmp_path / "results.csv"
    with pytest.warns(UserWarning, match="cannot lock its directory .*No locks available"):
        assert utils.upsert_csv(path, [row()]) == 1
    assert csv_rows(path) == [row()]


def test_config_json_is_independent_of_key_order(tmp_path):
    """Configs built in another key order are the same configuration: a rerun replaces its rows."""
    a, b = {"M": 64, "r": 16, "dtype": "bf16"}, {"dtype": "bf16", "r": 16, "M": 64}
    assert utils.config_json(a) == utils.config_json(b)
    path = tmp_path / "results.csv"
    utils.upsert_csv(path, [row(config=a)])
    assert utils.upsert_csv(path, [row(config=b, value=2.0)]) == 1


def test_a_csv_with_other_columns_or_column_order_is_refused_untouched(tmp_path):
    path = tmp_path / "results.csv"
    for header in (utils.CSV_COLUMNS[::-1], utils.CSV_COLUMNS[:-1], [*utils.CSV_COLUMNS, "extra"]):
        text = ",".join(header) + "\n"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match="left untouched"):
            utils.upsert_csv(path, [row()])
        assert path.read_text(encoding="utf-8") == text


def test_drop_failed_removes_only_that_providers_rows_of_that_config(tmp_path):
    path = tmp_path / "results.csv"
    cfg, other_cfg = {"M": 64}, {"M": 128}
    gone = [row("peft", "fwd", config=cfg), row("peft", "full", "peak_mem", config=cfg)]
    stay = [row("base", config=cfg), row("reference", config=cfg), row("peft", config=other_cfg),
            row("peft", config=cfg, device="cpu"), row("peft", "train", config=cfg, bench="gpt2")]
    utils.upsert_csv(path, stay + gone)
    dropped = utils.drop_failed(path, "layer", ENV["device"], cfg, "peft")
    assert sorted(map(str, dropped)) == sorted(map(str, gone))
    assert sorted(map(str, csv_rows(path))) == sorted(map(str, stay))
    before = path.read_bytes()
    assert utils.drop_failed(path, "layer", ENV["device"], cfg, "peft") == []
    assert path.read_bytes() == before


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX: checked on the Linux CI and GPU machines")
def test_written_csv_gets_the_usual_file_mode_and_keeps_an_existing_one(tmp_path):
    """A new CSV is readable as open() would make it (not mkstemp's private 0600); a rewrite keeps the mode."""
    path = tmp_path / "results.csv"
    umask = os.umask(0o027)
    try:
        utils.upsert_csv(path, [row()])
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~0o027
    os.chmod(path, 0o604)
    utils.upsert_csv(path, [row(provider="peft")])
    assert path.stat().st_mode & 0o777 == 0o604
    assert not [p for p in tmp_path.iterdir() if p.name != "results.csv"]  # no temporary file left


# --------------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------------
def test_env_vars_sets_unsets_and_restores_even_on_error(monkeypatch):
    monkeypatch.setenv("LORA_FAST_TEST_SET", "before")
    monkeypatch.setenv("LORA_FAST_TEST_GONE", "before")
    monkeypatch.delenv("LORA_FAST_TEST_NEW", raising=False)
    settings = {"LORA_FAST_TEST_SET": "inside", "LORA_FAST_TEST_GONE": None, "LORA_FAST_TEST_NEW": "inside"}
    with pytest.raises(KeyError), utils.env_vars(settings):
        assert os.environ["LORA_FAST_TEST_SET"] == os.environ["LORA_FAST_TEST_NEW"] == "inside"
        assert "LORA_FAST_TEST_GONE" not in os.environ
        raise KeyError("boom")
    assert os.environ["LORA_FAST_TEST_SET"] == os.environ["LORA_FAST_TEST_GONE"] == "before"
    assert "LORA_FAST_TEST_NEW" not in os.environ  # unset before: removed, not left as ""


def test_provider_env_forces_the_variant_its_name_says_and_lora_fast_the_default(monkeypatch):
    """The kernels' own route selectors, under each provider's environment, at a shape where the default rule
    would pick otherwise (fp32 with IEEE dots at r=64: cuBLAS both ways). ``lora_fast_one_pass`` and
    ``lora_fast_xa_first`` are the fused kernels with that forward; ``lora_fast`` runs the default rule even when
    a variable is inherited from the shell."""
    pytest.importorskip("triton", reason=MISSING["triton"])
    from lora_fast.kernels import lora_bwd, lora_fwd

    shape = (8192, 768, 768, 64)

    def routes():
        return (lora_fwd.fwd_variant(*shape, 0.1, torch.float32), lora_bwd.bwd_variant(*shape, False, torch.float32))

    for var in ("LORA_FAST_FWD_VARIANT", "LORA_FAST_BWD_VARIANT"):
        monkeypatch.delenv(var, raising=False)
    default = routes()
    assert default == ("cublas", "cublas")  # the premise: neither the one-pass forward nor the fused backward
    fused = {"lora_fast_one_pass": ("one_pass", "fused"), "lora_fast_xa_first": ("xa_first", "fused")}
    for provider, want in fused.items():
        with utils.provider_env(provider):
            assert routes() == want, provider
        assert routes() == default
    for provider in utils.VARIANT_PROVIDERS:  # every forced name is one the kernels accept
        with utils.provider_env(provider):
            routes()

    monkeypatch.setenv("LORA_FAST_FWD_VARIANT", "one_pass")
    monkeypatch.setenv("LORA_FAST_BWD_VARIANT", "fused")
    with utils.provider_env("lora_fast"):
        assert routes() == default
    assert routes() == ("one_pass", "fused")  # the shell's setting is back
    with utils.provider_env("peft"):  # not lora_fast's kernels: the environment is left alone
        assert routes() == ("one_pass", "fused")
    with utils.provider_env("peft_patched"):  # PEFT's layers on lora_fast's kernels: the default rules
        assert routes() == default


@pytest.mark.skipif(shutil.which("git") is None,
                    reason="git is not installed (CI has it): rows record the commit read with git")
def test_git_commit_is_head_with_dirty_for_changes_outside_results(tmp_path, monkeypatch):
    def git(*args):
        cfg = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]  # whatever ~/.gitconfig says
        return subprocess.run(["git", *cfg, *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    monkeypatch.delenv("LORA_FAST_BENCH_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(utils, "REPO_ROOT", tmp_path)
    assert utils.git_commit() == "unknown"  # not a repository
    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "init")
    head = git("rev-parse", "--short", "HEAD")
    assert utils.git_commit() == head
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "results.csv").write_text("x\n")  # the results being written
    assert utils.git_commit() == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert utils.git_commit() == head + "-dirty"
    monkeypatch.setenv("LORA_FAST_BENCH_COMMIT", "1234567")
    assert utils.git_commit() == "1234567"


def test_env_info_records_the_peft_version_beside_transformers():
    """Every "vs peft" figure depends on PEFT's version; the issue fixes the CSV's columns, so it rides in the
    transformers column."""
    peft = pytest.importorskip("peft", reason=MISSING["peft"])
    import transformers

    assert utils.env_info("cpu")["transformers"] == f"{transformers.__version__} (peft {peft.__version__})"


def test_gpt2_bench_refuses_a_sequence_longer_than_the_models_positions(tmp_path):
    """A loaded checkpoint (the cached pretrained gpt2 needs no --model-path) with fewer positions than --seq:
    on CUDA the embedding lookup would be a device-side assert ending the whole run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = dict(bench_gpt2.QUICK_SET)
    GPT2LMHeadModel(GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                               vocab_size=shape["vocab"], n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--seq 64 exceeds the model's 32 positions"):
        bench_gpt2.build_model(shape, torch.device("cpu"), str(tmp_path))


def test_gpt2_bench_refuses_a_model_path_that_cannot_serve_before_anything_runs(tmp_path, capsys):
    """A --model-path that is missing or of another shape is a usage error: found while timing, it was each
    provider's failure, and that dropped their earlier rows of this configuration from the CSV."""
    from transformers import GPT2Config

    shape = dict(bench_gpt2.QUICK_SET)
    dims = {"n_layer": shape["n_layer"], "n_head": shape["n_head"], "vocab_size": shape["vocab"]}
    GPT2Config(n_embd=shape["n_embd"], n_positions=64, **dims).save_pretrained(tmp_path / "good")
    GPT2Config(n_embd=64, **dims).save_pretrained(tmp_path / "narrow")
    GPT2Config(n_embd=shape["n_embd"], n_positions=32, **dims).save_pretrained(tmp_path / "short")
    GPT2Config(n_embd=shape["n_embd"], n_positions=2048, **dims).save_pretrained(tmp_path / "long")
    assert bench_gpt2.parse_args(["--quick", "--model-path", str(tmp_path / "good")]).model_path
    assert bench_gpt2.parse_args(["--quick", "--seq", "2048", "--model-path", str(tmp_path / "long")]).model_path
    for name, said in [("missing", "no such directory"), ("narrow", "its architecture"),
                       ("short", "--seq 64 exceeds the 32 positions")]:
        with pytest.raises(SystemExit) as e:
            bench_gpt2.parse_args(["--quick", "--no-check", "--model-path", str(tmp_path / name)])
        assert e.value.code == 2 and said in capsys.readouterr().err, name


def test_rel_err_is_relative_to_the_reference():
    ref, out = torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])  # ‖ref‖ = 5, ‖out‖ = 10, ‖out − ref‖ = 5
    assert utils.rel_err(out, ref) == pytest.approx(math.hypot(3, 4) / math.hypot(3, 4))
    assert utils.rel_err(ref, out) == pytest.approx(math.hypot(3, 4) / math.hypot(6, 8))
    assert utils.rel_err(ref, ref) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# The options every benchmark script shares
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [bench_layer, bench_gpt2], ids=["bench_layer", "bench_gpt2"])
@pytest.mark.parametrize("argv, named", [(["--threads", "0"], "--threads"), (["--threads", "-2"], "--threads"),
                                         (["--device", "cudaa"], "cudaa"), (["--device", "cuda:x"], "cuda:x")])
def test_bad_common_options_are_usage_errors_naming_the_value(script, argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--quick", *argv])
    assert e.value.code == 2  # argparse's usage error, not a traceback
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("script", [bench_layer, bench_gpt2], ids=["bench_layer", "bench_gpt2"])
def test_good_common_options_are_accepted(script):
    args = script.parse_args(["--quick", "--device", "cpu", "--threads", "1"])
    assert (args.device, args.threads) == ("cpu", 1)


def test_timeable_providers_skip_triton_off_gpu_and_refuse_the_interpreter_on_one(monkeypatch, capsys):
    """Off a GPU the Triton providers are skipped with a note; on a GPU with TRITON_INTERPRET set they are refused
    (their figures would be the interpreter's under the GPU's name), and without it every provider is kept."""
    asked = ["base", "lora_fast", "peft", "lora_fast_cublas"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.timeable_providers(asked, torch.device("cpu")) == ["base", "peft"]
    out = capsys.readouterr().out
    assert "provider lora_fast skipped" in out and "provider lora_fast_cublas skipped" in out
    with pytest.raises(SystemExit, match="TRITON_INTERPRET is set: providers lora_fast, lora_fast_cublas would "
                                         "time the Triton interpreter"):
        utils.timeable_providers(asked, torch.device("cuda"))
    assert utils.timeable_providers(["base", "peft"], torch.device("cuda")) == ["base", "peft"]
    monkeypatch.delenv("TRITON_INTERPRET")
    assert utils.timeable_providers(asked, torch.device("cuda")) == asked


def test_timeable_providers_refuse_a_cpu_run_left_with_nothing_to_time(capsys):
    """Only Triton providers asked for off a GPU: an error, not a run that prints the shapes, writes nothing and
    exits 0."""
    with pytest.raises(SystemExit, match=r"nothing to time on cpu: the providers asked for \(lora_fast, "
                                         r"peft_patched\) run Triton kernels"):
        utils.timeable_providers(["lora_fast", "peft_patched"], torch.device("cpu"))
    assert utils.timeable_providers(["lora_fast", "base"], torch.device("cpu")) == ["base"]


def test_peft_patched_is_a_triton_provider_that_refuses_layers_left_on_pefts_path():
    """``peft_patched`` times PEFT's model after ``patch_peft``: it is skipped off a GPU like every Triton provider,
    runs with the default kernel rules, and a LoRA layer that would stay on PEFT's own path (DoRA here) is an
    error, never PEFT's timings under this provider's name."""
    from peft import LoraConfig, get_peft_model

    from lora_fast.peft_compat import is_patched

    assert "peft_patched" in utils.TRITON_PROVIDERS and "peft_patched" in bench_gpt2.ALL_PROVIDERS
    assert utils.timeable_providers(["peft", "peft_patched"], torch.device("cpu")) == ["peft"]
    model = get_peft_model(bench_layer._Wrapper(torch.nn.Linear(8, 6)), LoraConfig(r=4, target_modules=["proj"]))
    assert is_patched(utils.patch_peft_fused(model).base_model.model.proj)
    dora = get_peft_model(bench_layer._Wrapper(torch.nn.Linear(8, 6)),
                          LoraConfig(r=4, target_modules=["proj"], use_dora=True))
    with pytest.warns(UserWarning, match="DoRA"), \
            pytest.raises(RuntimeError, match=r"patch_peft left 1 LoRA layer\(s\) on PEFT's own path: .*proj"):
        utils.patch_peft_fused(dora)


def test_layer_providers_compute_the_same_function_on_the_same_inputs():
    """prepare_case draws the Conv1D, the adapter and the input from one seeded generator: every provider's output
    is the same function of the same x (PEFT's own init, run in between, used to shift the global RNG)."""
    ys = {name: bench_layer.prepare_case(name, "attn.c_proj", 8, 4, 0.0, "fp32", "cpu")["forward"]().detach()
          for name in ("reference", "peft", "base")}
    assert torch.allclose(ys["reference"], ys["peft"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ys["reference"], ys["base"], rtol=1e-3, atol=1e-4)  # the LoRA term is there
