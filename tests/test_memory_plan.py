"""`--dry-run`: the memory plan of every training command, read from a config without weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DEMO_DATA, REPO, build_model, run_cli

from rlkit.config import resolve_config
from rlkit.recipes.dpo_config import DPOConfig
from rlkit.recipes.grpo_config import GRPOConfig
from rlkit.recipes.kto_config import KTOConfig
from rlkit.recipes.ppo_config import PPOConfig
from rlkit.recipes.reward_model_config import RewardModelConfig
from rlkit.recipes.sft_config import SFTConfig
from rlkit.training.memory_plan import make_plan, read_shape

MIB = 2**20


def plan(command, cls, **values):
    return make_plan(command, resolve_config(cls, values, None))


def rows(p):
    """The plan's models by name (the CPU's fixed working memory left out)."""
    return {r.what.split(" (")[0]: r for r in p.rows if r.what != "torch on a CPU"}


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    done = run_cli("sft", str(tiny_model_dir), str(DEMO_DATA / "sft.jsonl"), "-o", str(out), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # no OUT to print
    for word in ("weights", "gradients", "optimizer", "activations", "total", "policy"):
        assert word in done.stderr
    assert not list(tmp_path.iterdir())  # no OUT, no OUT.partial, no lock


def test_dry_run_still_refuses_bad_options(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rlkit.cli import app

    runner = CliRunner()
    data = str(DEMO_DATA / "sft.jsonl")
    bad = runner.invoke(app, ["sft", str(tiny_model_dir), data, "--dry-run", "--lr", "-1"])
    assert bad.exit_code == 2 and "--lr" in bad.output
    # a recipe's own check runs before the plan too: ppo without --reward
    prompts = str(DEMO_DATA / "prompts.jsonl")
    no_reward = runner.invoke(app, ["ppo", str(tiny_model_dir), prompts, "--dry-run"])
    assert no_reward.exit_code == 2 and "--reward" in no_reward.output
    missing = runner.invoke(app, ["sft", str(tmp_path / "nope"), data, "--dry-run"])
    assert missing.exit_code == 2
    fine = runner.invoke(app, ["grpo", str(tiny_model_dir), prompts, "--reward", "rlkit.demo.task:reward", "--dry-run"])
    assert fine.exit_code == 0, fine.output
    assert "reference: none (--beta 0)" in fine.output
    assert not list(tmp_path.iterdir())


def test_shape_counts_what_the_loaded_model_has(tiny_model_dir):
    from rlkit.models.load import add_lora, load_causal_lm, resolve_source

    shape = read_shape(str(tiny_model_dir))
    model = load_causal_lm(resolve_source(str(tiny_model_dir)))
    assert shape.params == sum(p.numel() for p in model.parameters())
    lora = add_lora(model, 8, 16, 0.0, "all-linear")
    assert shape.lora_params(8, "all-linear") == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert shape.lora_params(4, "q_proj,v_proj") == 4 * sum(
        i + o for n, i, o in shape.linears if n.endswith(("q_proj", "v_proj"))
    )


def test_gguf_config_is_read_without_its_weights():
    gguf = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip("`make demo-model` fetches the demo .gguf")
    shape = read_shape(str(gguf))
    assert shape.layers == 30 and shape.hidden == 576 and shape.vocab == 49152
    assert 134e6 < shape.params < 136e6  # tied embeddings counted once


def test_weights_gradients_optimizer_follow_lora_full_precision_and_sharding(tiny_model_dir, monkeypatch):
    model, data = str(tiny_model_dir), [str(DEMO_DATA / "sft.jsonl")]
    n = read_shape(model).params
    full = rows(plan("sft", SFTConfig, model=model, data=data, lora=False, precision="fp32"))["policy"]
    assert (full.weights, full.grads, full.optimizer) == (4 * n, 4 * n, 8 * n)
    lora = rows(plan("sft", SFTConfig, model=model, data=data, precision="bf16"))["policy"]
    adapter = read_shape(model).lora_params(16, "all-linear")
    assert lora.weights == 2 * n + 4 * adapter and lora.grads == 4 * adapter and lora.optimizer == 8 * adapter
    # activations grow with the batch and shrink with checkpointing
    small = plan("sft", SFTConfig, model=model, data=data, batch_size=2, max_length=256, lora=False)
    big = plan("sft", SFTConfig, model=model, data=data, batch_size=8, max_length=256, lora=False)
    ckpt = plan(
        "sft", SFTConfig, model=model, data=data, batch_size=8, max_length=256, lora=False, gradient_checkpointing=True
    )
    assert small.column("activations") < big.column("activations")
    assert ckpt.column("activations") < big.column("activations")
    # FSDP over 4 processes: a quarter of the weights, gradients and optimizer state
    monkeypatch.setenv("WORLD_SIZE", "4")
    sharded = plan("sft", SFTConfig, model=model, data=data, lora=False, precision="fp32", fsdp=True)
    policy = rows(sharded)["policy"]
    assert sharded.processes == 4 and "FSDP" in sharded.sharding
    assert (policy.weights, policy.grads, policy.optimizer) == (n, n, 2 * n)
    ddp = rows(plan("sft", SFTConfig, model=model, data=data, lora=False, precision="fp32"))["policy"]
    assert ddp.weights == 4 * n  # replicas: nothing divided


def test_every_trainer_counts_its_extra_models(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    pairs, prompts = [str(DEMO_DATA / "pairs.jsonl")], [str(DEMO_DATA / "prompts.jsonl")]
    n = read_shape(model).params
    rm_dir = tmp_path / "rm"
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    policy = build_model(600)
    config = policy.config
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(model).save_pretrained(rm_dir)

    rm = plan("train-rm", RewardModelConfig, model=model, data=pairs)
    assert "reward model" in rows(rm)

    dpo_pre = plan("dpo", DPOConfig, model=model, data=pairs, lora=False)
    assert list(rows(dpo_pre)) == ["policy"]  # precomputed reference: no model while training
    dpo_copy = rows(plan("dpo", DPOConfig, model=model, data=pairs, lora=False, precompute_ref=False))
    assert dpo_copy["reference"].weights == 4 * n
    dpo_lora = plan("dpo", DPOConfig, model=model, data=pairs, precompute_ref=False)
    assert list(rows(dpo_lora)) == ["policy"]  # the base with the adapter disabled, no copy
    assert list(rows(plan("dpo", DPOConfig, model=model, data=pairs, loss="simpo"))) == ["policy"]

    kto = plan("kto", KTOConfig, model=model, data=[str(DEMO_DATA / "unpaired.jsonl")], precompute_ref=False)
    assert "KL forward" in rows(kto)

    ppo = rows(plan("ppo", PPOConfig, model=model, data=prompts, reward=str(rm_dir), critic="rm", lora=False))
    assert {"policy", "critic", "reference", f"reward model {rm_dir.name}"} <= set(ppo)
    assert ppo["critic"].optimizer > 0  # the critic trains, in full
    shared = rows(plan("ppo", PPOConfig, model=model, data=prompts, reward="rlkit.demo.task:reward"))
    assert "value head" in shared and "reward model" not in " ".join(shared)

    no_ref = rows(plan("grpo", GRPOConfig, model=model, data=prompts, reward=["rlkit.demo.task:reward"], lora=False))
    assert "reference" not in no_ref
    with_ref = rows(
        plan("grpo", GRPOConfig, model=model, data=prompts, reward=["rlkit.demo.task:reward"], lora=False, beta=0.04)
    )
    assert with_ref["reference"].weights == 4 * n
    # generation's KV cache: one generate call of the whole rollout
    long = plan(
        "grpo",
        GRPOConfig,
        model=model,
        data=prompts,
        reward=["rlkit.demo.task:reward"],
        batch_size=64,
        grad_accum=8,
        max_length=1024,
        lora=False,
    )
    assert any("KV cache of 512 rows" in line for line in long.lines)


@pytest.mark.slow
def test_estimate_within_25_percent_of_the_measured_peak(tmp_path):
    """bench/memory_plan.py's measurement on the tiny model: full fine-tuning with packed rows."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "memory_plan.py"), "--only", "sft full fp32", "--exact"]
        + ["--cache", str(tmp_path / "measured.json")],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| tiny |")]
    assert lines
    for line in lines:
        ratio = float(line.rstrip(" |").rsplit("|", 1)[1].strip().rstrip("%"))
        assert abs(ratio) <= 25, line


