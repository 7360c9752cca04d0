"""Boot-to-ready: a real ``trio-sign enclave`` process (local NSM) booted by a parent over UNIX
sockets with a sealed bundle; timed from process start to the ``serving`` state."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from ..nitro import ChannelMessage, LocalNsm, MessageStream, StateMessage
from ..parent import DevRecipientKms, serve_log_connection, serve_preload, serve_status_connection
from ..shares import DevKeyFile
from ..transport import open_listeners
from ._load import _prepare
from ._proc import rss_mib


async def _boot_once(sealed: Path, key: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        nsm_dir = d / "nsm"
        LocalNsm.from_dir(nsm_dir, create=True).close()
        kms = DevRecipientKms(
            DevKeyFile.load(key), root_pem=(nsm_dir / "local-nsm-root.pem").read_bytes()
        )
        serving = trio.Event()
        facts: dict[str, float] = {}

        def on_status(message: ChannelMessage) -> None:
            if isinstance(message, StateMessage) and message.state == "serving":
                facts["preload_ms"] = float(message.preload_ms or 0)
                serving.set()

        async def boot(stream: trio.abc.Stream) -> None:
            async with stream:
                await serve_preload(MessageStream(stream), sealed, kms)

        async with trio.open_nursery() as nursery:
            for name, handler in (
                ("boot", boot),
                ("status", functools.partial(serve_status_connection, on=on_status)),
                ("logs", functools.partial(serve_log_connection, on=lambda m: None)),
            ):
                listeners = await open_listeners(f"unix://{d}/{name}.sock")
                await nursery.start(trio.serve_listeners, handler, listeners)
            start = time.perf_counter()
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "trio_sign.cli",
                    "enclave",
                    "--nsm",
                    f"local:{nsm_dir}",
                    "--grpc-listen",
                    f"unix://{d}/grpc.sock",
                    "--preload-address",
                    f"unix://{d}/boot.sock",
                    "--status-address",
                    f"unix://{d}/status.sock",
                    "--log-address",
                    f"unix://{d}/logs.sock",
                    "--drain-grace",
                    "1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                with trio.fail_after(600):
                    await serving.wait()
                facts["boot_to_ready_s"] = time.perf_counter() - start
                facts["rss_mib"] = rss_mib(proc.pid)
            finally:
                proc.terminate()
                await proc.wait()
            nursery.cancel_scope.cancel()
    return facts


def bench_boot(sizes: list[int], cache: Path) -> None:
    print(
        "\nBoot to ready: trio-sign enclave process (local NSM) + parent over UNIX sockets "
        "(attestation, CMS envelope, streamed sealed bundle, PCR 16, audit)"
    )
    for n in sizes:
        sealed, key = _prepare(n, cache)
        facts = trio.run(_boot_once, sealed, key)
        print(
            f"  {n:>9,} accounts: boot to ready {facts['boot_to_ready_s']:6.2f} s "
            f"(preload {facts['preload_ms'] / 1000:5.2f} s in the enclave), "
            f"enclave RSS {facts['rss_mib']:7.1f} MiB",
            flush=True,
        )
