"""Rewards for sampled completions: a reward-model dir, or a Python function.

`load_reward(spec, ...)` turns what the user passed to `--reward` into a `Reward`:

- a `train-rm` output dir (or any sequence-classification model with one label, full or a
  LoRA adapter with task_type SEQ_CLS): the conversation is rendered with the reward
  model's OWN tokenizer and template (its saved chat template, else the policy's template),
  tokenised exactly as `train-rm` tokenised pairs (prompt segment, then the completion's
  segments with EOS, one leading BOS when the tokenizer wants one), and scored at the last
  token. Re-rendering text rather than reusing the policy's token ids is what keeps the score
  right when the two tokenizers or templates differ, and is identical when they do not.
- `module:function`: a function `(prompts, completions) -> list[float]` for rule-based or
  verifiable rewards (e.g. `rlkit.demo.task:reward`). Prompts are given as the plain text of the
  user's prompt (the message content for a single-message prompt, else the rendered prompt).

Both take `(conversations, completions)`: the prompt messages and the completion strings,
and return scores [B]. `eval` scores functions with the same `FunctionReward`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from rlkit.data.formats import Messages
from rlkit.data.pairs import completion_segments
from rlkit.data.templates import ChatTemplate, prompt_text, resolve_template
from rlkit.data.tokenize import IGNORE, finish_ids, wants_bos
from rlkit.errors import InputError, RunError


class Reward(Protocol):
    def __call__(self, conversations: list[Messages], completions: list[str]) -> torch.Tensor | list[float]:
        """Scores [B]: a float tensor on CPU (a model) or a list of floats (a function)."""


def prompt_string(prompt: Messages, tokenizer: Any = None, template: ChatTemplate | None = None) -> str:
    """The text a rule-based reward sees for a prompt: the content of a one-message prompt (what a
    verifiable checker like `rlkit.demo.task:reward` wants), else the prompt rendered with the
    policy's template (contents joined by blank lines when there is none). `ppo` and `eval` share
    this rule, so a function scores a completion the same way in training and in evaluation."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    if tokenizer is None or template is None:
        return "\n\n".join(m["content"] for m in prompt)
    return prompt_text(tokenizer, template, prompt)


class FunctionReward:
    """`module:function(prompts: list[str], completions: list[str]) -> list[float]`.

    The module is imported with the working directory on the path (a reward.py next to the
    data, as users expect); its failures, wrong lengths, non-numbers and non-finite scores are
    run errors naming the function.
    """

    def __init__(self, spec: str, render: Callable[[Messages], str] = prompt_string):
        module_name, _, function_name = spec.partition(":")
        if not module_name or not function_name:
            raise InputError(f"--reward {spec!r}: expected a reward model dir or module:function")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # the user's module may fail in any way on import
            raise InputError(
                f"--reward {spec}: cannot import {module_name!r} ({type(err).__name__}: {err}); is it on PYTHONPATH?"
            )
        function = getattr(module, function_name, None)
        if not callable(function):
            raise InputError(f"--reward {spec}: {module_name} has no function {function_name!r}")
        self.name, self.function, self.render = spec, function, render

    def __call__(self, conversations: list[Messages], completions: list[str]) -> list[float]:
        try:
            scores = list(self.function([self.render(c) for c in conversations], list(completions)))
        except Exception as err:  # the user's code: report it as a run failure, not a traceback
            raise RunError(f"--reward {self.name} failed: {type(err).__name__}: {err}")
        if len(scores) != len(completions):
            raise RunError(f"--reward {self.name} returned {len(scores)} scores for {len(completions)} completions")
        try:
            values = [float(v) for v in scores]
        except (TypeError, ValueError):
            raise RunError(f"--reward {self.name} returned non-numbers (e.g. {scores[0]!r}); it must return floats")
        if not all(math.isfinite(v) for v in values):
            raise RunError(f"--reward {self.name} returned NaN or infinite scores")
        return values


