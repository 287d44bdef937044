"""mambastep's C++ CPU kernels (``ops.kernels``) against the float64 references."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mambastep.ops import kernels
from mambastep.ops.reference import selective_scan_ref

from conftest import activations_as_multiplied

pytestmark = pytest.mark.usefixtures("cpp")  # the kernels, built and loaded


def selective_scan_fused(x, dt, A, B, C, D, state, z=None, dt_softplus=False):
    return kernels.selective_scan(x, dt, A, B, C, D, state, z, dt_softplus)


# -ffast-math and a vectorised expf: float32 rounding, a little more than the eager op's.
FUSED_TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(b, l, e, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, e, generator=g)
    dt = F.softplus(torch.randn(b, l, e, generator=g))
    A = -torch.rand(e, n, generator=g) * 4 - 0.1
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    D = torch.randn(e, generator=g)
    state = torch.randn(b, e, n, generator=g)
    return x, dt, A, B, C, D, state


@pytest.mark.parametrize("b,l,e,n", [(1, 1, 3, 2), (3, 2, 17, 4), (2, 3, 32, 16), (1, 70, 40, 5), (2, 130, 16, 16)])
@pytest.mark.parametrize("with_D", [True, False])
def test_fused_scan_matches_reference(b, l, e, n, with_D):
    x, dt, A, B, C, D, state = _inputs(b, l, e, n)
    D = D if with_D else None
    y, final = selective_scan_fused(x, dt, A, B, C, D, state)
    y_ref, final_ref = selective_scan_ref(
        *(t.double() for t in (x, dt, A, B, C)), None if D is None else D.double(), state.double()
    )
    torch.testing.assert_close(y.double(), y_ref, **FUSED_TOL)
    torch.testing.assert_close(final.double(), final_ref, **FUSED_TOL)


def test_fused_scan_leaves_its_inputs_alone_and_takes_bf16():
    x, dt, A, B, C, D, state = _inputs(2, 9, 24, 4)
    before = state.clone()
    y, _ = selective_scan_fused(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D, state)
    assert torch.equal(state, before) and y.dtype == torch.float32
    y_ref, _ = selective_scan_ref(
        x.bfloat16().double(),
        dt.double(),
        A.double(),
        B.bfloat16().double(),
        C.bfloat16().double(),
        D.double(),
        state.double(),
    )
    torch.testing.assert_close(y.double(), y_ref, **FUSED_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_scan_reads_half_precision_inputs_as_their_float32_values(dtype):
    """x, dt, B, C and z of one 16-bit dtype, as strided rows, are read as they lie: the result
    is the float32 kernel's on the same values, and still float32. (Within a rounding or two, not
    bit for bit: the compiler may contract the multiply-adds of each variant differently.)"""
    inputs = _gate_inputs(2, 30, 24, 4)
    x, dt, A, B, C, D, state, z = inputs
    wide = lambda t: torch.cat([t, t], -1).to(dtype)[..., : t.shape[-1]]  # noqa: E731  rows at twice the stride
    halves = (wide(x), wide(dt), A, wide(B), wide(C), D, state, wide(z))
    widened = [t.float() for t in halves]
    got, expected = _softplus_gated_fused(*halves), _softplus_gated_fused(*widened)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Inputs of mixed dtypes are all read as float32: none is rounded to the others' precision.
    mixed = (halves[0], dt, *halves[2:])
    assert torch.equal(_softplus_gated_fused(*mixed)[0], _softplus_gated_fused(*widened[:1], dt, *widened[2:])[0])


def _softplus_gated_ref(x, dt, A, B, C, D, state, z):
    """The reference scan with Δ = softplus(dt) and its output gated by SiLU(z)."""
    y, final = selective_scan_ref(x, F.softplus(dt), A, B, C, D, state)
    return y * F.silu(z), final


def _softplus_gated_fused(x, dt, A, B, C, D, state, z):
    return selective_scan_fused(x, dt, A, B, C, D, state, z=z, dt_softplus=True)


def _gate_inputs(b, l, e, n, seed=3):
    """Scan inputs whose dt is Δ before its softplus, over softplus' whole range (its threshold
    at 20 included), and a gate's input z."""
    x, _, A, B, C, D, state = _inputs(b, l, e, n)
    g = torch.Generator().manual_seed(seed)
    return x, torch.randn(b, l, e, generator=g) * 12, A, B, C, D, state, torch.randn(b, l, e, generator=g) * 6


