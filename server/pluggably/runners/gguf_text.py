"""Local text generation from GGUF files (llama.cpp's single-file format), through `transformers`.

The registry's discovery finds GGUF files (format GGUF, modality text); this runner serves them.

Why transformers and not llama.cpp. Two engines can run a GGUF file here: transformers, which reads
the file and dequantizes it into an ordinary torch model (`from_pretrained(..., gguf_file=...)`,
needing the small pure-Python `gguf` package, plus `accelerate`, which transformers insists on for
GGUF), and llama-cpp-python, which runs the quantized weights natively. llama-cpp-python ships no
wheels on PyPI, only a 76 MB source archive: `pip install llama-cpp-python` (0.3.36) compiles
llama.cpp with cmake and ninja, and on this project's machines (2 cores) it had done 128 of its
193 build steps when the 15-minute cap we gave it ran out; every install (each CI run, each
gateway image) would pay that again and need a C++ toolchain. Transformers needs nothing
compiled and lets this runner reuse the transformers text runner whole: admission queues,
sampling, stop sequences, streaming, cancellation, context checks, metrics. The price is memory:
a dequantized model takes 2 (float16/bfloat16) or 4 (float32, the CPU default) bytes per
parameter, roughly 3.5 or 7 times the size of a Q4 file, and the packed kernels that could keep weights
quantized come from the Hugging Face Hub at load time, so they are turned off (`dequantize=True`:
loading never reaches the network).

How it reuses the text runner. `GgufTextBackend` subclasses `TransformersTextBackend` and changes
only how a model's files are read and loaded; everything after loading is the text runner's own.
The rejected alternative converts each GGUF once into a transformers folder cache and points the
text runner at it: no subclass, but a second, dequantized copy of every model on disk (a 7B
model's 4 GB Q4 file becomes 14 GB of float16 safetensors) that the storage budget would have to
account for, and a conversion on first use that costs longer than a load.

GGUF specifics handled here:
- The file is checked before anything heavy is imported (`catalog.discovery.read_gguf_info`:
  magic, version, every tensor inside the file): a corrupt file is reported as UNAVAILABLE with
  reason MODEL_FILE_CORRUPT (MODEL_FILE_MISSING when it is gone) and what is wrong, before
  admission and on every request until the file is read again after the text runner's back-off,
  rather than as a generic load failure.
- Split GGUF sets and architectures transformers cannot read are FAILED_PRECONDITION, reason
  MODEL_UNSERVABLE: retrying will not help.
- The file is loaded from a private empty folder (the file itself named by absolute path), so a
  `tokenizer_config.json` or `config.json` lying next to it (Hugging Face repos often have them)
  cannot replace the tokenizer or config the file carries; measured: a sibling
  `tokenizer_config.json` turned the tokenizer into a BertTokenizer.
- transformers' tokenizer for byte-level GGUF vocabularies adds GPT-2's `<|endoftext|>` one id
  past the model's embeddings when the vocabulary lacks it (Llama 3's does), so a prompt holding
  that text crashed generation; such tokens are dropped and the text encodes as plain bytes, as
  in llama.cpp (`_without_tokens_past`).
- A GGUF holds one EOS id; the model's other end-of-generation tokens are found the way
  llama.cpp finds them: `tokenizer.ggml.eot_token_id`/`eom_token_id` and tokens spelled like a
  known end marker (`<|eot_id|>`, `<|end_of_text|>`, `<|im_end|>`, ...).

Importing this module is cheap: torch, transformers and gguf are imported in the load thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
import os
import re
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pluggably.catalog.discovery import CorruptModelFile, read_gguf_info
from pluggably.core.errors import FailedPrecondition, PluggablyError, Unavailable
from pluggably.core.types import Chunk, GenerationRequest, ModelInfo, ModelState
from pluggably.observability import metrics
from pluggably.runners import transformers_text as tt
from pluggably.runners.transformers_text import (
    DEFAULT_PROVIDER,
    LocalTextModel,
    TransformersTextBackend,
)

logger = logging.getLogger(__name__)

#: llama.cpp's end-of-generation token texts (llama-vocab.cpp), besides the EOS/EOT/EOM ids.
EOG_TOKEN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<EOT>",
        "_<EOT>",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    }
)

_SHARD = re.compile(r"-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)
# Header keys read without transformers: the context length (`describe`) and the token ids
# llama.cpp treats as end of generation.
_EOG_ID_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)


_CORRUPT, _MISSING, _UNSERVABLE = "MODEL_FILE_CORRUPT", "MODEL_FILE_MISSING", "MODEL_UNSERVABLE"


class _Unloadable(Exception):
    """A GGUF file this runner cannot load, for a reason a client may read (no paths)."""

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason

    def error(self, model_id: str) -> PluggablyError:
        if self.reason == _UNSERVABLE:  # a fact about this build and this file: do not retry
            return FailedPrecondition(
                f"model {model_id!r} cannot be served: {self.detail}",
                reason=self.reason,
                metadata={"model": model_id},
            )
        # A broken file is not fixed by waiting either, but UNAVAILABLE lets the router fall
        # back to another model, which FAILED_PRECONDITION would not.
        return Unavailable(
            f"model {model_id!r} cannot be loaded: {self.detail}",
            reason=self.reason,
            metadata={"model": model_id},
        )


@dataclass(frozen=True)
class _Defect:
    problem: _Unloadable
    at: float  # time.monotonic()
    from_header: bool  # found by reading the header (re-checked on every read of the files)


class GgufTextBackend(TransformersTextBackend):
    """Serves GGUF files with the transformers text runner (see the module docstring).

    Models are `LocalTextModel`s whose `path` is the `.gguf` file (the first shard, for a split
    set, which is refused); every other setting means what it means for the text runner.
    """

    def __init__(self, models: Sequence[LocalTextModel], provider: str = DEFAULT_PROVIDER) -> None:
        super().__init__(models, provider)
        # Keyed by slot: a slot replaced by `ensure_model` (new settings) starts clean.
        self._defects: weakref.WeakKeyDictionary[tt._Slot, _Defect] = weakref.WeakKeyDictionary()

    # ---- what the files say ------------------------------------------------------------------

    # An instance method where the text runner's is static: it records the file's defects.
    def _read_files(self, slot: tt._Slot) -> None:  # type: ignore[override]
        cfg = slot.cfg
        size = 0
        with contextlib.suppress(OSError):
            size = cfg.path.stat().st_size
        try:
            header = _check_file(cfg.path)
        except _Unloadable as problem:
            self._defects[slot] = _Defect(problem, time.monotonic(), from_header=True)
            slot.files = (False, cfg.context_length or 0, size)
            return
        known = self._defects.get(slot)
        if known is not None and known.from_header:
            # The file was fixed (replaced, re-downloaded). pop: list_models reads files in a
            # thread while requests may forget defects on the loop.
            self._defects.pop(slot, None)
        context = cfg.context_length or header.context_length or 0
        slot.files = (True, context, size)

    def _describe(self, slot: tt._Slot) -> ModelInfo:
        info = super()._describe(slot)
        defect = self._defects.get(slot)
        if defect is not None:
            info = dataclasses.replace(
                info, state=ModelState.ERROR, state_reason=defect.problem.detail
            )
        return info

    def _known_defect(self, slot: tt._Slot) -> _Defect | None:
        """The slot's defect while it is recent; an old one is forgotten, so the file is read
        (and loading tried) again, as the text runner retries a failed load."""
        defect = self._defects.get(slot)
        if defect is None:
            return None
        if time.monotonic() - defect.at < tt._LOAD_RETRY_AFTER_S:
            return defect
        self._defects.pop(slot, None)
        slot.files = None
        return None

    # ---- generation: known defects are reported before admission ------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        slot = self._slots.get(request.model)
        if slot is not None and slot.loaded is None:
            defect = self._known_defect(slot)
            if defect is None and slot.files is None:
                await asyncio.to_thread(self._read_files, slot)
                defect = self._known_defect(slot)
            if defect is not None:
                raise defect.problem.error(slot.model_id)
        # Closed explicitly: the text runner stops its generation thread in its own `finally`.
        async with contextlib.aclosing(super().generate(request)) as stream:
            async for chunk in stream:
                yield chunk

    # ---- loading -----------------------------------------------------------------------------

    async def _load(self, slot: tt._Slot) -> tt._Loaded:
        # The text runner's `_load`, with the GGUF loader and its own reasons for failing.
        started = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(_load_gguf, slot.cfg, slot.model_id)
        except _Unloadable as problem:
            slot.load_failed = True
            slot.load_failed_at = time.monotonic()
            self._defects[slot] = _Defect(problem, slot.load_failed_at, from_header=False)
            logger.warning("local model %s cannot be loaded: %s", slot.model_id, problem.detail)
            raise problem.error(slot.model_id) from None
        except Exception:
            slot.load_failed = True
            slot.load_failed_at = time.monotonic()
            logger.exception("loading local model %s failed", slot.model_id)
            raise tt._load_failed(slot, tt._LOAD_RETRY_AFTER_S) from None
        if self._closed:
            raise Unavailable("the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN")
        slot.loaded = loaded
        slot.load_failed = False
        metrics.observe_model_load(slot.model_id, time.perf_counter() - started)
        self._report_loaded()
        if loaded.device.type == "cuda":
            self._used_cuda = True
        logger.info("loaded local model %s (GGUF) on %s", slot.model_id, loaded.device)
        return loaded


# --------------------------------------------------------------------------------------------
# Reading the header (no torch, no transformers)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufHeader:
    """What this runner needs from a GGUF header before loading it."""

    architecture: str
    context_length: int | None  # `{architecture}.context_length`
    eog_ids: frozenset[int]  # EOS, EOT and EOM ids the file states


def _check_file(path: Path) -> GgufHeader:
    """Validates `path` as a loadable GGUF file and reads its header; raises `_Unloadable`."""
    match = _SHARD.search(path.name)
    if match and int(match["count"]) > 1:
        raise _Unloadable(
            f"a split GGUF file ({match['count']} parts) cannot be loaded by transformers; "
            "merge the parts into one file (llama.cpp's `llama-gguf-split --merge`)",
            reason=_UNSERVABLE,
        )
    try:
        read_gguf_info(path)
        return read_gguf_header(path)
    except CorruptModelFile as exc:
        raise _Unloadable(f"the GGUF file is corrupt ({exc})", reason=_CORRUPT) from None
    except FileNotFoundError:
        raise _Unloadable("the GGUF file is missing", reason=_MISSING) from None
    except OSError:
        # The error's text would name the path: only its kind goes to the client.
        raise _Unloadable("the GGUF file cannot be read", reason=_CORRUPT) from None


_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: Path) -> GgufHeader:
    """The architecture, context length and end-of-generation ids a GGUF file states.

    Reads the metadata only (arrays skipped, not decoded), so it costs milliseconds even for a
    vocabulary of 10^5 tokens. Call `catalog.discovery.read_gguf_info` first to validate the
    file; this raises `CorruptModelFile` on anything malformed it still meets.
    """
    values: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CorruptModelFile("not a GGUF file (bad magic)")
        _version, _tensor_count, kv_count = struct.unpack("<IQQ", _read(f, 20))
        for _ in range(kv_count):
            key = _read(f, _u64(f)).decode("utf-8", "replace")
            value = _read_value(f, struct.unpack("<I", _read(f, 4))[0])
            if value is not None:
                values[key] = value
    arch = values.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CorruptModelFile("no general.architecture in the metadata")
    context = values.get(f"{arch}.context_length")
    eog = {values[k] for k in _EOG_ID_KEYS if isinstance(values.get(k), int)}
    return GgufHeader(
        architecture=arch,
        context_length=context if isinstance(context, int) and context > 0 else None,
        eog_ids=frozenset(eog),
    )


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptModelFile("truncated metadata")
    return data


def _u64(f: BinaryIO) -> int:
    value: int = struct.unpack("<Q", _read(f, 8))[0]
    return value


def _read_value(f: BinaryIO, vtype: int) -> Any:
    """A scalar or string value; None (skipped) for arrays."""
    if vtype in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _read(f, _u64(f)).decode("utf-8", "replace")
    if vtype == _ARRAY:
        item_type = struct.unpack("<I", _read(f, 4))[0]
        count = _u64(f)
        _skip_array(f, item_type, count)
        return None
    raise CorruptModelFile(f"unknown metadata value type {vtype}")


def _skip_array(f: BinaryIO, item_type: int, count: int) -> None:
    if item_type in _SCALAR_FORMATS:
        f.seek(count * struct.calcsize(_SCALAR_FORMATS[item_type]), os.SEEK_CUR)
    elif item_type == _STRING:
        for _ in range(count):
            f.seek(_u64(f), os.SEEK_CUR)
    elif item_type == _ARRAY:
        for _ in range(count):
            inner = struct.unpack("<I", _read(f, 4))[0]
            _skip_array(f, inner, _u64(f))
    else:
        raise CorruptModelFile(f"unknown metadata array type {item_type}")


# --------------------------------------------------------------------------------------------
# Loading (in a worker thread; torch and transformers imported here)
# --------------------------------------------------------------------------------------------


def _load_gguf(cfg: LocalTextModel, model_id: str) -> tt._Loaded:
    header = _check_file(cfg.path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if header.architecture not in GGUF_SUPPORTED_ARCHITECTURES and not _new_loader_reads(
        header.architecture
    ):
        raise _Unloadable(
            f"transformers cannot load GGUF files of architecture {header.architecture!r}",
            reason=_UNSERVABLE,
        )
    device = tt._resolve_device(cfg.device, torch)
    dtype = tt._resolve_dtype(cfg.dtype, device, torch)
    gguf_file = str(cfg.path.resolve())
    with tempfile.TemporaryDirectory(prefix="pluggably-gguf-") as empty:
        # Loaded "from" an empty folder, the file named by absolute path: files lying next to
        # the GGUF (a repo's tokenizer_config.json) must not stand in for what the file carries.
        tokenizer = AutoTokenizer.from_pretrained(empty, gguf_file=gguf_file, local_files_only=True)
        kwargs: dict[str, Any] = {
            "gguf_file": gguf_file,
            "local_files_only": True,
            "dtype": dtype,
            "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True),
        }
        direct = device.type != "cpu" and importlib.util.find_spec("accelerate") is not None
        if direct:
            kwargs["device_map"] = device
        with tt._no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(empty, **kwargs)
        tokenizer = _without_tokens_past(
            tokenizer, model.get_input_embeddings().num_embeddings, Path(empty) / "tokenizer"
        )
    tokenizer("warm-up")  # see `transformers_text._load_model`
    if not direct:
        model.to(device)
    model.eval()
    gen_config = copy.deepcopy(model.generation_config)

    eos_ids = set(header.eog_ids)
    configured = gen_config.eos_token_id
    eos_ids.update([configured] if isinstance(configured, int) else list(configured or ()))
    vocab = tokenizer.get_vocab()
    eos_ids.update(vocab[text] for text in EOG_TOKEN_TEXTS if text in vocab)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if eos_ids:
        # Stopping in `generate` too, not only in the stream, saves a token per request.
        gen_config.eos_token_id = sorted(eos_ids)
    if gen_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen_config.pad_token_id = tokenizer.pad_token_id
    if gen_config.pad_token_id is None and eos_ids:
        gen_config.pad_token_id = min(eos_ids)

    context = cfg.context_length or tt._context_from_config(model.config.to_dict())
    if not context:
        raise RuntimeError(
            f"cannot tell the context length of {model_id}; configure context_length"
        )
    per_token = tt._chars_per_token(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return tt._Loaded(
        model=model,
        tokenizer=tokenizer,
        device=device,
        generation_config=gen_config,
        eos_ids=frozenset(eos_ids),
        context_length=context,
        encode_lock=threading.Lock(),
        max_prompt_chars=None if per_token is None else (context - 1) * per_token,
        counts_assistant_text=not (isinstance(template, str) and "</think>" in template),
    )


def _without_tokens_past(tokenizer: Any, limit: int, scratch: Path) -> Any:
    """`tokenizer` without the added tokens whose ids the model has no embedding for.

    transformers builds a byte-level GGUF vocabulary with GPT-2's tokenizer class, which adds
    GPT-2's own `<|endoftext|>` when the vocabulary lacks it (Llama 3's does), one id past the
    model's embeddings: a prompt that contains that text then crashes generation with an index
    error, where llama.cpp encodes it as the plain text it is. The tokenizer is saved, its extra
    tokens struck out, and loaded again: the public round trip rather than private attributes.
    """
    extra = {i: str(t) for i, t in tokenizer.added_tokens_decoder.items() if i >= limit}
    if not extra:
        return tokenizer
    from transformers import AutoTokenizer

    logger.info("dropping tokens the model has no embedding for: %s", sorted(extra.values()))
    tokenizer.save_pretrained(scratch)
    spec_path = scratch / "tokenizer.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec.get("added_tokens") or [] if t["id"] < limit]
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    config_path = scratch / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    decoder = config.get("added_tokens_decoder") or {}
    config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < limit}
    for key, value in list(config.items()):
        if key.endswith("_token") and value in extra.values():
            config[key] = None
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return AutoTokenizer.from_pretrained(scratch, local_files_only=True)


def _new_loader_reads(architecture: str) -> bool:
    """Whether transformers' newer GGUF loader (packed weights) handles `architecture`."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:
        return False
    return bool(is_gguf_arch_supported(architecture))
