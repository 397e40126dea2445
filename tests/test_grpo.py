"""`rlkit grpo`: a CLI run, ratio 1 at lr 0, efficacy, two processes = one, bit-identical resume, bad input.

The pure functions (advantage estimators, aggregations, clipping, GSPO ratios, the overlong
penalty, masks) are tested against hand computations in test_losses_grpo.py; these tests run
them inside the real rollout and update.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, REPO, SMOLLM2, assert_same_up_to_fp32, interrupted_after, run_cli, write_jsonl

PROMPTS = DEMO_DATA / "grpo_prompts.jsonl"
TESTS = Path(__file__).parent


def letters(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Rule-based reward: the share of ASCII letters/spaces (a random tiny model starts well below 1)."""
    return [sum(ch.isascii() and (ch.isalpha() or ch == " ") for ch in c) / max(len(c), 1) for c in completions]


def short(prompts: list[str], completions: list[str], **columns) -> list[float]:
    return [-len(c) / 10 for c in completions]


def raises(prompts, completions, **columns):
    raise ZeroDivisionError("boom")


def too_few(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def not_numbers(prompts, completions, **columns):
    return ["high"] * len(completions)


def nan_scores(prompts, completions, **columns):
    return [float("nan")] * len(completions)


def _config(model_dir: Path, out: Path, **overrides):
    from rlkit.recipes.grpo_config import GRPOConfig

    values = dict(
        model=str(model_dir),
        data=[str(PROMPTS)],
        output=str(out),
        reward=["test_grpo:letters"],
        max_steps=2,
        batch_size=4,
        grad_accum=2,
        num_generations=4,
        max_new_tokens=8,
        sample_every=0,
        precision="fp32",
        log_every=100,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _summaries(out: Path) -> list[dict]:
    return [m for m in _metrics(out) if "reward/mean" in m]


@pytest.mark.process_boundary
def test_cli_run_with_two_rewards(tiny_model_dir, tmp_path):
    out = tmp_path / "grpo"
    result = run_cli(
        "grpo",
        str(tiny_model_dir),
        str(PROMPTS),
        "-o",
        str(out),
        "--reward",
        "test_grpo:letters",
        "--reward",
        "test_grpo:short",
        "--reward-weights",
        "1,0.5",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--num-generations",
        "4",
        "--max-new-tokens",
        "8",
        "--sample-every",
        "1",
        "--beta",
        "0.05",
        "--overlong-penalty",
        "4",
        "--epsilon-high",
        "0.28",
        env={"PYTHONPATH": str(TESTS)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "grpo step 2" in result.stderr and "samples at GRPO step" in result.stderr
    assert (out / "adapter_config.json").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    assert list(samples[0]) == ["step", "prompt", "completion", "letters", "short", "advantage"]
    summary = _summaries(out)
    assert len(summary) == 2
    last = summary[-1]
    for key in (
        "rewards/letters/mean",
        "rewards/letters/std",
        "rewards/short/mean",
        "rewards/short/std",
        "rewards/overlong_penalty/mean",
        "reward/std",
        "frac_zero_variance_groups",
        "completion_length/mean",
        "completion_length/min",
        "completion_length/max",
        "frac_truncated",
        "kl",
        "clip_low",
        "clip_high",
        "entropy",
        "time/generation_s",
        "time/training_s",
        "generation_tokens_per_s",
        "training_tokens_per_s",
        "grpo_tokens_per_s",
    ):
        assert key in last, key
    # the combined reward is the weighted sum plus the overlong penalty
    expected = last["rewards/letters/mean"] + 0.5 * last["rewards/short/mean"] + last["rewards/overlong_penalty/mean"]
    assert last["reward/mean"] == pytest.approx(expected, abs=1e-5)
    card = (out / "README.md").read_text()
    assert "test_grpo:letters" in card and "group" in card


def test_lr_zero_gives_ratio_one_and_no_clipping(tiny_model_dir, tmp_path):
    from rlkit.recipes.grpo import run_grpo

    out = tmp_path / "lr0"
    run_grpo(_config(tiny_model_dir, out, lr=0.0, max_steps=1, num_iterations=2, beta=0.1, temperature=0.7))
    updates = [m for m in _metrics(out) if "ratio" in m]
    assert len(updates) == 2
    for m in updates:  # lr 0: the policy never moves; the second iteration compares with rollout-time log-probs
        assert m["ratio"] == 1.0 and m["clip_low"] == 0.0 and m["clip_high"] == 0.0
        assert m["kl"] == 0.0  # a fresh adapter is the reference


def test_efficacy_rule_based_reward_rises(tiny_model_dir, tmp_path):
    from rlkit.recipes.grpo import run_grpo

    out = tmp_path / "efficacy"
    run_grpo(
        _config(tiny_model_dir, out, lora=False, lr=1e-2, max_steps=20, batch_size=8, grad_accum=2, num_generations=8)
    )
    rewards = [m["reward/mean"] for m in _summaries(out)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards
    assert all(math.isfinite(r) for r in rewards)


def _held_out_score(model: str, tmp_path: Path, name: str) -> float:
    """The demo checker's mean score of greedy completions on the held-out prompts (`rlkit eval`)."""
    result = run_cli(
        "eval",
        model,
        "--prompts",
        str(DEMO_DATA / "eval_prompts.jsonl"),
        "--reward",
        "rlkit.demo.task:reward",
        "--max-new-tokens",
        "48",
        "--output-dir",
        str(tmp_path / name),
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["score_mean"]


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="needs the demo model (`make demo-model`)")
def test_efficacy_smollm2_demo_checker_raises_the_held_out_score(tmp_path):
    """SmolLM2-135M with the demo task's checker: the training reward and the held-out score rise."""
    before = _held_out_score(str(SMOLLM2), tmp_path, "before")
    out = tmp_path / "grpo"
    result = run_cli(
        "grpo",
        str(SMOLLM2),
        str(DEMO_DATA / "prompts.jsonl"),
        "-o",
        str(out),
        "--reward",
        "rlkit.demo.task:reward",
        "--num-generations",
        "8",
        "--batch-size",
        "16",
        "--grad-accum",
        "2",
        "--max-new-tokens",
        "48",
        "--max-steps",
        "30",
        "--lr",
        "2e-4",
        "--sample-every",
        "10",
        timeout=7200,
    )
    assert result.returncode == 0, result.stderr
    rewards = [m["reward/mean"] for m in _summaries(out)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5, rewards
    after = _held_out_score(str(out), tmp_path, "after")
    assert after > before + 0.05, (before, after)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_log_what_one_process_logs(tiny_model_dir, tmp_path):
    """A prompt's G completions split over two gloo processes: same samples, advantages and losses as one."""
    common = [
        str(tiny_model_dir),
        str(PROMPTS),
        "--reward",
        "test_grpo:letters",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--generation-batch-size",
        "4",  # the same sampling chunks whether a process holds 8 rows or 4
        "--num-generations",
        "4",
        "--max-new-tokens",
        "8",
        "--sample-every",
        "0",
        "--beta",
        "0.1",
        "--num-iterations",
        "2",
        "--lr",
        "1e-2",
        "--full",
        "--precision",
        "fp32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    one = tmp_path / "one"
    result = run_cli("grpo", *common, "-o", str(one), "--grad-accum", "4", env={"PYTHONPATH": str(TESTS)})
    assert result.returncode == 0, result.stderr
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    result = subprocess.run(
        [*launch, str(_free_port()), "-m", "rlkit", "grpo", *common, "-o", str(two), "--grad-accum", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    a, b = _metrics(one), _metrics(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in (
            "loss",
            "kl",
            "clip_low",
            "clip_high",
            "reward/mean",
            "reward/std",
            "advantage/std",
            "advantage/abs_mean",
        ):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert a[-1]["loss"] != 0.0


def test_resume_is_bit_identical(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from rlkit.recipes.grpo import run_grpo

    common = dict(max_steps=3, save_every=1, lr=1e-2, lora=False, num_iterations=2, beta=0.1)
    whole = tmp_path / "whole"
    run_grpo(_config(tiny_model_dir, whole, **common))

    out = tmp_path / "resumed"
    # interrupted after GRPO step 1 (engine step 2: two updates), resumed from that checkpoint
    interrupted_after(monkeypatch, run_grpo, _config(tiny_model_dir, out, **common), "step-0000002", 2)
    run_grpo(_config(tiny_model_dir, out, resume=True, **common))

    expected, got = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    def steady(d):  # timings differ run to run; everything else must not
        return [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k} for m in _metrics(d)]

    assert steady(whole) == steady(out)


def test_global_batch_not_a_multiple_of_the_group_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "bad"
    result = run_cli(
        "grpo",
        str(tiny_model_dir),
        str(PROMPTS),
        "-o",
        str(out),
        "--reward",
        "rlkit.demo.task:reward",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--num-generations",
        "4",
    )
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "global batch of 6" in line and "--num-generations 4" in line and "batch-size 3" in line
    assert "Traceback" not in result.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize(
    ("function", "words"),
    [
        ("raises", "ZeroDivisionError"),
        ("too_few", "returned 7 scores for 8"),
        ("not_numbers", "non-numbers"),
        ("nan_scores", "NaN"),
    ],
)
def test_bad_rewards_stop_with_one_line(tiny_model_dir, tmp_path, function, words):
    out = tmp_path / function
    result = run_cli(
        "grpo",
        str(tiny_model_dir),
        str(PROMPTS),
        "-o",
        str(out),
        "--reward",
        "test_grpo:letters",
        "--reward",
        f"test_grpo:{function}",
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--num-generations",
        "4",
        "--max-new-tokens",
        "4",
        env={"PYTHONPATH": str(TESTS)},
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"test_grpo:{function}" in errors[0] and words in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_missing_reward_and_bad_weights_are_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "x"
    for extra, words in (
        ([], "missing --reward"),
        (["--reward", "rlkit.demo.task:reward", "--reward-weights", "1,2"], "2 values for 1 --reward"),
        (["--reward", "rlkit.demo.task:reward", "--epsilon", "0.3", "--epsilon-high", "0.2"], "--epsilon-high"),
        (["--reward", "rlkit.demo.task:reward", "--ref", str(tiny_model_dir)], "give --beta > 0"),
    ):
        result = run_cli("grpo", str(tiny_model_dir), str(PROMPTS), "-o", str(out), *extra)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert not out.exists()


def test_extra_columns_reach_the_reward_function(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"What is {i} plus 1?", "answer": i + 1, "tag": f"t{i}"} for i in range(8)],
    )
    seen = tmp_path / "seen.jsonl"
    out = tmp_path / "cols"
    result = run_cli(
        "grpo",
        str(tiny_model_dir),
        str(data),
        "-o",
        str(out),
        "--reward",
        "test_grpo:record_columns",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--num-generations",
        "2",
        "--max-new-tokens",
        "4",
        env={"PYTHONPATH": str(TESTS), "RLKIT_TEST_SEEN": str(seen)},
    )
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 1
    call = calls[0]
    assert sorted(call["columns"]) == ["answer", "completion_ids", "tag"]  # TRL's keywords, less prompts/completions
    # each completion sees its own prompt's columns, G times in a row
    for prompt, answer, tag in zip(call["prompts"], call["answer"], call["tag"]):
        n = int(prompt.split()[2])
        assert answer == n + 1 and tag == f"t{n}"
    assert call["answer"][0] == call["answer"][1]


def record_columns(prompts, completions, **columns):
    with open(os.environ["RLKIT_TEST_SEEN"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "columns": sorted(columns), **columns}) + "\n")
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def named_only(prompts, completions, answer):
    return [float(c == str(a)) for c, a in zip(completions, answer)]


def sometimes_none(prompts, completions, **columns):
    return [None, 1.0]


def test_function_reward_columns_and_none():
    from rlkit.errors import RunError
    from rlkit.scoring import FunctionReward, RewardBatch

    sys.path.insert(0, str(TESTS))
    conversations = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    columns = {"answer": [3, 4], "tag": ["a", "b"]}
    # a function without **kwargs gets only the columns it names
    batch = RewardBatch(conversations, ["3", "5"], columns=columns)
    assert FunctionReward("test_grpo:named_only").score(batch) == [1.0, 0.0]
    # None is "no opinion" where the caller allows it (grpo), a non-number elsewhere (ppo, eval)
    reward = FunctionReward("test_grpo:sometimes_none")
    assert reward.score(RewardBatch(conversations, ["x", "y"], columns=columns), allow_none=True) == [None, 1.0]
    with pytest.raises(RunError, match="test_grpo:sometimes_none returned non-numbers"):
        reward(conversations, ["x", "y"])


def test_weighted_rewards_with_none_terms(tiny_tokenizer):
    from rlkit.scoring import FunctionReward, RewardBatch, RewardSet

    sys.path.insert(0, str(TESTS))
    rewards = RewardSet(
        [FunctionReward("test_grpo:sometimes_none"), FunctionReward("test_grpo:named_only")],
        ["sometimes_none", "named_only"],
        [2.0, 0.5],
    )
    conversations = [[{"role": "user", "content": "q"}]] * 2
    per_function = rewards(RewardBatch(conversations, ["3", "4"], columns={"answer": [3, 5]}))
    assert math.isnan(per_function[0, 0]) and per_function[1, 0] == 1.0
    assert per_function[:, 1].tolist() == [1.0, 0.0]
    from rlkit.losses.group_advantages import combine_rewards

    assert combine_rewards(per_function, rewards.weights).tolist() == [0.5, 2.0]


def test_a_reward_model_dir_beside_a_function(tiny_model_dir, tmp_path):
    """`--reward RM_DIR` is scored by the scorer ppo and eval use, and logged under the dir's name."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlkit.recipes.grpo import run_grpo

    rm = tmp_path / "tiny-rm"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tok.pad_token_id
    )
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    out = tmp_path / "rm"
    sys.path.insert(0, str(TESTS))
    run_grpo(_config(tiny_model_dir, out, reward=[str(rm), "test_grpo:letters"], reward_weights=["0.5,1"], max_steps=1))
    last = _summaries(out)[-1]
    assert math.isfinite(last["rewards/tiny-rm/mean"]) and last["rewards/tiny-rm/std"] > 0
    expected = 0.5 * last["rewards/tiny-rm/mean"] + last["rewards/letters/mean"]
    assert last["reward/mean"] == pytest.approx(expected, abs=1e-5)


def test_each_prompt_runs_once_with_the_same_logprobs_gradients_and_samples(tiny_model_dir):
    """A group's prompt runs once (its KV cache repeated over the group): the log-probs, entropies and
    gradients are the whole rows' up to float rounding, and greedy generation from the shared
    prefill samples what generation from the whole prompts does."""
    from transformers import AutoModelForCausalLM

    from rlkit.tools.generation import left_pad
    from rlkit.training.logprobs import cache_keyword, prompt_cached_logprobs, response_logprobs, shared_prefix

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.train()
    prompts = [[0, 5, 6, 7, 8], [0, 9, 10], [0, 11, 12, 13, 14, 15]]
    rows = [p for p in prompts for _ in range(3)]
    query, query_mask = left_pad(rows, 2)
    # a column of padding no row uses, as a rollout padded to a longer prompt elsewhere has
    query = torch.cat([torch.full((len(rows), 1), 2), query], 1)
    query_mask = torch.cat([torch.zeros(len(rows), 1, dtype=torch.long), query_mask], 1)
    responses = torch.randint(3, 500, (len(rows), 6), generator=torch.Generator().manual_seed(0))
    ids, mask = torch.cat([query, responses], 1), torch.cat([query_mask, torch.ones_like(responses)], 1)
    params = [p for p in model.parameters()]

    whole, whole_entropy, _ = response_logprobs(model, ids, mask, responses, 0.7)
    whole_grads = torch.autograd.grad(whole.sum(), params)
    once, once_entropy, _ = prompt_cached_logprobs(model, ids, mask, responses, 0.7)
    once_grads = torch.autograd.grad(once.sum(), params)
    assert torch.allclose(whole, once, atol=1e-5) and torch.allclose(whole_entropy, once_entropy, atol=1e-4)
    for a, b in zip(whole_grads, once_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        plain = model.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=8, do_sample=False)
        cache, ids2, mask2, _ = shared_prefix(model, query, query_mask)
        assert cache.get_seq_length() == ids2.shape[1] - 1 and ids2.shape[1] == query.shape[1] - 1
        shared = model.generate(
            input_ids=ids2, attention_mask=mask2, max_new_tokens=8, do_sample=False, **{cache_keyword(model): cache}
        )
    assert torch.equal(plain[:, query.shape[1] :], shared[:, ids2.shape[1] :])
    assert shared_prefix(model, query[::3], query_mask[::3]) is None  # no two rows share a prompt


def test_prompts_that_start_alike_run_their_common_start_once_then_each_prompt_once(tiny_model_dir, monkeypatch):
    """Groups whose distinct prompts share a system prompt (the calculator's tool schemas): that start
    runs once, batch 1, then each distinct prompt's rest on top of it, then the rows; the log-probs,
    entropies and gradients are the whole rows' up to float32 rounding (conftest's
    `assert_same_up_to_fp32` says why), and greedy generation from the shared prefill samples what
    generation from the whole prompts does."""
    from transformers import AutoModelForCausalLM

    from rlkit.tools.generation import left_pad
    from rlkit.training import logprobs
    from rlkit.training.logprobs import cache_keyword, prompt_cached_logprobs, response_logprobs, shared_prefix

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).train()
    system = torch.randint(3, 500, (logprobs.PREFIX_MIN_TOKENS + 3,), generator=torch.Generator().manual_seed(1))
    prompts = [system.tolist() + rest for rest in ([5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16])]
    rows = [p for p in prompts for _ in range(3)]
    query, query_mask = left_pad(rows, 2)
    responses = torch.randint(3, 500, (len(rows), 6), generator=torch.Generator().manual_seed(0))
    ids, mask = torch.cat([query, responses], 1), torch.cat([query_mask, torch.ones_like(responses)], 1)
    params = list(model.parameters())
    calls = []
    real = logprobs._common_prefix_cache
    monkeypatch.setattr(logprobs, "_common_prefix_cache", lambda *a: calls.append(1) or real(*a))

    once, once_entropy, _ = prompt_cached_logprobs(model, ids, mask, responses, 0.7)
    once_grads = torch.autograd.grad(once.sum(), params)
    assert len(calls) == 1
    whole, whole_entropy, _ = response_logprobs(model, ids, mask, responses, 0.7)
    whole_grads = torch.autograd.grad(whole.sum(), params)
    for got, expected in zip([once, once_entropy, *once_grads], [whole, whole_entropy, *whole_grads], strict=True):
        assert_same_up_to_fp32(got, expected)

    model.eval()
    with torch.no_grad():
        plain = model.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=8, do_sample=False)
        cache, ids2, mask2, _ = shared_prefix(model, query, query_mask)
        assert len(calls) == 2 and cache.get_seq_length() == ids2.shape[1] - 1
        shared = model.generate(
            input_ids=ids2, attention_mask=mask2, max_new_tokens=8, do_sample=False, **{cache_keyword(model): cache}
        )
    assert torch.equal(plain[:, query.shape[1] :], shared[:, ids2.shape[1] :])
