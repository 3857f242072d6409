"""trainer.precision: which dtype the forwards compute in, and what stays float32."""

import pytest
import torch

from trainer.precision import autocast, compute_dtype


def test_model_dtype_names_map_to_the_autocast_dtype_and_float16_is_refused():
    assert compute_dtype("float32") is None
    assert compute_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype='float16': expected float32 or bfloat16"):
        compute_dtype("float16")


def test_under_bf16_autocast_the_matmul_runs_in_bf16_while_weights_and_gradients_stay_fp32():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with autocast(torch.device("cpu"), torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # the bf16 product itself: equal to the matmul of bf16-rounded inputs, not to the fp32 one
    rounded = torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()
    assert torch.equal(out.float(), rounded) and not torch.equal(out.float(), layer(x))
    out.float().sum().backward()
    assert layer.weight.dtype == layer.weight.grad.dtype == torch.float32


def test_without_a_dtype_autocast_changes_nothing():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with autocast(torch.device("cpu"), None):
        out = layer(x)
    assert out.dtype == torch.float32 and torch.equal(out, layer(x))
