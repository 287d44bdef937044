import pytest
import torch

from mambastep.ops import selective_scan_chunked as selective_scan
from mambastep.ops import selective_step
from mambastep.ops.reference import selective_scan_ref

from conftest import TOL


def _inputs(b, l, e, n, dtype=torch.float64, seed=0, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, e, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, l, e, generator=g, dtype=torch.float64)) * dt_scale
    A = -torch.rand(e, n, generator=g, dtype=torch.float64) * 4 - 0.1
    B = torch.randn(b, l, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, l, n, generator=g, dtype=torch.float64)
    D = torch.randn(e, generator=g, dtype=torch.float64)
    state = torch.randn(b, e, n, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(x), cast(dt), A, cast(B), cast(C), D, state


SIZES = [(1, 1, 3, 2), (3, 2, 5, 4), (2, 3, 7, 3), (1, 50, 6, 5), (3, 130, 5, 16)]  # (b, l, e, n)


@pytest.mark.parametrize("b,l,e,n", SIZES)
@pytest.mark.parametrize("chunk", [1, 3, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scan_matches_reference(b, l, e, n, chunk, dtype):
    x, dt, A, B, C, D, state = _inputs(b, l, e, n, dtype)
    y, final = selective_scan(x, dt, A.to(dtype), B, C, D, state.float() if dtype != torch.float64 else state, chunk)
    # The reference sees exactly the same (rounded) values, in float64.
    y_ref, final_ref = selective_scan_ref(
        x.double(),
        dt.double(),
        A.to(dtype).double(),
        B.double(),
        C.double(),
        D,
        state.float().double() if dtype != torch.float64 else state,
    )
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(final.double(), final_ref, **tol)


@pytest.mark.parametrize("b,l,e,n", SIZES)
def test_scan_equals_loop_of_steps(b, l, e, n):
    x, dt, A, B, C, D, state = _inputs(b, l, e, n)
    y, final = selective_scan(x, dt, A, B, C, D, state, chunk_size=7)
    s, ys = state, []
    for t in range(l):
        y_t, s = selective_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, s)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, **TOL[torch.float64])
    torch.testing.assert_close(s, final, **TOL[torch.float64])


@pytest.mark.parametrize("cut", [1, 17, 63, 64, 65])
def test_scan_in_pieces_equals_one_call(cut):
    x, dt, A, B, C, D, state = _inputs(2, 100, 6, 4)
    y, final = selective_scan(x, dt, A, B, C, D, state)
    y1, s1 = selective_scan(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], D, state)
    y2, s2 = selective_scan(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], D, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, **TOL[torch.float64])
    torch.testing.assert_close(s2, final, **TOL[torch.float64])


def test_scan_stable_for_very_negative_dt_A():
    # dt * A reaches -100 per step (and far beyond the fp32 exp underflow when summed).
    x, dt, A, B, C, D, state = _inputs(1, 4096, 4, 3, torch.float32)
    dt = torch.full_like(dt, 25.0)
    A = torch.full_like(A, -4.0)  # dt * A = -100
    y, final = selective_scan(x, dt, A, B, C, D, state.float())
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    y_ref, _ = selective_scan_ref(
        x[:, :300].double(), dt[:, :300].double(), A.double(), B[:, :300].double(), C[:, :300].double(), D, state
    )
    torch.testing.assert_close(y[:, :300].double(), y_ref, **TOL[torch.float32])


def test_scan_long_sequence_stays_exact():
    # 200k tokens: the state after the scan equals the state after a loop of steps.
    l = 200_000
    x, dt, A, B, C, D, state = _inputs(1, l, 2, 2, torch.float32, dt_scale=0.05)
    y, final = selective_scan(x, dt, A.float(), B, C, D, state.float(), chunk_size=4096)
    assert torch.isfinite(y).all()
    s = state.double()
    tail = 64
    y_tail = None
    # float64 reference, carried through the whole sequence in large pieces.
    for start in range(0, l, 50_000):
        piece = slice(start, start + 50_000)
        y_ref, s = selective_scan(
            x[:, piece].double(),
            dt[:, piece].double(),
            A,
            B[:, piece].double(),
            C[:, piece].double(),
            D,
            s,
            chunk_size=4096,
        )
        y_tail = y_ref[:, -tail:]
    torch.testing.assert_close(final.double(), s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[:, -tail:].double(), y_tail, atol=1e-4, rtol=1e-4)


def test_scan_gradients():
    x, dt, A, B, C, D, state = _inputs(1, 6, 3, 2)
    args = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, state)]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk_size=4), args)


def test_scan_rejects_bad_chunk():
    x, dt, A, B, C, D, state = _inputs(1, 4, 3, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(x, dt, A, B, C, D, state, chunk_size=0)
