"""Per-token log-probabilities of the labelled tokens, without materialising the logits.

Labels are aligned with input_ids (the HF convention); the logits at position t score the
token at t+1, so the shift happens here, once.

Memory is the reason for the rest. A [tokens, vocab] fp32 logit matrix is the largest
activation of a small model with a real vocabulary (SmolLM2: 49,152 x 4 bytes = 192 KiB per
token, more than all of its 30 layers' saved activations for that token), and a plain
cross-entropy keeps it alive three times over (logits, log-softmax, their gradient). So:

1. `logits_to_keep` (one index list for the whole batch) skips the decoder's last hidden
   states at columns where no row has a label;
2. the model's output layer is swapped, for the duration of the forward, for `_LabelLogpHead`,
   which takes only the labelled positions of each row and returns their log-probs instead of
   logits. The swap keeps the call going through the model's own forward, so DDP/FSDP
   wrappers see a normal forward;
3. `_ChunkedTokenLogps` projects onto the vocabulary a chunk of positions at a time and keeps
   only each position's log-sum-exp for the backward pass, which recomputes a chunk's logits
   when it needs them. When the output layer is frozen (LoRA) the gradient with respect to the
   hidden state is computed in the forward instead ([tokens, hidden], small), so nothing is
   recomputed.

Models whose output layer is not a plain `nn.Linear`, or that post-process logits (soft-capping,
logit scaling), take the plain path: logits at the kept columns, then cross-entropy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from rlkit.data.tokenize import IGNORE
from rlkit.losses.ppo import entropy_from_logits

CHUNK_TOKENS = 1024
"""Positions projected onto the vocabulary at once: 1024 x 49,152 fp32 logits are 192 MiB."""

_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(scale · (h Wᵀ + b))[y] for N positions, one chunk of positions at a time.

    d logp_i / d z_i = onehot(y_i) - softmax_i (z the scaled logits), so the backward needs
    softmax_i again: it is rebuilt from the saved log-sum-exp (`exp(z - lse)`) rather than
    stored. The projection runs in the autocast dtype when autocast is on (as the model's own
    output layer would), in the forward and in the recomputation alike, so both see the same
    logits. `scale` is 1 / the sampling temperature (PPO scores tokens at the temperature they
    were drawn with). With `want_entropy`, the entropy of every position's distribution comes
    back as well (no gradient): it needs the softmax the forward has in hand anyway.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        scale: float = 1.0,
        want_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        acc = torch.promote_types(compute, torch.float32)  # bf16 logits are reduced in fp32; fp64 stays
        w, b = weight.to(compute), (bias.to(compute) if bias is not None else None)
        n = hidden.size(0)
        logps = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n if want_entropy else 0, dtype=acc, device=hidden.device)
        frozen_head = (
            ctx.needs_input_grad[0]
            and not ctx.needs_input_grad[1]
            and not (bias is not None and ctx.needs_input_grad[2])
        )
        grad_direction = torch.empty_like(hidden) if frozen_head else None
        with torch.autocast(device, enabled=False):
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                logits = F.linear(hidden[rows].to(compute), w, b).to(acc)
                if scale != 1.0:
                    logits.mul_(scale)
                lse[rows] = chunk_lse = torch.logsumexp(logits, dim=-1)
                logps[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - chunk_lse
                if want_entropy or grad_direction is not None:
                    logp = logits.sub_(chunk_lse[:, None])
                    if want_entropy:
                        entropy[rows] = _entropy_to_probs_(logp)
                        probs = logp
                    else:
                        probs = logp.exp_()
                    if grad_direction is not None:  # d logp_i / d h_i = scale (W[y_i] - softmax_i W)
                        grad_direction[rows] = (w[targets[rows]] - probs.to(compute) @ w) * scale
        ctx.chunk, ctx.scale, ctx.compute, ctx.has_bias, ctx.frozen_head = (
            chunk,
            scale,
            compute,
            bias is not None,
            frozen_head,
        )
        if frozen_head:
            ctx.save_for_backward(grad_direction)
        else:
            ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, lse)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.frozen_head:
            (grad_direction,) = ctx.saved_tensors
            return grad_direction * grad_logps[:, None].to(grad_direction.dtype), None, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        compute, acc, scale = ctx.compute, lse.dtype, ctx.scale
        w, b = weight.to(compute), (bias.to(compute) if ctx.has_bias else None)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(weight.size(0), dtype=acc, device=weight.device) if want_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h, y, g = hidden[rows].to(compute), targets[rows], grad_logps[rows].to(acc) * scale
                # d loss / d (h Wᵀ + b) = g · scale · (onehot(y) - softmax(z))
                logits = F.linear(h, w, b).to(acc)
                if scale != 1.0:
                    logits.mul_(scale)
                grad_logits = logits.sub_(lse[rows, None]).exp_().mul_(-g[:, None])
                grad_logits[torch.arange(y.numel(), device=y.device), y] += g
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits.to(compute) @ w
                if grad_weight is not None:
                    grad_weight += grad_logits.to(compute).t() @ h
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def _entropy_to_probs_(logp: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """-sum(p log p) of each row of log-probs [N, V], turning `logp` into the probabilities in place.

    A few rows at a time, so the only extra memory is [rows, V]; the sum is a batched dot
    product, several times cheaper on a CPU than torch.special.entr's element-wise kernel.
    """
    entropy = torch.empty(logp.size(0), dtype=logp.dtype, device=logp.device)
    for start in range(0, logp.size(0), rows):
        lp = logp[start : start + rows]
        p = lp.exp()
        entropy[start : start + rows] = -(p.unsqueeze(1) @ lp.unsqueeze(2)).flatten()
        lp.copy_(p)
    return entropy


def token_logps(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk: int = CHUNK_TOKENS
) -> torch.Tensor:
    """[N] log-probs (fp32, or fp64 for an fp64 model) of `targets` [N] under `head` applied to `hidden` [N, H], chunked."""
    return _ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk)[0]


class _LabelLogpHead(torch.nn.Module):
    """Stands in for the output layer during one forward: [B, K, H] -> [B, K, 1] log-probs of
    the targets [B, K] (0 where a target is IGNORE), computed at labelled positions only."""

    def __init__(self, head: torch.nn.Linear, targets: torch.Tensor):
        super().__init__()
        self.head, self.targets = head, targets

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        labelled = self.targets != IGNORE
        out = torch.zeros(
            self.targets.shape, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device
        )
        out[labelled] = token_logps(hidden[labelled], self.head, self.targets[labelled])
        return out.unsqueeze(-1)


def output_layer_slot(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Linear] | None:
    """(parent, attribute, layer) of the model's output layer, or None where the fused path does not apply."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP / accelerate wrappers
        inner = inner.module
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not torch.nn.Linear:
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_POSTPROCESSING):
        return None
    for module in inner.modules():
        for name, child in module.named_children():
            if child is head:
                return module, name, head
    return None


