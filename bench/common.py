"""Shared helpers for rlkit's benchmarks (SFT now; DPO/KTO/PPO reuse them).

A benchmark is an orchestrator that runs each configuration in its own child process, one
after another, so that one run's memory never inflates another's peak and a crash costs one
row. A child records, after every optimizer step, the wall clock, the process CPU time and the
real (non-padding) tokens of the step (`StepClock`), and writes a JSON result; the orchestrator
turns the results into a markdown table and writes it between markers in docs/benchmarks.md.

Reference trainers (TRL) never enter rlkit's environment: `ensure_venv_with` builds a separate
virtual environment that sees this interpreter's packages (torch, transformers, peft, ...)
through a .pth bridge and installs only the extra package into it, without its dependencies,
so it can never pull another torch.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import site
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    """Progress for people: stderr, so stdout carries only the table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- measurement (in the child) ---------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident set size of this process (and of any children it waited for), in MiB.

    On Linux this process's own peak is VmHWM: ru_maxrss also holds the peak of the process that
    started this one (carried over by vfork + exec), so a child of a large parent reports at least
    the parent's size."""
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as status:
            own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / scale


@dataclass
class StepClock:
    """Per-step wall time, process CPU time and real tokens; the first `warmup` steps are left out.

    Call `start()` when training starts (after the model is loaded) and `step(tokens, loss)`
    after every optimizer step. CPU time is `time.process_time()`: all threads of the process,
    user + system, which moves much less than wall time when other jobs share the cores.
    """

    warmup: int = 1
    marks: list[tuple[float, float]] = field(default_factory=list)  # (wall, cpu) at start and after each step
    tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.marks = [(time.perf_counter(), time.process_time())]
        self.tokens, self.losses = [], []

    def step(self, tokens: int, loss: float | None = None) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))
        self.tokens.append(int(tokens))
        if loss is not None:
            self.losses.append(float(loss))

    def summary(self) -> dict[str, Any]:
        """The measured steps (after warmup), each as wall s, CPU s and real tokens, plus losses."""
        steps = len(self.tokens)
        skip = min(self.warmup, max(steps - 1, 0))  # always keep at least one step
        return {
            "warmup_steps": skip,
            "step_wall_s": [round(self.marks[i + 1][0] - self.marks[i][0], 5) for i in range(skip, steps)],
            "step_cpu_s": [round(self.marks[i + 1][1] - self.marks[i][1], 5) for i in range(skip, steps)],
            "step_tokens": self.tokens[skip:],
            "final_loss": self.losses[-1] if self.losses else None,
            "losses": [round(x, 5) for x in self.losses],
        }


def pool(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Table numbers from one or more runs of a configuration (their measured steps pooled).

    tokens/s and CPU-s per 1k tokens are medians over the steps: a step that another job
    slowed down moves a mean, hardly a median. The totals are kept too.
    """
    walls = [w for r in results for w in r["step_wall_s"]]
    cpus = [c for r in results for c in r["step_cpu_s"]]
    toks = [t for r in results for t in r["step_tokens"]]
    if not toks:
        return {"steps_measured": 0}
    wall, cpu, total = sum(walls), sum(cpus), sum(toks)
    return {
        "runs": len(results),
        "steps_measured": len(toks),
        "tokens_measured": total,
        "tokens_per_step": total / len(toks),
        "tokens_per_s": statistics.median(t / max(w, 1e-9) for t, w in zip(toks, walls)),
        "cpu_s_per_1k_tokens": statistics.median(1000 * c / max(t, 1) for t, c in zip(toks, cpus)),
        "mean_tokens_per_s": total / max(wall, 1e-9),
        "mean_cpu_s_per_1k_tokens": 1000 * cpu / max(total, 1),
        "cpu_utilisation": cpu / max(wall, 1e-9),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
        "final_loss": results[0].get("final_loss"),
    }


def write_step_result(path: str | Path, steps: list[dict[str, float]], warmup: int, extra: dict[str, Any]) -> None:
    """A child's JSON result of per-step records: the first `warmup` steps left out (one is always
    kept), the torch threads and the process's peak RSS."""
    import torch

    skip = min(warmup, max(len(steps) - 1, 0))
    result = {
        "steps": steps[skip:],
        "warmup_steps": skip,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
        **extra,
    }
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def combine_runs(summaries: Sequence[dict[str, float]]) -> dict[str, Any]:
    """A configuration's numbers: the median over its runs of each run's median (peak RSS: median of
    the peaks), the spread of the step time over runs and the steps measured in all."""
    out: dict[str, Any] = {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}
    out["runs"] = len(summaries)
    out["step_s_range"] = (min(s["step_s"] for s in summaries), max(s["step_s"] for s in summaries))
    out["steps_measured"] = sum(s["steps_measured"] for s in summaries)
    return out


