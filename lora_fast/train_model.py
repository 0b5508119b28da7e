"""Base model and tokenizer for ``lora-fast train``: local directory, hub name, or GPT-2 124M at random.

``--model`` resolution, in order:
    ``gpt2-random``          GPT-2 124M (``GPT2Config()``), randomly initialised from ``--seed``.
    an existing path         must be a saved transformers model (``config.json``); anything else is an error.
    a path-like missing name (``./x``, ``/x``, ``~/x``)  an error: the directory does not exist.
    a hub name               the Hugging Face cache first (no network), then the hub.
Offline: when the name is not cached and the hub cannot be reached (``HF_HUB_OFFLINE=1``, or a 3-second TCP probe
of the endpoint fails — this avoids huggingface_hub's ~25 s of retries), the default ``gpt2`` continues with the
random 124M model after one line saying so; any other name is an error. A name the reachable hub does not know
(a misspelling) is always an error, never a fallback.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch

from lora_fast.train_args import ConfigError, env_true

RANDOM_GPT2 = "gpt2-random"
FALLBACK_NAMES = ("gpt2", "openai-community/gpt2")  # names whose architecture GPT2Config() reproduces
PROBE_TIMEOUT_S = 3.0  # long enough for a slow network, far below huggingface_hub's retry loop
# any of these in a model directory means it has a tokenizer (one that must load, not be replaced by a trained BPE):
# fast and slow BPE/WordPiece files, sentencepiece models (Llama/Mistral, T5/ALBERT, XLM-R/CamemBERT), configs
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")


def hub_offline_flag() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    env = env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE")
    try:
        from huggingface_hub import constants

        return env or bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return env


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face endpoint (or its proxy, when one is set) accepts a TCP connection within
    ``timeout`` seconds, name resolution included. ``HF_ENDPOINT`` overrides the endpoint, as in huggingface_hub.
    The proxy is the one huggingface_hub's HTTP client (httpx; requests before it) would take: urllib's reading
    of ``https_proxy``/``HTTPS_PROXY`` (lower case first), else ``all_proxy``, unless ``no_proxy`` names the host
    (a local mirror reached directly while a proxy serves the rest)."""
    if hub_offline_flag():
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(url.hostname or "", proxies):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")  # the hub is reachable when the proxy is
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])


