"""adapter_config.json (``lora_fast.adapter_config``): the modules a PEFT config selects are the ones PEFT wraps
(``layers_to_transform``, ``modules_to_save``, "all-linear"), configs lora_fast cannot honour are refused before the
model changes, and the fields written are PEFT's, JSON types included."""

# ruff: noqa: I001  (tests.triton_interpret is imported first, see test_adapter.py)
from __future__ import annotations

try:
    import tests.triton_interpret  # noqa: F401
except ImportError:  # triton missing
    pass

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

from lora_fast import apply_lora, load_adapter, lora_layers, save_adapter
from lora_fast.adapter_config import _MAX_NAMED, _names, _peft_targets
from tests.utils import MISSING

peft = pytest.importorskip("peft", reason=MISSING["peft"])
pytest.importorskip("transformers", reason=MISSING["transformers"])
from peft import LoraConfig, get_peft_model  # noqa: E402
from tests.test_adapter import _gpt2, _ids, _llama, _logits, _peft_model, _randomise_lora, _roberta_cls  # noqa: E402


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _Tiny(nn.Module):
    """``proj`` Linears in three places: ``encoder.layers.N.proj`` (a layer list PEFT indexes), ``blocks.N.proj``
    (a list at the top level: PEFT's default index rule wants a segment before it, so it finds no index there) and
    ``pool.proj`` (in no list)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.pool = _Block()


def _peft_wraps(model: nn.Module, **config) -> list[str]:
    """The module names PEFT's get_peft_model gives a LoRA layer for this LoraConfig."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, **config))
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.layer.LoraLayer))