@pytest.mark.parametrize("b,l,e,n", [(1, 2, 3, 2), (2, 40, 37, 16)])
def test_fused_scan_with_softplus_and_gate_matches_reference(b, l, e, n):
    inputs = _gate_inputs(b, l, e, n)
    y, final = _softplus_gated_fused(*inputs)
    y_ref, final_ref = _softplus_gated_ref(*(t.double() for t in inputs))
    torch.testing.assert_close(y.double(), y_ref, **FUSED_TOL)
    torch.testing.assert_close(final.double(), final_ref, **FUSED_TOL)


def test_fused_scan_reads_strided_rows_as_contiguous_ones():
    """x, dt, B, C and z as slices of wider rows (a projection's output) give the same result."""
    inputs = _gate_inputs(2, 30, 24, 4)
    wide = lambda t: torch.cat([t, torch.randn_like(t)], -1)[..., : t.shape[-1]]  # noqa: E731  rows at twice the stride
    x, dt, A, B, C, D, state, z = inputs
    strided = (wide(x), wide(dt), A, wide(B), wide(C), D, state, wide(z))
    assert not strided[0].is_contiguous()
    for a, b in zip(_softplus_gated_fused(*inputs), _softplus_gated_fused(*strided)):
        assert torch.equal(a, b)


def test_fused_scan_gradients_through_softplus_and_gate():
    inputs = _gate_inputs(2, 70, 20, 4)
    grads = _grads(_softplus_gated_fused, inputs)
    ref = _grads(_softplus_gated_ref, [t.double() for t in inputs])
    _assert_grads_close(grads[:-1], ref[:-1])
    torch.testing.assert_close(grads[-1].double(), ref[-1], atol=GRAD_REL * ref[-1].abs().max().item(), rtol=GRAD_REL)


def test_fused_scan_stable_for_very_negative_dt_A():
    x, dt, A, B, C, D, state = _inputs(1, 2000, 16, 4)
    y, final = selective_scan_fused(x, torch.full_like(dt, 25.0), torch.full_like(A, -4.0), B, C, D, state)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()


# ---------------------------------------------------------------------------------------------
# Gradients of the fused scan (its C++ backward) against autograd through the float64 reference.

NAMES = ("x", "dt", "A", "B", "C", "D", "state")
# float32 arithmetic against float64: errors relative to each gradient's largest entry, with a
# floor for gradients (dA with dt A = -100: ~1e-40) below float32's normal range (~1e-38), which
# float32 holds as subnormals with almost no relative precision, or as 0.
GRAD_REL = 1e-4
GRAD_FLOOR = 1e-30


