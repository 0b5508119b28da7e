"""``lora-fast`` command line: ``train``, ``sweep`` and ``merge``.

    lora-fast train --max_steps 40 --output_dir outputs/quick       # GPT-2 + LoRA on the embedded corpus
    lora-fast sweep --max_steps 40 --output_dir outputs/sweep       # rank / alpha / target-module experiments
    lora-fast merge --adapter outputs/quick --output outputs/merged # a plain transformers model

Exit status: 0 done, 2 bad input (one line on stderr, nothing written), 130 interrupted (Ctrl-C; ``train`` and
``sweep`` save what was trained before exiting).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

from lora_fast.train_args import ConfigError, OptionParser
from lora_fast.train_io import check_path_encoding
from lora_fast.train_model import (
    LABELLED_TASKS,
    RANDOM_GPT2,
    load_base_model,
    log_stderr,
    pad_with_eos,
    set_special_tokens,
)

USAGE = """usage: lora-fast {train,sweep,merge} ... | --version

  train   LoRA fine-tuning of GPT-2 (causal LM or --task classification); lora-fast train --help
  sweep   rank / alpha / target-module experiments;                         lora-fast sweep --help
  merge   fold an adapter into its base model and save a plain model;      lora-fast merge --help
"""


# PEFT task type -> load_base_model's task (its transformers Auto class); no task type: CAUSAL_LM, as training writes
TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification", "TOKEN_CLS": "token-classification",
         "QUESTION_ANS": "question-answering", "SEQ_2_SEQ_LM": "seq2seq-lm", "FEATURE_EXTRACTION": "feature-extraction"}
HEAD_KEYS = ("{m}.weight", "{m}.out_proj.weight")  # a saved head's output layer: GPT-2/BERT score or classifier,
# RoBERTa-style classifier.out_proj; its first dimension is num_labels


def _pad_for_batches(model, tokenizer, log) -> None:
    """A classifier needs a padding id for batches of several texts (GPT-2 and Llama pool the last non-pad token;
    transformers refuses a batch without one). A PEFT adapter of such a base carries no tokenizer and its base
    none: the merged model had neither, and failed on any batch of two. As training does: the model's pad id for
    the tokenizer where it has one, else EOS (or SEP) for both, said in one line. A negative pad id (Llama-1's
    config holds -1) names no token: it is none (transformers would pool a padded batch's last pad token)."""
    cfg_pad = model.config.pad_token_id
    if isinstance(cfg_pad, int) and cfg_pad < 0:
        cfg_pad = None
    if tokenizer is not None and tokenizer.pad_token_id is None and cfg_pad is not None \
            and cfg_pad < len(tokenizer):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(cfg_pad)
        log(f"lora-fast merge: the tokenizer pads with the model's pad_token_id {cfg_pad} ({tokenizer.pad_token!r})")
    elif cfg_pad is None:
        pad = None
        if tokenizer is not None:
            pad_with_eos(tokenizer)
            pad = tokenizer.pad_token_id
        if pad is None:  # no tokenizer: the model's own EOS, as training pads a tokenizer-less run
            pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else None
        if pad is not None:
            set_special_tokens(model, pad, ("pad_token_id",))
            log(f"lora-fast merge: the classifier had no pad_token_id; it pads with {pad} (EOS, as in training), so "
                "that batches of several texts run")


def _saved_num_labels(adir: Path, cfg: dict) -> int | None:
    """num_labels of a SEQ_CLS adapter from the shape of the head it saved (``modules_to_save``), or None."""
    st = adir / "adapter_model.safetensors"
    if not st.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(st, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception:  # noqa: BLE001  (a corrupt file: load_adapter reports it below)
        return None
    saved = cfg.get("modules_to_save") or []
    heads = [m for m in saved if m.rsplit(".", 1)[-1] in ("classifier", "score")]  # DistilBERT also saves
    found = {shapes[k][0] for m in heads or saved for pattern in HEAD_KEYS  # pre_classifier, (dim, dim)
             if len(shapes.get(k := "base_model.model." + pattern.format(m=m), ())) == 2}
    return found.pop() if len(found) == 1 else None


def _mapped_class(cfg: dict) -> str | None:
    """``class:<Name>`` for the transformers class in the config's ``auto_mapping`` (PEFT's, and lora_fast's, for an
    adapter without a task type); None when there is none or it is not a class transformers exports."""
    import transformers

    mapping = cfg.get("auto_mapping")
    name = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    library = str(mapping.get("parent_library", "")) if isinstance(mapping, dict) else ""
    if isinstance(name, str) and library.split(".")[0] == "transformers" and hasattr(transformers, name):
        return f"class:{name}"
    return None


def _saved_architecture(base: str) -> str | None:
    """``class:<Name>`` for the first ``architectures`` entry of the base model's config (local or cached), when
    transformers exports that class; None otherwise."""
    import transformers

    try:
        archs = transformers.AutoConfig.from_pretrained(base, local_files_only=True).architectures or []
    except Exception:  # noqa: BLE001  (gpt2-random, not cached: the default class is used)
        return None
    return f"class:{archs[0]}" if archs and hasattr(transformers, archs[0]) else None


def _num_labels(adir: Path, cfg: dict, args: dict, num_labels: int | None) -> list[str]:
    """Label names of a classification adapter: training_args.json's, else ``num_labels`` (--num_labels, or the
    saved head's shape) names "0", "1", ...; a disagreement between these sources is an error."""
    saved = _saved_num_labels(adir, cfg)
    names = args.get("label_names")
    for n, source in ((num_labels, "--num_labels"), (len(names) if names else None, "training_args.json")):
        if n is not None and saved is not None and n != saved:
            raise ConfigError(f"{source} gives {n} labels but the classification head saved in {adir} has {saved}")
    if names:
        if num_labels is not None and num_labels != len(names):
            raise ConfigError(f"--num_labels {num_labels} but training_args.json names {len(names)} labels")
        return list(names)
    n = num_labels or saved
    if n is None:
        raise ConfigError(f"cannot tell the number of labels of the classification adapter {adir} (no "
                          "training_args.json, no saved head); pass --num_labels")
    return [str(i) for i in range(n)]


def merge(adapter: str, output: str, model: str | None = None, overwrite: bool = False, log=log_stderr,
          num_labels: int | None = None, seed: int | None = None) -> Path:
    """Load base + adapter, merge ΔW into the base weights, save a plain transformers model (and tokenizer).

    Args:
        adapter: a ``lora-fast train`` output directory, or any PEFT LoRA adapter directory.
        output: directory for ``save_pretrained`` (refused when non-empty unless ``overwrite``).
        model: the base model; default: the adapter's ``base_model_name_or_path`` (``gpt2-random`` is rebuilt from
            the training seed recorded in ``training_args.json``).
        overwrite: replace a non-empty ``output``. Never allowed when ``output`` is the adapter directory, inside
            it, or contains it (the adapter would be deleted).
        num_labels: classes of a SEQ_CLS adapter without ``training_args.json`` (default: the saved head's rows).
        seed: the training seed a ``gpt2-random`` base is rebuilt from, for an adapter without ``training_args.json``
            (the adapter files alone, copied or uploaded): without either the merge is refused — any other seed gives
            other random weights, and a merged model that computes something else than the adapter did.

    Returns:
        The output directory.
    """
    from lora_fast import load_adapter, merge_and_unload
    from lora_fast.train_io import StagedDir, check_output_dir

    adir = Path(adapter).expanduser()
    if not adir.is_dir():
        raise ConfigError(f"--adapter {adapter!r} " + ("is a file; give the directory holding the adapter's files"
                                                        if adir.exists() else "does not exist"))
    cfg_path = adir / "adapter_config.json"
    legacy = not cfg_path.is_file() and (adir / "adapter_model.bin").is_file()
    if not cfg_path.is_file() and not legacy:
        raise ConfigError(f"--adapter {adapter!r} has no adapter_config.json")
    if legacy:  # the tutorials' adapter_model.bin carrying its own config, as load_adapter reads it
        from lora_fast.adapter_files import _read_adapter

        try:
            cfg, cfg_path = _read_adapter(adir)[0], adir / "adapter_model.bin"
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
    try:
        if not legacy:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        recorded = adir / "training_args.json"
        args = json.loads(recorded.read_text(encoding="utf-8")) if recorded.is_file() else {}
    except ValueError as e:
        raise ConfigError(f"--adapter {adapter!r}: unreadable JSON ({e})") from None
    base = model or cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{cfg_path} names no base model; pass --model")
    recorded_base = cfg.get("base_model_name_or_path")
    if model and recorded_base and not _same_model(model, recorded_base):
        log(f"lora-fast merge: --model {model!r} is not the base this adapter records ({recorded_base!r}); merging "
            "into it as if it held the same weights (a copy of that base, say)")
    a_res, o_res = adir.resolve(), Path(output).expanduser().resolve()
    if o_res == a_res or a_res in o_res.parents or o_res in a_res.parents:
        raise ConfigError(f"--output {output!r} and --adapter {adapter!r} overlap (the same directory, or one inside "
                          "the other): writing the merged model there would delete the adapter; choose another "
                          "--output")
    out = check_output_dir(output, overwrite, {"--model": base, "--adapter": adapter}, flag="--output")
    task_type = cfg.get("task_type") or "CAUSAL_LM"
    if task_type not in TASKS:
        raise ConfigError(f"{cfg_path}: task_type {task_type!r} is not one of PEFT's {sorted(TASKS)}")
    # no task type (PEFT's generic adapter): the class the adapter names (auto_mapping, as AutoPeftModel reads it),
    # else the class the base model was saved as, else a causal LM
    task = TASKS[task_type] if cfg.get("task_type") else (_mapped_class(cfg) or _saved_architecture(base)
                                                          or "causal-lm")
    if num_labels is not None and task not in LABELLED_TASKS:
        raise ConfigError(f"--num_labels is for classification (SEQ_CLS, TOKEN_CLS) adapters; {adapter!r} is "
                          f"{task_type}")
    labels = _num_labels(adir, cfg, args, num_labels) if task in LABELLED_TASKS else ["0", "1"]
    # no random stand-in: an adapter recording `gpt2` was trained on its pretrained weights (offline training
    # records gpt2-random), and merging it into random ones would write a wrong model
    base_model, _ = load_base_model(base, task, len(labels), _random_base_seed(base, args, seed, adir), log=log,
                                    random_fallback=False)
    tokenizer = None
    if (adir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adir)
        if args.get("tokenizer_trained"):  # as training set them (lora_fast.train.prepare)
            set_special_tokens(base_model, tokenizer.eos_token_id)  # config and generation_config
    if task in LABELLED_TASKS:
        base_model.config.id2label = dict(enumerate(labels))
        base_model.config.label2id = {n: i for i, n in enumerate(labels)}
        if tokenizer is not None:
            set_special_tokens(base_model, tokenizer.pad_token_id, ("pad_token_id",))
    if tokenizer is None and (Path(base).expanduser() / "tokenizer_config.json").is_file():
        # a PEFT adapter carries no tokenizer: the base's is saved beside the merged model (read after the
        # pad-token step above, so the model's config keeps its own ids)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(base).expanduser())
    if task in LABELLED_TASKS:
        _pad_for_batches(base_model, tokenizer, log)
    emb = base_model.get_input_embeddings()
    if tokenizer is not None and emb is not None and len(tokenizer) > emb.num_embeddings:
        # the merged model would be saved with a tokenizer producing ids its embedding table lacks (an IndexError
        # at the first such token): a --model other than the base the adapter was trained on
        recorded = args.get("base_model") or cfg.get("base_model_name_or_path")
        owner = "the adapter" if (adir / "tokenizer_config.json").is_file() else base
        raise ConfigError(f"the tokenizer saved with the merged model ({owner}'s) has {len(tokenizer)} tokens but "
                          f"{base}'s input embeddings have {emb.num_embeddings} rows, so ids from "
                          f"{emb.num_embeddings} on would fail in the merged model; merge into the base the adapter "
                          "was trained on" + (f" ({recorded})" if recorded and recorded != base else ""))
    try:
        load_adapter(base_model, adir)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    _check_finite_heads(base_model)
    try:  # a diverged LoRA adapter, or W₀+ΔW past an fp16 base's range: refused (naming the layer), never written
        merged = merge_and_unload(base_model, safe_merge=True)
    except ValueError as e:
        raise ConfigError(f"{e}; nothing written") from None
    staged = StagedDir(out, overwrite, command="merge")
    try:
        merged.save_pretrained(staged.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged.path)
        return staged.commit()
    except BaseException:
        staged.discard()
        raise


def _same_model(a: str, b: str) -> bool:
    """Whether two ``--model`` spellings name one model: the same string, or paths to one directory."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _random_base_seed(base: str, args: dict, seed: int | None, adir: Path) -> int:
    """The seed a ``gpt2-random`` base was initialised from: ``--seed``, else training_args.json's; neither (the
    adapter files copied without it) is refused, and so is a ``--seed`` that contradicts the record or that no
    random base reads (both would otherwise merge without a word into other weights, or change nothing)."""
    recorded = args.get("seed")
    if base != RANDOM_GPT2:
        if seed is not None:
            raise ConfigError(f"--seed rebuilds a {RANDOM_GPT2} base; the base here is {base!r}, loaded as saved")
        return 0
    if seed is None and recorded is None:
        raise ConfigError(f"the adapter's base is {RANDOM_GPT2}, GPT-2 randomly initialised from the training seed, "
                          f"which {adir} does not record (no training_args.json): pass that run's --seed, or copy "
                          "its training_args.json beside the adapter")
    if seed is not None and recorded is not None and seed != recorded:
        raise ConfigError(f"--seed {seed} but training_args.json records seed {recorded}, from which the "
                          f"{RANDOM_GPT2} base was initialised")
    return int(recorded if seed is None else seed)


def _check_finite_heads(model) -> None:
    """Refuse an adapter whose modules trained whole (``modules_to_save``, as ``load_adapter`` recorded them) hold
    inf/NaN — a diverged run — naming the first; its LoRA weights are checked by the merge itself (``safe_merge``)."""
    from lora_fast.inject import modules_saved_whole

    for head in modules_saved_whole(model):
        for name, p in model.get_submodule(head).named_parameters():
            if p.is_floating_point() and not p.isfinite().all():
                raise ConfigError(f"the adapter's {head}.{name} has inf/NaN entries (a diverged run?); nothing "
                                  "written")


def _merge_main(argv) -> int:
    p = OptionParser(prog="lora-fast merge", description="Merge a LoRA adapter into its base model")
    p.add_argument("--adapter", required=True, help="adapter directory (a lora-fast train output, or PEFT's)")
    p.add_argument("--output", required=True, help="directory for the merged model")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--num_labels", type=int, help="classes of a classification adapter without training_args.json "
                   "(default: read from the saved head)")
    p.add_argument("--seed", type=int, help=f"the training seed of a {RANDOM_GPT2} base, for an adapter without "
                   "training_args.json (default: read from it)")
    a = p.parse_args(argv)
    try:
        if a.num_labels is not None and a.num_labels < 2:
            raise ConfigError(f"--num_labels must be at least 2, got {a.num_labels}")
        from lora_fast.train import check_one_process

        check_one_process(a, "lora-fast merge", verb="runs")
        check_path_encoding({"--adapter": a.adapter, "--output": a.output, "--model": a.model})
        out = merge(a.adapter, a.output, a.model, a.overwrite, num_labels=a.num_labels, seed=a.seed)
    except ConfigError as e:
        print(f"lora-fast merge: error: {e}", file=sys.stderr)
        return 2
    print(f"Merged model saved in {out} (loads with transformers' from_pretrained, no lora_fast needed)")
    return 0


def console_main() -> None:
    """The ``lora-fast`` script and ``python -m lora_fast``: ``main`` as a process (``run_console``)."""
    sys.exit(run_console(main))


def run_console(entry, argv: list[str] | None = None) -> int:
    """Run a command's ``entry(argv)`` as the whole process; returns its exit status.

    - stdout closed by its reader (``lora-fast sweep ... | head -1``; training's messages go to stderr) ends the
      command quietly with the shell's status for SIGPIPE (141), not a BrokenPipeError traceback; what was written
      stays written. A BrokenPipeError from anything else (stdout still flushes) is raised as it is.
    - A torchrun rank (``WORLD_SIZE`` > 1) leaves by ``os._exit`` once the command is done (``leave_rank``).
    Library callers use ``main`` (or ``lora_fast.train.main``), which return."""
    try:
        status = entry(argv)
    except BrokenPipeError:
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass  # stdout itself is gone
        else:
            raise
        with contextlib.suppress(OSError, AttributeError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)  # Python's own flush of stdout at exit must not raise again
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 141
    from lora_fast.distributed import torchrun_env

    with contextlib.suppress(ConfigError):  # bad torchrun variables: the command has said so already
        if (torchrun_env() or {}).get("world_size", 1) > 1:
            leave_rank(status)
    return status


def leave_rank(status: int) -> None:
    """End a torchrun rank whose command is done (a training run: outputs written and synced, process group
    destroyed) without the interpreter's teardown: there, objects still holding the gloo process group (FSDP's
    device mesh, DTensors) were destroyed after the C++ state their threads use, and the rank aborted ("terminate
    called without an active exception", exit -6) now and then on a loaded CPU machine, so torchrun reported a
    finished run as failed. Logging and the streams are flushed first."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """``lora-fast`` dispatch (train, sweep, merge, --version, --help); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):  # asked for: stdout, 0; no command (an error): stderr, 2
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "--version":
        from lora_fast import __version__

        print(f"lora-fast {__version__}")
        return 0
    if cmd == "train":
        from lora_fast.train import main as train_main

        return train_main(rest)
    if cmd == "sweep":
        from lora_fast.sweep import main as sweep_main

        return sweep_main(rest)
    if cmd == "merge":
        return _merge_main(rest)
    print(f"lora-fast: error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    console_main()
