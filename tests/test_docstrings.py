"""The library's docstring examples run and print what they show."""

import doctest

import pytest

import dsl_tf
from dsl_tf import callbacks, layers, masks, optimizers, schedules, selection


@pytest.mark.parametrize("module", [layers, masks, selection, schedules, callbacks, optimizers],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    results = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
                              extraglobs={"dsl_tf": dsl_tf})
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("name", ["trainers.models", "trainers.early_stopping", "trainers.evaluation"])
def test_trainers_docstring_examples(name):
    import importlib

    results = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
