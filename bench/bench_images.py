#!/usr/bin/env python3
"""Local image generation through the gateway vs calling diffusers directly.

Prints a table: denoising steps per second and seconds per request for the same tiny pipeline,
prompt, size, steps and seed, (a) with diffusers in this process, (b) through the gateway over
native gRPC (the image stored in the artifact store and returned by reference), interleaved
round by round so machine drift hits both alike. The pipeline is the one `make model` builds
(pluggably-make-tiny-image): its images are noise, its cost is the per-step and per-request
overhead, which is what the gateway adds to.

    python bench/bench_images.py --model-dir var/models/tiny-sd
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STEPS = 8
PROMPT = "a red lighthouse on a cliff at dusk"


def direct(model_dir: Path, steps: int) -> tuple[Callable[[], None], object]:
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def run() -> None:
        generator = torch.Generator("cpu").manual_seed(1)
        with torch.inference_mode():
            images = pipe(PROMPT, num_inference_steps=steps, generator=generator).images
        images[0].save(open("/dev/null", "wb"), format="PNG")  # the gateway encodes too

    return run, pipe


async def main_async(model_dir: Path, rounds: int, per_round: int, steps: int) -> None:
    import grpc

    from pluggably.config import Config
    from pluggably.server import GatewayServer
    from pluggably.v1 import generate_service_pb2_grpc
    from pluggably.v1 import generation_pb2 as G

    run_direct, _pipe = direct(model_dir, steps)
    config = Config.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "auth": {"enabled": False},
            "metrics": {"enabled": False},
            "logging": {"access_log": False},
            "storage": {
                "root": tempfile.mkdtemp(prefix="bench-images-"),
                "scan_hf_cache": False,
                "rescan_interval_s": 0,
            },
            "local": {"models": [{"name": "sd", "path": str(model_dir), "modality": "image"}]},
        }
    )
    server = GatewayServer(config)
    await server.start()
    request = G.GenerateRequest(
        model="local/sd", prompt=PROMPT, image=G.ImageOptions(steps=steps, seed=1)
    )
    samples: dict[str, list[float]] = {"diffusers in process": [], "gateway (gRPC)": []}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
            await stub.Generate(request)  # load and warm up both
            run_direct()
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(per_round):
                    await asyncio.to_thread(run_direct)
                samples["diffusers in process"].append((time.perf_counter() - start) / per_round)
                start = time.perf_counter()
                for _ in range(per_round):
                    response = await stub.Generate(request)
                    assert len(response.artifacts) == 1
                samples["gateway (gRPC)"].append((time.perf_counter() - start) / per_round)
    finally:
        await server.stop(grace=0)

    base = statistics.median(samples["diffusers in process"])
    print(
        f"\nTiny Stable Diffusion, 64x64, {steps} steps ({rounds} rounds x {per_round}, interleaved)"
    )
    print(f"  {'path':24s} {'s/request':>10s} {'steps/s':>9s} {'vs direct':>10s}")
    for name, values in samples.items():
        seconds = statistics.median(values)
        print(f"  {name:24s} {seconds:10.3f} {steps / seconds:9.1f} {base / seconds:9.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("var/models/tiny-sd"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.model_dir, args.rounds, args.per_round, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
