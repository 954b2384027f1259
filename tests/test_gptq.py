"""Hessian-aware decomposition: GPTQ sweep, in-sweep ortho extraction, delta mode, calibration driver."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, char_tokenizer, tiny_model

import libortho
from libortho import OrthoConfig, quant
from libortho.gptq import gptq_decompose
from libortho.sieve import ortho_count

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n, k, seed=0):
    """X with a known covariance: a few strong, correlated channels over a weak background."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k)
    scale = torch.ones(k)
    scale[torch.randperm(k, generator=g)[:4]] = 20.0  # massive-activation channels, as in SmolLM2
    return (torch.randn(n, k, generator=g) @ (torch.eye(k) + mix)) * scale


def out_err(x, w, w_hat):
    return float((x @ w.t() - x @ w_hat.t()).norm())


def _deq(codes, grid, csr=None):
    w = quant.dequantize(codes, grid)
    return w + csr.to_dense() if csr is not None else w


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_output_error(bits, act_order):
    torch.manual_seed(0)
    w = torch.randn(96, 200)
    x = correlated_inputs(2048, 200)
    h = 2 * x.t() @ x / x.shape[0]
    codes, grid, _ = gptq_decompose(w, h, bits, 64, True, act_order=act_order)
    rtn_codes, rtn_grid = quant.quantize(w, bits, 64, True)
    e_gptq, e_rtn = out_err(x, w, _deq(codes, grid)), out_err(x, w, _deq(rtn_codes, rtn_grid))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("case", [(96, 200, 64, 0.01, "hessian", True), (40, 130, -1, 0.05, "hessian", False),
                                  (64, 576, 128, 0.003, "magnitude", True), (17, 64, 32, 0.2, "random", True),
                                  (128, 100, 32, 0.5, "hessian", True)])
def test_in_sweep_ortho_count_is_exact_and_helps(case):
    n, k, gs, density, score, act_order = case
    torch.manual_seed(1)
    w = torch.randn(n, k)
    x = correlated_inputs(1024, k, seed=2)
    h = 2 * x.t() @ x / x.shape[0]
    codes, grid, csr = gptq_decompose(w, h, 3, gs, True, density, score, act_order=act_order)
    assert csr.nnz == ortho_count(density, n * k)
    _, _, none = gptq_decompose(w, h, 3, gs, True, 0.0, act_order=act_order)
    assert none is None
    base_codes, base_grid, _ = gptq_decompose(w, h, 3, gs, True, 0.0, act_order=act_order)
    if score == "hessian":
        assert out_err(x, w, _deq(codes, grid, csr)) < out_err(x, w, _deq(base_codes, base_grid))


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _calib(n=8, length=32, seed=0):
    return libortho.Calibration(torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed)),
                                f"{n} random windows")


@pytest.mark.parametrize("method, score", [("gptq", "hessian"), ("rtn", "hessian"), ("rtn", "magnitude"),
                                           ("gptq", "magnitude")])
