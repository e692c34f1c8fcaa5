#!/usr/bin/env python3
"""Text generation through the gateway vs calling transformers directly, and start-up time.

Prints a table: time to first token and tokens/s for the same tiny model, prompt and sampling
settings, (a) with transformers in this process, (b) streamed over native gRPC from the gateway,
(c) streamed as SSE through Envoy; plus the gateway's start-to-SERVING time in a fresh process.
Targets: gateway tokens/s >= 0.9x direct; start-to-SERVING < 2 s (torch not loaded).

    python bench/bench_text.py --model-dir var/models/tiny-random-llama
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pluggably.devtools.envoy import Envoy, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "tiny": {"hidden_size": 64, "num_layers": 2},
    "small": {"hidden_size": 512, "num_layers": 8},
}
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def median_row(samples: list[tuple[float, int, float]]) -> tuple[float, float, int]:
    """(ttft_s, tokens, total_s) samples -> (median ttft ms, median tokens/s, tokens)."""
    ttft = statistics.median(s[0] for s in samples) * 1000
    rate = statistics.median(s[1] / s[2] for s in samples)
    return ttft, rate, samples[0][1]


class Direct:
    """transformers in this process, with the sampling settings the gateway uses."""

    def __init__(self, model_dir: Path) -> None:
        import copy

        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        self.inputs = tokenizer.apply_chat_template(
            PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        self.config = copy.deepcopy(self.model.generation_config)
        self.config.eos_token_id = []  # like the gateway's ignore_eos: exactly max_tokens tokens
        self.config.do_sample, self.config.temperature, self.config.top_p, self.config.top_k = (
            True,
            1.0,
            1.0,
            0,
        )

    def sample(self, max_tokens: int, seed: int) -> tuple[float, int, float]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class FirstTokenClock(BaseStreamer):
            calls = 0
            first: float | None = None

            def put(self, value: object) -> None:
                self.calls += 1
                if self.calls == 2:  # the first call carries the prompt
                    self.first = time.perf_counter()

            def end(self) -> None:
                pass

        clock = FirstTokenClock()
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            self.config.max_new_tokens = max_tokens
            out = self.model.generate(**self.inputs, generation_config=self.config, streamer=clock)
        total = time.perf_counter() - start
        return (
            (clock.first or start) - start,
            out.shape[1] - self.inputs["input_ids"].shape[1],
            total,
        )


def start_server(config: Path, port: int) -> tuple[subprocess.Popen[bytes], float]:
    """Starts the gateway; returns the process and seconds from spawn to SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGGABLY_")}
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "pluggably", "--config", str(config)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    while True:
        if process.poll() is not None:
            raise RuntimeError("gateway exited during start-up")
        # A fresh channel per attempt: a channel that failed to connect backs off for a second.
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.005)
            continue
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except grpc.RpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return process, time.perf_counter() - start


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def grpc_sample(stub, max_tokens: int, seed: int) -> tuple[float, int, float]:
    from pluggably.v1 import generation_pb2

    request = generation_pb2.GenerateRequest(
        model="local/bench",
        messages=[generation_pb2.ChatMessage(**m) for m in PROMPT],
        text=generation_pb2.TextOptions(max_tokens=max_tokens, seed=seed, temperature=1.0),
    )
    request.provider_options["ignore_eos"].bool_value = True
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in stub.StreamGenerate(request):
        if chunk.HasField("text_delta") and first is None:
            first = time.perf_counter()
        if chunk.HasField("done"):
            tokens = chunk.done.usage.completion_tokens
    return (first or start) - start, tokens, time.perf_counter() - start


