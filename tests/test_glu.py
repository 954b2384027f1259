"""libortho.glu: gate_proj and up_proj as one interleaved layer whose op returns silu(gate) * up (CPU: the reference op;
tests/test_cuda_glu.py runs v1's epilogue)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import libortho
from libortho import glu
from libortho.errors import LibOrthoError
from libortho.layer import OrthoLinear
from libortho.sieve import sieve

from conftest import tiny_model


def layer(n, k, seed, density=0.05, sym=True, bias=False, dtype=torch.float32, group_size=32):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    values = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16  # the ortho values' dtypes
    return OrthoLinear.from_linear(lin, 4, group_size, sym, density, dtype=dtype, value_dtype=values)


def test_interleave_order_puts_eight_gate_rows_then_their_up_rows_in_each_tile():
    order = glu.interleave_order(24)
    assert order.tolist()[:16] == list(range(8)) + list(range(24, 32))
    assert order.tolist()[16:32] == list(range(8, 16)) + list(range(32, 40))
    assert sorted(order.tolist()) == list(range(48))


@pytest.mark.parametrize("seed", [0, 1])
def test_permuted_csr_rows_are_the_dense_rows_permuted(seed):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(40, 24, generator=gen)
    csr = sieve(dense, 0.2, "magnitude", value_dtype=torch.float16)
    csr.values[:3] += 1  # not all sorted by chance
    order = torch.randperm(40, generator=gen)
    out = glu.permute_csr_rows(csr, order)
    assert torch.equal(out.to_dense(), csr.to_dense()[order])
    assert out.row_ptr.dtype == csr.row_ptr.dtype and out.nnz == csr.nnz


@pytest.mark.parametrize("sym,bias,alpha", [(True, False, 1.0), (False, True, 0.5), (True, True, 0.0)])
def test_the_layer_is_silu_of_gate_times_up(sym, bias, alpha):
    gate, up = layer(24, 96, 0, sym=sym, bias=bias), layer(24, 96, 1, sym=sym, bias=bias)
    gate.alpha = up.alpha = alpha
    fused = glu.OrthoGLU.from_pair(gate, up)
    assert fused.out_features == 48 and fused.alpha == alpha and fused.ortho_nnz == gate.ortho_nnz + up.ortho_nnz
    x = torch.randn(3, 5, 96)
    want = F.silu(gate(x)) * up(x)
    got = fused(x)
    assert got.shape == (3, 5, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_rounds_each_step_as_the_eager_mlp_does():
    gate, up = layer(16, 64, 2, dtype=torch.bfloat16), layer(16, 64, 3, dtype=torch.bfloat16)
    fused = glu.OrthoGLU.from_pair(gate, up)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    g, u = gate(x), up(x)  # the reference op rounds each product to bf16
    want = F.silu(g) * u
    assert torch.equal(glu.glu_from_interleaved(torch.stack([g.view(4, 2, 8), u.view(4, 2, 8)], 2).flatten(1)), want)
    got = fused(x)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()  # at most an ulp


def test_split_gives_both_layers_back_exactly():
    gate, up = layer(40, 72, 4, sym=False, bias=True), layer(40, 72, 5, sym=False, bias=True)
    gate.alpha = up.alpha = 0.25
    g2, u2 = glu.OrthoGLU.from_pair(gate, up).split()
    for a, b in ((gate, g2), (up, u2)):
        assert type(b) is OrthoLinear and b.alpha == 0.25
        for key in ("qweight", "scales", "zeros", "row_ptr", "col_idx", "values", "bias"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_a_decomposed_model_decodes_the_same_fused(tmp_path):
    model = tiny_model("llama")
    libortho.decompose(model, libortho.OrthoConfig(bits=4, group_size=32, density=0.02), progress=False)
    ids = torch.randint(3, 256, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    size = libortho.report(model)["total"]["bytes"]
    assert glu.fuse_glu(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert not hasattr(model.model.layers[0].mlp, "gate_proj")
    assert libortho.report(model)["total"]["bytes"] == size - 2 * 4  # the same arrays, one row pointer fewer a layer
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert libortho.fuse_siblings(model) == [f"model.layers.{i}.self_attn.fused_q_proj_k_proj_v_proj" for i in (0, 1)]
    assert libortho.unfuse_siblings(model) == 2
    with pytest.raises(LibOrthoError, match="unfuse_glu"):
        libortho.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    libortho.set_alpha(model, 0.0)  # reaches the fused layers
    assert all(m.alpha == 0.0 for m in glu.glu_layers(model))
    with torch.no_grad():
        off = model(ids).logits
    assert glu.unfuse_glu(model) == 2
    assert not glu.glu_layers(model) and "forward" not in vars(model.model.layers[0].mlp)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, off, rtol=1e-5, atol=1e-5)
    libortho.set_alpha(model, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    libortho.save(model, tmp_path / "m")  # unfused: saves


def test_compiled_fused_model_matches_eager():
    model = tiny_model("llama")
    libortho.decompose(model, libortho.OrthoConfig(bits=4, group_size=32, density=0.02), progress=False)
    glu.fuse_glu(model)
    ids = torch.randint(3, 256, (1, 7))
    with torch.no_grad():
        want = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_what_keeps_gate_and_up_apart():
    def mlp(n=24, act=nn.SiLU, alphas=(1.0, 1.0)):
        m = nn.Module()
        m.gate_proj, m.up_proj, m.down_proj, m.act_fn = layer(n, 32, 0), layer(n, 32, 1), layer(32, n, 2), act()
        m.gate_proj.alpha, m.up_proj.alpha = alphas
        return m
    assert glu.why_not_glu(mlp()) is None
    assert "not SiLU" in glu.why_not_glu(mlp(act=nn.GELU))
    assert "alpha differs" in glu.why_not_glu(mlp(alphas=(1.0, 0.0)))
    assert "multiple of 8" in glu.why_not_glu(mlp(n=20))
    m = mlp()
    m.up_proj = layer(24, 32, 1, sym=False)
    assert "symmetric differs" in glu.why_not_glu(m)
    m = mlp()
    m.up_proj = nn.Linear(32, 24)
    assert "no decomposed" in glu.why_not_glu(m)
    root = nn.Module()
    root.mlp = mlp(n=32)  # sibling fusion takes whole 16-row tiles
    assert libortho.fuse_siblings(root, groups=(("gate_proj", "up_proj"),)) == ["mlp.fused_gate_proj_up_proj"]
    assert "already fused" in glu.why_not_glu(root.mlp)


def test_the_op_says_what_is_wrong():
    fused = glu.OrthoGLU.from_pair(layer(16, 32, 0), layer(16, 32, 1))
    with pytest.raises(ValueError, match="expected"):
        fused(torch.randn(2, 31))
