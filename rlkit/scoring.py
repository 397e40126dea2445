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
- `module:function`: a function for rule-based or verifiable rewards (e.g.
  `rlkit.demo.task:reward`), called the way TRL's GRPOTrainer calls reward functions:
  `prompts=`, `completions=`, `completion_ids=` and every other column of the prompt data as
  keywords (`FunctionReward` has the rule). String prompts reach it as strings (the message
  content; a multi-message prompt rendered with the policy's template), conversational ones as
  message lists with `[{"role": "assistant", "content": ...}]` completions. `grpo` accepts None
  for "no score".

Both score a `RewardBatch` through `score_batch` (a reward model reads only its conversations and
completion texts) and are `Reward`s: `(conversations, completions) -> scores [B]`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


#: The keywords TRL's GRPOTrainer calls every reward function with (the data's other columns follow).
TRL_KEYWORDS = ("prompts", "completions", "completion_ids")


@dataclass(frozen=True)
class RewardBatch:
    """What a reward scores, one entry per completion, and what a function gets besides the texts.

    `conversational` says how the prompts were given (message lists, or a `messages` column, rather
    than strings): it decides whether a function sees messages or strings, as in TRL, and is lost
    once prompts become messages, so the prompt loader hands it on (`rlkit.data.prompts.PromptRows`).
    `completion_ids` are the sampled token ids through the first EOS (None where none were sampled:
    eval --completions); `columns` the prompt records' other columns, one value per completion.
    """

    conversations: list[Messages]
    completions: list[str]
    conversational: bool = False
    completion_ids: list[list[int]] | None = None
    columns: Mapping[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class CallingRule:
    """How a reward function's parameters say it wants its arguments (see `FunctionReward`)."""

    by_keyword: bool  # it names prompts/completions/completion_ids or takes **kwargs: TRL's keyword call
    takes_all: bool  # **kwargs: every keyword
    names: frozenset[str]  # the parameters a keyword can fill
    required: frozenset[str]  # those of them without a default

    @classmethod
    def of(cls, function: Callable[..., Any]) -> CallingRule:
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):  # a builtin or C function: TRL's call, every keyword
            return cls(True, True, frozenset(), frozenset())
        takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters)
        keywordable = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        names = frozenset(p.name for p in keywordable)
        required = frozenset(p.name for p in keywordable if p.default is p.empty)
        return cls(takes_all or bool(names & set(TRL_KEYWORDS)), takes_all, names, required)


class FunctionReward:
    """`--reward module:function`: a Python function scoring completions, called the way TRL's
    GRPOTrainer calls reward functions, so a TRL reward function ports unchanged.

    The calling rule (one, for grpo, ppo and eval):

    - a function that names `prompts`, `completions` or `completion_ids`, or takes `**kwargs`, is
      called by keyword: `prompts=`, `completions=`, `completion_ids=` and every other column of the
      prompt data (`solution=[...]`), all of them with `**kwargs`, else those it names. TRL's
      `trainer_state`, `log_extra` and `log_metric` are not passed. A required parameter nothing
      fills (a column the data lacks; `completion_ids` in eval --completions) is a run error naming it;
    - any other function (`def r(p, c)`) gets `(prompts, completions)` positionally, nothing else.

    With string prompts `prompts` and `completions` are strings; with conversational prompts (message
    lists, or a `messages` column) `prompts` are the message lists and each completion is
    `[{"role": "assistant", "content": text}]`, as in TRL. A caller that gives no `RewardBatch`
    (`reward(conversations, completions)`) gets string prompts rendered by `render`.

    The module is imported with the working directory on the path (a reward.py next to the data, as
    users expect). Whatever the function does ends the run cleanly: anything it raises (SystemExit
    and KeyboardInterrupt included, unless a real Ctrl-C arrived), wrong lengths, non-numbers and
    non-finite scores are `RunError`s naming it, and what it prints goes to stderr, since stdout
    carries the command's output.
    """

    def __init__(self, spec: str, render: Callable[[Messages], str] = prompt_string):
        module_name, _, function_name = spec.partition(":")
        if not module_name or not function_name:
            raise InputError(f"--reward {spec!r}: expected a reward model dir or module:function")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            with contextlib.redirect_stdout(sys.stderr):
                module = importlib.import_module(module_name)
        except (Exception, SystemExit) as err:  # the user's module may fail in any way on import
            raise InputError(
                f"--reward {spec}: cannot import {module_name!r} ({_described(err)}); is it on PYTHONPATH?"
            )
        function = getattr(module, function_name, None)
        if not callable(function):
            raise InputError(f"--reward {spec}: {module_name} has no function {function_name!r}")
        self.name, self.function, self.render = spec, function, render
        self.rule = CallingRule.of(function)

    def __call__(self, conversations: list[Messages], completions: list[str]) -> list[float | None]:
        """Scores of string prompts' completions (the `Reward` protocol: ppo and eval's default)."""
        return self.score(RewardBatch(conversations, list(completions)))

    def score(self, batch: RewardBatch, allow_none: bool = False) -> list[float | None]:
        """Scores of the batch's completions. With `allow_none` (grpo) a None score means "no opinion
        on this completion" and is returned as None."""
        args, kwargs = self.arguments(batch)
        scores = self._run(args, kwargs)
        n = len(batch.completions)
        if len(scores) != n:
            raise RunError(f"--reward {self.name} returned {len(scores)} scores for {n} completions")
        try:
            values = [None if v is None and allow_none else float(v) for v in scores]
        except Exception:  # a non-number (a string, a tensor of several elements)
            bad = next(v for v in scores if not _is_number(v))
            allowed = "floats or None" if allow_none else "floats"
            raise RunError(f"--reward {self.name} returned non-numbers (e.g. {bad!r}); it must return {allowed}")
        if not all(v is None or math.isfinite(v) for v in values):
            raise RunError(f"--reward {self.name} returned NaN or infinite scores")
        return values

    def arguments(self, batch: RewardBatch) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(positional, keyword) arguments of the call, by the calling rule."""
        if batch.conversational:
            prompts: list[Any] = [[dict(m) for m in c] for c in batch.conversations]
            completions: list[Any] = [[{"role": "assistant", "content": text}] for text in batch.completions]
        else:
            prompts, completions = [self.render(c) for c in batch.conversations], list(batch.completions)
        given: dict[str, Any] = {k: v for k, v in batch.columns.items() if k not in TRL_KEYWORDS}
        given |= {"prompts": prompts, "completions": completions}
        if batch.completion_ids is not None:
            given["completion_ids"] = [list(ids) for ids in batch.completion_ids]
        rule = self.rule
        if not rule.by_keyword:
            return (prompts, completions), {}
        missing = sorted(rule.required - given.keys())
        if missing:
            raise RunError(
                f"--reward {self.name} needs {', '.join(missing)}, which nothing passes (it gets "
                f"{', '.join(sorted(given))}); add the column to the prompt data or give the parameter a default"
            )
        return (), given if rule.takes_all else {k: v for k, v in given.items() if k in rule.names}

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The function's result as a list; whatever it raises becomes one line naming it, except the
        KeyboardInterrupt of a Ctrl-C that arrived meanwhile (the user's, to end the run as they asked)."""
        with _InterruptWatch() as watch, contextlib.redirect_stdout(sys.stderr):
            try:
                return list(self.function(*args, **kwargs))
            except BaseException as err:  # the user's code: SystemExit and its own KeyboardInterrupt too
                if isinstance(err, KeyboardInterrupt) and watch.delivered:
                    raise
                raise RunError(f"--reward {self.name} raised {_described(err)}{_where(err)}") from None


