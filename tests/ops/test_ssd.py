"""ssd_scan (chunked Mamba-2 SSD) and the fused CPU kernel against the sequential spec and
the one-token step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambastep.ops import kernels
from mambastep.ops.reference import ssd_scan_ref
from mambastep.ops.ssd import ssd_scan_chunked as ssd_scan
from mambastep.ops.step import ssd_step

from conftest import TORCH

pytestmark = pytest.mark.usefixtures("cpp")  # the C++ kernels, built and loaded


def ssd_scan_fused(x, dt, A, B, C, D, state, z=None):
    return kernels.ssd_scan(x, dt, A, B, C, D, state, z)


# float64 in, float64 out: only rounding of a few hundred terms (seen: < 1e-14).
FP64 = dict(atol=1e-10, rtol=1e-10)
# float32 against the float64 spec of the same values, unit-scale inputs: errors
# are a few 1e-6 of the scale of y. Worst seen: 0.4 of this tolerance in the
# 200k-token test (a slow head summing ~1000 tokens, |y| up to ~300), under 1/20
# of it everywhere else.
FP32 = dict(atol=1e-4, rtol=1e-4)
# bfloat16 x, B, C (dt, A in float32): ssd_scan computes in float32 and every
# bfloat16 value is exact in float32 and float64, so the reference sees the very
# same inputs and only float32 arithmetic differs: the float32 tolerance holds.
BF16 = FP32

# (batch, heads, groups, head dim, state size, D): groups 1, 2 and 3, head
# dims that are not powers of two, each form of D.
LAYOUTS = [
    (1, 4, 1, 5, 8, None),
    (3, 4, 2, 12, 16, "h"),
    (3, 6, 3, 5, 4, "hp"),
    (1, 6, 3, 12, 8, "hp"),
]


def make(b, l, h, g, p, n, d_form, dtype=torch.float64, seed=0):
    """Random unit-scale inputs and a random starting state, all in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = randn(b, l, h, p)
    dt = torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 2 - 0.1
    B, C = randn(b, l, g, n), randn(b, l, g, n)
    D = {None: None, "h": randn(h), "hp": randn(h, p)}[d_form]
    state = randn(b, h, p, n)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return tuple(cast(t) for t in (x, dt, A, B, C, D, state))


def step_loop(x, dt, A, B, C, D, state):
    """ssd_step token by token, from ``state`` (its dtype is the compute dtype)."""
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def as64(args):
    return tuple(None if t is None else t.double() for t in args)


def one_row_per_token(x, B, C, z):
    """x, B, C and z as slices of one wide row per token, as in_proj's output holds them: views
    that are not contiguous."""
    (h, p), (g, n) = x.shape[2:], B.shape[2:]
    row = torch.cat([t.flatten(2) for t in (z, x, B, C)], -1)  # (b, l, 2hp + 2gn)
    zs, xs, Bs, Cs = row.split([h * p, h * p, g * n, g * n], -1)
    return xs.unflatten(-1, (h, p)), Bs.unflatten(-1, (g, n)), Cs.unflatten(-1, (g, n)), zs.unflatten(-1, (h, p))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("l", [1, 3, 50, 130])
@pytest.mark.parametrize("chunk", [1, 7, 64, 200])
def test_matches_reference_and_step_loop_fp64(chunk, l, layout):
    b, h, g, p, n, d_form = layout
    args = make(b, l, h, g, p, n, d_form)
    y, state = ssd_scan(*args, chunk_size=chunk)
    y_ref, state_ref = ssd_scan_ref(*args)
    y_step, state_step = step_loop(*args)
    assert y.dtype == state.dtype == torch.float64
    assert y.shape == y_ref.shape and state.shape == state_ref.shape
    torch.testing.assert_close(y, y_ref, **FP64)
    torch.testing.assert_close(state, state_ref, **FP64)
    torch.testing.assert_close(y, y_step, **FP64)
    torch.testing.assert_close(state, state_step, **FP64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk", [1, 7, 64, 200])
def test_fp32_matches_fp64_reference(chunk, layout):
    args = make(2, 130, *layout[1:5], d_form=layout[5], dtype=torch.float32)
    y, state = ssd_scan(*args, chunk_size=chunk)
    y_ref, state_ref = ssd_scan_ref(*as64(args))
    assert y.dtype == state.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, **FP32)
    torch.testing.assert_close(state.double(), state_ref, **FP32)