@contextlib.contextmanager
def _offline(on: bool):
    """Force huggingface_hub's offline mode for a block. transformers' PEFT-adapter lookup inside
    ``from_pretrained`` ignores ``local_files_only`` and would otherwise spend ~25 s retrying an unreachable hub."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# load_base_model's tasks: the training CLI's two, and the rest of PEFT's task types for `lora-fast merge`.
MODEL_CLASSES = {"causal-lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
                 "token-classification": "AutoModelForTokenClassification",
                 "question-answering": "AutoModelForQuestionAnswering", "seq2seq-lm": "AutoModelForSeq2SeqLM",
                 "feature-extraction": "AutoModel"}
LABELLED_TASKS = ("classification", "token-classification")  # heads with num_labels outputs


def _model_class(task: str):
    """The transformers class for ``task``: a MODEL_CLASSES key, or ``class:<Name>`` (a class transformers
    exports, e.g. a base config's ``architectures`` entry)."""
    import transformers

    return getattr(transformers, task.removeprefix("class:") if task.startswith("class:") else MODEL_CLASSES[task])


def random_gpt2(task: str = "causal-lm", num_labels: int = 2, seed: int = 0, vocab_size: int | None = None):
    """GPT-2 124M with random weights drawn from ``seed`` (the same seed gives the same base model)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(num_labels=num_labels) if vocab_size is None else \
        GPT2Config(num_labels=num_labels, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = GPT2ForSequenceClassification if task == "classification" else GPT2LMHeadModel
        return cls(config)


def _in_dtype(model, dtype):
    """A randomly initialised model in ``dtype`` (None: as built, fp32) — what ``from_pretrained(dtype=...)`` gives
    a checkpoint (``--base_dtype bfloat16`` with ``gpt2-random`` used to stay fp32 without a word)."""
    return model if dtype is None else model.to(dtype)


def _dtype_keyword() -> str:
    """``from_pretrained``'s name for the dtype: ``dtype`` from transformers 4.56 (5 warns on the old name),
    ``torch_dtype`` before (an unknown ``dtype`` went on to the model's constructor and failed there)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_not_found(e: BaseException) -> bool:
    from huggingface_hub.errors import RepositoryNotFoundError

    while e is not None:
        if isinstance(e, RepositoryNotFoundError) or "is not a valid model identifier" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def load_base_model(name: str, task: str = "causal-lm", num_labels: int = 2, seed: int = 0,
                    cache_dir: str | None = None, log=print, random_fallback: bool = True,
                    dtype: torch.dtype | None = None):
    """Load the base model named by ``--model``.

    Args:
        name: local directory, hub name, or ``gpt2-random``.
        task: ``causal-lm`` or ``classification`` (adds a ``num_labels`` sequence-classification head).
        seed: seed of the random initialisation (``gpt2-random`` and the offline fallback).
        cache_dir: Hugging Face cache to look in (default: the usual one).
        random_fallback: whether ``gpt2`` (``FALLBACK_NAMES``) may fall back to random weights offline (training
            may; merging an adapter trained on the pretrained weights must not).
        log: where the one-line offline notice goes.
        dtype: the dtype to load in (random weights too); None keeps the checkpoint's (transformers 5's
            ``dtype="auto"``; fp32 for random weights). Training
            passes float32, as transformers 4 loaded by default: a head trained whole in a 16-bit checkpoint's
            dtype is updated by AdamW in fp16/bf16 (its eps rounds to 0: NaN from the second step), and
            ``--fp16``/``--bf16`` mixed precision expects fp32 parameters.

    Returns:
        (model, resolved name): the resolved name is what ``adapter_config.json`` records as the base model.

    Raises:
        ConfigError: a missing or broken local directory, a name unknown to the hub, or offline with no cache.
    """
    cls = _model_class(task)
    kw = {"num_labels": num_labels} if task in LABELLED_TASKS else {}
    if dtype is not None:
        kw[_dtype_keyword()] = dtype
    if name == RANDOM_GPT2:
        if task not in ("causal-lm", "classification"):
            raise ConfigError(f"{RANDOM_GPT2} is a causal-LM or sequence-classification GPT-2, not a {task} model")
        return _in_dtype(random_gpt2(task, num_labels, seed), dtype), RANDOM_GPT2
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(f"--model {name!r} is not a saved transformers model directory (no config.json)")
        _refuse_encoder(task, name, path)
        try:
            return cls.from_pretrained(path, **kw), str(path.resolve())
        except Exception as e:  # noqa: BLE001  (broken weights raise OSError, ValueError, RuntimeError, ...)
            hint = (f" (its saved head has another number of labels than the {num_labels} asked for)"
                    if "ignore_mismatched_sizes" in str(e) else "")
            raise ConfigError(f"could not load the model in {name!r}{hint}: {_first_line(e)}") from None
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ConfigError(f"model directory {name!r} does not exist")
    reachable = hub_reachable()
    with _offline(not reachable):  # outside the try below: its refusal must not read as "not cached"
        _refuse_encoder(task, name, name, local_files_only=True, cache_dir=cache_dir)
    try:  # the cache first
        with _offline(not reachable):
            return cls.from_pretrained(name, local_files_only=True, cache_dir=cache_dir, **kw,
                                       adapter_kwargs={"local_files_only": True, "cache_dir": cache_dir}), name
    except Exception:  # noqa: BLE001  (not cached; decided below)
        pass
    if reachable:
        _refuse_encoder(task, name, name, cache_dir=cache_dir)
        try:
            return cls.from_pretrained(name, cache_dir=cache_dir, **kw), name
        except Exception as e:  # noqa: BLE001
            if _is_not_found(e):
                raise ConfigError(f"--model {name!r}: no such local directory and no such model on the Hugging "
                                  "Face hub (misspelt?)") from None
            offline_reason = _first_line(e)
    else:
        offline_reason = "HF_HUB_OFFLINE is set" if hub_offline_flag() else "the hub is unreachable"
    if name in FALLBACK_NAMES and random_fallback:
        log(f"lora-fast: cannot load {name!r} ({offline_reason}, not cached): continuing with the GPT-2 124M "
            f"architecture randomly initialised (same as --model {RANDOM_GPT2})")
        return _in_dtype(random_gpt2(task, num_labels, seed), dtype), RANDOM_GPT2
    raise ConfigError(f"--model {name!r} is not a local directory and not in the Hugging Face cache, and it cannot "
                      f"be downloaded ({offline_reason})")


# Encoders whose causal-LM class attends both ways unless the config says is_decoder (BertLMHeadModel, ...)
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie",
                           "bert-generation", "data2vec-text", "roformer", "roberta-prelayernorm", "megatron-bert",
                           "xmod", "rembert", "big_bird", "roc_bert"})
