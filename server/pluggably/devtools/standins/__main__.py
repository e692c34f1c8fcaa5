"""Runs one stand-in in its own process: `python -m pluggably.devtools.standins openai --port 0`.

Prints `listening on <port>` once it accepts connections; drive it through `/_standin/...`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal

from pluggably.devtools.standins._base import Reply, StandIn

STANDINS = {
    "openai": ("pluggably.devtools.standins.openai", "OpenAIStandIn"),
    "anthropic": ("pluggably.devtools.standins.anthropic", "AnthropicStandIn"),
    "gemini": ("pluggably.devtools.standins.gemini", "GeminiStandIn"),
}


def build(provider: str, **kwargs: object) -> StandIn:
    module, name = STANDINS[provider]
    cls = getattr(importlib.import_module(module), name)
    return cls(**kwargs)  # type: ignore[no-any-return]


async def _serve(args: argparse.Namespace) -> None:
    standin = build(args.provider, api_key=args.api_key, chunk_delay_s=args.chunk_delay_ms / 1000)
    if args.words:
        standin.default_reply = Reply(
            text=" ".join(f"w{i}" for i in range(args.words)), chunks=args.words
        )
    standin.record = not args.no_record
    await standin.start(args.port)
    print(f"listening on {standin.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await standin.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pluggably.devtools.standins")
    parser.add_argument("provider", choices=sorted(STANDINS))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument(
        "--words", type=int, default=0, help="default reply: this many words, one per chunk"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="keep no request log (long bench runs)"
    )
    args = parser.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
