"""`rlkit distill`: a CLI run where the divergence falls, teacher = student gives zero loss and
gradient, the on/off-policy mix, bit-identical resume, two processes = one, bad input.

The loss itself (generalized JSD against hand computations, the chunked path against the whole
vocabulary) is tested in test_losses_distill.py; these tests run it inside the real rollout and
update.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    DEMO_DATA,
    REPO,
    SMOLLM2,
    assert_same_up_to_fp32,
    build_model,
    build_tokenizer,
    dequantized_smollm2,
    interrupted_after,
    run_cli,
    write_jsonl,
)

PROMPTS = DEMO_DATA / "grpo_prompts.jsonl"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(student, teacher): two tiny Llamas sharing a tokenizer and a trunk; the teacher's output layer
    is the student's x 5, a sharper distribution the student reaches by moving toward it."""
    root = tmp_path_factory.mktemp("distill-models")
    tok = build_tokenizer()
    for name in ("student", "teacher"):
        model = build_model(len(tok))
        if name == "teacher":
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(5.0)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "student", root / "teacher"


def _args(student: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        str(student),
        str(PROMPTS),
        "--teacher",
        str(teacher),
        "-o",
        str(out),
        "--batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--sample-every",
        "0",
        "--precision",
        "fp32",
        "--log-every",
        "100",
        *extra,
    ]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.process_boundary
def test_cli_run_the_divergence_falls(models, tmp_path):
    """Full fine-tuning toward a teacher (forward KL): the per-token divergence of the last steps is
    below the first steps'; stdout is OUT; the card names the teacher, beta and lmbda. (Measured:
    0.20 -> 0.14 over 10 steps; the bound leaves room for other CPUs' samples.)"""
    student, teacher = models
    out = tmp_path / "out"
    extra = ["--max-steps", "10", "--full", "--lr", "3e-3", "--beta", "0", "--sample-every", "5", "--loss-chunk", "5"]
    result = run_cli(*_args(student, teacher, out, *extra))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    metrics = _metrics(out)
    divergence = [m["divergence"] for m in metrics]
    assert len(divergence) == 10 and all(d > 0 for d in divergence)
    assert sum(divergence[-3:]) / 3 < 0.85 * sum(divergence[:3]) / 3, divergence
    assert all(m["on_policy"] == 1.0 for m in metrics)
    for key in ("teacher_agreement", "student_entropy", "teacher_entropy", "time/generation_share"):
        assert key in metrics[-1], key
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows and {"student_logp", "teacher_logp", "completion"} <= set(rows[0])
    card = (out / "README.md").read_text()
    assert str(teacher) in card and "beta 0.0" in card and "lmbda" in card


def test_teacher_equal_to_student_gives_zero_loss_and_no_update(models, tmp_path):
    """The student distilled from itself: every divergence is 0 (up to rounding) and the weights stay put."""
    from safetensors.torch import load_file

    student, _ = models
    out = tmp_path / "self"
    result = run_cli(*_args(student, student, out, "--max-steps", "2", "--full", "--lr", "1e-2", "--beta", "0.5"))
    assert result.returncode == 0, result.stderr
    for m in _metrics(out):
        assert abs(m["divergence"]) < 1e-6 and m["teacher_agreement"] == 1.0 and m["grad_norm"] < 1e-5
    before, after = load_file(str(student / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name


def test_off_policy_steps_train_on_the_data_completions(models, tmp_path):
    """--lmbda 0: every step trains on the records' own completions (prompt-completion and messages
    formats alike), none is sampled."""
    student, teacher = models
    data = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"What is {i} + {i}?", "completion": f"{2 * i}"} for i in range(4)]
    records += [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("yes", "no", "maybe", "hello")
    ]
    write_jsonl(data, records[:4])
    write_jsonl(tmp_path / "chat.jsonl", records[4:])
    for name, source in (("prompt-completion", data), ("messages", tmp_path / "chat.jsonl")):
        out = tmp_path / name
        args = _args(student, teacher, out, "--max-steps", "2", "--lmbda", "0")
        args[2] = str(source)
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        metrics = _metrics(out)
        assert [m["on_policy"] for m in metrics] == [0.0, 0.0]
        assert all(m["divergence"] > 0 for m in metrics)


