"""Rewards for sampled completions: a reward model, or a Python function. One loader, one scorer.

`load_reward(spec, ...)` turns what the user passed to `--reward` into a `Reward`, for `ppo`
and `eval` alike:

- a reward model (a `train-rm` output dir, any one-score sequence classifier, full or a LoRA
  adapter with task_type SEQ_CLS, or a .gguf file): loaded by `load_sequence_classifier`,
  the one loader (the PPO critic `--critic rm` and eval's pair accuracy use it too). The
  conversation is rendered with the reward model's OWN tokenizer and template (its saved chat
  template, else `--template`, else the policy's), tokenised by train-rm's own code
  (`rlkit.data.pairs.tokenize_pairs`), and scored by train-rm's own `RewardScorer` at the
  sequence's last non-pad token. Re-rendering text rather than reusing the policy's token ids
  is what keeps the score right when the two tokenizers or templates differ, and is identical
  when they do not; sharing train-rm's code is what makes a completion score in PPO and eval
  what the same text scored as a chosen reply in training.
- `module:function`: a function `(prompts, completions) -> list[float]` for rule-based or
  verifiable rewards (e.g. `rlkit.demo.task:reward`). Prompts are given as the plain text of the
  user's prompt (the message content for a single-message prompt, else the rendered prompt).
  `grpo` also passes the prompt records' other columns as keyword arguments (`answer=[...]`)
  and accepts None for "no score" (see `FunctionReward.__call__`).

Both take `(conversations, completions)`: the prompt messages and the completion strings,
and return scores [B].
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from rlkit.data.formats import Messages
from rlkit.data.pairs import collate_sequences, last_token_index, prompted_sequence, tokenize_pairs
from rlkit.data.templates import ChatTemplate, prompt_text, resolve_template
from rlkit.errors import InputError, RunError
from rlkit.models.inference import adapter_score_labels
from rlkit.models.load import (
    ModelSource,
    adapter_config,
    is_reward_model,
    load_tokenizer,
    loading,
    resolve_source,
    strip_gguf_marker,
)
from rlkit.models.modes import model_device, to_device


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

    def __call__(
        self,
        conversations: list[Messages],
        completions: list[str],
        columns: dict[str, list[Any]] | None = None,
        allow_none: bool = False,
    ) -> list[float | None]:
        """Scores of the completions. `columns` (the prompt records' other columns, one value per
        completion) are passed as keyword arguments, the way TRL passes dataset columns: all of
        them to a function with `**kwargs`, else those it names. With `allow_none` (grpo) a None
        score means "no opinion on this completion" and is returned as None."""
        kwargs = self._keywords(columns or {})
        try:
            scores = list(self.function([self.render(c) for c in conversations], list(completions), **kwargs))
        except Exception as err:  # the user's code: report it as a run failure, not a traceback
            raise RunError(f"--reward {self.name} failed: {type(err).__name__}: {err}")
        if len(scores) != len(completions):
            raise RunError(f"--reward {self.name} returned {len(scores)} scores for {len(completions)} completions")
        try:
            values = [None if v is None and allow_none else float(v) for v in scores]
        except (TypeError, ValueError):
            bad = next(v for v in scores if not _is_number(v))
            allowed = "floats or None" if allow_none else "floats"
            raise RunError(f"--reward {self.name} returned non-numbers (e.g. {bad!r}); it must return {allowed}")
        if not all(v is None or math.isfinite(v) for v in values):
            raise RunError(f"--reward {self.name} returned NaN or infinite scores")
        return values

    def _keywords(self, columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not columns:
            return {}
        try:
            parameters = inspect.signature(self.function).parameters.values()
        except (TypeError, ValueError):  # a builtin or C function: give it everything
            return dict(columns)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return dict(columns)
        named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return {k: v for k, v in columns.items() if k in named}


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# ---- reward models ---------------------------------------------------------------------------


def unwrap_peft(model: torch.nn.Module) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself): where a sequence
    classifier's trunk (`base_model_prefix`) and `score` head are attributes."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def has_score_head(model: torch.nn.Module) -> bool:
    hf = unwrap_peft(model)
    return hasattr(hf, "score") and hasattr(hf, hf.base_model_prefix)


class RewardScorer(torch.nn.Module):
    """Scores of every sequence of a batch laid out by `rlkit.data.pairs.collate_sequences`, [N].

    Why the score is gathered here rather than by the HF head: sequences are batched
    padding-free (several per row), and the HF head finds one last token per ROW. So this runs
    the head's own trunk, takes the hidden state at the last non-pad token of each SEQUENCE (the
    HF rule, applied per sequence, so a saved model scores a lone sequence exactly as training
    did) and applies the head's own `score` layer there: no compute on padding, and the head's
    matmul on N vectors instead of every position. train-rm trains this module (so DDP/FSDP see
    one forward); ppo and eval score with it.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int | None, merge: bool = True):
        super().__init__()
        self.model, self.pad_id, self.merge = model, pad_id, merge
        if not has_score_head(model):
            hf = unwrap_peft(model)
            raise InputError(
                f"{type(hf).__name__} has no `score` head over a `{hf.base_model_prefix}` trunk; rlkit train-rm needs a decoder model"
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_index: torch.Tensor, num_sequences: int
    ) -> torch.Tensor:
        hf = unwrap_peft(self.model)
        trunk = getattr(hf, hf.base_model_prefix)
        hidden = trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        last = last_token_index(input_ids, seq_index, self.pad_id, num_sequences)
        return hf.score(hidden.reshape(-1, hidden.size(-1))[last]).squeeze(-1).float()

    def save_pretrained(self, directory: str, **kwargs: Any) -> None:
        """The HF model (LoRA merged unless --no-merge), loadable without rlkit."""
        from peft import PeftModel

        model = self.model
        if isinstance(model, PeftModel) and self.merge:
            model = model.merge_and_unload()
        model.save_pretrained(directory, **kwargs)