def test_delta_mode_with_itself_as_reference_equals_self_mode(method, score):
    model = tiny_model("llama")
    cfg = OrthoConfig(bits=4, group_size=32, density=0.03, score=score, method=method)
    calib = _calib() if cfg.needs_calibration else None
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    libortho.decompose(a, cfg, calib=calib, progress=False)
    libortho.decompose(b, cfg.replace(base_from="reference"), calib=calib, reference=copy.deepcopy(model),
                       progress=False)
    sa, sb = _buffers(a), _buffers(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_delta_mode_base_comes_from_the_reference():
    ref = tiny_model("llama", seed=0)
    tuned = copy.deepcopy(ref)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.add_(0.05 * torch.randn_like(tuned.model.layers[0].mlp.down_proj.weight))
    cfg = OrthoConfig(bits=4, group_size=32, density=0.02, method="rtn", base_from="reference")
    libortho.decompose(tuned, cfg, reference=ref, progress=False)
    self_ref = copy.deepcopy(ref)
    libortho.decompose(self_ref, cfg.replace(base_from="self"), progress=False)
    for (name, m), (_, m_ref) in zip(libortho.ortho_layers(tuned), libortho.ortho_layers(self_ref)):
        assert torch.equal(m.qweight, m_ref.qweight) and torch.equal(m.scales, m_ref.scales), name
    down = dict(libortho.ortho_layers(tuned))["model.layers.0.mlp.down_proj"]
    assert not torch.equal(down.values, dict(libortho.ortho_layers(self_ref))["model.layers.0.mlp.down_proj"].values)


def test_delta_mode_refuses_other_shapes_and_architectures():
    cfg = OrthoConfig(base_from="reference")
    with pytest.raises(libortho.LibOrthoError, match="same architecture"):
        libortho.decompose(tiny_model("llama"), cfg, reference=tiny_model("qwen2"), progress=False)
    other = tiny_model("llama")
    other.model.layers[0].mlp.down_proj = torch.nn.Linear(96, 64, bias=False)
    with pytest.raises(libortho.LibOrthoError, match="differs"):
        libortho.decompose(tiny_model("llama"), cfg, reference=other, progress=False)
    with pytest.raises(libortho.LibOrthoError, match="needs the reference"):
        libortho.decompose(tiny_model("llama"), cfg, progress=False)
    with pytest.raises(libortho.LibOrthoError, match="base_from is 'self'"):
        libortho.decompose(tiny_model("llama"), OrthoConfig(), reference=tiny_model("llama"), progress=False)


@pytest.mark.parametrize("score", ["hessian", "random"])
def test_decomposition_is_deterministic(score):
    cfg = OrthoConfig(bits=3, group_size=32, density=0.02, score=score, method="gptq", seed=7)
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    libortho.decompose(a, cfg, calib=_calib(), progress=False)
    libortho.decompose(b, cfg, calib=_calib(), progress=False)
    sa, sb = _buffers(a), _buffers(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_driver_on_tiny_models(arch):
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    dense = tiny_model(arch)
    ref = dense(ids).logits
    errs = {}
    for method in ("rtn", "gptq"):
        model = tiny_model(arch)
        cfg = OrthoConfig(bits=3, group_size=32, density=0.02, score="hessian", method=method)
        libortho.decompose(model, cfg, calib=_calib(16, 32), progress=False)
        layers = libortho.ortho_layers(model)
        assert all(m.ortho_nnz == ortho_count(0.02, m.in_features * m.out_features) for _, m in layers)
        assert model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (2, 20)
        errs[method] = float((model(ids).logits - ref).norm() / ref.norm())
    assert errs["gptq"] < errs["rtn"], errs


def test_driver_keeps_model_on_its_device_and_records_calibration(tmp_path):
    model = tiny_model("llama")
    calib = _calib()
    libortho.decompose(model, OrthoConfig(method="gptq", score="hessian", group_size=32), calib=calib, progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    libortho.save(model, tmp_path / "m")
    assert libortho.read_manifest(tmp_path / "m")["calibration"] == "8 random windows"


def test_calibration_data_windows_and_errors():
    tok = char_tokenizer()
    text = "Emma Woodhouse, handsome, clever, and rich. " * 40
    a = libortho.calibration_data(tok, text, n_samples=6, seq_len=32, seed=3)
    b = libortho.calibration_data(tok, text, n_samples=6, seq_len=32, seed=3)
    assert a.input_ids.shape == (6, 32) and torch.equal(a.input_ids, b.input_ids)
    assert "6 x 32 tokens" in a.description
    with pytest.raises(libortho.LibOrthoError, match="windows"):
        libortho.calibration_data(tok, text, n_samples=1000, seq_len=32)
    with pytest.raises(TypeError, match="calib"):
        libortho.decompose(tiny_model("llama"), OrthoConfig(score="hessian"), calib=[1, 2, 3], progress=False)


@pytest.mark.parametrize("missing", ["no/such/emma.txt", "emma.txt", "../data/text/austen.md"])
def test_calibration_data_names_a_missing_file(missing, tmp_path, monkeypatch):
    """A mistyped path is refused as such, not read as a one-word calibration text; an existing one is read, and
    raw text (with spaces or lines) is still text."""
    monkeypatch.chdir(tmp_path)
    tok = char_tokenizer()
    with pytest.raises(libortho.LibOrthoError, match="looks like a file path, but no such file exists"):
        libortho.calibration_data(tok, missing, n_samples=1, seq_len=8)
    path = tmp_path / "emma.txt"
    path.write_text("Emma Woodhouse, handsome, clever, and rich. " * 4)
    calib = libortho.calibration_data(tok, str(path), n_samples=2, seq_len=16)
    assert calib.input_ids.shape == (2, 16) and "emma.txt" in calib.description
    assert libortho.calibration_data(tok, "emma.txt", n_samples=2, seq_len=16).input_ids.shape == (2, 16)  # cwd
    text = "a b. " * 40
    assert libortho.calibration_data(tok, text, n_samples=2, seq_len=16).description.endswith("given text (seed 0)")


def test_perplexity_matches_a_manual_computation():
    model = tiny_model("llama")
    tok = char_tokenizer()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 8
    ppl = libortho.perplexity(model, tok, text, seq_len=64, progress=False)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    windows = ids[: len(ids) // 64 * 64].reshape(-1, 64)
    logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert abs(ppl - math.exp(float(nll))) < 1e-3 * ppl


@pytest.mark.parametrize("case", [(64, 200, 4, 128, 0.01, True, True, "hessian"),
                                  (64, 200, 3, -1, 0.05, False, False, "hessian"),
                                  (96, 130, 3, 32, 0.05, True, False, "magnitude"),
                                  (96, 130, 4, 64, 0.05, False, True, "random"),
                                  (40, 300, 2, 256, 0.0, True, True, "hessian"),
                                  (128, 100, 8, 32, 0.5, False, False, "hessian"),
                                  (200, 96, 4, 32, 0.1, True, True, "magnitude"),
                                  (33, 257, 3, 128, 0.02, True, False, "random"),
                                  (64, 130, 2, 64, 0.3, True, True, "hessian")])
@pytest.mark.parametrize("sweep", ["eager", "static"])
def test_sweep_is_bit_identical_to_the_reference_loop(case, sweep):
    """Both sweeps (the per-column loop and the fixed-buffer blocks a GPU replays as CUDA graphs)
    against the frozen per-column loop (benchmarks/gptq_equivalence.py runs the SmolLM2 shapes)."""
    import gptq_reference
    n, k, bits, gs, density, act_order, symmetric, score = case
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g)
    w[0, :3] = 0.0
    x = correlated_inputs(512, k, seed=k)
    h = 2 * x.t() @ x / x.shape[0]
    kw = dict(bits=bits, group_size=gs, symmetric=symmetric, density=density, score=score, act_order=act_order,
              block_size=64)
    a, b = gptq_reference.gptq_decompose(w, h, **kw), gptq_decompose(w, h, sweep=sweep, **kw)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1].scales.view(torch.int16), b[1].scales.view(torch.int16))
    assert (a[1].zeros is None and b[1].zeros is None) or torch.equal(a[1].zeros, b[1].zeros)
    assert (a[2] is None) == (b[2] is None)
    if a[2] is not None:
        for name in ("row_ptr", "col_idx", "values"):
            assert torch.equal(getattr(a[2], name), getattr(b[2], name)), name


def test_top_indices_matches_select_topk():
    from libortho.gptq import top_indices
    from libortho.sieve import select_topk
    g = torch.Generator().manual_seed(0)
    for t in range(200):
        n = int(torch.randint(1, 200, (1,), generator=g))
        x = torch.randn(3, n, generator=g)
        if t % 4 == 1:
            x = torch.randint(0, 3, (3, n), generator=g).float()  # many ties
        if t % 4 == 2:
            x[torch.rand(3, n, generator=g) < 0.3] = float("nan")
        if t % 4 == 3:
            x[torch.rand(3, n, generator=g) < 0.3] = -float("inf")
        m = int(torch.randint(0, 3 * n + 1, (1,), generator=g))
        assert torch.equal(top_indices(x, m), select_topk(x, m)), (t, m)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [(576, 576, 4, 128, 0.01, "hessian"), (192, 576, 3, 128, 0.05, "magnitude"),
                                  (1536, 576, 2, 64, 0.02, "random"), (576, 1536, 4, 128, 0.0, "hessian"),
                                  (100, 300, 3, 128, 0.05, "hessian")])
def test_cuda_graph_sweep_is_bit_identical_to_the_eager_loop(case):
    """On a GPU the static sweep is replayed as CUDA graphs (captured once per shape, reused by the
    second call): codes, scales and ortho entries must equal the eager loop's bit for bit."""
    n, k, bits, gs, density, score = case
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).cuda()
    x = correlated_inputs(1024, k, seed=k).cuda()
    h = 2 * x.t() @ x / x.shape[0]
    kw = dict(bits=bits, group_size=gs, density=density, score=score, act_order=True)
    ref = gptq_decompose(w, h, sweep="eager", **kw)
    for _ in range(2):  # capture, then replay of the cached graphs
        got = gptq_decompose(w, h, sweep="static", **kw)
        assert torch.equal(ref[0], got[0])
        assert torch.equal(ref[1].scales, got[1].scales)
        if density:
            for name in ("row_ptr", "col_idx", "values"):
                assert torch.equal(getattr(ref[2], name), getattr(got[2], name)), name
