"""The CPU weight cache of the reference backend: the op's bits never change, only the work of a repeated call."""
import gc

import pytest
import torch
from torch import nn

from libortho import OrthoLinear
from libortho.ops import cpu_cache
from libortho.ops.reference import merged_weight_float


@pytest.fixture(autouse=True)
def fresh_cache():
    saved = cpu_cache.CACHE.budget_bytes
    cpu_cache.set_budget(64)
    yield cpu_cache.CACHE
    cpu_cache.set_budget(saved / 2 ** 20)


def _layer(n=96, k=200, bits=4, gs=64, sym=True, density=0.05, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=True)
    lin.weight.data.normal_(0, 1)
    return OrthoLinear.from_linear(lin, bits, gs, sym, density)


def _uncached(layer, x, alpha):
    """What the op computes, with the weight built afresh (the reference's own definition)."""
    w = merged_weight_float(layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values,
                            alpha, layer.bits, layer.group_size if layer.group_size > 0 else layer.in_features,
                            layer.out_features, layer.in_features)
    return ((x.float() @ w.t()) + layer.bias.float()).to(x.dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(96, 200), (17, 576), (1536, 576)])
def test_cached_calls_return_the_same_bits_as_a_fresh_build(fresh_cache, bits, sym, shape):
    layer = _layer(*shape, bits=bits, sym=sym, gs=128, seed=bits + 10 * sym)
    for alpha in (1.0, 0.5, 0.0, 1.0):
        layer.alpha = alpha
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, shape[1], dtype=dtype)
            assert torch.equal(layer(x), _uncached(layer, x, alpha)), (alpha, dtype)
    # four alphas in turn (the last equal to the first: rebuilt, alpha changed in between), two calls each
    assert (fresh_cache.misses, fresh_cache.hits) == (4, 4)
    assert len(fresh_cache) == 1


def test_in_place_changes_and_replaced_buffers_are_seen(fresh_cache):
    layer = _layer()
    x = torch.randn(4, 200)
    y1 = layer(x)
    layer.values.mul_(3.0)                      # in place: the version counter moves
    y3 = layer(x)
    assert not torch.equal(y1, y3) and torch.equal(y3, _uncached(layer, x, 1.0))
    layer.alpha = 0.0
    y0 = layer(x)
    layer.values.fill_(float("nan"))            # alpha 0 never reads S: still a hit, still finite
    hits = fresh_cache.hits
    assert torch.equal(layer(x), y0) and fresh_cache.hits == hits + 1
    layer.qweight.bitwise_xor_(1)               # the base changed: rebuilt
    assert torch.equal(layer(x), _uncached(layer, x, 0.0)) and not torch.equal(layer(x), y0)
    layer.scales = layer.scales * 2             # a new tensor in the buffer's place
    assert torch.equal(layer(x), _uncached(layer, x, 0.0))
    layer.scales.data = layer.scales.data / 4   # `.data =` keeps the version counter; the data pointer moves
    assert torch.equal(layer(x), _uncached(layer, x, 0.0))


def test_the_budget_is_kept_and_first_come_stay(fresh_cache):
    layers = [_layer(n=64, k=256, seed=s) for s in range(4)]    # 64 KiB of fp32 weight each
    cpu_cache.set_budget(0.2)                                    # room for three
    x = torch.randn(2, 256)
    for _ in range(3):
        outs = [m(x) for m in layers]
    assert len(fresh_cache) == 3 and fresh_cache.used_bytes == 3 * 64 * 256 * 4 <= fresh_cache.budget_bytes
    # the first three hit on the second and third pass, the fourth is rebuilt every time
    assert (fresh_cache.hits, fresh_cache.misses) == (6, 6)
    assert all(torch.equal(o, _uncached(m, x, 1.0)) for o, m in zip(outs, layers))
    cpu_cache.set_budget(0)
    layers[0](x)
    assert len(fresh_cache) == 0 and fresh_cache.used_bytes == 0


def test_a_freed_layer_leaves_the_cache(fresh_cache):
    layer = _layer()
    layer(torch.randn(2, 200))
    assert len(fresh_cache) == 1 and fresh_cache.used_bytes > 0
    del layer
    gc.collect()
    assert len(fresh_cache) == 0 and fresh_cache.used_bytes == 0


def test_not_kept_inference_tensors_and_tensors_that_require_grad(fresh_cache):
    with torch.inference_mode():
        layer = _layer()
        x = torch.randn(2, 200)
        assert torch.equal(layer(x), _uncached(layer, x, 1.0))
    assert len(fresh_cache) == 0
    layer = _layer()
    layer.values.requires_grad_(True)
    with torch.no_grad():
        layer(torch.randn(2, 200))
    assert len(fresh_cache) == 0


def test_the_budget_from_the_environment_says_what_it_expects(monkeypatch):
    monkeypatch.setenv("LIBORTHO_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="LIBORTHO_CPU_CACHE_MB='lots' is not a number"):
        cpu_cache._budget_from_env()
    monkeypatch.setenv("LIBORTHO_CPU_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="is negative"):
        cpu_cache._budget_from_env()
    monkeypatch.setenv("LIBORTHO_CPU_CACHE_MB", "0.5")
    assert cpu_cache._budget_from_env() == 2 ** 19
    with pytest.raises(ValueError, match=">= 0 MiB"):
        cpu_cache.set_budget(-3)