# Models whose positions start after the padding index (RoBERTa's create_position_ids_from_input_ids): of
# max_position_embeddings, pad_token_id + 1 are never a token's position (roberta-base: 514 → 512 tokens)
PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                                      "roberta-prelayernorm", "data2vec-text", "ibert", "xmod", "luke", "esm",
                                      "markuplm", "layoutlmv3", "lilt"})


def _refuse_encoder(task: str, name: str, source, **kw) -> None:
    """``check_causal`` on the config alone, before the weights load: transformers' load report of an encoder's
    missing LM head (~20 lines) buried the one line that says why it is refused. A config that does not load is
    left to the model's loading, which names the problem."""
    if task != "causal-lm":
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **kw)
    except Exception:  # noqa: BLE001
        return
    check_causal(config, name)


def check_causal(model, name: str) -> None:
    """Refuse an encoder loaded as a causal LM without ``is_decoder``: each position would attend to the token it
    is scored on, and the loss and perplexity would not be next-token prediction (transformers only warns).
    ``model``: the model, or its config (checked before the weights load)."""
    cfg = getattr(model, "config", model)
    kind = getattr(cfg, "model_type", None)
    bidirectional = (kind in ENCODER_TYPES and not getattr(cfg, "is_decoder", False)) or kind == "xlnet" or (
        kind == "xlm" and not getattr(cfg, "causal", False))  # XLNet permutes; XLM's own flag is `causal`
    if bidirectional:
        raise ConfigError(f"--model {name!r} is an encoder ({kind}, not a causal decoder): as a causal LM every "
                          "position would see the token it predicts. Use a decoder model (GPT-2, Llama, ...) or a "
                          "checkpoint saved with is_decoder true (to classify with it: lora-fast train --task "
                          "classification)")


def position_limit(cfg) -> int | None:
    """The longest input the model's position embeddings take (None: no learned limit)."""
    n_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    kind = getattr(cfg, "model_type", None)
    if n_pos is not None and kind in PADDING_OFFSET_POSITIONS:
        n_pos -= (getattr(cfg, "pad_token_id", None) or 0) + 1
    elif n_pos is not None and kind == "mpnet":  # its padding index is 1 whatever the config's pad id
        n_pos -= 2
    return n_pos


