"""Which kernel entry point ortho_linear_cuda calls per M, policy, layer shape and ortho stream, on the CPU: the
extension is a recording stand-in (no kernel runs), the card an H100/H200's 132 SMs. The GPU tests check the same
choices against the real kernels' outputs; this pins the dispatch itself where CI can run it."""
from types import SimpleNamespace

import pytest
import torch

from libortho.ops import cuda


class RecordingExt:
    """Each entry point records its name (and the CUTLASS form) and returns an output of the right shape."""

    def __init__(self):
        self.calls = []

    def _out(self, name, x, n, extra=None):
        self.calls.append(name if extra is None else (name, extra))
        return torch.zeros(x.shape[0], n, dtype=x.dtype), 0

    def fused_small_m(self, x, *a):
        self.pdl = a[-1]
        return self._out("fused_small_m", x, a[-3])

    def gemm_int4(self, x, *a):
        return self._out("gemm_int4", x, a[-2])

    def gemm_cutlass(self, x, *a):
        return self._out("gemm_cutlass", x, a[-3], a[-1])

    def gemm_cutlass_built(self):
        return True

    def dequant_merge(self, x, *a):
        self.calls.append("dequant_merge")
        return torch.empty(a[-2], 0, dtype=x.dtype), 0  # (N, -): the stand-in F.linear below only reads N


@pytest.fixture
def ext(monkeypatch):
    rec = RecordingExt()
    monkeypatch.setitem(cuda._state, "ext", rec)
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda, "_sms", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(cuda, "F", SimpleNamespace(linear=lambda x, w, b=None: torch.zeros(x.shape[0], w.shape[0])))
    monkeypatch.delenv("LIBORTHO_PREFILL", raising=False)
    monkeypatch.delenv("LIBORTHO_DECODE_KERNEL", raising=False)
    monkeypatch.delenv("LIBORTHO_PDL_MAX_M", raising=False)
    return rec


def call(m, n, k, density=0.0, alpha=1.0):
    nnz = round(density * n * k)  # as the sieve keeps it: rounded, so one entry over density * n * k at times
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    z = torch.zeros(1, dtype=torch.bfloat16)
    values = torch.zeros(nnz, dtype=torch.bfloat16)
    return cuda.ortho_linear_cuda(x, z, z, z, z, z, values, None, alpha, 4, 128, n, k)


@pytest.mark.parametrize("m,n,k,density,alpha,want", [
    (8, 4096, 4096, 0.01, 1.0, "fused_small_m"),                     # decode: the fused kernel
    (32, 4096, 4096, 0.0, 1.0, "fused_small_m"),                     # M 17-32: v1's ring
    (32, 4096, 14336, 0.05, 1.0, "fused_small_m"),                   # ... + the add, up to 5 % on large layers
    (32, 1024, 4096, 0.02, 1.0, "dequant_merge"),                    # ... only 1 % on small ones
    (48, 4096, 4096, 0.0, 1.0, "fused_small_m"),                     # M 33-64: v1 where its blocks make one wave
    (48, 11008, 4096, 0.0, 1.0, "gemm_int4"),                        # ... the GEMM on taller grids
    (48, 1024, 4096, 0.0, 1.0, "gemm_int4"),                         # ... and on short ones
    (64, 4096, 14336, 0.01, 1.0, "fused_small_m"),                   # 1 % at 64 tokens: the rule's room (rounding)
    (64, 4096, 4096, 0.005, 1.0, "dequant_merge"),                   # below 4e7 weights the add loses: merge
    (64, 14336, 4096, 0.01, 1.0, "gemm_int4"),                       # the GEMM + add on a tall layer
    (64, 14336, 4096, 0.02, 0.0, "gemm_int4"),                       # alpha 0: no stream in play
    (256, 4096, 14336, 0.0, 1.0, ("gemm_cutlass", 1)),               # 65-512: CUTLASS, ping-pong on a short grid
    (512, 14336, 4096, 0.0, 1.0, ("gemm_cutlass", 0)),               # ... cooperative where the tiles fill waves
    (512, 1024, 4096, 0.0, 1.0, "dequant_merge"),                    # ... not on 1024x4096
    (512, 14336, 4096, 0.01, 1.0, "dequant_merge"),                  # an ortho stream above 64 tokens: merge
    (1024, 4096, 4096, 0.0, 1.0, "dequant_merge")])                  # above 512: dequantize + cuBLAS
