"""Auto-discovery: find the models that already lie on disk, and say whether this build can serve them.

`scan(folders, hf_cache)` walks the configured model folders and the Hugging Face hub cache and
returns one `FoundModel` per model: a transformers folder, a diffusers pipeline, a GGUF file (or
a split GGUF set) or a loose safetensors file. It only looks and reports; the registry decides
what to register. It is blocking (the caller runs it in a thread), transport-free, and imports
neither torch nor transformers: whether they are installed is asked of `importlib.util.find_spec`.

Key decisions:
- Nothing on disk can make a scan raise. A file that cannot be read, a broken link, malformed
  JSON or a header with lengths beyond the file's size makes its model "not servable" with a
  reason, or is skipped when it is not a model at all. Every length read from a file is checked
  against the file's size before anything is read or allocated, and files are read, never
  mapped (a file truncated under a memory map kills the process with SIGBUS).
- Symlinks are followed only when they resolve inside the folder being scanned (for the hub
  cache: inside the repo's own folder, where snapshots link to blobs). A link that leaves it, or
  points nowhere, is not followed; inside a model folder it makes the model not servable.
- A model folder is not descended into: a transformers folder's subfolders (and the GGUF or
  safetensors files next to its config) belong to it. Hidden entries are skipped. A model is
  found at most `max_depth` path components below its folder.
- `size_bytes` counts every file of the model (hidden ones too: they occupy the disk) once per
  inode: the hub cache's snapshot links and hard links to one blob add its size once. Two
  entries that share blobs each count them.
- Reasons name files relative to the model, never absolute paths: they reach API clients.
- Servability is one table, `RUNNERS`, keyed by (format, modality): add a runner there.

The Hugging Face cache (`models--{org}--{name}/snapshots/{commit}/`, `refs/main`, `blobs/`):
- A snapshot is incomplete when a link in it points nowhere, when a model in it has a defect
  (missing weights, truncated file), or when a download is pending for it: a `blobs/*.incomplete`
  file whose blob has not been finished since. `trees/{commit}.json` (written by huggingface_hub
  before it downloads) tells which snapshot and file a pending blob belongs to; without it, the
  pending blob is charged to the snapshot `refs/main` names, because huggingface_hub writes the
  ref before it downloads (to every snapshot when there is no `refs/main`).
- Which snapshots are reported: the primary one under the plain repo id (`org/name`): the
  `refs/main` snapshot when complete, else the newest complete one, else (nothing complete) the
  `refs/main` or newest snapshot, reported not servable with its reason so that an interrupted
  download is visible. Besides it, every other complete snapshot, and the `refs/main` snapshot
  when it is not the primary (a pending upgrade), are reported as `org/name@{commit[:12]}`.
  Incomplete snapshots of old revisions are left out.
- A snapshot that holds one model gives it the snapshot's name; one that holds several (a repo of
  GGUF quantisations) names each `{snapshot name}/{path in the repo}`.
- Only `models--` folders are read (`datasets--`, `spaces--` are skipped), and a configured folder
  never descends into hub-cache folders, so a model is not reported twice. Two configured
  folders may still suggest the same name for different models: the caller resolves that.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from pluggably.core.types import Modality, ModelFormat

log = logging.getLogger("pluggably.catalog.discovery")

DEFAULT_MAX_DEPTH = 4


@dataclass(frozen=True)
class FoundModel:
    """One model found on disk."""

    # Suggested local name: the repo id for the hub cache, else the path relative to the
    # configured folder with `/` separators (the folder's own name when the folder is the model).
    name: str
    # The model folder, or the file for single-file formats (the first shard of a split GGUF).
    path: Path
    format: ModelFormat
    modality: Modality
    size_bytes: int
    source_repo: str | None
    revision: str | None
    servable: bool
    # Why the model cannot be served; empty when it can.
    reason: str
    in_hf_cache: bool
    # The architecture (transformers), pipeline class (diffusers) or `general.architecture`
    # (GGUF), when known.
    architecture: str = ""
    # A human name the files carry (GGUF `general.name`), when known.
    display_name: str = ""


@dataclass(frozen=True)
class RunnerSupport:
    """What this build needs to serve one kind of model."""

    # Modules that must be importable (checked with find_spec, never imported).
    modules: tuple[str, ...] = ()
    # The extra that installs them.
    extra: str = "local"
    # Non-empty: no runner for this kind exists in this build, and this is the reason given.
    unavailable: str = ""


# The one servability table. A model is servable when its files are sound, its own checks pass
# (a transformers model must be a causal LM) and its row here names no reason and only
# importable modules. Kinds without a row are not servable.
RUNNERS: Mapping[tuple[ModelFormat, Modality], RunnerSupport] = MappingProxyType(
    {
        (ModelFormat.TRANSFORMERS, Modality.TEXT): RunnerSupport(modules=("torch", "transformers")),
        (ModelFormat.DIFFUSERS, Modality.IMAGE): RunnerSupport(modules=("torch", "diffusers")),
        (ModelFormat.DIFFUSERS, Modality.MESH): RunnerSupport(
            modules=("torch", "diffusers", "trimesh")
        ),
        # transformers dequantizes GGUF weights into a torch model (runners/gguf_text.py).
        (ModelFormat.GGUF, Modality.TEXT): RunnerSupport(
            modules=("torch", "transformers", "gguf", "accelerate")
        ),
    }
)

LONE_SAFETENSORS_REASON = (
    "a lone safetensors file has no config: put it in a folder with config.json"
)


class CorruptModelFile(ValueError):
    """A model file's header is malformed or claims more bytes than the file holds."""