class ModelReward:
    """A one-score sequence classifier, scoring text rendered with its own tokenizer and template."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        template: ChatTemplate,
        batch_size: int = 16,
        max_length: int = 4096,
    ):
        self.model, self.tokenizer, self.template = model.eval().requires_grad_(False), tokenizer, template
        self.batch_size, self.max_length = batch_size, max_length
        self.bos_id = tokenizer.bos_token_id if wants_bos(tokenizer) else None

    def encode(self, messages: Messages, completion: str) -> list[int]:
        """Token ids exactly as `train-rm` built them for a (prompt, completion) pair."""
        tok = self.tokenizer
        segments = [(prompt_text(tok, self.template, messages), False)]
        segments += completion_segments(
            tok, self.template, messages, [{"role": "assistant", "content": completion}], "reward"
        )
        pieces = tok([text for text, _ in segments], add_special_tokens=False).input_ids
        prompt_ids, _ = finish_ids(list(pieces[0]), [IGNORE] * len(pieces[0]), self.bos_id)
        ids = prompt_ids + [i for piece in pieces[1:] for i in piece]
        return ids[-self.max_length :]

    @torch.no_grad()
    def __call__(self, conversations: list[Messages], completions: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores = []
        rows = [self.encode(m, c) for m, c in zip(conversations, completions)]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(chunk):  # right padding; the score is read at each row's last real token
                ids[i, : len(row)], mask[i, : len(row)] = torch.as_tensor(row), 1
            ids, mask = ids.to(device), mask.to(device)
            hf = unwrap_peft(self.model)
            hidden = getattr(hf, hf.base_model_prefix)(
                input_ids=ids, attention_mask=mask, use_cache=False
            ).last_hidden_state
            last = mask.sum(1) - 1
            h = hidden[torch.arange(len(chunk), device=device), last]
            scores.append(hf.score(h).squeeze(-1).float().cpu())
        return torch.cat(scores)


def unwrap_peft(model: torch.nn.Module) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself): where a sequence
    classifier's trunk (`base_model_prefix`) and `score` head are attributes."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_model_dir(spec: str) -> bool:
    path = Path(spec)
    return path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file())


def load_sequence_classifier(
    path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a reward model dir: a full sequence classifier or a SEQ_CLS LoRA adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory = Path(path)
    try:
        if (directory / "adapter_config.json").is_file():
            from peft import PeftModel

            adapter = json.loads((directory / "adapter_config.json").read_text())
            if adapter.get("task_type") != "SEQ_CLS":
                raise InputError(
                    f"--reward {path}: a LoRA adapter of task {adapter.get('task_type')!r}, not a reward model (SEQ_CLS)"
                )
            base = adapter.get("base_model_name_or_path")
            tok_dir = path if (directory / "tokenizer_config.json").is_file() else base
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForSequenceClassification.from_pretrained(
                base,
                num_labels=1,
                pad_token_id=tokenizer.pad_token_id,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as err:
        raise InputError(
            f"--reward {path}: cannot load it as a sequence-classification reward model ({str(err).splitlines()[0]})"
        )
    if model.config.num_labels != 1:
        raise InputError(
            f"--reward {path}: the model has {model.config.num_labels} labels; a reward model has one score"
        )
    if not hasattr(model, "score") or not hasattr(model, model.base_model_prefix):
        raise InputError(f"--reward {path}: {type(model).__name__} has no `score` head over a trunk")
    return model, tokenizer


def load_reward(
    spec: str,
    policy_tokenizer: Any,
    policy_template: ChatTemplate,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    trust_remote_code: bool = False,
) -> Reward:
    """`--reward DIR` or `--reward module:function` -> a `Reward`."""
    if is_model_dir(spec):
        model, tokenizer = load_sequence_classifier(spec, dtype, trust_remote_code)
        template = resolve_template(None, tokenizer) if getattr(tokenizer, "chat_template", None) else policy_template
        return ModelReward(model.to(device), tokenizer, template, batch_size)
    if ":" in spec and not Path(spec).exists():
        return FunctionReward(spec, lambda messages: prompt_string(messages, policy_tokenizer, policy_template))
    raise InputError(
        f"--reward {spec}: neither a reward model dir (config.json / adapter_config.json) nor module:function"
    )