def load_tokenizer(name: str):
    """The model's own tokenizer (local files, or the cache for a hub name), or None when it has none.

    Raises:
        ConfigError: a local model directory holds tokenizer files (``TOKENIZER_FILES``) that do not load (a
            truncated file, sentencepiece not installed): training a new tokenizer there would feed the
            pretrained embeddings ids that mean nothing to them.
    """
    from transformers import AutoTokenizer

    if name == RANDOM_GPT2:
        return None
    path = Path(name)
    if path.is_dir():
        present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
        if not present:
            return None
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as e:  # noqa: BLE001  (a broken file, a missing library)
            hint = ("; `pip install sentencepiece` reads .model files" if any(f.endswith(".model") for f in present)
                    else "")
            raise ConfigError(f"the tokenizer in {name!r} ({', '.join(present)}) does not load: {_first_line(e)}"
                              f"{hint}") from None
    else:
        tok = None
        reachable = hub_reachable()
        for local_only in (True, False):
            if not local_only and not reachable:
                break
            try:
                with _offline(not reachable):
                    tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
                break
            except Exception:  # noqa: BLE001  (a hub model without a tokenizer: we train one, and say so)
                continue
    if tok is None:
        return None
    if len(tok.get_vocab()) <= len(set(tok.all_special_tokens)):  # a config without its vocabulary file
        raise ConfigError(f"the tokenizer of {name!r} has no vocabulary beyond its special tokens "
                          f"({len(tok.get_vocab())} tokens): every text would encode to nothing")
    pad_with_eos(tok)  # None when neither: refused by prepare
    return tok


def pad_with_eos(tok) -> None:
    """A tokenizer without a pad token pads with its EOS, else its SEP (GPT-2's and Llama's have none; training
    and merge alike); unchanged when it has one, or neither."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.sep_token


class Unfailing:
    """A stream (stderr) whose write errors are dropped: a progress or warning line that cannot be written (stderr
    a closed pipe, a full disk; ValueError: closed) must never end a training run. Also the progress bar's stream:
    tqdm swallows only EIO, so a BrokenPipeError from a redraw ended the run."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self):
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: tqdm sizes and formats the bar with them
        return getattr(self._stream, name)


def log_stderr(msg: str) -> None:
    """A progress or warning line on stderr (``Unfailing``)."""
    print(msg, file=Unfailing(sys.stderr), flush=True)


def set_special_tokens(model, token_id: int, keys=("eos_token_id", "bos_token_id", "pad_token_id")) -> None:
    """Set ``keys`` to ``token_id`` on ``model.config`` and on its ``generation_config`` (when it has one): a saved
    model must not keep GPT-2's id 50256 in ``generation_config.json`` when its tokenizer has 9k tokens."""
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            for key in keys:
                setattr(cfg, key, token_id)


def resolve_device(name: str) -> torch.device:
    """``--device``: auto (cuda when available), cpu, cuda, cuda:N; an unavailable device is a ``ConfigError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r} (lora-fast trains on CPU or CUDA)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def check_tf32(flag: bool | None, device: torch.device) -> None:
    """``--tf32`` where the device has TF32 (a CUDA GPU of compute capability 8.0 or newer), else a ``ConfigError``
    naming why; called before the minutes of loading too."""
    if not flag:
        return
    if device.type != "cuda":
        raise ConfigError(f"--tf32 needs a CUDA GPU (TF32 is an NVIDIA tensor-core format, Ampere or newer); "
                          f"this run is on {device}")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ConfigError(f"--tf32 needs an Ampere or newer GPU (compute capability 8.0+); "
                          f"{torch.cuda.get_device_name(device)} is {major}.{minor}")


@contextlib.contextmanager
def tf32_matmuls(flag: bool | None, device: torch.device):
    """``--tf32`` / ``--no-tf32``: the run's fp32 matmuls on TF32 tensor cores, or in IEEE fp32, torch's setting
    restored afterwards (a sweep runs several trainings in one process); None leaves torch's setting alone (off by
    default). The same switch as ``torch.backends.cuda.matmul``'s, so the LoRA kernels follow it too (their TF32
    route: ``lora_fast/kernels/dots.py``); autocast's bf16/fp16 matmuls are unaffected. TF32 asked for where there
    is none is an error, never a silent no-op: it needs a CUDA GPU of compute capability 8.0 or newer (Ampere)."""
    if flag is None:
        yield
        return
    check_tf32(flag, device)
    from lora_fast.kernels.launch import matmul_tf32  # torch only (triton is imported by the kernel modules)

    with matmul_tf32(flag):
        yield


def backend_used(backend: str, model, device: torch.device, amp_dtype) -> str:
    """Which LoRA path the injected layers will take ("reference" or "triton"), probed with an input in the dtype
    the layers compute in (the autocast dtype under --fp16/--bf16); ``--backend triton`` that cannot run here is
    a ``ConfigError``."""
    from lora_fast import lora_layers
    from lora_fast.functional import triton_unsupported_reason

    if backend == "reference":
        return "reference"
    layer = next(iter(lora_layers(model).values()))
    x = torch.zeros(1, layer.in_features, device=device, dtype=amp_dtype or layer.linear.weight.dtype)  # (1, K)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        reason = triton_unsupported_reason(x, layer.linear.weight, layer.lora.lora_A, dropout_p=layer.lora.dropout)
    if reason is None and not layer.fusable():
        reason = "the base module does more than nn.Linear/Conv1D's forward (hooks, a subclass, offloading)"
    if reason is not None and backend == "triton":
        raise ConfigError(f"--backend triton cannot run here: {reason}")
    return "reference" if reason else "triton"


def _n_targets(out, batch) -> int:
    """How many targets the batch's mean loss averages over: B for classification; for a causal LM the labels
    that count after the model's one-token shift (ignore index -100 excluded)."""
    labels = batch["labels"]
    if out.logits.dim() == 2:  # (B, n_labels)
        return labels.numel()
    return int((labels[..., 1:] != -100).sum())