def test_fp32_wide_state():
    args = make(3, 130, 6, 3, 12, 64, "hp", dtype=torch.float32)
    y, state = ssd_scan(*args, chunk_size=64)
    y_ref, state_ref = ssd_scan_ref(*as64(args))
    torch.testing.assert_close(y.double(), y_ref, **FP32)
    torch.testing.assert_close(state.double(), state_ref, **FP32)


@pytest.mark.parametrize("chunk", [7, 64])
def test_bf16_inputs(chunk):
    x, dt, A, B, C, D, state = make(3, 130, 6, 3, 12, 16, "hp", dtype=torch.float32)
    x, B, C = x.bfloat16(), B.bfloat16(), C.bfloat16()
    y, state_out = ssd_scan(x, dt, A, B, C, D, state, chunk_size=chunk)
    y_ref, state_ref = ssd_scan_ref(*as64((x, dt, A, B, C, D, state)))
    assert y.dtype == state_out.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, **BF16)
    torch.testing.assert_close(state_out.double(), state_ref, **BF16)


def test_no_state_is_zero_state():
    x, dt, A, B, C, D, state = make(2, 50, 4, 2, 5, 8, "h")
    y, s = ssd_scan(x, dt, A, B, C, D, None, chunk_size=16)
    y0, s0 = ssd_scan(x, dt, A, B, C, D, torch.zeros_like(state), chunk_size=16)
    torch.testing.assert_close(y, y0, **FP64)
    torch.testing.assert_close(s, s0, **FP64)


def chunked(*args):
    return ssd_scan(*args, chunk_size=16)


# The chunked scan in float64, and the fused CPU kernel (float32 only: its pieces and whole agree
# to the rounding of float32 additions in another order).
SCANS = [(chunked, torch.float64, FP64), (ssd_scan_fused, torch.float32, dict(atol=1e-6, rtol=1e-6))]


@pytest.mark.parametrize("scan, dtype, tol", SCANS)
@pytest.mark.parametrize("cut", [1, 47, 64, 129])
def test_split_carrying_state_equals_one_call(cut, scan, dtype, tol):
    x, dt, A, B, C, D, state = make(3, 130, 6, 3, 5, 8, "hp", dtype=dtype)
    y, s = scan(x, dt, A, B, C, D, state)
    y1, s1 = scan(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], D, state)
    y2, s2 = scan(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], D, s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, **tol)
    torch.testing.assert_close(s2, s, **tol)


def strong_decays(b, l, h, gen):
    """dt log-uniform in [1e-4, 1], A from -100 to -1: dt * A down to -100 per step.

    Head 0 decays by exp(-100) at every step.
    """
    A = -torch.logspace(2, 0, h, dtype=torch.float64)  # (h,)
    log_dt = torch.empty(b, l, h, dtype=torch.float64).uniform_(np.log(1e-4), 0.0, generator=gen)
    dt = log_dt.exp()
    dt[..., 0] = 1.0
    return dt, A


@pytest.mark.parametrize(
    "scan, dtype", [(chunked, torch.float64), (chunked, torch.float32), (ssd_scan_fused, torch.float32)]
)
def test_very_negative_decay_long_sequence(scan, dtype):
    gen = torch.Generator().manual_seed(1)
    b, l, h, g, p, n = 2, 4096, 4, 2, 3, 4
    dt, A = strong_decays(b, l, h, gen)
    x = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    B, C = torch.randn(2, b, l, g, n, generator=gen, dtype=torch.float64)
    state = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    args = tuple(t.to(dtype) for t in (x, dt, A, B, C, torch.ones(h), state))
    y, s = scan(*args)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y_ref, s_ref = ssd_scan_ref(*as64(args))
    tol = FP64 if dtype == torch.float64 else FP32
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(s.double(), s_ref, **tol)


