"""Tests written against mutants that survived the rest of the suite (round 4 of mutation testing: the code added
since fb3b4e6 — ``apply_lora(config=...)``, PEFT's initial draws, the resize checks, the mis-shaped-key message,
the staging-directory locks and the option suggestions). Each pins a documented property, against PEFT where there
is one, and names the mutation it kills. No training runs: every test builds a tiny layer or model, or calls the
module's functions directly."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn
import transformers

from lora_fast import LinearWithLoRA, apply_lora, load_adapter, lora_layers, save_adapter
from lora_fast.layer import LoRALayer
from tests.utils import MISSING

peft = pytest.importorskip("peft", reason=MISSING["peft"])


def _gpt2(n_embd=32, vocab=50, cls=transformers.GPT2LMHeadModel, **kw):
    return cls(transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=vocab, n_positions=16,
                                       bos_token_id=0, eos_token_id=0, **kw))


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        return self.lin(x)


def _peft(model, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, cfg)


# ------------------------------------------------------------------------------------------------ initial draws
def test_a_meta_lora_layer_draws_nothing():
    """``reset_parameters``: "A meta layer draws nothing": building adapters on the meta device (a model built
    empty, materialised later) leaves the generator where it was, so the real layers drawn afterwards are the ones
    one seed gives.
    Kills ``LoRALayer.reset_parameters``: the ``if self.lora_A.is_meta: return`` dropped."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    LoRALayer(16, 8, rank=2, device="meta")
    LinearWithLoRA(16, 8, rank=2, device="meta")
    assert torch.equal(torch.get_rng_state(), before)


def test_a_float64_base_s_adapter_is_peft_s():
    """PEFT draws ``nn.Linear(in, r)``'s init in the default dtype (fp32) and moves it to the base's dtype: after
    one seed, a float64 base's A is PEFT's, not a float64 draw.
    Kills ``LoRALayer.reset_parameters``: the draws made in the layer's dtype, not the default dtype."""
    base = _One().double()
    torch.manual_seed(7)
    ours = apply_lora(copy.deepcopy(base), ["lin"], rank=4)
    torch.manual_seed(7)
    theirs = _peft(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["lin"]))
    want = theirs.base_model.model.lin.lora_A["default"].weight
    assert ours.lin.lora.lora_A.dtype == want.dtype == torch.float64
    assert torch.equal(ours.lin.lora.lora_A, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reset_parameters_of_a_half_base_draws_the_construction_s_adapter(dtype):
    """``LinearWithLoRA.reset_parameters`` re-draws the adapter as construction does (PEFT's): of a fp16/bf16 base
    the fp32 A passes through the base's dtype, so the same seed gives the same A again.
    Kills ``LinearWithLoRA.reset_parameters``: the ``_round_a_like_peft()`` call dropped."""
    base = nn.Linear(16, 8).to(dtype)
    torch.manual_seed(3)
    layer = LinearWithLoRA(base, rank=4)
    built = layer.lora.lora_A.detach().clone()
    assert built.dtype == torch.float32 and torch.equal(built, built.to(dtype).float())
    torch.manual_seed(3)
    layer.reset_parameters()
    assert torch.equal(layer.lora.lora_A, built) and not layer.lora.lora_B.any()


# --------------------------------------------------------------------------------------------- apply_lora(config)
def test_a_refused_config_target_restores_each_base_s_own_requires_grad():
    """A target refused after others were prepared (a quantised base) leaves the model unchanged: every base
    parameter's ``requires_grad`` is restored to what it was, a frozen one stays frozen.
    Kills ``apply_lora``: the flags restored as True, not as recorded."""
    model = _gpt2()
    frozen = model.transformer.h[0].attn.c_attn.weight
    frozen.requires_grad_(False)
    proj = model.transformer.h[1].attn.c_attn
    proj.weight = nn.Parameter(proj.weight.detach().to(torch.int8), requires_grad=False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="transformer.h.1.attn.c_attn"):
        apply_lora(model, config={"target_modules": ["c_attn"]})
    assert not lora_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("given", [{"dropout": 0.1}, {"use_rslora": True}, {"alpha": 4.0}])
def test_arguments_beside_a_config_are_refused_by_name(given):
    """``config`` describes the adapter: any of apply_lora's own adapter arguments given beside it would be ignored,
    and is refused by name.
    Kills ``apply_lora``: the ``dropout`` / ``use_rslora`` / ``alpha`` entry left out of the check."""
    name = next(iter(given))
    with pytest.raises(TypeError, match=rf"config describes the adapter; {name} given beside it"):
        apply_lora(_gpt2(), config={"target_modules": ["c_attn"]}, **given)


def test_a_config_s_layers_take_the_backend_given():
    """``backend`` is the one argument taken beside a config (how to compute, not what): every layer built has it.
    Kills ``apply_lora``: ``backend`` not passed on to ``apply_config``."""
    model = apply_lora(_gpt2(), config={"target_modules": ["c_attn"]}, backend="reference")
    assert lora_layers(model) and {m.backend for m in lora_layers(model).values()} == {"reference"}


def test_an_unknown_config_field_warns_as_apply_lora():
    """A field lora_fast does not know (a newer PEFT's) is ignored with a warning, in apply_lora's words.
    Kills ``apply_config``: the caught warnings not re-issued."""
    with pytest.warns(UserWarning, match=r"^apply_lora: the config sets fields lora_fast does not know, ignored: "
                                         r"frobnicate=3"):
        apply_lora(_gpt2(), config={"target_modules": ["c_attn"], "r": 2, "frobnicate": 3})


def test_an_adapter_built_from_a_config_saves_peft_s_config(tmp_path):
    """The adapter ``apply_lora(config=...)`` builds saves the config PEFT saves for it: its ``target_modules`` as
    given and its ``task_type`` (here one the model alone would not give).
    Kills ``apply_config``: ``target_modules`` / ``task_type`` not recorded in ``lora_fast_config``."""
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], task_type="FEATURE_EXTRACTION")
    base = _gpt2()
    ours = apply_lora(copy.deepcopy(base), config=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the base's config cannot be read: embeddings not saved
        save_adapter(ours, tmp_path / "ours")
    theirs = _peft(copy.deepcopy(base), cfg)
    theirs.save_pretrained(tmp_path / "theirs")
    mine, ref = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    assert sorted(mine["target_modules"]) == sorted(ref["target_modules"]) == ["c_attn", "c_fc"]
    assert mine["task_type"] == ref["task_type"] == "FEATURE_EXTRACTION"


def test_a_config_s_all_linear_adapts_the_head_for_other_task_types():
    """PEFT leaves a classifier's head out of "all-linear" for task_type SEQ_CLS only: with another task type
    (FEATURE_EXTRACTION) the head is adapted, as get_peft_model does.
    Kills ``_all_linear``: the head left out for any task type."""
    base = _gpt2(cls=transformers.GPT2ForSequenceClassification, pad_token_id=0, num_labels=3)
    cfg = peft.LoraConfig(r=2, target_modules="all-linear", task_type="FEATURE_EXTRACTION")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head is adapted, not trained whole: said
        ours = apply_lora(copy.deepcopy(base), config=cfg)
    theirs = _peft(copy.deepcopy(base), cfg)
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                     if isinstance(getattr(m, "lora_A", None), nn.ModuleDict))
    assert "score" in wrapped and sorted(lora_layers(ours)) == wrapped