def test_auto_policy_picks_each_path(ext, m, n, k, density, alpha, want):
    y = call(m, n, k, density, alpha)
    assert y.shape == (m, n)
    assert ext.calls == [want]


@pytest.mark.parametrize("policy,m,want", [("dequant", 32, "dequant_merge"), ("gemm", 32, "gemm_int4"),
                                           ("gemm", 48, "gemm_int4"), ("cutlass", 32, ("gemm_cutlass", 1)),
                                           ("dequant", 8, "fused_small_m")])  # M <= 16 never asks the policy
def test_other_policies(ext, monkeypatch, policy, m, want):
    monkeypatch.setenv("LIBORTHO_PREFILL", policy)
    call(m, 4096, 4096)
    assert ext.calls == [want]


@pytest.mark.parametrize("value,bits", [(None, 9), ("", 9), ("0", 0), ("1", 1), ("early", 1), ("late", 3),
                                        ("noprefetch", 5), ("late-noprefetch", 7), (" Late ", 3), ("first", 9),
                                        ("late-first", 11), ("first-noxt", 25)])
def test_pdl_mode_reaches_the_decode_kernel(ext, monkeypatch, value, bits):
    """$LIBORTHO_PDL picks the kernels.h kPdl* bits (on 1, late trigger 2, no prefetch 4, first tiles 8) the decode
    kernel gets; unset or empty on a Hopper card (the fixture's capability 9.0): "first"."""
    if value is None:
        monkeypatch.delenv("LIBORTHO_PDL", raising=False)
    else:
        monkeypatch.setenv("LIBORTHO_PDL", value)
    call(1, 4096, 4096, 0.01)
    assert ext.calls == ["fused_small_m"] and ext.pdl == bits
    assert cuda.pdl_enabled() is (bits != 0)
    assert cuda.pdl_name() == {0: "off", 1: "early", 3: "late", 5: "noprefetch", 7: "late-noprefetch", 9: "first",
                               11: "late-first", 25: "first-noxt"}[bits]


@pytest.mark.parametrize("limit,m,bits", [(None, 1, 9), (None, 2, 0), (None, 16, 0), ("1", 1, 9), ("1", 2, 0),
                                          ("8", 8, 9), ("8", 16, 0), ("4", 32, 0), (" 16 ", 16, 9), ("none", 16, 9),
                                          (" None ", 32, 9)])
def test_pdl_max_m_keeps_pdl_to_calls_of_that_many_rows(ext, monkeypatch, limit, m, bits):
    """$LIBORTHO_PDL_MAX_M: a call of more rows than it says gets plain launches (bits 0), the others $LIBORTHO_PDL's
    bits; unset, one row; "none", every call; M > 16 calls of v1 (here M = 32, 4096 x 4096, no ortho) are held to it
    too."""
    monkeypatch.setenv("LIBORTHO_PDL", "first")
    if limit is None:
        monkeypatch.delenv("LIBORTHO_PDL_MAX_M", raising=False)
    else:
        monkeypatch.setenv("LIBORTHO_PDL_MAX_M", limit)
    call(m, 4096, 4096)
    assert ext.calls == ["fused_small_m"] and ext.pdl == bits
    assert cuda.pdl_mode() == 9 and cuda.pdl_name() == "first"  # the mode itself, for result files


@pytest.mark.parametrize("limit", ["0", "-1", "two", "1.5"])
def test_pdl_max_m_refuses_what_is_not_a_positive_count(ext, monkeypatch, limit):
    monkeypatch.setenv("LIBORTHO_PDL", "first")
    monkeypatch.setenv("LIBORTHO_PDL_MAX_M", limit)
    with pytest.raises(ValueError, match="LIBORTHO_PDL_MAX_M=.*positive number of rows, or none"):
        call(1, 4096, 4096)
    assert ext.calls == []


