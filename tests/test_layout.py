"""The repository's layout: every source file has its test file, and every name the file split moved
is still importable from its old module, as the same object as in its new home."""
import importlib

import pytest

from conftest import ROOT


def test_every_source_file_has_its_test_file():
    missing = [p.name for p in sorted(ROOT.glob("*.py")) if not (ROOT / "tests" / f"test_{p.name}").exists()]
    assert not missing, f"no tests/test_<file>.py for {missing}"


@pytest.mark.parametrize("old", ["model", "train", "eval_math", "claims"])
def test_moved_names_stay_importable_from_their_old_modules(old):
    module = importlib.import_module(old)
    assert module._MOVED
    for name, new in module._MOVED.items():
        assert getattr(module, name) is getattr(importlib.import_module(new), name), (old, name)
        assert name not in vars(module), (old, name)  # moved, not a second definition
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(module, "no_such_name")


def test_old_imports_of_the_loop_and_the_model_still_work():
    import cli
    import full
    import generate
    import model
    import train
    import weights
    assert model.generate is generate.generate and model.load is weights.load  # forks import these from model
    assert train.parse_args is cli.parse_args and train.METHODS is cli.METHODS
    assert train.Full is full.Settings and train.prepare is full.prepare
    assert cli.METHODS["full"] == (full, full.Settings)
