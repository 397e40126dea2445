"""Load a policy from whatever the user points at, ready to train.

MODEL may be a full HF dir, a hub name (where the hub is reachable), a LoRA adapter dir
(the base it names is loaded and the adapter continues training), or a `.gguf` file
(dequantized to float; its GGUF marker is removed so it can be trained and saved as a plain
model, which transformers otherwise refuses).

A damaged dir (a truncated weights file, a config that is not JSON) is one error line naming
it, whichever library finds the damage; a reward model given where a causal LM is needed is
refused, since transformers would quietly load its trunk under a random LM head.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.errors import InputError


@dataclass
class ModelSource:
    """Where weights and tokenizer come from: `path`/`gguf_file` for from_pretrained."""

    name: str
    path: str
    gguf_file: str | None = None
    adapter_dir: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def weights(self) -> str:
        """The base weights as a user names them: the .gguf file itself, else the dir or hub name."""
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path


#: What from_pretrained raises for a file cut short or garbled (beside OSError/ValueError for a missing one).
DAMAGED = (SafetensorError, EOFError, pickle.UnpicklingError, json.JSONDecodeError, UnicodeDecodeError)


def damaged(name: str, what: str, err: BaseException) -> InputError:
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return InputError(
        f"{name}: cannot load {what}: a file in it is truncated or damaged ({type(err).__name__}: {first}); "
        "re-create or re-download it"
    )


@contextlib.contextmanager
def loading(name: str, what: str) -> Iterator[None]:
    """Turn a library's failure to load `name` as `what` into one line; a damaged file says so."""
    try:
        yield
    except DAMAGED as err:
        raise damaged(name, what, err)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise InputError(f"{name}: cannot load {what} ({(str(err).splitlines() or [type(err).__name__])[0]})")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a model or adapter dir (config.json, adapter_config.json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({err})")
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); the dir is damaged, re-create it")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def adapter_config(directory: str | Path) -> dict[str, Any]:
    return read_json(Path(directory) / "adapter_config.json")


def resolve_source(name: str) -> ModelSource:
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{name}: no such GGUF file")
        return ModelSource(name, str(path.parent), gguf_file=path.name)
    if (path / "adapter_config.json").is_file():
        base = adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise InputError(f"{name}: adapter_config.json names no base model")
        inner = resolve_source(base)
        return ModelSource(name, inner.path, inner.gguf_file, adapter_dir=str(path))
    if path.exists() and not any((path / f).is_file() for f in ("config.json", "tokenizer_config.json")):
        raise InputError(
            f"{name}: not a model directory (no config.json, adapter_config.json or tokenizer_config.json)"
        )
    return ModelSource(name, name)


