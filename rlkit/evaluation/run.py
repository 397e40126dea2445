"""`run_eval`: load what the question needs, answer it, report it.

Models are loaded one at a time where the question allows (the policy, then the baseline,
then the reward model), so a generation eval holds at most two models at once (policy and
reference, for the KL).
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlkit.agents.setup import Agents, load_agents
from rlkit.console import info
from rlkit.data.prompts import PromptRows
from rlkit.data.templates import ChatTemplate, resolve_template
from rlkit.errors import InputError
from rlkit.evaluation import data as eval_data
from rlkit.evaluation.config import EvalConfig, question
from rlkit.evaluation.generation import COMPLETION_LOGPS, completion_logps, kl_summary, score_summary, win_rate
from rlkit.evaluation.pair_accuracy import (
    implicit_reward_metrics,
    reward_model_scores,
    summarise,
    summed_logps,
    tokenized_pairs,
)
from rlkit.evaluation.report import print_report, write_report_dir
from rlkit.evaluation.rewards import load_eval_scorer
from rlkit.evaluation.sft import sft_metrics, sft_rows
from rlkit.models.inference import (
    dtype_hint,
    inference_device,
    inference_dtype,
    is_reward_model,
    load_causal_lm_for_inference,
)
from rlkit.models.load import ModelSource, load_tokenizer, resolve_source
from rlkit.preference.reference import (
    PAIR_LOGPS,
    DisabledAdapterReference,
    LogpsSpec,
    ModelReference,
    Reference,
    load_reference_model,
)
from rlkit.scoring import RewardBatch, load_sequence_classifier
from rlkit.tools.generation import GeneratedReply, SamplingConfig, generate_rollouts
from rlkit.tools.tool_episodes import ToolEpisodes, generate_with_tools

Result = tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[float]]]  # metrics, examples, distributions


def _free() -> None:
    """Give the memory of models the caller has just dropped back before loading the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reference(
    config: EvalConfig, source: ModelSource, tokenizer: Any, dtype: torch.dtype, required: bool, spec: LogpsSpec
) -> tuple[Reference, str] | None:
    """(the policy's reference, measuring `spec`, and its description); None when there is none.

    The strategies of training's reference: `--ref` a separate frozen model (same tokenizer
    required), an adapter policy's base its own forward with the adapter off.
    """
    if config.ref:
        ref = load_reference_model(resolve_source(config.ref), tokenizer, config.model or "", dtype)
        return ModelReference(ref.to(inference_device()), spec), config.ref
    if source.adapter_dir:
        return DisabledAdapterReference(spec), f"{source.weights} (the base, adapter disabled)"
    if required:
        raise InputError(
            f"{config.model} is a full model; pass --ref REF (the model it was trained from) to compute its implicit reward"
        )
    return None


def eval_pairs(config: EvalConfig, source: ModelSource, dtype: torch.dtype) -> Result:
    tokenizer = load_tokenizer(source)
    template = resolve_template(config.template, tokenizer, config.model or "")
    records = eval_data.read_records(config.pairs or "", config.columns, config.limit)
    rows = tokenized_pairs(records, tokenizer, template, config.max_length, config.pairs or "")
    if is_reward_model(source):
        if config.ref:
            raise InputError(
                f"--ref is the reference of a policy's implicit reward; {config.model} is a reward model, scored directly"
            )
        model, _ = load_sequence_classifier(source, dtype, option="")
        model = model.to(inference_device()).eval().requires_grad_(False)
        chosen, rejected = reward_model_scores(model, rows, tokenizer.pad_token_id, config.batch_size)
        metrics = {
            "question": "reward_model_accuracy",
            "model": config.model,
            "data": config.pairs,
            **summarise(chosen, rejected),
        }
        kind = "score"
    else:
        policy = load_causal_lm_for_inference(source, dtype)
        ref = _reference(config, source, tokenizer, dtype, required=True, spec=PAIR_LOGPS)
        assert ref is not None
        reference, described = ref
        info(f"reference: {described}")
        policy_logps = summed_logps(policy, rows, tokenizer.pad_token_id, config.batch_size)
        ref_logps = summed_logps(policy, rows, tokenizer.pad_token_id, config.batch_size, reference)
        summary, chosen, rejected = implicit_reward_metrics(policy_logps, ref_logps, config.beta)
        metrics = {
            "question": "implicit_reward_accuracy",
            "model": config.model,
            "ref": described,
            "data": config.pairs,
            **summary,
        }
        kind = "reward"
    examples = [
        {"record": i, f"chosen_{kind}": c, f"rejected_{kind}": r}
        for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))
    ]
    return metrics, examples, {f"chosen {kind}": chosen.tolist(), f"rejected {kind}": rejected.tolist()}