def test_qlora_counts_the_base_in_4_bits(tiny_model_dir):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("--load-in-4bit needs bitsandbytes (the qlora extra)")
    model, data = str(tiny_model_dir), [str(DEMO_DATA / "sft.jsonl")]
    shape = read_shape(model)
    fp32 = rows(plan("sft", SFTConfig, model=model, data=data, precision="fp32"))["policy"]
    nf4 = rows(plan("sft", SFTConfig, model=model, data=data, precision="fp32", load_in_4bit=True))["policy"]
    linear = sum(i * o for n, i, o in shape.linears if not n.endswith("lm_head"))
    assert fp32.weights - nf4.weights == pytest.approx(linear * (4 - 0.53))
    assert nf4.grads == fp32.grads and nf4.optimizer == fp32.optimizer  # the adapter trains the same


def test_each_recipe_plans_what_its_setup_reads(tiny_model_dir, tmp_path, monkeypatch):
    """One plan function per recipe decides the reference, the value function, the no-grad forwards
    and the generation chunk; setup and --dry-run both read it."""
    import dataclasses

    from rlkit.losses import advantages
    from rlkit.recipes.dpo import dpo_plan
    from rlkit.recipes.grpo_plan import grpo_plan
    from rlkit.recipes.kto import kto_plan
    from rlkit.recipes.ppo.plan import ppo_plan

    model = str(tiny_model_dir)
    pairs, prompts = [str(DEMO_DATA / "pairs.jsonl")], [str(DEMO_DATA / "prompts.jsonl")]

    def config(cls, **values):
        return resolve_config(cls, {"model": model, **values}, None)

    free = dpo_plan(config(DPOConfig, data=pairs, loss="simpo"))
    assert not free.has_reference and free.reference.why == "reference-free loss"
    assert dpo_plan(config(DPOConfig, data=pairs)).reference.kind == "precomputed"
    assert dpo_plan(config(DPOConfig, data=pairs, precompute_ref=False)).reference.kind == "adapter disabled"
    copy = dpo_plan(config(DPOConfig, data=pairs, precompute_ref=False, lora=False))
    assert copy.reference.kind == "frozen copy" and copy.held_frozen[0].dtype == "fp32"
    assert dpo_plan(config(DPOConfig, data=pairs, precompute_ref=False, ref="other")).reference.kind == "second model"
    assert not dpo_plan(config(DPOConfig, data=pairs)).main.dropout  # off unless --dropout

    unpaired = [str(DEMO_DATA / "unpaired.jsonl")]
    assert len(kto_plan(config(KTOConfig, data=unpaired)).no_grad_forwards) == 1
    assert kto_plan(config(KTOConfig, data=unpaired, loss="apo_zero_unpaired")).no_grad_forwards == ()

    ppo = config(PPOConfig, data=prompts, reward="rlkit.demo.task:reward")
    assert ppo_plan(ppo).value_function.role == "value head"
    assert ppo_plan(config(PPOConfig, data=prompts, reward="x", critic="rm")).value_function.role == "critic"
    gae = advantages.ADVANTAGE_ESTIMATORS["gae"]
    monkeypatch.setitem(advantages.ADVANTAGE_ESTIMATORS, "gae", dataclasses.replace(gae, needs_values=False))
    assert ppo_plan(ppo).value_function is None
    assert [t.role for t in ppo_plan(ppo).trained] == ["policy"]

    grpo = dict(data=prompts, reward=["rlkit.demo.task:reward"], batch_size=4, grad_accum=2)
    assert not grpo_plan(config(GRPOConfig, **grpo)).has_reference
    assert grpo_plan(config(GRPOConfig, **grpo, beta=0.1)).has_reference
    assert grpo_plan(config(GRPOConfig, **grpo)).generation.rows == 8
    assert grpo_plan(config(GRPOConfig, **grpo, generation_batch_size=2)).generation.rows == 2


