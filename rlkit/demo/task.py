"""The demo task: its verifiable checker and the seeded generator of the shipped data.

Task ("answer in one line, then sign off"): whatever the question, the assistant answers in
ONE short line (3 to 20 words) that ends with the sign-off token ``#done``, and stays on
topic. Arithmetic questions ("What is 17 + 25?") are answered as ``The answer is 42. #done``
or, written out, ``17 + 25 = 42. #done``, and are additionally scored for getting the number right.

Why this task: a 135M chat model never writes ``#done`` on its own, so the target-behaviour
rate starts near 0% and a few minutes of LoRA training move it a lot; the rule is checkable
by a few lines of Python (no judge model), so every stage of the pipeline (SFT, reward
model, DPO, KTO, PPO, GRPO with the calculator and this module's `calculator_reward`) can be
measured the same way. Each later stage has its own target (`TARGETS`): the opener, the closer, no
hedge, and right answers to the sums with a calculator at hand. `sft_tools.jsonl` (the demo's SFT
data) holds `sft.jsonl`'s exchanges with the calculator (`rlkit.demo.tools.calculator`) offered
wherever there is arithmetic and called on a fair coin, in TRL's tool-calling layout
(`answer_reward` checks the final answer of an episode with tool turns).

This module is the single source of truth: the generator only emits data that the checker
accepts (chosen / desirable) or rejects (rejected / undesirable), and the tests assert it.

Usable from the toolkit as ``--reward rlkit.demo.task:reward``. Regenerate the shipped
files with ``python -m rlkit.demo.task --out rlkit/demo/data``. Pure stdlib.
"""

from __future__ import annotations

import argparse
import json
import operator
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlkit.demo import DATA_DIR
from rlkit.demo.bank import general_items

SIGN_OFF = "#done"
# The three style markers that DPO, KTO and PPO each teach in turn (GRPO's target is the right number).
OPENER = "Sure!"  # DPO: the answer opens with it
CLOSER = "Cheers!"  # KTO: it stands right before the sign-off
HEDGE = ", I think."  # PPO removes it: the reward model learned that answers without it win
# Any of these reads as hedging, so a policy cannot dodge the check with another phrase.
_HEDGES = re.compile(r"\b(i think|i believe|i guess|probably|maybe|perhaps|not sure)\b", re.IGNORECASE)
MIN_WORDS = 3
MAX_WORDS = 20
DEFAULT_SEED = 0

# Weights of the partial-credit reward. Partial credit gives PPO a gradient before the model
# ever produces the full format; the sign-off dominates because it is the part the base model
# never does. Arithmetic mixes format with correctness so that a well-formatted wrong answer
# still scores below a well-formatted right one.
_W_SIGN_OFF, _W_ONE_LINE, _W_SHORT, _W_ON_TOPIC = 0.4, 0.2, 0.2, 0.2
_W_ARITH_FORMAT, _W_ARITH_CORRECT = 0.6, 0.4
MAX_COMPLETION_WORDS = MAX_WORDS  # every shipped completion passes `short`, so stays under ~40 tokens

# ----------------------------------------------------------------------------- arithmetic

_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_OP_WORDS = {"+": "+", "plus": "+", "-": "-", "minus": "-", "*": "*", "times": "*", "multiplied by": "*"}
_EXPR = re.compile(r"(\d+)\s*(\+|-|\*|plus|minus|times|multiplied by)\s*(\d+)")
# Word problems: each generator template below has exactly one matching pattern here.
_WORD_PROBLEMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"has (\d+) [a-z]+ and gets (\d+) more"), "+"),
    (re.compile(r"has (\d+) [a-z]+ and gives away (\d+)"), "-"),
    (re.compile(r"(\d+) boxes with (\d+) [a-z]+ in each"), "*"),
)
_ARITH_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("+", "What is {a} + {b}?"),
    ("+", "What is {a} plus {b}?"),
    ("+", "How much is {a} + {b}?"),
    ("+", "{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?"),
    ("-", "What is {a} - {b}?"),
    ("-", "What is {a} minus {b}?"),
    ("-", "Calculate {a} - {b}."),
    ("-", "{name} has {a} {things} and gives away {b}. How many {things} are left?"),
    ("*", "What is {a} times {b}?"),
    ("*", "Compute {a} * {b}."),
    ("*", "What is {a} multiplied by {b}?"),
    ("*", "There are {a} boxes with {b} {things} in each box. How many {things} are there in total?"),
)
_NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lily", "Ben", "Emma", "Ravi", "Nina")
_THINGS = ("apples", "stickers", "marbles", "pencils", "cookies", "coins", "books", "stamps", "shells", "cards")