def rollout_batch(prompts: PromptRows, rollouts: list[GeneratedReply]) -> RewardBatch:
    """What the reward scores of one sample per prompt: the texts, their token ids (through the first
    EOS, as training passes them), the prompts' other columns and style."""
    return RewardBatch(
        prompts.conversations,
        [r.text for r in rollouts],
        prompts.conversational,
        [r.completion_ids for r in rollouts],
        prompts.keyword_columns(range(len(rollouts))),
    )


@dataclass(frozen=True)
class Generating:
    """How a model generates: its tokenizer and template, and its tools (None without --tools),
    loaded and checked (the template included) from the tokenizer alone, before any weights load."""

    tokenizer: Any
    template: ChatTemplate
    agents: Agents | None


def generating(config: EvalConfig, name: str, source: ModelSource) -> Generating:
    tokenizer = load_tokenizer(source)
    template = resolve_template(config.template, tokenizer, name)
    agents = None
    if config.tools:
        agents = load_agents(config.tools, None, tokenizer, template, config.max_turns, config.tool_timeout or None)
    return Generating(tokenizer, template, agents)


def generate_replies(
    model: Any, how: Generating, prompts: PromptRows, sampling: SamplingConfig, seed: int, with_logps: bool = False
) -> tuple[list[GeneratedReply], ToolEpisodes | None]:
    """One reply per prompt, and with --tools the episodes they are (grpo's sampler: the tool turns
    among the ids, masked; the transcript as the text; `with_logps` is then left to a forward)."""
    if how.agents is None:
        replies = generate_rollouts(
            model, how.tokenizer, how.template, prompts.conversations, sampling, seed=seed, with_logps=with_logps
        )
        return replies, None
    episodes = generate_with_tools(model, how.tokenizer, how.agents, prompts, sampling, seed=seed)
    return episodes.replies(), episodes


