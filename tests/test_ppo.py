"""`rlkit ppo`: masking in the full step, ratio 1 at lr 0, resume of the value head, a CLI smoke run, efficacy.

The pure functions (GAE, whitening, clipped losses, KL estimators, controllers) are tested in
test_losses_ppo.py; these tests run them inside the real rollout and update.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEMO_DATA, run_cli

PROMPTS = DEMO_DATA / "prompts.jsonl"


def letters(prompts: list[str], completions: list[str]) -> list[float]:
    """Rule-based reward for the efficacy test: the share of ASCII letters/spaces in the completion.

    A random tiny model emits many byte-fallback tokens (non-ASCII pieces), so the score starts
    well below 1 and PPO can raise it by moving probability off a large part of the vocabulary.
    """
    return [sum(ch.isascii() and (ch.isalpha() or ch == " ") for ch in c) / max(len(c), 1) for c in completions]


def _config(model_dir: Path, out: Path, **overrides):
    from rlkit.recipes.ppo import PPOConfig

    values = dict(
        model=str(model_dir),
        data=[str(PROMPTS)],
        output=str(out),
        reward="test_ppo:letters",
        max_steps=2,
        batch_size=4,
        max_new_tokens=6,
        ppo_epochs=2,
        sample_every=0,
        precision="fp32",
        log_every=100,
    )
    values.update(overrides)
    return PPOConfig(**values)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.process_boundary
def test_cli_smoke_two_steps(tiny_model_dir, tmp_path):
    out = tmp_path / "ppo"
    result = run_cli(
        "ppo",
        str(tiny_model_dir),
        str(PROMPTS),
        "-o",
        str(out),
        "--reward",
        "rlkit.demo.task:reward",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--ppo-epochs",
        "1",
        "--sample-every",
        "1",
        "--kl-estimator",
        "k3",
        "--target-kl",
        "1.0",
        "--missing-eos-penalty",
        "0.1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "ppo step 2" in result.stderr and "samples at PPO step" in result.stderr
    assert (out / "value_head.safetensors").is_file() and (out / "adapter_config.json").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"step", "prompt", "response", "score"} <= set(samples[0])
    summary = [m for m in _metrics(out) if "score/mean" in m]
    assert len(summary) == 2
    for key in (
        "score/std",
        "kl",
        "non_score_reward",
        "entropy",
        "ppo/approx_kl",
        "ppo/clipfrac",
        "ppo/value_clipfrac",
        "ppo/value_loss",
        "explained_variance",
        "response_length",
        "time/generation_s",
        "time/training_s",
        "ppo_tokens_per_s",
        "generation_tokens_per_s",
        "kl_coef",
    ):
        assert key in summary[-1], key
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert model is not None


def test_tokens_after_eos_contribute_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """A real rollout (with fixed sampled tokens) and the real update: post-EOS tokens are inert."""
    from accelerate import Accelerator

    from rlkit.data.prompts import PromptRows, encode_prompt
    from rlkit.data.templates import resolve_template
    from rlkit.models.load import load_causal_lm, load_tokenizer, resolve_source
    from rlkit.preference.reference import ModelReference
    from rlkit.recipes.ppo import (
        PolicyValue,
        PPOObjective,
        PPORollout,
        kl_controller,
        make_value_head,
        rollout_reference_spec,
    )
    from rlkit.scoring import FunctionReward, RewardSet
    from rlkit.training.rollout import RolloutInputs
    from rlkit.training.rollout_steps import RolloutSteps

    torch.manual_seed(0)
    source = resolve_source(str(tiny_model_dir))
    tok = load_tokenizer(source)
    template = resolve_template(None, tok)
    policy = load_causal_lm(source)
    head = make_value_head(policy, [])
    torch.nn.init.normal_(head.weight, std=0.1)
    wrapper = PolicyValue(policy, head, None)
    ref_model = load_causal_lm(source).eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a reference that differs, so the KL is not zero
    config = _config(tiny_model_dir, tmp_path / "unused", batch_size=2, ppo_epochs=1)
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Name a color."}]]
    encoded = [encode_prompt(tok, template, c) for c in conversations]
    eos = tok.eos_token_id
    fixed = torch.tensor([[40, 41, eos, 42, 43, 44], [45, 46, 47, 48, 49, 50]])

    def fake_generate(input_ids, attention_mask, **kwargs):
        return torch.cat([input_ids, fixed[: len(input_ids)]], dim=1)

    monkeypatch.setattr(policy, "generate", fake_generate)
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), run_dir=None)
    reward = FunctionReward("test_ppo:letters", lambda m: m[-1]["content"])
    objective = PPOObjective(config)
    reference = ModelReference(ref_model, rollout_reference_spec(config.temperature))
    prompts = PromptRows(conversations, [{} for _ in conversations], False)
    inputs = RolloutInputs(run.accelerator, tok, prompts, encoded, run)
    rewards = RewardSet([reward], ["reward"], [1.0], allow_none=False)
    algorithm = PPORollout(config, inputs, rewards, reference, kl_controller(config), config.batch_size)
    algorithm.prompt_indices = lambda step: [0, 1]
    loop = RolloutSteps(algorithm, config, run, objective, 1, epochs=1, mini_batches=1)
    buffer = loop.rollout(0, wrapper).update_tensors()
    mask = buffer["response_mask"]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    after = ~mask.bool()
    assert torch.all(buffer["advantages"][after] == 0) and torch.all(buffer["returns"][after] == 0)
    assert torch.all(buffer["advantages"][mask.bool()] != 0)

    def loss_and_grads(batch):
        wrapper.zero_grad(set_to_none=True)
        out = objective.loss(wrapper, batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads

    batch = dict(buffer)
    loss, grads = loss_and_grads(batch)
    # garbage after EOS: other tokens, nan log-probs/values/advantages/returns there
    changed = {k: v.clone() for k, v in buffer.items()}
    changed["responses"][0, 3:] = torch.tensor([7, 8, 9])
    width = changed["input_ids"].shape[1]
    changed["input_ids"][0, width - 3 :] = torch.tensor([7, 8, 9])
    for key in ("old_logprobs", "old_values", "advantages", "returns"):
        changed[key][0, 3:] = float("nan")
    loss2, grads2 = loss_and_grads(changed)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys()
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name


def test_lr_zero_gives_ratio_one_and_no_clipping(tiny_model_dir, tmp_path):
    from rlkit.recipes.ppo import run_ppo

    out = tmp_path / "lr0"
    run_ppo(_config(tiny_model_dir, out, lr=0.0, max_steps=1, ppo_epochs=2, temperature=0.7))
    updates = [m for m in _metrics(out) if "ratio" in m]
    assert len(updates) == 2
    for m in updates:  # lr 0: the policy never moves, so every epoch sees ratio exactly 1
        assert m["ratio"] == 1.0 and m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0
    assert updates[-1]["kl"] == 0.0  # a fresh adapter is the reference


def test_resume_restores_value_head(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import rlkit.training.run as run_module
    from rlkit.errors import RunError
    from rlkit.recipes.ppo import run_ppo

    common = dict(max_steps=2, ppo_epochs=1, save_every=1, lr=1e-2)
    whole = tmp_path / "whole"
    run_ppo(_config(tiny_model_dir, whole, **common))

    out = tmp_path / "resumed"
    real_finalize = run_module.finalize

    def crash(*args, **kwargs):
        raise RunError("simulated crash before the output was written")

    monkeypatch.setattr(run_module, "finalize", crash)
    with pytest.raises(RunError):
        run_ppo(_config(tiny_model_dir, out, **common))
    partial = tmp_path / "resumed.partial"
    assert [p.name for p in (partial / "checkpoints").iterdir()] == ["step-0000001"]
    # forget step 2: resume from the checkpoint taken after PPO step 1
    (partial / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (partial / "metrics.jsonl").read_text().splitlines()[:1])
    )
    monkeypatch.setattr(run_module, "finalize", real_finalize)
    run_ppo(_config(tiny_model_dir, out, resume=True, **common))

    expected, got = load_file(str(whole / "value_head.safetensors")), load_file(str(out / "value_head.safetensors"))
    assert torch.any(expected["weight"] != 0)  # the head was trained
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    def last(d):
        return [m for m in _metrics(d) if "score/mean" in m][-1]

    assert last(whole)["score/mean"] == last(out)["score/mean"]


@pytest.mark.slow
def test_efficacy_rule_based_reward_rises(tiny_model_dir, tmp_path):
    from rlkit.recipes.ppo import run_ppo

    out = tmp_path / "efficacy"
    run_ppo(
        _config(
            tiny_model_dir,
            out,
            lora=False,
            lr=3e-3,
            max_steps=40,
            batch_size=8,
            max_new_tokens=8,
            ppo_epochs=4,
            kl_coef=0.01,
            temperature=1.0,
        )
    )
    steps = [m for m in _metrics(out) if "score/mean" in m]
    scores = [m["score/mean"] for m in steps]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.08, scores
    assert all(math.isfinite(m["kl"]) for m in steps)


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A one-score sequence classifier on the tiny trunk, saved as `train-rm` saves one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-rm")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tok.pad_token_id
    )
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_model_dir_scores_like_the_hf_head(tiny_rm_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from rlkit.data.templates import ChatTemplate
    from rlkit.scoring import ModelReward, load_reward

    reward = load_reward(str(tiny_rm_dir), tiny_tokenizer, ChatTemplate("tokenizer", tiny_tokenizer.chat_template))
    assert isinstance(reward, ModelReward)
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "user", "content": "Name a long river in Africa."}],
    ]
    completions = ["4 #done", "The Nile is a very long river. #done"]
    scores = reward(conversations, completions)
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    for i, (messages, completion) in enumerate(zip(conversations, completions)):
        ids = torch.tensor([reward.encode(messages, completion)])
        assert ids[0, -1] == tiny_tokenizer.eos_token_id  # the completion ends its turn as train-rm renders it
        with torch.no_grad():
            expected = hf(input_ids=ids).logits[0, 0]
        assert torch.allclose(scores[i], expected, atol=1e-5)


def test_reward_model_dir_with_rm_critic(tiny_model_dir, tiny_rm_dir, tmp_path):
    from rlkit.recipes.ppo import run_ppo

    out = tmp_path / "rm-critic"
    run_ppo(_config(tiny_model_dir, out, reward=str(tiny_rm_dir), critic="rm", max_steps=1, ppo_epochs=1))
    assert (out / "critic" / "config.json").is_file() and not (out / "value_head.safetensors").exists()
    summary = [m for m in _metrics(out) if "score/mean" in m][-1]
    assert math.isfinite(summary["score/mean"]) and math.isfinite(summary["ppo/value_loss"])


def test_bad_input_is_refused_before_any_output(tiny_model_dir, tmp_path):
    from conftest import write_jsonl

    from rlkit.errors import InputError
    from rlkit.recipes.ppo import run_ppo

    out = tmp_path / "bad"
    with pytest.raises(InputError, match="missing --reward"):
        run_ppo(_config(tiny_model_dir, out, reward=None))
    with pytest.raises(InputError, match="cannot import"):
        run_ppo(_config(tiny_model_dir, out, reward="no_such_module:fn"))
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "hello"}] * 8)
    with pytest.raises(InputError, match="no `prompt` or `messages` column"):
        run_ppo(_config(tiny_model_dir, out, data=[str(texts)]))
    assert not out.exists() and not (tmp_path / "bad.partial").exists()


def test_ref_with_another_tokenizer_is_refused_like_dpo(tiny_model_dir, tmp_path):
    """`ppo --ref` shares dpo's reference, tokenizer check included: exit 2, one `error:` line, nothing written."""
    import shutil

    from conftest import build_tokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    build_tokenizer(vocab_size=500).save_pretrained(other)
    refusals = {}
    for command, data, extra in (
        ("dpo", DEMO_DATA / "pairs_eval.jsonl", []),
        ("ppo", PROMPTS, ["--reward", "rlkit.demo.task:reward"]),
    ):
        out = tmp_path / command
        result = run_cli(command, str(tiny_model_dir), str(data), "-o", str(out), "--ref", str(other), *extra)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert not out.exists() and not (tmp_path / f"{command}.partial").exists()
        refusals[command] = errors[0]
    assert "its tokenizer differs" in refusals["ppo"]
    assert refusals["ppo"] == refusals["dpo"]


