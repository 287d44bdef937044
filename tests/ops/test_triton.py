"""The Triton decode kernels against the sequential references, at small awkward sizes (odd
widths, batch 3, a state size that is not a power of two, a random starting state), in every
dtype they take: on the CPU through Triton's interpreter, or on the GPU with TRITON_INTERPRET=0."""

import os

import pytest
import torch
import torch.nn.functional as F

import mambastep
from mambastep.ops import Backend
from mambastep.ops import triton as kernels
from mambastep.ops.reference import causal_conv_ref, selective_scan_ref, ssd_scan_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it unless a GPU run says 0
DEVICE = "cpu" if INTERPRETED else "cuda"
# Inputs rounded to the dtype, both sides sum in float32: what is left is the order of the sums
# and, for a conv's output in bfloat16 / float16, one rounding of the result.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
DTYPES = list(TOL)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, e, n", [(3, 37, 16), (1, 5, 3), (2, 130, 7)])
@pytest.mark.parametrize("options", ["plain", "gated", "bias_softplus"])
def test_mamba_state_update(b, e, n, dtype, options):
    torch.manual_seed(0)
    x, z, raw_dt = rand(b, e, dtype=dtype), rand(b, e, dtype=dtype), rand(b, e, dtype=dtype)
    A = -torch.rand(e, n, device=DEVICE) - 0.1
    B, C, D = rand(b, n, dtype=dtype), rand(b, n, dtype=dtype), rand(e)
    dt_bias = rand(e) * 0.1
    state = rand(b, e, n)
    given = state.clone()
    if options == "bias_softplus":
        y, after = kernels.mamba_state_update(x, raw_dt, A, B, C, D, state, dt_bias=dt_bias, dt_softplus=True)
        dt = F.softplus(raw_dt.float() + dt_bias)  # in float32 from the dtype's inputs, as the kernel does
    else:
        dt = (raw_dt.float().abs() * 0.5).to(dtype)
        gate = z if options == "gated" else None
        y, after = kernels.mamba_state_update(x, dt, A, B, C, D, state, z=gate)
    y_ref, after_ref = selective_scan_ref(
        x[:, None].float(), dt.float()[:, None], A, B[:, None].float(), C[:, None].float(), D, state
    )
    y_ref = y_ref[:, 0]
    if options == "gated":
        y_ref = y_ref * F.silu(z.float())
    assert torch.equal(state, given)  # the state given is left as it was
    assert after.dtype == y.dtype == torch.float32
    torch.testing.assert_close(after, after_ref, **TOL[torch.float32])
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, heads, p, n, groups", [(3, 4, 5, 16, 2), (1, 3, 8, 3, 1), (2, 6, 33, 12, 3)])
@pytest.mark.parametrize("d_shape", ["head", "channel", "none"])
def test_mamba2_state_update(b, heads, p, n, groups, dtype, d_shape):
    torch.manual_seed(1)
    x, z = rand(b, heads, p, dtype=dtype), rand(b, heads, p, dtype=dtype)
    dt = (torch.rand(b, heads, device=DEVICE) + 0.05).to(dtype)
    A = -torch.rand(heads, device=DEVICE) - 0.1
    B, C = rand(b, groups, n, dtype=dtype), rand(b, groups, n, dtype=dtype)
    D = {"head": rand(heads), "channel": rand(heads, p), "none": None}[d_shape]
    state = rand(b, heads, p, n)
    given = state.clone()
    y, after = kernels.mamba2_state_update(x, dt, A, B, C, D, state, z=z)
    y_ref, after_ref = ssd_scan_ref(
        x[:, None].float(), dt[:, None].float(), A, B[:, None].float(), C[:, None].float(), D, state
    )
    y_ref = y_ref[:, 0] * F.silu(z.float())
    assert torch.equal(state, given)
    torch.testing.assert_close(after, after_ref, **TOL[torch.float32])
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, c, k", [(3, 37, 4), (1, 5, 2), (2, 300, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_step(b, c, k, dtype, with_bias):
    torch.manual_seed(2)
    x, weight, state = rand(b, c, dtype=dtype), rand(c, 1, k, dtype=dtype), rand(b, k - 1, c, dtype=dtype)
    bias = rand(c, dtype=dtype) if with_bias else None
    given = state.clone()
    y, after = kernels.conv_step(x, weight, bias, state)
    y_ref, after_ref = causal_conv_ref(x[:, None], weight[:, 0], bias, state)
    assert torch.equal(state, given)
    assert y.dtype == after.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref[:, 0], **TOL[dtype])
    assert torch.equal(after.float(), after_ref)  # the window moves: values are copied, not computed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, l, e, n", [(3, 7, 37, 16), (1, 33, 5, 3), (2, 1, 20, 7)])
