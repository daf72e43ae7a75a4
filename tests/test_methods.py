"""methods.py: the table of methods and the contract every method file meets; the loop and the
checkpoints meet a method only through it (they name none); each method states its update once
(merge folds exactly what merge_adapter computes)."""
import dataclasses
import inspect
import itertools

import pytest
import torch

from conftest import ROOT, SETTINGS_OF, make_batches, merge, prepare, run_steps, tiny_model
from methods import METHODS, trains_base

RUN_FACTS = {"seed", "total_steps", "grad_accum", "n_train", "lr_first"}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_file_meets_the_contract(method):
    module, cls = METHODS[method]
    assert dataclasses.is_dataclass(cls) and all(f.metadata.get("source") for f in dataclasses.fields(cls))
    params = inspect.signature(module.prepare).parameters
    assert list(params)[:3] == ["model", "s", "batches"]
    assert {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} == RUN_FACTS  # the same keywords
    assert list(inspect.signature(module.merge).parameters) == ["model", "optimizer", "s"]
    if not trains_base(module):
        assert list(inspect.signature(module.adapter_state).parameters)[:2] == ["model", "optimizer"]
        assert list(inspect.signature(module.merge_adapter).parameters) == ["base", "adapter", "s"]


def test_the_loop_and_the_checkpoints_name_no_method():
    for f in ("train.py", "checkpoint.py"):
        text = (ROOT / f).read_text()
        for name in METHODS:
            assert f'"{name}"' not in text and f"'{name}'" not in text, (f, name)


@pytest.mark.parametrize("method", [m for m in METHODS if not trains_base(METHODS[m][0])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_folds_what_merge_adapter_computes(method, dtype):
    """After a few steps, merge leaves in every weight merge_adapter's result (from the weights as
    they were) rounded once into the weight's dtype: the update is stated once; and outside the
    adapted matrices nothing changes."""
    model = tiny_model().to(dtype)
    data = make_batches(4, 4, seed=1, task="prompt")
    opt = prepare(method, model, itertools.cycle(data), **({"interval": 2} if method == "lift" else {}))
    run_steps(model, opt, itertools.cycle(data), 3)
    module, s = METHODS[method][0], SETTINGS_OF[id(opt)]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expect = module.merge_adapter(before, module.adapter_state(model, opt), s)
    assert expect and all(v.dtype == torch.float32 for v in expect.values())
    merge(method, model, opt)
    after = model.state_dict()
    for k, v in after.items():
        assert v.dtype == dtype and torch.equal(v, expect[k].to(dtype) if k in expect else before[k]), k
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
