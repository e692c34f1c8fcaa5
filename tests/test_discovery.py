"""Auto-discovery of local models: every layout is built on disk here, offline, and scanned.

Weights are written with the real `safetensors` library, GGUF files with `struct` per the spec
(ggml-org/ggml docs/gguf.md), the transformers model is the project's tiny random Llama, and
the Hugging Face cache is laid out the way huggingface_hub 2.x lays it out (blobs named by
etag, relative snapshot links, refs, trees/{commit}.json, `*.incomplete` downloads).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest

from pluggably.catalog.discovery import (
    LONE_SAFETENSORS_REASON,
    CorruptModelFile,
    FoundModel,
    read_gguf_info,
    read_safetensors_header,
    scan,
)
from pluggably.core.types import Modality, ModelFormat

np = pytest.importorskip("numpy", reason="numpy is not installed: cannot write test weights")
st_numpy = pytest.importorskip(
    "safetensors.numpy", reason="safetensors is not installed: cannot write test weights"
)

# A sound GGUF file is servable: torch, transformers, gguf and accelerate are installed here.
GGUF_OK = (True, "")
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


# --- helpers: writing layouts ------------------------------------------------------------------


def by_name(found: list[FoundModel]) -> dict[str, FoundModel]:
    names = [m.name for m in found]
    assert len(names) == len(set(names)), names
    return {m.name: m for m in found}


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder`, links not followed."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def write_safetensors(path: Path, names: tuple[str, ...] = ("w",), n: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    st_numpy.save_file({name: np.arange(n, dtype=np.float32) for name in names}, str(path))
    return path


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def tiny_src(request: pytest.FixtureRequest) -> Path:
    pytest.importorskip("torch", reason="torch is not installed: cannot build the tiny model")
    pytest.importorskip("transformers", reason="transformers is not installed")
    return request.getfixturevalue("tiny_model_dir")


def copy_tiny(tiny_src: Path, dest: Path) -> Path:
    shutil.copytree(tiny_src, dest)
    return dest


# GGUF (little-endian): magic, version u32, tensor count u64, metadata count u64, key-values,
# tensor infos, padding to the alignment, tensor data.
GGUF_UINT32, GGUF_STRING, GGUF_ARRAY, GGUF_F32, GGUF_Q8_0 = 4, 8, 9, 0, 8


def gguf_str(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def kv_str(key: str, value: str) -> tuple[str, int, bytes]:
    return key, GGUF_STRING, gguf_str(value.encode())


def kv_u32(key: str, value: int) -> tuple[str, int, bytes]:
    return key, GGUF_UINT32, struct.pack("<I", value)


def kv_str_array(key: str, values: list[str]) -> tuple[str, int, bytes]:
    payload = struct.pack("<IQ", GGUF_STRING, len(values)) + b"".join(
        gguf_str(v.encode()) for v in values
    )
    return key, GGUF_ARRAY, payload


def gguf_bytes(
    kvs: list[tuple[str, int, bytes]] | None = None,
    tensors: list[tuple[str, list[int], int, bytes]] | None = None,
    *,
    version: int = 3,
    alignment: int = 32,
) -> bytes:
    if kvs is None:
        kvs = [
            kv_str("general.architecture", "llama"),
            kv_str("general.name", "Tiny Llama"),
            kv_u32("general.alignment", alignment),
            kv_str_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)]),
        ]
    if tensors is None:
        tensors = [
            ("token_embd.weight", [4, 2], GGUF_F32, struct.pack("<8f", *range(8))),
            # Q8_0: blocks of 32 values in 34 bytes.
            ("output.weight", [64], GGUF_Q8_0, bytes(range(68))),
        ]
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, payload in kvs:
        out += gguf_str(key.encode()) + struct.pack("<I", vtype) + payload
    data = b""
    for name, dims, ggml_type, blob in tensors:
        data += b"\0" * (-len(data) % alignment)
        out += gguf_str(name.encode()) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, len(data))
        data += blob
    out += b"\0" * (-len(out) % alignment)
    return out + data


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_hf_repo(
    cache: Path,
    repo_id: str,
    snapshots: dict[str, dict[str, bytes]],
    *,
    main: str | None,
    trees: dict[str, dict[str, bytes]] | None = None,
    kind: str = "models",
) -> Path:
    """A hub-cache repo: blobs named by their sha256 (the LFS etag), relative snapshot links,
    refs/main and, for the commits in `trees`, the tree listing huggingface_hub caches."""
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for commit, files in snapshots.items():
        for rel, content in files.items():
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.write_bytes(content)
            link = repo / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for commit, files in (trees or {}).items():
        listing = {
            rel: {
                "size": len(content),
                "blob_id": hashlib.sha1(content).hexdigest(),
                "lfs_sha256": hashlib.sha256(content).hexdigest(),
                "lfs_size": len(content),
            }
            for rel, content in files.items()
        }
        write_json(repo / "trees" / f"{commit}.json", {"format_version": 1, "files": listing})
    if main is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(main)
    return repo


def tiny_files(tiny_src: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tiny_src.iterdir() if p.is_file()}


def diffusers_layout(root: Path, pipeline: str, components: dict[str, str]) -> Path:
    """A diffusers pipeline folder: model_index.json and one subfolder per component.

    `components` maps a component to its kind: "model" (config.json and weights), "scheduler",
    "tokenizer".
    """
    index: dict[str, object] = {"_class_name": pipeline, "_diffusers_version": "0.42.0"}
    for name, kind in components.items():
        sub = root / name
        if kind == "model":
            index[name] = ["diffusers", "SomeModel"]
            write_json(sub / "config.json", {"_class_name": "SomeModel", "sample_size": 8})
            write_safetensors(sub / "diffusion_pytorch_model.safetensors")
        elif kind == "text_encoder":
            index[name] = ["transformers", "CLIPTextModel"]
            write_json(sub / "config.json", {"architectures": ["CLIPTextModel"]})
            write_safetensors(sub / "model.safetensors")
        elif kind == "scheduler":
            index[name] = ["diffusers", "DDIMScheduler"]
            write_json(sub / "scheduler_config.json", {"_class_name": "DDIMScheduler"})
        elif kind == "tokenizer":
            index[name] = ["transformers", "CLIPTokenizer"]
            write_json(sub / "vocab.json", {"a": 0})
            (sub / "merges.txt").write_text("#version: 0.2\n")
    index["safety_checker"] = [None, None]
    write_json(root / "model_index.json", index)
    return root


SD_COMPONENTS = {
    "unet": "model",
    "vae": "model",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}
SHAP_E_COMPONENTS = {
    "prior": "model",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
    "shap_e_renderer": "model",
}


# --- transformers folders ----------------------------------------------------------------------


def test_tiny_transformers_model_is_servable(tiny_src: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    model_dir = copy_tiny(tiny_src, models / "chat" / "tiny")
    (model_dir / "extra").mkdir()
    write_bytes(model_dir / "extra" / "notes.gguf", b"not a model on its own")

    (found,) = scan([models], None)

    assert found.name == "chat/tiny"
    assert found.path == model_dir
    assert found.format is ModelFormat.TRANSFORMERS
    assert found.modality is Modality.TEXT
    assert found.size_bytes == folder_bytes(model_dir)
    assert (found.servable, found.reason) == (True, "")
    assert found.architecture == "LlamaForCausalLM"
    assert (found.source_repo, found.revision, found.in_hf_cache) == (None, None, False)


def test_model_folder_given_directly_is_named_after_itself(tiny_src: Path, tmp_path: Path) -> None:
    model_dir = copy_tiny(tiny_src, tmp_path / "my-llama")
    (found,) = scan([model_dir], None)
    assert found.name == "my-llama"
    assert found.servable


@pytest.mark.parametrize(
    ("blocked", "reason"),
    [
        (["transformers"], "transformers is not installed (pip install 'pluggably[local]')"),
        (
            ["torch", "transformers"],
            "torch and transformers are not installed (pip install 'pluggably[local]')",
        ),
    ],
)
def test_not_servable_without_the_local_extra(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocked: list[str], reason: str
) -> None:
    copy_tiny(tiny_src, tmp_path / "m" / "tiny")
    # A None entry in sys.modules is Python's own way of making a module unimportable.
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)
    (found,) = scan([tmp_path / "m"], None)
    assert (found.servable, found.reason) == (False, reason)


def test_architecture_that_does_not_generate_text(tiny_src: Path, tmp_path: Path) -> None:
    model_dir = copy_tiny(tiny_src, tmp_path / "m" / "encoder")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(architectures=["BertModel"], model_type="bert")
    write_json(model_dir / "config.json", config)

    (found,) = scan([tmp_path / "m"], None)
    assert found.format is ModelFormat.TRANSFORMERS
    assert found.architecture == "BertModel"
    assert (found.servable, found.reason) == (
        False,
        "architecture BertModel is not a text generation model",
    )


def test_weights_missing(tiny_src: Path, tmp_path: Path) -> None:
    model_dir = copy_tiny(tiny_src, tmp_path / "m" / "tiny")
    (model_dir / "model.safetensors").unlink()
    (found,) = scan([tmp_path / "m"], None)
    assert (found.servable, found.reason) == (False, "weights missing")
    assert found.size_bytes == folder_bytes(model_dir)


def test_truncated_weights(tiny_src: Path, tmp_path: Path) -> None:
    model_dir = copy_tiny(tiny_src, tmp_path / "m" / "tiny")
    weights = model_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    (found,) = scan([tmp_path / "m"], None)
    assert not found.servable
    assert found.reason.startswith("model.safetensors is corrupt: truncated"), found.reason


def test_sharded_weights_with_a_shard_missing(tmp_path: Path) -> None:
    model_dir = tmp_path / "m" / "sharded"
    write_json(model_dir / "config.json", {"architectures": ["LlamaForCausalLM"]})
    write_json(model_dir / "tokenizer_config.json", {})
    write_safetensors(model_dir / "model-00001-of-00002.safetensors", ("a",))
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    write_json(model_dir / "model.safetensors.index.json", {"weight_map": shards})

    (found,) = scan([tmp_path / "m"], None)
    assert (found.servable, found.reason) == (
        False,
        "weights incomplete: 1 of 2 shards missing (model-00002-of-00002.safetensors)",
    )

    # The same folder with the shard: complete (the libraries may still be missing).
    write_safetensors(model_dir / "model-00002-of-00002.safetensors", ("b",))
    (found,) = scan([tmp_path / "m"], None)
    assert "shards missing" not in found.reason
    assert found.size_bytes == folder_bytes(model_dir)


def test_malformed_config_json(tmp_path: Path) -> None:
    model_dir = tmp_path / "m" / "broken"
    write_safetensors(model_dir / "model.safetensors")
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"')
    (found,) = scan([tmp_path / "m"], None)
    assert found.format is ModelFormat.TRANSFORMERS
    assert (found.servable, found.reason) == (False, "config.json is not valid JSON")


def test_stray_config_and_adapter_folders_are_not_models(tmp_path: Path) -> None:
    # A pooling folder's config.json (no model type, no weights) and a PEFT adapter.
    write_json(tmp_path / "m" / "pooling" / "config.json", {"pooling_mode_mean_tokens": True})
    write_json(tmp_path / "m" / "lora" / "adapter_config.json", {"r": 8})
    write_safetensors(tmp_path / "m" / "lora" / "adapter_model.safetensors")
    assert scan([tmp_path / "m"], None) == []


def test_interrupted_local_dir_download(tiny_src: Path, tmp_path: Path) -> None:
    model_dir = copy_tiny(tiny_src, tmp_path / "m" / "tiny")
    download = model_dir / ".cache" / "huggingface" / "download"
    write_bytes(download / "c2hvcnQ=.abc123.0f1e2d3c.incomplete", b"partial")
    (found,) = scan([tmp_path / "m"], None)
    assert (found.servable, found.reason) == (False, "download incomplete: 1 file pending")

    # Once the file is recorded as downloaded with that etag, the leftover is stale.
    (download / "tokenizer.json.metadata").write_text(f"{COMMIT_A}\nabc123\n{time.time()}\n")
    (found,) = scan([tmp_path / "m"], None)
    assert (found.servable, found.reason) == (True, "")


# --- diffusers pipelines -----------------------------------------------------------------------


def test_stable_diffusion_pipeline(tmp_path: Path) -> None:
    root = diffusers_layout(tmp_path / "m" / "sd-tiny", "StableDiffusionPipeline", SD_COMPONENTS)
    (found,) = scan([tmp_path / "m"], None)  # components are not models of their own
    assert found.name == "sd-tiny"
    assert found.format is ModelFormat.DIFFUSERS
    assert found.modality is Modality.IMAGE
    assert found.architecture == "StableDiffusionPipeline"
    # Servable: torch and diffusers are installed here (without them: the next test).
    assert (found.servable, found.reason) == (True, "")
    assert found.size_bytes == folder_bytes(root)


def test_a_pipeline_without_diffusers_installed_is_not_servable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    diffusers_layout(tmp_path / "m" / "sd-tiny", "StableDiffusionPipeline", SD_COMPONENTS)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    (found,) = scan([tmp_path / "m"], None)
    assert not found.servable and "diffusers is not installed" in found.reason


def test_shap_e_pipeline_is_a_mesh_model(tmp_path: Path) -> None:
    root = diffusers_layout(tmp_path / "m" / "shap-e", "ShapEPipeline", SHAP_E_COMPONENTS)
    (found,) = scan([tmp_path / "m"], None)
    assert found.format is ModelFormat.DIFFUSERS
    assert found.modality is Modality.MESH
    assert (found.servable, found.reason) == (True, "")  # torch, diffusers, trimesh here
    assert found.size_bytes == folder_bytes(root)


def test_incomplete_pipeline(tmp_path: Path) -> None:
    root = diffusers_layout(tmp_path / "m" / "sdxl", "StableDiffusionXLPipeline", SD_COMPONENTS)
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(root / "scheduler")
    (found,) = scan([tmp_path / "m"], None)
    assert found.modality is Modality.IMAGE
    assert (found.servable, found.reason) == (
        False,
        "unet: weights missing; scheduler: component folder missing",
    )


def test_malformed_model_index(tmp_path: Path) -> None:
    write_bytes(tmp_path / "m" / "pipe" / "model_index.json", b"\xff\xfe not json")
    (found,) = scan([tmp_path / "m"], None)
    assert found.format is ModelFormat.DIFFUSERS
    assert (found.servable, found.reason) == (False, "model_index.json is not valid JSON")


# --- GGUF --------------------------------------------------------------------------------------


def test_gguf_file(tmp_path: Path) -> None:
    data = gguf_bytes()
    path = write_bytes(tmp_path / "m" / "llama" / "tiny-q8_0.gguf", data)

    info = read_gguf_info(path)
    assert (info.version, info.tensor_count, info.metadata_count) == (3, 2, 4)
    assert (info.architecture, info.name, info.data_checked) == ("llama", "Tiny Llama", True)

    (found,) = scan([tmp_path / "m"], None)
    assert found.name == "llama/tiny-q8_0.gguf"
    assert found.path == path
    assert found.format is ModelFormat.GGUF
    assert found.modality is Modality.TEXT
    assert found.size_bytes == len(data)
    assert (found.architecture, found.display_name) == ("llama", "Tiny Llama")
    assert (found.servable, found.reason) == GGUF_OK


@pytest.mark.parametrize(
    ("mangle", "reason_start"),
    [
        pytest.param(lambda d: d[:200], "corrupt GGUF file: truncated", id="cut-in-metadata"),
        pytest.param(lambda d: d[:-1], "corrupt GGUF file: truncated", id="cut-in-tensor-data"),
        pytest.param(lambda d: b"GGML" + d[4:], "corrupt GGUF file: not a GGUF file", id="magic"),
        pytest.param(lambda d: b"", "corrupt GGUF file: not a GGUF file", id="empty"),
        pytest.param(
            lambda d: d[:4] + struct.pack("<I", 1) + d[8:],
            "corrupt GGUF file: unsupported GGUF version 1",
            id="version-1",
        ),
        pytest.param(
            lambda d: d[:16] + struct.pack("<Q", 2**62) + d[24:],
            "corrupt GGUF file: header claims",
            id="huge-count",
        ),
        pytest.param(
            # The first key's length, set to 2**63: must be refused, never allocated.
            lambda d: d[:24] + struct.pack("<Q", 2**63) + d[32:],
            "corrupt GGUF file: truncated",
            id="huge-key-length",
        ),
    ],
)
def test_damaged_gguf(tmp_path: Path, mangle, reason_start: str) -> None:
    write_bytes(tmp_path / "m" / "bad.gguf", mangle(gguf_bytes()))
    (found,) = scan([tmp_path / "m"], None)
    assert found.format is ModelFormat.GGUF
    assert not found.servable
    assert found.reason.startswith(reason_start), found.reason


def test_gguf_string_array_running_past_the_file(tmp_path: Path) -> None:
    kvs = [("tokenizer.ggml.tokens", GGUF_ARRAY, struct.pack("<IQ", GGUF_STRING, 2**40))]
    path = write_bytes(tmp_path / "a.gguf", gguf_bytes(kvs, []))
    with pytest.raises(CorruptModelFile, match="runs past the end"):
        read_gguf_info(path)


def test_split_gguf_is_one_model(tmp_path: Path) -> None:
    first = write_bytes(tmp_path / "m" / "big-00001-of-00002.gguf", gguf_bytes())
    second = write_bytes(
        tmp_path / "m" / "big-00002-of-00002.gguf", gguf_bytes([kv_u32("split.no", 1)])
    )
    (found,) = scan([tmp_path / "m"], None)
    assert found.name == "big-00001-of-00002.gguf"
    assert found.path == first
    assert found.size_bytes == first.stat().st_size + second.stat().st_size
    assert (found.servable, found.reason) == GGUF_OK

    second.unlink()
    (found,) = scan([tmp_path / "m"], None)
    assert found.reason == "split GGUF: 1 of 2 shards missing"


# --- loose safetensors -------------------------------------------------------------------------


def test_loose_safetensors_files(tmp_path: Path) -> None:
    text = write_safetensors(tmp_path / "m" / "loose" / "weights.safetensors", ("lm_head",))
    image = write_safetensors(
        tmp_path / "m" / "sd15.safetensors", ("model.diffusion_model.input_blocks.0",)
    )
    found = by_name(scan([tmp_path / "m"], None))
    assert set(found) == {"loose/weights.safetensors", "sd15.safetensors"}
    for model, path, modality in (
        (found["loose/weights.safetensors"], text, Modality.TEXT),
        (found["sd15.safetensors"], image, Modality.IMAGE),
    ):
        assert model.path == path
        assert model.format is ModelFormat.SAFETENSORS
        assert model.modality is modality
        assert model.size_bytes == path.stat().st_size
        assert (model.servable, model.reason) == (False, LONE_SAFETENSORS_REASON)


TENSOR_HEADER = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"\x01\x02", "truncated (2 bytes, no header)", id="tiny"),
        pytest.param(
            struct.pack("<Q", 1000) + b"{}",
            "truncated (header of 1000 bytes, file of 10)",
            id="hdr",
        ),
        pytest.param(
            struct.pack("<Q", 2**62) + b"{}", f"header length {2**62} exceeds", id="huge-header"
        ),
        pytest.param(struct.pack("<Q", 3) + b"{x}", "header is not valid JSON", id="json"),
        pytest.param(struct.pack("<Q", 2) + b"[]", "header is not a JSON object", id="list"),
        pytest.param(
            struct.pack("<Q", len(TENSOR_HEADER)) + TENSOR_HEADER,
            "truncated (tensor data needs 16 bytes, has 0)",
            id="data",
        ),
    ],
)
def test_corrupt_loose_safetensors(tmp_path: Path, content: bytes, reason: str) -> None:
    write_bytes(tmp_path / "m" / "bad.safetensors", content)
    (found,) = scan([tmp_path / "m"], None)
    assert found.format is ModelFormat.SAFETENSORS
    assert not found.servable
    assert found.reason.startswith(f"corrupt safetensors file: {reason}"), found.reason


def test_safetensors_with_trailing_bytes(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "x.safetensors")
    assert set(read_safetensors_header(path)) == {"w"}
    with path.open("ab") as f:
        f.write(b"junk")
    with pytest.raises(CorruptModelFile, match="4 unexpected bytes"):
        read_safetensors_header(path)


# --- the Hugging Face cache --------------------------------------------------------------------


def test_hf_cache_snapshot(tiny_src: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    files = tiny_files(tiny_src)
    # Two paths with the same content link to one blob: its bytes count once.
    files["copies/config.json"] = files["config.json"]
    repo = make_hf_repo(cache, "acme/tiny", {COMMIT_A: files}, main=COMMIT_A)
    make_hf_repo(
        cache, "acme/data", {COMMIT_A: tiny_files(tiny_src)}, main=COMMIT_A, kind="datasets"
    )
    blobs = {hashlib.sha256(content).hexdigest() for content in files.values()}

    (found,) = scan([], cache)

    assert found.name == "acme/tiny"
    assert found.path == repo / "snapshots" / COMMIT_A
    assert (found.source_repo, found.revision, found.in_hf_cache) == ("acme/tiny", COMMIT_A, True)
    assert found.format is ModelFormat.TRANSFORMERS
    assert found.size_bytes == sum((repo / "blobs" / b).stat().st_size for b in blobs)
    assert found.size_bytes < sum(len(c) for c in files.values())
    assert (found.servable, found.reason) == (True, "")


def test_hf_cache_pending_upgrade_keeps_the_complete_snapshot(
    tiny_src: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    old = tiny_files(tiny_src)
    new = dict(old, **{"model.safetensors": old["model.safetensors"] + b"new"})
    partial = {k: v for k, v in new.items() if k != "model.safetensors"}
    repo = make_hf_repo(
        cache, "acme/tiny", {COMMIT_A: old, COMMIT_B: partial}, main=COMMIT_B, trees={COMMIT_B: new}
    )
    new_etag = hashlib.sha256(new["model.safetensors"]).hexdigest()
    write_bytes(repo / "blobs" / f"{new_etag}.5e6f7a8b.incomplete", b"half")
    # A leftover of a killed download whose blob was finished later: stale, ignored.
    old_etag = hashlib.sha256(old["tokenizer.json"]).hexdigest()
    write_bytes(repo / "blobs" / f"{old_etag}.0a1b2c3d.incomplete", b"stale")

    found = by_name(scan([], cache))

    assert set(found) == {"acme/tiny", f"acme/tiny@{COMMIT_B[:12]}"}
    current = found["acme/tiny"]
    assert (current.revision, current.servable, current.reason) == (COMMIT_A, True, "")
    pending = found[f"acme/tiny@{COMMIT_B[:12]}"]
    assert pending.revision == COMMIT_B
    assert not pending.servable
    assert "download incomplete: 1 file pending (model.safetensors)" in pending.reason
    assert "weights missing" in pending.reason


def test_hf_cache_only_incomplete_snapshot_is_reported_not_servable(
    tiny_src: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    repo = make_hf_repo(cache, "acme/tiny", {COMMIT_A: tiny_files(tiny_src)}, main=COMMIT_A)
    # A link whose blob is gone, and a pending blob with no tree listing: charged to refs/main.
    (
        repo / "blobs" / hashlib.sha256((tiny_src / "tokenizer.json").read_bytes()).hexdigest()
    ).unlink()
    write_bytes(repo / "blobs" / f"{'c' * 64}.incomplete", b"")

    (found,) = scan([], cache)
    assert found.name == "acme/tiny"
    assert not found.servable
    assert "tokenizer.json is a broken link" in found.reason
    assert "download incomplete: 1 file pending" in found.reason


def test_hf_cache_old_complete_snapshots_are_reported_by_revision(
    tiny_src: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    files = tiny_files(tiny_src)
    broken = {k: v for k, v in files.items() if k != "model.safetensors"}
    make_hf_repo(
        cache, "acme/tiny", {COMMIT_A: files, COMMIT_B: files, "c" * 40: broken}, main=COMMIT_B
    )
    found = by_name(scan([], cache))
    # refs/main is the plain name; the old complete one keeps its revision; the old partial one
    # is left out.
    assert set(found) == {"acme/tiny", f"acme/tiny@{COMMIT_A[:12]}"}
    assert found["acme/tiny"].revision == COMMIT_B
    assert found[f"acme/tiny@{COMMIT_A[:12]}"].servable


def test_hf_cache_gguf_repo_with_several_files(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    files = {"q4/tiny-q4.gguf": gguf_bytes(), "tiny-q8.gguf": gguf_bytes(alignment=64)}
    make_hf_repo(cache, "acme/tiny-GGUF", {COMMIT_A: files}, main=COMMIT_A)
    found = by_name(scan([], cache))
    assert set(found) == {"acme/tiny-GGUF/q4/tiny-q4.gguf", "acme/tiny-GGUF/tiny-q8.gguf"}
    for model in found.values():
        assert model.format is ModelFormat.GGUF
        assert (model.source_repo, model.revision) == ("acme/tiny-GGUF", COMMIT_A)
        assert (model.servable, model.reason) == GGUF_OK


def test_hf_snapshot_link_leaving_the_repo_is_not_followed(tmp_path: Path) -> None:
    outside = write_bytes(tmp_path / "outside" / "secret.gguf", gguf_bytes())
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--x" / "snapshots" / COMMIT_A
    snapshot.mkdir(parents=True)
    (snapshot / "model.gguf").symlink_to(outside)
    assert scan([], cache) == []


# --- symlinks, depth, hidden and unreadable entries ---------------------------------------------


def test_symlinks_leaving_the_folder_are_not_followed(tiny_src: Path, tmp_path: Path) -> None:
    outside = copy_tiny(tiny_src, tmp_path / "outside" / "tiny")
    write_bytes(tmp_path / "outside" / "x.gguf", gguf_bytes())
    models = tmp_path / "models"
    models.mkdir()
    (models / "linked-model").symlink_to(outside)
    (models / "linked.gguf").symlink_to(tmp_path / "outside" / "x.gguf")
    (models / "ghost.gguf").symlink_to(tmp_path / "nowhere.gguf")
    # A model folder whose weights link out: not followed, so the model is not servable.
    inner = copy_tiny(tiny_src, models / "inner")
    (inner / "model.safetensors").unlink()
    (inner / "model.safetensors").symlink_to(outside / "model.safetensors")

    (found,) = scan([models], None)

    assert found.name == "inner"
    assert not found.servable
    assert "model.safetensors links outside the scanned folder (not followed)" in found.reason
    assert found.size_bytes == folder_bytes(inner)  # the link's target is not counted


def test_links_inside_the_folder_are_followed_once(tmp_path: Path) -> None:
    models = tmp_path / "models"
    real = write_bytes(models / "store" / "a.gguf", gguf_bytes())
    (models / "alias.gguf").symlink_to(real)
    (models / "loop").symlink_to(models)  # a cycle must end

    found = scan([models], None)
    assert len(found) == 1
    assert found[0].name in {"alias.gguf", "store/a.gguf"}


def test_depth_limit_and_hidden_folders(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_bytes(models / "a" / "b" / "c" / "four.gguf", gguf_bytes())
    write_bytes(models / "a" / "b" / "c" / "d" / "five.gguf", gguf_bytes())
    write_bytes(models / ".hidden" / "h.gguf", gguf_bytes())
    write_bytes(models / "a" / ".h.gguf", gguf_bytes())

    assert {m.name for m in scan([models], None)} == {"a/b/c/four.gguf"}
    assert {m.name for m in scan([models], None, max_depth=5)} == {
        "a/b/c/four.gguf",
        "a/b/c/d/five.gguf",
    }
    assert scan([models], None, max_depth=3) == []


def test_fifo_and_missing_folders_do_not_hang_or_raise(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    os.mkfifo(models / "pipe.gguf")
    os.mkfifo(models / "pipe.safetensors")
    assert scan([models, tmp_path / "missing"], tmp_path / "no-cache") == []


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="runs as root: file permissions do not stop root from reading",
)
def test_unreadable_files(tmp_path: Path) -> None:
    models = tmp_path / "models"
    gguf = write_bytes(models / "locked.gguf", gguf_bytes())
    locked_dir = models / "locked-dir"
    write_bytes(locked_dir / "x.gguf", gguf_bytes())
    gguf.chmod(0)
    locked_dir.chmod(0)
    try:
        (found,) = scan([models], None)
    finally:
        locked_dir.chmod(0o755)
    assert found.name == "locked.gguf"
    assert (found.servable, found.reason) == (False, "GGUF file cannot be read")


def test_overlapping_folders_report_a_model_once(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_bytes(models / "sub" / "x.gguf", gguf_bytes())
    found = scan([models, models / "sub"], None)
    assert [m.name for m in found] == ["sub/x.gguf"]