# --- scanning -------------------------------------------------------------------------------


def scan(
    folders: Sequence[Path], hf_cache: Path | None, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> list[FoundModel]:
    """Every model in `folders` (in their order) and then in the hub cache `hf_cache`.

    Blocking: it reads directories and file headers. A model reachable twice (overlapping
    folders, a link to another model inside the folder) is reported once, the first time.
    """
    hf_real = _realdir(hf_cache) if hf_cache is not None else None
    seen: set[str] = set()
    found: list[FoundModel] = []

    def add(models: Iterable[FoundModel], reals: Iterable[str]) -> None:
        for model, real in zip(models, reals, strict=True):
            if real not in seen:
                seen.add(real)
                found.append(model)

    for folder in folders:
        root = _realdir(folder)
        if root is None:
            log.warning("model folder %s does not exist or is not a folder: skipped", folder)
            continue
        walk = _Walk(boundary=root, max_depth=max_depth, skip_reals={hf_real} - {None, root})
        items = walk.run(Path(folder).absolute(), root)
        add(
            (_finish(item, item.rel or Path(folder).absolute().name) for item in items),
            (item.real for item in items),
        )
    if hf_cache is not None and hf_real is not None:
        for model, real in _scan_hf_cache(Path(hf_cache).absolute(), hf_real, max_depth):
            add([model], [real])
    elif hf_cache is not None:
        log.info("Hugging Face cache %s does not exist: nothing to discover there", hf_cache)
    return found


def _realdir(path: Path) -> str | None:
    try:
        real = os.path.realpath(path, strict=True)
    except (OSError, RuntimeError):
        return None
    return real if os.path.isdir(real) else None


def _inside(real: str, boundary: str) -> bool:
    return real == boundary or real.startswith(boundary.rstrip(os.sep) + os.sep)


def _hidden(name: str) -> bool:
    return name.startswith(".")


@dataclass(frozen=True)
class _Entry:
    """One directory entry, with links resolved once."""

    name: str
    path: Path  # as reached (through links), for reporting
    real: str  # resolved; meaningful only when `problem` is empty
    kind: str  # "file", "dir", "other" or "" (a problem)
    problem: str = ""


@dataclass
class _Dir:
    path: Path
    real: str
    files: dict[str, _Entry]
    dirs: dict[str, _Entry]


_BROKEN = "is a broken link"
_ESCAPES = "links outside the scanned folder (not followed)"


def _read_dir(path: Path, real: str, boundary: str) -> _Dir | None:
    try:
        with os.scandir(real) as it:
            raw = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        log.debug("cannot list %s: %s", path, exc.strerror)
        return None
    d = _Dir(path, real, {}, {})
    for e in raw:
        # Broken and escaping links are left out here; `_tree_stats` reports them per model.
        entry = _resolve(e, path / e.name, os.path.join(real, e.name), boundary)
        if entry.problem:
            continue
        if entry.kind == "file":
            d.files[e.name] = entry
        elif entry.kind == "dir":
            d.dirs[e.name] = entry
    return d


def _resolve(e: os.DirEntry[str], path: Path, joined: str, boundary: str) -> _Entry:
    try:
        if not e.is_symlink():
            mode = e.stat(follow_symlinks=False).st_mode
            return _Entry(e.name, path, joined, _kind(mode))
        try:
            real = os.path.realpath(joined, strict=True)
        except (OSError, RuntimeError):
            return _Entry(e.name, path, "", "", _BROKEN)
        if not _inside(real, boundary):
            return _Entry(e.name, path, "", "", _ESCAPES)
        return _Entry(e.name, path, real, _kind(os.stat(real).st_mode))
    except OSError:
        return _Entry(e.name, path, "", "", "cannot be read")


def _kind(mode: int) -> str:
    # FIFOs, sockets and devices are never opened: reading a FIFO would block the scan.
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


@dataclass
class _Item:
    """A model found by a walk, before it gets its final name and servability."""

    rel: str  # path relative to the walk's root, `/`-separated; "" for the root itself
    path: Path
    real: str
    format: ModelFormat
    modality: Modality
    size_bytes: int
    defects: list[str] = field(default_factory=list)  # its files are not sound or complete
    unsupported: str = ""  # sound, but not something this build's runner for its kind serves
    architecture: str = ""
    display_name: str = ""
    files: tuple[str, ...] = ()  # for single-file models: its files' `rel`s (split GGUF shards)


class _Skip:
    """A folder that is no model and holds none (a PEFT adapter): neither reported nor entered."""


_SKIP = _Skip()


@dataclass
class _Walk:
    boundary: str
    max_depth: int
    skip_reals: set[str | None] = field(default_factory=set)
    skip_hub_folders: bool = True
    visited: set[str] = field(default_factory=set)
    out: list[_Item] = field(default_factory=list)

    def run(self, path: Path, real: str) -> list[_Item]:
        self._visit(path, real, "", 0)
        return self.out

    def _visit(self, path: Path, real: str, rel: str, depth: int) -> None:
        self.visited.add(real)
        d = _read_dir(path, real, self.boundary)
        if d is None:
            return
        model = _classify_dir(d, rel, self.boundary)
        if isinstance(model, _Item):
            self.out.append(model)
            return
        if model is _SKIP or depth + 1 > self.max_depth:
            return
        ggufs: list[_Entry] = []
        for name, entry in d.files.items():
            lower = name.lower()
            if _hidden(name):
                continue
            if lower.endswith(".gguf"):
                ggufs.append(entry)
            elif lower.endswith(".safetensors"):
                self.out.append(_loose_safetensors(entry, _join(rel, name)))
        self.out.extend(_gguf_models(ggufs, rel))
        for name, entry in d.dirs.items():
            if _hidden(name) or entry.real in self.visited or entry.real in self.skip_reals:
                continue
            if self.skip_hub_folders and name.startswith(("models--", "datasets--", "spaces--")):
                continue
            self._visit(entry.path, entry.real, _join(rel, name), depth + 1)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


# --- sizes and links --------------------------------------------------------------------------

# How deep a model folder's own tree is followed for its size (diffusers components are one
# level down; some repos keep an `original/` checkpoint or a `.git/lfs` store a few levels down).
_MODEL_TREE_DEPTH = 8


def _tree_stats(real: str, boundary: str, seen: set[tuple[int, int]]) -> tuple[int, list[str]]:
    """Bytes of the files under a model folder (each inode once) and its links that are broken
    or leave `boundary` (non-hidden ones, as `rel problem`)."""
    total = 0
    problems: list[str] = []
    visited = {real}
    stack: list[tuple[str, str, int, bool]] = [(real, "", 0, False)]
    while stack:
        folder, rel, depth, hidden = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            entry = _resolve(e, Path(e.path), os.path.join(folder, e.name), boundary)
            sub_rel = _join(rel, e.name)
            sub_hidden = hidden or _hidden(e.name)
            if entry.problem:
                if not sub_hidden:
                    problems.append(f"{sub_rel} {entry.problem}")
            elif entry.kind == "file":
                total += _file_size(entry.real, seen)
            elif entry.kind == "dir" and depth < _MODEL_TREE_DEPTH and entry.real not in visited:
                visited.add(entry.real)
                stack.append((entry.real, sub_rel, depth + 1, sub_hidden))
    return total, problems


def _file_size(real: str, seen: set[tuple[int, int]]) -> int:
    try:
        st = os.stat(real)
    except OSError:
        return 0
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return 0
    seen.add(key)
    return st.st_size


# --- JSON -------------------------------------------------------------------------------------

# Far above any real config or shard index (the largest are a few MB of id2label or weight_map).
_MAX_JSON_BYTES = 64 * 1024 * 1024


def _read_json(real: str) -> tuple[Any, str]:
    """The parsed JSON document and "", or None and what is wrong with it (a phrase)."""
    try:
        with open(real, "rb") as f:
            if os.fstat(f.fileno()).st_size > _MAX_JSON_BYTES:
                return None, "is too large to be a config"
            raw = f.read(_MAX_JSON_BYTES + 1)
    except OSError:
        return None, "cannot be read"
    try:
        return json.loads(raw), ""
    except (ValueError, RecursionError):
        return None, "is not valid JSON"


# --- folders: transformers and diffusers ------------------------------------------------------

# model_type values of decoder-only LMs, for a config.json that names no architectures.
_DECODER_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom",
        "falcon", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "starcoder2", "stablelm", "olmo", "olmo2", "cohere", "mpt", "codegen",
        "granite", "deepseek_v3", "smollm3",
    }
)  # fmt: skip
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Files from which AutoTokenizer can build a tokenizer.
_TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
     "spiece.model", "sentencepiece.bpe.model"}
)  # fmt: skip
_WEIGHT_BIN_PREFIXES = ("pytorch_model", "diffusion_pytorch_model", "model")
_INDEX = re.compile(r"\.(safetensors|bin)\.index(\.[A-Za-z0-9_-]+)?\.json$")
_MESH_PIPELINES = frozenset({"ShapEPipeline", "ShapEImg2ImgPipeline"})
# Pipelines whose output has no modality in this API: not reported.
_OTHER_OUTPUT = re.compile(r"Video|Audio|Music|Speech|I2VGen|^Wan|^Mochi|^LTX")