def run_header(meta: dict[str, Any], settings: dict[str, str], notes: Sequence[str]) -> list[str]:
    """The lines above a bench table: when and how it was measured, the machine and its load, the
    versions (with `meta["trl"]` where a TRL venv ran), then one line per setting and per note."""
    info = machine_info()
    vers = versions(["torch", "transformers", "peft", "accelerate"])
    loads = meta.get("run_loads") or []
    trl_v = meta.get("trl")
    header = [
        f"Measured on {meta['date']} with `{meta['command']}`, which took {meta['minutes']:.0f} min.",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, {'GPU ' + info['gpu'] if info['gpu'] else 'no GPU'}; "
        f"{meta['threads'] or 'default'} torch thread(s) per run; load average {' / '.join(f'{x:.1f}' for x in meta['load_before'])} before and "
        f"{' / '.join(f'{x:.1f}' for x in meta['load_after'])} after (1/5/15 min)"
        + (
            f"; the 1-min load average at the start of the runs ranged {min(loads):.1f}-{max(loads):.1f} (this bench adds 1)."
            if loads
            else "."
        ),
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in vers.items())
        + (f", trl {trl_v}" if trl_v else "")
        + f", Python {info['python']}.",
    ]
    header += [f"- {label}: {text}." for label, text in settings.items()]
    header += [f"- {n}" for n in notes]
    return header


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    result = {**result, "peak_rss_mib": peak_rss_mib()}
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


# ---- running children (in the orchestrator) ---------------------------------------------


