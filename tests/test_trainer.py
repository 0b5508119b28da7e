"""transformers.Trainer and activation (gradient) checkpointing with a LoRA-injected tiny GPT-2, on CPU.

Checkpointing: ``torch.utils.checkpoint`` stashes the CPU (and input devices') RNG state before the forward and
restores it for the recomputation, so a dropout mask drawn from torch's generator — the reference path's
``torch.rand``, the custom op's and the Triton path's seed drawn with ``torch.randint`` — is drawn again
identically: gradients with checkpointing equal those without, at the same seed.
"""

from __future__ import annotations

import pickle
import traceback
import warnings

import pytest
import torch
import torch.nn as nn
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import lora_fast.layer as layer_mod
from lora_fast import apply_lora, load_adapter, lora_layers, save_adapter
from lora_fast.checkpointing import enable_checkpointing
from lora_fast.ops import lora_linear_op
from tests.triton_interpret import DEVICE as TRITON_DEVICE
from tests.triton_interpret import interpret  # noqa: F401  (fixture)
from tests.utils import assert_rel_close, rel_err

VOCAB = 101


def _config(**kw) -> GPT2Config:
    # GPT-2's own dropouts off: the checkpointing tests are about the LoRA masks alone.
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


def test_trainer_trains_saves_and_reloads(tmp_path):
    """A few Trainer steps update only the adapter; save_adapter/load_adapter restore the same logits."""
    GPT2LMHeadModel(_config()).save_pretrained(tmp_path / "base")  # a "pretrained" base, locally
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    apply_lora(model, target_modules=["c_attn", "c_fc"], rank=4, alpha=8.0, dropout=0.1)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    ids = torch.randint(0, VOCAB, (8, 16))
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, learning_rate=2e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 6
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses  # one batch, seen six times: the loss goes down

    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), f"frozen {n} changed"
    layers = lora_layers(model)
    assert len(layers) == 4 and all(lyr.lora.lora_B.abs().sum() > 0 for lyr in layers.values())

    save_adapter(model, tmp_path / "adapter")
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    load_adapter(fresh, tmp_path / "adapter")
    model.eval(), fresh.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        logits_loaded = fresh(input_ids=ids).logits
        logits_base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")(input_ids=ids).logits
    assert rel_err(logits, logits_base) > 1e-4  # the adapter changes the output...
    assert_rel_close(logits_loaded, logits, 1e-6, "logits after load")  # ...and comes back intact


@pytest.mark.parametrize("targets", [["c_attn", "lm_head"], ["c_attn"]])
def test_trainer_checkpoints_a_model_whose_tied_lm_head_is_a_target_and_resumes(tmp_path, targets):
    """The Trainer's checkpoints are model.save_pretrained, which refused the shared lm_head.linear.weight / wte
    ("shared tensors ... mismatching the transformers base configuration") when the tied lm_head was a LoRA target:
    every run with a LoRA lm_head died at its first save. The checkpoint holds the wte once, and resuming from it
    ends where the uninterrupted run ends."""
    GPT2LMHeadModel(_config()).save_pretrained(tmp_path / "base")
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]

    def run(out, max_steps, resume=None):
        torch.manual_seed(0)
        model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # apply_lora's warning that lm_head is tied
            apply_lora(model, target_modules=targets, rank=4, alpha=8.0)
        args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                                 learning_rate=2e-2, use_cpu=True, report_to=[], save_steps=2, logging_strategy="no",
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0)
        Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full", 4)
    assert full.lm_head.weight is full.transformer.wte.weight if "lm_head" not in targets else \
        full.lm_head.linear.weight is full.transformer.wte.weight  # still tied, as transformers has it
    try:
        resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "full" / "checkpoint-2"))  # its own save
    except pickle.UnpicklingError as e:  # transformers 4.46's Trainer, torch >= 2.6: without lora_fast too
        if "rng" not in "".join(traceback.format_tb(e.__traceback__)):
            raise
        pytest.skip(f"transformers {transformers.__version__}'s Trainer cannot read its own rng_state.pth under "
                    f"torch {torch.__version__} (weights_only), with or without LoRA; the checkpointing part ran, and "
                    "the resume runs on the CI's transformers 5 and 4.57")
    want = {n: p.detach() for n, p in full.named_parameters() if p.requires_grad}
    assert len(want) == 2 * len(targets) * 2 - ("lm_head" in targets) * 2
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), want[n], rtol=1e-5, atol=1e-7, msg=n)


def _lora_grads(model, ids, seed):
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss.backward()  # not autograd.grad: reentrant checkpointing supports only .backward()
    return [loss.detach(), *(p.grad.clone() for p in params)]


def _checkpointing_matches(path: str, use_reentrant: bool, device: str, targets, train_bias: bool = False) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config()).to(device)
    apply_lora(model, target_modules=targets, rank=4, alpha=8.0, dropout=0.3, backend=path)
    for lyr in lora_layers(model).values():
        nn.init.normal_(lyr.lora.lora_B, std=0.1)  # B = 0 at init would make every A gradient zero
        lyr.linear.bias.requires_grad_(train_bias)  # PEFT's bias="lora_only": the base bias trains too
    model.train()
    ids = torch.randint(0, VOCAB, (2, 12), device=device)

    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in lora_layers(model).values()]
    plain = _lora_grads(model, ids, seed=7)
    n_plain = len(calls)
    enable_checkpointing(model, use_reentrant)
    ckpt = _lora_grads(model, ids, seed=7)
    # Recomputation re-runs LoRA layers (non-reentrant checkpointing stops early, after the last saved tensor).
    assert len(calls) - n_plain > n_plain, "checkpointing did not recompute the LoRA layers"
    for h in handles:
        h.remove()
    other = _lora_grads(model, ids, seed=8)

    for i, (g, g_ref) in enumerate(zip(ckpt, plain, strict=True)):
        assert_rel_close(g, g_ref, 1e-6, "loss" if i == 0 else f"LoRA grad {i}")  # same ops, same masks
    assert max(rel_err(g, g_ref) for g, g_ref in zip(other[1:], plain[1:], strict=True)) > 1e-3  # masks matter


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("path", ["reference", "op"])
def test_checkpointing_regenerates_dropout_masks(path, use_reentrant, monkeypatch):
    """Reference backend (the real module path) and the torch.library op (what torch.compile runs), on CPU."""
    if path == "op":
        monkeypatch.setattr(layer_mod, "lora_linear", lambda *a, backend=None, **k: lora_linear_op(*a, **k))
    _checkpointing_matches("reference", use_reentrant, "cpu", ["c_attn", "c_proj", "c_fc"])


@pytest.mark.usefixtures("interpret")
def test_checkpointing_regenerates_dropout_masks_triton():
    """The Triton path (interpreter on CPU, real kernels with a GPU): the seed tensor is drawn again on recompute."""
    _checkpointing_matches("triton", False, TRITON_DEVICE, ["c_attn"])


@pytest.mark.usefixtures("interpret")
def test_reentrant_checkpointing_with_a_trainable_base_bias():
    """A trainable base bias sends a layer with dropout to the reference path in grad mode and under reentrant
    checkpointing's no-grad forward alike, so the recompute draws the forward's mask and the gradients (bias
    included) equal the run without checkpointing. They differed by 40–90 % when the no-grad forward took the fused
    kernels (Philox mask from a drawn seed) and the recompute the reference path (torch.rand mask)."""
    _checkpointing_matches("auto", True, TRITON_DEVICE, ["c_attn"], train_bias=True)
