"""FSDP2 sharding the engine applies itself, and the saves a sharded model needs.

Why the engine shards at all: accelerate configured with `cpu=True` (how a torchrun launch without
GPUs gets gloo) reports MULTI_CPU and ignores an FSDP plugin, so `--fsdp` on CPUs, or on GPUs
launched without an accelerate FSDP config, is done here with `torch.distributed.fsdp.fully_shard`:
each transformer block is one FSDP unit (its parameters all-gathered for its forward and backward,
then freed), the root holds the rest (embeddings, head, norms). Under `accelerate launch
--config_file examples/accelerate/fsdp.yaml` accelerate's FSDP2 plugin shards instead and nothing
here runs, except the saves, which work on either (both make DTensor parameters).

Under DeepSpeed (`accelerate launch` with examples/accelerate/deepspeed_zero2.yaml or _zero3.yaml)
the final save gathers through accelerate's `get_state_dict` instead (`gather_deepspeed_in_place`);
its checkpoints are DeepSpeed's own, written and read by accelerate's save_state/load_state.

Saves: a sharded parameter is a DTensor holding 1/world of the rows on each process, so neither
`unwrap_model().state_dict()` nor `save_pretrained` on one process sees the weights. The final
save gathers a full state dict (every process takes part, process 0 receives it on the CPU);
checkpoints stay sharded (torch.distributed.checkpoint: each process writes its own shard, and a
resumed run reads them back into the same layout).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

#: Where a checkpoint keeps the sharded model and optimizer state (beside accelerate's files).
SHARDED_DIR = "sharded"


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2, by the engine or by accelerate's plugin)."""
    dtensor = _dtensor()
    return any(isinstance(p, dtensor) for p in model.parameters())


def _block_classes(model: torch.nn.Module) -> set[str]:
    """The transformer block classes of every HF model inside `model` (`_no_split_modules`:
    the unit HF itself never splits across devices)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def shard(model: torch.nn.Module, device: torch.device, frozen: bool = False) -> torch.nn.Module:
    """Shard `model` in place over every process (one FSDP unit per transformer block, then the root).

    Must run before the optimizer is built: the optimizer has to hold the sharded parameters.
    `frozen` (a reference model, only ever run under no_grad): the root reshards after its forward
    too; by default FSDP2 keeps the root gathered until the backward, which a frozen model never runs.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns when the root returns a view (HF's logits slice): only an in-place op on it
    # would skip the all-gather, and none follows (tests/test_fsdp.py checks the weights against
    # a one-process run)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = _block_classes(model)
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if frozen else {}))
    return model


def local_share(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model) over the sharded parameters."""
    dtensor = _dtensor()
    local = total = 0
    for p in model.parameters():
        if isinstance(p, dtensor):
            local += p.to_local().numel()
            total += p.numel()
    return local, total


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict on process 0 (empty elsewhere); every process must call it.

    `trainable_only` (a LoRA adapter's save) leaves the frozen base out: gathering frozen FSDP2
    parameters is also where full-state-dict saves of LoRA runs hang (pytorch issue 169448).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def gather_in_place(model: torch.nn.Module, is_main: bool) -> None:
    """Make `model` an ordinary, unsharded module on the main process (every process must call this).

    After it, the main process's own save path runs unchanged (save_pretrained, a reward model's
    LoRA merge, PPO's value head beside the policy): each sharded parameter is replaced by its full
    tensor, gathered by `get_model_state_dict`. FSDP2's state-dict hook, which would reshard, does
    nothing while the group still counts as resharded (as after every forward). The other processes
    keep their shards; the model is not trained further.
    """
    full = full_state_dict(model)
    if is_main:
        dtensor = _dtensor()
        replace_parameters(model, full, lambda p: isinstance(p, dtensor))


def replace_parameters(model: torch.nn.Module, full: dict[str, torch.Tensor], which: Any = None) -> None:
    """Each parameter of `model` (those `which(param)` selects) replaced by its full tensor in `full`,
    keyed as `model.state_dict()` names it; one missing from `full` is kept (a tied weight, saved once,
    is reached under its other name too)."""
    done: dict[int, torch.nn.Parameter] = {}  # tied weights stay one parameter
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None or (which is not None and not which(param)):
                continue
            key = f"{prefix}.{name}" if prefix else name
            if id(param) not in done and key in full:
                done[id(param)] = torch.nn.Parameter(full[key], requires_grad=param.requires_grad)
            if id(param) in done:
                module._parameters[name] = done[id(param)]


def gather_deepspeed_in_place(accelerator: Any, model: torch.nn.Module) -> None:
    """The DeepSpeed counterpart of `gather_in_place`, through accelerate as it documents: every process
    calls `get_state_dict` (under ZeRO-3 the 16-bit gather of the partitioned parameters, which
    `zero3_save_16bit_model: true` enables; under ZeRO-2 the parameters are whole already), and the
    main process's unwrapped model takes the gathered tensors in place of its partitions."""
    full = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        replace_parameters(accelerator.unwrap_model(model), full)


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state in the distributed checkpoint format: one shard file per process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / SHARDED_DIR))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read `save_sharded`'s files back into the (identically sharded) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def total_norm(norm: Any) -> Any:
    """A gradient norm clip_grad_norm_ returns as a DTensor, made an ordinary (replicated) tensor."""
    return norm.full_tensor() if isinstance(norm, _dtensor()) else norm
