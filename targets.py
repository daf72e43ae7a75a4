"""
The plumbing every PEFT method shares: the target Linear layers by name, replacing a module and
putting a plain Linear back after merging (fold), the AdamW every method's optimizer is, and the
check of a setting that must be a positive finite number.
"""
import math

import torch
import torch.nn as nn

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def positive_finite(x) -> bool:
    """Whether a setting is a positive finite number (a learning rate, an epsilon, LoRA's alpha, a
    standard deviation): the one check every such setting of every method uses."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def find_linears(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers whose last name component is in `targets` (e.g. q_proj, down_proj),
    in model order. A target that matches nothing is an error that lists the names there are."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    seen = {n.split(".")[-1] for n, _ in found}
    for t in targets:
        if t not in seen:
            names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"target module {t!r} matches no Linear layer; the model has: {', '.join(names)}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def plain_linear(weight: nn.Parameter, bias=None) -> nn.Linear:
    """An nn.Linear around existing tensors (no new allocation): what `merge` puts back."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight, lin.bias = weight, bias
    return lin


def wide(W: torch.Tensor) -> torch.Tensor:
    """W in fp32, or in its own dtype where that is wider (float64): the precision merges compute in."""
    return W.to(torch.promote_types(W.dtype, torch.float32))


@torch.no_grad()
def fold(model: nn.Module, adapter: dict, merge_adapter, s):
    """A method's `merge`: its update folded into the live weights, one matrix at a time. For every
    target whose name prefixes keys of `adapter` (what the method's adapter_state returned), W becomes
    merge_adapter({W}, those keys, s), computed in fp32 and rounded once into W's dtype, and a wrapper
    module is replaced by a plain nn.Linear around the same weight. checkpoint.save_merged makes the
    saved file with the same merge_adapter, so for an fp32 base the two are equal bit for bit."""
    for name, m in [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in LINEAR_NAMES]:
        mine = {k: v for k, v in adapter.items() if k.startswith(name + ".")}
        if not mine:
            continue
        W = m.weight
        W.copy_(merge_adapter({f"{name}.weight": W}, mine, s)[f"{name}.weight"].to(W.dtype))
        if not isinstance(m, nn.Linear):
            replace_module(model, name, plain_linear(W, getattr(m, "bias", None)))


def adamw(params, lr: float, betas, eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `params` (tensors, or (name, tensor) pairs, which give param_groups their
    'param_names'). The fused kernel where every tensor is on the CPU or, when there is one, a CUDA
    GPU: one pass over each tensor instead of one per elementwise operation. The hyperparameters
    come from the method's settings."""
    params = list(params)
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    on = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    fused = bool(tensors) and all(t.device.type in on and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused or None)