def _classify_dir(d: _Dir, rel: str, boundary: str) -> _Item | _Skip | None:
    if "model_index.json" in d.files:
        return _diffusers(d, rel, boundary)
    if "config.json" in d.files:
        return _transformers(d, rel, boundary)
    if "adapter_config.json" in d.files:
        return _SKIP
    return None


def _transformers(d: _Dir, rel: str, boundary: str) -> _Item | None:
    config, problem = _read_json(d.files["config.json"].real)
    has_weights, weight_defects = _check_weights(d, "")
    if problem or not isinstance(config, dict):
        if not has_weights:
            return None  # a stray config.json is not a model
        return _folder_item(
            d,
            rel,
            boundary,
            ModelFormat.TRANSFORMERS,
            Modality.TEXT,
            [f"config.json {problem or 'is not a JSON object'}", *weight_defects],
        )
    archs_raw = config.get("architectures")
    archs = [a for a in archs_raw if isinstance(a, str)] if isinstance(archs_raw, list) else []
    model_type_raw = config.get("model_type")
    model_type = model_type_raw if isinstance(model_type_raw, str) else ""
    if not archs and not model_type and not has_weights:
        return None  # e.g. a sentence-transformers pooling folder
    architecture = archs[0] if archs else model_type
    causal = (
        any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
        if archs
        else model_type in _DECODER_MODEL_TYPES
    )
    defects = list(weight_defects)
    if causal and not _TOKENIZER_FILES & d.files.keys():
        defects.append("tokenizer missing (no tokenizer.json, tokenizer.model or vocab files)")
    item = _folder_item(d, rel, boundary, ModelFormat.TRANSFORMERS, Modality.TEXT, defects)
    item.architecture = architecture
    if not causal:
        item.unsupported = (
            f"architecture {architecture or 'unknown'} is not a text generation model"
        )
    return item


