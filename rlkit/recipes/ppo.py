"""PPO for RLHF (the StackLLaMA loop): rollouts, a reward, a per-token KL penalty, GAE, clipped updates.

One PPO step = one rollout (sample completions for a batch of prompts with the KV cache, score
them, compute log-probs, values and reference log-probs without gradient, shape the rewards,
run GAE and whiten the advantages) followed by `--ppo-epochs` passes over it in
`--mini-batches` shuffled mini-batches, each one optimizer update. The maths lives in
`rlkit.losses.ppo` as pure functions (Schulman et al. 2017; Ziegler et al. 2019; Huang et al.
2024); this module only moves tensors between them.

Why the shared engine drives it through a `StepSource` instead of a loop of its own: PPO's
loop differs from supervised training only in where each optimizer update's micro-batches come
from. So an engine step is one PPO *update* (one mini-batch), and `PPOLoop.batches(step, model)`
makes a fresh rollout whenever a new PPO step starts (step % (ppo-epochs x mini-batches) == 0)
and hands out the mini-batch of that update. Everything else -- accumulation over
`--grad-accum` micro-batches, gradient clipping, NaN checks, SIGTERM, checkpoints, `--resume`,
the metrics log and progress -- is the engine's, unchanged, and shared with every trainer.
The value head (and `--critic rm`'s critic) lives in the trained module, so checkpoints hold
it; the KL coefficient is a buffer of that module, so the adaptive controller resumes too.
`--max-steps` and `--save-every` count PPO steps; the engine is given them in updates.
A run resumed from a checkpoint taken in the middle of a PPO step (Ctrl-C) collects a fresh
rollout for the remaining updates of that step; checkpoints of `--save-every` fall on PPO-step
boundaries, where resuming is exact.

Masking: response tokens are those up to and including the first EOS; everything after it (the
padding `generate` emits once a row has finished) has mask 0, and every loss, advantage, KL
and statistic is a masked one, so nothing after EOS contributes.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from rlkit.console import console, info, warn
from rlkit.data.formats import Messages, as_messages
from rlkit.data.load import load_records
from rlkit.data.prompts import encode_prompt
from rlkit.data.templates import ChatTemplate, resolve_template
from rlkit.errors import InputError
from rlkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    standardise_scores,
)
from rlkit.models.attention import use_fp32_attention_backward
from rlkit.models.merged_lora import lora_merged_for_generation
from rlkit.models.modes import disable_dropout
from rlkit.preference.reference import LogpsSpec, Reference, on_the_fly_reference
from rlkit.recipes.ppo_config import PPOConfig
from rlkit.scoring import Reward, is_model_dir, load_reward, load_sequence_classifier, unwrap_peft
from rlkit.tools.generation import left_pad
from rlkit.training.engine import StepOutput
from rlkit.training.logprobs import positions_from_mask, response_logprobs
from rlkit.training.run import TrainingRun

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"
SAMPLES_FILE = "samples.jsonl"


# ---- models ------------------------------------------------------------------------------


class PolicyValue(torch.nn.Module):
    """The trained module: the policy, and the value function (a head on its trunk, or a critic).

    `forward` returns, for the response that ends every row (the last R columns of left-padded
    prompt + response rows), each token's log-prob at the sampling temperature, the entropy of
    its distribution (no gradient) and the value of the state before it, all [B, R].
    `kl_coef` is a buffer so checkpoints carry the (adaptive) KL coefficient.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        value_head: torch.nn.Module | None,
        critic: torch.nn.Module | None,
        kl_coef: float,
    ):
        super().__init__()
        self.policy, self.value_head, self.critic = policy, value_head, critic
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef), dtype=torch.float64))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, responses: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = responses.shape[1]
        logps, entropy, out = response_logprobs(
            self.policy, input_ids, attention_mask, responses, temperature, output_hidden_states=self.critic is None
        )
        if self.critic is None:
            hidden = out.hidden_states[-1][:, -(r + 1) : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        else:
            hf = unwrap_peft(self.critic)
            trunk = getattr(hf, hf.base_model_prefix)
            hidden = trunk(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state
            values = hf.score(hidden[:, -(r + 1) : -1]).squeeze(-1)
        return logps, entropy, values.float()

    def save_pretrained(self, directory: str, **kwargs: Any) -> None:
        """The policy (adapter or full model) as a standard dir, the value function beside it."""
        from safetensors.torch import save_file

        self.policy.save_pretrained(directory, **kwargs)
        if self.value_head is not None:
            state = {k: v.detach().float().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
            save_file(state, str(Path(directory) / VALUE_HEAD_FILE))
        if self.critic is not None:
            self.critic.save_pretrained(str(Path(directory) / CRITIC_DIR), **kwargs)


def hidden_size(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().embedding_dim)


def make_value_head(policy: torch.nn.Module, source_dirs: list[str | None]) -> torch.nn.Module:
    """A Linear(hidden, 1) head, zero-initialised, or loaded from a previous PPO output's value_head file."""
    head = torch.nn.Linear(hidden_size(policy), 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    for directory in source_dirs:
        if directory and (Path(directory) / VALUE_HEAD_FILE).is_file():
            from safetensors.torch import load_file

            state = load_file(str(Path(directory) / VALUE_HEAD_FILE))
            if state.get("weight") is not None and state["weight"].shape == head.weight.shape:
                head.load_state_dict(state)
                info(f"value head: continued from {Path(directory) / VALUE_HEAD_FILE}")
                break
    return head


def response_logps(temperature: float) -> LogpsSpec:
    """What PPO's reference measures (`rlkit.preference.reference` holds the strategies): the
    [B, R] log-probs of the responses that end a rollout's rows, at the sampling temperature."""

    def measure(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        ids, mask, responses = batch["input_ids"], batch["attention_mask"], batch["responses"]
        return response_logprobs(model, ids, mask, responses, temperature, want_entropy=False)[0]

    return LogpsSpec(measure, unit="rollouts")


# ---- prompts -------------------------------------------------------------------------------


def load_prompts(config: PPOConfig) -> list[Messages]:
    records = load_records(config.data, config.columns)
    if len(records) == 0:
        raise InputError(f"{', '.join(config.data)}: no prompts")
    columns = records.column_names
    conversations: list[Messages] = []
    for i, record in enumerate(records):
        where = f"{', '.join(config.data)} row {i + 1}"
        if "prompt" in columns:
            messages = as_messages(record["prompt"], "user", where)
        elif "messages" in columns:
            messages = as_messages(record["messages"], "user", where)
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            raise InputError(
                f"{', '.join(config.data)}: no `prompt` or `messages` column (found {', '.join(columns)}); use --columns prompt=NAME"
            )
        if not messages:
            raise InputError(f"{where}: empty prompt")
        conversations.append(messages)
    return conversations


# ---- the objective -------------------------------------------------------------------------


class PPOObjective:
    """Clipped policy loss + vf_coef x clipped value loss on one micro-batch of a rollout.

    Losses are token means over the micro-batch's response tokens; the engine gets them as sums
    (x tokens) and divides by the tokens of the whole update, so an update is a token mean.
    Also keeps running sums of its metrics over a PPO step, for the per-step summary.
    """

    def __init__(self, config: PPOConfig):
        self.c = config
        self.totals: dict[str, float] = {}

    def weight(self, batch: dict[str, Any]) -> float:
        return float(batch["response_mask"].sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        c, mask = self.c, batch["response_mask"]
        logprobs, entropies, values = model(
            batch["input_ids"], batch["attention_mask"], batch["responses"], c.temperature
        )
        pg_loss, clipfrac, approx_kl = clipped_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, c.cliprange
        )
        vf_loss, vf_clipfrac = clipped_value_loss(
            values, batch["old_values"], batch["returns"], mask, c.cliprange_value
        )
        with torch.no_grad():
            entropy = masked_mean(entropies, mask)
            ratio = masked_mean(torch.exp(torch.where(mask.bool(), logprobs.detach() - batch["old_logprobs"], 0)), mask)
        n = mask.sum().to(pg_loss.dtype)
        metrics = {
            "policy_loss": pg_loss.detach() * n,
            "value_loss": vf_loss.detach() * n,
            "clipfrac": clipfrac * n,
            "value_clipfrac": vf_clipfrac * n,
            "approx_kl": approx_kl * n,
            "entropy": entropy * n,
            "ratio": ratio * n,
        }
        self.totals["tokens"] = self.totals.get("tokens", 0.0) + float(n)
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)
        return StepOutput(loss=(pg_loss + c.vf_coef * vf_loss) * n, metrics=metrics)

    def take_means(self) -> dict[str, float]:
        n = max(self.totals.pop("tokens", 0.0), 1e-12)
        means = {f"ppo/{k}": v / n for k, v in self.totals.items()}
        self.totals = {}
        return means


# ---- rollouts and the step source ------------------------------------------------------------


def first_eos_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R]: 1 up to and including the first EOS, or everywhere when there is none; has_eos [B])."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=1)
    width = responses.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), width - 1)
    mask = torch.arange(width, device=responses.device).unsqueeze(0) <= first.unsqueeze(1)
    return mask.long(), has_eos