def numpy_recurrence(x, dt, A, B, C, state):
    """The recurrence in float64 numpy, batch 1, one group, no D."""
    x, dt, B, C, h = (t[0].double().numpy() for t in (x, dt, B[:, :, 0], C[:, :, 0], state))
    A = A.double().numpy()
    decay = np.exp(dt * A)[:, :, None, None]  # (l, h, 1, 1)
    inputs = (dt[:, :, None] * x)[..., None] * B[:, None, None, :]  # (l, h, p, n)
    states = np.empty_like(inputs)
    for t in range(len(x)):
        h = decay[t] * h + inputs[t]
        states[t] = h
    return np.einsum("lhpn,ln->lhp", states, C), h


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_input(dtype):
    gen = torch.Generator().manual_seed(2)
    l, h, p, n = 200_000, 2, 2, 2
    dt, A = strong_decays(1, l, h, gen)
    A[1], dt[..., 1] = -1e-3, 1.0  # a slow head: dt * A = -1e-3, a memory of ~1000 tokens
    x = torch.randn(1, l, h, p, generator=gen, dtype=torch.float64)
    B, C = torch.randn(2, 1, l, 1, n, generator=gen, dtype=torch.float64)
    state = torch.randn(1, h, p, n, generator=gen, dtype=torch.float64)
    args = tuple(t.to(dtype) for t in (x, dt, A, B, C))
    y, s = ssd_scan(*args, None, state.to(dtype), chunk_size=64)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y_ref, s_ref = numpy_recurrence(*args, state.to(dtype))
    tol = FP64 if dtype == torch.float64 else FP32
    torch.testing.assert_close(y[0].double(), torch.from_numpy(y_ref), **tol)
    torch.testing.assert_close(s[0].double(), torch.from_numpy(s_ref), **tol)


def test_gradcheck():
    args = make(2, 5, 4, 2, 3, 2, "h")
    args = tuple(t.requires_grad_() for t in args)
    assert torch.autograd.gradcheck(lambda *a: ssd_scan(*a, chunk_size=2), args)


def test_gradients_match_reference_with_very_negative_decay():
    gen = torch.Generator().manual_seed(3)
    b, l, h, g, p, n = 2, 40, 4, 2, 3, 4
    dt, A = strong_decays(b, l, h, gen)
    x = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    B, C = torch.randn(2, b, l, g, n, generator=gen, dtype=torch.float64)
    D = torch.randn(h, p, generator=gen, dtype=torch.float64)
    state = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    w_y = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    w_s = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)

    def grads(fn, **kw):
        inputs = tuple(t.detach().clone().requires_grad_() for t in (x, dt, A, B, C, D, state))
        y, s = fn(*inputs, **kw)
        loss = (y * w_y).sum() + (s * w_s).sum()
        return (y, s, *torch.autograd.grad(loss, inputs))

    for ours, ref in zip(grads(ssd_scan, chunk_size=16), grads(ssd_scan_ref), strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, **FP64)


# ---------------------------------------------------------------------------------------------
# The fused CPU kernel (float32, token by token). Its errors against the float64 spec are those
# of the chunked float32 scan (worst seen: 1/25 of FP32), so it shares FP32.


@pytest.mark.parametrize("layout", LAYOUTS + [(2, 4, 2, 40, 20, "hp")])  # 40: head blocks of 16, 16, 8
@pytest.mark.parametrize("l", [1, 2, 3, 50, 131])
def test_fused_matches_fp64_reference(l, layout):
    b, h, g, p, n, d_form = layout
    args = make(b, l, h, g, p, n, d_form, dtype=torch.float32)
    before = args[-1].clone()
    y, state = ssd_scan_fused(*args)
    y_ref, state_ref = ssd_scan_ref(*as64(args))
    assert y.dtype == state.dtype == torch.float32 and torch.equal(args[-1], before)
    torch.testing.assert_close(y.double(), y_ref, **FP32)
    torch.testing.assert_close(state.double(), state_ref, **FP32)


