"""Batched generation from chat prompts, shared by the demo, `chat`, `eval` and `ppo`.

Prompts are encoded exactly as training encoded them (rlkit.data.prompts), left-padded so
every row's next token sits in the last column, and decoded up to the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlkit.data.formats import Messages
from rlkit.data.prompts import encode_prompt
from rlkit.data.templates import ChatTemplate
from rlkit.data.tokenize import IGNORE
from rlkit.models.growing_cache import empty_growing_cache, growing
from rlkit.models.merged_lora import lora_merged_for_generation
from rlkit.training.logprobs import cache_keyword, left_padded_prefix, shared_prefix


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 16


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.as_tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def cached_start(
    generator: Any, ids: torch.Tensor, mask: torch.Tensor, shared_prompts: bool = False
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """`generate`'s cache keyword for left-padded rows `ids` [B, W], and the ids and mask laid out
    for it: with `shared_prompts` each distinct prompt's prefill once (`shared_prefix`, GRPO's
    groups), else the tokens every row starts with once (`left_padded_prefix`: a system prompt,
    tool schemas); the cache grows in place (`rlkit.models.growing_cache`). Run under no_grad."""
    cache = None
    shared = shared_prefix(generator, ids, mask) if shared_prompts else None
    if shared is not None:
        cache, ids, mask, _ = shared
    else:
        common = left_padded_prefix(generator, ids, mask)
        if common is not None:
            cache, ids, mask, _ = common
    cache = empty_growing_cache(generator) if cache is None else growing(cache)
    return ({cache_keyword(generator): cache} if cache is not None else {}), ids, mask


@dataclass
class GeneratedReply:
    """One sample: the prompt's ids, the generated ids (through the first EOS, if any), the text,
    and, when asked for, log π(completion | prompt) summed over those ids at temperature 1.

    An episode with tools (`rlkit.tools.tool_episodes`) has tool turns among its `completion_ids`
    (TRL's multi-turn convention): `mask` is then 1 on the ids the model sampled and 0 on the
    appended ones, and a log-prob counts only the former. None: the model sampled every id."""

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    logp: float | None = None
    mask: list[int] | None = None

    @property
    def sampled_labels(self) -> list[int]:
        """The completion as labels: its ids where the model sampled them, IGNORE (-100) elsewhere."""
        if self.mask is None:
            return list(self.completion_ids)
        return [t if m else IGNORE for t, m in zip(self.completion_ids, self.mask)]


def generated_token_logps(step_logits: tuple[torch.Tensor, ...], generated: torch.Tensor) -> torch.Tensor:
    """(batch, steps) log-probabilities of the generated tokens under the model's raw logits.

    Step by step, so the log-softmax never makes a second (batch, steps, vocab) copy of the
    logits generation already holds."""
    columns = [
        torch.log_softmax(logits.float(), dim=-1).gather(-1, generated[:, t : t + 1]).squeeze(-1)
        for t, logits in enumerate(step_logits)
    ]
    return torch.stack(columns, dim=1)


@torch.no_grad()
def generate_rollouts(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    conversations: list[Messages],
    sampling: SamplingConfig,
    n: int = 1,
    seed: int | None = None,
    with_logps: bool = False,
) -> list[GeneratedReply]:
    """`n` samples per conversation (conversation-major order), with the token ids `eval` scores.

    With `seed`, sampling restarts from that seed before each batch, so the same inputs and
    batch size give the same samples whatever ran before. The EOS a sample ends with is kept
    in `completion_ids` (it is a generated token) but not in `text`. `with_logps` also sums each
    sample's log-probability from the logits generation computed anyway (eval's KL), which
    saves a second forward over every sample; the price is that generation keeps every step's
    logits until the batch ends, batch x new tokens x vocab floats (0.3 GB for the demo's 48 x 32
    x 49k, 0.5 GB for eval's default 8 x 128 with a 128k vocab).

    Sampled as the rollouts of training are: a LoRA adapter folded into its base for the duration
    (`lora_merged_for_generation`), and the tokens every prompt of a batch starts with (a system
    prompt, often half of a short prompt) run once, their cache repeated (`left_padded_prefix`).
    Both change only float rounding; the KV cache grows in place (`rlkit.models.growing_cache`).
    """
    model.eval()
    device = next(model.parameters()).device
    expanded = [c for c in conversations for _ in range(n)]
    rollouts: list[GeneratedReply] = []
    for start in range(0, len(expanded), sampling.batch_size):
        chunk = expanded[start : start + sampling.batch_size]
        prompts = [encode_prompt(tokenizer, template, c) for c in chunk]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        sample = sampling.temperature > 0
        if seed is not None:
            torch.manual_seed(seed + start)
        with lora_merged_for_generation(model) as generator:
            cache, ids, mask = cached_start(generator, ids, mask)
            out = generator.generate(
                input_ids=ids,
                attention_mask=mask,
                **cache,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_logits=with_logps,
            )
        generated = out.sequences[:, ids.shape[1] :]
        token_logps = generated_token_logps(out.logits, generated).cpu() if with_logps else None
        for i, (prompt, row) in enumerate(zip(prompts, generated)):
            tokens = row.tolist()
            text_tokens = tokens
            if tokenizer.eos_token_id in tokens:
                end = tokens.index(tokenizer.eos_token_id)
                tokens, text_tokens = tokens[: end + 1], tokens[:end]
            logp = float(token_logps[i, : len(tokens)].sum()) if token_logps is not None else None
            text = tokenizer.decode(text_tokens, skip_special_tokens=True).strip()
            rollouts.append(GeneratedReply(prompt, tokens, text, logp))
    return rollouts


def generate(
    model: Any, tokenizer: Any, template: ChatTemplate, conversations: list[Messages], sampling: SamplingConfig
) -> list[str]:
    """One completion per conversation, in order."""
    return [r.text for r in generate_rollouts(model, tokenizer, template, conversations, sampling)]