def _grads(scan, inputs, seed=1):
    """Gradients of a loss that uses both y and the final state, one per input (None for a None input)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y, final = scan(*leaves)
    g = torch.Generator().manual_seed(seed)
    wy, ws = (
        torch.randn(y.shape, generator=g, dtype=torch.float64),
        torch.randn(final.shape, generator=g, dtype=torch.float64),
    )
    ((y.double() * wy).sum() + (final.double() * ws).sum()).backward()
    return [None if t is None else t.grad for t in leaves]


def _reference_grads(inputs):
    return _grads(selective_scan_ref, [None if t is None else t.detach().double() for t in inputs])


def _assert_grads_close(grads, ref_grads, rel=GRAD_REL):
    for name, g, ref in zip(NAMES, grads, ref_grads):
        if ref is None:
            assert g is None, name
            continue
        assert g is not None and torch.isfinite(g).all(), name
        scale = ref.abs().max().item()
        torch.testing.assert_close(
            g.double(), ref, atol=rel * scale + GRAD_FLOOR, rtol=rel, msg=lambda m: f"d{name}: {m}"
        )


@pytest.mark.parametrize("b,l,e,n", [(1, 1, 5, 1), (3, 2, 17, 4), (2, 64, 16, 16), (3, 130, 37, 16), (3, 130, 5, 1)])
@pytest.mark.parametrize("with_D", [True, False])
def test_fused_scan_gradients_match_reference(b, l, e, n, with_D):
    x, dt, A, B, C, D, state = _inputs(b, l, e, n)
    inputs = (x, dt, A, B, C, D if with_D else None, state)
    _assert_grads_close(_grads(selective_scan_fused, inputs), _reference_grads(inputs))


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_fused_scan_gradients_for_any_checkpoint_chunk(chunk):
    inputs = _inputs(2, 30, 20, 3)
    _assert_grads_close(
        _grads(lambda *t: kernels._CheckpointedScan.apply("selective_scan", *t, chunk), inputs),
        _reference_grads(inputs),
    )


def test_fused_scan_gradients_from_zero_state_and_for_some_inputs_only():
    x, dt, A, B, C, D, state = _inputs(2, 70, 24, 4)
    inputs = (x, dt, A, B, C, D, torch.zeros_like(state))
    _assert_grads_close(_grads(selective_scan_fused, inputs), _reference_grads(inputs))
    x = x.clone().requires_grad_()
    y, final = selective_scan_fused(x, dt, A, B, C, D, state)  # only x requires grad
    (y.sum() + final.sum()).backward()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("every", [1, 3])
def test_fused_scan_gradients_stable_for_very_negative_dt_A(every):
    """dt A = -100 makes exp(dt A) underflow in float32 (0 or subnormal); nothing may divide by it."""
    x, dt, A, B, C, D, state = _inputs(2, 150, 20, 4)
    dt = dt.clone()
    dt[:, ::every] = 25.0  # every token, or every third one among ordinary steps
    A = torch.full_like(A, -4.0)
    inputs = (x, dt, A, B, C, D, state)
    ref = _reference_grads(inputs)
    assert all(torch.isfinite(g).all() for g in ref)
    _assert_grads_close(_grads(selective_scan_fused, inputs), ref)


def test_fused_scan_gradients_in_bf16():
    x, dt, A, B, C, D, state = _inputs(2, 70, 20, 4)
    inputs = [t.bfloat16() for t in (x, dt, A, B, C, D)] + [state]
    grads = _grads(selective_scan_fused, inputs)
    for name, t, g in zip(NAMES, inputs, grads):
        assert g.dtype == t.dtype and g.shape == t.shape, name
    # Against the reference on the same (rounded) inputs; the gradients are rounded to bf16 (8 bits).
    _assert_grads_close(grads, _reference_grads(inputs), rel=1e-2)


def test_fused_scan_inference_path_equals_training_path():
    x, dt, A, B, C, D, state = _inputs(3, 130, 37, 16)
    with torch.no_grad():
        y_inf, final_inf = selective_scan_fused(x, dt, A, B, C, D, state)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, state)]
    y, final = selective_scan_fused(*leaves)
    assert y.requires_grad and final.requires_grad
    assert torch.equal(y, y_inf) and torch.equal(final, final_inf)
    with torch.no_grad():  # grad mode off: the inference kernel, even for inputs that require grad
        y_off, _ = selective_scan_fused(*leaves)
    assert not y_off.requires_grad and torch.equal(y_off, y_inf)


def test_fused_kernels_check_their_arguments():
    ops = torch.ops.mambastep
    x, dt, A, B, C, D, state = _inputs(2, 5, 8, 3)
    no_gate = torch.empty(0)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.selective_scan(x.double(), dt, A, B, C, D, no_gate, state, False)
    with pytest.raises(RuntimeError, match=r"B \(b, l, n\) must have shape"):
        ops.selective_scan(x, dt, A, B[:, :4].contiguous(), C, D, no_gate, state, False)
    with pytest.raises(RuntimeError, match="dt must have a unit stride over its last dimension"):
        ops.selective_scan(x, dt.transpose(1, 2).contiguous().transpose(1, 2), A, B, C, D, no_gate, state, False)
    with pytest.raises(RuntimeError, match="dt must be BFloat16, got Float"):
        ops.selective_scan(x.bfloat16(), dt, A, B, C, D, no_gate, state, False)
    with pytest.raises(RuntimeError, match="x must be float32, got BFloat16"):  # the training pair: float32 only
        ops.selective_scan_fwd(x.bfloat16(), dt, A, B, C, D, state, 2)
    with pytest.raises(RuntimeError, match=r"z \(like x\) must have shape"):
        ops.selective_scan(x, dt, A, B, C, D, x[:, :4], state, False)
    y, final, ckpt = ops.selective_scan_fwd(x, dt, A, B, C, D, state, 2)
    assert ckpt.shape == (2, 3, 8, 3) and torch.equal(ckpt[:, 0], state)
    with pytest.raises(RuntimeError, match="checkpoints .* must have shape"):
        ops.selective_scan_bwd(x, dt, A, B, C, D, ckpt, y, final, 4)
    with pytest.raises(RuntimeError, match="x must be contiguous"):  # the backward reads rows at stride e
        ops.selective_scan_bwd(x.transpose(0, 1).contiguous().transpose(0, 1), dt, A, B, C, D, ckpt, y, final, 2)


def _matvec_inputs(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if dtype is torch.int8:
        weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) / 127
    else:
        weight, scale = torch.randn(n, k, generator=g).to(dtype), None
    return x, weight, scale, torch.randn(n, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 1, 1),
        (1, 15, 3),
        (3, 17, 5),
        (8, 48, 80),
        (11, 100, 33),
        (2, 768, 64),
        (16, 15, 7),
        (19, 17, 5),
        (18, 768, 65),
        (64, 100, 34),
        (17, 40, 9),
        (21, 33, 8),
        (3, 130, 47),
        (40, 64, 32),
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matvec_matches_reference(dtype, m, k, n, with_bias):
    """Every weight storage; row counts across the 8-row groups and, from 16 rows, the blocks
    (4 activation rows x 3 weight rows, 2 x 6 for float32 weights on AVX2) with every partial
    block of each; lengths around the 8- and 16-lane vectors. With AMX (bfloat16 and int8
    weights, from 2 rows): blocks of 16 weight rows with a partial last one, groups of up to 16
    activation rows, and rows of k past the last whole tile (32 bfloat16, 64 int8 weights)."""
    matvec = kernels.matvec
    x, weight, scale, bias = _matvec_inputs(m, k, n, dtype)
    bias = bias if with_bias else None
    w64 = weight.double() * (scale.double()[:, None] if scale is not None else 1)  # (n, k)
    x64 = activations_as_multiplied(x.double(), dtype)
    expected = x64 @ w64.T + (bias.double() if with_bias else 0)
    got = matvec(x, weight, scale, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # float32 products and sums (-ffast-math orders them freely): a few float32 roundings of
    # the sum of |terms|.
    bound = 4e-7 * (x64.abs() @ w64.abs().T) * (k**0.5 + 1) + 1e-6
    assert ((got.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("m", [1, 3])
def test_matvec_int8_sums_are_exact_over_long_rows_and_a_bad_row_stays_bad(m):
    """Rows of 6,000 activations at the largest magnitudes (the tiles' int32 sums, the high and
    low bytes recombined in 64 bits), and a row holding a NaN or an infinity: NaN out, the
    other rows untouched."""
    matvec = kernels.matvec
    k, n = 6000, 20
    g = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=g).sign() * 3.0
    weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    weight[:, : k // 2] = 127
    scale = torch.rand(n, generator=g) / 127
    x64, w64 = activations_as_multiplied(x.double(), torch.int8), weight.double() * scale.double()[:, None]
    bound = 4e-7 * (x64.abs() @ w64.abs().T) * (k**0.5 + 1)  # as test_matvec_matches_reference
    assert ((matvec(x, weight, scale, None).double() - x64 @ w64.T).abs() <= bound).all()
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[0, 17] = bad
        got = matvec(x_bad, weight, scale, None)
        assert got[0].isnan().all()
        if m > 1:
            assert torch.equal(got[1:], matvec(x[1:], weight, scale, None))


@pytest.mark.parametrize("m", [1, 3])
def test_matvec_bfloat16_weights_take_infinities_and_the_edges_of_the_range(m):
    """Against bfloat16 weights an infinite activation gives infinities of the right signs (not
    NaN), a NaN gives NaN, a float32 one step above a bfloat16 keeps that step (the low part of
    the pair), and a finite activation beyond the largest bfloat16 stays finite."""
    matvec = kernels.matvec
    weight = torch.tensor([[1.0], [-2.0]]).bfloat16()  # (2, 1)
    above_three = torch.nextafter(torch.tensor(3.0), torch.tensor(4.0)).item()
    # halfway between the largest bfloat16 and infinity: rounds to infinity as one bfloat16
    past_bfloat16 = torch.tensor(0x7F7F8000, dtype=torch.int32).view(torch.float32).item()
    for value, expected in [
        (float("inf"), [float("inf"), float("-inf")]),
        (float("-inf"), [float("-inf"), float("inf")]),
        (above_three, [above_three, -2 * above_three]),
        (past_bfloat16, [past_bfloat16, float("-inf")]),  # -2x overflows float32 as it would anyway
    ]:
        x = torch.full((m, 1), value)
        got = matvec(x, weight, None, None)
        assert torch.equal(got, torch.tensor([expected] * m)), (value, got)
        assert torch.equal(activations_as_multiplied(x, torch.bfloat16), x)
    assert matvec(torch.full((m, 1), float("nan")), weight, None, None).isnan().all()


def test_matvec_reports_each_weight_types_path():
    """float32 weights take the build's vector kernels; bfloat16 and int8 weights the AMX tiles
    where the CPU has them, the build uses them and Linux grants them (from 2 rows)."""
    paths = torch.ops.mambastep.cpu_matvec_paths()
    isa = torch.ops.mambastep.cpu_kernels_isa()
    tiles = (
        "amx from 2 rows"
        if " amx_bf16 " in _cpu_flags() and os.environ.get("MAMBASTEP_CPU_ISA", "native") == "native"
        else isa
    )
    assert paths == f"float32 {isa}, bfloat16 {tiles}, int8 {tiles}"


def test_ssd_scan_reports_its_path():
    """A bfloat16 Mamba-2 prompt takes the AMX tiles from 64 tokens where the CPU has them (and
    AVX512-BF16), the build uses them and Linux grants them; every other scan goes token by token."""
    isa = torch.ops.mambastep.cpu_kernels_isa()
    path = f"{isa} token by token"
    flags = _cpu_flags()
    if " amx_bf16 " in flags and " avx512_bf16 " in flags and os.environ.get("MAMBASTEP_CPU_ISA", "native") == "native":
        path = f"bfloat16 from 64 tokens in chunks of 64 on amx tiles, else {path}"
    assert torch.ops.mambastep.cpu_ssd_scan_path() == path


def test_matvec_keeps_leading_dimensions_and_takes_any_float_input():
    matvec = kernels.matvec
    x, weight, _, bias = _matvec_inputs(6, 20, 7, torch.float32)
    got = matvec(x.view(2, 3, 20).to(torch.bfloat16), weight, None, bias.to(torch.bfloat16))
    expected = torch.nn.functional.linear(x.to(torch.bfloat16).float(), weight, bias.to(torch.bfloat16).float())
    torch.testing.assert_close(got, expected.view(2, 3, 7), atol=1e-5, rtol=1e-5)


def test_matvec_checks_its_arguments():
    matvec = kernels.matvec
    x, weight, scale, bias = _matvec_inputs(2, 16, 4, torch.int8)
    with pytest.raises(RuntimeError, match="a scale goes with int8 weights"):
        matvec(x, weight, None, bias)
    with pytest.raises(RuntimeError, match="a scale goes with int8 weights"):
        matvec(x, weight.float(), scale, bias)
    with pytest.raises(RuntimeError, match="k = 15"):
        matvec(x[:, :15], weight, scale, bias)
    with pytest.raises(RuntimeError, match="contiguous"):
        matvec(x, weight.float().t().contiguous().t(), None, bias)
    with pytest.raises(RuntimeError, match="bias must be float32 \\(n,\\) with n = 4"):
        matvec(x, weight, scale, bias[:3])
    with pytest.raises(RuntimeError, match="weights must be float32, bfloat16 or int8"):
        matvec(x, weight.double(), None, bias)


def test_matvec_runs_inside_a_compiled_graph():
    """A PyTorch operator with a shape function: torch.compile keeps it in one graph."""
    matvec = kernels.matvec
    x, weight, _, bias = _matvec_inputs(3, 40, 9, torch.bfloat16)

    def f(x):
        return torch.relu(matvec(x, weight, None, bias)) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True, dynamic=True)(x), f(x))


def _training_op_calls() -> dict[str, tuple]:
    """Each training operator's arguments, at shapes where blocks and chunks do not divide evenly."""
    g = torch.Generator().manual_seed(0)
    b, l, e, n, h, p, c, k = 2, 70, 20, 3, 3, 5, 6, 4
    x, dt, A, B, C, D, state = _inputs(b, l, e, n)
    y, _, ckpt = torch.ops.mambastep.selective_scan_fwd(x, dt, A, B, C, D, state, 64)
    xs, dts = torch.randn(b, l, h, p, generator=g), F.softplus(torch.randn(b, l, h, generator=g))
    As, Bs, Cs = -torch.rand(h, generator=g), torch.randn(b, l, 1, n, generator=g), torch.randn(b, l, 1, n, generator=g)
    Ds, ss = torch.randn(h, p, generator=g), torch.randn(b, h, p, n, generator=g)
    ys, _, ckpts = torch.ops.mambastep.ssd_scan_fwd(xs, dts, As, Bs, Cs, Ds, ss, 64)
    xc, w, bias, sc = (
        torch.randn(b, l, c, generator=g),
        torch.randn(c, k, generator=g),
        torch.randn(c),
        torch.randn(b, k - 1, c),
    )
    return {
        "selective_scan_fwd": (x, dt, A, B, C, D, state, 64),
        "selective_scan_bwd": (x, dt, A, B, C, D, ckpt, torch.randn_like(y), torch.randn_like(state), 64),
        "ssd_scan_fwd": (xs, dts, As, Bs, Cs, Ds, ss, 64),
        "ssd_scan_bwd": (xs, dts, As, Bs, Cs, Ds, ckpts, torch.randn_like(ys), torch.randn_like(ss), 64),
        "causal_conv_silu": (xc, w, bias, sc),
        "causal_conv_silu_backward": (xc, w, bias, sc, torch.randn_like(xc), torch.randn_like(sc)),
    }


