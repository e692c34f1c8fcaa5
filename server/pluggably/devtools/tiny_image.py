"""Builds a tiny random Stable Diffusion pipeline, fully offline, for tests and the demo.

The pipeline draws random noise, but it is a real `StableDiffusionPipeline` folder laid out like
the ones on the Hub (`model_index.json` plus one subfolder per component, safetensors weights), so
it exercises every code path a real text-to-image model does: tokenizing arbitrary prompts, the
text encoder, classifier-free guidance with a negative prompt, the denoising loop with its
per-step callback and interrupt flag, the VAE decode and several images per prompt.

    pluggably-make-tiny-image OUT_DIR [--force] [--seed N]

Design decisions:

- Everything is tiny (under 4 MB): a 2-level UNet at 8x8 latents and a 4-level VAE, so
  images are 64x64 by default (the UNet's `sample_size` times the VAE's downscale of 8) and a
  4-step generation takes a fraction of a second on a CPU.
- The CLIP tokenizer's `vocab.json`/`merges.txt` are written here: every one of the 256 byte
  symbols, alone and as an end of word, is in the vocabulary, so any prompt (any script, emoji)
  tokenizes without unknown tokens; a few merges for common prompt words keep it a real BPE.
- The scheduler is DDIM with Stable Diffusion 1.x's noise schedule: it calls the step callback
  exactly once per inference step (PNDM, SD 1.5's own, calls it once more than asked).
- No safety checker or feature extractor (`requires_safety_checker=False`), as in many
  community checkpoints; `model_index.json` marks both as absent.
- Deterministic: the same seed gives byte-identical weights; the torch RNG of the caller is left
  alone. The folder is built in a temporary sibling and moved into place, `model_index.json`
  last, so a reader never sees an index without its components.

Module import stays cheap: `torch`, `diffusers` and `transformers` are imported inside
`build_tiny_image_pipeline`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Side of the default (and natural) image size: UNet sample size 8 x VAE downscale 8.
IMAGE_SIZE = 64
LATENT_SIZE = 8
#: Like CLIP: prompts are padded or truncated to 77 tokens.
MAX_PROMPT_TOKENS = 77
TEXT_HIDDEN_SIZE = 32

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

#: The files a complete pipeline folder holds (what `main` checks before skipping work).
PIPELINE_FILES = (
    "model_index.json",
    "README.md",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)

# Words that get whole-word tokens, so that ordinary prompts are not all single bytes.
COMMON_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "and",
    "with",
    "photo",
    "painting",
    "cat",
    "dog",
    "house",
    "lighthouse",
    "sunset",
    "red",
    "blue",
    "green",
    "blurry",
    "ugly",
)

MODEL_CARD = """\
---
library_name: diffusers
pipeline_tag: text-to-image
tags:
- tiny
- random
- testing
---

# Tiny random Stable Diffusion pipeline

**This model draws random noise.** Its weights are random (seed {seed}) and were never trained.
It exists to test software that runs text-to-image pipelines, offline and in a fraction of a
second on a CPU: it has the layout and components of a Stable Diffusion 1.x pipeline.

- `StableDiffusionPipeline`, {size}x{size} images by default (UNet sample size {latent}, VAE
  downscale 8)
- UNet2DConditionModel (block channels 32/64, cross-attention 32), AutoencoderKL (4 latent
  channels), CLIPTextModel (hidden 32, 2 layers), CLIPTokenizer (byte-level BPE,
  {max_tokens} tokens), DDIM scheduler
- no safety checker, no feature extractor

Built by `pluggably-make-tiny-image` (`pluggably.devtools.tiny_image`).
"""


def build_tiny_image_pipeline(out: Path, *, seed: int = 0) -> Path:
    """Builds the tiny pipeline into `out` (created, existing components replaced); returns it.

    Deterministic: the same `seed` always gives byte-identical weights, configs and tokenizer.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build_into(tmp, seed)
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds every file a built tiny pipeline has."""
    return all((Path(folder) / name).is_file() for name in PIPELINE_FILES)


def write_tokenizer_files(folder: Path) -> None:
    """Writes a CLIP-style byte-level BPE `vocab.json` and `merges.txt` into `folder`."""
    vocab, merges = _tokenizer_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The first line is a header that BPE loaders skip, as in CLIP's own merges.txt.
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte, as GPT-2 and CLIP map them (index = byte value)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def _tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = _byte_symbols()
    # Like CLIP's: the bytes, the bytes ending a word, the merged tokens, the special tokens last.
    tokens = [*symbols, *(s + "</w>" for s in symbols)]
    merges: list[tuple[str, str]] = []
    for word in COMMON_WORDS:
        # Left to right, the last merge joins the word's end marker: "c a", "ca t</w>".
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            if merge not in merges:
                merges.append(merge)
            pieces[:2] = [pieces[0] + pieces[1]]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    tokens += [START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def _build_into(folder: Path, seed: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_src = folder / ".tokenizer-src"
    write_tokenizer_files(tokenizer_src)
    # Loaded from the files just written, so a malformed vocabulary fails the build, not a user.
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_src, model_max_length=MAX_PROMPT_TOKENS)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN_SIZE,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            # Four levels: a downscale of 8 as in Stable Diffusion.
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=IMAGE_SIZE,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN_SIZE,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=TEXT_HIDDEN_SIZE,
                max_position_embeddings=MAX_PROMPT_TOKENS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    text_encoder.eval()
    # Stable Diffusion 1.x's noise schedule, with DDIM's one callback per step.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    # Any: diffusers' type hints hide the mixin that gives `save_pretrained`.
    pipeline: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # The classic CLIP tokenizer files sit next to what transformers writes (tokenizer.json):
    # loaders that want vocab.json/merges.txt (older transformers, other tools) find them.
    for name in ("vocab.json", "merges.txt"):
        os.replace(tokenizer_src / name, folder / "tokenizer" / name)
    shutil.rmtree(tokenizer_src)
    (folder / "README.md").write_text(
        MODEL_CARD.format(
            seed=seed, size=IMAGE_SIZE, latent=LATENT_SIZE, max_tokens=MAX_PROMPT_TOKENS
        ),
        encoding="utf-8",
    )


def _install(built: Path, out: Path) -> None:
    """Moves the components of `built` into `out`, `model_index.json` last: it goes first when
    replacing a pipeline, so a reader never sees an index whose components are half replaced."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").unlink(missing_ok=True)
    names = sorted(p.name for p in built.iterdir())
    names.sort(key=lambda n: n == "model_index.json")
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(built / name, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pluggably-make-tiny-image",
        description=(
            "Build a tiny random Stable Diffusion pipeline (offline, under 4 MB, "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} noise) for tests and demos."
        ),
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline into")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the folder holds a pipeline"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the random weights (default 0)"
    )
    args = parser.parse_args(argv)

    out_dir: Path = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"{out_dir} exists and is not a folder")
    if args.force or not is_complete(out_dir):
        build_tiny_image_pipeline(out_dir, seed=args.seed)
    print(out_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
