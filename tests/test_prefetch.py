"""The L2 prefetch chain (libortho.prefetch): launch order, links, what is handed over (no ortho byte at
alpha 0), one op per launch under torch.compile, and on a GPU bit-identical outputs with and without it."""
import pytest
import torch
from conftest import tiny_model

import libortho
from libortho import OrthoConfig, prefetch
from libortho.fuse import OrthoGroup

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ids(n=1, length=6, seed=0):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _model(fuse=True, density=0.05, device="cpu", dtype=torch.float32):
    model = tiny_model("llama", 0)
    libortho.decompose(model, OrthoConfig(bits=4, group_size=32, density=density), progress=False)
    model = model.to(device=device, dtype=dtype)
    if fuse:
        libortho.fuse_siblings(model)
    return model


def _expected_units(model):
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.fused_q_proj_k_proj_v_proj, a.o_proj, m.fused_gate_proj_up_proj, m.down_proj]
    return out


def test_launch_order_follows_the_forward_one_unit_per_launch():
    model = _model()
    order = prefetch.launch_order(model, _ids())
    assert [id(u) for u in order] == [id(u) for u in _expected_units(model)]
    libortho.unfuse_siblings(model)
    names = [type(u).__name__ for u in prefetch.launch_order(model, _ids())]
    assert names == ["OrthoLinear"] * 14  # 7 linears per block, 2 blocks


def test_group_members_with_different_alphas_launch_alone():
    model = _model()
    attn = model.model.layers[0].self_attn
    attn.k_proj.alpha = 0.0
    order = prefetch.launch_order(model, _ids())
    assert order[:3] == [attn.q_proj, attn.k_proj, attn.v_proj]


def test_chain_links_each_launch_to_the_next_and_the_last_to_the_first():
    model = _model()
    units = _expected_units(model)
    assert libortho.chain_l2_prefetch(model, _ids(), max_mb=1) == len(units)
    for unit, nxt in zip(units, units[1:] + units[:1]):
        assert unit.__dict__["_l2_next"] is nxt and unit.__dict__["_l2_bytes"] == 2 ** 20
    assert not any(isinstance(c, OrthoGroup) for c in units[0].children())  # a reference, not a submodule
    assert "_l2_next" not in dict(model.named_modules())  # nothing registered
    assert libortho.clear_l2_prefetch(model) == len(units)
    assert all("_l2_next" not in u.__dict__ for u in units)
    assert all(t is None for t in prefetch.next_buffers(units[0]))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_chain_refuses_a_cap_that_is_not_positive(bad):
    with pytest.raises(ValueError, match="max_mb must be > 0"):
        libortho.chain_l2_prefetch(_model(), _ids(), max_mb=bad)


def _nbytes(t):
    return 0 if t is None else t.numel() * t.element_size()


def test_next_buffers_hand_over_no_ortho_array_at_alpha_0():
    model = _model()
    units = _expected_units(model)
    libortho.chain_l2_prefetch(model, _ids(), max_mb=64)
    nxt = units[1]                            # o_proj, after q/k/v
    q, s, col, val = prefetch.next_buffers(units[0])
    assert col is not None and col.numel() == val.numel() == nxt.ortho_nnz
    assert q.data_ptr() == nxt.qweight.data_ptr() and q.numel() == nxt.qweight.numel()
    assert s.data_ptr() == nxt.scales.data_ptr() and s.numel() == nxt.scales.numel()
    nxt.alpha = 0.0
    q, s, col, val = prefetch.next_buffers(units[0])
    assert col is None and val is None and q.numel() == nxt.qweight.numel()
    libortho.set_alpha(model, 0.0)
    group = units[2]                          # gate/up: at alpha 0 for every member, no ortho either
    assert prefetch.next_buffers(units[1])[2:] == (None, None)
    group._members[0].alpha = 1.0             # members disagree: the group's arrays are not all read
    assert prefetch.next_buffers(units[1])[2:] == (None, None)