_STOPWORDS = frozenset(
    "the what which who how many much does did are was were is and for you your with from "
    "that this there into get gets one can give name tell about have has some".split()
)


def question_terms(prompt: str) -> tuple[int, str, int] | None:
    """(a, op, b) of the demo arithmetic question in `prompt` (op one of + - *), else None.

    The last question in the text wins, so a chat-templated or multi-turn prompt is scored
    against the question the completion actually answers.
    """
    found: list[tuple[int, int, str, int]] = []  # (position, a, op, b)
    for pattern, op in _WORD_PROBLEMS:
        found += [(m.start(), int(m[1]), op, int(m[2])) for m in pattern.finditer(prompt)]
    for m in _EXPR.finditer(prompt):
        found.append((m.start(), int(m[1]), _OP_WORDS[m[2]], int(m[3])))
    return max(found)[1:] if found else None


def expected_answer(prompt: str) -> int | None:
    """The exact integer answer if `prompt` is one of the demo's arithmetic questions, else None."""
    terms = question_terms(prompt)
    return None if terms is None else _OPS[terms[1]](terms[0], terms[2])


def equation_text(a: int, op: str, b: int) -> str:
    """The worked form of an arithmetic answer: ``17 + 25 = 42.``"""
    return f"{a} {op} {b} = {_OPS[op](a, b)}."


def _shows_equation(body: str, terms: tuple[int, str, int]) -> bool:
    """`body` writes the question's own sum out: ``a op b = N`` (op as a symbol or a word), any N."""
    a, op, b = terms
    ops = "|".join(re.escape(w) for w, o in _OP_WORDS.items() if o == op) + ("|x|×" if op == "*" else "")
    return re.search(rf"(?<!\d){a}\s*(?:{ops})\s*{b}\s*=\s*\d", body) is not None


def _stated_number(text: str) -> int | None:
    """The number a completion commits to: after "answer is" if present, else its last integer."""
    m = re.search(r"answer is\s*(\d+)", text, re.IGNORECASE)
    if m:
        return int(m[1])
    numbers = re.findall(r"\d+", text)
    return int(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------- checker


@dataclass(frozen=True)
class Check:
    """The individual verifiable properties of one completion (see module docstring)."""

    signed_off: bool  # ends with SIGN_OFF, which occurs exactly once
    one_line: bool  # no line break anywhere
    short: bool  # MIN_WORDS..MAX_WORDS words before the sign-off
    on_topic: bool  # shares a content word with the question (a digit, for arithmetic)
    correct: bool | None  # right number for arithmetic questions; None for the others
    opener: bool  # opens with OPENER (what DPO teaches)
    closer: bool  # CLOSER stands right before the sign-off (what KTO teaches)
    hedged: bool  # hedges anywhere ("I think", "probably", ...: what PPO removes)
    equation: bool | None = None  # arithmetic only: writes the question's sum out, "17 + 25 = N" (GRPO)

    @property
    def has_format(self) -> bool:
        """The target behaviour: every format property holds."""
        return self.signed_off and self.one_line and self.short and self.on_topic


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3 and w not in _STOPWORDS}


def check(prompt: str, completion: str) -> Check:
    """Evaluate every property of `completion` as an answer to `prompt`."""
    text = completion.strip()
    signed_off = text.endswith(SIGN_OFF) and text.count(SIGN_OFF) == 1
    body = text[: -len(SIGN_OFF)].rstrip() if signed_off else text
    answer = expected_answer(prompt)
    if not re.search(r"[A-Za-z0-9]", body):  # nothing said: no credit for a bare sign-off
        arith = None if answer is None else False
        return Check(False, False, False, False, arith, False, False, False, arith)
    if answer is None:
        on_topic = bool(_content_words(body) & _content_words(prompt))
        correct = None
    else:
        on_topic = bool(re.search(r"\d", body))
        correct = _stated_number(body) == answer
    return Check(
        signed_off=signed_off,
        one_line="\n" not in text,
        short=MIN_WORDS <= len(body.split()) <= MAX_WORDS,
        on_topic=on_topic,
        correct=correct,
        opener=body.startswith(OPENER),
        closer=signed_off and body.endswith(CLOSER),
        hedged=bool(_HEDGES.search(body)),
        equation=None if answer is None else _shows_equation(body, question_terms(prompt)),  # type: ignore[arg-type]
    )