@pytest.mark.parametrize(
    "name",
    [
        "selective_scan_fwd",
        "selective_scan_bwd",
        "ssd_scan_fwd",
        "ssd_scan_bwd",
        "causal_conv_silu",
        "causal_conv_silu_backward",
    ],
)
def test_training_operators_shape_functions_match_the_kernels(name):
    """The shape function that torch.compile traces a training step with gives each kernel's
    output shapes, dtypes and strides."""
    torch.library.opcheck(getattr(torch.ops.mambastep, name), _training_op_calls()[name], test_utils="test_faketensor")


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


KERNEL_TESTS = [
    "tests/ops/test_cpu_kernels.py",
    "tests/ops/test_ssd.py",
    "tests/ops/test_conv.py",
    "tests/models/test_engine.py",
]


@pytest.mark.skipif(
    os.environ.get("MAMBASTEP_CPU_ISA", "native") != "native", reason="run from the native build's tests"
)
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_kernel_test_passes_in_a_narrower_build(isa):
    """The kernels' tests again, in a process whose kernels are built for a narrower instruction
    set (AMX off; AVX-512 off too; AVX2 off too: the plain loops), so that every branch of the
    C++ code is compiled and tested on a machine that has the wider one."""
    if isa == "avx512" and " amx_bf16 " not in _cpu_flags():
        pytest.skip("this CPU has no AMX: the native build is the AVX-512 one")
    if isa == "avx2" and " avx2 " not in _cpu_flags():
        pytest.skip("this CPU has no AVX2")
    root = Path(__file__).parents[2]
    env = {**os.environ, "MAMBASTEP_CPU_ISA": isa}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "not compiled", *KERNEL_TESTS]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"mambastep CPU kernels: {isa} (MAMBASTEP_CPU_ISA={isa})" in done.stdout, done.stdout[:2000]