def test_fused_mamba2_130m_head_shape_and_bf16_inputs():
    x, dt, A, B, C, D, state = make(1, 70, 3, 1, 64, 128, "h", dtype=torch.float32)
    x, B, C = x.bfloat16(), B.bfloat16(), C.bfloat16()
    y, s = ssd_scan_fused(x, dt, A, B, C, D, state)
    y_ref, s_ref = ssd_scan_ref(*as64((x, dt, A, B, C, D, state)))
    torch.testing.assert_close(y.double(), y_ref, **BF16)
    torch.testing.assert_close(s.double(), s_ref, **BF16)


@pytest.mark.parametrize("l", [1, 2, 50])
def test_fused_gate_matches_reference_and_reads_strided_rows(l):
    """y times SiLU(z) inside the kernel; x, B, C and z read from one wide row per token (in_proj's
    output) give what contiguous copies give."""
    b, h, g, p, n = 2, 4, 2, 20, 8
    x, dt, A, B, C, D, state = make(b, l, h, g, p, n, "hp", dtype=torch.float32)
    z = torch.randn(b, l, h, p, generator=torch.Generator().manual_seed(5)) * 6
    y, s = ssd_scan_fused(x, dt, A, B, C, D, state, z=z)
    y_ref, s_ref = ssd_scan_ref(*as64((x, dt, A, B, C, D, state)))
    torch.testing.assert_close(y.double(), y_ref * torch.nn.functional.silu(z.double()), **FP32)
    torch.testing.assert_close(s.double(), s_ref, **FP32)
    xs, Bs, Cs, zs = one_row_per_token(x, B, C, z)
    assert not xs.is_contiguous()
    y2, s2 = ssd_scan_fused(xs, dt, A, Bs, Cs, D, state, z=zs)
    assert torch.equal(y2, y) and torch.equal(s2, s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_reads_half_precision_inputs_as_their_float32_values(dtype):
    """x, B, C and z of one 16-bit dtype, as slices of one wide row, are read as they lie: the
    result is the float32 kernel's on the same values (within a rounding: the compiler may contract
    each variant's multiply-adds differently), and float32. Mixed dtypes are all read as float32."""
    b, l, h, g, p, n = 2, 9, 4, 2, 20, 8
    x, dt, A, B, C, D, state = make(b, l, h, g, p, n, "hp", dtype=torch.float32)
    z = torch.randn(b, l, h, p, generator=torch.Generator().manual_seed(5)) * 6
    xs, Bs, Cs, zs = one_row_per_token(*(t.to(dtype) for t in (x, B, C, z)))
    halves = [xs, dt, A, Bs, Cs, D, state]
    widened = [t.float() for t in halves]
    got = ssd_scan_fused(*halves, z=zs)
    expected = ssd_scan_fused(*widened, z=zs.float())
    assert got[0].dtype == torch.float32
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    mixed = ssd_scan_fused(halves[0], *widened[1:], z=zs.float())
    assert torch.equal(mixed[0], expected[0])


def test_the_op_takes_the_kernel_also_where_a_gradient_is_wanted(cpp):
    from mambastep.ops import ssd_scan as ssd_op

    args = make(1, 5, 4, 2, 3, 2, "h", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ssd_op(*args, backend=cpp)[0], ssd_scan_fused(*args)[0])
    x = args[0].clone().requires_grad_()
    y, _ = ssd_op(x, *args[1:], backend=cpp)  # the kernel's training pair
    assert torch.equal(y, ssd_scan_fused(*args)[0])
    y.sum().backward()
    x_torch = args[0].clone().requires_grad_()
    ssd_op(x_torch, *args[1:], backend=TORCH)[0].sum().backward()  # the chunked scan
    torch.testing.assert_close(x.grad, x_torch.grad, **FP32)


# Gradients of the fused scan (its C++ backward) against autograd through the float64 spec:
# float32 arithmetic, so errors relative to each gradient's largest entry (worst seen: 1e-6),
# with a floor for gradients too small for float32's normal range.
GRAD_REL = 1e-4
GRAD_FLOOR = 1e-30
NAMES = ("x", "dt", "A", "B", "C", "D", "state")


def _grads(scan, inputs, seed=1):
    """y, the final state, and the gradients of a loss that uses both, one per input (None
    for a None input)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y, final = scan(*leaves)
    gen = torch.Generator().manual_seed(seed)
    w_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    w_s = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    ((y.double() * w_y).sum() + (final.double() * w_s).sum()).backward()
    return [y.detach(), final.detach()] + [None if t is None else t.grad for t in leaves]


def _assert_grads_close(got, inputs, rel=GRAD_REL):
    want = _grads(ssd_scan_ref, as64(inputs))
    for name, g, ref, t in zip(("y", "state", *NAMES), got, want, (None, None, *inputs)):
        if ref is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), name
        if t is not None:
            assert g.dtype == t.dtype and g.shape == t.shape, name
        scale = ref.abs().max().item()
        torch.testing.assert_close(
            g.double(), ref, atol=rel * scale + GRAD_FLOOR, rtol=rel, msg=lambda m: f"{name}: {m}"
        )


# Also the default model's heads, and 20 states: a block of 16 columns of the backward and a part one.
@pytest.mark.parametrize("layout", LAYOUTS + [(2, 2, 1, 64, 64, "h"), (1, 2, 1, 3, 20, "hp")])
@pytest.mark.parametrize("l", [1, 2, 50, 131])
def test_fused_gradients_match_reference(l, layout):
    b, h, g, p, n, d_form = layout
    inputs = make(b, l, h, g, p, n, d_form, dtype=torch.float32)
    _assert_grads_close(_grads(ssd_scan_fused, inputs), inputs)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fused_gradients_for_any_checkpoint_chunk(chunk):
    inputs = make(2, 70, 6, 3, 5, 4, "hp", dtype=torch.float32)
    _assert_grads_close(_grads(lambda *t: kernels._CheckpointedScan.apply("ssd_scan", *t, chunk), inputs), inputs)


def test_fused_gradients_stable_for_very_negative_decay():
    """dt A down to -100 per step: exp(dt A) underflows in float32; nothing may divide by it."""
    gen = torch.Generator().manual_seed(3)
    x, _, _, B, C, D, state = make(2, 90, 4, 2, 3, 4, "h", dtype=torch.float32)
    dt, A = strong_decays(2, 90, 4, gen)
    _assert_grads_close(
        _grads(ssd_scan_fused, (x, dt.float(), A.float(), B, C, D, state)), (x, dt.float(), A.float(), B, C, D, state)
    )


def test_fused_gradients_in_bf16_and_for_some_inputs_only():
    x, dt, A, B, C, D, state = make(2, 40, 4, 2, 16, 8, "hp", dtype=torch.float32)
    inputs = (x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D, state)
    # The gradients of bfloat16 inputs are rounded to bfloat16 (8 bits).
    _assert_grads_close(_grads(ssd_scan_fused, inputs), inputs, rel=1e-2)
    x = x.clone().requires_grad_()
    y, final = ssd_scan_fused(x, dt, A, B, C, D, state)  # only x requires grad
    (y.sum() + final.sum()).backward()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_fused_training_path_equals_inference_path():
    args = make(3, 130, 4, 2, 20, 8, "hp", dtype=torch.float32)
    with torch.no_grad():
        y_inf, final_inf = ssd_scan_fused(*args)
    leaves = [t.clone().requires_grad_() for t in args]
    y, final = ssd_scan_fused(*leaves)
    assert y.requires_grad and final.requires_grad
    assert torch.equal(y, y_inf) and torch.equal(final, final_inf)


def test_fused_checks_its_arguments():
    x, dt, A, B, C, D, state = make(2, 5, 4, 2, 3, 2, "hp", dtype=torch.float32)
    op = lambda *args, z=torch.empty(0): torch.ops.mambastep.ssd_scan(*args[:-1], z, args[-1])  # noqa: E731
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        op(x.double(), dt, A, B, C, D, state)
    with pytest.raises(RuntimeError, match=r"B \(b, l, g, n\) must be BFloat16, got Float"):
        op(x.bfloat16(), dt, A, B, C, D, state)
    with pytest.raises(RuntimeError, match=r"state \(b, h, p, n\) must have shape"):
        op(x, dt, A, B, C, D, state[:, :, :2].contiguous())
    with pytest.raises(RuntimeError, match="4 heads do not split into 3 groups"):
        op(x, dt, A, B.repeat(1, 1, 2, 1)[:, :, :3].contiguous(), C, D, state)
    with pytest.raises(RuntimeError, match="dt .* must be contiguous"):
        op(x, dt.transpose(0, 1).contiguous().transpose(0, 1), A, B, C, D, state)
    with pytest.raises(RuntimeError, match="x .* must have each token's last two dimensions contiguous"):
        op(x.transpose(2, 3).contiguous().transpose(2, 3), dt, A, B, C, D, state)
    with pytest.raises(RuntimeError, match=r"z \(b, l, h, p\) must have shape"):
        op(x, dt, A, B, C, D, state, z=x[:, :3])
    y, final, ckpt = torch.ops.mambastep.ssd_scan_fwd(x, dt, A, B, C, D, state, 2)
    assert ckpt.shape == (2, 3, 4, 3, 2) and torch.equal(ckpt[:, 0], state)
    bwd = torch.ops.mambastep.ssd_scan_bwd
    with pytest.raises(RuntimeError, match="x must be float32, got BFloat16"):  # the backward: float32 only
        bwd(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D, ckpt, y, final, 2)
    with pytest.raises(RuntimeError, match=r"checkpoints .* must have shape"):
        bwd(x, dt, A, B, C, D, ckpt, y, final, 4)
    with pytest.raises(RuntimeError, match=r"x \(b, l, h, p\) must be contiguous"):  # read at a fixed stride
        bwd(x.transpose(0, 1).contiguous().transpose(0, 1), dt, A, B, C, D, ckpt, y, final, 2)
    with pytest.raises(RuntimeError, match=r"grad of state .* must have shape"):
        bwd(x, dt, A, B, C, D, ckpt, y, final[:1].contiguous(), 2)


# ---------------------------------------------------------------------------------------------
# bfloat16 prompts on AMX tiles (ops/cpu/amx_ssd.cpp): from 64 tokens, in chunks of 64, where the
# CPU, the build and Linux allow (elsewhere these tests check the token-by-token kernel). The
# operands computed in float32 go to the tiles as two bfloat16 each, 16 significant bits, so a
# sum of k terms is off by about 2^-17 sqrt(k) times their size: with 128 states of unit scale,
# ~2e-4 (worst seen: 2.4e-4, |y| up to ~40). One bfloat16 per operand (8 bits) would be off by
# ~4e-2 and fail this tolerance.
TILES = dict(atol=1e-3, rtol=1e-4)

TILE_LAYOUTS = [
    (1, 3, 1, 64, 128, "h"),  # mamba2-130m's heads
    (2, 4, 2, 20, 20, "hp"),  # a head dim and a state size that fill no whole tile
    (3, 6, 3, 5, 4, None),
]


def bf16_prompt(b, l, h, g, p, n, d_form, seed=0):
    """make()'s inputs with x, B, C and a gate's z in bfloat16."""
    x, dt, A, B, C, D, state = make(b, l, h, g, p, n, d_form, dtype=torch.float32, seed=seed)
    z = torch.randn(b, l, h, p, generator=torch.Generator().manual_seed(seed + 1)) * 3
    return x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D, state, z.bfloat16()


@pytest.mark.parametrize("layout", TILE_LAYOUTS + [(9, 8, 8, 4, 4, "h")])  # 72 groups: a chunk per window
@pytest.mark.parametrize("l", [64, 65, 200, 1100])  # one chunk, and a token; part chunks; past 16 chunks
def test_bf16_prompt_matches_fp64_reference(l, layout):
    b, h, g, p, n, d_form = layout
    x, dt, A, B, C, D, state, z = bf16_prompt(b, l, h, g, p, n, d_form)
    before = state.clone()
    y, s = ssd_scan_fused(x, dt, A, B, C, D, state, z=z)
    y_ref, s_ref = ssd_scan_ref(*as64((x, dt, A, B, C, D, state)))
    assert y.dtype == s.dtype == torch.float32 and torch.equal(state, before)
    torch.testing.assert_close(y.double(), y_ref * torch.nn.functional.silu(z.double()), **TILES)
    torch.testing.assert_close(s.double(), s_ref, **TILES)


def test_bf16_prompt_without_gate_or_skip_from_zero_state():
    x, dt, A, B, C, _, state, _ = bf16_prompt(2, 130, 4, 2, 64, 128, None)
    y, s = ssd_scan_fused(x, dt, A, B, C, None, torch.zeros_like(state))
    y_ref, s_ref = ssd_scan_ref(*as64((x, dt, A, B, C)), None, torch.zeros_like(state).double())
    torch.testing.assert_close(y.double(), y_ref, **TILES)
    torch.testing.assert_close(s.double(), s_ref, **TILES)


def test_bf16_prompt_of_a_batch_equals_its_sequences_alone_and_reads_strided_rows():
    """Each sequence and head is scanned alone, so a batch of two gives what two batches of one
    give, bit for bit; x, B, C and z read from one wide row per token give what contiguous copies
    give."""
    b, l, h, g, p, n = 2, 150, 4, 2, 32, 64
    x, dt, A, B, C, D, state, z = bf16_prompt(b, l, h, g, p, n, "hp")
    y, s = ssd_scan_fused(x, dt, A, B, C, D, state, z=z)
    for i in range(b):
        one = [t[i : i + 1] for t in (x, dt)] + [A] + [t[i : i + 1] for t in (B, C)] + [D, state[i : i + 1]]
        y1, s1 = ssd_scan_fused(*one, z=z[i : i + 1])
        assert torch.equal(y1, y[i : i + 1]) and torch.equal(s1, s[i : i + 1])
    xs, Bs, Cs, zs = one_row_per_token(x, B, C, z)
    assert not xs.is_contiguous()
    y2, s2 = ssd_scan_fused(xs, dt, A, Bs, Cs, D, state, z=zs)
    assert torch.equal(y2, y) and torch.equal(s2, s)


def test_bf16_prompt_stable_for_very_negative_decay():
    """dt A down to -100 per token: decays within a chunk underflow to 0, never to a NaN."""
    gen = torch.Generator().manual_seed(1)
    b, l, h, g, p, n = 2, 700, 4, 2, 3, 4
    dt, A = strong_decays(b, l, h, gen)
    x = torch.randn(b, l, h, p, generator=gen).bfloat16()
    B, C = torch.randn(2, b, l, g, n, generator=gen).bfloat16()
    state = torch.randn(b, h, p, n, generator=gen)
    args = (x, dt.float(), A.float(), B, C, torch.ones(h), state)
    y, s = ssd_scan_fused(*args)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y_ref, s_ref = ssd_scan_ref(*as64(args))
    torch.testing.assert_close(y.double(), y_ref, **TILES)
    torch.testing.assert_close(s.double(), s_ref, **TILES)
