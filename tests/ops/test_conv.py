import pytest
import torch
import torch.nn.functional as F

from mambastep.ops import causal_conv, causal_conv_silu, causal_conv_step, kernels
from mambastep.ops.reference import causal_conv_ref

from conftest import TOL

pytestmark = pytest.mark.usefixtures("cpp")  # the C++ kernels, built and loaded

SIZES = [(1, 1, 5, 4), (3, 2, 7, 4), (2, 9, 3, 4), (1, 13, 6, 1), (2, 5, 8, 2)]  # (b, l, c, k)


def _inputs(b, l, c, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, c, generator=g)
    w = torch.randn(c, k, generator=g)
    bias = torch.randn(c, generator=g)
    state = torch.randn(b, k - 1, c, generator=g)
    return x.to(dtype), w.to(dtype), bias.to(dtype), state.to(dtype)


@pytest.mark.parametrize("b,l,c,k", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_matches_reference(b, l, c, k, dtype):
    x, w, bias, state = _inputs(b, l, c, k, dtype)
    y, new_state = causal_conv(x, w, bias, state)
    y_ref, state_ref = causal_conv_ref(*(t.double() for t in (x, w, bias, state)))
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)  # bf16 output rounding
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(new_state.double(), state_ref)  # the state is a copy of inputs: exact


@pytest.mark.parametrize("b,l,c,k", SIZES)
def test_conv_steps_and_pieces_equal_one_call(b, l, c, k):
    x, w, bias, state = _inputs(b, l, c, k, torch.float64)
    y, final = causal_conv(x, w, bias, state)
    s, ys = state, []
    for t in range(l):
        y_t, s = causal_conv_step(x[:, t], w, bias, s)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, **TOL[torch.float64])
    torch.testing.assert_close(s, final)
    cut = l // 2
    if cut:
        y1, s1 = causal_conv(x[:, :cut], w, bias, state)
        y2, s2 = causal_conv(x[:, cut:], w, bias, s1)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y, **TOL[torch.float64])
        torch.testing.assert_close(s2, final)


def test_conv_none_state_is_zeros():
    x, w, bias, _ = _inputs(2, 3, 4, 4, torch.float32)
    y, _ = causal_conv(x, w, bias, None)
    y0, _ = causal_conv(x, w, bias, torch.zeros(2, 3, 4))
    torch.testing.assert_close(y, y0, rtol=0, atol=0)


