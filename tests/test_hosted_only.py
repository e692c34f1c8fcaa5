"""A gateway configured only for hosted providers never loads the local-runner stack: it starts,
serves and shuts down without importing torch or transformers (so it runs without the `[local]`
extra)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pluggably.devtools.standins.openai import OpenAIStandIn

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    import grpc
    from pluggably.config import Config
    from pluggably.server import GatewayServer
    from pluggably.v1 import generate_service_pb2_grpc, generation_pb2, stream_service_pb2_grpc

    async def main(base_url):
        config = Config.model_validate({
            "server": {"host": "127.0.0.1", "port": 0},
            "auth": {"enabled": False},
            "metrics": {"enabled": False},
            "providers": {"openai": {"base_url": base_url, "api_key": "sk-test-hosted-only"}},
        })
        server = GatewayServer(config)
        await server.start()
        request = generation_pb2.GenerateRequest(
            model="openai/gpt-4o-mini", messages=[generation_pb2.ChatMessage(role="user", content="Hi")])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            unary = await generate_service_pb2_grpc.GenerateServiceStub(channel).Generate(request)
            chunks = [c async for c in stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(request)]
        await server.stop(0)
        assert unary.text and chunks[-1].WhichOneof("event") == "done", (unary, chunks[-1])
        heavy = sorted(m for m in ("torch", "transformers", "tokenizers", "safetensors") if m in sys.modules)
        print("heavy modules:", heavy)
        sys.exit(1 if heavy else 0)

    asyncio.run(main(sys.argv[1]))
""")


async def test_hosted_only_gateway_never_imports_local_runner_libraries() -> None:
    import asyncio

    async with OpenAIStandIn(api_key="sk-test-hosted-only") as standin:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SCRIPT,
            standin.base_url + "/v1",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    assert b"heavy modules: []" in output
    assert len([r for r in standin.requests if r.method == "POST"]) == 2