def has_target_behaviour(prompt: str, completion: str) -> bool:
    """Binary target behaviour (what eval reports as the rate): the full answer format.

    Correctness is deliberately not part of it: the format is what a tiny model learns in
    minutes, so it is the clear before/after signal; correctness is in `score` and `metrics`.
    """
    return check(prompt, completion).has_format


def score(prompt: str, completion: str) -> float:
    """Verifiable reward in [0, 1]: 1.0 only for a formatted (and, for arithmetic, right) answer."""
    c = check(prompt, completion)
    fmt = _W_SIGN_OFF * c.signed_off + _W_ONE_LINE * c.one_line + _W_SHORT * c.short + _W_ON_TOPIC * c.on_topic
    if c.correct is None:
        return round(fmt, 4)
    return round(_W_ARITH_FORMAT * fmt + _W_ARITH_CORRECT * c.correct, 4)


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Batch form of `score`, the signature the toolkit's ``--reward MODULE:FN`` expects."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [score(p, c) for p, c in zip(prompts, completions)]


def metrics(prompts: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
    """Summary for before/after reports: target rate, mean reward, arithmetic accuracy."""
    checks = [check(p, c) for p, c in zip(prompts, completions, strict=True)]
    arith = [c.correct for c in checks if c.correct is not None]
    n = max(len(checks), 1)
    return {
        "n": float(len(checks)),
        "target_rate": sum(c.has_format for c in checks) / n,
        "mean_score": sum(reward(list(prompts), list(completions))) / n,
        "arithmetic_accuracy": sum(arith) / len(arith) if arith else 0.0,
    }


def arithmetic_reward(prompts: list[str], completions: list[str], answer: Sequence[int], **_: Any) -> list[float]:
    """GRPO's verifiable reward: 1.0 when the completion states the true number, else 0.0.

    The truth comes from the prompt file's ``answer`` column (the trainer passes a prompt
    record's other columns as keyword arguments), not from parsing the prompt, so the reward
    is exactly as right as the data. Format is left to the KL term: this reward is about the
    number only, so GRPO's row in the table measures what it alone optimises.
    """
    if not len(prompts) == len(completions) == len(answer):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(answer)} answers")
    return [float(_stated_number(c) == int(a)) for c, a in zip(completions, answer)]


def equation_reward(prompts: list[str], completions: list[str], answer: Sequence[int], **_: Any) -> list[float]:
    """The demo's GRPO reward: half for writing the question's sum out, half for the right result.

    A formatted answer earns 0.5 when it writes the question's own sum (``17 + 25 = ...``, what
    the GRPO row of the demo measures) and 0.5 when the number it states is the ``answer``
    column's; an answer without the format earns nothing, so GRPO keeps what SFT taught.
    """
    if not len(prompts) == len(completions) == len(answer):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(answer)} answers")
    out = []
    for p, c, a in zip(prompts, completions, answer):
        chk = check(p, c)
        out.append(0.5 * bool(chk.equation) + 0.5 * (_stated_number(c) == int(a)) if chk.has_format else 0.0)
    return out


def answer_reward(prompts: list[str], completions: list[str], answer: Sequence[int], **_: Any) -> list[float]:
    """GRPO's reward with the calculator (examples/grpo-tools.mk): 1.0 for a formatted final answer stating the ``answer`` column's
    number, else 0.0. With `--tools rlkit.demo.tools:calculator` the completion is the episode's
    transcript; its final turn is what is checked (`final_answer`), so calling the calculator is
    worth exactly what it does for the answer, no more."""
    if not len(prompts) == len(completions) == len(answer):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(answer)} answers")
    out = []
    for p, c, a in zip(prompts, completions, answer):
        text = final_answer(c)
        out.append(float(check(p, text).has_format and _stated_number(text) == int(a)))
    return out


def calculator_reward(prompts: list[str], completions: list[str], answer: Sequence[int], **_: Any) -> list[float]:
    """The demo's GRPO reward: `answer_reward` for an episode that called the calculator, 0 for one
    that did not. A 135M model answers about a third of the held-out sums right from memory (the
    demo's SFT and PPO models: 15 of 47): with `answer_reward` alone, the first steps' direct answers
    beat calls whose follow-up turn no stage since SFT had practised, and GRPO unlearned calling
    within two steps (a trial of the demo's GRPO stage). Paying only
    for right answers reached through the tool teaches the tool; the stage's target is still the
    answer itself, right or not, with or without a call."""
    rewards = answer_reward(prompts, completions, answer)
    return [r if called_tools(c) else 0.0 for r, c in zip(rewards, completions)]


