"""Distribution, applied in one place (model code is written for one device).

- ``ddp``: Ray's ``prepare_model`` (DistributedDataParallel); every rank holds the whole model.
- ``fsdp``: PyTorch's FSDP2 (``fully_shard``): each transformer layer is a shard unit, then the
  rest of the model; parameters, gradients and optimizer state are split across ranks. Unlike
  FSDP1 it runs on CPU (gloo) too, so it is tested here.

Checkpoints hold *full* (unsharded) state dicts whatever the strategy, so any checkpoint loads
into a plain one-device model (evaluation, ``init_from``). Gathering them is collective under
FSDP: every rank must call :func:`full_state`.
"""

from __future__ import annotations

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers that the networks inside ``model`` name as theirs (each network's
    ``shard_units()``), in module order: FSDP's units of sharding (one all-gather each in
    forward/backward) and ``torch.compile``'s units. The loop knows no model: a network without
    ``shard_units`` is sharded whole, with the model."""
    named = {id(unit) for module in model.modules() if callable(getattr(module, "shard_units", None))
             for unit in module.shard_units()}
    return [m for m in model.modules() if id(m) in named]


def compile_layers(model: nn.Module) -> int:
    """``torch.compile`` every transformer layer in place; returns how many.

    Per layer, not the whole model: the losses gather masked positions (data-dependent shapes) and
    read logs to the host, which break a whole-model graph into ~20 pieces; a layer is one graph
    with no break, compiled once and reused by every layer of the same shape. In place
    (``Module.compile``), so parameter names, and with them checkpoints, stay the same.
    """
    layers = transformer_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def parallelize(model: nn.Module, strategy: str, world: int, device: torch.device) -> nn.Module:
    model = model.to(device)
    if world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in transformer_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from ray.train.torch import prepare_model

    # Gradients written straight into DDP's all-reduce buckets (no second copy of them); the
    # default 25 MB buckets let the all-reduce of late layers overlap the backward of early ones.
    return prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state), unsharded, on CPU. Collective under FSDP."""
    if not is_sharded(model):
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Load what :func:`full_state` saved (every rank reads the whole checkpoint)."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def local_value(tensor: torch.Tensor) -> float:
    """A scalar that may be a DTensor (e.g. FSDP's gradient norm) as a plain float."""
    return float(tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor)
