"""Builds a tiny GGUF file (llama.cpp's single-file format) from the tiny random Llama, offline.

Discovery finds GGUF files and the GGUF text runner serves them; both need a real file to test
against, and none can be downloaded here. This writes one with the `gguf` package's writer, laid
out the way llama.cpp's `convert_hf_to_gguf.py` lays out a Llama with a byte-level BPE tokenizer
(Llama 3 style), so that transformers' GGUF loader maps it back to the same model:

- metadata: `llama.*` hyperparameters, and the tokenizer as `tokenizer.ggml.*` (model `gpt2`,
  the tokens spelled in the byte-level alphabet, token types with the special tokens marked
  CONTROL, merges, BOS/EOS/EOT/padding ids, `add_bos_token`, the chat template);
- tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...; no `output` tensor when
  the embeddings are tied), with the query and key projections permuted the way llama.cpp's
  converter does (its rotary embedding pairs neighbouring dimensions, transformers' pairs
  halves; transformers' loader undoes the permutation).

F32 tensors give back the original weights bit for bit, so greedy decoding of the GGUF model
matches the transformers model token for token; F16 and Q8_0 (`tensor_type`) exercise the
conversion and dequantization paths with real rounding.

    python -m pluggably.devtools.tiny_gguf OUT_FILE [--force] [--seed N] [--type f32|f16|q8_0]

Only numpy, safetensors and gguf are needed to convert; `build_tiny_gguf` also builds the tiny
model first (torch, transformers, tokenizers). Module import stays cheap: all are imported
inside the functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

TensorType = Literal["f32", "f16", "q8_0"]
TENSOR_TYPES: tuple[TensorType, ...] = ("f32", "f16", "q8_0")

#: `general.name` of the files built here.
MODEL_NAME = "tiny-random-llama"

# Token types of llama.cpp's vocabulary (gguf.TokenType), written as plain ints.
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3


def build_tiny_gguf(out_file: Path, *, seed: int = 0, tensor_type: TensorType = "f32") -> Path:
    """Builds the tiny random Llama (`devtools.tiny_model`, same `seed`) and writes it as one GGUF
    file at `out_file` (replaced atomically); returns `out_file`.

    Deterministic: the same seed and type give a byte-identical file.
    """
    from pluggably.devtools.tiny_model import build_tiny_model

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-gguf-", dir=out_file.parent) as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", seed=seed)
        return convert_llama_folder(model_dir, out_file, tensor_type=tensor_type)


def convert_llama_folder(
    model_dir: Path, out_file: Path, *, tensor_type: TensorType = "f32"
) -> Path:
    """Writes the Llama in `model_dir` (a `save_pretrained` folder with `config.json`,
    `model.safetensors` and a byte-level BPE `tokenizer.json`) as a GGUF file at `out_file`.

    Meant for the tiny test models: no sharded weights, no SentencePiece tokenizers, no rope
    scaling. The file appears whole or not at all (written next to it, then renamed).
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    if tensor_type not in TENSOR_TYPES:
        raise ValueError(f"tensor_type must be one of {TENSOR_TYPES}, got {tensor_type!r}")
    model_dir = Path(model_dir)
    out_file = Path(out_file)
    config = _read_json(model_dir / "config.json")
    if config.get("model_type") != "llama":
        raise ValueError(f"{model_dir} holds a {config.get('model_type')!r} model, not a llama")
    vocab = _Vocab.read(model_dir)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    n_layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    rope = config.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[tensor_type]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.", dir=out_file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(MODEL_NAME)
        writer.add_file_type(int(file_type))
        if tensor_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(hidden)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta)
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_vocab_size(len(vocab.tokens))
        vocab.write(writer, config)

        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
        tensors = load_file(str(model_dir / "model.safetensors"))
        for hf_name in sorted(tensors):
            base, _, suffix = hf_name.rpartition(".")
            gguf_base = name_map.get_name(base)
            if gguf_base is None:
                raise ValueError(f"no GGUF name for tensor {hf_name!r}")
            data = tensors[hf_name].astype(np.float32)
            if gguf_base.endswith(".attn_q"):
                data = _permute(data, n_head, n_head)
            elif gguf_base.endswith(".attn_k"):
                data = _permute(data, n_head, n_head_kv)
            _add_tensor(writer, f"{gguf_base}.{suffix}", data, tensor_type)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the model from a service account
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def _add_tensor(writer: Any, name: str, data: Any, tensor_type: TensorType) -> None:
    import gguf
    import numpy as np

    # Like llama.cpp: one-dimensional tensors (the norms) stay F32 whatever the file type.
    if data.ndim == 1 or tensor_type == "f32":
        writer.add_tensor(name, data)
    elif tensor_type == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        q8 = gguf.GGMLQuantizationType.Q8_0
        # The writer takes the packed bytes and works the element shape out from them.
        writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)