def _diffusers(d: _Dir, rel: str, boundary: str) -> _Item | None:
    index, problem = _read_json(d.files["model_index.json"].real)
    if problem or not isinstance(index, dict):
        why = problem or "is not a JSON object"
        return _folder_item(
            d, rel, boundary, ModelFormat.DIFFUSERS, Modality.IMAGE, [f"model_index.json {why}"]
        )
    pipeline = index.get("_class_name")
    if not isinstance(pipeline, str) or not pipeline:
        defect = "model_index.json names no pipeline (_class_name)"
        return _folder_item(d, rel, boundary, ModelFormat.DIFFUSERS, Modality.IMAGE, [defect])
    if pipeline not in _MESH_PIPELINES and _OTHER_OUTPUT.search(pipeline):
        log.debug("%s: %s produces neither images nor meshes: not reported", d.path, pipeline)
        return None
    modality = Modality.MESH if pipeline in _MESH_PIPELINES else Modality.IMAGE
    defects: list[str] = []
    for component, spec in index.items():
        if component.startswith("_") or not _is_component(spec):
            continue
        sub = d.dirs.get(component)
        if sub is None:
            defects.append(f"{component}: component folder missing")
            continue
        sub_dir = _read_dir(sub.path, sub.real, boundary)
        if sub_dir is None:
            defects.append(f"{component}: component folder cannot be read")
        elif "config.json" in sub_dir.files:  # a model component (not a scheduler or tokenizer)
            defects.extend(_check_weights(sub_dir, f"{component}: ")[1])
    item = _folder_item(d, rel, boundary, ModelFormat.DIFFUSERS, modality, defects)
    item.architecture = pipeline
    return item


def _is_component(spec: Any) -> bool:
    # `"safety_checker": [null, null]` marks a component the pipeline runs without.
    return (
        isinstance(spec, list)
        and len(spec) == 2
        and all(isinstance(part, str) and part for part in spec)
    )


