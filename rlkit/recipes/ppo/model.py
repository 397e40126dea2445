"""The module PPO trains: the policy and, where the advantage estimator needs one, its value function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlkit.console import info
from rlkit.scoring import unwrap_peft
from rlkit.training.logprobs import positions_from_mask, prompt_cached_logprobs

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"


class PolicyValue(torch.nn.Module):
    """The trained module: the policy, and the value function (a head on its trunk, a critic, or none).

    `forward` returns, for the response that ends every row (the last R columns of left-padded
    prompt + response rows), each token's log-prob at the sampling temperature, the entropy of
    its distribution (no gradient) and the value of the state before it, all [B, R]; the values
    are None without a value function (then no value forward runs: GRPO-style critic-free RL).
    The policy runs the tokens its rows' prompts share once (`prompt_cached_logprobs`: each
    distinct prompt of GRPO's groups, else the system prompt every row starts with).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        value_head: torch.nn.Module | None,
        critic: torch.nn.Module | None,
    ):
        super().__init__()
        self.policy, self.value_head, self.critic = policy, value_head, critic

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, responses: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        r = responses.shape[1]
        logps, entropy, out = prompt_cached_logprobs(
            self.policy,
            input_ids,
            attention_mask,
            responses,
            temperature,
            output_hidden_states=self.value_head is not None,
        )
        if self.value_head is not None:
            hidden = out.hidden_states[-1][:, -(r + 1) : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        elif self.critic is not None:
            hf = unwrap_peft(self.critic)
            trunk = getattr(hf, hf.base_model_prefix)
            hidden = trunk(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state
            values = hf.score(hidden[:, -(r + 1) : -1]).squeeze(-1)
        else:
            return logps, entropy, None
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