def test_pdl_mode_refuses_an_unknown_value(ext, monkeypatch):
    monkeypatch.setenv("LIBORTHO_PDL", "yes")
    with pytest.raises(ValueError, match="LIBORTHO_PDL='yes'.*late"):
        call(1, 4096, 4096)
    assert ext.calls == []


@pytest.mark.parametrize("capability,bits", [((8, 0), 0), ((8, 9), 0), ((9, 0), 9), ((10, 0), 9), (None, 0)])
def test_the_default_mode_is_first_only_where_the_card_has_pdl(ext, monkeypatch, capability, bits):
    """$LIBORTHO_PDL unset: "first" on compute capability 9.0 and later, plain launches before it, and on a machine
    without CUDA (torch's capability query raises there)."""
    def query(*args):
        if capability is None:
            raise AssertionError("Torch not compiled with CUDA enabled")
        return capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", query)
    monkeypatch.delenv("LIBORTHO_PDL", raising=False)
    call(1, 4096, 4096, 0.01)
    assert ext.calls == ["fused_small_m"] and ext.pdl == bits
    assert cuda.pdl_default() == ("first" if bits else "0") and cuda.pdl_name() == ("first" if bits else "off")


@pytest.mark.parametrize("mode,m,bits", [("first", 16, 9), ("late", 32, 3), ("0", 1, 0), ("default", 1, 9),
                                         ("default", 2, 0)])
def test_the_tests_pdl_setting_runs_a_mode_at_every_m_or_the_default(ext, monkeypatch, mode, m, bits):
    """conftest.set_pdl, as the GPU bit tests use it: a named mode at every M ($LIBORTHO_PDL_MAX_M none), "default"
    with both variables cleared (a limit set before is gone)."""
    from conftest import set_pdl
    monkeypatch.setenv("LIBORTHO_PDL", "late")
    monkeypatch.setenv("LIBORTHO_PDL_MAX_M", "4")
    set_pdl(monkeypatch, mode)
    call(m, 4096, 4096)
    assert ext.calls == ["fused_small_m"] and ext.pdl == bits


def test_glu_runs_the_epilogue_at_decode_sizes_and_the_product_then_the_activation_otherwise(ext, monkeypatch):
    """ortho_glu's CUDA entry: v1's GLU epilogue at M 1-16 on the decode kernel v1 (output (M, N / 2), PDL bits passed
    on), else the product by ortho_linear's dispatch, de-interleaved and activated (the stand-in's zeros: silu(0) *
    0); v2 / v3 have no epilogue."""
    def glu_call(m, n=64, k=128):
        x = torch.zeros(m, k, dtype=torch.bfloat16)
        z = torch.zeros(1, dtype=torch.bfloat16)
        return cuda.ortho_glu_cuda(x, z, z, z, z, z, z, None, 1.0, 4, 128, n, k)
    ext.fused_small_m_glu = lambda x, *a: (ext.calls.append(("glu", a[-1])), (torch.ones(x.shape[0], a[-3] // 2), 0))[1]
    monkeypatch.setenv("LIBORTHO_PDL", "late")
    monkeypatch.setenv("LIBORTHO_PDL_MAX_M", "none")  # PDL at M = 16 too
    assert torch.equal(glu_call(16), torch.ones(16, 32))
    assert ext.calls == [("glu", cuda.pdl_mode())] and cuda.pdl_mode() != 0
    ext.calls.clear()
    assert torch.equal(glu_call(17), torch.zeros(17, 32))
    assert ext.calls and "glu" not in [c[0] for c in ext.calls if isinstance(c, tuple)]
    ext.calls.clear()
    ext.fused_small_m_v2 = lambda x, *a: ext._out("fused_small_m_v2", x, a[-3])
    cuda.set_decode_kernel("v2")
    try:
        assert glu_call(1).shape == (1, 32)
    finally:
        cuda.set_decode_kernel(None)
    assert ext.calls == ["fused_small_m_v2"]