def test_lmbda_mixes_on_and_off_policy_steps(models, tmp_path):
    """--lmbda 0.5: each step's kind drawn from its own seed, some of each over 8 steps."""
    student, teacher = models
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"} for i in range(8)])
    out = tmp_path / "mix"
    args = _args(student, teacher, out, "--max-steps", "8", "--lmbda", "0.5")
    args[2] = str(data)
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    kinds = [m["on_policy"] for m in _metrics(out)]
    assert 0.0 in kinds and 1.0 in kinds


def test_resume_is_bit_identical(models, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from rlkit.recipes.distill import run_distill
    from rlkit.recipes.distill_config import DistillConfig

    student, teacher = models

    def config(out: Path, **overrides) -> DistillConfig:
        values = dict(
            model=str(student), data=[str(PROMPTS)], teacher=str(teacher), output=str(out), max_steps=3,
            save_every=1, batch_size=4, max_new_tokens=8, sample_every=0, precision="fp32", log_every=100,
            lr=1e-2, lora=False, beta=0.5,
        )  # fmt: skip
        values.update(overrides)
        return DistillConfig(**values)

    whole = tmp_path / "whole"
    run_distill(config(whole))
    out = tmp_path / "resumed"
    interrupted_after(monkeypatch, run_distill, config(out), "step-0000001", 1)
    run_distill(config(out, resume=True))

    expected, got = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    def steady(d):  # timings differ run to run; everything else must not
        return [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k} for m in _metrics(d)]

    assert steady(whole) == steady(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("training", ["--full", "--lora"])  # --lora: frozen weights laid out column-major
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_log_what_one_process_logs(models, tmp_path, sharding, training):
    """The same global batch on two gloo processes (DDP; FSDP2, the teacher sharded like a frozen
    reference): the same samples, divergences and agreement as one process."""
    from equivalence import reduction_bound

    student, teacher = models
    common = ["--max-steps", "2", "--batch-size", "2", "--generation-batch-size", "2", training, "--lr", "1e-2"]
    one = tmp_path / "one"
    result = run_cli(*_args(student, teacher, one, *common, "--grad-accum", "4"))
    assert result.returncode == 0, result.stderr
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            *launch,
            str(_free_port()),
            "-m",
            "rlkit",
            *_args(student, teacher, two, *common, "--grad-accum", "2", *sharding),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    if sharding:
        assert "fsdp: teacher on process 1 of 2 holds" in result.stderr
    a, b = _metrics(one), _metrics(two)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert y["completion_length/mean"] == x["completion_length/mean"]
        for key in ("divergence", "teacher_agreement", "student_entropy"):
            bound = reduction_bound(8 * 8) * max(abs(x[key]), 1.0) * 100
            assert abs(x[key] - y[key]) <= bound, (x["step"], key, x[key], y[key])


def test_prompt_tokens_shared_by_every_row_run_once_in_both_forwards(models, monkeypatch):
    """Rows whose prompts start alike (a system prompt): the teacher's and the student's forwards run
    those tokens once (`prompt_cached_inputs`), and the divergence, its metrics and the student's
    gradients are the whole rows' up to float32 rounding (conftest's `assert_same_up_to_fp32`)."""
    from transformers import AutoModelForCausalLM

    from rlkit.recipes import distill
    from rlkit.tools.generation import left_pad
    from rlkit.training import logprobs
    from rlkit.training.logprobs import PREFIX_MIN_TOKENS, positions_from_mask

    student, teacher = (AutoModelForCausalLM.from_pretrained(m, dtype=torch.float64) for m in models)
    student.train()
    draw = torch.Generator().manual_seed(3)
    system = torch.randint(3, 500, (PREFIX_MIN_TOKENS + 4,), generator=draw).tolist()
    prompts = [system + torch.randint(3, 500, (n,), generator=draw).tolist() for n in (7, 1, 4, 9)]
    query, query_mask = left_pad(prompts, 2)
    responses = torch.randint(3, 500, (4, 6), generator=draw)
    response_mask = torch.tensor([[1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0], [1] * 6])
    ids, mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
    params = [p for p in student.parameters() if p.requires_grad]
    head = distill.TeacherHead(teacher.get_output_embeddings())

    def run() -> list[torch.Tensor]:
        states = distill.teacher_states(distill.SeparateTeacher(teacher), ids, mask, 6)
        terms = distill.DistillStudent(student)(ids, mask, 6, states, head, response_mask, 0.5, 1.0, 4)
        return [terms, *torch.autograd.grad(terms[0], params)]

    calls = []
    real = logprobs._common_prefix_cache
    monkeypatch.setattr(logprobs, "_common_prefix_cache", lambda *a: calls.append(a[1].numel()) or real(*a))
    cached = run()
    assert calls == [len(system)] * 2  # the teacher's forward, the student's
    whole = {"attention_mask": mask, "position_ids": positions_from_mask(mask), "use_cache": False}
    monkeypatch.setattr(distill, "prompt_cached_inputs", lambda model, ids, mask, width: {"input_ids": ids, **whole})
    plain = run()
    assert float(plain[0][0]) > 1e-3  # a divergence to compare: the teacher is not the student
    for got, expected in zip(cached, plain, strict=True):
        assert_same_up_to_fp32(got, expected)


@pytest.fixture(scope="module")
def student_adapter(models, tmp_path_factory) -> Path:
    """A LoRA adapter (non-zero) on the student's base, as a stage of a pipeline leaves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    student, _ = models
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(student), config)
    adapter.peft_config["default"].base_model_name_or_path = str(student)
    directory = tmp_path_factory.mktemp("distill-adapter") / "adapter"
    adapter.save_pretrained(directory)
    return directory


def test_a_teacher_runs_on_the_students_base_only_where_it_computes_the_same(models, student_adapter, tmp_path):
    """The shared base is chosen only for a LoRA student on the teacher's base weights in the
    teacher's precision, with a plain LoRA teacher adapter; anything else keeps a teacher of its own."""
    import json
    import shutil

    from rlkit.recipes.distill import TeacherOnBase, teacher_on_student_base
    from rlkit.recipes.distill_config import DistillConfig

    base, other = models

    def decided(teacher, **overrides):
        values = dict(model=str(base), data=[str(PROMPTS)], teacher=str(teacher), output=str(tmp_path / "o"))
        return teacher_on_student_base(DistillConfig(**{**values, **overrides}))

    assert decided(student_adapter) == TeacherOnBase(str(student_adapter))
    assert decided(base) == TeacherOnBase(None)
    assert decided(base, teacher_precision="fp32", precision="fp32") == TeacherOnBase(None)
    assert decided(other) is None  # other weights
    assert decided(student_adapter, lora=False) is None  # a full student moves the base itself
    assert decided(student_adapter, teacher_precision="bf16", precision="fp32") is None
    assert decided(student_adapter, fsdp=True) is None
    assert decided(tmp_path / "missing") is None  # said in full by the checks before any weights load
    for field, value in (("modules_to_save", ["lm_head"]), ("use_dora", True), ("target_modules", ["lm_head"])):
        odd = tmp_path / f"adapter-{field}"
        shutil.copytree(student_adapter, odd)
        config = json.loads((odd / "adapter_config.json").read_text())
        (odd / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        assert decided(odd) is None, field


@pytest.mark.parametrize("teacher_is", ["an adapter on the base", "the base under the adapter"])
def test_a_teacher_on_the_students_base_runs_on_its_copy(models, student_adapter, tmp_path, monkeypatch, teacher_is):
    """A LoRA student and a teacher on the same base weights: a LoRA adapter on it (examples/distill.mk:
    the demo's adapter into a fresh one) or the base itself under a continued adapter. The teacher
    runs on the student's own copy of the base (its adapter switched to, or the student's off), and
    logs what the teacher loaded as a model of its own gives, to rounding (the student's frozen
    weights are laid out column-major, the separate teacher's row-major); OUT holds the student's
    adapter alone."""
    import rlkit.recipes.distill as distill
    from rlkit.recipes.distill_config import DistillConfig

    base, _ = models
    student, teacher = (base, student_adapter) if teacher_is == "an adapter on the base" else (student_adapter, base)
    extra = ("--max-steps", "2", "--lora", "--lr", "1e-2", "--beta", "0.5")
    shared = tmp_path / "shared"
    config = DistillConfig(model=str(student), data=[str(PROMPTS)], teacher=str(teacher), output=str(shared), lora=True)
    assert distill.teacher_on_student_base(config) is not None
    assert distill.distill_plan(config).held_frozen == ()  # --dry-run plans no second copy
    result = run_cli(*_args(student, teacher, shared, *extra))
    assert result.returncode == 0, result.stderr
    assert "no second copy" in result.stderr
    monkeypatch.setattr(distill, "teacher_on_student_base", lambda config: None)
    separate = tmp_path / "separate"
    result = run_cli(*_args(student, teacher, separate, *extra))
    assert result.returncode == 0, result.stderr
    assert "a model of its own" in result.stderr
    got, expected = _metrics(shared), _metrics(separate)
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected, strict=True):
        assert g["divergence"] > 1e-3  # the teacher differs from the student: not the student's own forward
        for key in ("divergence", "teacher_agreement", "student_entropy", "teacher_entropy"):
            # measured equal on the avx512, avx2 and default kernels; the bound leaves room for the two
            # weight layouts' float32 rounding (~1e-7 relative a forward) carried through one update
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), key
    assert sorted(p.name for p in shared.iterdir() if p.is_dir()) == []  # no OUT/teacher/ beside the adapter
    assert (shared / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--beta", "1.5"], "--beta"),
        (["--lmbda", "-0.1"], "--lmbda"),
        (["--lmbda", "0.5"], "has no completion"),
        (["--lmbda", "0.5", "--num-generations", "2"], "--num-generations 1"),
    ],
)
def test_bad_options_are_refused_with_nothing_written(models, tmp_path, extra, words):
    student, teacher = models
    out = tmp_path / "out"
    result = run_cli(*_args(student, teacher, out, *extra))
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_teacher_that_cannot_grade_the_student_is_refused(models, tiny_model_dir, tmp_path):
    """Another tokenizer, another vocabulary size, a reward model, no --teacher: one line each, exit 2, nothing written."""
    from transformers import AutoModelForSequenceClassification

    student, _ = models
    other_tok = tmp_path / "other-tok"
    tok = build_tokenizer()
    tok.add_tokens(["<extra_token>"])
    build_model(len(tok)).save_pretrained(other_tok)
    tok.save_pretrained(other_tok)
    rm = tmp_path / "rm"
    tok = build_tokenizer()
    AutoModelForSequenceClassification.from_pretrained(student, num_labels=1, pad_token_id=tok.pad_token_id).save_pretrained(rm)  # fmt: skip
    tok.save_pretrained(rm)
    for teacher, words in ((other_tok, "tokenizer differs"), (rm, "reward model")):
        out = tmp_path / f"out-{teacher.name}"
        result = run_cli(*_args(student, teacher, out))
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and result.stderr.count("error:") == 1, result.stderr
        assert not out.exists() and not Path(f"{out}.partial").exists()
    args = _args(student, student, tmp_path / "none")
    del args[3:5]
    result = run_cli(*args)
    assert result.returncode == 2 and "--teacher" in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="needs the demo model (`make demo-model`)")