class PPOLoop:
    """The engine's `StepSource` for PPO: a rollout at the start of every PPO step, then its mini-batches."""

    def __init__(
        self,
        config: PPOConfig,
        run: TrainingRun,
        tokenizer: Any,
        template: ChatTemplate,
        conversations: list[Messages],
        prompt_ids: list[list[int]],
        reward: Reward,
        reference: Reference,
        objective: PPOObjective,
        ppo_steps: int,
    ):
        self.c, self.run, self.acc = config, run, run.accelerator
        self.tokenizer, self.template, self.reward, self.reference, self.objective = (
            tokenizer,
            template,
            reward,
            reference,
            objective,
        )
        self.conversations, self.prompt_ids = conversations, prompt_ids
        self.updates = config.ppo_epochs * config.mini_batches
        self.total_steps = ppo_steps * self.updates
        self.rollout_size = config.batch_size * config.grad_accum * config.mini_batches
        self.buffer: dict[str, Any] | None = None
        self.buffer_step = -1
        self.pending: dict[str, float] = {}
        self.training_s = 0.0
        self._t_batches = time.time()
        self._last_step = -1
        if config.target_kl:
            self.kl_ctl: Any = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)

    # -- StepSource
    def batches(self, step: int, model: torch.nn.Module) -> list[dict[str, Any]]:
        ppo_step, update = divmod(step, self.updates)
        if self.buffer is None or self.buffer_step != ppo_step:
            self.buffer = self.rollout(ppo_step, model)
            self.buffer_step = ppo_step
            self.training_s = 0.0
        epoch, mb = divmod(update, self.c.mini_batches)
        order = torch.randperm(
            self.rollout_size, generator=torch.Generator().manual_seed(self.c.seed * 1000003 + ppo_step * 101 + epoch)
        )
        if self.c.mini_batches == 1:
            order = torch.arange(self.rollout_size)  # one mini-batch: the rollout itself, in rollout order
        size = self.rollout_size // self.c.mini_batches
        chosen = order[mb * size : (mb + 1) * size]
        micro = []
        bs = self.c.batch_size
        for a in range(self.c.grad_accum):
            idx = chosen[a * bs : (a + 1) * bs].to(self.acc.device)
            batch = {k: v.index_select(0, idx) for k, v in self.buffer["tensors"].items()}
            batch["num_tokens"] = int(batch["response_mask"].sum())
            micro.append(batch)
        self._last_step = step
        self._t_batches = time.time()
        return micro

    def step_metrics(self) -> dict[str, float]:
        self.training_s += time.time() - self._t_batches
        ppo_step, update = divmod(self._last_step, self.updates)
        metrics: dict[str, float] = {"ppo_step": ppo_step + 1}
        if update == self.updates - 1:  # the PPO step is complete: its summary
            metrics.update(self.pending)
            metrics.update(self.objective.take_means())
            gen, total = (
                self.pending.get("time/generation_s", 0.0),
                self.pending.get("time/rollout_s", 0.0) + self.training_s,
            )
            metrics["time/training_s"] = self.training_s
            metrics["time/generation_share"] = gen / max(total, 1e-9)
            metrics["ppo_tokens_per_s"] = self.pending.get("response_tokens", 0.0) / max(total, 1e-9)
            if self.acc.is_main_process:
                console.print(
                    f"ppo step {ppo_step + 1}: score {metrics.get('score/mean', float('nan')):.3f} ± {metrics.get('score/std', float('nan')):.3f}  "
                    f"kl {metrics.get('kl', float('nan')):.3f}  entropy {metrics.get('entropy', float('nan')):.3f}  "
                    f"len {metrics.get('response_length', float('nan')):.1f}  gen {gen:.1f}s train {self.training_s:.1f}s"
                )
        return metrics

    # -- the rollout
    def _prompt_indices(self, ppo_step: int) -> list[int]:
        world, rank = self.acc.num_processes, self.acc.process_index
        per_step = self.rollout_size * world
        per_epoch = max(1, len(self.conversations) // per_step)
        epoch, k = divmod(ppo_step, per_epoch)
        order = torch.randperm(
            len(self.conversations), generator=torch.Generator().manual_seed(self.c.seed + epoch)
        ).tolist()
        start = k * per_step + rank * self.rollout_size
        return [order[(start + i) % len(order)] for i in range(self.rollout_size)]

    @torch.no_grad()
    def rollout(self, ppo_step: int, model: torch.nn.Module) -> dict[str, Any]:
        c, acc, tok = self.c, self.acc, self.tokenizer
        wrapper: PolicyValue = acc.unwrap_model(model)
        policy, device = wrapper.policy, acc.device
        indices = self._prompt_indices(ppo_step)
        conversations = [self.conversations[i] for i in indices]
        was_training = wrapper.training
        wrapper.eval()
        t0 = time.time()
        prompt_ids, prompt_mask = left_pad([self.prompt_ids[i] for i in indices], tok.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        sample = c.temperature > 0
        responses = []
        with lora_merged_for_generation(
            policy
        ) as generator:  # the adapter's weights folded in: base-model decoding speed
            for start in range(0, len(indices), c.batch_size):
                ids, mask = prompt_ids[start : start + c.batch_size], prompt_mask[start : start + c.batch_size]
                with acc.autocast():
                    out = generator.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=c.max_new_tokens,
                        do_sample=sample,
                        temperature=c.temperature if sample else None,
                        top_p=c.top_p if sample else None,
                        top_k=None,
                        eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id,
                        use_cache=True,
                    )
                responses.append(out[:, ids.shape[1] :])
        width = max(r.shape[1] for r in responses)
        responses = torch.cat([F.pad(r, (0, width - r.shape[1]), value=tok.pad_token_id) for r in responses])
        t_gen = time.time() - t0
        response_mask, has_eos = first_eos_mask(responses, tok.eos_token_id)

        # log-probs, values and reference log-probs: the same forward the updates run, no gradient
        t1 = time.time()
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, torch.ones_like(responses)], dim=1)
        logprobs, values, ref_logprobs, entropies = [], [], [], []
        for start in range(0, len(indices), c.batch_size):
            sl = slice(start, start + c.batch_size)
            with acc.autocast():
                lp, ent, v = wrapper(input_ids[sl], attention_mask[sl], responses[sl], c.temperature)
                rows = {"input_ids": input_ids[sl], "attention_mask": attention_mask[sl], "responses": responses[sl]}
                ref_logprobs.append(self.reference.logps(policy, rows))
            logprobs.append(lp)
            entropies.append(ent)
            values.append(v)
        logprobs, values, ref_logprobs, entropy = (
            torch.cat(logprobs),
            torch.cat(values),
            torch.cat(ref_logprobs),
            torch.cat(entropies),
        )
        t_fwd = time.time() - t1

        # scores
        t2 = time.time()
        completions = []
        for row, m in zip(responses.tolist(), response_mask.sum(1).tolist()):
            kept = [t for t in row[:m] if t != tok.eos_token_id]
            completions.append(tok.decode(kept, skip_special_tokens=True).strip())
        raw_scores = torch.as_tensor(self.reward(conversations, completions), dtype=torch.float32).to(device)
        scores = raw_scores.clone()
        if c.missing_eos_penalty:
            scores = torch.where(has_eos, scores, scores - c.missing_eos_penalty)
        # statistics over the whole rollout of every process, as one process would have them
        across = (lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None
        if c.score_norm == "batch" and len(scores) * acc.num_processes > 1:
            scores = standardise_scores(scores, reduce=across)
        if c.score_clip > 0:
            scores = scores.clamp(-c.score_clip, c.score_clip)
        t_score = time.time() - t2

        # shaping, GAE, whitening (rlkit.losses.ppo)
        kl_coef = float(wrapper.kl_coef)
        kl = kl_penalty(logprobs, ref_logprobs, c.kl_estimator)
        rewards, non_score = per_token_rewards(scores, kl, response_mask, kl_coef)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, response_mask, shift_mean=False, reduce=across)
        advantages, returns = gae(rewards, values, response_mask, c.gamma, c.lam)
        advantages = masked_whiten(advantages, response_mask, reduce=across)
        seq_kl = torch.where(response_mask.bool(), kl, 0).sum(1)
        mean_kl = (
            float(acc.reduce(seq_kl.mean().detach(), reduction="mean"))
            if acc.num_processes > 1
            else float(seq_kl.mean())
        )
        self.kl_ctl.value = kl_coef
        self.kl_ctl.update(mean_kl, self.rollout_size * acc.num_processes)
        wrapper.kl_coef.fill_(self.kl_ctl.value)
        wrapper.train(was_training)

        lengths = response_mask.sum(1).float()
        n_tokens = float(lengths.sum())
        rollout_s = time.time() - t0
        # the summary of the whole rollout, every process's sequences and tokens (equal-sized shares)
        everyone = acc.gather if acc.num_processes > 1 else (lambda t: t)
        all_scores, all_shaped, all_non_score = everyone(raw_scores), everyone(scores), everyone(non_score)
        token_sums = torch.stack(
            [torch.where(response_mask.bool(), t, 0).sum() for t in (entropy, values)]
            + [response_mask.sum().to(entropy.dtype)]
        )
        entropy_sum, value_sum, n_all_tokens = (across(token_sums) if across else token_sums).tolist()
        self.pending = {
            "score/mean": float(all_scores.mean()),
            "score/std": float(all_scores.std()) if len(all_scores) > 1 else 0.0,
            "score/shaped_mean": float(all_shaped.mean()),
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "non_score_reward": float(all_non_score.mean()),
            "rlhf_reward": float(all_shaped.mean() + all_non_score.mean()),
            "entropy": entropy_sum / max(n_all_tokens, 1.0),
            "explained_variance": float(explained_variance(values, returns, response_mask, reduce=across)),
            "value/mean": value_sum / max(n_all_tokens, 1.0),
            "response_length": n_all_tokens / len(all_scores),
            "eos_rate": float(everyone(has_eos.float()).mean()),
            "response_tokens": n_tokens,
            "time/generation_s": t_gen,
            "time/forward_s": t_fwd,
            "time/scoring_s": t_score,
            "time/rollout_s": rollout_s,
            "generation_tokens_per_s": float(responses.numel()) / max(t_gen, 1e-9),
        }
        self._samples(ppo_step, conversations, completions, raw_scores)
        tensors = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "responses": responses,
            "response_mask": response_mask,
            "old_logprobs": logprobs,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
        }
        return {"tensors": tensors, "completions": completions, "scores": raw_scores}

    def _samples(
        self, ppo_step: int, conversations: list[Messages], completions: list[str], scores: torch.Tensor
    ) -> None:
        c = self.c
        if (
            not c.sample_every
            or ppo_step % c.sample_every != 0
            or not self.acc.is_main_process
            or self.run.run_dir is None
        ):
            return
        from rich.table import Table

        rows = []
        table = Table(title=f"samples at PPO step {ppo_step + 1}", show_lines=False, expand=False)
        table.add_column("prompt", max_width=40, overflow="fold")
        table.add_column("response", max_width=60, overflow="fold")
        table.add_column("score", justify="right")
        for messages, completion, score in list(zip(conversations, completions, scores.tolist()))[: c.num_samples]:
            prompt = messages[-1]["content"]
            rows.append({"step": ppo_step + 1, "prompt": prompt, "response": completion, "score": score})
            table.add_row(prompt, completion, f"{score:.3f}")
        console.print(table)
        with open(Path(self.run.run_dir) / SAMPLES_FILE, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


# ---- the command -----------------------------------------------------------------------------


def _check(config: PPOConfig) -> None:
    if not config.reward:
        raise InputError("missing --reward: a reward model dir (rlkit train-rm output) or module:function")
    checks = [
        (config.ppo_epochs >= 1, "--ppo-epochs must be >= 1"),
        (config.mini_batches >= 1, "--mini-batches must be >= 1"),
        (config.batch_size >= 1 and config.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
        (config.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (config.temperature >= 0, "--temperature must be >= 0"),
        (0 < config.top_p <= 1, "--top-p must be in (0, 1]"),
        (config.kl_coef >= 0, "--kl-coef must be >= 0"),
        (config.target_kl is None or config.target_kl > 0, "--target-kl must be > 0"),
        (config.kl_horizon > 0, "--kl-horizon must be > 0"),
        (config.cliprange > 0 and config.cliprange_value > 0, "--cliprange and --cliprange-value must be > 0"),
        (
            config.critic == "shared" or is_model_dir(config.reward),
            "--critic rm needs --reward to be a reward model dir",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)


def run_ppo(config: PPOConfig) -> Path:
    """Setup (tokenizer, prompts, policy, value function, reference, reward), train with the engine, write OUT."""
    _check(config)
    run = TrainingRun("ppo", config, config.model, config.data)
    set_seed(config.seed)
    tokenizer = run.load_tokenizer()
    template = resolve_template(config.template, tokenizer, config.model or "the policy")
    conversations = load_prompts(config)
    room = config.max_length - config.max_new_tokens
    encoded = [encode_prompt(tokenizer, template, m) for m in conversations]
    kept = [i for i, ids in enumerate(encoded) if len(ids) <= room]
    if len(kept) < len(encoded):
        warn(
            f"{len(encoded) - len(kept)} of {len(encoded)} prompts are longer than --max-length - --max-new-tokens ({room} tokens) and were dropped"
        )
    conversations, encoded = [conversations[i] for i in kept], [encoded[i] for i in kept]
    rollout_size = config.batch_size * config.grad_accum * config.mini_batches
    world = run.accelerator.num_processes
    if len(conversations) < rollout_size * world:
        raise InputError(
            f"{len(conversations)} usable prompts are fewer than one rollout ({rollout_size * world} = batch-size {config.batch_size} "
            f"x grad-accum {config.grad_accum} x mini-batches {config.mini_batches} x {world} processes); lower them"
        )
    ppo_steps = config.max_steps or config.epochs * (len(conversations) // (rollout_size * world))
    info(
        f"prompts: {len(conversations)}; {ppo_steps} PPO steps of {rollout_size * world} rollouts, {config.ppo_epochs} epochs x {config.mini_batches} mini-batches each"
    )

    policy = run.load_policy()
    disable_dropout(policy)  # PPO's ratio must be 1 before the first update (Huang et al. 2024)
    reference, described = on_the_fly_reference(config, run, policy, tokenizer, response_logps(config.temperature))
    info(f"reference: {described}")
    device = run.accelerator.device
    reward = load_reward(
        config.reward, tokenizer, template, run.weights_dtype, device, config.batch_size, config.trust_remote_code
    )
    critic, value_head = None, None
    if config.critic == "rm":
        critic, _ = load_sequence_classifier(config.reward, torch.float32, config.trust_remote_code)
        critic.requires_grad_(True)
        disable_dropout(critic)
        use_fp32_attention_backward(critic)
        info(f"critic: initialised from {config.reward} (trained in full)")
    else:
        value_head = make_value_head(policy, [run.source.adapter_dir, run.source.path])
    model = PolicyValue(policy, value_head, critic, config.kl_coef)
    objective = PPOObjective(config)
    loop = PPOLoop(config, run, tokenizer, template, conversations, encoded, reward, reference, objective, ppo_steps)
    updates = loop.updates
    engine_config = replace(config, max_steps=ppo_steps * updates, save_every=config.save_every * updates)
    default_lr = 1.4e-5 if config.lora else 3e-6
    metrics = run.train(model, objective, None, None, None, default_lr, step_source=loop, engine_config=engine_config)
    metrics["ppo_steps"] = ppo_steps
    card = (
        "## PPO\n\n"
        f"- reward: `{config.reward}`; reference: {described}; critic: {config.critic}\n"
        f"- KL: {config.kl_estimator}, coef {config.kl_coef}"
        + (f" adaptive to {config.target_kl}" if config.target_kl else " fixed")
        + "\n"
        f"- the value head is in `{VALUE_HEAD_FILE}` beside the policy"
        + (f" (critic in `{CRITIC_DIR}/`)" if critic is not None else "")
        + "\n"
        f"- samples: `{SAMPLES_FILE}`\n\n"
    )
    return run.finish(
        tokenizer,
        chat_template=template.source,
        metrics=metrics,
        data_info={"counts": {"prompts": len(conversations)}},
        extra_card=card,
    )