def base_of(source: ModelSource) -> ModelSource:
    """The base weights under `source` (itself when it is no adapter)."""
    return ModelSource(source.weights, source.path, source.gguf_file)


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    """The adapter dir's own tokenizer when it has one (it carries the chat template used)."""
    where = (
        source.adapter_dir
        if source.adapter_dir and (Path(source.adapter_dir) / "tokenizer_config.json").is_file()
        else None
    )
    with loading(source.name, "a tokenizer"):
        try:
            if where:
                tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
            else:
                tokenizer = AutoTokenizer.from_pretrained(
                    source.path, trust_remote_code=trust_remote_code, **source.kwargs()
                )
        except Exception as err:  # the `tokenizers` library raises bare Exceptions for a garbled tokenizer.json
            if isinstance(err, (*DAMAGED, OSError, ValueError, RuntimeError, KeyError)):
                raise
            raise ValueError(str(err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def strip_gguf_marker(model: torch.nn.Module) -> None:
    """A GGUF-loaded model is dequantized already; drop the marker that blocks training/saving."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and type(quantizer).__name__.lower().startswith("gguf"):
        quantizer.remove_quantization_config(model)


def nf4_config(compute_dtype: torch.dtype) -> Any:
    """QLoRA's 4-bit storage (Dettmers et al. 2023): NF4 blocks of 64 weights, their absmax scales
    quantized again (double quantisation), matmuls in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantized_4bit(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model under a PeftModel) holds bitsandbytes 4-bit weights."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a `Linear4bit`'s first forward in eval mode on an input that needs
    no gradient (a reference pass, an evaluation) repacks its weight for good, and every later
    forward takes a kernel with no backward: the gradient stops there, and torch only warns
    ("an autograd kernel was not registered"). A QLoRA base runs eval and training forwards
    alternately, so the repacking is switched off (the training kernel serves both).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_causal_lm(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    load_in_4bit: torch.dtype | None = None,
) -> torch.nn.Module:
    """The model to train; an adapter dir comes back as a trainable PeftModel.

    `load_in_4bit`: the compute dtype of a QLoRA base, whose linear layers (not the output
    layer) are loaded as NF4 `Linear4bit`; peft's `prepare_model_for_kbit_training` then freezes
    it and keeps its other weights (norms, embeddings, head) in float32.
    """
    if is_reward_model(source):
        raise InputError(
            f"{source.name} is a reward model (a sequence classifier: one score per text), not a causal LM that "
            "generates; give the policy it was trained from, and the reward model as --reward (ppo, eval)"
        )
    quantized = {"quantization_config": nf4_config(load_in_4bit)} if load_in_4bit is not None else {}
    with loading(source.name, "a causal LM"):
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, trust_remote_code=trust_remote_code, **source.kwargs(), **quantized
        )
    strip_gguf_marker(model)
    if quantized:
        from peft import prepare_model_for_kbit_training

        # rlkit's own --gradient-checkpointing (enable_gradient_checkpointing) runs later, for every model
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layers_differentiable(model)
    contiguous_output_layer_input(model)
    if source.adapter_dir:
        from peft import PeftModel

        with loading(source.adapter_dir, "the LoRA adapter"):
            model = PeftModel.from_pretrained(model, source.adapter_dir, is_trainable=True)
    return model


def is_reward_model(source: ModelSource) -> bool:
    """True for a sequence-classification dir (or a SEQ_CLS adapter), which scores instead of generating."""
    if source.adapter_dir:
        return adapter_config(source.adapter_dir).get("task_type") == "SEQ_CLS"
    config = Path(source.path) / "config.json"
    if source.gguf_file or not config.is_file():
        return False
    architectures = read_json(config).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _contiguous_first_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def contiguous_output_layer_input(model: torch.nn.Module) -> None:
    """Hand the output layer a contiguous input.

    transformers gives it a strided slice of the hidden states (`hidden[:, -k:]`: the last
    position when generation starts, or `logits_to_keep`), and on CPU a linear layer whose
    weight does not require grad (a LoRA base, a reference, a model loaded for chat or eval)
    takes a slow path for a strided input: 1.2 s instead of 7 ms for SmolLM2's bf16 output
    layer at the prefill of 8 prompts, 2x slower in fp32. A contiguous copy of [B, k, H] is cheap.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(_contiguous_first_input)


def add_lora(
    model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: str, task_type: str = "CAUSAL_LM"
) -> torch.nn.Module:
    """Wrap `model` in a fresh LoRA adapter (an adapter dir input already has one)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        return model
    target_modules: Any = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise InputError(
            f"--lora-targets {targets}: {(str(err).splitlines() or ['no such modules'])[0]} "
            f"(its linear layers: {', '.join(linear)}; or all-linear)"
        )


def drop_frozen_adapters(model: torch.nn.Module) -> list[str]:
    """Delete the adapters loaded frozen beside a PEFT model's trained one (a continued adapter's
    start kept as the reference, a teacher adapter), and return their names. Why before saving:
    peft's `save_pretrained` writes every loaded adapter, the others into subdirectories of OUT
    (`OUT/reference/`), a second copy that is no part of the result."""
    from peft import PeftModel

    dropped = []
    for peft_model in [m for m in model.modules() if isinstance(m, PeftModel)]:
        for name, adapter in list(peft_model.peft_config.items()):
            if adapter.inference_mode and name != peft_model.active_adapter:
                peft_model.delete_adapter(name)
                dropped.append(name)
    return dropped


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing. transformers 5.25 renamed `gradient_checkpointing_enable`
    (which now warns on every call) to `activation_checkpointing_enable`; earlier 5.x have the old name only."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
