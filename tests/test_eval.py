"""eval: on models and rewards whose answers are computed here independently, every metric matches."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_DATA, run_cli, write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from rlkit.data.pairs import tokenize_pairs
from rlkit.data.prompts import encode_prompt
from rlkit.data.templates import resolve_template
from rlkit.errors import InputError
from rlkit.evaluation.config import EvalConfig, question
from rlkit.evaluation.generation import win_rate
from rlkit.evaluation.run import run_eval
from rlkit.tools.generation import SamplingConfig, generate_rollouts

REWARD_MODULE = '''
def reward(prompts, completions):
    """Words in the completion, plus 0.5 when the prompt asks a question."""
    return [float(len(c.split())) + (0.5 if "?" in p else 0.0) for p, c in zip(prompts, completions)]

def chat_reward(prompts, completions):
    """The same on conversational prompts, which come as message lists (as TRL passes them)."""
    return reward([p[-1]["content"] for p in prompts], [c[0]["content"] for c in completions])
'''


def hand_reward(prompt: str, completion: str) -> float:
    return float(len(completion.split())) + (0.5 if "?" in prompt else 0.0)


def _eval(capsys, **options) -> dict:
    run_eval(EvalConfig(**options))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # ONE JSON object on stdout
    return json.loads(lines[0])


def _pairs(n: int = 6) -> list[dict]:
    records = [json.loads(line) for line in (DEMO_DATA / "pairs_eval.jsonl").read_text().splitlines()[:n]]
    tie = {"prompt": records[0]["prompt"], "chosen": records[0]["chosen"], "rejected": records[0]["chosen"]}
    swapped = {"prompt": records[1]["prompt"], "chosen": records[1]["rejected"], "rejected": records[1]["chosen"]}
    return records + [tie, swapped]


def _expected(chosen: list[float], rejected: list[float]) -> dict:
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "pairs": len(chosen),
        "accuracy": statistics.fmean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins),
        "margin_mean": statistics.fmean(margins),
        "margin_median": statistics.median(margins),
        "chosen_mean": statistics.fmean(chosen),
        "rejected_mean": statistics.fmean(rejected),
    }


def _assert_metrics(got: dict, expected: dict, tol: float = 1e-4) -> None:
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=tol), key


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores spread well apart
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    path = tmp_path_factory.mktemp("policy-adapter")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _summed_logps(model, ids: list[int], labels: list[int]) -> float:
    """Σ log p(label_t | ids_<t) over labelled positions, from plain full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logps = F.log_softmax(logits[:-1], dim=-1)
    return sum(float(logps[t - 1, label]) for t, label in enumerate(labels) if t > 0 and label != -100)


def test_reward_model_accuracy_equals_scores_of_each_sequence_alone(tmp_path, capsys, reward_model_dir, tiny_tokenizer):
    records = _pairs()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    got = _eval(capsys, model=str(reward_model_dir), pairs=str(pairs), batch_size=3)
    rows, _ = tokenize_pairs(records, tiny_tokenizer, resolve_template(None, tiny_tokenizer), 1024)
    rm = LlamaForSequenceClassification.from_pretrained(reward_model_dir).eval()
    with torch.no_grad():

        def score(r, side):
            return float(rm(input_ids=torch.tensor([r["prompt_input_ids"] + r[f"{side}_input_ids"]])).logits[0, 0])

        chosen, rejected = [score(r, "chosen") for r in rows], [score(r, "rejected") for r in rows]
    assert chosen[-2] == rejected[-2]  # the tie counts 1/2
    assert got["question"] == "reward_model_accuracy"
    _assert_metrics(got, _expected(chosen, rejected))


def test_implicit_reward_of_an_adapter_against_its_base(tmp_path, capsys, adapter_dir, tiny_model_dir, tiny_tokenizer):
    records = _pairs()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    beta = 0.5
    got = _eval(capsys, model=str(adapter_dir), pairs=str(pairs), beta=beta, batch_size=4)
    rows, _ = tokenize_pairs(records, tiny_tokenizer, resolve_template(None, tiny_tokenizer), 1024)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    rewards = {}
    for side in ("chosen", "rejected"):
        rewards[side] = []
        for r in rows:
            ids = r["prompt_input_ids"] + r[f"{side}_input_ids"]
            labels = [-100] * len(r["prompt_input_ids"]) + r[f"{side}_labels"]
            rewards[side].append(beta * (_summed_logps(policy, ids, labels) - _summed_logps(base, ids, labels)))
    assert got["question"] == "implicit_reward_accuracy" and "adapter disabled" in got["ref"]
    _assert_metrics(got, _expected(rewards["chosen"], rewards["rejected"]))
    assert 0 < got["accuracy"] < 1


