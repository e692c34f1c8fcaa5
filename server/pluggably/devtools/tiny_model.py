"""Builds a tiny random Llama chat model with its own tokenizer, fully offline.

The model is useless for text quality but exercises every code path of a real local chat model:
a byte-level BPE tokenizer (so random output can be invalid UTF-8 mid-stream), special tokens,
a Llama-3 style chat template, several end-of-sequence ids and a `generation_config.json`.

    pluggably-make-tiny-model OUT_DIR [--force] [--seed N]

Module import stays cheap: `torch`, `transformers` and `tokenizers` are imported inside
`build_tiny_model`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|pad|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
SPECIAL_TOKENS = (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
)

VOCAB_SIZE = 1024
CONTEXT_LENGTH = 512

#: The files a complete model folder holds (what `main` checks before skipping work).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# Llama-3 style: every message is `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>`.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] }}"
    "{%- if message.get('name') %}{{- ' (' + message['name'] + ')' }}{%- endif %}"
    "{{- '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# A small English corpus, with a few non-ASCII characters so that multi-byte UTF-8 characters
# are split across byte-level tokens.
CORPUS = """\
The gateway receives a request, checks every field, and hands it to a backend. A backend is a
small adapter that knows how to talk to one provider, or a runner that executes a model on the
machine itself. Each backend streams its output back in chunks, and the last chunk always says
why the generation ended: the model finished its answer, it reached the largest number of tokens
the client allowed, or a stop sequence was found in the text.

Local models are loaded the first time somebody asks for them. Loading happens in a worker thread
so that the server keeps answering health checks and other requests while the weights are read
from disk. When the server shuts down, every running generation is told to stop, the threads are
joined, and the memory is given back.

A tokenizer turns text into numbers and numbers back into text. A byte-level tokenizer can encode
any string at all, because it falls back to single bytes when it meets a word it has never seen.
That is why a stream of tokens can end in the middle of a character such as é, ü, ñ, ß, 東京 or
an emoji like 🙂, and why the text must be held back until the character is complete.

Once upon a time there was a little robot who liked to read. Every morning it opened a new book,
read the first page out loud, and then asked the cat what it thought about the story. The cat
never answered, but the robot did not mind. It wrote its own ending for every book, and some of
those endings were better than the real ones.

Questions and answers: What is the capital of France? Paris. How many days are in a week? Seven.
What color is the sky on a clear day? Blue. Can you count to ten? One, two, three, four, five,
six, seven, eight, nine, ten. Thank you for your help! You are welcome, have a nice day.

The weather report for tomorrow: cloudy in the morning with a light breeze from the west,
sunny in the afternoon, and a small chance of rain in the evening. Temperatures will stay between
twelve and nineteen degrees. Remember to water the garden, feed the fish, and close the windows
before you go to bed.

To make a cup of tea, boil fresh water, warm the pot, add one spoon of leaves for each person and
one for the pot, pour the water, wait three to five minutes, and serve with milk, lemon or honey.
Good tea needs patience; good software needs tests, small steps, and clear error messages.

def add(a, b):
    return a + b

{"role": "assistant", "content": "Hello! How can I help you today?"}
"""


def build_tiny_model(
    out_dir: Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> Path:
    """Builds the tiny model into `out_dir` (created, existing files overwritten) and returns it.

    Deterministic: the same `seed` always gives byte-identical weights and tokenizer. Larger
    `hidden_size`/`num_layers` give a random model whose compute, not Python overhead, dominates
    each token (for benchmarks).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _build_into(tmp, seed, hidden_size, num_layers)
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_complete(model_dir: Path) -> bool:
    """Whether `model_dir` holds every file a built tiny model has."""
    return all((Path(model_dir) / name).is_file() for name in MODEL_FILES)


def _build_into(folder: Path, seed: int, hidden_size: int, num_layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    # --- tokenizer -------------------------------------------------------------------------
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tk.token_to_id(BOS_TOKEN)
    # Like Llama 3: a plain prompt starts with <|begin_of_text|>.
    tk.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=CONTEXT_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    vocab_size = len(tokenizer)
    eot_id = tk.token_to_id(EOT_TOKEN)
    eos_ids = [tk.token_to_id(END_OF_TEXT_TOKEN), eot_id]
    pad_id = tk.token_to_id(PAD_TOKEN)

    # --- model -----------------------------------------------------------------------------
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(4, hidden_size // 64),
        num_key_value_heads=max(4, hidden_size // 64),
        max_position_embeddings=CONTEXT_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _install(built: Path, out_dir: Path) -> None:
    """Moves the files of `built` into `out_dir`; `config.json` last so a reader never sees a
    config without weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in built.iterdir())
    names.sort(key=lambda n: n == "config.json")
    for name in names:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(built / name, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pluggably-make-tiny-model",
        description="Build a tiny random Llama chat model (offline, a few hundred KB) for tests and demos.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the model into")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the folder holds a model"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the random weights (default 0)"
    )
    args = parser.parse_args(argv)

    out_dir: Path = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"{out_dir} exists and is not a folder")
    if args.force or not is_complete(out_dir):
        build_tiny_model(out_dir, seed=args.seed)
    print(out_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