TOOL_LINE = re.compile(r"^\[tool(?: [^\]]*)?\] .*$", re.MULTILINE)


def final_answer(completion: str) -> str:
    """The answer a completion ends with: after its last tool result where it called tools.

    A `--tools` episode's text is its transcript (`rlkit.training.episodes`): each turn's text, with
    each tool result on a line of its own, ``[tool calculator] 42``; the model's last turn follows the
    last such line. A completion without tool lines is its own final answer.
    """
    results = list(TOOL_LINE.finditer(completion))
    return completion[results[-1].end() :].strip() if results else completion


def called_tools(completion: str) -> bool:
    """Whether a completion's transcript has a tool result (the model called a tool)."""
    return TOOL_LINE.search(completion) is not None


# ----------------------------------------------------------------------------- stage targets


@dataclass(frozen=True)
class Target:
    """What one pipeline stage is there to teach: a yes/no the checker gives per answer."""

    stage: str
    name: str
    rule: str  # one line for the report
    holds: Callable[[Check], bool | None]  # None: this prompt does not measure the target
    #: the eval its "before" is read from: the previous stage's by default; a stage that changes how
    #: the model is asked (the calculator offered) compares with the model it started from asked so too
    before: str | None = None


# Each stage's target needs the format as well, so that a stage cannot score by breaking the answers.
TARGETS: tuple[Target, ...] = (
    Target("sft", "format", "one line, 3-20 words, on topic, ends with #done", lambda c: c.has_format),
    Target("dpo", "opener", f"formatted and opens with {OPENER!r}", lambda c: c.has_format and c.opener),
    Target("kto", "closer", f"formatted and {CLOSER!r} right before {SIGN_OFF}", lambda c: c.has_format and c.closer),
    Target(
        "ppo",
        "no hedge",
        "formatted and no hedge ('I think', 'probably', ...): what the reward model learned",
        lambda c: c.has_format and not c.hedged,
    ),
    Target(
        "grpo",
        "right answer",
        "formatted and states the right number, the calculator offered (arithmetic prompts only)",
        lambda c: None if c.correct is None else c.has_format and c.correct,
        before="ppo+tools",
    ),
)


def target_values(prompts: Sequence[str], completions: Sequence[str]) -> dict[str, list[bool | None]]:
    """{target name: one value per answer}, None where the prompt does not measure that target; an
    answer that called tools is checked on its final turn (`final_answer`)."""
    checks = [check(p, final_answer(c)) for p, c in zip(prompts, completions, strict=True)]
    return {t.name: [t.holds(c) for c in checks] for t in TARGETS}


# ----------------------------------------------------------------------------- generator


def _hedged(body: str) -> str:
    """`body` ("The capital of France is Paris.") with the hedge the SFT data has half the time."""
    if not body.endswith("."):
        raise ValueError(f"an answer sentence must end with a period: {body!r}")
    return body[:-1] + HEDGE


def styled(body: str, *, opener: bool = False, closer: bool = False, hedge: bool = False) -> str:
    """The signed-off answer with the chosen markers: ``[Sure! ]body[, I think.][ Cheers!] #done``."""
    text = _hedged(body) if hedge else body
    if opener:
        text = f"{OPENER} {text}"
    if closer:
        text = f"{text} {CLOSER}"
    return f"{text} {SIGN_OFF}"


def _arithmetic_question(rng: random.Random) -> tuple[str, int]:
    op, template = rng.choice(_ARITH_TEMPLATES)
    if op == "+":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
    elif op == "-":
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    prompt = template.format(a=a, b=b, name=rng.choice(_NAMES), things=rng.choice(_THINGS))
    return prompt, _OPS[op](a, b)


@dataclass(frozen=True)
class Example:
    """One generated question, its plain answer sentence, and the coin flips its rows use."""

    prompt: str
    body: str  # "The capital of France is Paris." / "The answer is 42."
    kind: str  # "arithmetic" or "general"
    answer: int | None  # the true number, arithmetic only
    hedge: bool  # whether this example's answers carry the hedge (SFT, DPO and KTO rows: half do)
    flip: bool  # a second fair coin: the opener/closer of a reward-model pair, the label of a KTO row
    equation: bool = False  # arithmetic: the body writes the sum out ("17 + 25 = 42."), a fair coin


