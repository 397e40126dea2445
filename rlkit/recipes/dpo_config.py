"""The options of `rlkit dpo`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.config import arg, opt
from rlkit.losses.preference import PREFERENCE_LOSSES
from rlkit.preference.config import ReferenceConfig


@dataclass
class DPOConfig(ReferenceConfig):
    model: Optional[str] = arg(
        "Policy to start from: an HF dir, a hub name, a LoRA adapter dir (e.g. `rlkit sft --lora` output: the adapter "
        "is continued and its frozen start is the reference) or a .gguf file.",
        metavar="MODEL",
    )
    loss: str = opt(
        "sigmoid",
        "Preference loss, or several comma-separated and summed with --loss-weights (e.g. sigmoid,sft): "
        + "; ".join(f"{name} ({record.description})" for name, record in PREFERENCE_LOSSES.items())
        + ".",
    )
    loss_weights: list[str] = opt(
        [], "Weights of the --loss components, comma-separated in the same order (e.g. 1,0.5; default: 1 each)."
    )
    beta: float = opt(
        0.1,
        "β: how strongly the policy is held to the reference (IPO's τ; SimPO's reward scale, 2-2.5 in its paper).",
        above=0,
    )
    label_smoothing: float = opt(
        0.0,
        "ε, the assumed rate of flipped labels: conservative DPO with --loss sigmoid (and cpo, sigmoid_norm), robust DPO with --loss robust, EXO's target [1-ε, ε] with --loss exo_pair (0 <= ε < 0.5).",
        min=0,
        below=0.5,
    )
    simpo_gamma: float = opt(
        0.5,
        "SimPO's target reward margin γ (the paper's γ, as TRL's CPOConfig simpo_gamma; not the SimPO scripts' gamma_beta_ratio).",
        min=0,
    )
    discopop_tau: float = opt(
        0.05, "τ of --loss discopop: the temperature of its mix of logistic and exponential loss.", above=0
    )
    sft_weight: float = opt(
        0.0, "α of the RPO term: adds α x the per-token NLL of the chosen completion to each pair's loss.", min=0
    )
    gradient_checkpointing: bool = opt(
        True,
        "Recompute activations in the backward pass to save memory. On by default for dpo, as in TRL: every step carries "
        "both sides of each pair. On a GPU --no-gradient-checkpointing buys speed back where memory allows.",
    )
