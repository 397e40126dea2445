"""`chat`: talk to a model on a terminal, or turn a stream of prompts into JSONL completions.

One command, two modes chosen by whether stdin is a terminal, so `rlkit chat M` is a REPL
and `rlkit chat M < prompts.jsonl > out.jsonl` is a batch job that `rlkit eval --completions`
reads back. Prompts are encoded exactly as training encoded them (rlkit.data.prompts), so a
model answers here as it did in its evals.

Piped, decoding is greedy unless --temperature is given, so the same input gives the same
output; with sampling, --seed makes it reproducible. On a terminal the default is sampling
(temperature 0.7), because a REPL that always says the same thing is less useful.

With `--tools` a reply may call them: the calls run as in grpo's episodes (`rlkit.agents`: every
fault an answer to the model, prints kept off stdout, `--tool-timeout`), the tool turn is appended
to the ids the model sampled and the model goes on, until a turn without calls, `--max-turns`
rounds or the reply's `--max-new-tokens`. Piped, each batch runs through grpo's own episode
sampler (`rlkit.tools.tool_episodes`) and a JSON line carries the whole exchange (`messages`); on
a terminal the session streams each turn and shows each call and its result, dimmed, on stderr.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
from rich.markup import escape

from rlkit.agents.calls import ToolCall, parse_turn
from rlkit.agents.execution import ToolCounts
from rlkit.agents.options import check_tool_options
from rlkit.agents.setup import Agents, load_agents
from rlkit.agents.transcript import prompt_ids
from rlkit.agents.turn import ToolRound, tool_round
from rlkit.console import console, info
from rlkit.data.formats import Messages, as_messages
from rlkit.data.prompts import PromptRows, encode_prompt
from rlkit.data.templates import ChatTemplate, resolve_template
from rlkit.data.text import decode_lines
from rlkit.errors import InputError
from rlkit.models.inference import dtype_hint, inference_dtype, is_reward_model, load_causal_lm_for_inference
from rlkit.models.load import load_tokenizer, resolve_source
from rlkit.tools.chat_config import ChatConfig
from rlkit.tools.generation import SamplingConfig, generate_rollouts
from rlkit.tools.tool_episodes import generate_with_tools

INTERACTIVE_TEMPERATURE = 0.7
COMMANDS_HELP = "/reset  /system TEXT  /save FILE  /exit   (Ctrl-C stops a reply, Ctrl-D exits)"


# ---- piped mode ----------------------------------------------------------------------------


def parse_prompt_line(line: str, number: int, system: str | None) -> tuple[Any, Messages]:
    """(the prompt as given, its conversation) from one stdin line: plain text or JSON."""
    text = line.strip()
    prompt: Any = text
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(
                f"stdin line {number}: starts with '{{' but is not valid JSON ({err.msg}); give plain text or a JSON object"
            )
        if "messages" in record:
            prompt = record["messages"]
        elif "prompt" in record:
            prompt = record["prompt"]
        else:
            raise InputError(
                f"stdin line {number}: a JSON line needs a 'prompt' or 'messages' field (found: {', '.join(record) or 'none'})"
            )
    messages = as_messages(prompt, "user", f"stdin line {number}")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return prompt, messages


def stdin_lines(stdin: TextIO) -> Iterator[str]:
    """stdin's lines as they arrive, decoded as UTF-8 by rlkit (not by the stream, which under a C
    locale would pass bad bytes on to the tokenizer), so a bad byte is an error naming its line."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:  # already text (a StringIO in tests)
        return iter(stdin.readline, "")
    return decode_lines(iter(buffer.readline, b""), "stdin")