def test_efficacy_smollm2_student_recovers_the_teachers_format(tmp_path):
    """examples/distill.mk at a smaller scale: a teacher taught the demo's answer format by the demo's
    SFT stage, distilled into a fresh LoRA on the same base from prompts alone (60 steps, as the
    recipe: at 30 the student wrote the one-line answers but not yet the `#done` after the `#`); on
    the 96 held-out prompts the student's format rate rises over the base's with a 95% interval
    above zero."""
    from rlkit.demo.transfer import transfer_rows

    base = dequantized_smollm2(tmp_path / "base")
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    steps = [
        ["sft", str(base), str(DEMO_DATA / "sft.jsonl"), "-o", str(teacher), "--max-length", "256",
         "--max-steps", "16", "--batch-size", "4", "--lr", "5e-4", "--warmup-steps", "2"],
        ["distill", str(base), str(DEMO_DATA / "prompts.jsonl"), "--teacher", str(teacher), "-o", str(student),
         "--max-length", "128", "--max-new-tokens", "32", "--batch-size", "8", "--max-steps", "60",
         "--lr", "5e-4", "--beta", "0.5", "--sample-every", "10"],
    ]  # fmt: skip
    for args in steps:
        result = run_cli(*args, timeout=3600)
        assert result.returncode == 0, result.stderr
    evals = tmp_path / "eval"
    common = ["--prompts", str(DEMO_DATA / "eval_prompts.jsonl"), "--reward", "rlkit.demo.task:reward",
              "--max-new-tokens", "32", "--batch-size", "48"]  # fmt: skip
    for model, extra in ((teacher, ["--baseline", str(base)]), (student, [])):
        result = run_cli("eval", str(model), *common, *extra, "--output-dir", str(evals / model.name), timeout=3600)
        assert result.returncode == 0, result.stderr
    divergence = [m["divergence"] for m in _metrics(student)]
    assert sum(divergence[-5:]) < sum(divergence[:5]), divergence
    rows = {row.target: row for row in transfer_rows(evals)}
    form = rows["format"]
    assert form.teacher > 0.8, form
    assert form.change.low > 0, form  # the student's format rate rose over the base's, 95% interval above 0