def test_efficacy_ppo_with_a_trained_reward_model_raises_its_held_out_score(tiny_model_dir, tmp_path):
    """The demo task end to end: SFT briefly, train a reward model on the demo pairs, PPO against it.

    Measured on the held-out prompts (never in prompts.jsonl) with the same sampling seed before
    and after, at temperature 1 (what PPO samples at): the reward model's mean score must rise by
    more than 1.0 (it rises by ~2, from ~0.3; the score's std over prompts is ~2, so the standard
    error of a 64-prompt mean is ~0.3). With lr 0 the two evaluations are identical, so the test
    fails if PPO did nothing. The demo task's own checker (`rlkit.demo.task:reward`) is printed,
    not asserted: this ~100k-parameter reward model is easy to exploit (PPO learns to end every
    line with `#done`, the feature it keys on, without the rest of the format), so the checker's
    score does not rise with it -- reward hacking in miniature.
    """
    data = DEMO_DATA
    sft, rm, ppo = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    steps = [
        (
            "sft",
            str(tiny_model_dir),
            str(data / "sft.jsonl"),
            "-o",
            str(sft),
            "--full",
            "--lr",
            "3e-3",
            "--max-steps",
            "60",
            "--batch-size",
            "4",
            "--max-length",
            "256",
        ),
        (
            "train-rm",
            str(tiny_model_dir),
            str(data / "pairs.jsonl"),
            "-o",
            str(rm),
            "--eval-data",
            str(data / "pairs_eval.jsonl"),
            "--lr",
            "3e-3",
            "--epochs",
            "1",
            "--batch-size",
            "8",
        ),
    ]
    for args in steps:
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
    rm_accuracy = json.loads((rm / "final_metrics.json").read_text())["eval/accuracy"]
    assert rm_accuracy > 0.9, rm_accuracy

    def evaluate(policy: Path, reward: str) -> float:
        result = run_cli(
            "eval",
            str(policy),
            "--prompts",
            str(data / "eval_prompts.jsonl"),
            "--reward",
            reward,
            "--max-new-tokens",
            "24",
            "--temperature",
            "1.0",
            "--seed",
            "7",
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["score_mean"]

    before = {"rm": evaluate(sft, str(rm)), "task": evaluate(sft, "rlkit.demo.task:reward")}
    result = run_cli(
        "ppo",
        str(sft),
        str(data / "prompts.jsonl"),
        "-o",
        str(ppo),
        "--reward",
        str(rm),
        "--full",
        "--lr",
        "3e-4",
        "--kl-coef",
        "0.1",
        "--max-steps",
        "15",
        "--batch-size",
        "16",
        "--max-new-tokens",
        "24",
        "--ppo-epochs",
        "4",
        "--sample-every",
        "0",
    )
    assert result.returncode == 0, result.stderr
    after = {"rm": evaluate(ppo, str(rm)), "task": evaluate(ppo, "rlkit.demo.task:reward")}
    curve = [m["score/mean"] for m in _metrics(ppo) if "score/mean" in m]
    kls = [m["kl"] for m in _metrics(ppo) if "score/mean" in m]
    print(f"reward model held-out accuracy {rm_accuracy:.3f}")
    print(f"held-out RM score (T=1): before PPO {before['rm']:.3f}, after {after['rm']:.3f}")
    print(f"held-out demo-task reward (T=1, not asserted): before {before['task']:.3f}, after {after['task']:.3f}")
    print(f"training RM score per PPO step: {[round(s, 2) for s in curve]}; KL {[round(k, 2) for k in kls]}")
    assert after["rm"] > before["rm"] + 1.0, (before, after)
    assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 0.5, curve
    assert all(math.isfinite(k) for k in kls)


def recorded_lengths(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward = completion length (+ 100 on rank 1, so the two processes' scores always differ),
    each call's scores appended to $RLKIT_TEST_SCORES.<rank>."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    scores = [float(len(c)) + 100.0 * rank for c in completions]
    with open(f"{os.environ['RLKIT_TEST_SCORES']}.{rank}", "a") as f:
        f.write(json.dumps(scores) + "\n")
    return scores


def test_two_processes_summarise_the_whole_rollout(tiny_model_dir, tmp_path):
    """With 2 processes the logged rollout summary is over both processes' sequences, not rank 0's."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scores_file = tmp_path / "scores"
    out = tmp_path / "two"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "rlkit",
            "ppo",
            str(tiny_model_dir),
            str(PROMPTS),
            "-o",
            str(out),
            "--reward",
            "test_ppo:recorded_lengths",
            "--max-steps",
            "1",
            "--batch-size",
            "3",
            "--max-new-tokens",
            "8",
            "--ppo-epochs",
            "1",
            "--sample-every",
            "0",
            "--temperature",
            "1.5",
            "--score-norm",
            "batch",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RLKIT_TEST_SCORES": str(scores_file),
            "PYTHONPATH": str(Path(__file__).parent),
        },
    )
    assert result.returncode == 0, result.stderr
    per_rank = [json.loads((tmp_path / f"scores.{rank}").read_text().splitlines()[0]) for rank in (0, 1)]
    assert all(len(scores) == 3 for scores in per_rank)
    everything = per_rank[0] + per_rank[1]
    assert sum(per_rank[0]) != sum(per_rank[1])  # otherwise rank 0's summary would pass too
    summary = [m for m in _metrics(out) if "score/mean" in m][0]
    assert summary["score/mean"] == pytest.approx(sum(everything) / 6)
    assert summary["score/std"] == pytest.approx(torch.tensor(everything).std().item(), rel=1e-5)
    # standardised over all 6 scores: the shaped mean is ~0 whatever each process's own mean is
    assert abs(summary["score/shaped_mean"]) < 1e-5


def test_advantage_choices_are_the_registered_estimators():
    from dataclasses import fields

    from rlkit.losses.advantages import ADVANTAGE_ESTIMATORS
    from rlkit.recipes.ppo import PPOConfig

    field = next(f for f in fields(PPOConfig) if f.name == "advantage")
    assert field.metadata["choices"] == tuple(ADVANTAGE_ESTIMATORS)
    assert field.default in ADVANTAGE_ESTIMATORS


def test_without_a_value_function_there_is_no_value_forward_and_no_value_loss(tiny_model_dir, tmp_path):
    from rlkit.models.load import load_causal_lm, resolve_source
    from rlkit.recipes.ppo import PolicyValue, PPOObjective

    torch.manual_seed(0)
    policy = load_causal_lm(resolve_source(str(tiny_model_dir)))
    seen = []
    policy.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs.get("output_hidden_states")), with_kwargs=True
    )
    wrapper = PolicyValue(policy, None, None)
    ids = torch.randint(5, 100, (2, 7))
    responses = ids[:, -3:]
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "responses": responses,
        "response_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
        "advantages": torch.tensor([[1.0, -0.5, 9.0], [0.25, 2.0, -1.0]]),
    }
    with torch.no_grad():
        logprobs, _, values = wrapper(ids, batch["attention_mask"], responses, 1.0)
    assert values is None and seen == [False]  # no hidden states asked for: no value head to feed
    batch["old_logprobs"] = logprobs
    objective = PPOObjective(_config(tiny_model_dir, tmp_path / "unused"))
    out = objective.loss(wrapper, batch)
    assert "value_loss" not in out.metrics and "value_clipfrac" not in out.metrics
    # ratio 1: the clipped loss is -A, a token mean over the 5 response tokens, returned as a sum (x 5)
    assert float(out.loss) == pytest.approx(-(1.0 - 0.5 + 0.25 + 2.0 - 1.0))
    assert torch.equal(out.loss.detach(), out.metrics["policy_loss"])


def test_prompt_order_in_groups_of_g():
    """G completions per prompt: each prompt G times in a row; G = 1 is PPO's order, unchanged."""
    from rlkit.training.rollout import prompt_indices

    def indices(group_size, batch_size, rank=0, world=1, step=0):
        return prompt_indices(10, step, 3, batch_size, group_size, rank, world)

    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert indices(1, 4) == order[:4] and indices(1, 4, step=1) == order[4:8]
    assert indices(1, 2, rank=1, world=2) == order[2:4]
    assert indices(2, 4) == [order[0]] * 2 + [order[1]] * 2
    assert indices(2, 4, step=1) == [order[2]] * 2 + [order[3]] * 2
    assert indices(2, 2, rank=1, world=2) == [order[1]] * 2


def test_a_critic_free_recipe_plugs_into_the_rollout_seam(tiny_model_dir, tmp_path):
    """What GRPO-style recipes rely on: G samples per prompt, no value function, no reference, its own
    estimator over the stages' records; the rollout's update tensors then train through PPOObjective."""
    from accelerate import Accelerator

    from rlkit.data.prompts import PromptRows, encode_prompt
    from rlkit.data.templates import resolve_template
    from rlkit.models.load import load_causal_lm, load_tokenizer, resolve_source
    from rlkit.recipes.ppo import PolicyValue, PPOObjective
    from rlkit.scoring import RewardSet
    from rlkit.training import rollout as stages
    from rlkit.training.rollout_steps import RolloutSteps

    class GroupMean:
        name = "group"
        group_size = 2

        def __init__(self, config, inputs, rewards):
            self.c, self.inputs, self.rewards = config, inputs, rewards

        def collect(self, rl_step, wrapper):
            c, inputs = self.c, self.inputs
            indices = stages.prompt_indices(4, rl_step, c.seed, c.batch_size, self.group_size, 0, 1)
            how = stages.RolloutSampling(c.max_new_tokens, c.temperature, c.top_p, None, chunk=c.batch_size)
            samples = stages.sample(inputs, wrapper, indices, rl_step, how)
            forward = stages.rollout_forward(inputs, wrapper, samples, c.batch_size, c.temperature, None)
            per_reward = stages.score_samples(inputs, samples, self.rewards)
            scores = per_reward[:, 0]
            scored = stages.Scored(per_reward, scores, scores, {}, 0.0)
            grouped = scores.view(-1, self.group_size)
            centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1, 1)
            advantages = torch.where(samples.response_mask.bool(), centred, 0)
            estimated = stages.Advantages(advantages, None, samples.response_mask, {})
            return stages.Rollout(samples, forward, scored, estimated, 0.0)

        def summary(self, rollout):
            return {"score/mean": float(rollout.scored.combined.mean())}

        def sample_rows(self, rollout):
            return []

        def step_line(self, rl_step, metrics, generation_s, training_s):
            return f"group step {rl_step + 1}"

    torch.manual_seed(0)
    source = resolve_source(str(tiny_model_dir))
    tok = load_tokenizer(source)
    template = resolve_template(None, tok)
    wrapper = PolicyValue(load_causal_lm(source), None, None)
    config = _config(tiny_model_dir, tmp_path / "unused", batch_size=4, ppo_epochs=1, temperature=1.0)
    conversations = [[{"role": "user", "content": f"Say {w}."}] for w in ("yes", "no", "maybe", "hello")]
    encoded = [encode_prompt(tok, template, c) for c in conversations]
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), run_dir=None)
    reward = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    inputs = stages.RolloutInputs(run.accelerator, tok, PromptRows(conversations, [{}] * 4, False), encoded, run)
    algorithm = GroupMean(config, inputs, RewardSet([reward], ["reward"], [1.0], allow_none=False))
    steps = RolloutSteps(algorithm, config, run, PPOObjective(config), 1, epochs=1, mini_batches=1)
    rollout = steps.rollout(0, wrapper)
    samples, forward = rollout.samples, rollout.forward
    assert samples.indices[0] == samples.indices[1] and samples.indices[2] == samples.indices[3]
    assert forward.values is None and forward.ref_logprobs is None and rollout.advantages.returns is None
    per_group = rollout.advantages.advantages.sum(dim=1) / samples.response_mask.sum(dim=1)
    assert per_group.view(-1, 2).sum(dim=1).abs().max() < 1e-5  # centred within each group
    tensors = rollout.update_tensors()
    assert {"old_values", "returns", "ref_logprobs"}.isdisjoint(tensors)
    assert steps.pending["score/mean"] == pytest.approx(float(rollout.scored.combined.mean()))
    micro = steps.batches(0, wrapper)
    out = steps.objective.loss(wrapper, micro[0])
    assert torch.isfinite(out.loss) and "value_loss" not in out.metrics
    assert steps.step_metrics()["group_step"] == 1
