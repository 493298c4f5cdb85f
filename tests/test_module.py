"""InferenceModule pins its parameters, buffers and submodules as plain attributes once placed;
a pin must never disagree with nn.Module's own tables."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quill.layers.norm import RMSNorm


def test_placing_a_layer_pins_its_members_and_later_changes_win():
    norm = RMSNorm(4, 1e-6)
    assert "weight" not in vars(norm)
    norm.to("cpu")
    assert vars(norm)["weight"] is norm._parameters["weight"]  # read without nn.Module.__getattr__
    replacement = nn.Parameter(torch.zeros(4), requires_grad=False)
    norm.weight = replacement
    assert norm.weight is replacement is norm._parameters["weight"]
    norm.to(torch.float64)  # replaces the parameter in the table: the pin follows
    assert norm.weight is norm._parameters["weight"] and norm.weight.dtype == torch.float64
    del norm.weight
    with pytest.raises(AttributeError):
        norm.weight  # noqa: B018
    norm.eps_copy = 1.0  # plain attributes behave as ever
    del norm.eps_copy
    assert not hasattr(norm, "eps_copy")