def test_every_training_command_names_its_plan_function():
    """Each training command's module names its recipe's plan function, which --dry-run shows and
    the recipe's setup reads (a new training command is one more plan function)."""
    import importlib

    from rlkit.cli import COMMANDS

    planned = {
        name for name, module in COMMANDS if hasattr(importlib.import_module(f"rlkit.commands.{module}"), "PLAN")
    }
    assert {"sft", "train-rm", "dpo", "kto", "ppo", "grpo"} <= planned


def test_a_new_recipe_is_one_more_plan(tiny_model_dir):
    """A distillation run (student trained and generating, a bf16 teacher scoring every token with a
    no-grad forward) needs no change to the arithmetic: its plan names its models."""
    from rlkit.training.memory_plan import make_plan
    from rlkit.training.run_plan import Frozen, Generation, MicroBatch, NoGradForward, RunPlan, trained_policy

    model = str(tiny_model_dir)
    data = [str(DEMO_DATA / "sft.jsonl")]
    config = resolve_config(SFTConfig, {"model": model, "data": data, "precision": "fp32", "lora": False}, None)
    distill = RunPlan(
        "distill",
        (trained_policy(config, dropout=False, role="student"),),
        MicroBatch(config.batch_size, config.max_length),
        frozen=(Frozen("teacher", model, dtype="bf16"),),
        generation=Generation(rows=4, length=config.max_length, by="student"),
        no_grad_forwards=(NoGradForward("teacher forward (no grad)", by="teacher"),),
    )
    planned = rows(make_plan(distill, config))
    n = read_shape(model).params
    assert planned["teacher"].weights == 2 * n and planned["teacher"].optimizer == 0
    assert planned["student"].optimizer == 8 * n
    assert planned["teacher forward"].activations > 0


def test_dry_run_returns_from_the_recipe_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    from rlkit.recipes.dpo import run_dpo

    out = tmp_path / "out"
    config = resolve_config(
        DPOConfig,
        {"model": str(tiny_model_dir), "data": [str(DEMO_DATA / "pairs.jsonl")], "output": str(out), "dry_run": True},
        None,
    )
    assert run_dpo(config) is None
    assert not list(tmp_path.iterdir())
    assert capsys.readouterr().out == ""