def _check_weights(d: _Dir, label: str) -> tuple[bool, list[str]]:
    """Whether `d` holds weights, and what is wrong with them (incomplete shards, bad headers)."""
    defects: list[str] = []
    safetensors = [n for n in d.files if n.endswith(".safetensors") and not _hidden(n)]
    bins = [n for n in d.files if n.endswith(".bin") and n.startswith(_WEIGHT_BIN_PREFIXES)]
    for name in (n for n in d.files if _INDEX.search(n)):
        index, problem = _read_json(d.files[name].real)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if problem or not isinstance(weight_map, dict):
            defects.append(f"{label}{name} {problem or 'has no weight_map'}")
            continue
        shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
        missing = [s for s in shards if s not in d.files]
        if missing:
            defects.append(
                f"{label}weights incomplete: {len(missing)} of {len(shards)} shards missing "
                f"({missing[0]})"
            )
    for name in safetensors:
        try:
            read_safetensors_header(Path(d.files[name].real))
        except CorruptModelFile as exc:
            defects.append(f"{label}{name} is corrupt: {exc}")
        except OSError:
            defects.append(f"{label}{name} cannot be read")
    has_weights = bool(safetensors or bins)
    if not has_weights:
        defects.append(f"{label}weights missing")
    return has_weights, defects


def _folder_item(
    d: _Dir,
    rel: str,
    boundary: str,
    fmt: ModelFormat,
    modality: Modality,
    defects: list[str],
) -> _Item:
    size, link_problems = _tree_stats(d.real, boundary, set())
    pending = _local_dir_pending(d)
    if pending:
        defects.append(f"download incomplete: {_files(pending)} pending")
    return _Item(rel, d.path, d.real, fmt, modality, size, [*defects, *link_problems])


def _local_dir_pending(d: _Dir) -> int:
    """Files a `hf download --local-dir` into this folder has not finished.

    huggingface_hub downloads into `.cache/huggingface/download/{hash}.{etag}[.{id}].incomplete`
    and records `{file}.metadata` (commit, etag) once a file is done: a leftover whose etag no
    metadata records is a file still missing.
    """
    download = Path(d.real, ".cache", "huggingface", "download")
    if not download.is_dir():
        return 0
    pending: set[str] = set()
    done: set[str] = set()
    try:
        for dirpath, _, filenames in os.walk(download):
            for name in filenames:
                if name.endswith(".incomplete") and name.count(".") >= 2:
                    pending.add(name.split(".")[1])
                elif name.endswith(".metadata"):
                    done.add(_metadata_etag(os.path.join(dirpath, name)))
    except OSError:
        return 0
    return len(pending - done)


def _metadata_etag(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(4096).splitlines()
    except OSError:
        return ""
    return lines[1].strip() if len(lines) > 1 else ""


def _files(n: int) -> str:
    return f"{n} file{'s' if n != 1 else ''}"


# --- single files: safetensors ----------------------------------------------------------------

# The safetensors format's own limit on its JSON header.
_MAX_SAFETENSORS_HEADER = 100_000_000
# Tensor-name prefixes of diffusion checkpoints (SD/SDXL single files, Flux, kohya LoRAs).
_IMAGE_TENSOR_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.",
    "double_blocks.",
    "single_blocks.",
    "lora_unet_",
)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size.

    Raises `CorruptModelFile` when the header is malformed or the tensor data it describes does
    not exactly fill the rest of the file (a truncated copy, trailing bytes), `OSError` when the
    file cannot be read. Reads the header only.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CorruptModelFile(f"truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_SAFETENSORS_HEADER:
            raise CorruptModelFile(f"header length {n} exceeds the format's limit")
        if 8 + n > size:
            raise CorruptModelFile(f"truncated (header of {n} bytes, file of {size})")
        raw = f.read(n)
    if len(raw) != n:
        raise CorruptModelFile("truncated while reading its header")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise CorruptModelFile("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptModelFile("header is not a JSON object")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CorruptModelFile("header has a tensor without valid data_offsets")
        data_end = max(data_end, offsets[1])
    data_len = size - 8 - n
    if data_end > data_len:
        raise CorruptModelFile(f"truncated (tensor data needs {data_end} bytes, has {data_len})")
    if data_end < data_len:
        raise CorruptModelFile(f"{data_len - data_end} unexpected bytes after the tensor data")
    return header


def _loose_safetensors(entry: _Entry, rel: str) -> _Item:
    size = _file_size(entry.real, set())
    item = _Item(rel, entry.path, entry.real, ModelFormat.SAFETENSORS, Modality.TEXT, size)
    item.files = (rel,)
    try:
        header = read_safetensors_header(Path(entry.real))
    except CorruptModelFile as exc:
        item.defects.append(f"corrupt safetensors file: {exc}")
        return item
    except OSError:
        item.defects.append("the file cannot be read")
        return item
    # A guess from tensor names, good enough to file the model under the right modality.
    if any(name.startswith(_IMAGE_TENSOR_PREFIXES) for name in header):
        item.modality = Modality.IMAGE
    item.unsupported = LONE_SAFETENSORS_REASON
    return item


# --- single files: GGUF -----------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_GGUF_STRING = 8
_GGUF_ARRAY = 9
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_UINT32 = 4
# ggml tensor types whose (block size, bytes per block) are settled; for any other type only
# the tensor's offset is checked against the file.
_GGML_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
}  # fmt: skip
# The spec caps keys at 65535 bytes; tensor names are far shorter. ggml tensors have <= 4 dims.
_GGUF_MAX_KEY = 65_535
_GGUF_MAX_DIMS = 8
_GGUF_MAX_KEPT_STRING = 4096
# Work bound for one file's metadata: past this many values (tokenizer vocabularies are ~10^5
# strings, twice), the rest is not read and the tensor data is not checked.
_GGUF_MAX_VALUES = 2_000_000
_GGUF_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)