def test_generation_against_itself_wins_half_and_has_zero_kl(tmp_path, capsys, monkeypatch, tiny_model_dir):
    (tmp_path / "wordreward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "What is 2 + 2?"}, {"prompt": "Say hi"}, {"prompt": "Why?"}]
    )
    got = _eval(
        capsys,
        model=str(tiny_model_dir),
        prompts=str(prompts),
        reward="wordreward:reward",
        baseline=str(tiny_model_dir),
        ref=str(tiny_model_dir),
        max_new_tokens=6,
        output_dir=str(tmp_path / "report"),
    )
    assert got["win_rate"] == 0.5  # the same greedy completions: every prompt a tie
    # the policy's log-probs come from generation's cached logits, the reference's from one forward
    assert got["kl_mean"] == pytest.approx(0.0, abs=1e-5)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    examples = report["examples"]
    prompt_texts = ["What is 2 + 2?", "Say hi", "Why?"]
    scores = [hand_reward(p, e["completion"]) for p, e in zip(prompt_texts, examples)]
    assert [e["score"] for e in examples] == scores
    _assert_metrics(
        got,
        {
            "score_mean": statistics.fmean(scores),
            "score_median": statistics.median(scores),
            "baseline_score_mean": statistics.fmean(scores),
        },
    )
    assert got["mean_length_tokens"] == statistics.fmean(e["length_tokens"] for e in examples)
    assert all(1 <= e["length_tokens"] <= 6 for e in examples)
    assert (tmp_path / "report" / "scores.png").stat().st_size > 0


def test_generation_kl_of_an_adapter_equals_the_hand_computed_sum(
    tmp_path, capsys, monkeypatch, adapter_dir, tiny_model_dir, tiny_tokenizer
):
    (tmp_path / "wordreward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    conversations = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Name a colour."}]]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": c} for c in conversations])
    got = _eval(capsys, model=str(adapter_dir), prompts=str(prompts), reward="wordreward:chat_reward", max_new_tokens=5)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    template = resolve_template(None, tiny_tokenizer)
    rollouts = generate_rollouts(policy, tiny_tokenizer, template, conversations, SamplingConfig(max_new_tokens=5))
    kls = []
    for rollout, conversation in zip(rollouts, conversations):
        assert rollout.prompt_ids == encode_prompt(tiny_tokenizer, template, conversation)
        ids = rollout.prompt_ids + rollout.completion_ids
        labels = [-100] * len(rollout.prompt_ids) + rollout.completion_ids
        kls.append(_summed_logps(policy, ids, labels) - _summed_logps(base, ids, labels))
    assert got["kl_mean"] == pytest.approx(statistics.fmean(kls), abs=1e-4)
    assert abs(got["kl_mean"]) > 1e-3
    assert got["score_mean"] == pytest.approx(
        statistics.fmean(hand_reward(c[0]["content"], r.text) for c, r in zip(conversations, rollouts))
    )


