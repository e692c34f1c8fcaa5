"""The offline tiny model: builds, reloads without a network, is deterministic."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pluggably.devtools.tiny_model import MODEL_FILES, build_tiny_model, is_complete, main


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_builds_a_small_complete_model(tiny_model_dir: Path) -> None:
    assert is_complete(tiny_model_dir)
    for name in MODEL_FILES:
        assert (tiny_model_dir / name).is_file(), name
    assert (tiny_model_dir / "model.safetensors").stat().st_size > 0
    total = sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.is_file())
    assert total < 2 * 1024 * 1024
    # No temporary build folders left behind next to it.
    assert [p.name for p in tiny_model_dir.parent.iterdir()] == [tiny_model_dir.name]


def test_module_import_is_cheap() -> None:
    code = (
        "import sys, pluggably.devtools.tiny_model\n"
        "heavy = {'torch', 'transformers', 'tokenizers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_reloads_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {str(tiny_model_dir)!r}
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 128
assert model.config.max_position_embeddings == 512
assert model.config.vocab_size == len(tok)
gc = model.generation_config
assert tok.eos_token_id in gc.eos_token_id and gc.pad_token_id == tok.pad_token_id
assert gc.bos_token_id == tok.bos_token_id
ids = tok("Hello world", return_tensors="pt")
assert ids["input_ids"][0, 0].item() == tok.bos_token_id
out = model.generate(**ids, max_new_tokens=5, do_sample=False)
assert out.shape[1] <= ids["input_ids"].shape[1] + 5
print("ok")
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache: nothing to fall back on
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


def test_tokenizer_round_trips_text(tokenizer) -> None:
    text = "Hello, wörld! 東京 🙂 def add(a, b):"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert 500 <= len(tokenizer) <= 1100
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|pad|>"


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": "4", "name": "calculator"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    )
    assert "<|start_header_id|>tool (calculator)<|end_header_id|>\n\n4<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without.endswith("4<|eot_id|>")

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in ids

    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "wizard", "content": "hi"}], tokenize=False)


def test_deterministic_per_seed(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert digest(again) == digest(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (
        tiny_model_dir / "tokenizer.json"
    ).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()


def test_building_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_model(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_cli_skips_a_complete_model_unless_forced(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli-model"
    assert main([str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    weights = out / "model.safetensors"
    first = weights.stat().st_mtime_ns
    os.utime(weights, ns=(first - 10**9, first - 10**9))
    marked = weights.stat().st_mtime_ns

    assert main([str(out)]) == 0  # complete: nothing rebuilt
    assert weights.stat().st_mtime_ns == marked

    assert main([str(out), "--force"]) == 0
    assert weights.stat().st_mtime_ns != marked

    (out / "tokenizer.json").unlink()  # incomplete: rebuilt without --force
    assert main([str(out)]) == 0
    assert is_complete(out)