# ------------------------------------------------------------------------------------------ mis-shaped adapters
def test_a_wider_model_s_embeddings_are_not_called_another_vocabulary(tmp_path):
    """An adapter of a wider model that carries its full embeddings (saved for a resized vocabulary): their rows
    agree, their width does not, so the error names the other model, never the vocabulary (which resizing the
    embeddings would not fix).
    Kills ``_load_adapter``: the rows-only test (``shape[1:]`` equal) of the resized-vocabulary hint dropped."""
    (tmp_path / "base").mkdir()  # a base of a smaller vocabulary: the embeddings go into the adapter
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 40}))
    wide = apply_lora(_gpt2(n_embd=64), ["c_attn"], rank=2)
    save_adapter(wide, tmp_path / "wide", base_model_name_or_path=str(tmp_path / "base"))
    with pytest.raises(ValueError) as err:
        load_adapter(_gpt2(n_embd=32), tmp_path / "wide")
    msg = str(err.value)
    assert "transformer.wte.weight" in (tmp_path / "wide" / "adapter_model.safetensors").read_bytes().decode("latin-1")
    assert "the adapter was made for another model" in msg
    assert "vocabulary" not in msg


def test_a_few_names_are_listed_without_a_zero_remainder():
    """``_names(keys, limit)``: up to ``limit`` keys are named in full; "... and N more" only when some are left.
    Kills ``_names``: ``len(keys) > limit`` -> ``>=`` ("... and 0 more")."""
    from lora_fast.adapter_config import _names

    assert _names(["a", "b", "c", "d"], 4) == "a, b, c, d"
    assert _names(["a", "b", "c", "d", "e"], 4) == "a, b, c, d ... and 1 more"


