"""Dequantize the demo's GGUF file once into a plain transformers dir.

Why: transformers dequantizes a `.gguf` on every load (about 20 s for SmolLM2-135M's Q4_1 on a
2-core CPU, the tokenizer converted too), and the demo loads its base a dozen times; the float32
safetensors dir it writes here loads in about 2 s. The weights are the ones every load of the
GGUF gives (the same dequantization, saved in float32), so the demo trains the same model.

The dir appears only when complete (rlkit.output), like every rlkit output.
Usage: python -m rlkit.demo.dequantize MODEL.gguf OUT_DIR [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlkit.console import info
from rlkit.errors import InputError, RlkitError
from rlkit.models.load import load_causal_lm, load_tokenizer, resolve_source
from rlkit.output import check_output, finalize, open_run_dir, release_output_locks


@contextmanager
def parsed_once() -> Iterator[None]:
    """Inside, every `gguf.GGUFReader(path)` of the same file is one reader, parsed once.

    transformers opens a GGUF three times for one model, each time parsing every metadata field
    (SmolLM2's 49k vocabulary strings and merges, one small numpy view each): for the tokenizer, the
    config and the weights, ~4 s each here. The reader is only read from, so sharing it changes
    nothing but the time."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # transformers imports it from the module at each call
    try:
        yield
    finally:
        gguf.GGUFReader = original


def dequantize(gguf: str, output: str, overwrite: bool = False) -> Path:
    """Write the GGUF's model and tokenizer, float32, to `output`; return it."""
    if Path(gguf).suffix != ".gguf":
        raise InputError(f"{gguf}: not a .gguf file; give the GGUF model to dequantize")
    source = resolve_source(gguf)
    out = check_output(output, overwrite, resume=False)
    with parsed_once():
        tokenizer = load_tokenizer(source)
        model = load_causal_lm(source, torch.float32)
    run_dir = open_run_dir(out, resume=False)
    model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    info(f"{gguf}: dequantized to float32 in {out}")
    return finalize(run_dir, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlkit.demo.dequantize", description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the .gguf model file")
    parser.add_argument("output", help="the transformers dir to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    try:
        print(dequantize(args.gguf, args.output, args.overwrite))
    except RlkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        release_output_locks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
