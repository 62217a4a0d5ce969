"""Wiring and lifecycle of `ptm serve`: sockets, model load, readiness, graceful drain.

Order matters for Kubernetes: the sockets listen first (liveness answers while a large model
loads and warms up), readiness turns true only after the sha256 check, the session load and the
warm-up. On SIGTERM (or SIGINT): readiness turns false at once, new inferences get 503 /
UNAVAILABLE, queued and in-flight ones finish within `drain_timeout_s`, then the listeners close
and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ptm_runtime.options import RuntimeOptions
from ptm_runtime.serve.batching import Batcher, choose_execution, tuning_cells
from ptm_runtime.serve.dataplane import DataPlane
from ptm_runtime.serve.errors import ArtifactError
from ptm_runtime.serve.metrics import ServeMetrics, metrics_app
from ptm_runtime.serve.model import OnnxModel, trim_heap
from ptm_runtime.serve.rest import build_app
from ptm_runtime.serve.settings import ServeSettings

log = logging.getLogger(__name__)


def tune(model: OnnxModel, options: RuntimeOptions) -> tuple[int, int, OnnxModel | None]:
    """(concurrent runs, preferred batch size, the one-thread session for runs beside others):
    as configured, or measured on the loaded model."""
    cells = tuning_cells(options, model.dynamic_batch)
    beside = model.single_threaded() if any(runs > 1 for runs, _ in cells) else None
    if len(cells) == 1:
        runs, size = cells[0]
    else:
        rates = model.measure_throughput(cells, beside=beside)
        runs, size = choose_execution(rates)
        log.info(
            "rows/s by (concurrent runs, batch size): %s; chose %d run(s) at a time, batches of %d",
            ", ".join(f"{r}x{b}: {rate:.1f}" for (r, b), rate in rates.items()),
            runs,
            size,
        )
    return runs, size, beside if runs > 1 else None


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: this module owns SIGTERM and the drain order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


#: The most bytes a request line and its headers may take (nginx allows 4 x 8 KB by default).
MAX_HEAD_BYTES = 64 * 1024
#: How long a refused connection is still read (and dropped) before it closes.
LINGER_S = 2.0


class _BoundedHead(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on a request's head.

    httptools buffers the request line and headers until they are complete, with no limit: one
    client sending 100 MB of headers grew the server by 100 MB. (uvicorn's h11 protocol has a
    limit, but measured 8-9% slower on resnet18's 600 KB bodies.) Bytes that arrive while a head
    is incomplete are counted, and past MAX_HEAD_BYTES the client gets 431 and the connection
    closes. A chunk in which a head completes is not counted (it may hold a body), so the buffer
    stays under MAX_HEAD_BYTES plus two reads.
    """

    _in_head = True  # until a head completes, and again after each message
    _head_bytes = 0
    _moved = False  # a head or a message completed while this chunk was parsed
    _refused = False

    def on_headers_complete(self) -> None:
        self._in_head, self._moved = False, True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._moved = True, 0, True
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client still sends is read and dropped until the close
        self._moved = False
        super().data_received(data)
        if not self._in_head or self._moved or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse()

    def _refuse(self) -> None:
        """431, then a lingering close: the write side shuts at once, reading goes on (dropped)
        for LINGER_S. Closing with the client's bytes unread would reset the connection, and
        the client would lose the answer."""
        self._refused = True
        body = json.dumps(
            {"error": f"the request line and headers take more than {MAX_HEAD_BYTES} bytes"}
        ).encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Server:
    """One model, REST + gRPC + metrics, in the running event loop."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = ServeMetrics(self.registry, settings.model_name)
        self.plane = DataPlane(
            settings.model_name,
            settings.model_version,
            max_elements=settings.max_body_bytes,
            request_timeout_s=settings.options.request_timeout_ms / 1000.0,
            metrics=self.metrics,
            on_idle=trim_heap,  # a burst of large bodies leaves glibc holding their pages
        )
        self.metrics.set_ready(False)
        self._stop = asyncio.Event()
        self._http: _Uvicorn | None = None
        self._metrics_http: _Uvicorn | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc: Any = None
        self.ports: Ports | None = None

    def _uvicorn(self, app: Any) -> _Uvicorn:
        config = uvicorn.Config(
            app,
            log_level=self.settings.log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, int(self.settings.drain_timeout_s)),
            timeout_keep_alive=30,
            proxy_headers=False,  # nothing here reads the client's address: skip the rewrite per request
            http=_BoundedHead,
        )
        return _Uvicorn(config)

    async def start_listeners(self) -> Ports:
        from ptm_runtime.serve.grpc import build_server  # grpc only where it is served

        s = self.settings
        http_sock = _listen(s.host, s.http_port)
        metrics_sock = _listen(s.host, s.metrics_port)
        self._http = self._uvicorn(build_app(self.plane, s.max_body_bytes))
        self._metrics_http = self._uvicorn(metrics_app(self.registry))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._http.serve(sockets=[http_sock]), name="ptm-http"),
            loop.create_task(self._metrics_http.serve(sockets=[metrics_sock]), name="ptm-metrics"),
        ]
        self._grpc = build_server(self.plane, s.max_body_bytes)
        host = f"[{s.host}]" if ":" in s.host else s.host
        grpc_port = self._grpc.add_insecure_port(f"{host}:{s.grpc_port}")
        if grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{s.grpc_port}")
        await self._grpc.start()
        # uvicorn reports started once its create_server ran: wait for it, bounded.
        deadline = time.monotonic() + 10
        while not (self._http.started and self._metrics_http.started):
            if time.monotonic() > deadline or any(t.done() for t in self._tasks):
                raise OSError("the HTTP listeners did not start")
            await asyncio.sleep(0.01)
        self.ports = Ports(
            http=http_sock.getsockname()[1], grpc=grpc_port, metrics=metrics_sock.getsockname()[1]
        )
        if s.ports_file is not None:
            tmp = s.ports_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.ports)))
            tmp.replace(s.ports_file)
        log.info("listening on %s: http %d, grpc %d, metrics %d", s.host, *asdict(self.ports).values())
        return self.ports

    async def load_model(self) -> OnnxModel:
        """Verify + load + warm up off the event loop, then attach: the server is ready."""
        s = self.settings
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(
            None, lambda: OnnxModel.load(s.model_path, s.options, trt_cache_dir=s.trt_cache_dir)
        )
        batching = s.options.batching
        warmup = await loop.run_in_executor(
            None, model.warmup, s.options.warmup_requests, batching.max_batch_size
        )
        runs, preferred, beside = await loop.run_in_executor(None, tune, model, s.options)
        await loop.run_in_executor(None, trim_heap)  # what loading, warm-up and tuning freed
        batcher = Batcher(
            model.infer,
            run_beside=beside.infer if beside is not None else None,
            max_batch_size=batching.max_batch_size,
            preferred_batch_size=preferred,
            max_queue_delay_ms=batching.max_queue_delay_ms,
            max_queue_size=batching.max_queue_size,
            batching=model.dynamic_batch,
            concurrent_runs=runs,
            arriving=lambda: self.plane.arriving,
            metrics=self.metrics,
        )
        batcher.start()
        self.metrics.model_loaded(
            model.provider, model.load_seconds, warmup, batcher.preferred_batch_size, batcher.concurrent_runs
        )
        self.plane.attach(model, batcher)
        log.info(
            "model %r ready on %s (dynamic batching %s, batches of up to %d rows, requests of up to %d)",
            s.model_name,
            model.provider,
            "on" if batcher.batching else "off",
            batcher.preferred_batch_size,
            batching.max_batch_size,
        )
        return model

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Listen, load, serve until a stop is requested, drain; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start_listeners()
        except OSError as listen_error:
            message = f"cannot listen on {self.settings.host}: {listen_error}"
            log.error("%s", message)
            self._write_termination_log(message)
            await self.drain()
            return 1
        code = 0
        loading = loop.create_task(self.load_model())
        stop_wait = loop.create_task(self._stop.wait())
        await asyncio.wait({loading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            failure = loading.exception()
            message = f"cannot serve {self.settings.model_path}: {failure}"
            if isinstance(failure, ArtifactError):
                log.error("%s", message)
            else:
                log.error("%s", message, exc_info=failure)
            self._write_termination_log(message)
            code = 1
        else:
            await self._stop.wait()
        if not loading.done():
            loading.cancel()
        stop_wait.cancel()
        await self.drain()
        return code

    async def drain(self) -> None:
        """Not ready → finish queued/in-flight work (bounded) → close listeners."""
        timeout = self.settings.drain_timeout_s
        started = time.monotonic()
        self.plane.start_draining()
        log.info("draining: ready=false, finishing queued and in-flight requests (at most %.0fs)", timeout)
        if self.plane.batcher is not None and not await self.plane.batcher.close(timeout):
            log.warning("drain timeout: some queued requests were answered 503")
        remaining = max(0.0, timeout - (time.monotonic() - started))
        if not await self.plane.wait_idle(remaining):
            log.warning("drain timeout: %d requests still in flight", self.plane.in_flight)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for server in (self._http, self._metrics_http):
            if server is not None:
                server.should_exit = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(2.0, remaining))
        log.info("stopped after draining for %.2fs", time.monotonic() - started)

    def _write_termination_log(self, message: str) -> None:
        path = self.settings.termination_log
        if path.exists():
            with contextlib.suppress(OSError):
                path.write_text(message[:4096])
