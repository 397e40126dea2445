"""The one reward scorer: train-rm's tokens and scores, the same in ppo and eval; the one loader's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlkit.data.pairs import collate_pairs, tokenize_pairs
from rlkit.data.templates import resolve_template
from rlkit.errors import InputError
from rlkit.evaluation.rewards import load_eval_scorer as eval_reward
from rlkit.scoring import (
    FunctionReward,
    ModelReward,
    RewardBatch,
    RewardScorer,
    load_reward,
    load_sequence_classifier,
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "Which continent?"},
        {"role": "user", "content": "Africa."},
    ],
    [{"role": "user", "content": "Say nothing."}],
]
COMPLETIONS = ["4 #done", "The Nile, a very long river. #done", ""]


def joined(prompts: list[str], completions: list[str]) -> list[float]:
    """A function reward that sees the prompt string: its length, plus the completion's."""
    return [float(len(p) + 10 * len(c)) for p, c in zip(prompts, completions)]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> Path:
    """A one-score classifier on the tiny trunk with a head that spreads scores apart, saved as train-rm does."""
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id
    )
    torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("scoring-rm")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _train_rm_pairs(tokenizer, template, completions: list[str]) -> dict:
    """The batch train-rm's collate builds for pairs whose chosen replies are `completions`."""
    records = [{"prompt": m, "chosen": c, "rejected": "no"} for m, c in zip(CONVERSATIONS, completions)]
    rows, stats = tokenize_pairs(records, tokenizer, template, 4096)
    assert stats.pairs == len(records)
    return collate_pairs(rows, tokenizer.pad_token_id)


def test_scorer_tokens_are_the_chosen_sequence_train_rm_builds(rm_dir, tiny_tokenizer):
    reward = load_reward(str(rm_dir), tiny_tokenizer, resolve_template(None, tiny_tokenizer))
    assert isinstance(reward, ModelReward)
    batch = _train_rm_pairs(tiny_tokenizer, resolve_template(None, tiny_tokenizer), COMPLETIONS)
    got = reward.tokenize(CONVERSATIONS, COMPLETIONS)
    for k, ids in enumerate(got):
        assert ids == batch["input_ids"][batch["seq_index"] == k].tolist()  # sequence k is pair k's chosen
        assert ids[-1] == tiny_tokenizer.eos_token_id
    assert reward.encode(CONVERSATIONS[1], COMPLETIONS[1]) == got[1]


def test_ppo_and_eval_score_completions_identically_and_as_train_rm_does(rm_dir, tiny_tokenizer):
    template = resolve_template(None, tiny_tokenizer)
    ppo = load_reward(str(rm_dir), tiny_tokenizer, template, batch_size=2)  # as run_ppo loads it
    ppo_scores = ppo(CONVERSATIONS, COMPLETIONS)
    for policy in (None, (tiny_tokenizer, template)):  # --completions, --prompts
        scorer = eval_reward(str(rm_dir), None, 4096, 2, torch.float32, policy=policy)
        eval_scores = scorer(RewardBatch(CONVERSATIONS, COMPLETIONS))
        assert eval_scores == ppo_scores.tolist()  # the same code: bit for bit at the same batch size
    # train-rm's scorer on its own padding-free pair batch, and the HF head on each sequence alone
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    batch = _train_rm_pairs(tiny_tokenizer, template, COMPLETIONS)
    with torch.no_grad():
        train_rm = RewardScorer(model, tiny_tokenizer.pad_token_id)(
            batch["input_ids"], batch["position_ids"], batch["seq_index"], 2 * len(COMPLETIONS)
        )[: len(COMPLETIONS)]
        alone = [model(input_ids=torch.tensor([ids])).logits[0, 0] for ids in ppo.tokenize(CONVERSATIONS, COMPLETIONS)]
    assert torch.allclose(ppo_scores, train_rm, atol=1e-5)
    assert torch.allclose(ppo_scores, torch.stack(alone), atol=1e-5)


def test_function_rewards_see_the_same_prompt_strings_in_ppo_and_eval(tiny_tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    template = resolve_template(None, tiny_tokenizer)
    ppo = load_reward("test_scoring:joined", tiny_tokenizer, template)
    assert isinstance(ppo, FunctionReward)
    in_eval = eval_reward("test_scoring:joined", None, 4096, 3, torch.float32, policy=(tiny_tokenizer, template))
    assert in_eval(RewardBatch(CONVERSATIONS, COMPLETIONS)) == ppo(CONVERSATIONS, COMPLETIONS)
    assert ppo(CONVERSATIONS[:1], ["ab"]) == [len("What is 2 + 2?") + 20.0]  # one message: its content


def test_a_seq_cls_adapter_loads_merged_and_scores_as_peft_does(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(2)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id
    )
    adapter = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", init_lora_weights=False)
    )
    adapter.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    adapter.save_pretrained(tmp_path / "adapter")
    model, tokenizer = load_sequence_classifier(str(tmp_path / "adapter"))
    assert not isinstance(model, PeftModel) and model.config.num_labels == 1
    ids = torch.tensor([ModelReward(model, tokenizer, resolve_template(None, tokenizer)).encode(CONVERSATIONS[0], "4")])
    with torch.no_grad():
        expected = adapter.eval()(input_ids=ids).logits[0, 0]
        assert torch.allclose(model(input_ids=ids).logits[0, 0], expected, atol=1e-5)


def test_the_loader_refuses_what_is_not_a_one_score_reward_model(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with pytest.raises(InputError, match=r"--reward .*: not a reward model \(no \*ForSequenceClassification"):
        load_sequence_classifier(str(tiny_model_dir))
    causal = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, task_type="CAUSAL_LM")
    )
    causal.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    causal.save_pretrained(tmp_path / "sft")
    with pytest.raises(InputError, match="a LoRA adapter of task 'CAUSAL_LM', not a reward model"):
        load_sequence_classifier(str(tmp_path / "sft"))
    two = tmp_path / "two-labels"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).save_pretrained(two)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            (two / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(InputError, match="has 2 labels; a reward model has one score"):
        load_sequence_classifier(str(two))
    with pytest.raises(InputError, match="expected a reward model dir or module:function"):
        load_reward("no-such-thing")
    assert json.loads((two / "config.json").read_text())["architectures"][0].endswith("ForSequenceClassification")