def eval_generation(config: EvalConfig, source: ModelSource, dtype: torch.dtype) -> Result:
    if is_reward_model(source):
        raise InputError(
            f"{config.model} is a reward model; --prompts generates with a policy (pass the RM as --reward)"
        )
    given, prompts = eval_data.read_prompts(config.prompts or "", config.columns, config.limit)
    policy_side = generating(config, config.model or "", source)
    tokenizer, template = policy_side.tokenizer, policy_side.template
    baseline_side = None
    if config.baseline:  # the baseline's template and tools are checked now too, not after minutes of generation
        baseline_side = generating(config, config.baseline, resolve_source(config.baseline))
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.batch_size)
    # A function reward is imported now, so a typo fails before minutes of generation; a reward
    # model is only checked now and loaded after the policy is gone.
    reward = (
        None
        if Path(config.reward or "").exists()
        else load_eval_scorer(
            config.reward or "",
            config.template,
            config.max_length,
            config.batch_size,
            dtype,
            policy=(tokenizer, template),
        )
    )
    if reward is None and not is_reward_model(resolve_source(config.reward or "")):
        raise InputError(
            f"--reward {config.reward}: not a reward model (no *ForSequenceClassification architecture); pass a `rlkit train-rm` output dir or module:function"
        )
    policy = load_causal_lm_for_inference(source, dtype)
    ref = _reference(config, source, tokenizer, dtype, required=False, spec=COMPLETION_LOGPS) if config.kl else None
    rollouts, episodes = generate_replies(
        policy, policy_side, prompts, sampling, config.seed, with_logps=ref is not None
    )
    metrics: dict[str, Any] = {
        "question": "generation",
        "model": config.model,
        "data": config.prompts,
        "reward": config.reward,
        "prompts": len(rollouts),
    }
    metrics["settings"] = {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    if config.tools:
        metrics["settings"] |= {
            "tools": list(config.tools),
            "max_turns": config.max_turns,
            "tool_timeout": config.tool_timeout,
        }
    kl = None
    if ref is not None:
        reference, described = ref
        info(f"reference for KL: {described}")
        if episodes is None:
            policy_logps = [float(r.logp) for r in rollouts]  # type: ignore[arg-type]  # with_logps: every one has it
        else:  # over the model's own tokens of each episode
            policy_logps = completion_logps(policy, rollouts, tokenizer.pad_token_id, config.batch_size)
        ref_logps = completion_logps(policy, rollouts, tokenizer.pad_token_id, config.batch_size, reference)
        kl = [p - r for p, r in zip(policy_logps, ref_logps)]
        metrics["ref"] = described
        del reference, ref
    del policy
    _free()
    baseline_rollouts, baseline_episodes = None, None
    if config.baseline and baseline_side is not None:
        baseline = load_causal_lm_for_inference(resolve_source(config.baseline), dtype)
        baseline_rollouts, baseline_episodes = generate_replies(baseline, baseline_side, prompts, sampling, config.seed)
        del baseline
        _free()
    if reward is None:
        reward = load_eval_scorer(config.reward or "", config.template, config.max_length, config.batch_size, dtype)
    scores = reward(rollout_batch(prompts, rollouts))
    metrics |= score_summary(scores)
    metrics["mean_length_tokens"] = statistics.fmean(len(r.completion_ids) for r in rollouts)
    metrics["mean_length_chars"] = statistics.fmean(len(r.text) for r in rollouts)
    if episodes is not None:
        metrics |= episodes.metrics
    if kl is not None:
        metrics |= kl_summary(kl)
    distributions = {"policy": scores}
    baseline_scores: list[float] = []
    if baseline_rollouts is not None:
        baseline_scores = reward(rollout_batch(prompts, baseline_rollouts))
        metrics["baseline"] = config.baseline
        metrics["baseline_score_mean"] = statistics.fmean(baseline_scores)
        metrics["baseline_score_median"] = float(statistics.median(baseline_scores))
        metrics["baseline_mean_length_tokens"] = statistics.fmean(len(r.completion_ids) for r in baseline_rollouts)
        if baseline_episodes is not None:
            for key in ("tools/call_frequency", "tools/failure_frequency"):
                metrics[f"baseline_{key}"] = baseline_episodes.metrics[key]
        metrics["win_rate"] = win_rate(scores, baseline_scores)
        distributions["baseline"] = baseline_scores
    examples = []
    for i, (prompt, rollout, score) in enumerate(zip(given, rollouts, scores)):
        example: dict[str, Any] = {
            "prompt": prompt,
            "completion": rollout.text,
            "score": score,
            "length_tokens": len(rollout.completion_ids),
        }
        if episodes is not None:  # the exchange after the prompt: the calls and what they answered
            example |= {"turns": episodes.samples.turns[i], "messages": episodes.samples.exchanges[i]}
        if kl is not None:
            example["kl"] = kl[i]
        if baseline_rollouts is not None:
            example |= {"baseline_completion": baseline_rollouts[i].text, "baseline_score": baseline_scores[i]}
        examples.append(example)
    return metrics, examples, distributions


def eval_completions(config: EvalConfig, dtype: torch.dtype) -> Result:
    given, prompts, completions = eval_data.read_completions(config.completions or "", config.columns, config.limit)
    reward = load_eval_scorer(config.reward or "", config.template, config.max_length, config.batch_size, dtype)
    everyone = range(len(completions))
    batch = RewardBatch(
        prompts.conversations, completions, prompts.conversational, None, prompts.keyword_columns(everyone)
    )
    scores = reward(batch)
    metrics = {
        "question": "completions",
        "data": config.completions,
        "reward": config.reward,
        "completions": len(scores),
        **score_summary(scores),
    }
    metrics["mean_length_chars"] = statistics.fmean(len(c) for c in completions)
    examples = [{"prompt": p, "completion": c, "score": s} for p, c, s in zip(given, completions, scores)]
    return metrics, examples, {"completions": scores}


def eval_sft(config: EvalConfig, source: ModelSource, dtype: torch.dtype) -> Result:
    if is_reward_model(source):
        raise InputError(f"{config.model} is a reward model; --data measures a language model's loss")
    tokenizer = load_tokenizer(source)
    rows, _ = sft_rows(
        config.data or "",
        tokenizer,
        config.model or "",
        config.template,
        config.columns,
        config.max_length,
        config.limit,
    )
    model = load_causal_lm_for_inference(source, dtype)
    metrics = {
        "question": "sft_loss",
        "model": config.model,
        "data": config.data,
        **sft_metrics(model, rows, tokenizer.pad_token_id, config.batch_size),
    }
    return metrics, [], {}


def run_eval(config: EvalConfig) -> None:
    mode = question(config)
    dtype = inference_dtype(config.dtype)
    hint = dtype_hint(config.dtype)
    if hint:
        info(hint)
    if mode == "completions":
        metrics, examples, distributions = eval_completions(config, dtype)
    else:
        source = resolve_source(config.model or "")
        if mode == "pairs":
            metrics, examples, distributions = eval_pairs(config, source, dtype)
        elif mode == "prompts":
            metrics, examples, distributions = eval_generation(config, source, dtype)
        else:
            metrics, examples, distributions = eval_sft(config, source, dtype)
    title = f"rlkit eval: {metrics['question']}"
    if config.output_dir:
        write_report_dir(config.output_dir, metrics, examples, distributions, title)
    print_report(metrics, title)