def _batches(lines: Iterator[str], size: int, system: str | None) -> Iterator[list[tuple[Any, Messages]]]:
    batch: list[tuple[Any, Messages]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        batch.append(parse_prompt_line(line, number, system))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_piped(
    config: ChatConfig,
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    stdin: TextIO,
    stdout: TextIO,
    agents: Agents | None = None,
) -> int:
    """One JSON line per input (per sample with --n), written as each batch finishes. With `agents`
    (--tools) each line's `completion` is the episode's transcript, as grpo's reward functions and
    `eval --tools` read it, `messages` the whole conversation (tool calls and results included) and
    `turns` the model's turns."""
    temperature = config.temperature if config.temperature is not None else 0.0
    sampling = SamplingConfig(config.max_new_tokens, temperature, config.top_p, config.batch_size)
    settings: dict[str, Any] = {
        "temperature": temperature,
        "top_p": config.top_p if temperature > 0 else 1.0,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    if agents is not None:
        settings |= {"tools": list(config.tools), "max_turns": config.max_turns, "tool_timeout": config.tool_timeout}
    per_batch = max(1, config.batch_size // config.n)
    written, counts = 0, ToolCounts()
    for batch_index, batch in enumerate(_batches(stdin_lines(stdin), per_batch, config.system)):
        seed = None if config.seed is None else config.seed + batch_index
        conversations = [m for _, m in batch]
        if agents is None:
            rollouts = generate_rollouts(model, tokenizer, template, conversations, sampling, n=config.n, seed=seed)
            replies: list[dict[str, Any]] = [{"completion": rollout.text} for rollout in rollouts]
        else:
            rows = PromptRows(conversations, [{} for _ in batch], False)
            episodes = generate_with_tools(model, tokenizer, agents, rows, sampling, n=config.n, seed=seed)
            s = episodes.samples
            replies = [
                {"completion": text, "messages": episodes.messages(k), "turns": s.turns[k]}
                for k, text in enumerate(s.completions)
            ]
            counts += s.tool_counts
        for k, reply in enumerate(replies):
            record = {
                "prompt": batch[k // config.n][0],
                **reply,
                **({"sample": k % config.n} if config.n > 1 else {}),
                "model": config.model,
                **settings,
            }
            stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
        stdout.flush()
    if written == 0:
        raise InputError("stdin held no prompts (one per line: plain text, or JSON with 'prompt' or 'messages')")
    tools = f"; {counts.calls} tool call(s), {counts.failures} failed" if agents is not None else ""
    info(f"chat: {written} completion(s) written{tools}")
    return written


# ---- interactive mode ----------------------------------------------------------------------


class _CtrlC:
    """Ctrl-C during a reply as a stopping criterion: the SIGINT handler only sets a flag and
    `generate` ends after the current token, returning normally. A KeyboardInterrupt raised at
    an arbitrary point inside `generate` (a torch op, the streamer's write) can be lost or leave
    it half-way; a flag cannot."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device)

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        try:
            previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "requested", True))
        except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _streamer(tokenizer: Any, out: TextIO) -> Any:
    """A TextStreamer that writes each piece to `out` as soon as it is decoded."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        shown = ""  # what the user has seen so far: the reply kept when Ctrl-C stops it

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.shown += text
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatSession:
    """Multi-turn history plus the slash commands; `reply` streams one generated answer (with
    `agents`, its tool rounds too: each call and its result shown, dimmed, on stderr)."""

    def __init__(
        self,
        config: ChatConfig,
        model: Any,
        tokenizer: Any,
        template: ChatTemplate,
        out: TextIO,
        agents: Agents | None = None,
    ):
        self.config, self.model, self.tokenizer, self.template, self.out = config, model, tokenizer, template, out
        self.agents = agents
        self.system = config.system
        self.history: Messages = []
        self.temperature = config.temperature if config.temperature is not None else INTERACTIVE_TEMPERATURE
        if config.seed is not None:
            torch.manual_seed(config.seed)

    def messages(self) -> Messages:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            console.print("[dim](conversation cleared)[/dim]")
        elif name == "/system":
            self.system = rest.strip() or None
            console.print(f"[dim](system message {'set' if self.system else 'removed'})[/dim]")
        elif name == "/save":
            if not rest.strip():
                console.print("[yellow]usage: /save FILE[/yellow]")
            else:
                path = Path(rest.strip()).expanduser()
                try:
                    path.write_text(
                        json.dumps(
                            {"model": self.config.model, "messages": self.messages()}, indent=2, ensure_ascii=False
                        )
                        + "\n"
                    )
                    console.print(f"[dim](saved {len(self.history)} message(s) to {path})[/dim]")
                except OSError as err:
                    console.print(f"[red]cannot save to {path}: {err}[/red]")
        else:
            console.print(f"[yellow]unknown command {name}[/yellow]; {COMMANDS_HELP}")
        return True

    @torch.no_grad()
    def reply(self, text: str) -> str:
        """Generate, streaming to `out`; Ctrl-C stops the reply and keeps what was said. With tools,
        each turn that calls them is answered (the tool turn appended to the sampled ids, as in
        grpo's episodes) and the model goes on, within --max-new-tokens for the whole reply and
        --max-turns rounds; the rounds' messages join the history. Returns the last turn's text."""
        self.history.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        spent = rounds = 0
        while True:
            sampled, answer, stopped = self._turn(ids, self.config.max_new_tokens - spent)
            spent += len(sampled)
            ended = bool(sampled) and sampled[-1] == self.tokenizer.eos_token_id
            round_ = None if stopped or not ended else self._tool_round(answer, rounds)
            if round_ is None:
                self.history.append({"role": "assistant", "content": answer})
                return answer
            self.history += round_.messages
            if spent + len(round_.appended_ids) >= self.config.max_new_tokens:
                console.print("[dim](the reply's --max-new-tokens is spent)[/dim]")
                return answer
            ids, rounds = ids + sampled + list(round_.appended_ids), rounds + 1
            spent += len(round_.appended_ids)  # the budget counts tool turns too, as an episode's does
            console.print("[bold green]model>[/bold green] ", end="")

    def _prompt_ids(self) -> list[int]:
        """The conversation so far with the generation prompt, encoded as training encoded prompts
        (with tools, their schemas shown as grpo showed them)."""
        if self.agents is None:
            return encode_prompt(self.tokenizer, self.template, self.messages())
        return prompt_ids(self.tokenizer, self.template, self.messages(), self.agents.schemas)

    def _turn(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], str, bool]:
        """One turn streamed after `ids`: the sampled ids (through the EOS, if reached), their text,
        and whether Ctrl-C stopped it (then the text is what the user saw)."""
        device = next(self.model.parameters()).device
        prompt = torch.tensor([ids], device=device)
        from transformers import StoppingCriteriaList

        streamer = _streamer(self.tokenizer, self.out)
        sample = self.temperature > 0
        ctrl_c = _CtrlC()
        generated: list[int] = []
        try:
            with ctrl_c.catching():
                out = self.model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=max_new_tokens,
                    streamer=streamer,
                    do_sample=sample,
                    temperature=self.temperature if sample else None,
                    top_p=self.config.top_p if sample else None,
                    top_k=None,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([ctrl_c]),
                )
            generated = out[0, prompt.shape[1] :].tolist()
            eos = self.tokenizer.eos_token_id
            if eos in generated:
                generated = generated[: generated.index(eos) + 1]
            answer = self.tokenizer.decode([t for t in generated if t != eos], skip_special_tokens=True).strip()
            stopped = ctrl_c.requested
        except KeyboardInterrupt:
            stopped = True
        if stopped:  # keep what the user saw
            answer = streamer.shown.strip()
            self.out.write("\n")
            console.print("[dim](stopped)[/dim]")
        return generated, answer, stopped

    def _tool_round(self, answer: str, rounds: int) -> ToolRound | None:
        """The tools' answers to the turn `answer`, shown; None where there is nothing to run: no
        tools, no call, --max-turns rounds already run (said), or Ctrl-C while a tool ran (said)."""
        if self.agents is None:
            return None
        agents = self.agents
        if agents.max_turns is not None and rounds == agents.max_turns:
            if parse_turn(answer).calls:
                console.print(f"[dim](--max-turns {agents.max_turns} reached: these calls were not run)[/dim]")
            return None
        conversation = self.messages()
        try:
            round_ = tool_round(answer, conversation, agents.tools, self.tokenizer, self.template, agents.timeout)
        except KeyboardInterrupt:
            console.print("[dim](stopped while a tool ran)[/dim]")
            return None
        if round_ is not None:
            show_round(answer, round_)
        return round_


def show_round(answer: str, round_: ToolRound) -> None:
    """Each call of the turn `answer` and what it answered, dimmed on stderr (stdout has the model's words)."""
    for call, outcome in zip(parse_turn(answer).calls, round_.outcomes):
        what = (
            f"{call.name} {json.dumps(dict(call.arguments), ensure_ascii=False)}"
            if isinstance(call, ToolCall)
            else call.text
        )
        mark = "result" if outcome.kind == "ok" else outcome.kind.replace("_", " ")
        console.print(f"[dim]  {escape(f'[call] {what}')}[/dim]")
        console.print(f"[dim]  {escape(f'[{mark}] {outcome.text}')}[/dim]")


def run_interactive(
    config: ChatConfig, model: Any, tokenizer: Any, template: ChatTemplate, agents: Agents | None = None
) -> None:
    try:  # line editing and history (arrow keys) for input()
        import readline  # noqa: F401
    except ImportError:
        pass
    session = ChatSession(config, model, tokenizer, template, sys.stdout, agents)
    console.print(
        f"[bold]rlkit chat[/bold] {config.model} (template {template.name}, temperature {session.temperature:g}); {COMMANDS_HELP}"
    )
    if agents is not None:
        console.print(f"[dim]{escape(agents.describe())}[/dim]")
    while True:
        try:
            console.print("[bold cyan]you>[/bold cyan] ", end="")
            line = input()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim](/exit or Ctrl-D to quit)[/dim]")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        console.print("[bold green]model>[/bold green] ", end="")
        session.reply(line)


def run_chat(config: ChatConfig) -> None:
    if not config.model:
        raise InputError("missing argument MODEL")
    interactive = sys.stdin.isatty()
    if interactive and config.n > 1:
        raise InputError("--n applies when stdin is piped; on a terminal each message gets one reply")
    check_tool_options(config.tools, config.max_turns)
    source = resolve_source(config.model)
    if is_reward_model(source):
        raise InputError(
            f"{config.model} is a reward model (sequence classifier); it scores text and cannot chat (use `rlkit eval --completions ... --reward {config.model}`)"
        )
    tokenizer = load_tokenizer(source)
    template = resolve_template(config.template, tokenizer, config.model)
    agents = None
    if config.tools:  # imported, described and the template checked from the tokenizer alone
        agents = load_agents(config.tools, None, tokenizer, template, config.max_turns, config.tool_timeout or None)
    model = load_causal_lm_for_inference(source, inference_dtype(config.dtype))
    hint = dtype_hint(config.dtype)
    if hint:
        info(hint)
    if interactive:
        run_interactive(config, model, tokenizer, template, agents)
    else:
        run_piped(config, model, tokenizer, template, sys.stdin, sys.stdout, agents)