@dataclass(frozen=True)
class GgufInfo:
    version: int
    tensor_count: int
    metadata_count: int
    architecture: str  # `general.architecture`, "" when absent
    name: str  # `general.name`, "" when absent
    # Whether the whole header was read and every tensor shown to lie inside the file.
    data_checked: bool


class _Reader:
    """Sequential little-endian reads from a file, every length checked against its size."""

    _CHUNK = 1 << 20

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.size = size
        self.pos = 0
        self._buf = b""
        self._buf_start = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise CorruptModelFile(f"truncated at byte {self.pos} (needs {n} more)")
        offset = self.pos - self._buf_start
        if offset < 0 or offset + n > len(self._buf):
            self._f.seek(self.pos)
            self._buf = self._f.read(max(n, self._CHUNK))
            self._buf_start = self.pos
            offset = 0
            if len(self._buf) < n:
                raise CorruptModelFile("the file shrank while it was read")
        self.pos += n
        return self._buf[offset : offset + n]

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CorruptModelFile(f"truncated at byte {self.pos} (a value of {n} bytes)")
        self.pos += n

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.take(8))[0]
        return value

    def string(self, limit: int) -> bytes | None:
        """A GGUF string; None (and skipped) when longer than `limit`."""
        n = self.u64()
        if n > limit:
            self.skip(n)
            return None
        return self.take(n)