@pytest.mark.parametrize("config", [
    {"target_modules": ["proj"], "layers_to_transform": [0, 2]},
    {"target_modules": ["proj"], "layers_to_transform": 1},  # an int: that one layer
    {"target_modules": ["proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["proj"], "modules_to_save": ["encoder.layers.1.proj"]},  # saved whole, never a LoRA target
], ids=["list", "int", "pattern", "modules_to_save"])
def test_selected_modules_are_the_ones_peft_wraps(config):
    model = _Tiny()
    assert sorted(_peft_targets(model, config)) == _peft_wraps(model, **config)


@pytest.mark.parametrize("arch", ["llama", "roberta_cls"])
def test_all_linear_selects_what_peft_selects(arch, tmp_path):
    """target_modules "all-linear" in a config file: every Linear but the output layer (Llama's lm_head) and, for
    sequence classification, the head with the Linears inside it (RoBERTa's classifier.dense/.out_proj), as PEFT;
    an adapter saved with those modules loads under that config."""
    torch.manual_seed(0)
    base, task = (_llama(), "CAUSAL_LM") if arch == "llama" else (_roberta_cls(), "SEQ_CLS")
    theirs = _peft_wraps(base, target_modules="all-linear", task_type=task)
    assert sorted(_peft_targets(base, {"target_modules": "all-linear", "task_type": task})) == theirs
    if arch == "llama":
        model = apply_lora(copy.deepcopy(base), "all-linear", rank=2)
        save_adapter(model, tmp_path)
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg["target_modules"] = "all-linear"  # as a hand-written config says it
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        fresh = copy.deepcopy(base)
        load_adapter(fresh, tmp_path)
        assert sorted(lora_layers(fresh)) == theirs and "lm_head" not in theirs


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_adapter(apply_lora(_Tiny(), ["proj"], rank=2, alpha=4), directory)
    return directory


@pytest.mark.parametrize("field, value", [
    ("bias", "all"),  # PEFT then saves trained base biases: added to nothing here, the outputs would differ
    ("bias", "lora_only"),
    ("lora_alpha", 0),
    ("lora_alpha", float("inf")),
    ("lora_alpha", True),  # a bool is not a number of PEFT's config (JSON true)
    ("r", True),
    ("lora_dropout", 1.0),
    ("init_lora_weights", "PiSSA"),  # base-modifying initialisations whatever their case
    ("init_lora_weights", "OLoRA"),
    ("use_rslora", "false"),  # a true string: α/√r in place of α/r
    ("peft_type", "lora"),  # PEFT's loader knows 'LORA' only
    ("peft_type", "IA3"),
])
def test_configs_lora_fast_cannot_honour_are_refused_before_the_model_changes(tiny_adapter, tmp_path, field, value):
    directory = tmp_path / "edited"
    directory.mkdir()
    for f in tiny_adapter.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    cfg[field] = value
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    model = _Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"load_adapter: .*adapter_config.json.*{field}"):
        load_adapter(model, directory)
    assert not lora_layers(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fields_of_a_newer_peft_are_named_in_a_warning(tiny_adapter, tmp_path):
    """A config field lora_fast does not know (a newer PEFT's variant flag) was ignored without a word; PEFT warns of
    keyword arguments its LoraConfig lacks. Now a warning names each set one with its value and the PEFT version
    (unset ones, null or false — a newer PEFT's defaults — say nothing); the adapter still loads."""
    directory = tmp_path / "newer"
    directory.mkdir()
    for f in tiny_adapter.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    cfg.update(use_future_variant=True, future_config=None, future_flag=False, peft_version="0.99.0")
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    model = _Tiny()
    with pytest.warns(UserWarning, match=r"\(written by PEFT 0\.99\.0\) sets fields lora_fast does not know, "
                                         r"ignored: use_future_variant=True\. If one changes") as caught:
        load_adapter(model, directory)
    assert not any("future_config" in str(w.message) or "future_flag" in str(w.message) for w in caught)
    assert lora_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lora_fast's own file: every field known
        load_adapter(_Tiny(), tiny_adapter)


@pytest.mark.parametrize("edit, says", [
    ({"target_modules": r".*\.proj", "layers_to_transform": [0]}, "layers_to_transform cannot be used when"),
    ({"target_modules": "all-linear", "layers_to_transform": 1}, "layers_to_transform cannot be used when"),
    ({"target_modules": r".*\.proj", "layers_to_transform": [0], "layers_pattern": "layers"},
     "layers_to_transform and layers_pattern cannot"),
    ({"target_modules": ["proj"], "layers_pattern": "layers"}, "layers_pattern 'layers' needs layers_to_transform"),
])
def test_layer_selection_peft_refuses_is_refused_not_ignored(tiny_adapter, tmp_path, edit, says):
    """Combinations PEFT's LoraConfig refuses: a string target_modules with a layer selection, a layer pattern with
    no indices. Ignoring the layer fields would wrap other modules than the config says."""
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    cfg.update(edit)
    peft_fields = {k: v for k, v in cfg.items() if k in ("target_modules", "layers_to_transform", "layers_pattern")}
    with pytest.raises(ValueError):  # PEFT refuses it too
        LoraConfig(r=2, **peft_fields)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").write_bytes((tiny_adapter / "adapter_model.safetensors").read_bytes())
    model = _Tiny()
    with pytest.raises(ValueError, match=says):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)


def test_alphas_are_written_as_peft_writes_them(tmp_path):
    """Integral alphas are JSON integers as in PEFT's file (``LoraConfig.lora_alpha`` is an int field), others stay
    floats; no modules_to_save is null, as PEFT writes it."""
    torch.manual_seed(0)
    base = _llama()
    pm = _peft_model(copy.deepcopy(base), ["q_proj", "v_proj"], alpha_pattern={"v_proj": 3})
    pm.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    model = apply_lora(copy.deepcopy(base), ["q_proj"], rank=4, alpha=8)
    apply_lora(model, ["v_proj"], rank=4, alpha=3)
    save_adapter(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    def written(cfg):  # the alphas of the file as JSON text (which one is the default and which a pattern differs)
        return {json.dumps(v) for v in (cfg["lora_alpha"], *cfg["alpha_pattern"].values())}

    assert written(ours) == written(theirs) == {"3", "8"}
    assert ours["modules_to_save"] is None is theirs["modules_to_save"]
    apply_lora(model, ["k_proj"], rank=4, alpha=2.5)  # a fractional alpha stays what it is
    save_adapter(model, tmp_path / "fractional")
    assert written(json.loads((tmp_path / "fractional" / "adapter_config.json").read_text())) == {"2.5", "3", "8"}


# The fields of peft 0.13.2's LoraConfig and PeftConfig (read from that release's peft/tuners/lora/config.py and
# peft/config.py): its LoraConfig(**json) raises TypeError on any other key, so a file for PEFT users on older
# releases holds none (lora_bias, for one, came in 0.14) — but ensure_weight_tying, written only when a saved
# module is tied to one outside it, which older PEFT could not honour anyway.
PEFT_0_13_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern",
    "revision", "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
}


def test_the_written_config_has_only_fields_older_peft_knows(tmp_path):
    """An adapter saved by lora_fast loads in PEFT releases back to 0.13 (whose LoraConfig refused the unknown
    ``lora_bias`` key we used to write, at its default False) — and still in this PEFT, with the same outputs."""
    torch.manual_seed(0)
    base = _llama()
    model = apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], rank=4, alpha=8, use_rslora=True)
    for m in lora_layers(model).values():
        nn.init.normal_(m.lora.lora_B, std=0.1)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(cfg) <= PEFT_0_13_FIELDS, set(cfg) - PEFT_0_13_FIELDS
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("n", [1, _MAX_NAMED - 1, _MAX_NAMED, _MAX_NAMED + 1, 3 * _MAX_NAMED])
def test_error_messages_name_every_key_or_count_the_rest(n):
    """Up to _MAX_NAMED keys are all listed; past it, the first _MAX_NAMED are listed and the rest counted exactly."""
    keys = [f"layer{i}" for i in range(n)]
    listed, _, more = _names(keys).partition(" ... and ")
    assert listed.split(", ") == keys[:_MAX_NAMED]
    assert more == ("" if n <= _MAX_NAMED else f"{n - _MAX_NAMED} more")