# ---------------------------------------------------------------------------------------------
# RMSNorm in one pass, against the module's PyTorch path in float64.


@pytest.mark.parametrize("shape, group", [((3, 24), 24), ((2, 70, 48), 48), ((1, 300, 1536), 192), ((2, 5, 12), 4)])
def test_rms_norm_kernel_matches_pytorch(shape, group):
    from mambastep.models.lm import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5, group)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = torch.randn(*shape, generator=g) * 3
    want = norm.double()(x.double())
    y = kernels.rms_norm(
        x.transpose(0, -2).contiguous().transpose(0, -2) if x.dim() == 3 else x, norm.weight.float(), 1e-5, group
    )
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


def test_rms_norm_op_takes_the_kernel_for_inference_only(cpp):
    from mambastep.ops import rms_norm

    weight = torch.nn.Parameter(torch.randn(16))
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            rms_norm(x, weight, 1e-5, 8, backend=cpp), rms_norm(x, weight, 1e-5, 8), atol=1e-6, rtol=1e-5
        )
    y = rms_norm(x, weight, 1e-5, 8, backend=cpp)  # the weight requires grad: PyTorch's path, differentiable
    y.sum().backward()
    assert weight.grad is not None
    assert rms_norm(x.bfloat16(), weight.detach().bfloat16(), 1e-5, 8, backend=cpp).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(
            rms_norm(x, weight.bfloat16(), 1e-5, 8, backend=cpp), kernels.rms_norm(x, weight.bfloat16(), 1e-5, 8)
        )


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_kernel_rounds_16_bit_weights_as_pytorch_does(x_dtype, weight_dtype):
    """x in float32 (a float32 residual) or bfloat16, weight in each dtype: the result, in the
    weight's dtype, is PyTorch's ``weight * normalised.to(weight.dtype)``, two roundings included.
    The sums of squares add up in another order, so a float32 result differs in its last bits and a
    16-bit one where the value lies within a float32 step of a rounding edge: at most one in a
    thousand, one unit away."""
    from mambastep.ops.norm import rms_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 96, generator=g) * 3).to(x_dtype)
    weight = torch.randn(96, generator=g).to(weight_dtype)
    for group in (96, 32):
        y = kernels.rms_norm(x, weight, 1e-5, group)
        want = rms_norm(x, weight, 1e-5, group)  # PyTorch's operators
        assert y.dtype == weight_dtype and y.shape == x.shape
        if weight_dtype == torch.float32:
            torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        else:
            assert (y == want).float().mean() >= 0.999
            torch.testing.assert_close(y.float(), want.float(), rtol=2 * torch.finfo(weight_dtype).eps, atol=0)


def test_rms_norm_kernel_checks_its_arguments():
    with pytest.raises(RuntimeError, match="must be float32"):
        torch.ops.mambastep.rms_norm(torch.randn(2, 8).double(), torch.ones(8), 1e-5, 8)
    with pytest.raises(RuntimeError, match=r"weight must be \(8,\)"):
        torch.ops.mambastep.rms_norm(torch.randn(2, 8), torch.ones(6), 1e-5, 6)
    with pytest.raises(RuntimeError, match="8 channels do not split into groups of 3"):
        torch.ops.mambastep.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5, 3)
