"""The offline tiny Stable Diffusion pipeline: builds, reloads without a network, generates
64x64 noise reproducibly, reports and stops at steps, and builds deterministically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pluggably.devtools.tiny_image import (
    IMAGE_SIZE,
    MAX_PROMPT_TOKENS,
    PIPELINE_FILES,
    build_tiny_image_pipeline,
    is_complete,
    main,
)

pytest.importorskip("diffusers", reason="diffusers is not installed on this machine")
pytest.importorskip("PIL", reason="pillow is not installed on this machine")

PROMPT = "a photo of a red lighthouse at sunset"


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The model is so small that one thread is fastest; with two on a shared 2-core machine,
    each step waits for a descheduled thread and a 2-step generation took 3 s instead of 30 ms."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_image_pipeline(tmp_path_factory.mktemp("images") / "tiny-sd")


@pytest.fixture(scope="module")
def pipe(pipeline_dir: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def unet_batches(pipe: Any) -> Iterator[list[int]]:
    """The batch size of every UNet call the pipeline makes while the test runs."""
    batches: list[int] = []
    handle = pipe.unet.register_forward_hook(
        lambda _module, args, _output: batches.append(args[0].shape[0])
    )
    yield batches
    handle.remove()


def generate(pipe: Any, seed: int = 0, **kwargs: Any) -> Any:
    import torch

    kwargs.setdefault("num_inference_steps", 2)
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, generator=generator, **kwargs).images


def pixels(image: Any) -> bytes:
    return bytes(image.tobytes())


def test_builds_a_complete_small_pipeline(pipeline_dir: Path) -> None:
    assert is_complete(pipeline_dir)
    for name in PIPELINE_FILES:
        assert (pipeline_dir / name).is_file(), name
    total = sum(p.stat().st_size for p in pipeline_dir.rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024
    # No temporary build folders left behind, next to it or inside it.
    assert [p.name for p in pipeline_dir.parent.iterdir()] == [pipeline_dir.name]
    assert not [p for p in pipeline_dir.rglob(".*")]

    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]

    # What a reader computes the default size from, without loading anything.
    unet = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    vae = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == IMAGE_SIZE
    assert unet["in_channels"] == vae["latent_channels"] == 4

    card = (pipeline_dir / "README.md").read_text()
    assert "random noise" in card.lower() and "library_name: diffusers" in card


def test_module_import_is_cheap() -> None:
    code = (
        "import sys, pluggably.devtools.tiny_image\n"
        "heavy = {'torch', 'transformers', 'diffusers', 'PIL'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_loads_and_generates_offline(pipeline_dir: Path, tmp_path: Path) -> None:
    code = f"""
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(pipeline_dir)!r}, local_files_only=True)
assert isinstance(pipe, StableDiffusionPipeline), type(pipe)
assert pipe.safety_checker is None and pipe.feature_extractor is None
assert pipe.tokenizer.model_max_length == {MAX_PROMPT_TOKENS}
pipe.set_progress_bar_config(disable=True)
image = pipe("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
assert image.size == ({IMAGE_SIZE}, {IMAGE_SIZE}), image.size
print("ok")
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache: nothing to fall back on
        "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
        "HF_ENDPOINT": "http://127.0.0.1:9",  # were anything to reach out, it would fail
        "OMP_NUM_THREADS": "1",  # see one_torch_thread
    }
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_tokenizer_takes_any_prompt(pipe: Any, pipeline_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = pipe.tokenizer
    assert tokenizer.tokenize("A photo of a CAT") == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
    ]

    text = "Ünïcödé   wörld! 東京 🙂 <b>\ttab\nline 42 it's"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The unknown token is <|endoftext|> (as in CLIP): no symbol of the prompt may fall back on it.
    assert tokenizer.unk_token_id not in ids
    decoded = tokenizer.decode(ids)
    assert decoded.replace(" ", "") == "".join(text.lower().split())

    long = tokenizer("word " * 200, padding="max_length", truncation=True)["input_ids"]
    assert len(long) == MAX_PROMPT_TOKENS
    assert long[0] == tokenizer.bos_token_id and long[-1] == tokenizer.eos_token_id

    # The classic vocab.json + merges.txt alone make the same tokenizer.
    classic = tmp_path / "classic"
    classic.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (classic / name).write_bytes((pipeline_dir / "tokenizer" / name).read_bytes())
    again = CLIPTokenizer.from_pretrained(classic, model_max_length=MAX_PROMPT_TOKENS)
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(again) == len(tokenizer) == pipe.text_encoder.config.vocab_size


