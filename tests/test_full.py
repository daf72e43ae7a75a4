"""full.py: full fine-tuning trains every parameter with plain AdamW at LIFT's loop settings and has
nothing to merge (the loop against AdamW written out by hand: test_train.py)."""
from dataclasses import fields

import torch

import full
from conftest import tiny_model


def test_prepare_trains_every_parameter_and_merge_changes_nothing():
    model = tiny_model().requires_grad_(False)
    s = full.Settings()
    opt = full.prepare(model, s, iter(()))
    assert [n for grp in opt.param_groups for n in grp["param_names"]] == [n for n, _ in model.named_parameters()]
    assert all(p.requires_grad for p in model.parameters())
    grp = opt.param_groups[0]
    assert (grp["lr"], grp["betas"], grp["eps"], grp["weight_decay"]) == (s.lr, s.betas, s.eps, s.weight_decay)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full.merge(model, opt, s)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_settings_are_lifts_loop_each_with_its_source():
    s = full.Settings()
    # LIFT, Table 6 (MATH-10K, every method): AdamW, linear decay, batch 16, warmup ratio 0.03, 3 epochs
    assert (s.schedule, s.batch_size, s.warmup_ratio, s.epochs) == ("linear", 16, 0.03, 3.0)
    assert 1e-5 <= s.lr <= 1e-4  # LIFT App. E's full-FT lr grid
    assert all(f.metadata.get("source") for f in fields(s))
