"""One huge record costs what its first --max-length tokens cost (texts are cut by characters first).

The peak-memory test runs `rlkit pack` in a fresh interpreter and reads that process's own peak (VmHWM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

from rlkit.data.tokenize import char_budget, encode_clipped

WORDS = "the quick brown fox jumps over the lazy dog "


def test_clipping_keeps_the_first_max_length_tokens_exactly(tiny_tokenizer):
    long = WORDS * 2000 + "caf\u00e9 " * 500
    for max_length in (8, 64, 300):
        full = tiny_tokenizer(long, add_special_tokens=False).input_ids
        [clipped] = encode_clipped(tiny_tokenizer, [long], max_length)
        assert len(long) > char_budget(tiny_tokenizer, max_length)  # it was cut
        assert len(clipped) > max_length and clipped[:max_length] == full[:max_length]
    short = ["short text", ""]
    assert encode_clipped(tiny_tokenizer, short, 8) == tiny_tokenizer(short, add_special_tokens=False).input_ids


PACK_ONE_HUGE_LINE = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from conftest import build_tokenizer
from typer.testing import CliRunner
from rlkit.cli import app
root = Path(sys.argv[1])
build_tokenizer().save_pretrained(root / "tok")
result = CliRunner().invoke(app, ["pack", str(root / "big.jsonl"), "--tokenizer", str(root / "tok"),
                                  "-o", str(root / "out"), "--max-length", "128"])
# VmHWM is this address space's own peak; ru_maxrss also holds the parent's (pytest's) peak,
# inherited through the vfork + exec that started this process
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak_kib = int(hwm[0]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"exit": result.exit_code, "output": result.output[-500:], "peak_mib": peak_kib / 1024}))
"""


def test_a_50mb_line_packs_under_1gb_peak_rss(tmp_path):
    """Tokenised whole, this line peaked at 9.8 GB RSS (and took 3 minutes); cut first, ~0.65 GB."""
    text = WORDS * (50_000_000 // len(WORDS))
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "a short one"}) + "\n")
    del text
    run = subprocess.run(
        [sys.executable, "-c", PACK_ONE_HUGE_LINE, str(tmp_path), str(REPO / "tests")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "RLKIT_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["exit"] == 0, report["output"]
    assert (tmp_path / "out").is_dir()
    assert report["peak_mib"] < 1024, report


def test_a_huge_prompt_is_dropped_untokenised_and_the_others_kept(tiny_tokenizer, monkeypatch, capsys):
    """ppo and grpo keep the prompts that leave room for --max-new-tokens; a 20 MB one is dropped
    by its length in characters, never handed to the tokenizer."""
    from rlkit.data import prompts
    from rlkit.data.templates import resolve_template

    template = resolve_template("chatml", tiny_tokenizer)
    conversations = [
        [{"role": "user", "content": "short"}],
        [{"role": "user", "content": WORDS * 500_000}],  # ~22 MB
        [{"role": "user", "content": WORDS * 20}],  # a few hundred tokens: over the room, under the budget
        [{"role": "user", "content": "also short"}],
    ]
    seen: list[int] = []
    encode = prompts._encode_rendered
    monkeypatch.setattr(prompts, "_encode_rendered", lambda tok, text: seen.append(len(text)) or encode(tok, text))
    kept, encoded = prompts.prompts_that_fit(tiny_tokenizer, template, conversations, room=64)
    assert kept == [0, 3]
    assert encoded == [prompts.encode_prompt(tiny_tokenizer, template, conversations[i]) for i in kept]
    assert max(seen) < 10_000  # the huge one never reached the tokenizer
    assert "2 of 4 prompts are longer than --max-length - --max-new-tokens (64 tokens)" in capsys.readouterr().err
