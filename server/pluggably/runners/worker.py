"""A local runner process: one model served over the v1 contract on a Unix socket.

    python -m pluggably.runners.worker --socket /run/pluggably/w1.sock --model '{"name": ...}'

It is a gateway with nothing but the local backend: the same servicers, validation, admission
queue and cancellation, so what a caller sees through the pool is what it would see in process.
The model's generation threads get this process's interpreter and its own torch thread count
(`--threads`, set before torch is imported), so workers together do not oversubscribe the
cores. No auth (the socket is the gateway's, mode 0600 in a private folder), no metrics port,
no access log (the gateway logs the call), no storage scans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pluggably-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on")
    parser.add_argument("--model", required=True, help="the model's local.models entry, as JSON")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace, storage: Path) -> int:
    from pluggably.config import Config
    from pluggably.server import GatewayServer

    config = Config.model_validate(
        {
            "server": {"unix_socket": str(args.socket), "grace_period_s": 1},
            "auth": {"enabled": False},
            "metrics": {"enabled": False},
            "logging": {"access_log": False, "level": args.log_level},
            "local": {"models": [json.loads(args.model)]},
            "storage": {
                "root": str(storage),
                "scan_hf_cache": False,
                "rescan_interval_s": 0,
                "artifact_ttl_s": None,
            },
        }
    )
    server = GatewayServer(config)
    await server.start()
    os.chmod(args.socket, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads > 0:
        # Before torch is imported anywhere in this process.
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(args.threads)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="pluggably-worker-") as storage:
        return asyncio.run(_serve(args, Path(storage)))


if __name__ == "__main__":
    sys.exit(main())
