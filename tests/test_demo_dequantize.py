"""The demo's one-time GGUF -> transformers dir: bad input is one error line, nothing written;
the dir it writes is the model a GGUF load gives."""

from pathlib import Path

import pytest
import torch

from rlkit.demo.dequantize import main

REPO = Path(__file__).resolve().parents[1]
DEMO_GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_not_a_gguf_is_refused_and_nothing_written(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "base"
    assert "not a .gguf file" in _fails(capsys, str(tiny_model_dir), str(out))
    assert "no such GGUF file" in _fails(capsys, str(tmp_path / "missing.gguf"), str(out))
    assert not out.exists() and not (tmp_path / "base.partial").exists()


def test_an_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "base"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in _fails(capsys, str(gguf), str(out))
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_dir_is_the_model_a_gguf_load_gives(tmp_path):
    if not DEMO_GGUF.is_file():
        pytest.skip("`make demo-model` fetches the demo .gguf")
    from rlkit.data.prompts import encode_prompt
    from rlkit.data.templates import resolve_template
    from rlkit.models.load import load_causal_lm, load_tokenizer, resolve_source

    out = tmp_path / "base"
    assert main([str(DEMO_GGUF), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (tmp_path / "base.partial").exists()
    gguf, plain = resolve_source(str(DEMO_GGUF)), resolve_source(str(out))
    tokenizers = load_tokenizer(gguf), load_tokenizer(plain)
    conversation = [{"role": "user", "content": "What is 17 + 25?"}]
    prompts = [encode_prompt(t, resolve_template(None, t), conversation) for t in tokenizers]
    assert prompts[0] == prompts[1]
    text = "Sure! 17 + 25 = 42. Cheers! #done émoji 🙂"
    assert tokenizers[0](text).input_ids == tokenizers[1](text).input_ids
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        logits = [load_causal_lm(s).eval()(input_ids=ids).logits for s in (gguf, plain)]
    assert torch.equal(logits[0], logits[1])


def test_a_gguf_is_parsed_once_inside_and_as_usual_outside(tmp_path):
    import gguf
    import numpy as np

    from rlkit.demo.dequantize import parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_tensor("w", np.ones((2, 3), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with parsed_once():
        first, again = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is again and first.get_tensor(0).name == "w"
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(path) is not first
