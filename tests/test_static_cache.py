"""libortho.static_cache: a StaticCache whose layers share one length, advanced once per forward by its owner."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from libortho.eval import bench_decode as bd
from libortho.static_cache import plain_cache, shared_length_cache


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return bd.random_llama(bd.tiny_config(), torch.device("cpu"), dtype=torch.float32).eval()


class CountScalarAdds(TorchDispatchMode):
    """In-place adds on one-element long tensors (lengths and counters) seen during a call."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.add_ and args[0].numel() == 1 and args[0].dtype == torch.long:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_the_same_tokens_logits_and_cache_as_transformers_cache(tiny, mode):
    """StaticDecoder with the shared length against transformers' own StaticCache: identical greedy tokens and logits,
    the same K / V rows in every layer, and one length (the prompt plus the steps) that every layer holds."""
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    runs = {}
    for shared in (False, True):
        dec = bd.StaticDecoder(tiny, 2, 7, 9, mode=mode, keep_logits=True, shared_length=shared)
        tokens = dec.generate(ids, 7)
        runs[shared] = (tokens, dec.step_logits(7).clone(), dec.cache)
    (t0, l0, c0), (t1, l1, c1) = runs[False], runs[True]
    assert torch.equal(t0, t1)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    assert not hasattr(c0, "length") and int(c1.length) == 9 + 6  # the prompt, then six one-token steps
    assert all(layer.cumulative_length is c1.length for layer in c1.layers)
    for a, b in zip(c0.layers, c1.layers):
        assert int(a.cumulative_length) == 15
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_step_advances_one_length_not_one_per_layer(tiny):
    """The point of it: in a decode step the per-layer length adds are gone; what is left is the decoder's own two
    one-element adds (the cache length and its token counter)."""
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    counts = {}
    for shared in (False, True):
        dec = bd.StaticDecoder(tiny, 1, 4, 5, mode="eager", shared_length=shared)
        dec.prefill(ids)
        with torch.no_grad(), CountScalarAdds() as c:
            dec._step()
        counts[shared] = c.n
    layers = tiny.config.num_hidden_layers
    assert counts == {False: layers + 1, True: 2}


def test_models_with_other_layer_kinds_keep_transformers_cache():
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100, sliding_window=4)
    cache = shared_length_cache(MistralForCausalLM(cfg), 1, 16)
    assert cache.length is None
    assert [type(layer).__name__ for layer in cache.layers] == [type(layer).__name__
                                                              for layer in plain_cache(MistralForCausalLM(cfg), 1,
                                                                                       16).layers]


def test_crop_moves_the_shared_length_once_as_transformers_cache_does(tiny):
    """cache.crop(-n) after a prompt: the length drops by n (once, not once per layer), and the next forward writes
    and attends where transformers' cache does after the same crop: the same logits and K / V rows."""
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    new = torch.randint(3, 256, (1, 2), generator=torch.Generator().manual_seed(6))
    outs, caches = [], []
    for make in (plain_cache, shared_length_cache):
        cache = make(tiny, 1, 16)
        with torch.no_grad():
            tiny(input_ids=ids, past_key_values=cache, use_cache=True)
            if getattr(cache, "length", None) is not None:
                cache.length.add_(ids.shape[1])
            cache.crop(-3)
            assert int(cache.get_seq_length()) == 6
            outs.append(tiny(input_ids=new, past_key_values=cache, use_cache=True).logits)
        caches.append(cache)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.keys[:, :, :8], b.keys[:, :, :8]) and torch.equal(a.values[:, :, :8], b.values[:, :, :8])
    with pytest.raises(RuntimeError, match="negative"):
        caches[1].crop(2)


def test_bench_decode_records_which_cache_length_it_ran(tmp_path):
    import json
    from libortho.cli import main
    for flag, want in (([], "shared"), (["--per-layer-length"], "per layer")):
        out = tmp_path / f"d{len(flag)}.json"
        main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "8",
              "--new-tokens", "4", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--variants", "bf16",
              "--check-tokens", "0", "--no-progress", *flag, "--out", str(out)])
        result = json.loads(out.read_text())
        assert result["protocol"]["cache_length"] == want
        assert f"static cache (length {want})" in out.with_suffix(".md").read_text()
