"""Sibling OrthoLinears fused into one launch (libortho.fuse): same outputs, one op per group, no copies."""
import pytest
import torch
from conftest import tiny_model
from torch import nn

import libortho
from libortho import OrthoConfig, OrthoLinear
from libortho import fuse as fuse_mod
from libortho import layer as layer_mod
from libortho.fuse import OrthoGroup, why_not_fusable


def _ids(n=2, length=10, seed=0):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _decomposed(arch="llama", seed=0):
    model = tiny_model(arch, seed)
    libortho.decompose(model, OrthoConfig(bits=4, group_size=32, density=0.05), progress=False)
    return model


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the products run (fused groups and single layers)."""
    calls = []

    def counting(layer, x, alpha):
        calls.append((type(layer).__name__, layer.out_features))
        return layer_mod.run_packed(layer, x, alpha)
    monkeypatch.setattr(fuse_mod, "run_packed", counting)
    monkeypatch.setattr(layer_mod.OrthoLinear, "forward_alone", lambda self, x: counting(self, x, self.alpha))
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with bias
def test_fused_model_matches_and_runs_one_product_per_group(arch, op_calls):
    model = _decomposed(arch)
    ids = _ids()
    want = model(ids).logits
    assert len(op_calls) == 14
    names = libortho.fuse_siblings(model)
    assert names == [f"model.layers.{i}.{p}" for i in range(2)
                     for p in ("self_attn.fused_q_proj_k_proj_v_proj", "mlp.fused_gate_proj_up_proj")]
    op_calls.clear()
    got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # per block: q/k/v as one (64 + 32 + 32 rows), o_proj, gate/up as one (2 x 160), down_proj
    assert op_calls == [("OrthoGroup", 128), ("OrthoLinear", 64), ("OrthoGroup", 320), ("OrthoLinear", 64)] * 2
    assert all(g._stash is None for _, g in fuse_mod.fused_groups(model))  # every slice handed out


def test_members_are_views_of_the_group_and_report_is_unchanged():
    model = _decomposed()
    before = libortho.report(model)["total"]
    libortho.fuse_siblings(model)
    assert libortho.report(model)["total"] == before
    attn = model.model.layers[0].self_attn
    group = attn.fused_q_proj_k_proj_v_proj
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        for key in ("qweight", "scales", "col_idx", "values"):
            assert getattr(m, key).untyped_storage().data_ptr() == getattr(group, key).untyped_storage().data_ptr()
    assert group.values.numel() == sum(m.ortho_nnz for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    # the fused CSR is the members' CSRs stacked: the dense weights agree row block by row block
    dense = torch.cat([m.ortho().to_dense() for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    torch.testing.assert_close(libortho.OrthoLinear.ortho(group).to_dense(), dense, rtol=0, atol=0)


def test_different_alphas_run_alone(op_calls):
    model, ref = _decomposed(), _decomposed()
    libortho.fuse_siblings(model)
    for m in (model, ref):
        m.model.layers[0].self_attn.k_proj.alpha = 0.0
        m.model.layers[1].mlp.up_proj.alpha = 0.5
    ids = _ids()
    op_calls.clear()
    got = model(ids).logits
    kinds = [k for k, _ in op_calls]
    assert kinds.count("OrthoGroup") == 2 and kinds.count("OrthoLinear") == 4 + 5  # two groups run split
    torch.testing.assert_close(got, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_alpha_changed_between_siblings_is_honoured():
    model = _decomposed()
    libortho.fuse_siblings(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 64)
    q = attn.q_proj(x)                     # runs the group at alpha 1 and keeps k and v
    attn.k_proj.alpha = 0.0                # k must not get the slice computed at alpha 1
    k = attn.k_proj(x)
    torch.testing.assert_close(k, attn.k_proj.forward_alone(x), rtol=0, atol=0)
    assert not torch.allclose(k, _decomposed().model.layers[0].self_attn.k_proj(x))
    torch.testing.assert_close(q, _decomposed().model.layers[0].self_attn.q_proj(x), rtol=1e-5, atol=1e-5)


def test_other_input_runs_alone():
    model = _decomposed()
    libortho.fuse_siblings(model)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, 64), torch.randn(2, 64)
    attn.q_proj(x)
    torch.testing.assert_close(attn.k_proj(y), attn.k_proj.forward_alone(y), rtol=0, atol=0)


def test_compiled_graph_holds_one_product_per_group():
    model = _decomposed()
    libortho.fuse_siblings(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    ops = []

    def backend(gm, _):
        ops.extend(n for n in gm.graph.nodes if n.op == "call_function" and "ortho_linear" in str(n.target))
        return gm.forward

    def step(x):
        return attn.q_proj(x) + attn.k_proj(x).repeat(1, 2) - attn.v_proj(x).repeat(1, 2), mlp(x)
    x = torch.randn(1, 64)
    want = step(x)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=backend)(x)
    assert len(ops) == 3  # q/k/v, gate/up, down_proj
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(g._stash is None for _, g in fuse_mod.fused_groups(model))


def test_save_and_cast_refuse_fused_model_until_unfused(tmp_path):
    model = _decomposed()
    ids = _ids()
    want = model(ids).logits
    libortho.fuse_siblings(model)
    with pytest.raises(libortho.LibOrthoError, match="unfuse_siblings"):
        libortho.save(model, tmp_path / "m")
    with pytest.raises(libortho.LibOrthoError, match="unfuse_siblings"):
        libortho.cast_model(model, torch.bfloat16)
    assert not (tmp_path / "m").exists()
    assert libortho.unfuse_siblings(model) == 4
    assert not fuse_mod.fused_groups(model)
    q = model.model.layers[0].self_attn.q_proj
    assert q._group is None and q.qweight.untyped_storage().nbytes() == q.qweight.numel() * 4
    libortho.save(model, tmp_path / "m")
    torch.testing.assert_close(libortho.load(tmp_path / "m")(ids).logits, want, rtol=0, atol=0)


def _layer(n, k, bits=4, seed=0):
    torch.manual_seed(seed)
    return OrthoLinear.from_linear(nn.Linear(k, n, bias=False), bits=bits, group_size=32, density=0.05)


def test_what_cannot_be_fused():
    assert why_not_fusable([_layer(32, 64), _layer(16, 64)]) is None
    assert "in_features" in why_not_fusable([_layer(32, 64), _layer(32, 128)])
    assert "bits" in why_not_fusable([_layer(32, 64), _layer(32, 64, bits=3)])
    assert "multiples of 16" in why_not_fusable([_layer(24, 64), _layer(32, 64)])
    assert why_not_fusable([_layer(32, 64), _layer(24, 64)]) is None  # the last may end in a partial tile
    half = _layer(32, 64)
    half.scales = half.scales.half().to(torch.bfloat16)
    assert "scales" in why_not_fusable([_layer(32, 64), half])
    with pytest.raises(libortho.LibOrthoError, match="bits differs"):
        OrthoGroup([_layer(32, 64), _layer(32, 64, bits=2)])


def test_partial_last_tile_and_fusing_twice():
    a, b = _layer(32, 64, seed=1), _layer(24, 64, seed=2)
    x = torch.randn(5, 64)
    want = torch.cat([a(x), b(x)], dim=-1)
    parent = nn.Module()
    parent.q_proj, parent.k_proj = a, b
    assert libortho.fuse_siblings(parent, groups=[("q_proj", "k_proj")]) == ["fused_q_proj_k_proj"]
    assert libortho.fuse_siblings(parent, groups=[("q_proj", "k_proj")]) == []  # already fused: left alone
    torch.testing.assert_close(torch.cat([a(x), b(x)], dim=-1), want, rtol=1e-6, atol=1e-6)
    assert "already fused" in why_not_fusable([a, b])



class _CountLinear(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def test_dense_siblings_fused_match_run_one_linear_per_group_and_unfuse():
    model = tiny_model("qwen2")  # q/k/v with bias
    ids = _ids()
    want = model(ids).logits
    params = sum(p.numel() for p in model.parameters())
    assert len(libortho.fuse_linear_siblings(model)) == 4
    assert sum(p.numel() for p in model.parameters()) == params  # members' weights are views: nothing added
    attn = model.model.layers[0].self_attn
    group = attn.fused_q_proj_k_proj_v_proj
    assert attn.v_proj.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    with _CountLinear() as count:
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert count.shapes == [(128, 64), (64, 64), (320, 64), (64, 160)] * 2 + [(256, 64)]  # + lm_head
    assert libortho.fuse_linear_siblings(model) == []  # already fused: left alone
    assert libortho.unfuse_siblings(model) == 4
    assert type(attn.q_proj) is nn.Linear and attn.q_proj._group is None
    assert attn.q_proj.weight.requires_grad  # as transformers made it
    assert attn.q_proj.weight.untyped_storage().nbytes() == attn.q_proj.weight.numel() * 4
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_dense_fusion_compiles_to_one_linear_per_group():
    model = tiny_model("llama")
    libortho.fuse_linear_siblings(model)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 64)
    want = mlp(x)
    linears = []

    def backend(gm, _):
        linears.extend(n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
        return gm.forward
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(mlp, fullgraph=True, backend=backend)(x), want, rtol=0, atol=0)
    assert len(linears) == 2  # gate/up, down


def test_what_dense_layers_cannot_be_fused():
    from libortho.fuse import why_not_linear_fusable
    assert why_not_linear_fusable([nn.Linear(8, 4), nn.Linear(8, 3)]) is None
    assert "in_features" in why_not_linear_fusable([nn.Linear(8, 4), nn.Linear(9, 4)])
    assert "bias" in why_not_linear_fusable([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
    assert "dtype" in why_not_linear_fusable([nn.Linear(8, 4), nn.Linear(8, 4).half()])
    assert "plain" in why_not_linear_fusable([nn.Linear(8, 4), _layer(32, 8)])


def test_a_sibling_group_needs_a_product():
    with pytest.raises(TypeError, match="abstract"):
        fuse_mod.SiblingGroup()

# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_cuda_fused_matches_unfused(alpha):
    ref, model = (_decomposed().to("cuda", torch.bfloat16) for _ in range(2))
    libortho.fuse_siblings(model)
    for m in (ref, model):
        libortho.set_alpha(m, alpha)
    for batch, length in ((1, 1), (4, 1), (1, 3), (16, 1), (1, 40)):  # the decode kernel at M 1-16, and M > 16
        ids = _ids(batch, length).cuda()
        got, want = model(ids).logits.double(), ref(ids).logits.double()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, (batch, length)
    assert all(g._stash is None for _, g in fuse_mod.fused_groups(model))
