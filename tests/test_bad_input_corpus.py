"""A corpus of bad input across every command, each held to the promise of SPEC.md.

Each case is a command line, the files it needs and the substrings its one `error:` line must
hold. Every case must: exit with its code (2: bad input), print exactly one `error:` line and
no traceback, print nothing on stdout, leave OUT absent (with no OUT.partial or OUT.lock), and
leave every file that existed before byte-for-byte as it was.

The cases run in process (typer's CliRunner on `rlkit.cli.app`): validation happens before any
model is loaded, so most take milliseconds; the ones about damaged model dirs load tiny ones.
The fault cases at the end need processes: a run holding OUT while a second one starts, and a
run killed while it holds OUT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, build_model, write_jsonl
from typer.testing import CliRunner

from rlkit.cli import app
from rlkit.output import release_output_locks

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PAIRS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."} for i in range(8)]
SFT = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(8)]
UNPAIRED = [
    {"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}.", "label": i % 2 == 0} for i in range(8)
]


@dataclass
class Case:
    args: list[str]  # {model}, {rm}, {root}... are filled in from the corpus fixture
    expect: list[str]  # substrings of the one error line
    code: int = 2
    stdin: bytes | None = None
    output: str | None = "{root}/out"  # the OUT this run must not leave behind
    files: dict[str, bytes] = field(default_factory=dict)  # extra files to create, relative to root


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _messages(*turns: dict) -> bytes:
    return _jsonl([{"messages": list(turns)}] * 4)


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
LATIN1 = b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n'
OUT = ["-o", "{root}/out"]
SFT_ARGS = ["sft", "{model}", "{root}/sft.jsonl", *OUT, "--max-steps", "1"]
RM_ARGS = ["train-rm", "{model}", "{root}/pairs.jsonl", *OUT, "--max-steps", "1"]
DPO_ARGS = ["dpo", "{model}", "{root}/pairs.jsonl", *OUT, "--max-steps", "1"]
KTO_ARGS = ["kto", "{model}", "{root}/unpaired.jsonl", *OUT, "--max-steps", "1"]
GRPO_ARGS = ["grpo", "{model}", "{root}/prompts.jsonl", "--reward", "{rm}", *OUT, "--max-steps", "1"]
PPO_ARGS = ["ppo", "{model}", "{root}/prompts.jsonl", "--reward", "{rm}", *OUT, "--max-steps", "1"]
PACK_ARGS = ["pack", "{root}/sft.jsonl", "--tokenizer", "{model}", *OUT]
MERGE_ARGS = ["merge-lora", "{adapter}", *OUT]
CHAT_ARGS = ["chat", "{model}"]
EVAL_ARGS = ["eval", "{model}", "--data", "{root}/sft.jsonl"]


def yaml_case(args: list[str], text: str, expect: list[str]) -> Case:
    return Case([*args, "--config", "{root}/c.yaml"], ["{root}/c.yaml", *expect], files={"c.yaml": text.encode()})


CASES: dict[str, Case] = {
    # --- pack
    "pack_max_length_negative": Case([*PACK_ARGS, "--max-length", "-5"], ["--max-length -5", ">= 2"]),
    "pack_eval_fraction_one": Case([*PACK_ARGS, "--eval-fraction", "1.5"], ["--eval-fraction 1.5", "in [0, 1)"]),
    "pack_yaml_kind": yaml_case(PACK_ARGS, "kind: everything\n", ["kind = 'everything'", "auto, sft, pairs, unpaired"]),
    "pack_not_utf8": Case(
        ["pack", "{root}/latin1.jsonl", "--tokenizer", "{model}", *OUT],
        ["{root}/latin1.jsonl:2:", "not UTF-8", "0xe9"],
        files={"latin1.jsonl": LATIN1},
    ),
    "pack_unknown_role": Case(
        ["pack", "{root}/m.jsonl", "--tokenizer", "{model}", *OUT],
        ["{root}/m.jsonl record 1", 'role "wizard"', "system, user, assistant"],
        files={"m.jsonl": _messages(U, {"role": "wizard", "content": "abracadabra"})},
    ),
    "pack_null_content": Case(
        ["pack", "{root}/m.jsonl", "--tokenizer", "{model}", *OUT],
        ["{root}/m.jsonl record 1", "message 2 (assistant) has no content"],
        files={"m.jsonl": _messages(U, {"role": "assistant", "content": None})},
    ),
    "pack_text_not_a_string": Case(
        ["pack", "{root}/t.jsonl", "--tokenizer", "{model}", *OUT],
        ["{root}/t.jsonl record 1", "'text' must be a string", "got 5"],
        files={"t.jsonl": _jsonl([{"text": 5}, {"text": 6}])},
    ),
    "pack_margin_not_a_number": Case(
        ["pack", "{root}/margin.jsonl", "--tokenizer", "{model}", *OUT],
        ["{root}/margin.jsonl record 1", "'margin' must be a finite number", '"big"'],
        files={"margin.jsonl": _jsonl([{**p, "margin": "big"} for p in PAIRS])},
    ),
    "pack_output_is_a_file": Case(
        ["pack", "{root}/sft.jsonl", "--tokenizer", "{model}", "-o", "{root}/sft.jsonl"],
        ["{root}/sft.jsonl", "is a file, not a directory"],
        output=None,
    ),
    "pack_output_under_a_file": Case(
        ["pack", "{root}/sft.jsonl", "--tokenizer", "{model}", "-o", "{root}/sft.jsonl/out"],
        ["{root}/sft.jsonl is a file", "no directory can be created under it"],
        output="{root}/sft.jsonl/out",
    ),
    "pack_output_cannot_be_created": Case(
        ["pack", "{root}/sft.jsonl", "--tokenizer", "{model}", "-o", "/proc/rlkit-corpus/out"],
        ["/proc/rlkit-corpus/out", "cannot be created"],
        output="/proc/rlkit-corpus/out",
    ),
    "pack_damaged_tokenizer": Case(
        ["pack", "{root}/sft.jsonl", "--tokenizer", "{bad_tokenizer}", *OUT],
        ["{bad_tokenizer}", "truncated or damaged"],
    ),
    # --- sft
    "sft_batch_size_zero": Case([*SFT_ARGS, "--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    "sft_grad_accum_zero": Case([*SFT_ARGS, "--grad-accum", "0"], ["--grad-accum 0", ">= 1"]),
    "sft_lr_nan": Case([*SFT_ARGS, "--lr", "nan"], ["--lr nan", "finite"]),
    "sft_lr_negative": Case([*SFT_ARGS, "--lr", "-0.001"], ["--lr -0.001", ">= 0"]),
    "sft_max_steps_negative": Case([*SFT_ARGS[:-2], "--max-steps", "-3"], ["--max-steps -3", ">= 1"]),
    "sft_max_length_negative": Case([*SFT_ARGS, "--max-length", "-5"], ["--max-length -5", ">= 2"]),
    "sft_flag_scheduler_choice": Case(
        [*SFT_ARGS, "--scheduler", "bogus"], ["--scheduler", "'bogus' is not one of", "see rlkit sft --help"]
    ),
    "dpo_flag_beta_not_a_number": Case(
        [*DPO_ARGS, "--beta", "abc"], ["--beta", "valid number", "see rlkit dpo --help"]
    ),
    "kto_unknown_flag": Case([*KTO_ARGS, "--bogus"], ["No such option: --bogus", "see rlkit kto --help"]),
    "unknown_command": Case(["sfft", "{model}"], ["No such command 'sfft'", "Did you mean 'sft'"], output=None),
    "sft_yaml_precision": yaml_case(SFT_ARGS, "precision: fp99\n", ["precision = 'fp99'", "auto, bf16, fp16, fp32"]),
    "sft_yaml_scheduler": yaml_case(
        SFT_ARGS, "scheduler: exponential-ish\n", ["scheduler = 'exponential-ish'", "(--scheduler)", "linear"]
    ),
    "sft_yaml_bool_as_int": yaml_case(SFT_ARGS, "epochs: true\n", ["epochs", "cannot read True as int"]),
    "sft_yaml_not_utf8": Case(
        [*SFT_ARGS, "--config", "{root}/c.yaml"],
        ["{root}/c.yaml:2:", "not UTF-8"],
        files={"c.yaml": b"lr: 0.1\n# \xff\n"},
    ),
    "sft_truncated_weights": Case(
        ["sft", "{truncated}", "{root}/sft.jsonl", *OUT, "--max-steps", "1"],
        ["{truncated}", "truncated or damaged", "SafetensorError"],
    ),
    "sft_corrupt_adapter_config": Case(
        ["sft", "{bad_adapter}", "{root}/sft.jsonl", *OUT, "--max-steps", "1"],
        ["{bad_adapter}/adapter_config.json:1:", "not valid JSON"],
    ),
    "sft_reward_model_as_policy": Case(
        ["sft", "{rm}", "{root}/sft.jsonl", *OUT, "--max-steps", "1"], ["{rm} is a reward model", "--reward"]
    ),
    "sft_output_is_a_file_with_overwrite": Case(
        ["sft", "{model}", "{root}/sft.jsonl", "-o", "{root}/sft.jsonl", "--overwrite", "--max-steps", "1"],
        ["is a file, not a directory", "--overwrite replaces only a directory"],
        output=None,
    ),
    "sft_damaged_pack_dir": Case(
        ["sft", "{model}", "{root}/packed", *OUT, "--max-steps", "1"],
        ["{root}/packed/rlkit_pack.json:1:", "not valid JSON", "re-run `rlkit pack`"],
        files={"packed/rlkit_pack.json": b'{"kind": "sft",'},
    ),
    "kto_damaged_pack_dir": Case(
        ["kto", "{model}", "{root}/packed", *OUT, "--max-steps", "1"],
        ["{root}/packed/rlkit_pack.json:1:", "not valid JSON"],
        files={"packed/rlkit_pack.json": b"["},
    ),
    "sft_unknown_lora_targets": Case(
        [*SFT_ARGS, "--lora-targets", "qq_proj"], ["--lora-targets qq_proj", "not found", "q_proj", "all-linear"]
    ),
    "sft_truncated_adapter_weights": Case(
        ["sft", "{cut_adapter}", "{root}/sft.jsonl", *OUT, "--max-steps", "1"],
        ["{cut_adapter}", "truncated or damaged"],
    ),
    "sft_content_parts_not_text": Case(
        ["sft", "{model}", "{root}/m.jsonl", *OUT, "--max-steps", "1"],
        ["{root}/m.jsonl record 1", "message 2's content must be a string"],
        files={"m.jsonl": _messages(U, {"role": "assistant", "content": [{"type": "image", "url": "x.png"}]})},
    ),
    # --- train-rm
    "rm_batch_size_zero": Case([*RM_ARGS, "--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    "rm_center_rewards_negative": Case([*RM_ARGS, "--center-rewards", "-1"], ["--center-rewards -1.0", ">= 0"]),
    "rm_unknown_role_in_chosen": Case(
        ["train-rm", "{model}", "{root}/p.jsonl", *OUT, "--max-steps", "1"],
        ["{root}/p.jsonl record 1", 'role "critic"'],
        files={
            "p.jsonl": _jsonl([{"prompt": "q", "chosen": [{"role": "critic", "content": "a"}], "rejected": "b"}] * 4)
        },
    ),
    "rm_truncated_weights": Case(
        ["train-rm", "{truncated}", "{root}/pairs.jsonl", *OUT, "--max-steps", "1"], ["{truncated}", "damaged"]
    ),
    # --- dpo
    "dpo_beta_zero": Case([*DPO_ARGS, "--beta", "0"], ["--beta 0.0", "> 0"]),
    "dpo_label_smoothing_half": Case([*DPO_ARGS, "--label-smoothing", "0.5"], ["--label-smoothing 0.5", "in [0, 0.5)"]),
    "dpo_yaml_sft_weight": yaml_case(DPO_ARGS, "sft_weight: -1\n", ["sft_weight = -1.0", "(--sft-weight)", ">= 0"]),
    "dpo_reward_model_as_ref": Case(
        [*DPO_ARGS, "--ref", "{rm}", "--no-precompute-ref"], ["{rm} is a reward model", "not a causal LM"]
    ),
    "dpo_not_utf8": Case(
        ["dpo", "{model}", "{root}/p.jsonl", *OUT, "--max-steps", "1"],
        ["{root}/p.jsonl:1:", "not UTF-8"],
        files={"p.jsonl": b'{"prompt": "\xe9", "chosen": "a", "rejected": "b"}\n'},
    ),
    "dpo_yaml_nan_beta": yaml_case(DPO_ARGS, "beta: .nan\n", ["beta = nan", "finite"]),
    # --- kto
    "kto_batch_size_one": Case([*KTO_ARGS, "--batch-size", "1"], ["--batch-size 1", "KTO needs at least 2"]),
    "kto_batch_size_zero": Case([*KTO_ARGS, "--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    "kto_desirable_weight_zero": Case([*KTO_ARGS, "--desirable-weight", "0"], ["--desirable-weight 0.0", "> 0"]),
    "kto_label_not_boolean": Case(
        ["kto", "{model}", "{root}/u.jsonl", *OUT, "--max-steps", "1"],
        ["{root}/u.jsonl record 1", "'label' must be true/false"],
        files={"u.jsonl": _jsonl([{"prompt": "q", "completion": "a", "label": "maybe"}] * 4)},
    ),
    "kto_output_under_a_file": Case(
        [*KTO_ARGS[:3], "-o", "{root}/unpaired.jsonl/out", "--max-steps", "1"],
        ["unpaired.jsonl is a file"],
        output="{root}/unpaired.jsonl/out",
    ),
    # --- ppo
    "ppo_temperature_negative": Case([*PPO_ARGS, "--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    "ppo_top_p_zero": Case([*PPO_ARGS, "--top-p", "0"], ["--top-p 0.0", "in (0, 1]"]),
    "ppo_gamma_above_one": Case([*PPO_ARGS, "--gamma", "2"], ["--gamma 2.0", "in [0, 1]"]),
    "ppo_yaml_kl_estimator": yaml_case(PPO_ARGS, "kl_estimator: k9\n", ["kl_estimator = 'k9'", "k1, k3"]),
    "ppo_reward_model_as_policy": Case(
        ["ppo", "{rm}", "{root}/prompts.jsonl", "--reward", "{rm}", *OUT, "--max-steps", "1"], ["is a reward model"]
    ),
    # --- grpo
    "grpo_num_generations_one": Case([*GRPO_ARGS, "--num-generations", "1"], ["--num-generations 1", ">= 2"]),
    "grpo_yaml_loss_type": yaml_case(GRPO_ARGS, "loss_type: ppo\n", ["loss_type = 'ppo'", "grpo, bnpo, dapo"]),
    "grpo_temperature_zero": Case([*GRPO_ARGS, "--temperature", "0"], ["--temperature 0.0", "> 0"]),
    # --- merge-lora
    "merge_yaml_dtype": yaml_case(MERGE_ARGS, "dtype: float8\n", ["dtype = 'float8'", "float32, bfloat16, float16"]),
    "merge_tolerance_negative": Case([*MERGE_ARGS, "--tolerance", "-1"], ["--tolerance -1.0", ">= 0"]),
    "merge_corrupt_adapter_config": Case(
        ["merge-lora", "{bad_adapter}", *OUT], ["{bad_adapter}", "adapter_config.json"]
    ),
    "merge_truncated_adapter_weights": Case(
        ["merge-lora", "{cut_adapter}", *OUT], ["{cut_adapter}", "truncated or damaged", "SafetensorError"]
    ),
    "merge_output_is_a_file": Case(
        ["merge-lora", "{adapter}", "-o", "{root}/sft.jsonl", "--overwrite"],
        ["is a file, not a directory"],
        output=None,
    ),
    # --- chat
    "chat_stdin_not_utf8": Case(CHAT_ARGS, ["stdin:2:", "not UTF-8", "0xe9"], stdin=b"hello\ncaf\xe9\n", output=None),
    "chat_stdin_unknown_role": Case(
        CHAT_ARGS,
        ["stdin line 1", 'role "wizard"'],
        stdin=json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode() + b"\n",
        output=None,
    ),
    "chat_stdin_content_not_text": Case(
        CHAT_ARGS,
        ["stdin line 1", "message 1's content must be a string"],
        stdin=json.dumps({"messages": [{"role": "user", "content": 5}]}).encode() + b"\n",
        output=None,
    ),
    "chat_max_new_tokens_zero": Case(
        [*CHAT_ARGS, "--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"], output=None
    ),
    "chat_top_p_above_one": Case([*CHAT_ARGS, "--top-p", "1.5"], ["--top-p 1.5", "in (0, 1]"], output=None),
    "chat_truncated_weights": Case(
        ["chat", "{truncated}"], ["{truncated}", "truncated or damaged"], stdin=b"hello\n", output=None
    ),
    "chat_reward_model": Case(["chat", "{rm}"], ["{rm} is a reward model"], stdin=b"hello\n", output=None),
    # --- eval
    "eval_batch_size_zero": Case([*EVAL_ARGS, "--batch-size", "0"], ["--batch-size 0", ">= 1"], output=None),
    "eval_temperature_negative": Case(
        ["eval", "{model}", "--prompts", "{root}/prompts.jsonl", "--reward", "{rm}", "--temperature", "-1"],
        ["--temperature -1.0", ">= 0"],
        output=None,
    ),
    "eval_yaml_top_p": yaml_case(EVAL_ARGS, "top_p: 0\n", ["top_p = 0.0", "in (0, 1]"]),
    "eval_data_not_utf8": Case(
        ["eval", "{model}", "--data", "{root}/latin1.jsonl"],
        ["{root}/latin1.jsonl:2:", "not UTF-8"],
        files={"latin1.jsonl": LATIN1},
        output=None,
    ),
    "eval_pairs_null_content": Case(
        ["eval", "{rm}", "--pairs", "{root}/p.jsonl"],
        ["{root}/p.jsonl record 1", "has no content"],
        files={"p.jsonl": _jsonl([{"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}] * 2)},
        output=None,
    ),
    "eval_output_dir_is_a_file": Case(
        [*EVAL_ARGS, "--output-dir", "{root}/sft.jsonl"], ["--output-dir", "is a file, not a directory"], output=None
    ),
    "eval_output_dir_under_a_file": Case(
        [*EVAL_ARGS, "--output-dir", "{root}/sft.jsonl/report"],
        ["sft.jsonl is a file"],
        output="{root}/sft.jsonl/report",
    ),
    "eval_completion_message_without_content": Case(
        ["eval", "--completions", "{root}/c.jsonl", "--reward", "{rm}"],
        ["{root}/c.jsonl record 1", "message 1 (assistant) has no content"],
        files={"c.jsonl": _jsonl([{"prompt": "q", "completion": [{"role": "assistant", "content": None}]}] * 2)},
        output=None,
    ),
    "eval_truncated_weights": Case(["eval", "{truncated}", "--data", "{root}/sft.jsonl"], ["damaged"], output=None),
}


# ---- fixtures: the files every case may name --------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> dict[str, str]:
    """Model dirs shared by all cases: a reward model, a truncated one, damaged adapter and tokenizer dirs."""
    import torch
    from transformers import LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("corpus-models")
    rm = root / "rm"
    config = build_model(len(tiny_tokenizer)).config
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(rm)
    tiny_tokenizer.save_pretrained(rm)
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad_adapter = root / "bad-adapter"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "' + str(tiny_model_dir) + '",')
    adapter = root / "adapter"  # well-formed enough for validation: merge-lora's option errors come first
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tiny_model_dir), "task_type": "CAUSAL_LM", "peft_type": "LORA"})
    )
    cut_adapter = root / "cut-adapter"  # a LoRA adapter whose weights file was cut short
    cut_adapter.mkdir()
    (cut_adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": str(tiny_model_dir),
                "task_type": "CAUSAL_LM",
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
            }
        )
    )
    (cut_adapter / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    bad_tokenizer = root / "bad-tokenizer"
    shutil.copytree(tiny_model_dir, bad_tokenizer)
    (bad_tokenizer / "tokenizer.json").write_text('{"version": ')
    return {
        "model": str(tiny_model_dir),
        "rm": str(rm),
        "truncated": str(truncated),
        "bad_adapter": str(bad_adapter),
        "adapter": str(adapter),
        "cut_adapter": str(cut_adapter),
        "bad_tokenizer": str(bad_tokenizer),
    }


def _fill(text: str, names: dict[str, str]) -> str:
    for key, value in names.items():
        text = text.replace("{" + key + "}", value)
    return text


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def invoke(args: list[str], stdin: bytes | None = None):
    try:
        return CliRunner().invoke(app, args, input=stdin)
    finally:
        release_output_locks()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_case(name, tmp_path, dirs):
    case = CASES[name]
    root = tmp_path / "case"
    root.mkdir()
    names = {**dirs, "root": str(root)}
    write_jsonl(root / "sft.jsonl", SFT)
    write_jsonl(root / "pairs.jsonl", PAIRS)
    write_jsonl(root / "unpaired.jsonl", UNPAIRED)
    write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in SFT])
    for rel, content in case.files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    before, models_before = _snapshot(root), {k: _snapshot(Path(v)) for k, v in dirs.items()}

    args = [_fill(a, names) for a in case.args]
    result = invoke(args, case.stdin)

    context = f"rlkit {' '.join(args)}\nexit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), context
    assert result.exit_code == case.code, context
    stderr = ANSI.sub("", result.stderr)
    assert "Traceback" not in stderr + result.stdout, context
    assert result.stdout == "", context
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, context
    for needle in case.expect:
        assert _fill(needle, names) in errors[0], f"{_fill(needle, names)!r} missing\n{context}"
    if case.output:
        out = Path(_fill(case.output, names))
        for path in (out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".lock")):
            assert not path.exists(), f"{path} left behind\n{context}"
    assert _snapshot(root) == before, context
    assert {k: _snapshot(Path(v)) for k, v in dirs.items()} == models_before, context


def test_the_corpus_covers_every_command_with_40_cases():
    commands = {case.args[0] for case in CASES.values()}
    every = {"pack", "sft", "train-rm", "dpo", "kto", "ppo", "grpo", "merge-lora", "chat", "eval"}
    assert commands - every == {"sfft"}  # the one case of a command that does not exist
    assert every <= commands
    assert len(CASES) >= 40


def test_identical_chosen_and_rejected_are_counted_and_warned_once(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS[:5] + [{**p, "rejected": p["chosen"]} for p in PAIRS[5:]])
    result = invoke(["pack", str(data), "--tokenizer", str(tiny_model_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in ANSI.sub("", result.stderr).splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 3 of 8 pairs"), result.stderr
    meta = json.loads((tmp_path / "out" / "rlkit_pack.json").read_text())
    assert meta["counts"]["identical"] == 3
    kto = invoke(
        ["pack", str(data), "--tokenizer", str(tiny_model_dir), "-o", str(tmp_path / "kto"), "--kind", "unpaired"]
    )
    assert kto.exit_code == 0, kto.stderr
    warnings = [line for line in ANSI.sub("", kto.stderr).splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "3 of 8 pairs" in warnings[0] and "both desirable and undesirable" in warnings[0]


# ---- faults: two runs on one OUT, and a run killed while it holds OUT ---------------------------


def _start_sft(model: str, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rlkit", "sft", model, str(data), "-o", str(out), "--batch-size", "1", *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(out: Path, run: subprocess.Popen, timeout: float = 120) -> None:
    lock = out.with_name(out.name + ".lock")
    deadline = time.monotonic() + timeout
    while not (lock.exists() and lock.read_text().strip() == str(run.pid)):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the run never took its lock"
        time.sleep(0.05)


def test_a_second_run_on_the_same_output_exits_2_and_the_first_finishes_whole(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT * 4)
    out = tmp_path / "out"
    first = _start_sft(str(tiny_model_dir), data, out, "--max-steps", "12", "--seed", "1")
    try:
        _wait_for_lock(out, first)
        second = invoke(["sft", str(tiny_model_dir), str(data), "-o", str(out), "--max-steps", "1", "--seed", "2"])
        assert first.poll() is None, "the first run ended before the second could meet its lock"
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert second.exit_code == 2, second.stderr
    [line] = [line for line in ANSI.sub("", second.stderr).splitlines() if line.strip()]
    assert line.startswith("error:") and "another run" in line and f"pid {first.pid}" in line
    assert first.returncode == 0, stderr
    assert stdout.strip() == str(out)
    config = (out / "rlkit_config.yaml").read_text()
    assert "seed: 1\n" in config  # every file of OUT is the first run's
    assert json.loads((out / "final_metrics.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out", "sft.jsonl"]  # no .partial, .lock, .old


def test_a_killed_runs_lock_is_taken_over(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT * 4)
    out = tmp_path / "out"
    killed = _start_sft(str(tiny_model_dir), data, out, "--max-steps", "500")
    try:
        _wait_for_lock(out, killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate()
    assert out.with_name("out.lock").exists()  # left behind by the kill, but no longer held
    result = invoke(["pack", str(data), "--tokenizer", str(tiny_model_dir), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.stderr
    assert f"pid {killed.pid}" in ANSI.sub("", result.stderr) and "taking it over" in result.stderr
    assert (out / "rlkit_pack.json").is_file() and not out.with_name("out.lock").exists()