def _permute(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """llama.cpp's `LlamaModel.permute`: regroups each head's rows from transformers' rotary
    layout (first half, second half) into interleaved pairs."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


class _Vocab:
    """The tokenizer of a transformers folder, as GGUF metadata wants it."""

    def __init__(
        self,
        tokens: list[str],
        types: list[int],
        merges: list[str],
        special: dict[str, int],
        chat_template: str | None,
        add_bos: bool,
    ) -> None:
        self.tokens = tokens
        self.types = types
        self.merges = merges
        self.special = special  # "bos"/"eos"/"pad" -> id
        self.chat_template = chat_template
        self.add_bos = add_bos

    @classmethod
    def read(cls, model_dir: Path) -> _Vocab:
        spec = _read_json(model_dir / "tokenizer.json")
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")):
            raise ValueError("only byte-level BPE tokenizers can be written (tokenizer model gpt2)")
        ids: dict[str, int] = dict(model["vocab"])
        control: set[int] = set()
        for added in spec.get("added_tokens") or []:
            ids[added["content"]] = int(added["id"])
            if added.get("special"):
                control.add(int(added["id"]))
        size = max(ids.values()) + 1
        tokens = [f"[PAD{i}]" for i in range(size)]  # llama.cpp's filler for unused ids
        for text, token_id in ids.items():
            tokens[token_id] = text
        types = [_TOKEN_CONTROL if i in control else _TOKEN_NORMAL for i in range(size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

        tok_config = _read_json(model_dir / "tokenizer_config.json")
        special: dict[str, int] = {}
        for role in ("bos", "eos", "pad"):
            value = tok_config.get(f"{role}_token")
            if isinstance(value, dict):  # an AddedToken spelled out
                value = value.get("content")
            if isinstance(value, str) and value in ids:
                special[role] = ids[value]
        # transformers 5 saves the template as its own file; older folders keep it in the config.
        template_file = model_dir / "chat_template.jinja"
        template: Any = tok_config.get("chat_template")
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        add_bos = "bos" in special and _post_processor_adds(
            spec.get("post_processor"), tokens[special["bos"]]
        )
        return cls(
            tokens, types, merges, special, template if isinstance(template, str) else None, add_bos
        )

    def write(self, writer: Any, config: dict[str, Any]) -> None:
        writer.add_tokenizer_model("gpt2")
        # llama.cpp's name for GPT-2's own pre-tokenizer regex, which `ByteLevel` applies.
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        # BPE ranks come from the merges; llama.cpp writes no scores for such vocabularies, but
        # readers that expect the array (and SentencePiece-minded tools) find neutral ones.
        writer.add_token_scores([0.0] * len(self.tokens))
        writer.add_token_merges(self.merges)
        if "bos" in self.special:
            writer.add_bos_token_id(self.special["bos"])
        # One EOS id fits the format: the tokenizer's own (end of turn for chat models); the
        # model's other end-of-sequence ids go where llama.cpp looks for them, or are found by
        # their text (`<|end_of_text|>`), as llama.cpp does.
        eos_ids = config.get("eos_token_id")
        eos_list = (
            eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
        )
        eos = self.special.get("eos", eos_list[0] if eos_list else None)
        if eos is not None:
            writer.add_eos_token_id(eos)
        if "<|eot_id|>" in self.tokens:
            writer.add_eot_token_id(self.tokens.index("<|eot_id|>"))
        if "pad" in self.special:
            writer.add_pad_token_id(self.special["pad"])
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _is_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(p) for p in pre.get("pretokenizers") or [])


def _post_processor_adds(post: Any, token: str) -> bool:
    """Whether the tokenizer's post-processor puts `token` in front of a single sequence."""
    if not isinstance(post, dict):
        return False
    if post.get("type") == "Sequence":
        return any(_post_processor_adds(p, token) for p in post.get("processors") or [])
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        first = single[0] if single else {}
        return bool(first.get("SpecialToken", {}).get("id") == token)
    return False


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pluggably-make-tiny-gguf",
        description="Write the tiny random Llama chat model as a GGUF file (offline, under 1 MB).",
    )
    parser.add_argument("out_file", type=Path, help="the .gguf file to write")
    parser.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the random weights (default 0)"
    )
    parser.add_argument(
        "--type",
        dest="tensor_type",
        choices=TENSOR_TYPES,
        default="f32",
        help="how the weight matrices are stored (default f32: exactly the original weights)",
    )
    args = parser.parse_args(argv)

    out_file: Path = args.out_file
    if out_file.is_dir():
        parser.error(f"{out_file} is a folder")
    if args.force or not out_file.is_file():
        build_tiny_gguf(out_file, seed=args.seed, tensor_type=args.tensor_type)
    print(out_file.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