def run_child(
    cmd: Sequence[str],
    result_path: Path,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Run one configuration in its own process; its JSON result, or {'error': ...}."""
    result_path.unlink(missing_ok=True)
    started = time.time()
    full_env = {**os.environ, **(env or {})}
    with open(log_path or os.devnull, "w") as out:
        try:
            proc = subprocess.run(
                list(cmd), env=full_env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    elapsed = time.time() - started
    if code == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        result["process_wall_s"] = elapsed
        return result
    tail = ""
    if log_path and log_path.is_file():
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        tail = lines[-1][:300] if lines else ""
    return {"error": f"exit {code}" + (f": {tail}" if tail else ""), "process_wall_s": elapsed}


def versions(packages: Sequence[str], python: str | None = None) -> dict[str, str]:
    """Installed versions of `packages`, as seen by `python` (default: this interpreter)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run(
            [python or sys.executable, "-c", code, *packages], capture_output=True, text=True, timeout=120
        )
        return json.loads(done.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        import torch

        threads = torch.get_num_threads()
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        threads, gpu = None, None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch_threads": threads,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# ---- a separate environment for reference trainers --------------------------------------


def ensure_venv_with(
    venv: Path,
    requirement: str,
    module: str,
    check: str = "",
    same: Sequence[str] = ("torch", "transformers", "peft", "accelerate", "datasets"),
) -> tuple[str | None, str]:
    """A python that can import `module`, without touching this environment.

    Reuses `venv` when it already imports `module` and is bridged to this interpreter.
    Otherwise (re)creates it, bridges this interpreter's site-packages into it (a .pth file
    processed by `site.addsitedir`, so this environment's editable installs and .pth files
    work there too), and installs `requirement` with --no-deps: its dependencies must already
    be here (torch, transformers, ...). Refuses it unless the packages in `same` have the same
    versions there as here, so the reference trainer runs on exactly rlkit's stack.
    Returns (python path or None, message).
    """
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    probe = f"import {module}{'; ' + check if check else ''}"
    here = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    bridge = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in here) + "\n"
    marker = "_rlkit_bench_bridge.pth"

    def works() -> tuple[bool, str]:
        if not py.exists():
            return False, f"{py} does not exist"
        if (
            not any(f.read_text() == bridge for f in venv.glob(f"lib*/python*/site-packages/{marker}"))
            and not (venv / "Lib" / "site-packages" / marker).is_file()
        ):
            return False, f"{venv} is bridged to another environment"
        done = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        lines = (done.stderr or "").strip().splitlines()
        return done.returncode == 0, (lines[-1] if lines else "")

    def same_stack() -> str:
        ours, theirs = versions(same), versions(same, str(py))
        diff = [f"{k} {theirs.get(k)} (here {ours.get(k)})" for k in same if theirs.get(k) != ours.get(k)]
        return ", ".join(diff)

    ok, why = works()
    if not ok:
        log(f"setting up {venv} for {requirement} (a separate environment that shares this one's packages)")
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
            purelib = subprocess.run(
                [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            Path(purelib, marker).write_text(bridge)
            subprocess.run(
                [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", requirement],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as err:
            detail = (err.stderr or "").strip().splitlines()
            return None, f"could not install {requirement} into {venv}: {detail[-1] if detail else err}"
        ok, why = works()
        if not ok:
            return None, f"{requirement} installed into {venv} but `{probe}` fails: {why}"
    diff = same_stack()
    if diff:
        return None, f"{venv} does not run on this environment's packages: {diff}"
    return str(py), f"using {requirement.split('=')[0]} from {venv}"


# ---- reporting ----------------------------------------------------------------------------


def fmt(x: float, digits: int = 2) -> str:
    """A table number: thousands separated, `digits` decimals."""
    return f"{x:,.{digits}f}"


def trainer_cells(label: str, trainer_name: str, r: dict[str, Any]) -> list[str]:
    """The cells every bench table row starts with: model, trainer, s / step and its range over runs."""
    return [label, trainer_name, fmt(r["step_s"]), f"{r['step_s_range'][0]:.2f}-{r['step_s_range'][1]:.2f}"]


def versus(r: dict[str, Any], trl_row: dict[str, Any] | None, key: str) -> str:
    """`r[key]` as a multiple of TRL's (the "vs TRL" columns), "-" without a TRL row."""
    return f"{r[key] / trl_row[key]:.2f}x" if trl_row else "-"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_block(path: Path, name: str, content: str) -> None:
    """Put `content` between `<!-- bench:NAME:begin -->` and `<!-- bench:NAME:end -->` in `path`,
    appending the block when the markers are missing; the rest of the page is kept."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{content.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)


def command_line(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# ---- the benchmarked models -----------------------------------------------------------------


def run_plain(cmd: Sequence[str], env: dict[str, str], log_path: Path) -> int:
    """A setup step (not measured); its output goes to `log_path`."""
    with open(log_path, "w") as out:
        return subprocess.run(
            list(cmd), env={**os.environ, **env}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        ).returncode


def bench_model(
    name: str,
    *,
    child: Sequence[str],
    tmp: Path,
    smollm2_dir: Path,
    gguf: Path,
    data_dir: Path,
    env: dict[str, str],
    logs: Path,
) -> tuple[Path | None, str]:
    """(model dir, "") for `tiny` (built fresh in `tmp`) or `smollm2` (converted once from the
    demo .gguf into `smollm2_dir`), or (None, why it is skipped). `child` is the calling bench's
    own command line, whose `--child build-tiny` / `--child convert` do the work in a subprocess."""
    if name == "tiny":
        model_dir = tmp / "tiny-llama"
        run_plain(
            [*child, "--child", "build-tiny", "--spec", json.dumps({"out": str(model_dir), "data_dir": str(data_dir)})],
            env,
            logs / "build-tiny.log",
        )
        failed = f"tiny model skipped: building it failed (see {logs / 'build-tiny.log'})"
    elif name == "smollm2":
        model_dir = smollm2_dir.resolve()
        if not (model_dir / "config.json").is_file():
            if not gguf.is_file():
                return None, f"SmolLM2 skipped: {gguf} is missing (`make demo-model` fetches it)"
            log(f"converting {gguf} to a plain HF dir {model_dir} (once)")
            run_plain(
                [
                    *child,
                    "--child",
                    "convert",
                    "--spec",
                    json.dumps({"gguf": str(gguf.resolve()), "out": str(model_dir)}),
                ],
                env,
                logs / "convert.log",
            )
        failed = f"SmolLM2 skipped: converting {gguf} failed (see {logs / 'convert.log'})"
    else:
        raise SystemExit(f"unknown model {name!r} (tiny, smollm2)")
    return (model_dir, "") if (model_dir / "config.json").is_file() else (None, failed)


def trl_run_args(seed: int) -> dict[str, Any]:
    """TrainingArguments fields every TRL run here shares: fp32 like rlkit (TRL defaults to bf16
    and gradient checkpointing), no saving, no reporting, no progress bars, data in-process."""
    import torch

    return dict(
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


# ---- model FLOPs and MFU ------------------------------------------------------------------------

#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a
#: substring of `torch.cuda.get_device_name()`; the first match wins (H100 PCIe before H100).
GPU_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
)


def matmul_peak_flops(device: str = "cpu", dtype: str = "fp32", size: int | None = None, seconds: float = 1.0) -> float:
    """This machine's matmul limit, measured: FLOP/s of a large square `torch.mm` (2 n^3 per product)
    in `dtype` on `device`, the best of repeated timings over about `seconds`. It is the ceiling the
    MFU columns compare against: what this hardware and torch build actually reach, not a data sheet."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    n = size or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up (kernel choice, page faults)
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
    return 2 * n**3 / best


def gpu_peak_flops(name: str | None) -> float | None:
    """The data-sheet dense bf16 peak of the GPU called `name`, in FLOP/s, or None if unknown."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if name and key in name:
            return tflops * 1e12
    return None


def model_flops_per_token(
    matmul_params: int, layers: int, hidden: int, context: float, lora: bool = False, train: bool = True
) -> float:
    """Model FLOPs of one token (PaLM's accounting, Chowdhery et al. 2022, appendix B).

    Each parameter of a matmul costs 2 FLOPs per token forward and 4 backward (the gradients of the
    input and of the weight): 6N to train, 2N forward only. With LoRA the frozen base computes no
    weight gradients: 4N (the adapters' own few FLOPs left out). Attention adds, per layer and token,
    2 x 2 x context x hidden forward (QK^T and the weighted sum of V), 3x that to train. `context`
    is the row length a token attends over (an upper bound for packed rows, whose tokens see only
    their own example). Recomputation (gradient checkpointing) is not model FLOPs and not counted.
    """
    per_param = (4 if lora else 6) if train else 2
    attention = 4 * layers * hidden * context * (3 if train else 1)
    return per_param * matmul_params + attention


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the model FLOPs a run computes per second over the hardware's peak."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else float("nan")


def matmul_params_of(model_dir: str) -> tuple[int, int, int]:
    """(matmul parameters, layers, hidden) of a model, from its config on the meta device (rlkit's
    memory planner): every parameter but the input embedding's, whose lookup is no matmul (a head
    tied to it does multiply, so a tied model counts all its parameters)."""
    from rlkit.training.memory_plan import read_shape

    shape = read_shape(model_dir)
    embedding = shape.vocab * shape.hidden
    matmul = shape.params if shape.head_params == 0 else shape.params - embedding
    return matmul, shape.layers, shape.hidden


def mfu_line(device: str, peaks: dict[str, float], gpu_name: str | None = None) -> str:
    """The line under a table that says what its MFU column is measured against."""
    parts = [f"{dtype} {flops / 1e9:,.1f} GFLOP/s" for dtype, flops in peaks.items()]
    sheet = gpu_peak_flops(gpu_name) if device == "cuda" else None
    text = (
        f"MFU: model FLOPs per second (`model_flops_per_token` in bench/common.py: 6N per trained token, 4N with "
        f"LoRA, + attention) over this machine's matmul peak measured in the same run ({device}: {', '.join(parts)}; "
        f"a large `torch.mm`)"
    )
    if sheet:
        text += f"; against the data-sheet bf16 peak of the {gpu_name} ({sheet / 1e12:,.0f} TFLOP/s) in brackets"
    # nominal work, not work done: rlkit skips some of what the count includes, so it can pass 100%
    return text + (
        ". The count is the nominal work of every token; rlkit skips part of it (the vocabulary head at"
        " prompt positions; grpo runs a group's prompt once), so its MFU can exceed 100%: compare it with TRL's."
    )