def read_gguf_info(path: Path) -> GgufInfo:
    """Header facts of a GGUF file (spec: ggml-org/ggml docs/gguf.md, versions 2 and 3).

    Reads the metadata until `general.architecture` and `general.name` are known, then, when the
    metadata is small enough to walk, the tensor table, and checks that every tensor of a known
    type ends inside the file. Raises `CorruptModelFile` for a wrong magic, an unsupported version,
    or any length that runs past the end of the file; `OSError` when it cannot be read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, size)
        if size < 4 or r.take(4) != _GGUF_MAGIC:
            raise CorruptModelFile("not a GGUF file (bad magic)")
        version = r.u32()
        if version not in (2, 3):
            if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
                raise CorruptModelFile("big-endian GGUF files are not supported")
            raise CorruptModelFile(f"unsupported GGUF version {version}")
        tensor_count = r.u64()
        kv_count = r.u64()
        # Each key-value pair takes at least 13 bytes and each tensor entry at least 24: counts
        # beyond what the file could hold are corrupt, whatever follows.
        if kv_count * 13 + tensor_count * 24 > size - r.pos:
            raise CorruptModelFile(
                f"header claims {kv_count} metadata entries and {tensor_count} tensors, "
                f"more than a file of {size} bytes holds"
            )
        meta = _GgufMeta()
        for _ in range(kv_count):
            key = r.string(_GGUF_MAX_KEY)
            if key is None:
                raise CorruptModelFile("metadata key longer than the spec allows")
            meta.read_value(r, key, r.u32(), depth=0)
            if meta.budget < 0:
                return GgufInfo(version, tensor_count, kv_count, meta.arch, meta.name, False)
        data_end = 0
        for _ in range(tensor_count):
            if r.string(_GGUF_MAX_KEY) is None:
                raise CorruptModelFile("tensor name longer than the spec allows")
            n_dims = r.u32()
            if n_dims > _GGUF_MAX_DIMS:
                raise CorruptModelFile(f"tensor with {n_dims} dimensions")
            elements = math.prod(r.u64() for _ in range(n_dims))
            ggml_type = r.u32()
            offset = r.u64()
            block, type_size = _GGML_TYPE_SIZES.get(ggml_type, (0, 0))
            nbytes = elements // block * type_size if block else 0
            data_end = max(data_end, offset + nbytes)
        alignment = meta.alignment if meta.alignment > 0 else 32
        data_start = -(-r.pos // alignment) * alignment
        if data_start + data_end > size:
            raise CorruptModelFile(
                f"truncated (tensor data needs {data_start + data_end} bytes, file has {size})"
            )
        return GgufInfo(version, tensor_count, kv_count, meta.arch, meta.name, True)


@dataclass
class _GgufMeta:
    arch: str = ""
    name: str = ""
    alignment: int = 0
    budget: int = _GGUF_MAX_VALUES

    def read_value(self, r: _Reader, key: bytes, vtype: int, depth: int) -> None:
        self.budget -= 1
        if vtype in _GGUF_SCALAR_SIZES:
            if key == b"general.alignment" and vtype == _GGUF_UINT32:
                self.alignment = r.u32()
            else:
                r.skip(_GGUF_SCALAR_SIZES[vtype])
        elif vtype == _GGUF_STRING:
            value = r.string(_GGUF_MAX_KEPT_STRING if key in _GGUF_KEPT else 0)
            if key in _GGUF_KEPT and value is not None:
                setattr(self, _GGUF_KEPT[key], value.decode("utf-8", "replace"))
        elif vtype == _GGUF_ARRAY:
            if depth > 4:
                raise CorruptModelFile("metadata arrays nested too deeply")
            item_type = r.u32()
            count = r.u64()
            if item_type in _GGUF_SCALAR_SIZES:
                r.skip(count * _GGUF_SCALAR_SIZES[item_type])
                return
            if count > r.size - r.pos:  # every string or array item takes at least 8 bytes
                raise CorruptModelFile(
                    f"truncated (a metadata array of {count} items runs past the end)"
                )
            for _ in range(count):
                self.read_value(r, b"", item_type, depth + 1)
                if self.budget < 0:
                    return
        else:
            raise CorruptModelFile(f"unknown metadata value type {vtype}")


_GGUF_KEPT = {b"general.architecture": "arch", b"general.name": "name"}


def _gguf_models(entries: list[_Entry], rel: str) -> list[_Item]:
    """One model per GGUF file, except that the shards of a split file are one model."""
    sets: dict[tuple[str, int], dict[int, _Entry]] = {}
    items: list[_Item] = []
    for entry in entries:
        m = _GGUF_SHARD.match(entry.name)
        if m and 1 <= int(m["index"]) <= int(m["count"]):
            sets.setdefault((m["stem"], int(m["count"])), {})[int(m["index"])] = entry
        else:
            items.append(_gguf_item([entry], rel, 1))
    for (_, count), shards in sets.items():
        items.append(_gguf_item([shards[i] for i in sorted(shards)], rel, count))
    return items


def _gguf_item(shards: list[_Entry], rel: str, count: int) -> _Item:
    first = shards[0]
    seen: set[tuple[int, int]] = set()
    size = sum(_file_size(s.real, seen) for s in shards)
    item = _Item(
        _join(rel, first.name), first.path, first.real, ModelFormat.GGUF, Modality.TEXT, size
    )
    item.files = tuple(_join(rel, s.name) for s in shards)
    if len(shards) < count:
        item.defects.append(f"split GGUF: {count - len(shards)} of {count} shards missing")
    for i, shard in enumerate(shards):
        try:
            info = read_gguf_info(Path(shard.real))
        except CorruptModelFile as exc:
            item.defects.append(f"corrupt GGUF file{_shard_label(shard, count)}: {exc}")
            continue
        except OSError:
            item.defects.append(f"GGUF file{_shard_label(shard, count)} cannot be read")
            continue
        if i == 0:
            item.architecture, item.display_name = info.architecture, info.name
    return item


def _shard_label(shard: _Entry, count: int) -> str:
    return f" {shard.name}" if count > 1 else ""


# --- servability ------------------------------------------------------------------------------


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that is no package; a module without a spec
        return False


def _servability(item: _Item) -> tuple[bool, str]:
    problems = [*item.defects, *([item.unsupported] if item.unsupported else [])]
    if problems:
        return False, "; ".join(problems[:3])
    support = RUNNERS.get((item.format, item.modality))
    if support is None:
        return False, f"no runner for {item.format.value} {item.modality.value} models"
    if support.unavailable:
        return False, support.unavailable
    missing = [m for m in support.modules if not _importable(m)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return False, (
            f"{' and '.join(missing)} {verb} not installed (pip install 'pluggably[{support.extra}]')"
        )
    return True, ""


def _finish(
    item: _Item, name: str, *, repo: str | None = None, revision: str | None = None
) -> FoundModel:
    servable, reason = _servability(item)
    return FoundModel(
        name=name,
        path=item.path,
        format=item.format,
        modality=item.modality,
        size_bytes=item.size_bytes,
        source_repo=repo,
        revision=revision,
        servable=servable,
        reason=reason,
        in_hf_cache=repo is not None,
        architecture=item.architecture,
        display_name=item.display_name,
    )


# --- the Hugging Face cache -------------------------------------------------------------------

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _scan_hf_cache(cache: Path, cache_real: str, max_depth: int) -> list[tuple[FoundModel, str]]:
    d = _read_dir(cache, cache_real, cache_real)
    if d is None:
        return []
    out: list[tuple[FoundModel, str]] = []
    for name, entry in d.dirs.items():
        # `datasets--`, `spaces--`, `.locks` and anything else are not models.
        if name.startswith("models--") and len(name) > len("models--"):
            repo_id = name[len("models--") :].replace("--", "/")
            out.extend(_scan_hf_repo(entry.path, entry.real, repo_id, max_depth))
    return out


@dataclass
class _Snapshot:
    commit: str
    path: Path
    real: str
    mtime: float
    items: list[_Item]

    @property
    def complete(self) -> bool:
        return bool(self.items) and not any(item.defects for item in self.items)


def _scan_hf_repo(
    repo_path: Path, repo_real: str, repo_id: str, max_depth: int
) -> list[tuple[FoundModel, str]]:
    pending = _pending_blobs(repo_real)
    main = _read_ref(repo_real, "main")
    snapshots: list[_Snapshot] = []
    snaps_real = _realdir(Path(repo_real, "snapshots"))
    if snaps_real is None or not _inside(snaps_real, repo_real):
        return []
    snap_dir = _read_dir(repo_path / "snapshots", snaps_real, repo_real)
    for commit, entry in (snap_dir.dirs if snap_dir else {}).items():
        if _hidden(commit):
            continue
        walk = _Walk(boundary=repo_real, max_depth=max_depth, skip_hub_folders=False)
        items = walk.run(entry.path, entry.real)
        _charge_pending(items, pending, _tree_etags(repo_real, commit), commit == main or not main)
        try:
            mtime = os.stat(entry.real).st_mtime
        except OSError:
            mtime = 0.0
        snapshots.append(_Snapshot(commit, entry.path, entry.real, mtime, items))
    if not snapshots:
        return []

    snapshots.sort(key=lambda s: (s.commit != main, -s.mtime, s.commit))
    primary = next((s for s in snapshots if s.complete), snapshots[0])
    out: list[tuple[FoundModel, str]] = []
    for snap in snapshots:
        if snap is not primary and not snap.complete and snap.commit != main:
            continue  # a partial download of an old revision
        base = repo_id if snap is primary else f"{repo_id}@{snap.commit[:12]}"
        for item in snap.items:
            name = base if len(snap.items) == 1 or not item.rel else f"{base}/{item.rel}"
            out.append((_finish(item, name, repo=repo_id, revision=snap.commit), item.real))
    return out


def _pending_blobs(repo_real: str) -> set[str]:
    """Etags of blobs being downloaded (or left behind by a killed download) and not finished.

    huggingface_hub writes `blobs/{etag}.{id}.incomplete` (older versions `{etag}.incomplete`)
    and renames it to `blobs/{etag}` when done; a leftover next to a finished blob is stale.
    """
    try:
        names = os.listdir(os.path.join(repo_real, "blobs"))
    except OSError:
        return set()
    finished = {n for n in names if "." not in n}
    return {n.split(".", 1)[0] for n in names if n.endswith(".incomplete")} - finished


def _read_ref(repo_real: str, ref: str) -> str:
    try:
        with open(os.path.join(repo_real, "refs", ref), encoding="ascii", errors="replace") as f:
            commit = f.read(256).strip()
    except OSError:
        return ""
    return commit if _COMMIT.match(commit) else ""


def _tree_etags(repo_real: str, commit: str) -> dict[str, list[str]] | None:
    """Etag -> paths of the files of `commit`, from huggingface_hub's tree cache, if it has one."""
    if not _COMMIT.match(commit):
        return None
    tree, problem = _read_json(os.path.join(repo_real, "trees", f"{commit}.json"))
    files = tree.get("files") if isinstance(tree, dict) else None
    if problem or not isinstance(files, dict):
        return None
    etags: dict[str, list[str]] = {}
    for path, info in files.items():
        if isinstance(info, dict):
            # The blob is named after the LFS sha256 for LFS files, the git blob id otherwise.
            etag = info.get("lfs_sha256") or info.get("blob_id")
            if isinstance(etag, str):
                etags.setdefault(etag, []).append(path)
    return etags


def _charge_pending(
    items: list[_Item], pending: set[str], tree: dict[str, list[str]] | None, is_main: bool
) -> None:
    if not pending:
        return
    if tree is None:
        if is_main:
            for item in items:
                item.defects.append(f"download incomplete: {_files(len(pending))} pending")
        return
    paths = sorted(p for etag in pending for p in tree.get(etag, ()))
    for item in items:
        mine = [p for p in paths if _covers(item, p)]
        if mine:
            item.defects.append(f"download incomplete: {_files(len(mine))} pending ({mine[0]})")


def _covers(item: _Item, path: str) -> bool:
    if item.files:
        return path in item.files
    return not item.rel or path.startswith(item.rel + "/")
