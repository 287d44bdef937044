"""The fused CPU selective scan against the float64 reference."""

import pytest
import torch

from mambastep.ops.cpu import selective_scan_fused
from mambastep.ops.reference import selective_scan_ref

# -ffast-math and a vectorised expf: float32 rounding, a little more than the eager op's.
FUSED_TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(b, l, e, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, e, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, l, e, generator=g))
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
    y_ref, final_ref = selective_scan_ref(*(t.double() for t in (x, dt, A, B, C)), None if D is None else D.double(), state.double())
    torch.testing.assert_close(y.double(), y_ref, **FUSED_TOL)
    torch.testing.assert_close(final.double(), final_ref, **FUSED_TOL)


def test_fused_scan_leaves_its_inputs_alone_and_takes_bf16():
    x, dt, A, B, C, D, state = _inputs(2, 9, 24, 4)
    before = state.clone()
    y, _ = selective_scan_fused(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), D, state)
    assert torch.equal(state, before) and y.dtype == torch.float32
    y_ref, _ = selective_scan_ref(x.bfloat16().double(), dt.double(), A.double(), B.bfloat16().double(), C.bfloat16().double(), D.double(), state.double())
    torch.testing.assert_close(y.double(), y_ref, **FUSED_TOL)


def test_fused_scan_stable_for_very_negative_dt_A():
    x, dt, A, B, C, D, state = _inputs(1, 2000, 16, 4)
    y, final = selective_scan_fused(x, torch.full_like(dt, 25.0), torch.full_like(A, -4.0), B, C, D, state)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