def test_generates_an_image_of_the_requested_and_default_size(pipe: Any) -> None:
    from PIL import Image

    (explicit,) = generate(pipe, width=IMAGE_SIZE, height=IMAGE_SIZE)
    (default,) = generate(pipe)
    for image in (explicit, default):
        assert isinstance(image, Image.Image)
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert image.mode == "RGB"
    assert pixels(explicit) == pixels(default)
    assert any(low < high for low, high in explicit.getextrema())  # noise, not a blank image

    (wide,) = generate(pipe, width=2 * IMAGE_SIZE, height=IMAGE_SIZE)
    assert wide.size == (2 * IMAGE_SIZE, IMAGE_SIZE)


def test_same_seed_same_pixels_other_seed_other_pixels(pipe: Any) -> None:
    (first,) = generate(pipe, seed=7)
    (again,) = generate(pipe, seed=7)
    (other,) = generate(pipe, seed=8)
    assert pixels(first) == pixels(again)
    assert pixels(first) != pixels(other)


def test_step_callback_sees_every_step(pipe: Any, unet_batches: list[int]) -> None:
    seen: list[tuple[int, float]] = []

    def on_step(_pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        assert "latents" in kwargs
        seen.append((step, float(timestep)))
        return kwargs

    generate(pipe, num_inference_steps=4, callback_on_step_end=on_step)
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    timesteps = [t for _, t in seen]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 4
    assert len(unet_batches) == 4


def test_interrupt_stops_the_denoising_loop(pipe: Any, unet_batches: list[int]) -> None:
    seen: list[int] = []

    def stop_after_two(pipeline: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> Any:
        seen.append(step)
        if step == 1:
            pipeline._interrupt = True
        return kwargs

    images = generate(pipe, num_inference_steps=10, callback_on_step_end=stop_after_two)
    assert seen == [0, 1]
    assert len(unet_batches) == 2  # the remaining steps did no work
    assert images[0].size == (IMAGE_SIZE, IMAGE_SIZE)  # what there is still comes back

    # The flag is per call: the next generation runs all its steps.
    unet_batches.clear()
    generate(pipe, num_inference_steps=3)
    assert len(unet_batches) == 3


def test_several_images_per_prompt(pipe: Any) -> None:
    images = generate(pipe, num_images_per_prompt=2)
    assert len(images) == 2
    assert all(image.size == (IMAGE_SIZE, IMAGE_SIZE) for image in images)
    assert pixels(images[0]) != pixels(images[1])


def test_negative_prompt_and_guidance_scale_are_used(pipe: Any, unet_batches: list[int]) -> None:
    (plain,) = generate(pipe, guidance_scale=7.5)
    (negative,) = generate(pipe, guidance_scale=7.5, negative_prompt="blurry, ugly")
    (stronger,) = generate(pipe, guidance_scale=15.0, negative_prompt="blurry, ugly")
    assert pixels(plain) != pixels(negative)
    assert pixels(negative) != pixels(stronger)
    # Classifier-free guidance runs the UNet on the prompt and the negative prompt together.
    assert unet_batches == [2] * 6

    unet_batches.clear()
    (unguided,) = generate(pipe, guidance_scale=1.0, negative_prompt="blurry")
    assert unet_batches == [1, 1]  # a scale of 1 turns guidance (and the negative prompt) off
    assert unguided.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_build_is_deterministic_per_seed(pipeline_dir: Path, tmp_path: Path) -> None:
    built = file_bytes(pipeline_dir)
    assert file_bytes(build_tiny_image_pipeline(tmp_path / "again", seed=0)) == built

    other = file_bytes(build_tiny_image_pipeline(tmp_path / "other", seed=1))
    assert other.keys() == built.keys()
    for name in ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert other[name] == built[name], name
    for name in PIPELINE_FILES:
        if name.endswith(".safetensors"):
            assert other[name] != built[name], name


def test_building_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_image_pipeline(tmp_path / "p", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_cli_skips_a_complete_pipeline_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-pipeline"
    assert main([str(out), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    first = weights.stat().st_mtime_ns
    os.utime(weights, ns=(first - 10**9, first - 10**9))
    marked = weights.stat().st_mtime_ns

    assert main([str(out)]) == 0  # complete: nothing rebuilt
    assert weights.stat().st_mtime_ns == marked

    stray = out / "unet" / "stray.bin"
    stray.write_bytes(b"left over")
    assert main([str(out), "--force"]) == 0
    assert weights.stat().st_mtime_ns != marked
    assert not stray.exists()  # a component is replaced whole, not merged

    (out / "vae" / "config.json").unlink()  # incomplete: rebuilt without --force
    assert main([str(out)]) == 0
    assert is_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_cli_refuses_a_file_as_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    with pytest.raises(SystemExit) as raised:
        main([str(target)])
    assert raised.value.code == 2
    assert target.read_text() == "not a folder"