class _InterruptWatch:
    """Notes whether a SIGINT arrives while user code runs, and hands it on to the handler that was
    there before (the engine's first Ctrl-C flag, or Python's KeyboardInterrupt) as if unwatched.

    A KeyboardInterrupt out of a reward function is then the code's own (`raise KeyboardInterrupt`)
    unless a signal was delivered meanwhile. Outside the main thread no signal reaches the code and
    nothing is watched."""

    def __enter__(self) -> _InterruptWatch:
        self.delivered, self.installed = False, False
        self.previous = signal.getsignal(signal.SIGINT)
        if self.previous is not None:  # None: a handler not set from Python, which could not be put back
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, self._note)
                self.installed = True
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.delivered = True
        signal.signal(signum, self.previous)
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous == signal.SIG_DFL:
            signal.raise_signal(signum)

    def __exit__(self, *exc: Any) -> None:
        if self.installed and signal.getsignal(signal.SIGINT) == self._note:
            signal.signal(signal.SIGINT, self.previous)


def _described(err: BaseException) -> str:
    """`SystemExit(3)`, `ZeroDivisionError('boom')`: the exception on one line, not too long."""
    try:
        text = repr(err)
    except Exception:
        text = type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _where(err: BaseException) -> str:
    """` at FILE:LINE` of the line that raised (the traceback is not shown)."""
    frames = traceback.extract_tb(err.__traceback__)
    if len(frames) < 2:  # only rlkit's own call
        return ""
    frame = frames[-1]
    path = Path(frame.filename)
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path.cwd())
    return f" at {path}:{frame.lineno}"


def score_batch(reward: Reward, batch: RewardBatch, allow_none: bool = False) -> list[float | None]:
    """The scores of any reward on a batch: a function by the calling rule (with the batch's
    columns, ids and prompt style), a reward model on the conversations and completion texts."""
    if isinstance(reward, FunctionReward):
        return reward.score(batch, allow_none)
    values = reward(batch.conversations, batch.completions)
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


class RewardSet:
    """Every reward of a run with its name and weight, scored on a batch: [n, K] float32, NaN where
    a function said None (only when `allow_none`: GRPO's "no opinion"; PPO's one reward must score
    every completion)."""

    def __init__(self, rewards: list[Reward], names: list[str], weights: list[float], allow_none: bool = True):
        self.rewards, self.names, self.weights = rewards, names, torch.tensor(weights, dtype=torch.float32)
        self.allow_none = allow_none

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        scores = []
        for reward in self.rewards:
            values = score_batch(reward, batch, allow_none=self.allow_none)
            scores.append(torch.as_tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32))
        return torch.stack(scores, dim=1)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except Exception:
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