def test_no_kl_leaves_the_kl_out_and_the_answers_as_they_were(tmp_path, capsys, monkeypatch, adapter_dir):
    (tmp_path / "wordreward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2 + 2?"}, {"prompt": "Name a colour."}])
    options = {"model": str(adapter_dir), "prompts": str(prompts), "reward": "wordreward:reward", "max_new_tokens": 5}
    with_kl = _eval(capsys, **options)
    without = _eval(capsys, **options, kl=False)
    assert "kl_mean" in with_kl and "kl_mean" not in without and "ref" not in without
    assert {k: v for k, v in with_kl.items() if not k.startswith("kl_") and k != "ref"} == without


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_generation_logps_are_the_summed_log_probs_of_a_forward(tiny_model_dir, tiny_tokenizer, temperature):
    """The log-probs eval's KL takes from generation's own logits (left-padded, batched, rows
    ending early) equal a plain forward over prompt + completion, at temperature 1 whatever the
    sampling temperature."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    template = resolve_template(None, tiny_tokenizer)
    conversations = [
        [{"role": "user", "content": text}]
        for text in ["What is 2 + 2?", "Name a colour, any colour you like best.", "Why?"]
    ]
    sampling = SamplingConfig(max_new_tokens=7, temperature=temperature, batch_size=3)
    rollouts = generate_rollouts(model, tiny_tokenizer, template, conversations, sampling, seed=0, with_logps=True)
    assert len({len(r.prompt_ids) for r in rollouts}) > 1  # left padding is exercised
    for rollout in rollouts:
        ids = rollout.prompt_ids + rollout.completion_ids
        labels = [-100] * len(rollout.prompt_ids) + rollout.completion_ids
        assert rollout.logp == pytest.approx(_summed_logps(model, ids, labels), abs=1e-4)
    assert all(r.logp is None for r in generate_rollouts(model, tiny_tokenizer, template, conversations, sampling))


@pytest.mark.process_boundary
def test_scoring_completions_from_the_cli(tmp_path):
    (tmp_path / "wordreward.py").write_text(REWARD_MODULE)
    records = [
        {"prompt": "What is 2 + 2?", "completion": "The answer is 4. #done"},
        {"prompt": "Say hi", "completion": "hi"},
        {"prompt": "Why?", "completion": "Because it is."},
        {"prompt": "Tell me a fact", "completion": ""},
    ]
    completions = write_jsonl(tmp_path / "out.jsonl", records)
    result = run_cli(
        "eval",
        "--completions",
        str(completions),
        "--reward",
        "wordreward:reward",
        "--output-dir",
        str(tmp_path / "rep"),
        env={"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    scores = [5.5, 1.0, 3.5, 0.0]
    assert got["completions"] == 4
    assert got["score_mean"] == pytest.approx(2.5)
    assert got["score_median"] == pytest.approx(2.25)
    assert got["score_std"] == pytest.approx(statistics.pstdev(scores))
    assert got["mean_length_chars"] == pytest.approx(statistics.fmean(len(r["completion"]) for r in records))
    assert "score_mean" in result.stderr  # the table, for people
    assert [e["score"] for e in json.loads((tmp_path / "rep" / "report.json").read_text())["examples"]] == scores


def test_completions_scored_by_a_reward_model_match_its_pair_scores(tmp_path, capsys, reward_model_dir):
    """The same text scores the same whether it is a pair's side or a completion."""
    record = _pairs(2)[0]
    pair = _eval(capsys, model=str(reward_model_dir), pairs=str(write_jsonl(tmp_path / "p.jsonl", [record])))
    completions = write_jsonl(tmp_path / "c.jsonl", [{"prompt": record["prompt"], "completion": record["chosen"]}])
    scored = _eval(capsys, completions=str(completions), reward=str(reward_model_dir))
    assert scored["score_mean"] == pytest.approx(pair["chosen_mean"], abs=1e-5)


def test_sft_loss_and_perplexity_equal_the_hf_loss(tmp_path, capsys, tiny_model_dir, tiny_tokenizer):
    texts = ["The answer is 4. #done", "Paris is the capital of France, and it is big."]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    got = _eval(capsys, model=str(tiny_model_dir), data=str(data))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tiny_tokenizer(text + tiny_tokenizer.eos_token).input_ids])
            assert ids[0, 0] == tiny_tokenizer.bos_token_id
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert got["tokens"] == tokens and got["examples"] == 2
    assert got["loss"] == pytest.approx(total / tokens, abs=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, -1.0]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"model": "m"}, "choose exactly one"),
        ({"model": "m", "pairs": "p", "data": "d"}, "choose exactly one"),
        ({"model": "m", "completions": "c", "reward": "r"}, "takes no MODEL"),
        ({"pairs": "p"}, "evaluates a MODEL"),
        ({"model": "m", "prompts": "p"}, "needs --reward"),
        ({"model": "m", "data": "d", "reward": "r"}, "--reward scores"),
        ({"model": "m", "pairs": "p", "baseline": "b"}, "--baseline"),
        ({"model": "m", "data": "d", "ref": "r"}, "--ref"),
        ({"model": "m", "pairs": "p", "beta": 0.0}, "--beta"),
        ({"model": "m", "pairs": "p", "kl": False}, "--no-kl"),
        ({"model": "m", "prompts": "p", "reward": "r", "ref": "r", "kl": False}, "--no-kl turns off"),
    ],
)
def test_wrong_combinations_are_usage_errors(options, message):
    with pytest.raises(InputError, match=message):
        question(EvalConfig(**options))


def test_a_full_policy_without_ref_is_a_usage_error(tmp_path, tiny_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pairs(2))
    with pytest.raises(InputError, match="pass --ref REF") as err:
        run_eval(EvalConfig(model=str(tiny_model_dir), pairs=str(pairs)))
    assert err.value.exit_code == 2


def test_a_gguf_base_is_named_by_its_file(tmp_path):
    """The eval report names a .gguf base as the file the user passed, not its folder."""
    from rlkit.models.load import resolve_source

    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).weights == str(gguf)
    assert resolve_source("org/name").weights == "org/name"
