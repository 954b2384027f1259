"""libortho.norms: the RMSNorms and residual adds of a decoder layer done by its products (CPU: the reference ops;
tests/test_cuda_norms.py runs v1's epilogues)."""
import pytest
import torch
from torch import nn

import libortho
from libortho import attention, norms
from libortho.eval import bench_decode as bd
from libortho.ops.reference import NORM_TILE

from test_glu import layer


def rmsnorm(h, weight, eps):
    """transformers' LlamaRMSNorm."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)).to(h.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
def test_add_norm_is_the_eager_residual_add_and_the_norms_pieces(dtype, m):
    lay = layer(64, 48, seed=m, bias=True, dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(m, 1, 48, generator=gen).to(dtype)
    res = torch.randn(m, 1, 64, generator=gen).to(dtype)
    g = (1 + 0.1 * torch.randn(64, generator=gen)).to(dtype)
    h, gh, part = norms.add_norm(lay, x, res, g)
    assert torch.equal(h, res + lay(x))  # eager: the product rounded, then the add rounded
    assert torch.equal(gh, g * h)
    assert part.shape == (m, 1, 64 // NORM_TILE) and part.dtype == torch.float32
    want = h.double().square().unflatten(-1, (-1, NORM_TILE)).sum(-1)
    assert torch.allclose(part.double(), want, rtol=1e-6)


@pytest.mark.parametrize("glu_layer", [False, True])
def test_the_rms_product_is_the_layer_on_the_normalized_input(glu_layer):
    """r * (W (g * h)) against W applied to RMSNorm(h): equal to float32 rounding in float32, to the bf16 level in
    bf16 (the norm's output is not rounded before the product), and against a float64 chain."""
    eps = 1e-5
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        gen = torch.Generator().manual_seed(3)
        if glu_layer:
            lay = libortho.glu.OrthoGLU.from_pair(layer(32, 64, 1, dtype=dtype), layer(32, 64, 2, dtype=dtype))
        else:
            lay = layer(48, 64, seed=4, bias=True, dtype=dtype)
        h = (3 * torch.randn(5, 64, generator=gen)).to(dtype)
        g = (1 + 0.1 * torch.randn(64, generator=gen)).to(dtype)
        _, gh, part = norms.carry(h, g)
        got = norms.rms_product(lay, gh, part, eps, lay.alpha)
        want = lay(rmsnorm(h, g, eps))
        assert got.shape == want.shape and got.dtype == dtype
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < tol, (dtype, err)


@pytest.mark.parametrize("glu_layer", [False, True])
def test_the_cuda_backends_fallback_finishes_the_rounded_product(glu_layer, monkeypatch):
    """Where v1 has no norm epilogue the CUDA backend takes the op's product (rounded to bf16) and finishes r, the bias
    and the GLU in PyTorch. With the product stubbed by the reference op (CPU): that chain written out here bit for
    bit, and the reference rms op (no rounding before r) to the bf16 level."""
    from libortho.ops import cuda as cuda_backend
    from libortho.ops.reference import glu_from_interleaved, ortho_linear_reference
    monkeypatch.setattr(cuda_backend, "norm_epilogue_takes", lambda *a: False)
    monkeypatch.setattr(cuda_backend, "ortho_linear_cuda", ortho_linear_reference)
    lay = (libortho.glu.OrthoGLU.from_pair(layer(32, 64, 1, bias=True, dtype=torch.bfloat16),
                                           layer(32, 64, 2, bias=True, dtype=torch.bfloat16))
           if glu_layer else layer(48, 64, seed=4, bias=True, dtype=torch.bfloat16))
    gen = torch.Generator().manual_seed(5)
    h = (3 * torch.randn(2, 1, 64, generator=gen)).to(torch.bfloat16)
    _, gh, part = norms.carry(h, (1 + 0.1 * torch.randn(64, generator=gen)).to(torch.bfloat16))
    args = norms._args(lay, gh, lay.alpha)
    backend = cuda_backend.ortho_glu_rms_cuda if glu_layer else cuda_backend.ortho_linear_rms_cuda
    got = backend(gh, *args, part, 1e-5)
    y = ortho_linear_reference(gh, *args[:6], None, *args[7:]).float()  # the product without its bias, in bf16
    r = torch.rsqrt(part.sum(-1, keepdim=True) / 64 + 1e-5)
    chain = (y * r + lay.bias.float()).to(torch.bfloat16)
    chain = glu_from_interleaved(chain) if glu_layer else chain
    assert got.shape == chain.shape == (2, 1, lay.out_features // (2 if glu_layer else 1))
    assert torch.equal(got, chain)
    op = torch.ops.libortho.ortho_glu_rms if glu_layer else torch.ops.libortho.ortho_linear_rms
    want = op(gh, *args, part, 1e-5).float()
    assert (got.float() - want).norm() / want.norm() < 2e-2


def test_bad_norm_inputs_say_what_is_wrong():
    lay = layer(64, 48, seed=0)
    x = torch.randn(2, 48)
    with pytest.raises(ValueError, match="residual has shape"):
        norms.add_norm(lay, x, torch.randn(2, 32), torch.ones(64))
    with pytest.raises(ValueError, match="residual must be a torch.float32"):
        norms.add_norm(lay, x, torch.randn(2, 64, dtype=torch.float64), torch.ones(64))
    with pytest.raises(ValueError, match="norm weight must be"):
        norms.add_norm(lay, x, torch.randn(2, 64), torch.ones(63))
    with pytest.raises(ValueError, match="part .* must be a torch.float32"):
        norms.rms_product(lay, x, torch.ones(2, 3, dtype=torch.float64), 1e-5, 1.0)
    with pytest.raises(ValueError, match="part .* has shape"):
        norms.rms_product(lay, x, torch.ones(2, 4), 1e-5, 1.0)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        norms.add_norm(layer(40, 48, seed=0), x, torch.randn(2, 40), torch.ones(40))


def _decomposed_llama(seed=0):
    torch.manual_seed(seed)
    model = bd.random_llama(bd.tiny_config(), torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():  # norms with weights of their own (random_llama's are ones)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    libortho.decompose(model, libortho.OrthoConfig(bits=4, group_size=32, density=0.02, method="rtn"), progress=False)
    return model


def _fast(model):
    libortho.fuse_glu(model)
    libortho.fuse_siblings(model)
    attention.use_decode_attention(model)
    attention.use_attention_step(model)
    return model


def _decode(model, ids, mode, steps=8):
    dec = bd.StaticDecoder(model, ids.shape[0], steps + 1, ids.shape[1], mode=mode, keep_logits=True, warmup_steps=0)
    dec.cache.causal_only = True
    dec.prepare(ids), dec.prefill(ids), dec.decode(steps)
    return dec.tokens[:, :steps].clone(), dec.logits[:, :steps].float().clone()


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_a_model_decodes_the_same_with_the_norms_in_its_products(mode, monkeypatch):
    """The tiny Llama, float32, decomposed, GLU + fused q/k/v + the step op: with fuse_norms no layer norm runs in a
    decode step (counted in eager mode), the final norm once a step, and the tokens and logits are the unfused
    model's (to float32 rounding)."""
    model = _fast(_decomposed_llama())
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    want = _decode(model, ids, mode)
    n = model.config.num_hidden_layers
    assert norms.fuse_norms(model) == list(range(n))
    calls = {"layer": 0, "final": 0}
    fused, add_norm = [], norms.add_norm
    monkeypatch.setattr(norms, "add_norm", lambda *a: fused.append(1) or add_norm(*a))
    if mode == "eager":
        rms_class = type(model.model.norm)
        real = rms_class.forward

        def counting(self, x):
            calls["final" if self is model.model.norm else "layer"] += 1
            return real(self, x)
        monkeypatch.setattr(rms_class, "forward", counting)
    got = _decode(model, ids, mode)
    assert torch.equal(got[0], want[0])
    assert (got[1] - want[1]).abs().max() < 1e-3
    if mode == "eager":  # the prefill: 2 norms a layer + the final one; each of the 8 steps: the final one only
        assert calls == {"layer": 2 * n, "final": 1 + 8}, calls
    if mode == "eager":
        assert len(fused) == 2 * n * 8  # o_proj and down_proj of every layer in every step
    else:
        assert fused  # the compiled step was traced through the fused path
    assert norms.unfuse_norms(model) == n
    assert not any("forward" in vars(m) for m in (model.model.norm, *model.model.layers))


def test_fuse_norms_takes_every_layer_or_none():
    model = _decomposed_llama()
    assert norms.fuse_norms(model) == []  # no step op, no GLU layer, no fused q/k/v
    why = norms.why_not_norms(model.model.layers[0], model.model.layers[1].input_layernorm)
    assert "step op" in why
    _fast(model)
    model.model.layers[1].post_attention_layernorm.variance_epsilon = 1  # an int: not the plain RMSNorm's float
    assert "RMSNorm" in norms.why_not_norms(model.model.layers[1], model.model.norm)
    assert norms.fuse_norms(model) == []
    assert not any("forward" in vars(m) for m in model.model.layers)


def test_a_norm_with_an_offset_is_not_taken():
    """Gemma's RMSNorm scales by 1 + weight: the sample check refuses it."""
    class OffsetNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(32)), 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.variance_epsilon)
    assert not norms._plain_rmsnorm(OffsetNorm())
    plain = bd.random_llama(bd.tiny_config(), torch.device("cpu"), dtype=torch.float32).model.norm
    assert norms._plain_rmsnorm(plain)
