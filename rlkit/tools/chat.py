"""`chat`: talk to a model on a terminal, or turn a stream of prompts into JSONL completions.

One command, two modes chosen by whether stdin is a terminal, so `rlkit chat M` is a REPL
and `rlkit chat M < prompts.jsonl > out.jsonl` is a batch job that `rlkit eval --completions`
reads back. Prompts are encoded exactly as training encoded them (rlkit.data.prompts), so a
model answers here as it did in its evals.

Piped, decoding is greedy unless --temperature is given, so the same input gives the same
output; with sampling, --seed makes it reproducible. On a terminal the default is sampling
(temperature 0.7), because a REPL that always says the same thing is less useful.
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

from rlkit.console import console, info
from rlkit.data.formats import Messages, as_messages
from rlkit.data.prompts import encode_prompt
from rlkit.data.templates import ChatTemplate, resolve_template
from rlkit.data.text import decode_lines
from rlkit.errors import InputError
from rlkit.models.inference import dtype_hint, inference_dtype, is_reward_model, load_causal_lm_for_inference
from rlkit.models.load import load_tokenizer, resolve_source
from rlkit.tools.chat_config import ChatConfig
from rlkit.tools.generation import SamplingConfig, generate_rollouts

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
    config: ChatConfig, model: Any, tokenizer: Any, template: ChatTemplate, stdin: TextIO, stdout: TextIO
) -> int:
    """One JSON line per input (per sample with --n), written as each batch finishes."""
    temperature = config.temperature if config.temperature is not None else 0.0
    sampling = SamplingConfig(config.max_new_tokens, temperature, config.top_p, config.batch_size)
    settings = {
        "temperature": temperature,
        "top_p": config.top_p if temperature > 0 else 1.0,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    per_batch = max(1, config.batch_size // config.n)
    written = 0
    for batch_index, batch in enumerate(_batches(stdin_lines(stdin), per_batch, config.system)):
        seed = None if config.seed is None else config.seed + batch_index
        rollouts = generate_rollouts(model, tokenizer, template, [m for _, m in batch], sampling, n=config.n, seed=seed)
        for k, rollout in enumerate(rollouts):
            prompt = batch[k // config.n][0]
            record = {
                "prompt": prompt,
                "completion": rollout.text,
                **({"sample": k % config.n} if config.n > 1 else {}),
                "model": config.model,
                **settings,
            }
            stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
        stdout.flush()
    if written == 0:
        raise InputError("stdin held no prompts (one per line: plain text, or JSON with 'prompt' or 'messages')")
    info(f"chat: {written} completion(s) written")
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
    """Multi-turn history plus the slash commands; `reply` streams one generated answer."""

    def __init__(self, config: ChatConfig, model: Any, tokenizer: Any, template: ChatTemplate, out: TextIO):
        self.config, self.model, self.tokenizer, self.template, self.out = config, model, tokenizer, template, out
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
        """Generate, streaming to `out`; Ctrl-C stops the reply and keeps what was said."""
        self.history.append({"role": "user", "content": text})
        ids = torch.tensor(
            [encode_prompt(self.tokenizer, self.template, self.messages())], device=next(self.model.parameters()).device
        )
        from transformers import StoppingCriteriaList

        streamer = _streamer(self.tokenizer, self.out)
        sample = self.temperature > 0
        ctrl_c = _CtrlC()
        try:
            with ctrl_c.catching():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.config.max_new_tokens,
                    streamer=streamer,
                    do_sample=sample,
                    temperature=self.temperature if sample else None,
                    top_p=self.config.top_p if sample else None,
                    top_k=None,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([ctrl_c]),
                )
            generated = out[0, ids.shape[1] :].tolist()
            if self.tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(self.tokenizer.eos_token_id)]
            answer = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
            stopped = ctrl_c.requested
        except KeyboardInterrupt:
            stopped = True
        if stopped:  # keep what the user saw
            answer = streamer.shown.strip()
            self.out.write("\n")
            console.print("[dim](stopped)[/dim]")
        self.history.append({"role": "assistant", "content": answer})
        return answer


def run_interactive(config: ChatConfig, model: Any, tokenizer: Any, template: ChatTemplate) -> None:
    try:  # line editing and history (arrow keys) for input()
        import readline  # noqa: F401
    except ImportError:
        pass
    session = ChatSession(config, model, tokenizer, template, sys.stdout)
    console.print(
        f"[bold]rlkit chat[/bold] {config.model} (template {template.name}, temperature {session.temperature:g}); {COMMANDS_HELP}"
    )
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
    source = resolve_source(config.model)
    if is_reward_model(source):
        raise InputError(
            f"{config.model} is a reward model (sequence classifier); it scores text and cannot chat (use `rlkit eval --completions ... --reward {config.model}`)"
        )
    tokenizer = load_tokenizer(source)
    template = resolve_template(config.template, tokenizer, config.model)
    model = load_causal_lm_for_inference(source, inference_dtype(config.dtype))
    hint = dtype_hint(config.dtype)
    if hint:
        info(hint)
    if interactive:
        run_interactive(config, model, tokenizer, template)
    else:
        run_piped(config, model, tokenizer, template, sys.stdin, sys.stdout)