class _ResponseLogpHead(torch.nn.Module):
    """Stands in for the output layer during one forward with `logits_to_keep = R + 1`:
    [B, R+1, H] -> [B, R, 2], each response token's log-prob at the sampling temperature and
    the entropy of the distribution it was drawn from."""

    def __init__(self, head: torch.nn.Linear, responses: torch.Tensor, scale: float, want_entropy: bool = True):
        super().__init__()
        self.head, self.responses, self.scale, self.want_entropy = head, responses, scale, want_entropy

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows, width = self.responses.shape
        # a contiguous [B*R, H] copy: a strided [B, R, H] slice makes CPU matmuls copy the
        # weight once per row (54x slower in bf16 on a 49k vocabulary)
        h = hidden[:, :-1].reshape(rows * width, -1)
        logps, entropy = _ChunkedTokenLogps.apply(
            h, self.head.weight, self.head.bias, self.responses.reshape(-1), CHUNK_TOKENS, self.scale, self.want_entropy
        )
        if not self.want_entropy:
            entropy = torch.zeros_like(logps)
        return torch.stack((logps.view(rows, width), entropy.view(rows, width)), dim=-1)


@contextmanager
def output_layer_swapped(
    model: torch.nn.Module, make_head: Callable[[torch.nn.Linear], torch.nn.Module]
) -> Iterator[bool]:
    slot = output_layer_slot(model)
    if slot is None:
        yield False
        return
    parent, name, head = slot
    setattr(parent, name, make_head(head))
    try:
        yield True
    finally:
        setattr(parent, name, head)