@torch.no_grad()
def evaluate(model, loader, device, amp, max_batches=None, ctx=None) -> dict:
    """Loss (causal LM: perplexity too) and, with class labels, accuracy over ``loader``.

    The loss is the mean over every target of the split (each token, or each example), not a mean of batch means:
    a batch's mean loss is weighted by its target count, so an uneven last batch counts for what it holds.
    With several ranks (``ctx``), rank k evaluates batches k, k+W, ... and the sums (loss × count, count, correct,
    seen) are all-reduced: the result is the one-process result. Under FSDP every forward is a collective, so ranks
    with one batch fewer run one more forward on a batch they already saw and discard it (lockstep).
    """
    from lora_fast.distributed import DistContext

    ctx = ctx or DistContext()
    # the global RNG is left as it was: iterating a DataLoader draws its base seed from it, which would otherwise
    # shift every later dropout mask, so that --eval_steps changed the trained adapter
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        return _evaluate(model, loader, device, amp, max_batches, ctx)


def _evaluate(model, loader, device, amp, max_batches, ctx) -> dict:
    from lora_fast.distributed import all_reduce_sum

    was_training = model.training
    model.eval()
    loss_sum, n_targets, correct, seen = 0.0, 0, 0, 0
    n_total = len(loader) if max_batches is None else min(len(loader), max_batches)
    n_forwards = -(-n_total // ctx.world_size) if ctx.mode == "fsdp" else 0  # ceil: the busiest rank's count
    done, spare = 0, None
    for i, batch in enumerate(loader):
        if i >= n_total:
            break
        if i % ctx.world_size != ctx.rank:
            spare = spare or batch
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp():
            out = model(**batch)
        done += 1
        n = _n_targets(out, batch)
        if n:  # a batch with no target has a NaN mean and nothing to add
            loss_sum += out.loss.double().item() * n
            n_targets += n
        if out.logits.dim() == 2:  # (B, n_labels): classification
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            seen += batch["labels"].numel()
    while done < n_forwards:  # FSDP lockstep filler, result discarded
        with amp():
            model(**{k: v.to(device) for k, v in spare.items()})
        done += 1
    loss_sum, n_targets, correct, seen = all_reduce_sum([loss_sum, n_targets, correct, seen], ctx, device)
    model.train(was_training)
    loss = loss_sum / n_targets if n_targets else float("nan")
    res = {"loss": loss}
    if seen:
        res["accuracy"] = correct / seen
    else:
        res["perplexity"] = math.exp(min(loss, 700.0))  # exp overflows a float past ~709
    return res