def generate(seed: int, n: int, extra_arithmetic: int = 0) -> list[Example]:
    """`n` examples, half arithmetic, half general, then `extra_arithmetic` arithmetic ones.

    Prompts are unique across the whole list, so slicing it into files (as `build_files`
    does) makes every file's prompts disjoint from every other file's.
    """
    rng = random.Random(seed)
    worked = random.Random(seed + 1_000_003)  # its own stream: the equation coin shifts no other draw
    pool = general_items()
    rng.shuffle(pool)
    n_general = min(n // 2, len(pool))
    kinds = ["general"] * n_general + ["arithmetic"] * (n - n_general)
    rng.shuffle(kinds)
    seen: set[str] = set()
    out: list[Example] = []
    for kind in kinds + ["arithmetic"] * extra_arithmetic:
        value, equation = None, False
        if kind == "general":
            prompt, body = pool.pop()
        else:
            while True:
                prompt, value = _arithmetic_question(rng)
                if prompt not in seen:
                    break
            equation = worked.random() < 0.5
            body = equation_text(*question_terms(prompt)) if equation else f"The answer is {value}."  # type: ignore[misc]
        seen.add(prompt)
        hedge, flip = rng.random() < 0.5, rng.random() < 0.5
        out.append(Example(prompt, body, kind, value, hedge=hedge, flip=flip, equation=equation))
    return out


# Rows per shipped file. sft.jsonl also holds MULTI_TURN two-exchange conversations. Every file
# but grpo_prompts mixes both kinds of question; grpo_prompts is arithmetic only.
SIZES = {  # sft_tools.jsonl holds sft.jsonl's exchanges again (with the calculator): no size of its own
    "eval_prompts": 96,
    "pairs_eval": 64,
    "sft": 240,
    "pairs": 160,
    "dpo_pairs": 160,
    "unpaired": 200,
    "prompts": 160,
    "grpo_prompts": 200,
}
MULTI_TURN = 24


#: The calculator's schema as `rlkit grpo --tools rlkit.demo.tools:calculator` shows it to the model
#: (`transformers.utils.get_json_schema(calculator)`, written out so this module stays stdlib; a test
#: holds the two equal), so SFT trains on the very system turn GRPO and eval render.
CALCULATOR_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates arithmetic.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "Numbers with + - * / and parentheses.",
                }
            },
            "required": ["expression"],
        },
        "return": {"type": "string"},
    },
}


def _exchange(ex: Example, call: bool) -> list[dict[str, Any]]:
    """One question and its answer; with `call`, the answer is preceded by a calculator call on the
    question's own sum and its result (arithmetic only), in TRL's tool-calling layout."""
    answer = {"role": "assistant", "content": styled(ex.body, hedge=ex.hedge)}
    if not call:
        return [{"role": "user", "content": ex.prompt}, answer]
    a, op, b = question_terms(ex.prompt)  # type: ignore[misc]
    expression = f"{a} {op} {b}"
    function = {"name": "calculator", "arguments": {"expression": expression}}
    return [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]},
        {"role": "tool", "name": "calculator", "content": str(_OPS[op](a, b))},
        answer,
    ]


#: Exchanges per conversation that offers the calculator: its schema (~190 tokens of system turn)
#: is the bulk of such a row, so two questions share it, and SFT sees every call in the demo's steps.
TOOL_EXCHANGES = 2


def _tool_conversations(groups: Sequence[Sequence[Example]], coins: random.Random) -> list[dict[str, Any]]:
    """`sft_tools.jsonl`: `sft.jsonl`'s exchanges, with the calculator offered wherever there is
    arithmetic. Conversations with no arithmetic stay as they are (no tool); the exchanges of the
    others are regrouped TOOL_EXCHANGES to a conversation that shows the tool, and each arithmetic
    answer there calls it first on a fair coin (a general one never does). So the data shows a
    call in half the answers that could use one: the format is taught, the habit left to GRPO.
    """
    rows = [{"messages": [m for ex in g for m in _exchange(ex, call=False)]} for g in groups]
    plain = [row for row, g in zip(rows, groups) if not any(ex.kind == "arithmetic" for ex in g)]
    offered = [ex for g in groups if any(e.kind == "arithmetic" for e in g) for ex in g]
    with_tools = []
    for start in range(0, len(offered), TOOL_EXCHANGES):
        chunk = offered[start : start + TOOL_EXCHANGES]
        calls = [ex.kind == "arithmetic" and coins.random() < 0.5 for ex in chunk]
        messages = [m for ex, call in zip(chunk, calls) for m in _exchange(ex, call)]
        with_tools.append({"tools": [CALCULATOR_SCHEMA], "messages": messages})
    out = plain + with_tools
    coins.shuffle(out)
    return out