def label_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    reuse_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, mask), both [batch, length-1]: log p(labels[t+1] | ids[:t+1]); 0 where unlabelled.

    No attention mask is passed, so transformers derives a block-diagonal causal mask from
    the restarting `position_ids` (packed rows, or padding after a single example). With
    `reuse_prefix`, leading columns that every row shares (`common_prefix`: a system prompt, tool
    schemas) run once and the rest of the rows on top of their cache (`_label_prefix_cache`): the
    same log-probs up to float rounding.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    keep = mask.any(dim=0).nonzero().squeeze(1)
    kept_targets = targets[:, keep]
    start, cached = 0, {}
    reused = _label_prefix_cache(model, input_ids, position_ids, keep) if reuse_prefix else None
    if reused is not None:  # columns [0, start) are in the cache; logits are needed from `start` on
        start, cache = reused
        cached = {cache_keyword(model): cache}
    with output_layer_swapped(model, lambda head: _LabelLogpHead(head, kept_targets)) as fused:
        out = model(
            input_ids=input_ids[:, start:],
            position_ids=position_ids[:, start:],
            logits_to_keep=keep - start,
            use_cache=bool(cached),
            **cached,
        )
    if fused:
        kept_logps = out.logits.squeeze(-1)
    else:
        logits = out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))  # bf16 up to fp32; fp64 stays
        kept_logps = -F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), kept_targets.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(kept_targets.shape)
    logps = torch.zeros(targets.shape, dtype=kept_logps.dtype, device=kept_logps.device)
    logps[:, keep] = kept_logps
    return logps * mask, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (padding gets 0 too)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    temperature: float = 1.0,
    want_entropy: bool = True,
    **forward_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(log-probs [B, R], entropies [B, R], the model's output) of the R tokens that end every row.

    Rows are laid out as a rollout makes them: a left-padded prompt, then the response
    (`responses` [B, R], the last R columns of `input_ids`); position ids follow the attention
    mask. Tokens are scored at the temperature they were sampled with (0, greedy, scores at
    1). Entropies carry no gradient: they are for logging (zeros without `want_entropy`,
    which spares a reference its softmax). Only the response positions reach
    the vocabulary projection, a chunk at a time, and no [B, R, vocab] logits are kept.
    """
    width = responses.shape[1]
    scale = 1.0 / temperature if temperature > 0 else 1.0
    position_ids = positions_from_mask(attention_mask)
    with output_layer_swapped(model, lambda head: _ResponseLogpHead(head, responses, scale, want_entropy)) as fused:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=width + 1,
            **forward_kwargs,
        )
    if fused:
        logps, entropy = out.logits.unbind(-1)
        return logps, entropy.detach(), out
    logits = out.logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    logps = torch.log_softmax(logits, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    return logps, entropy_from_logits(logits.detach()), out


def _fsdp_units(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on (HF then turns the KV cache off in training)."""
    from rlkit.scoring import unwrap_peft

    hf = unwrap_peft(model)
    name = (
        "is_activation_checkpointing"
        if hasattr(type(hf), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(hf, name, False))  # transformers 5.x renamed it


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword a model's forward and `generate` take a KV cache by: `cache` from transformers 5.x
    (`past_key_values`, deprecated there, before)."""
    from rlkit.scoring import unwrap_peft

    hf = unwrap_peft(model)
    return "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"


PREFIX_MIN_TOKENS = 16
"""The fewest leading tokens every row must share for `common_prefix` to run them once: below it,
the extra forward's fixed cost outweighs the columns it saves."""


def _prefix_cache_usable(model: torch.nn.Module, rows: int) -> bool:
    """Whether a prefix's KV cache can stand in for its columns: two rows or more (one gains nothing),
    and a model whose forward keeps a cache (gradient checkpointing turns HF's cache off)."""
    return rows >= 2 and not _checkpointing(model)


def _prefix_cache(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    start: Any | None = None,
    done: int = 0,
) -> Any | None:
    """The KV cache of the left-padded prefixes `ids` [U, P] (one forward), repeated so that row b of
    the batch gets prefix `rows[b]`; None when the model gives back no cache that can be re-indexed.
    `start`: the cache of their first `done` columns already computed, which the forward goes on from."""
    resumed = {cache_keyword(model): start} if start is not None else {}
    out = model(
        input_ids=ids[:, done:],
        attention_mask=mask,
        position_ids=positions_from_mask(mask)[:, done:],
        use_cache=True,
        logits_to_keep=1,
        **resumed,
    )
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(rows)
    return cache


def shared_prefix(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[Any, torch.Tensor, torch.Tensor, int] | None:
    """The KV cache of each distinct left-padded prompt row of `ids` but its last token, computed once
    and repeated for every row that has that prompt: (cache, the rows' ids and mask without the
    columns no row uses, prefix width); None when no two neighbouring rows share a prompt, when the
    cache cannot be used (gradient checkpointing turns HF's cache off) or a prefix would be empty.

    GRPO's G completions of a prompt are G neighbouring rows, so a rollout (or a micro-batch of one)
    holds each prompt G times: the prompt's tokens, often most of a row, run once instead of G
    times, in the prefill before sampling and in the forward of every update. Gradients reach the
    prompt's tokens through the repeated cache (indexing is differentiable), summed over the group.

    The distinct prompts often start alike too (a system prompt, the tool schemas: the demo calculator's
    prompts share their first 154 tokens): what they all start with runs once more before them
    (`left_padded_prefix`, batch 1), and the rows come back laid out as it lays them out, each
    row's padding after that common part.
    """
    if not _prefix_cache_usable(model, ids.shape[0]):
        return None
    unique, inverse = torch.unique_consecutive(ids, dim=0, return_inverse=True)
    if unique.shape[0] == ids.shape[0]:
        return None
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if len(used) else 0
    ids, mask = ids[:, first:], mask[:, first:]
    starts = torch.cat(
        [torch.zeros(1, dtype=torch.long, device=ids.device), (inverse[1:] != inverse[:-1]).nonzero()[:, 0] + 1]
    )
    prefix_ids, prefix_mask = ids[starts, :-1], mask[starts, :-1]
    if prefix_ids.shape[1] == 0 or not bool(prefix_mask.any(dim=1).all()):
        return None
    common = left_padded_prefix(model, prefix_ids, prefix_mask)
    if common is None:
        cache = _prefix_cache(model, prefix_ids, prefix_mask, inverse)
    else:  # the distinct prompts go on from what they all start with
        start, prefix_ids, prefix_mask, width = common
        cache = _prefix_cache(model, prefix_ids, prefix_mask, inverse, start, width)
        ids, mask = torch.cat([prefix_ids[inverse], ids[:, -1:]], 1), torch.cat([prefix_mask[inverse], mask[:, -1:]], 1)
    return None if cache is None else (cache, ids, mask, prefix_ids.shape[1])


def common_prefix(ids: torch.Tensor, real: torch.Tensor | None = None) -> int:
    """How many leading columns of `ids` [B, T] hold the same token in every row (and, given `real`
    [B, T], a real token in every row, not padding): the columns one forward can compute for all."""
    same = (ids == ids[:1]).all(dim=0)
    if real is not None:
        same &= real.all(dim=0)
    differ = (~same).nonzero()
    return int(differ[0]) if len(differ) else ids.shape[1]


def _common_prefix_cache(model: torch.nn.Module, row: torch.Tensor, rows: int) -> Any | None:
    """The cache of the 1-D token run `row` (positions 0..P-1), computed with batch 1 and repeated for `rows` rows."""
    ones = torch.ones(1, row.numel(), dtype=torch.long, device=row.device)
    return _prefix_cache(model, row[None], ones, torch.zeros(rows, dtype=torch.long, device=row.device))


def _label_prefix_cache(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: torch.Tensor
) -> tuple[int, Any] | None:
    """(P, the cache of the first P columns for every row) for `label_logprobs`'s right-padded rows,
    or None where the plain forward is to run.

    A row's real tokens are the leading columns whose position id is the column's index (padding
    restarts at 0); P is the shared run of them, capped so that every row keeps a token after it and
    no logit the labels need (`keep`, the columns scored) falls inside it. Computed in the caller's
    forward, so a reference (adapter off, another adapter) caches under its own weights. Without a
    backward under FSDP2: a block's keys and values would escape its pre-backward hook, as
    `prompt_cached_logprobs` says.
    """
    if keep.numel() == 0 or not _prefix_cache_usable(model, input_ids.shape[0]):
        return None
    if torch.is_grad_enabled() and _fsdp_units(model):
        return None
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    real = position_ids == columns
    run = int(real.long().cumprod(dim=1).sum(dim=1).min())
    prefix = min(common_prefix(input_ids, real), run - 1, int(keep[0]))
    if prefix < PREFIX_MIN_TOKENS:
        return None
    cache = _common_prefix_cache(model, input_ids[0, :prefix], input_ids.shape[0])
    return None if cache is None else (prefix, cache)


def left_padded_prefix(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[Any, torch.Tensor, torch.Tensor, int] | None:
    """Left-padded rows laid out to go on from the cache of the real tokens they all start with: (that
    cache, repeated per row; the ids and mask as [prefix][padding][rest]; the prefix's width), or None
    where they share fewer than `PREFIX_MIN_TOKENS` tokens (each row keeps at least one after it),
    the mask is not a left padding, or the cache cannot be used.

    Moving a row's padding after the prefix leaves every real token's position (HF's cumsum of the
    mask) and what it attends to as they were, so the tokens are the same up to float rounding;
    the width is the same too, so the generated tokens still start at column `ids.shape[1]`.
    """
    rows, width = ids.shape
    if not _prefix_cache_usable(model, rows):
        return None
    lengths = mask.sum(dim=1)
    pad = width - lengths
    columns = torch.arange(width, device=ids.device)
    if not bool((mask == (columns >= pad[:, None])).all()):
        return None
    shortest = int(lengths.min())
    aligned = ids.gather(1, pad[:, None] + columns[:shortest])  # each row's first `shortest` real tokens
    prefix = min(common_prefix(aligned), shortest - 1)
    if prefix < PREFIX_MIN_TOKENS:
        return None
    # column c takes: prefix token c, then the row's padding, then its real tokens from `prefix` on
    source = torch.where(
        columns < prefix,
        columns + pad[:, None],
        torch.where(columns < prefix + pad[:, None], columns - prefix, columns),
    )
    cache = _common_prefix_cache(model, aligned[0, :prefix], rows)
    return None if cache is None else (cache, ids.gather(1, source), mask.gather(1, source), prefix)


def prompt_cached_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int
) -> dict[str, Any]:
    """The keyword arguments of `model`'s forward over rollout rows (a left-padded prompt, then the
    `width`-column response), with the tokens the prompts share run once: each distinct prompt of
    rows that come in groups sharing one (GRPO's G completions: `shared_prefix`), else the tokens
    every row's prompt starts with (a system prompt, tool schemas: `left_padded_prefix`, PPO's
    rows); the forward then runs every row's remaining prompt tokens and its response on top of
    that cache. Either way its output ends with the response's columns (and the last prompt
    token's, which predicts the first response token), so `logits_to_keep` and hidden states
    counted from the end mean what they mean over the whole rows.

    The same numbers up to float rounding (the attention sums in another order), at about the cost
    of what is not shared; gradients reach the shared tokens through the repeated cache. The rows
    run whole where they share too little, under gradient checkpointing (HF turns the cache off),
    and for a model with FSDP units: the prompt's keys and values leave each block beside its
    output, where FSDP2's pre-backward hook (which gathers the block again for its backward) never
    sees them, so the backward would reach a freed block. (Generation's shared prefill, without a
    backward, still runs under FSDP.)
    """
    start = None
    if not _fsdp_units(model):
        prompt_ids, prompt_mask = input_ids[:, :-width], attention_mask[:, :-width]
        start = shared_prefix(model, prompt_ids, prompt_mask) or left_padded_prefix(model, prompt_ids, prompt_mask)
    if start is None:
        positions = positions_from_mask(attention_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions, "use_cache": False}
    cache, prompt_ids, prompt_mask, prefix = start
    mask = torch.cat([prompt_mask, attention_mask[:, -width:]], dim=1)
    return {
        "input_ids": torch.cat([prompt_ids[:, prefix:], input_ids[:, -width:]], dim=1),
        "attention_mask": mask,
        "position_ids": positions_from_mask(mask)[:, prefix:],
        "use_cache": True,
        cache_keyword(model): cache,
    }


def prompt_cached_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    temperature: float = 1.0,
    want_entropy: bool = True,
    **forward_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """`response_logprobs` over `prompt_cached_inputs`: the tokens the rows' prompts share run once.
    A model whose output layer the fused head does not fit takes `response_logprobs` as it is."""
    width = responses.shape[1]
    if output_layer_slot(model) is None:
        return response_logprobs(
            model, input_ids, attention_mask, responses, temperature, want_entropy, **forward_kwargs
        )
    scale = 1.0 / temperature if temperature > 0 else 1.0
    inputs = prompt_cached_inputs(model, input_ids, attention_mask, width)
    with output_layer_swapped(model, lambda head: _ResponseLogpHead(head, responses, scale, want_entropy)):
        out = model(**inputs, logits_to_keep=width + 1, **forward_kwargs)
    logps, entropy = out.logits.unbind(-1)
    return logps, entropy.detach(), out