@pytest.mark.parametrize("options", ["plain", "gated_bias_softplus"])
def test_mamba_scan(b, l, e, n, dtype, options):
    torch.manual_seed(4)
    x, z, raw_dt = rand(b, l, e, dtype=dtype), rand(b, l, e, dtype=dtype), rand(b, l, e, dtype=dtype)
    A, D, dt_bias = -torch.rand(e, n, device=DEVICE) - 0.1, rand(e), rand(e) * 0.1
    B, C, state = rand(b, l, n, dtype=dtype), rand(b, l, n, dtype=dtype), rand(b, e, n)
    given = state.clone()
    if options == "plain":
        dt = (raw_dt.float().abs() * 0.5).to(dtype)
        y, after = kernels.mamba_scan(x, dt, A, B, C, D, state)
        dt, gate = dt.float(), None
    else:
        y, after = kernels.mamba_scan(x, raw_dt, A, B, C, D, state, z=z, dt_bias=dt_bias, dt_softplus=True)
        dt, gate = F.softplus(raw_dt.float() + dt_bias), F.silu(z.float())
    y_ref, after_ref = selective_scan_ref(x.float(), dt, A, B.float(), C.float(), D, state)
    if gate is not None:
        y_ref = y_ref * gate
    assert torch.equal(state, given) and y.dtype == after.dtype == torch.float32
    torch.testing.assert_close(after, after_ref, **TOL[torch.float32])
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, l, heads, p, n, groups", [(3, 7, 4, 5, 16, 2), (1, 33, 3, 8, 3, 1), (2, 1, 6, 9, 12, 3)])
@pytest.mark.parametrize("d_shape", ["head", "channel", "none"])
def test_mamba2_scan(b, l, heads, p, n, groups, dtype, d_shape):
    torch.manual_seed(5)
    x, z = rand(b, l, heads, p, dtype=dtype), rand(b, l, heads, p, dtype=dtype)
    dt = (torch.rand(b, l, heads, device=DEVICE) + 0.05).to(dtype)
    A = -torch.rand(heads, device=DEVICE) - 0.1
    B, C = rand(b, l, groups, n, dtype=dtype), rand(b, l, groups, n, dtype=dtype)
    D = {"head": rand(heads), "channel": rand(heads, p), "none": None}[d_shape]
    state = rand(b, heads, p, n)
    given = state.clone()
    y, after = kernels.mamba2_scan(x, dt, A, B, C, D, state, z=z)
    y_ref, after_ref = ssd_scan_ref(x.float(), dt.float(), A, B.float(), C.float(), D, state)
    assert torch.equal(state, given)
    torch.testing.assert_close(after, after_ref, **TOL[torch.float32])
    torch.testing.assert_close(y, y_ref * F.silu(z.float()), **TOL[torch.float32])


def test_a_scan_split_anywhere_is_the_scan_whole():
    """A prompt read in two pieces, the second from the first's state, is the prompt read at once."""
    torch.manual_seed(6)
    b, l, heads, p, n = 2, 19, 4, 6, 8
    x, dt = rand(b, l, heads, p), torch.rand(b, l, heads, device=DEVICE) + 0.05
    A, B, C, D = -torch.rand(heads, device=DEVICE), rand(b, l, 2, n), rand(b, l, 2, n), rand(heads)
    start = rand(b, heads, p, n)
    whole, end = kernels.mamba2_scan(x, dt, A, B, C, D, start)
    for cut in (1, 8, 18):
        first, middle = kernels.mamba2_scan(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], D, start)
        second, last = kernels.mamba2_scan(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], D, middle)
        torch.testing.assert_close(torch.cat([first, second], 1), whole, **TOL[torch.float32])
        torch.testing.assert_close(last, end, **TOL[torch.float32])


def test_steps_chain_as_the_scan_runs():
    """Ten steps, each from the last one's state, give the sequential scan over ten tokens."""
    torch.manual_seed(3)
    b, e, n, l = 2, 9, 5, 10
    x, dt, B, C = rand(b, l, e), torch.rand(b, l, e, device=DEVICE) * 0.5, rand(b, l, n), rand(b, l, n)
    A, D, state = -torch.rand(e, n, device=DEVICE) - 0.1, rand(e), rand(b, e, n)
    y_ref, final_ref = selective_scan_ref(x, dt, A, B, C, D, state)
    ys = []
    for t in range(l):
        y, state = kernels.mamba_state_update(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, **TOL[torch.float32])
    torch.testing.assert_close(state, final_ref, **TOL[torch.float32])


def test_a_state_in_another_dtype_is_refused():
    with pytest.raises(ValueError, match="keep the state in float32"):
        kernels.mamba_state_update(
            rand(1, 4), rand(1, 4), -torch.ones(4, 2), rand(1, 2), rand(1, 2), None, rand(1, 4, 2).double()
        )
    with pytest.raises(ValueError, match="do not split into 2 groups"):
        kernels.mamba2_state_update(
            rand(1, 3, 2), rand(1, 3), -torch.ones(3), rand(1, 2, 4), rand(1, 2, 4), None, rand(1, 3, 2, 4)
        )


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_a_model_decodes_through_the_kernels_as_through_pytorch(family, mamba_dir, mamba2_dir, monkeypatch):
    """The ops take the kernels for prompts and steps where the backend says so (on a GPU:
    ``ops.resolve``); prefill and steps give the logits of PyTorch's operators."""
    model = mambastep.load(mamba_dir if family == "mamba" else mamba2_dir).to(DEVICE)
    tokens = torch.randint(0, model.config.vocab_size, (3, 7), device=DEVICE)
    model._backend = Backend(device=DEVICE)  # PyTorch's operators only
    expected, _ = model.forward(tokens)
    model._backend = Backend(device=DEVICE, triton_kernels=True)
    calls = []
    for name in ("mamba_scan", "mamba2_scan", "mamba_state_update", "mamba2_state_update", "conv_step"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, kernel=kernel, name=name, **k: calls.append(name) or kernel(*a, **k)
        )
    logits, state = model.prefill(tokens[:, :4])
    steps = [logits]
    for t in range(4, 7):
        logits, state = model.step(tokens[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, 3:], atol=1e-4, rtol=1e-4)
    scan, update = ("mamba_scan", "mamba_state_update") if family == "mamba" else ("mamba2_scan", "mamba2_state_update")
    layers = model.config.n_layer
    assert calls.count(scan) == layers  # the prompt: every layer's scan
    assert calls.count(update) == calls.count("conv_step") == 3 * layers  # every layer of every step