def classifier_from_pretrained(
    source: ModelSource,
    pad_token_id: int | None,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
    name: str | None = None,
) -> torch.nn.Module:
    """`AutoModelForSequenceClassification` of `source`'s base weights, with the pad id its head needs.

    `num_labels` None keeps the config's; train-rm asks for 1 (a new head on a causal LM).
    """
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype, "pad_token_id": pad_token_id, "trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    with loading(name or source.name, "it as a sequence classifier"):
        model = AutoModelForSequenceClassification.from_pretrained(source.path, **kwargs, **source.kwargs())
    strip_gguf_marker(model)
    model.config.pad_token_id = pad_token_id
    return model


def load_sequence_classifier(
    spec: str | ModelSource,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    option: str = "--reward",
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a reward model: a full sequence classifier or a SEQ_CLS LoRA adapter (merged).

    `option` names where the user gave it, for the error lines ("--reward DIR: ...", or the
    bare name for eval's MODEL).
    """
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    name = f"{option} {source.name}" if option else source.name
    if source.adapter_dir:
        task = adapter_config(source.adapter_dir).get("task_type")
        if task != "SEQ_CLS":
            raise InputError(f"{name}: a LoRA adapter of task {task!r}, not a reward model (SEQ_CLS)")
    elif not is_reward_model(source):
        raise InputError(
            f"{name}: not a reward model (no *ForSequenceClassification architecture); pass a `rlkit train-rm` output dir or module:function"
        )
    tokenizer = load_tokenizer(source, trust_remote_code)
    labels = adapter_score_labels(source.adapter_dir) if source.adapter_dir else None
    model = classifier_from_pretrained(source, tokenizer.pad_token_id, dtype, trust_remote_code, labels, name)
    if source.adapter_dir:
        from peft import PeftModel

        with loading(name, "its adapter"):
            model = PeftModel.from_pretrained(model, source.adapter_dir).merge_and_unload()
    if model.config.num_labels != 1:
        raise InputError(f"{name}: the model has {model.config.num_labels} labels; a reward model has one score")
    if not has_score_head(model):
        raise InputError(f"{name}: {type(model).__name__} has no `score` head over a trunk")
    return model, tokenizer


class ModelReward:
    """A one-score sequence classifier scoring (prompt, completion) text as train-rm scored pairs."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        template: ChatTemplate,
        batch_size: int = 16,
        max_length: int = 4096,
        name: str = "the reward model",
    ):
        self.tokenizer, self.template, self.name = tokenizer, template, name
        self.scorer = RewardScorer(model.eval().requires_grad_(False), tokenizer.pad_token_id)
        self.batch_size, self.max_length = batch_size, max_length

    def tokenize(self, conversations: list[Messages], completions: list[str]) -> list[list[int]]:
        """Token ids of each prompt + completion: the chosen sequence train-rm builds for that pair."""
        records = [{"prompt": m, "chosen": c, "rejected": c} for m, c in zip(conversations, completions)]
        rows, stats = tokenize_pairs(records, self.tokenizer, self.template, self.max_length, source=self.name)
        if stats.dropped:
            raise InputError(
                f"{stats.dropped} prompt(s) alone fill --max-length {self.max_length} tokens of {self.name} (record {stats.dropped_records[0]}); raise --max-length"
            )
        return [prompted_sequence(r["prompt_input_ids"], r["chosen_input_ids"], r["chosen_labels"])[0] for r in rows]

    def encode(self, messages: Messages, completion: str) -> list[int]:
        return self.tokenize([messages], [completion])[0]

    @torch.no_grad()
    def score_sequences(self, sequences: list[list[int]]) -> torch.Tensor:
        """Score of each token sequence [N], float32 on CPU; one sequence per right-padded row."""
        pad = self.tokenizer.pad_token_id
        device = model_device(self.scorer.model)
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = [(ids, ids) for ids in sequences[start : start + self.batch_size]]  # labels unused
            batch = to_device(collate_sequences(chunk, pad, padding_free=False), device)
            scores.append(self.scorer(batch["input_ids"], batch["position_ids"], batch["seq_index"], len(chunk)).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def __call__(self, conversations: list[Messages], completions: list[str]) -> torch.Tensor:
        return self.score_sequences(self.tokenize(conversations, completions))


def is_model_dir(spec: str) -> bool:
    path = Path(spec)
    return path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file())


def load_reward(
    spec: str,
    policy_tokenizer: Any = None,
    policy_template: ChatTemplate | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    trust_remote_code: bool = False,
    *,
    max_length: int = 4096,
    template: str | None = None,
) -> Reward:
    """`--reward PATH` (a reward model) or `--reward module:function` -> a `Reward`.

    The policy's tokenizer and template render multi-message prompts for a function, and are
    a reward model's template when it has none of its own and no `template` (`--template`) is given.
    """
    if Path(spec).exists() or spec.endswith(".gguf"):
        model, tokenizer = load_sequence_classifier(spec, dtype, trust_remote_code)
        if getattr(tokenizer, "chat_template", None):
            rm_template = resolve_template(None, tokenizer, spec)  # what it was trained with
        elif template is not None or policy_template is None:
            rm_template = resolve_template(template, tokenizer, spec)
        else:
            rm_template = policy_template
        return ModelReward(model.to(device), tokenizer, rm_template, batch_size, max_length, spec)
    return FunctionReward(spec, lambda messages: prompt_string(messages, policy_tokenizer, policy_template))