def test_tools_on_policy_episodes_are_distilled_with_tool_turns_left_out(models, tmp_path):
    """--tools: the student's on-policy samples are episodes (grpo's sampler), some first turns
    rewritten into a call of add; the run logs the calls and the teacher grades only the student's
    own tokens (the tool turns have mask 0: `response_tokens` counts fewer than the episodes hold)."""
    from test_grpo_tools import ADD_CALL, END, SCRIPTED_FIRST_TURNS

    student, teacher = models
    (tmp_path / "scripted_first_turns.py").write_text(SCRIPTED_FIRST_TURNS)
    out = tmp_path / "tools"
    args = _args(student, teacher, out, "--template", "chatml-tools", "--tools", "scripted_first_turns:add")
    args += ["--max-new-tokens", "96", "--max-length", "1000", "--max-steps", "2", "--max-turns", "1"]
    env = {"SCRIPTED_MODEL": str(student), "PYTHONPATH": str(tmp_path)}
    result = run_cli(*args, env=env, cwd=tmp_path, process=True)  # the script patches generate: its own process
    assert result.returncode == 0, result.stderr
    assert ADD_CALL and END  # the script rewrites first turns into this call, ended as chatml-tools ends a turn
    metrics = _metrics(out)
    assert sum(m["tools/calls"] for m in metrics) > 0, metrics
    for m in metrics:
        assert m["tools/appended_tokens/mean"] >= 0 and m["divergence"] >= 0
    assert any(m["tools/appended_tokens/mean"] > 0 for m in metrics)
    card = (out / "README.md").read_text()
    assert "scripted_first_turns:add" in card