def test_next_buffers_stay_within_the_cap_ortho_first():
    model = _model(density=0.2)
    units = _expected_units(model)
    nxt = units[2]                            # gate/up group
    nnz = nxt.values.numel()
    ortho = nnz * (nxt.col_idx.element_size() + nxt.values.element_size())
    cap_mb = (ortho + nxt.qweight.numel()) / 2 ** 20  # all ortho entries, about a quarter of the weights
    libortho.chain_l2_prefetch(model, _ids(), max_mb=cap_mb)
    q, s, col, val = prefetch.next_buffers(units[1])
    assert col.numel() == nnz
    total = sum(map(_nbytes, (q, s, col, val)))
    assert total <= int(cap_mb * 2 ** 20) and q.numel() < nxt.qweight.numel()
    assert q.numel() % (nxt.qweight.shape[1] * nxt.qweight.shape[2]) == 0  # whole row tiles, from the first
    assert s.numel() // (nxt.scales.shape[1] * 16) == q.numel() // (nxt.qweight.shape[1] * nxt.qweight.shape[2])
    libortho.chain_l2_prefetch(model, _ids(), max_mb=ortho / 2 / 2 ** 20)  # half the ortho arrays, no weights
    q, s, col, val = prefetch.next_buffers(units[1])
    assert 0 < col.numel() < nnz and q.numel() == 0


def test_outputs_unchanged_and_one_op_per_launch_under_compile():
    model = _model()
    ids = _ids()
    want = model(ids).logits
    libortho.chain_l2_prefetch(model, ids)
    got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ops = []

    def backend(gm, _):
        ops.extend(n for n in gm.graph.nodes if n.op == "call_function" and "ortho_linear" in str(n.target))
        return gm.forward
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True, backend=backend)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(ops) == 8  # 4 launches per block, 2 blocks
    assert all(len([a for a in n.args[13:] if a is not None]) + len(n.kwargs) >= 1 for n in ops)


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_prefetch_leaves_cuda_outputs_bit_identical(alpha):
    from libortho.ops import cuda as cuda_backend
    assert cuda_backend.build(), cuda_backend._state["error"]
    model = _model(device="cuda", dtype=torch.bfloat16)
    libortho.set_alpha(model, alpha)
    for batch in (1, 3, 8):
        ids = _ids(batch, 1, seed=batch).cuda()
        want = model(ids).logits
        libortho.chain_l2_prefetch(model, ids, max_mb=0.25)
        got = model(ids).logits
        libortho.clear_l2_prefetch(model)
        assert torch.equal(got, want), batch


@GPU
@pytest.mark.gpu
def test_prefetch_binding_takes_up_to_4_tensors_on_the_device():
    from libortho import quant
    from libortho.ops import cuda as cuda_backend
    assert cuda_backend.build(), cuda_backend._state["error"]
    layer = _model(fuse=False, device="cuda", dtype=torch.bfloat16).model.layers[0].mlp.down_proj
    ext = cuda_backend.extension()
    x = torch.randn(2, layer.in_features, device="cuda", dtype=torch.bfloat16)
    args = (x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, None, 1.0,
            4, quant.effective_group_size(layer.group_size, layer.in_features), layer.out_features,
            layer.in_features, False)
    want = cuda_backend._checked(ext.fused_small_m(*args))
    odd = torch.zeros(100, dtype=torch.uint8, device="cuda")[3:]  # misaligned start: trimmed to 16-byte units
    got = cuda_backend._checked(ext.fused_small_m_prefetch(*args, [layer.qweight, odd, layer.values[1:]]))
    assert torch.equal(got, want)
    assert ext.fused_small_m_prefetch(*args, [layer.qweight] * 5)[1] == -1
    assert ext.fused_small_m_prefetch(*args, [layer.qweight.cpu()])[1] == -1
    with pytest.raises(ValueError, match="must be on cuda"):
        torch.ops.libortho.ortho_linear(*args[:13], next_qweight=layer.qweight.cpu())
