"""The server as a process: start-up without heavy imports, health transitions and graceful
shutdown on SIGTERM, configuration errors that name the field."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluggably.devtools.envoy import REPO_ROOT, free_port
from pluggably.v1 import generation_pb2, stream_service_pb2_grpc


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGGABLY_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def server_config(tmp_path, tiny_model_dir):
    port = free_port()
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(f"""
        server: {{host: 127.0.0.1, port: {port}, grace_period_s: 20}}
        auth: {{enabled: false}}
        metrics: {{port: 0}}
        local:
          models:
            - {{name: tiny, path: "{tiny_model_dir}", default_max_tokens: 16}}
    """)
    )
    return path, port


async def _wait_serving(
    port: int, process: asyncio.subprocess.Process, timeout: float = 30
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            assert process.returncode is None, "server exited during start-up"
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("server never became SERVING")


async def test_sigterm_drains_in_flight_streams_and_reports_not_serving(server_config) -> None:
    config, port = server_config
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pluggably",
        "--config",
        str(config),
        env=_env(),
        cwd=REPO_ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_serving(port, process)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            request = generation_pb2.GenerateRequest(
                model="local/tiny",
                prompt="Once upon a time",
                text=generation_pb2.TextOptions(max_tokens=300, seed=1, temperature=1.0),
            )
            stream = stream_service_pb2_grpc.StreamServiceStub(channel).StreamGenerate(request)
            first = await stream.read()
            assert first.WhichOneof("event") == "text_delta"

            process.send_signal(signal.SIGTERM)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING

            chunks = [first]
            while (chunk := await stream.read()) is not grpc.aio.EOF:
                chunks.append(chunk)
            assert await stream.code() == grpc.StatusCode.OK
            assert chunks[-1].WhichOneof("event") == "done"
            assert chunks[-1].done.usage.completion_tokens == sum(
                len(c.text_delta.token_ids) for c in chunks[:-1]
            )
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_startup_defers_heavy_imports(server_config) -> None:
    config, _port = server_config
    probe = textwrap.dedent(f"""
        import asyncio, sys
        from pluggably.config import load_config
        from pluggably.server import GatewayServer
        async def main():
            server = GatewayServer(load_config({str(config)!r}))
            await server.start()
            models = await server.router.list_models()
            assert [m.id for m in models] == ["local/tiny"], models
            heavy = sorted(m for m in ("torch", "transformers", "diffusers") if m in sys.modules)
            await server.stop(grace=0)
            print("heavy:", heavy)
        asyncio.run(main())
    """)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", probe],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "heavy: []"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PLUGGABLY_SERVER__PORT": "not-a-port"}, "server.port"),
        ({"PLUGGABLY_LOCAL__MODELS": "[{name: x}]"}, "local.models.0.path"),
        ({"PLUGGABLY_SERVER__BOGUS": "1"}, "server.bogus"),
    ],
)
def test_bad_config_fails_at_start_naming_the_field(env, expected) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pluggably"],
        env=_env(**env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert expected in result.stderr and "environment variable" in result.stderr


async def test_streams_cut_by_shutdown_still_end_with_a_final_chunk(config_for) -> None:
    """Past the grace period the backends are closed first, so a running stream ends with
    `done` (CANCELLED) rather than a bare cancellation, and REST clients get their terminal event."""
    from fakes import FakeBackend
    from pluggably.server import GatewayServer

    backend = FakeBackend()
    backend.words = ["w"] * 200
    backend.delay_s = 0.02
    server = GatewayServer(config_for([]), backends=[backend])
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = stream_service_pb2_grpc.StreamServiceStub(channel)
        call = stub.StreamGenerate(generation_pb2.GenerateRequest(model="fake/echo", prompt="x"))
        chunks = [await call.read()]
        stopping = asyncio.create_task(server.stop(grace=0.3))
        await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StreamGenerate(
                generation_pb2.GenerateRequest(model="fake/echo", prompt="x")
            ).read()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        while (chunk := await call.read()) is not grpc.aio.EOF:
            chunks.append(chunk)
        await stopping
    assert await call.code() == grpc.StatusCode.OK
    assert chunks[-1].done.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    assert 5 < len(chunks) < 200
    assert backend.closed


def test_port_in_use_fails_naming_the_setting() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "pluggably"],
            env=_env(PLUGGABLY_SERVER__PORT=str(port), PLUGGABLY_AUTH__ENABLED="false"),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "server.port" in result.stderr and "Traceback" not in result.stderr