# -------------------------------------------------------------------------------------------- staging directories
def _lock_free_staging(parent, name="out"):
    """A staging directory of ``parent / name`` as a killed process of this host leaves it: its lock file names
    this host and nobody holds it."""
    import socket

    from lora_fast.train_io import STAGING_LOCK

    path = parent / f".{name}.staging-killed"
    path.mkdir(parents=True)
    (path / STAGING_LOCK).write_text(socket.gethostname())
    (path / "adapter_model.safetensors").write_text("partial")
    return path


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX: Windows stages without a lock (nothing to test "
                                                "there); runs on Linux/macOS")
def test_a_staging_directory_whose_lock_went_meanwhile_is_left_alone(tmp_path, monkeypatch):
    """``dead_staging``: a staging directory whose lock file was taken out between its opening and its locking (a
    commit under way: the file goes before the rename, and the lock is released after it) is not judged dead:
    nothing is removed, no warning.
    Kills ``dead_staging``: the inode check after the flock dropped."""
    import fcntl

    from lora_fast.train_io import STAGING_LOCK, StagedDir

    committing = _lock_free_staging(tmp_path)
    lock, real = committing / STAGING_LOCK, fcntl.flock
    inode = lock.stat().st_ino

    def flock(fd, op):  # the commit takes the file out and releases its lock just before this cleaner locks it
        if os.fstat(fd).st_ino == inode:
            lock.unlink(missing_ok=True)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StagedDir(tmp_path / "out").discard()
    assert (committing / "adapter_model.safetensors").read_text() == "partial"


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX: Windows stages without a lock (nothing to test "
                                                "there); runs on Linux/macOS")
def test_staging_without_flock_commits_exactly_the_outputs(tmp_path, monkeypatch):
    """Where flock is refused (some network filesystems), a staging directory holds no lock: no lock file is left
    in it, the commit works, and the output holds exactly what was written.
    Kills ``_hold_staging``: the temporary lock file not removed when the flock fails; ``commit``: the lock file
    unlinked whether or not it is held."""
    import errno
    import fcntl

    from lora_fast.train_io import StagedDir

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)
    staged = StagedDir(tmp_path / "out")
    assert list(staged.path.iterdir()) == []
    (staged.path / "adapter_model.safetensors").write_text("weights")
    staged.commit()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adapter_model.safetensors"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"),
                    reason="counts the open descriptors in /proc/self/fd (Linux): runs on Linux CI")
def test_staging_releases_its_lock_descriptor(tmp_path):
    """The staging lock is held for as long as the staging lasts: committed or discarded, its descriptor is closed
    (a sweep or a long training stages many outputs: none is leaked).
    Kills ``StagedDir._release``: the ``os.close`` dropped."""
    from lora_fast.train_io import StagedDir

    before = len(os.listdir("/proc/self/fd"))
    for i in range(3):
        StagedDir(tmp_path / f"gone{i}").discard()
        staged = StagedDir(tmp_path / f"kept{i}")
        (staged.path / "f").write_text("x")
        staged.commit()
    assert len(os.listdir("/proc/self/fd")) == before


# ------------------------------------------------------------------------------------------------------ options
def test_a_dashed_hf_option_name_is_suggested_too(capsys):
    """Suggestions read ``-`` as ``_`` (argparse options are written both ways): ``--learning-rate`` is HF's
    ``--learning_rate``, lora-fast's ``--lr``.
    Kills ``suggestion``: the ``replace("-", "_")`` dropped."""
    from lora_fast.train_args import parse_train_args

    with pytest.raises(SystemExit):
        parse_train_args(["--learning-rate", "0.1"])
    assert "(--learning-rate: did you mean --lr?)" in capsys.readouterr().err


def test_only_unrecognized_arguments_get_suggestions(capsys):
    """``OptionParser.error`` adds suggestions to the "unrecognized arguments" error only: another error (missing
    required options) is argparse's, unchanged.
    Kills ``OptionParser.error``: the ``startswith("unrecognized arguments:")`` test dropped."""
    from lora_fast.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["merge"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.endswith("the following arguments are required: --adapter, --output"), err


def test_a_sweep_config_file_s_misspelt_grid_option_is_suggested(tmp_path):
    """A config file's unknown key is matched against every option the command takes, its own included: a sweep's
    ``rnaks`` is its ``ranks``.
    Kills ``load_yaml``: suggestions drawn from the training options only (``OPTIONS``), not the ``extra`` ones."""
    from lora_fast.train_args import ConfigError, load_yaml

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("rnaks: [4, 8]\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['rnaks'\] \(rnaks: did you mean ranks\?\)"):
        load_yaml(str(cfg), ("ranks", "alphas", "target_sets", "grid"))
