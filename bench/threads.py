"""How many CPU threads a training step should use when other jobs share the cores.

torch's default is one intra-op thread per physical core. Its OpenMP threads meet at a barrier
after every parallel operator, and a thread that reaches the barrier first spins there; when
another job holds one of the cores, the thread that was descheduled arrives late at every
barrier and the spinning ones burn the time it needed (the demo's SFT step went from ~5 s to
75 s that way). This bench times one training step (forward, backward, AdamW) of a SmolLM2-
shaped Llama in a child process per configuration, on a quiet machine and with one other job
running (the same step in a loop, with torch's defaults, as another user's training would be),
and prints a markdown table: the one in docs/guide.md, "Threads".

    python bench/threads.py                   # every configuration, quiet and loaded (~5 min on 2 cores)
    python bench/threads.py --layers 2 --steps 4   # a one-minute look

Nothing here is asserted; the numbers are read by people. Run it on a machine where nothing else
runs: the "quiet" column is only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import log, machine_info  # noqa: E402

# label -> (threads: 0 = leave torch's default; "rlkit" = rlkit's own choice, environment: extra variables)
CONFIGS: dict[str, tuple[int | str, dict[str, str]]] = {
    "torch default": (0, {}),
    "2 threads": (2, {}),
    "2 threads + OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (1, {}),
    "rlkit default (--threads unset)": ("rlkit", {}),
}


def _step_times(threads: int | str, steps: int, layers: int) -> dict:
    """In the child: build the model, then time `steps` training steps after one warm-up."""
    if threads == "rlkit":  # as the CLI does: the wait policy before torch loads, then --threads unset
        from rlkit.performance import use_threads, wait_without_spinning

        wait_without_spinning()
        use_threads(None)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(threads, int) and threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(  # SmolLM2-135M's widths, fewer layers and a smaller vocabulary
        vocab_size=8192,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, config.vocab_size, (4, 256))
    times, cpu = [], []
    for i in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"threads": torch.get_num_threads(), "step_s": times, "cpu_s": cpu}


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _run(label: str, steps: int, layers: int) -> dict:
    threads, extra = CONFIGS[label]
    cmd = [sys.executable, __file__, "--child", json.dumps([threads, steps, layers])]
    out = subprocess.run(cmd, env=_child_env(extra), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _competitor(layers: int) -> subprocess.Popen:
    """One other job on the same cores: the same step, with torch's default threads, until killed."""
    cmd = [sys.executable, __file__, "--child", json.dumps([0, 10**9, layers])]
    return subprocess.Popen(cmd, env=_child_env({}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps timed per run, after one warm-up step")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2-shaped model")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration and condition")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated labels of CONFIGS")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        threads, steps, layers = json.loads(args.child)
        print(json.dumps(_step_times(threads, steps, layers)))
        return
    labels = [c for c in args.configs.split(",") if c]
    results: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    used: dict[str, int] = {}
    load: dict[str, list[float]] = {}
    for condition in ("quiet", "one other job"):
        competitor = _competitor(args.layers) if condition != "quiet" else None
        try:
            if competitor is not None:
                time.sleep(8)  # let it load and reach its loop
            for _ in range(args.repeats):
                for label in labels:
                    result = _run(label, args.steps, args.layers)
                    used[label] = result["threads"]
                    results.setdefault((label, condition), []).append(statistics.median(result["step_s"]))
                    cpu.setdefault((label, condition), []).append(statistics.median(result["cpu_s"]))
                    load.setdefault(condition, []).append(os.getloadavg()[0])
                    log(f"{condition:>13} | {label}: {results[(label, condition)][-1]:.2f} s/step")
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    info = machine_info()
    loads = ", ".join(f"{c} {statistics.mean(v):.1f}" for c, v in load.items())
    print(f"{info['cpu']}, {info['cores']} cores; {args.layers}-layer SmolLM2-shaped Llama, 4 x 256 tokens, fp32;")
    print(f"median of {args.repeats} runs of {args.steps} steps each; mean 1-min load average: {loads}.\n")
    print("| threads | torch threads | quiet: s/step | CPU-s/step | one other job: s/step | CPU-s/step |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        row = [used[label]]
        for condition in ("quiet", "one other job"):
            row += [statistics.median(results[(label, condition)]), statistics.median(cpu[(label, condition)])]
        print(f"| {label} | {row[0]} | " + " | ".join(f"{v:.2f}" for v in row[1:]) + " |")


if __name__ == "__main__":
    main()
