"""The skeleton's module states: set without ``Module.__setstate__`` where that changes nothing, and
through it (or a class's own ``__setstate__``) everywhere else."""

from __future__ import annotations

import pytest
import torch

from ray_zerocopy import _tensors
from ray_zerocopy._tensors import rebuild_model, split_model


class Restored(torch.nn.Linear):
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.restored = True


def _rebuilt(model: torch.nn.Module) -> torch.nn.Module:
    split = split_model(model)
    return rebuild_model(split.skeleton, split.weights, split.layouts)


@pytest.mark.unit
def test_a_class_with_its_own_setstate_gets_it_called():
    loaded = _rebuilt(torch.nn.Sequential(Restored(2, 2), torch.nn.MultiheadAttention(4, 2)))
    assert loaded[0].restored
    assert loaded[1]._qkv_same_embed_dim  # (MultiheadAttention has a __setstate__ of its own too)


@pytest.mark.unit
def test_a_state_missing_what_module_setstate_adds_still_gets_it():
    """A module unpickled from an old checkpoint and never fixed lacks attributes: Module.__setstate__
    adds them on load, so the skeleton keeps the plain path for it."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    del model[0].__dict__["_forward_pre_hooks_with_kwargs"]
    loaded = _rebuilt(model)
    assert isinstance(loaded[0]._forward_pre_hooks_with_kwargs, dict)
    loaded(torch.ones(1, 2))  # the forward pre-hook path reads it


@pytest.mark.unit
def test_an_actor_whose_torch_adds_an_attribute_gets_it(monkeypatch):
    """The driver's torch records which attributes every state has; an actor whose Module adds one more
    (a newer torch) sets each state through its own Module.__setstate__."""
    split = split_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    older = _tensors._SETSTATE

    def newer(self: torch.nn.Module, state: dict) -> None:
        older(self, state)
        self.__dict__.setdefault("_added_by_a_newer_torch", True)

    monkeypatch.setattr(torch.nn.Module, "__setstate__", newer)
    monkeypatch.setattr(_tensors, "_SETSTATE", newer)
    monkeypatch.setattr(_tensors, "_ATTRS", _tensors._ATTRS | {"_added_by_a_newer_torch"})
    loaded = rebuild_model(split.skeleton, split.weights, split.layouts)
    assert all(m._added_by_a_newer_torch for m in loaded.modules())