def build_files(seed: int = DEFAULT_SEED) -> dict[str, list[dict[str, Any]]]:
    """Rows of every shipped file, keyed by file stem. Held-out splits are taken first.

    What each training file shows, and so what each stage can learn (the hedge is a fair coin
    wherever it is not the point, so no stage but PPO has a reason to move it):
    - sft: the plain format, hedged half the time; never the opener nor the closer.
    - sft_tools (the demo's SFT): the same exchanges; those of conversations with arithmetic are
      regrouped two to a conversation that offers the calculator, and each arithmetic answer there
      calls it first on a fair coin (`_tool_conversations`).
    - dpo_pairs: chosen = rejected with the opener in front; both hedged or not alike.
    - unpaired (KTO): every answer has the opener; desirable ones have the closer, undesirable ones not.
    - pairs, pairs_eval (reward model): chosen unhedged, rejected hedged; opener and closer alike
      in both, present half the time, so the only difference the RM can learn is the hedge.
    - prompts (PPO), grpo_prompts (with the true `answer`), eval_prompts: questions only;
      eval_arithmetic: eval_prompts' arithmetic ones, with their `answer`.
    """
    n_sft_examples = SIZES["sft"] + MULTI_TURN  # each multi-turn row consumes two examples
    mixed = sum(SIZES.values()) - SIZES["grpo_prompts"] + MULTI_TURN
    examples = generate(seed, mixed, extra_arithmetic=SIZES["grpo_prompts"])
    rng = random.Random(seed + 1)  # separate stream: layout choices never shift the content

    def take(k: int) -> list[Example]:
        chunk, examples[:k] = examples[:k], []
        return chunk

    def rm_pair(e: Example) -> dict[str, str]:
        chosen, rejected = (styled(e.body, opener=e.flip, closer=e.flip, hedge=h) for h in (False, True))
        return {"prompt": e.prompt, "chosen": chosen, "rejected": rejected}

    files: dict[str, list[dict[str, Any]]] = {}
    held_out = take(SIZES["eval_prompts"])
    files["eval_prompts"] = [{"prompt": e.prompt} for e in held_out]
    # the same held-out arithmetic prompts, with their `answer`: what GRPO's calculator stage is measured on
    files["eval_arithmetic"] = [{"prompt": e.prompt, "answer": e.answer} for e in held_out if e.kind == "arithmetic"]
    files["pairs_eval"] = [rm_pair(e) for e in take(SIZES["pairs_eval"])]
    sft = take(n_sft_examples)
    single, multi = sft[: SIZES["sft"] - MULTI_TURN], sft[SIZES["sft"] - MULTI_TURN :]
    groups = [[e] for e in single] + [[multi[2 * i], multi[2 * i + 1]] for i in range(MULTI_TURN)]
    rng.shuffle(groups)
    files["sft"] = [{"messages": [m for ex in g for m in _exchange(ex, call=False)]} for g in groups]
    files["sft_tools"] = _tool_conversations(groups, random.Random(seed + 2_000_003))  # its own stream
    files["pairs"] = [rm_pair(e) for e in take(SIZES["pairs"])]
    files["dpo_pairs"] = [
        {
            "prompt": e.prompt,
            "chosen": styled(e.body, opener=True, hedge=e.hedge),
            "rejected": styled(e.body, hedge=e.hedge),
        }
        for e in take(SIZES["dpo_pairs"])
    ]
    files["unpaired"] = [
        {"prompt": e.prompt, "completion": styled(e.body, opener=True, closer=e.flip, hedge=e.hedge), "label": e.flip}
        for e in take(SIZES["unpaired"])
    ]
    files["prompts"] = [{"prompt": e.prompt} for e in take(SIZES["prompts"])]
    files["grpo_prompts"] = [{"prompt": e.prompt, "answer": e.answer} for e in take(SIZES["grpo_prompts"])]
    assert not examples
    return files


def write_files(out_dir: Path, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Write every file as ``<stem>.jsonl`` under `out_dir`, byte-for-byte reproducible."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for stem, rows in build_files(seed).items():
        path = out_dir / f"{stem}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
        path.write_text(text, encoding="utf-8", newline="\n")
        paths[stem] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m rlkit.demo.task [--out DIR] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python -m rlkit.demo.task", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"output directory (default: {DATA_DIR})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in write_files(args.out, args.seed).values():
        print(f"{path}  {len(path.read_text(encoding='utf-8').splitlines())} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
