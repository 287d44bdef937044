"""Int8 weight-only linear layers: exact against their dequantized weights, close to float."""

import pytest
import torch

import mambastep
from mambastep.models.int8 import Int8Linear
from mambastep.ops.products import CONVERTED_ROWS

from conftest import TORCH, activations_as_multiplied, make_hf_checkpoint


@pytest.mark.parametrize("out_features", [36, 2 * CONVERTED_ROWS + 17])  # one block; two and a part
def test_int8_linear_equals_its_dequantized_weight(out_features):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, out_features)
    q = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(2, 5, 48)
    expected = torch.nn.functional.linear(x, q.dequantized(), linear.bias)
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=1e-5)
    # Rounding to 8 bits moves each weight by at most half a step of its row's scale.
    assert ((q.dequantized() - linear.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_int8_model_stays_close_to_float(tmp_path, family):
    path = (
        make_hf_checkpoint(tmp_path / family, family=family, hidden_size=32, num_heads=8)
        if family == "mamba2"
        else make_hf_checkpoint(tmp_path / family, hidden_size=32)
    )
    full, int8 = mambastep.load(path), mambastep.load(path, quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.modules())
    tokens = torch.randint(0, 97, (4, 30), generator=torch.Generator().manual_seed(0))
    expected, _ = full(tokens)
    got, _ = int8(tokens)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    last, state = int8.prefill(tokens[:, :10])
    for t in range(10, 30):
        last, state = int8.step(tokens[:, t], state)
    # The steps' products take their inputs rounded per row to 15-bit integers (the matvec
    # kernel); the whole forward's (120 rows) multiply them as they are.
    torch.testing.assert_close(last, got[:, -1], atol=2e-3, rtol=2e-3)


def test_int8_refuses_what_it_cannot_do(tmp_path):
    path = make_hf_checkpoint(tmp_path / "m")
    with pytest.raises(ValueError, match="int8 weights need float32"):
        mambastep.load(path, dtype=torch.bfloat16, quantize="int8")
    with pytest.raises(ValueError, match="quantize must be one of"):
        mambastep.load(path, quantize="int4")
    with pytest.raises(ValueError, match="cannot save an int8-quantized model"):
        mambastep.save(mambastep.load(path, quantize="int8"), tmp_path / "out")


def test_int8_linear_takes_the_kernel_up_to_its_row_limit(cpp):
    from mambastep.ops.products import WIDE_MATVEC_ROWS, takes_matvec

    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24)
    q = Int8Linear(linear.weight, linear.bias)
    with torch.no_grad():
        for rows in (1, WIDE_MATVEC_ROWS, WIDE_MATVEC_ROWS + 1):
            x = torch.randn(rows, 40)
            assert takes_matvec(x, q.weight_int8, cpp) == (rows <= WIDE_MATVEC_ROWS)
            want = torch.nn.functional.linear(x, q.dequantized(), linear.bias)
            torch.testing.assert_close(q(x, TORCH), want, atol=1e-5, rtol=1e-5)
            if takes_matvec(x, q.weight_int8, cpp):  # its inputs rounded per row to 15-bit integers
                want = torch.nn.functional.linear(
                    activations_as_multiplied(x, torch.int8), q.dequantized(), linear.bias
                )
            torch.testing.assert_close(q(x, cpp), want, atol=1e-5, rtol=1e-5)
