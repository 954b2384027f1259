"""The large-M CUDA path in slices of output rows (cuda._dequant_gemm, $LIBORTHO_PREFILL_SLICE): the slicing
and stitching are plain PyTorch, so they are checked here on the CPU against the reference op, with a
stand-in for the dequantize kernel that keeps its contract (row pointers index the whole CSR arrays).
The kernel itself on sliced arrays is checked on the GPU (test_cuda.py)."""
import pytest
import torch
from torch import nn

from libortho import OrthoLinear
from libortho.ops import cuda as cuda_backend
from libortho.ops.reference import ortho_linear_reference


class FakeExt:
    """dequant_merge by the reference op: W = deq(Q) + alpha * S for the rows given, in x's dtype."""

    def __init__(self):
        self.calls = []

    def dequant_merge(self, like, qweight, scales, zeros, row_ptr, col_idx, values, alpha, bits, group_size, n, k):
        self.calls.append((n, qweight.shape[0], int(row_ptr[0])))
        lo, hi = int(row_ptr[0]), int(row_ptr[-1])
        eye = torch.eye(k, dtype=like.dtype)
        wt = ortho_linear_reference(eye, qweight, scales, zeros, row_ptr - lo, col_idx[lo:hi], values[lo:hi], None,
                                    alpha, bits, group_size, n, k)
        return wt.t().contiguous(), 0


def layer(n, k, density, bias=True):
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    return OrthoLinear.from_linear(lin, bits=4, group_size=64, symmetric=False, density=density,
                                   dtype=torch.bfloat16, value_dtype=torch.bfloat16)


def run(lay, x, alpha):
    """The CUDA backend's entry point (dtype conversions, M > 16: the dequantize + GEMM path)."""
    return cuda_backend.ortho_linear_cuda(x, lay.qweight, lay.scales, lay.zeros, lay.row_ptr, lay.col_idx, lay.values,
                                          lay.bias, alpha, lay.bits, lay.group_size, lay.out_features,
                                          lay.in_features)


@pytest.fixture(autouse=True)
def fake_available(monkeypatch):
    monkeypatch.setattr(cuda_backend, "available", lambda: True)


@pytest.mark.parametrize("n,rows", [(100, 32), (100, 16), (96, 48), (40, 64)])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_slices_stitch_to_the_whole_product(monkeypatch, n, rows, alpha):
    fake = FakeExt()
    monkeypatch.setitem(cuda_backend._state, "ext", fake)
    lay = layer(n, 128, 0.05)
    x = torch.randn(20, 128).to(torch.bfloat16)
    monkeypatch.setenv("LIBORTHO_PREFILL_SLICE", "off")
    whole = run(lay, x, alpha)
    monkeypatch.setenv("LIBORTHO_PREFILL_SLICE", str(rows))
    fake.calls.clear()
    sliced = run(lay, x, alpha)
    starts = list(range(0, n, rows))
    assert [c[0] for c in fake.calls] == [min(s + rows, n) - s for s in starts]   # rows per slice
    assert [c[2] for c in fake.calls] == [int(lay.row_ptr[s]) for s in starts]     # absolute CSR offsets
    assert torch.allclose(sliced.float(), whole.float(), rtol=0, atol=1e-2)
    ref = ortho_linear_reference(x, lay.qweight, lay.scales, lay.zeros, lay.row_ptr, lay.col_idx, lay.values,
                                 lay.bias, alpha, lay.bits, lay.group_size, n, 128)
    assert float((sliced.float() - ref.float()).norm() / ref.float().norm()) < 2e-2


def test_bias_none_and_the_last_partial_strip(monkeypatch):
    monkeypatch.setitem(cuda_backend._state, "ext", FakeExt())
    monkeypatch.setenv("LIBORTHO_PREFILL_SLICE", "16")
    lay = layer(37, 64, 0.1, bias=False)                      # strips of 16, 16, 5 rows
    x = torch.randn(18, 64).to(torch.bfloat16)
    got = run(lay, x, 1.0)
    ref = ortho_linear_reference(x, lay.qweight, lay.scales, lay.zeros, lay.row_ptr, lay.col_idx, lay.values,
                                 None, 1.0, lay.bits, lay.group_size, 37, 64)
    assert got.shape == (18, 37)
    assert float((got.float() - ref.float()).norm() / ref.float().norm()) < 2e-2


@pytest.mark.parametrize("value", ["24", "0", "-16", "abc"])
def test_slice_setting_names_what_is_wrong(monkeypatch, value):
    monkeypatch.setenv("LIBORTHO_PREFILL_SLICE", value)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        cuda_backend.prefill_slice_rows(100, 128, "cpu")


def test_slice_rows_off_and_clamped(monkeypatch):
    monkeypatch.setenv("LIBORTHO_PREFILL_SLICE", "off")
    assert cuda_backend.prefill_slice_rows(100, 128, "cpu") == 100
    monkeypatch.setenv("LIBORTHO_PREFILL_SLICE", "4096")
    assert cuda_backend.prefill_slice_rows(100, 128, "cpu") == 100
    monkeypatch.setenv("LIBORTHO_PREFILL_SLICE", "32")
    assert cuda_backend.prefill_slice_rows(100, 128, "cpu") == 32
