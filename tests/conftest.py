"""Tiny models and tokenizers built offline, so every test runs without a network or a hub.

The tokenizer is a byte-level BPE trained on the demo data (a few hundred merges) and adds a
BOS like Llama's; the model is a random-init Llama of ~100k parameters. Both are saved as
ordinary HF dirs, which is what the commands read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "rlkit" / "demo" / "data"
SMOLLM2 = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # the demo model (slow tests)
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _corpus() -> list[str]:
    lines = []
    for path in sorted(DEMO_DATA.glob("*.jsonl")):
        if path.stem == "sft_tools":  # sft.jsonl's conversations again, with tool turns: the corpus (so
            continue  # the tiny tokenizer, and every number the suite derived with it) stays as it was
        for line in path.read_text().splitlines():
            lines.append(" ".join(str(v) for v in json.loads(line).values()))
    return lines + ["Question: Answer: system user assistant [INST] [/INST] <<SYS>> <</SYS>>"] * 5


def build_tokenizer(vocab_size: int = 600, with_bos: bool = True, chat_template: str | None = "chatml"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from rlkit.data.templates import shipped_template

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    if with_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    if chat_template:
        tokenizer.chat_template = shipped_template(chat_template)
    return tokenizer


def build_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on two cores) each worker computes on one
    intra-op thread: two workers of two threads each would oversubscribe the cores, which costs
    OpenMP far more than it gains on tiny models."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama + tokenizer (chatml chat template) dir."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def no_template_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-no-template")
    tokenizer = build_tokenizer(chat_template=None)
    build_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_process_boundary_test = False


@pytest.fixture(autouse=True)
def _real_processes_for_process_boundary_tests(request):
    """`@pytest.mark.process_boundary`: every `run_cli` of the test starts a real `python -m rlkit`
    (one smoke test per command keeps what the shell sees covered end to end)."""
    global _process_boundary_test
    _process_boundary_test = request.node.get_closest_marker("process_boundary") is not None
    yield
    _process_boundary_test = False


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own data cache, so cached packing never leaks between tests."""
    monkeypatch.setenv("RLKIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _output_locks_released():
    """A run called in process (not through the CLI, which releases them) keeps its OUT locked
    until the process ends; release them after each test so no test sees another's lock."""
    yield
    from rlkit.output import release_output_locks

    release_output_locks()


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600, process: bool = False
) -> subprocess.CompletedProcess:
    """`rlkit ...` as a user runs it, with its exit code, stdout and stderr.

    By default in this process, through the same typer app, error mapping and stdout printing as
    the `rlkit` script (`run_in_process`): a new interpreter spends ~6 s importing torch and
    transformers before the first line of rlkit runs, which was most of the suite's time.
    `process=True`, or a test marked `process_boundary`, runs a real `python -m rlkit` where the
    process boundary is what a test checks: the exit code and stdout (OUT's path, nothing else) a
    shell sees, signals, environment read at import, several runs at once.
    """
    if not (process or _process_boundary_test):
        return run_in_process(args, cwd=cwd, env=env)
    # One thread per run: on 2 shared cores, 2 threads per subprocess oversubscribe badly.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rlkit", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_in_process(
    args: tuple[str, ...], cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the `rlkit` app in this process, isolated as a new process would be where it matters:

    - stdout and stderr captured apart (print and the rich console resolve sys.stdout/stderr per call);
    - `env` set for the call and put back; `cwd` entered and left; sys.argv is the command's (the
      model card quotes it); one intra-op thread, as the subprocess runs had (same kernels, same sums);
    - accelerate's process-wide state reset before the call (a run at another precision would be refused);
    - modules the run imported from outside the repo and site-packages (a reward.py a test wrote)
      forgotten afterwards, with sys.path put back, so the next test's module of the same name is its own.
    """
    import contextlib
    import importlib
    import io

    import torch
    from accelerate.state import AcceleratorState, GradientState

    from rlkit.cli import app

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    importlib.invalidate_caches()  # a module file written a moment ago is found
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_path = dict(os.environ), sys.argv, list(sys.path)
    saved_modules, saved_threads, saved_cwd = set(sys.modules), torch.get_num_threads(), os.getcwd()
    code: int | str | None = 0
    try:
        os.environ.update(env or {})
        sys.argv = ["rlkit", *map(str, args)]
        torch.set_num_threads(1)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app(args=[str(a) for a in args], prog_name="rlkit")
            except SystemExit as done:
                code = done.code
    finally:
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        for name in set(sys.modules) - saved_modules:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if origin and not origin.startswith((str(REPO), sys.prefix, sys.base_prefix)):
                del sys.modules[name]
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(["rlkit", *args], returncode, out.getvalue(), err.getvalue())


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def interrupted_after(monkeypatch, run: Callable[[Any], Any], config: Any, checkpoint: str, metric_lines: int) -> Path:
    """OUT.partial as a run left it when interrupted right after `checkpoint`: `run(config)` goes to the
    end but its last write (the rename to OUT) fails, then every later checkpoint and all but the first
    `metric_lines` lines of the metrics log are removed. `--resume` continues from there; the resume
    tests compare its result with an uninterrupted run's. Returns OUT.partial."""
    import shutil

    import rlkit.training.run as run_module
    from rlkit.errors import RunError

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RunError("simulated crash before the output was written")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "finalize", crash)
        with pytest.raises(RunError):
            run(config)
    partial = Path(f"{config.output}.partial")
    checkpoints = sorted(p.name for p in (partial / "checkpoints").iterdir())
    assert checkpoint in checkpoints, checkpoints
    for name in checkpoints:
        if name != checkpoint:
            shutil.rmtree(partial / "checkpoints" / name)
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:metric_lines]))
    return partial


def dequantized_smollm2(directory: Path) -> Path:
    """The demo model as a float32 transformers dir (a `.gguf` is dequantized on every load, ~20 s;
    a slow test that loads it several times converts it once)."""
    subprocess.run(
        [sys.executable, "-m", "rlkit.demo.dequantize", str(SMOLLM2), str(directory)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return directory


def assert_same_up_to_fp32(got: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    """Equal to within 1e-6 of the tensor's largest entry. Why not float64's rounding: the model's
    RMSNorm computes in float32 whatever the model's dtype (transformers' `.to(torch.float32)`, and
    rlkit's lean blocks alike), so sums taken in another order (a prefix's batch 1, then its rows)
    differ by float32 rounding: measured up to 8e-8 of the largest gradient entry, 1e-12 in the
    log-probs; 1e-6 is ~8 float32 epsilons, and a wrong position or mask gives O(1)."""
    if expected is None:
        assert got is None
        return
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-6 * max(scale, 1.0), (float((got - expected).abs().max()), scale)