def test_a_peft_layer_left_in_the_model_is_named_as_such(tiny_adapter):
    """PEFT's LoRA layers left in a model without its peft_config (transformers' delete_adapter leaves them): the
    refusal said "target is a Linear; lora_fast supports nn.Linear" — now the class's full name, and what to do."""
    model = get_peft_model(_Tiny(), LoraConfig(r=2, target_modules=["proj"])).base_model.model
    for holder in (model, *model.modules()):
        holder.__dict__.pop("peft_config", None)
    with pytest.raises(ValueError, match=r"is a peft\.tuners\.lora\.layer\.Linear; .*a PEFT layer left in the model"):
        load_adapter(model, tiny_adapter)


@pytest.mark.parametrize("ours, peft_name", [("rank", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")])
def test_lora_fast_names_in_adapter_config_json_are_refused(tmp_path, ours, peft_name):
    """rank/alpha/dropout (model.lora_fast_config's names) are read in a legacy .bin's embedded config only. In
    adapter_config.json PEFT ignores them and takes its defaults (r 8, lora_alpha 8, lora_dropout 0.0): reading them
    there made lora_fast and PEFT load different adapters from one directory (alpha 16 here, 8 in PEFT). Refused,
    naming the field, the file and PEFT's name for it; no lora_fast release wrote these names into the JSON."""
    base = _gpt2()
    model = apply_lora(copy.deepcopy(base), ["c_attn"], rank=4, alpha=16, dropout=0.1)
    _randomise_lora(model)
    save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    value = cfg[ours] = cfg.pop(peft_name)
    cfg_path.write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Unexpected keyword arguments [...] these are ignored"
        assert getattr(LoraConfig.from_pretrained(tmp_path), peft_name) != value  # PEFT reads another adapter
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=rf"load_adapter: .*adapter_config.json sets {ours}={value!r}, lora_fast's "
                                         rf"name\(s\) for {peft_name}; PEFT reads r / lora_alpha / lora_dropout"):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh)


def test_with_both_names_in_the_json_peft_s_is_read_as_peft_reads_it(tmp_path):
    """A JSON config holding PEFT's lora_alpha and also lora_fast's alpha is read as PEFT reads it (lora_alpha; the
    other is named in the unknown-field warning, as PEFT warns of it): both load the same adapter, so it loads."""
    from peft import PeftModel

    base = _gpt2()
    model = apply_lora(copy.deepcopy(base), ["c_attn"], rank=4, alpha=16)
    _randomise_lora(model)
    save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "alpha": 64}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    fresh = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="sets fields lora_fast does not know, ignored: alpha=64"):
        load_adapter(fresh, tmp_path)
    ids = _ids()
    torch.testing.assert_close(_logits(fresh, ids), _logits(theirs, ids))
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids))
