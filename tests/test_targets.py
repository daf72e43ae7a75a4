"""targets.py: the plumbing every method shares, against brute force over the model's modules and
torch's own Linear and (unfused) AdamW."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_model
from targets import LINEAR_NAMES, adamw, find_linears, plain_linear, replace_module


def test_find_linears_is_every_named_linear_in_model_order():
    model = tiny_model()
    for targets in (LINEAR_NAMES, ("q_proj",), "down_proj", ("up_proj", "v_proj")):
        names = [targets] if isinstance(targets, str) else targets
        want = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in names]
        got = find_linears(model, targets)
        assert [n for n, _ in got] == want and all(m is model.get_submodule(n) for n, m in got)
    assert len(find_linears(model, LINEAR_NAMES)) == 7 * model.config.n_layers  # lm_head is not a target
    with pytest.raises(ValueError, match=r"'qproj' matches no Linear.*down_proj, .*q_proj"):
        find_linears(model, ["q_proj", "qproj"])


def test_plain_linear_wraps_the_same_tensors_and_replace_module_swaps_it_in():
    model = tiny_model()
    lin = model.layers[1].mlp.down_proj
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(0))
    new = plain_linear(lin.weight)
    assert new.weight is lin.weight and new.bias is None  # no copy, no new allocation
    assert torch.equal(new(x), F.linear(x, lin.weight))
    b = nn.Parameter(torch.randn(lin.out_features))
    assert torch.equal(plain_linear(lin.weight, b)(x), F.linear(x, lin.weight, b))
    replace_module(model, "layers.1.mlp.down_proj", new)
    assert model.layers[1].mlp.down_proj is new
    replace_module(model, "norm", nn.Identity())  # a top-level name
    assert isinstance(model.norm, nn.Identity)


def test_adamw_names_its_params_and_steps_as_the_unfused_reference():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(5, 4, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()]
    ref = [p.detach().clone().requires_grad_() for p in w]
    opt = adamw([("a", w[0]), ("b", w[1])], 1e-2, (0.9, 0.95), 1e-8, 0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    assert opt.param_groups[0]["param_names"] == ["a", "b"] and opt.defaults["fused"]  # CPU fp32: fused
    for _ in range(3):
        for p, q in zip(w, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(w, ref))
    # float64 has no fused kernel: the plain one
    assert not adamw([torch.zeros(2, dtype=torch.float64, requires_grad=True)], 1e-3, (0.9, 0.999), 1e-8, 0).defaults["fused"]
