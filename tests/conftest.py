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
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "rlkit" / "demo" / "data"
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _corpus() -> list[str]:
    lines = []
    for path in sorted(DEMO_DATA.glob("*.jsonl")):
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
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `rlkit ...` in a subprocess exactly as a user would."""
    # One thread per run: on 2 shared cores, 2 threads per subprocess oversubscribe badly.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rlkit", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
