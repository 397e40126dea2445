"""`rlkit ppo`: setup (tokenizer, prompts, policy, value function, reference, reward), the engine, OUT."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed

from rlkit.console import info
from rlkit.data.prompts import rollout_prompts
from rlkit.errors import InputError
from rlkit.models.attention import use_fp32_attention_backward
from rlkit.models.modes import disable_dropout
from rlkit.preference.reference import on_the_fly_reference
from rlkit.recipes.ppo.collect import PPORollout, kl_controller
from rlkit.recipes.ppo.model import CRITIC_DIR, VALUE_HEAD_FILE, PolicyValue, make_value_head
from rlkit.recipes.ppo.objective import PPOObjective
from rlkit.recipes.ppo.plan import ppo_plan
from rlkit.recipes.ppo_config import PPOConfig
from rlkit.scoring import RewardSet, is_model_dir, load_reward, load_sequence_classifier
from rlkit.training.rollout import RolloutInputs, rollout_reference_spec
from rlkit.training.rollout_steps import RolloutSteps
from rlkit.training.run import TrainingRun, stop_for_dry_run
from rlkit.training.run_plan import RunPlan
from rlkit.training.samples import SAMPLES_FILE


def _check(config: PPOConfig) -> None:
    """What the options' own declarations (bounds, choices: checked as they are read) cannot say."""
    if not config.reward:
        raise InputError("missing --reward: a reward model dir (rlkit train-rm output) or module:function")
    if config.critic == "rm" and not is_model_dir(config.reward):
        raise InputError("--critic rm needs --reward to be a reward model dir")


def value_function(
    plan: RunPlan, config: PPOConfig, run: TrainingRun, policy: torch.nn.Module
) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(critic, value head) as the plan has it: `--critic rm`'s critic, a head on the policy's trunk,
    or neither when the advantage estimator needs no values (then no value forward and no value loss run)."""
    value = plan.value_function
    if value is None:
        info(f"value function: none (--advantage {config.advantage} needs no values)")
        return None, None
    if value.role == "critic":
        assert value.source is not None
        critic, _ = load_sequence_classifier(value.source, torch.float32, config.trust_remote_code)
        critic.requires_grad_(True)
        disable_dropout(critic)
        use_fp32_attention_backward(critic)
        info(f"critic: initialised from {value.source} (trained in full)")
        return critic, None
    return None, make_value_head(policy, [run.source.adapter_dir, run.source.path])


def run_ppo(config: PPOConfig) -> Path | None:
    """Setup (tokenizer, prompts, policy, value function, reference, reward), train with the engine,
    write OUT (None: --dry-run showed the plan)."""
    # 1. check what the options' declarations cannot; the run's plan (what --dry-run shows); open the run
    _check(config)
    plan = ppo_plan(config)
    if stop_for_dry_run(plan, config):
        return None
    run = TrainingRun(plan, config)
    set_seed(config.seed)
    # 2. the prompts that leave room for a response, and how many PPO steps they make
    tokenizer = run.load_tokenizer()
    template, prompts, encoded, _ = rollout_prompts(config, tokenizer)  # ppo takes no --tools
    conversations = prompts.conversations
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

    # 3. the models: policy, reference, reward, value function
    policy = run.load_policy()
    if not plan.main.dropout:  # PPO's ratio must be 1 before the first update (Huang et al. 2024)
        disable_dropout(policy)
    reference, described = on_the_fly_reference(
        config, run, policy, tokenizer, rollout_reference_spec(config.temperature)
    )
    info(f"reference: {described}")
    device = run.accelerator.device
    reward = load_reward(
        config.reward, tokenizer, template, run.weights_dtype, device, config.batch_size, config.trust_remote_code
    )
    critic, value_head = value_function(plan, config, run, policy)
    model = PolicyValue(policy, value_head, critic)

    # 4. train: a rollout per PPO step (collect.PPORollout), --ppo-epochs x --mini-batches updates on it
    controller = kl_controller(config)
    run.accelerator.register_for_checkpointing(controller)  # every checkpoint holds the KL coefficient
    inputs = RolloutInputs(run.accelerator, tokenizer, prompts, encoded, run)
    rewards = RewardSet([reward], ["reward"], [1.0], allow_none=False)
    assert plan.generation is not None
    algorithm = PPORollout(config, inputs, rewards, reference, controller, plan.generation.rows)
    objective = PPOObjective(config)
    steps = RolloutSteps(
        algorithm, config, run, objective, ppo_steps, epochs=config.ppo_epochs, mini_batches=config.mini_batches
    )
    default_lr = 1.4e-5 if config.lora else 3e-6
    metrics = run.train(model, objective, steps, default_lr, engine_config=steps.engine_config)
    metrics["ppo_steps"] = ppo_steps

    # 5. OUT: the policy (and value function), its card
    card = (
        "## PPO\n\n"
        f"- reward: `{config.reward}`; reference: {described}; critic: {config.critic}\n"
        f"- KL: {config.kl_estimator}, coef {config.kl_coef}"
        + (f" adaptive to {config.target_kl}" if config.target_kl else " fixed")
        + "\n"
        f"- advantages: {config.advantage}"
        + (f"; the value head is in `{VALUE_HEAD_FILE}` beside the policy" if value_head is not None else "")
        + (f"; the critic in `{CRITIC_DIR}/`" if critic is not None else "")
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
