import pytest
import torch
from torch import nn

from libortho import OrthoLinear


def _layer(n=96, k=200, bits=4, gs=64, sym=True, density=0.05, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data.normal_(0, 1)
    return OrthoLinear.from_linear(lin, bits, gs, sym, density)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(96, 200), (17, 576), (64, 64)])
def test_alpha_one_is_base_plus_ortho(bits, sym, shape):
    layer = _layer(*shape, bits=bits, sym=sym, gs=128)
    x = torch.randn(5, 3, shape[1])
    ref = x.double() @ (layer.base_weight().double() + layer.ortho().to_dense().double()).t() + layer.bias.double()
    assert _rel(layer(x), ref) < 1e-5


def test_alpha_scales_the_ortho_stream_and_zero_is_base_only():
    layer = _layer()
    x = torch.randn(4, 200)
    base = x.double() @ layer.base_weight().double().t() + layer.bias.double()
    ortho = x.double() @ layer.ortho().to_dense().double().t()
    for a in (0.0, 0.5, -1.0, 2.0):
        layer.alpha = a
        assert _rel(layer(x), base + a * ortho) < 1e-5


def test_alpha_zero_never_reads_the_ortho_arrays():
    layer = _layer()
    layer.values.fill_(float("nan"))
    layer.col_idx.fill_(-30000)  # would index out of range if read
    x = torch.randn(4, 200)
    layer.alpha = 0.0
    y = layer(x)
    assert torch.isfinite(y).all()
    layer.alpha = 1.0
    with pytest.raises((IndexError, RuntimeError)):
        layer(x)


def test_from_linear_dims_and_properties():
    layer = _layer(n=40, k=130, bits=3, gs=32, density=0.1)
    assert (layer.in_features, layer.out_features, layer.bits, layer.group_size) == (130, 40, 3, 32)
    assert layer.ortho_nnz == int(0.1 * 40 * 130 + 0.5)
    assert layer.alpha == 1.0


def test_base_only_layer_has_no_ortho():
    lin = nn.Linear(64, 32)
    layer = OrthoLinear.from_linear(lin, density=0.0)
    assert layer.ortho_nnz == 0
    x = torch.randn(2, 64)
    assert _rel(layer(x), x.double() @ layer.base_weight().double().t() + lin.bias.double()) < 1e-5


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_alpha_not_finite(value):
    layer = _layer()
    with pytest.raises(ValueError, match="alpha must be finite"):
        layer.alpha = value


def test_alpha_wrong_type():
    with pytest.raises(TypeError, match="alpha"):
        _layer().alpha = "1"


def test_forward_bad_inputs():
    layer = _layer()
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 200\)"):
        layer(torch.randn(3, 199))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 200, dtype=torch.long))
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(3, 200, device="meta"))


def test_op_is_registered_with_fake_and_compiles():
    layer = _layer()
    assert hasattr(torch.ops.libortho, "ortho_linear")
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.libortho.ortho_linear(torch.empty(7, 200), layer.qweight, layer.scales, None,
                                              layer.row_ptr, layer.col_idx, layer.values, layer.bias,
                                              1.0, 4, 64, 96, 200)
        assert out.shape == (7, 96)
    x = torch.randn(6, 200)
    compiled = torch.compile(layer, fullgraph=True)
    assert _rel(compiled(x), layer(x)) < 1e-6


def test_dtype_follows_module_to():
    layer = _layer().to(torch.bfloat16)
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ layer.dense_weight().double().t() + layer.bias.double()
    assert _rel(y, ref) < 1e-2


def _csr_parts(layer):
    c = layer.ortho()
    return c.row_ptr.clone(), c.col_idx.clone(), c.values.clone(), c.shape


@pytest.mark.parametrize("damage,match", [
    ("swap", "strictly ascend"), ("duplicate", "strictly ascend"), ("range", "out of range"),
    ("row_ptr", "row pointers"), ("count", "expected"),
])
def test_pack_rejects_invalid_ortho_csr(damage, match):
    """The CUDA kernels walk each CSR row forward once and add entries without atomics: an unsorted,
    duplicated or out-of-range entry must be refused when the layer is built, not silently dropped."""
    from libortho import quant
    from libortho.sieve import CSR
    src = _layer(n=32, k=128, density=0.2)
    rp, col, val, shape = _csr_parts(src)
    row = int(torch.nonzero(rp.diff() >= 2)[0])
    a = int(rp[row])
    if damage == "swap":
        col[a], col[a + 1] = col[a + 1].clone(), col[a].clone()
    elif damage == "duplicate":
        col[a + 1] = col[a]
    elif damage == "range":
        col[-1] = shape[1]
    elif damage == "row_ptr":
        rp[row + 1], rp[row] = rp[row].clone(), rp[row + 1].clone()
    else:
        val = val[:-1]
    w = torch.randn(*shape)
    codes, grid = quant.quantize(w, 4, 64, True)
    with pytest.raises(ValueError, match=match):
        OrthoLinear.pack(codes, grid, CSR(rp, col, val, shape))
    OrthoLinear.pack(codes, grid, src.ortho())  # the undamaged CSR packs