def test_the_state_is_its_own_contiguous_tensor():
    """Not a view of the window: it must not keep the whole input alive, and its layout never varies."""
    x, weight = torch.randn(1, 50, 6), torch.randn(6, 4)
    _, state = causal_conv(x, weight)
    assert state._base is None and state.is_contiguous() and state.stride() == (18, 6, 1)
    _, state = causal_conv_step(x[:, 0], weight, None, state)
    assert state._base is None and state.stride() == (18, 6, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_conv_upcasts_on_cpus_without_native_kernels(monkeypatch, dtype):
    """Where PyTorch's bfloat16 (float16) conv is slow, the conv runs in float32 and rounds its
    output back; elsewhere it keeps PyTorch's own; the state is the same inputs either way."""
    from mambastep.ops import conv

    x, w, bias, state = _inputs(2, 9, 6, 4, dtype)
    monkeypatch.setattr(conv, "computes_in", lambda d: d not in (torch.bfloat16, torch.float16))
    y, new_state = causal_conv(x, w, bias, state)
    want, want_state = causal_conv(*(t.float() for t in (x, w, bias, state)))
    assert y.dtype == new_state.dtype == dtype
    torch.testing.assert_close(y, want.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(new_state, want_state.to(dtype), atol=0, rtol=0)
    monkeypatch.setattr(conv, "computes_in", lambda d: True)
    window = torch.cat([state, x], dim=1).transpose(1, 2)
    native = torch.nn.functional.conv1d(window, w[:, None, :], bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(causal_conv(x, w, bias, state)[0], native, atol=0, rtol=0)


# The fused kernel: -ffast-math and an inlined exp in SiLU, float32 sums; in half precision
# one rounding of the output (8 or 11 bits).
FUSED_TOL = {
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
}


@pytest.mark.parametrize("b,l,c,k", SIZES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_conv_silu_matches_reference(b, l, c, k, with_bias, dtype):
    """Prompts shorter and longer than the state; x read from wider rows (in_proj's output)."""
    x, w, bias, state = _inputs(b, l, c, k, dtype)
    bias = bias if with_bias else None
    wide = torch.cat([torch.randn(b, l, 3, dtype=dtype), x, torch.randn(b, l, 2, dtype=dtype)], -1)[..., 3 : 3 + c]
    y, new_state = kernels.causal_conv_silu(wide, w, bias, state)
    y_ref, state_ref = causal_conv_ref(*(None if t is None else t.double() for t in (x, w, bias, state)))
    assert y.dtype == new_state.dtype == dtype and y.is_contiguous() and new_state.is_contiguous()
    torch.testing.assert_close(y.double(), F.silu(y_ref), **FUSED_TOL[dtype])
    torch.testing.assert_close(new_state.double(), state_ref, atol=0, rtol=0)  # a copy of inputs


def test_fused_conv_silu_rounds_bfloat16_as_pytorch_does():
    """bfloat16 in and out: the float32 kernel's result on the same values, rounded to the
    nearest bfloat16 (ties to even) as PyTorch rounds, NaN and infinities included."""
    x, w, bias, state = _inputs(2, 37, 45, 4, torch.bfloat16)
    x[0, 5, 7], x[1, 9, 3], x[1, 20, 0] = float("nan"), float("inf"), float("-inf")
    y, _ = kernels.causal_conv_silu(x, w, bias, state)
    y32, _ = kernels.causal_conv_silu(x.float(), w, bias, state.float())
    assert torch.equal(y.float().nan_to_num(), y32.bfloat16().float().nan_to_num())
    assert torch.equal(y.isnan(), y32.isnan())


def test_fused_conv_silu_in_pieces_equals_one_call():
    x, w, bias, state = _inputs(2, 13, 6, 4, torch.float32)
    y, final = kernels.causal_conv_silu(x, w, bias, state)
    y1, s1 = kernels.causal_conv_silu(x[:, :2], w, bias, state)
    y2, s2 = kernels.causal_conv_silu(x[:, 2:], w, bias, s1)
    assert torch.equal(torch.cat([y1, y2], 1), y) and torch.equal(s2, final)


def test_conv_silu_takes_the_kernel_where_it_applies(cpp):
    """With the C++ backend, float32, bfloat16 or float16 take the kernel, also where a gradient
    is wanted; float64 takes PyTorch's conv and SiLU, which agree with it."""
    x, w, bias, state = _inputs(2, 9, 6, 4, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype) for t in (x, w, bias, state)]
        kernel, plain = causal_conv_silu(*args, backend=cpp), causal_conv_silu(*args)
        assert torch.equal(kernel[0], kernels.causal_conv_silu(*args)[0])
        for a, b in zip(kernel, plain):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, **FUSED_TOL[dtype])
    y, new_state = causal_conv_silu(*(t.double() for t in (x, w, bias, state)), backend=cpp)
    assert y.dtype == new_state.dtype == torch.float64
    x = x.requires_grad_()
    y, _ = causal_conv_silu(x, w, bias, state, backend=cpp)
    assert torch.equal(y, kernels.causal_conv_silu(x.detach(), w, bias, state)[0])
    y.sum().backward()
    x_torch = x.detach().clone().requires_grad_()
    causal_conv_silu(x_torch, w, bias, state)[0].sum().backward()
    torch.testing.assert_close(x.grad, x_torch.grad, **FUSED_TOL[torch.float32])


def _conv_silu_ref(x, w, bias, state):
    y, new_state = causal_conv_ref(x, w, bias, state)
    return F.silu(y), new_state


def _grads(conv, inputs, seed=1):
    """y, the next state, and the gradients of a loss that uses both, one per input (None for
    a None input)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y, new_state = conv(*leaves)
    gen = torch.Generator().manual_seed(seed)
    w_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    w_s = torch.randn(new_state.shape, generator=gen, dtype=torch.float64)
    ((y.double() * w_y).sum() + (new_state.double() * w_s).sum()).backward()
    return [y.detach(), new_state.detach()] + [None if t is None else t.grad for t in leaves]


# The gradients against the float64 reference's, relative to each one's largest entry: float32
# arithmetic, or the rounding of x's gradient (and of y, which the loss reads) to x's dtype.
GRAD_REL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# 130 channels: blocks of 64, 64 and 2; 20 taps: a kernel longer than the prompt
@pytest.mark.parametrize("b,l,c,k", SIZES + [(2, 70, 130, 4), (1, 9, 6, 20)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_conv_silu_gradients_match_reference(b, l, c, k, with_bias, dtype):
    """Through y and the next state, x read from wider rows; the weight and bias in float32, as
    a model holds them, x and the state in ``dtype``."""
    x, w, bias, state = _inputs(b, l, c, k, torch.float32)
    wide = torch.cat([torch.randn(b, l, 3), x, torch.randn(b, l, 2)], -1).to(dtype)
    inputs = [wide, w, bias if with_bias else None, state.to(dtype)]
    got = _grads(lambda wide, *rest: kernels.causal_conv_silu(wide[..., 3 : 3 + c], *rest), inputs)
    want = _grads(
        lambda wide, *rest: _conv_silu_ref(wide[..., 3 : 3 + c], *rest),
        [None if t is None else t.double() for t in inputs],
    )
    for name, g, ref, t in zip(("y", "state", "x", "weight", "bias", "the state"), got, want, (None, None, *inputs)):
        if ref is None:
            assert g is None, name
            continue
        assert t is None or (g.dtype == t.dtype and g.shape == t.shape), name
        scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
        rel = GRAD_REL[dtype]
        torch.testing.assert_close(g.double(), ref, atol=rel * scale, rtol=rel, msg=lambda m: f"{name}: {m}")
    assert (got[2][..., :3] == 0).all() and (got[2][..., 3 + c :] == 0).all()  # the rest of the rows: untouched


def test_fused_conv_silu_checks_its_arguments():
    x, w, bias, state = _inputs(2, 5, 6, 4, torch.float32)
    run = torch.ops.mambastep.causal_conv_silu
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        run(x.double(), w, bias, state)
    with pytest.raises(RuntimeError, match="state must be a BFloat16 CPU tensor"):
        run(x.bfloat16(), w, bias, state)
    with pytest.raises(RuntimeError, match=r"state must be \(2, 3, 6\)"):
        run(x, w, bias, state[:, 1:].contiguous())
    with pytest.raises(RuntimeError, match=r"weight must be \(6, k\)"):
        run(x, w[:5].contiguous(), bias, state)
    with pytest.raises(RuntimeError, match="bias must be"):
        run(x, w, bias[:5].contiguous(), state)
    with pytest.raises(RuntimeError, match="x must have contiguous channels"):
        run(x.transpose(1, 2).contiguous().transpose(1, 2), w, bias, state)
    backward = torch.ops.mambastep.causal_conv_silu_backward
    gy, gnext = torch.randn(2, 5, 6), torch.randn(2, 3, 6)
    with pytest.raises(RuntimeError, match="the gradient of y must be contiguous, like x"):
        backward(x, w, bias, state, gy.bfloat16(), gnext)
    with pytest.raises(RuntimeError, match="the gradient of the next state must be contiguous, like the state"):
        backward(x, w, bias, state, gy, gnext[:, 1:])
    with pytest.raises(RuntimeError, match="the state must be contiguous for the backward"):
        backward(x, w, bias, state.transpose(0, 1).contiguous().transpose(0, 1), gy, gnext)