def sse_sample(http_port: int, max_tokens: int, seed: int) -> tuple[float, int, float]:
    body = json.dumps(
        {
            "model": "local/bench",
            "messages": PROMPT,
            "providerOptions": {"ignore_eos": True},
            "text": {"maxTokens": max_tokens, "seed": seed, "temperature": 1.0},
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    start = time.perf_counter()
    connection.request("POST", "/v1/generate:stream", body, {"content-type": "application/json"})
    response = connection.getresponse()
    first = None
    tokens = 0
    for line in response:
        if not line.startswith(b"data:"):
            continue
        event = json.loads(line[5:])
        if "textDelta" in event and first is None:
            first = time.perf_counter()
        if "done" in event:
            tokens = event["done"]["usage"]["completionTokens"]
    total = time.perf_counter() - start
    connection.close()
    return (first or start) - start, tokens, total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, default=REPO_ROOT / "var/models/tiny-random-llama"
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="random model to build when --model-dir holds none: 'tiny' (the demo model, "
        "~1 ms/token, pure overhead) or 'small' (hidden 512, 8 layers, compute-bound)",
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--startup-runs", type=int, default=5)
    args = parser.parse_args()
    if not (args.model_dir / "config.json").exists():
        from pluggably.devtools.tiny_model import build_tiny_model

        build_tiny_model(args.model_dir, **SIZES[args.size])

    with tempfile.TemporaryDirectory() as tmp:
        grpc_port = free_port()
        config = Path(tmp) / "config.yaml"
        config.write_text(
            json.dumps(
                {
                    "server": {"host": "127.0.0.1", "port": grpc_port},
                    "logging": {"level": "WARNING"},
                    "local": {
                        "models": [
                            {
                                "name": "bench",
                                "path": str(args.model_dir.resolve()),
                                "device": "cpu",
                            }
                        ]
                    },
                }
            )
        )

        startup = []
        for _ in range(args.startup_runs):
            process, seconds = start_server(config, grpc_port)
            startup.append(seconds)
            stop(process)

        import grpc

        from pluggably.v1 import stream_service_pb2_grpc

        runner = Direct(args.model_dir)
        server, _ = start_server(config, grpc_port)
        envoy = Envoy(grpc_port, Path(tmp), log_level="error")
        envoy.start()
        http_port = envoy.http_port
        direct, via_grpc, via_sse = [], [], []
        try:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = stream_service_pb2_grpc.StreamServiceStub(channel)
                # Interleaved, so drift in machine load hits every path alike; run 0 warms up.
                for i in range(args.runs + 1):
                    samples = (
                        runner.sample(args.max_tokens, args.seed),
                        grpc_sample(stub, args.max_tokens, args.seed),
                        sse_sample(http_port, args.max_tokens, args.seed),
                    )
                    if i:
                        for bucket, sample in zip(
                            (direct, via_grpc, via_sse), samples, strict=True
                        ):
                            bucket.append(sample)
        finally:
            envoy.stop()
            stop(server)

    d_ttft, d_rate, d_tokens = median_row(direct)
    print(
        f"\nText streaming, model {args.model_dir.name}, CPU, {os.cpu_count()} cores; "
        f"median of {args.runs} interleaved runs, {args.max_tokens} tokens, seed {args.seed}\n"
    )
    print("| path                        | tokens | TTFT ms | tokens/s | vs direct |")
    print("|-----------------------------|-------:|--------:|---------:|----------:|")
    print(
        f"| transformers direct         | {d_tokens:6d} | {d_ttft:7.1f} | {d_rate:8.1f} |     1.00x |"
    )
    for name, samples in (
        ("gateway, native gRPC stream", via_grpc),
        ("gateway via Envoy, REST SSE", via_sse),
    ):
        ttft, rate, tokens = median_row(samples)
        print(f"| {name:27} | {tokens:6d} | {ttft:7.1f} | {rate:8.1f} | {rate / d_rate:8.2f}x |")
    if startup:
        print(
            f"\nGateway start to SERVING (fresh process, torch not loaded): median {statistics.median(startup):.2f} s, "
            f"max {max(startup):.2f} s over {len(startup)} starts (target < 2 s)"
        )
    grpc_ratio = median_row(via_grpc)[1] / d_rate
    print(
        f"Target gateway tokens/s >= 0.9x direct: {'met' if grpc_ratio >= 0.9 else 'NOT met'} ({grpc_ratio:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
