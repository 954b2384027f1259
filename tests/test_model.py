import json

import pytest
import torch
from conftest import ARCHS, tiny_model

import libortho
from libortho import OrthoConfig, OrthoLinear


def _ids(n=2, length=12, seed=0):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_decompose_generate_save_load_identical(arch, tmp_path):
    model = tiny_model(arch)
    emb = model.get_input_embeddings().weight.detach().clone()
    libortho.decompose(model, OrthoConfig(bits=4, group_size=32, density=0.05), progress=False)
    layers = libortho.ortho_layers(model)
    per_block = {"gpt2": 4, "opt": 6}.get(arch, 7)
    assert len(layers) == 2 * per_block
    assert torch.equal(model.get_input_embeddings().weight, emb)
    if arch in ("llama-tied", "gpt2", "opt"):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = _ids()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 18)
    libortho.set_alpha(model, 0.5, pattern=r"\.0\.")
    logits = model(ids).logits
    libortho.save(model, tmp_path / "m")
    loaded = libortho.load(tmp_path / "m")
    assert torch.equal(loaded(ids).logits, logits)
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    alphas = {n: m.alpha for n, m in libortho.ortho_layers(loaded)}
    assert sorted(set(alphas.values())) == [0.5, 1.0]


def test_alpha_zero_changes_the_model_and_context_restores():
    model = tiny_model("llama")
    libortho.decompose(model, OrthoConfig(density=0.05, group_size=32), progress=False)
    ids = _ids()
    full = model(ids).logits
    with libortho.alpha(model, 0.0):
        base = model(ids).logits
        assert all(m.alpha == 0.0 for _, m in libortho.ortho_layers(model))
    assert torch.equal(model(ids).logits, full)
    assert not torch.allclose(base, full)
    assert libortho.set_alpha(model, 0.0, pattern="mlp") == 6


def test_report_counts_everything():
    model = tiny_model("llama")
    libortho.decompose(model, OrthoConfig(bits=4, group_size=32, density=0.02), progress=False)
    rep = libortho.report(model)
    t = rep["total"]
    assert t["ortho_nnz"] == sum(int(0.02 * r["out_features"] * r["in_features"] + 0.5) for r in rep["layers"])
    # 4-bit codes + fp16 scale per 32 + CSR (4 B row ptr per row, 2 B col + 2 B value per entry)
    for r in rep["layers"]:
        n, k = r["out_features"], r["in_features"]
        n_pad, k_pad = -(-n // 16) * 16, -(-k // 64) * 64
        expect = n_pad * k_pad / 2 + n_pad * -(-k // 32) * 2 + 4 * (n + 1) + 4 * r["ortho_nnz"]
        assert r["bytes"] == expect
    assert 4.5 < t["bits_per_weight"] < 6.5
    assert "bits/weight" in libortho.format_report(rep)


def test_targets_pattern_and_tied_head_refused():
    model = tiny_model("llama-tied")
    with pytest.raises(libortho.LibOrthoError, match="tied"):
        libortho.decompose(model, OrthoConfig(targets="lm_head"), progress=False)
    libortho.decompose(model, OrthoConfig(targets=r"layers\.1\.mlp"), progress=False)
    assert [n for n, _ in libortho.ortho_layers(model)] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_untied_lm_head_can_be_selected():
    model = tiny_model("llama")
    libortho.decompose(model, OrthoConfig(targets="lm_head"), progress=False)
    assert isinstance(model.lm_head, OrthoLinear)


def test_decompose_twice_and_bad_config():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="OrthoConfig"):
        libortho.decompose(model, {"bits": 4})
    libortho.decompose(model, OrthoConfig(), progress=False)
    with pytest.raises(libortho.LibOrthoError, match="already decomposed"):
        libortho.decompose(model, OrthoConfig(), progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(bits=5), "bits"), (dict(group_size=48), "group_size"), (dict(density=0.0), "base_only"),
    (dict(density=1.0), "density"), (dict(score="l1"), "score"), (dict(method="awq"), "method"),
    (dict(base_from="parent"), "base_from"), (dict(targets="(("), "regular expression"),
    (dict(dtype="float32"), "dtype")])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        OrthoConfig(**kw)


def test_base_only_config():
    model = tiny_model("llama")
    libortho.decompose(model, OrthoConfig.base_only(bits=3, group_size=32), progress=False)
    assert libortho.report(model)["total"]["ortho_nnz"] == 0


def test_hessian_without_calibration_is_refused():
    with pytest.raises(libortho.LibOrthoError, match="calibration"):
        libortho.decompose(tiny_model("llama"), OrthoConfig(score="hessian"), progress=False)


def test_set_alpha_errors():
    model = tiny_model("llama")
    with pytest.raises(libortho.LibOrthoError, match="decompose"):
        libortho.set_alpha(model, 0.0)
    libortho.decompose(model, OrthoConfig(), progress=False)
    with pytest.raises(ValueError, match="finite"):
        libortho.set_alpha(model, float("nan"))
    with pytest.raises(libortho.LibOrthoError, match="match"):
        libortho.set_alpha(model, 0.0, pattern="nothing-like-this")


# -- save / load failures ---------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    libortho.decompose(model, OrthoConfig(density=0.05, group_size=32), progress=False)
    path = libortho.save(model, tmp_path / "good")
    return model, path


def test_truncated_weights(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(libortho.SaveFormatError, match="truncated"):
        libortho.load(path)


def test_corrupted_weights(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(libortho.SaveFormatError, match="corrupted"):
        libortho.load(path)


def test_foreign_save_with_unsorted_ortho_columns(saved):
    """A save whose checksums match but whose CSR columns are out of order (e.g. written by another tool)
    is refused on load: the kernels assume ascending columns per row."""
    import hashlib
    import json
    from safetensors.torch import load_file, save_file
    _, path = saved
    f = path / "model.safetensors"
    tensors = load_file(f)
    name = next(k for k, v in tensors.items() if k.endswith("col_idx") and v.numel() > 1)
    rp = tensors[name.replace("col_idx", "row_ptr")]
    row = int(torch.nonzero(rp.diff() >= 2)[0])
    col = tensors[name].clone()
    col[int(rp[row])], col[int(rp[row]) + 1] = col[int(rp[row]) + 1].clone(), col[int(rp[row])].clone()
    tensors[name] = col
    save_file(tensors, f)
    manifest = json.loads((path / "libortho.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": f.stat().st_size,
                                              "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (path / "libortho.json").write_text(json.dumps(manifest))
    with pytest.raises(libortho.SaveFormatError, match="strictly ascend"):
        libortho.load(path)


def test_corrupted_manifest(saved):
    _, path = saved
    (path / "libortho.json").write_text("{not json")
    with pytest.raises(libortho.SaveFormatError, match="corrupted"):
        libortho.load(path)


def test_other_version_and_foreign(saved, tmp_path):
    _, path = saved
    m = json.loads((path / "libortho.json").read_text())
    m["format_version"] = 99
    (path / "libortho.json").write_text(json.dumps(m))
    with pytest.raises(libortho.SaveFormatError, match="version 99"):
        libortho.load(path)
    m["format"] = "gptq"
    (path / "libortho.json").write_text(json.dumps(m))
    with pytest.raises(libortho.SaveFormatError, match="not a LibOrtho manifest"):
        libortho.load(path)
    plain = tmp_path / "hf"
    tiny_model("llama").save_pretrained(plain)
    with pytest.raises(libortho.SaveFormatError, match="not a LibOrtho save"):
        libortho.load(plain)
    with pytest.raises(libortho.SaveFormatError, match="not a directory"):
        libortho.load(tmp_path / "missing")


def test_missing_weights_file(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(libortho.SaveFormatError, match="missing"):
        libortho.load(path)


def test_failed_save_keeps_previous_good_save(saved, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    import libortho.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "_st_save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        libortho.save(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind
    libortho.load(path)


def test_save_replaces_previous_and_refuses_foreign_dir(saved, tmp_path):
    model, path = saved
    libortho.set_alpha(model, 0.25)
    libortho.save(model, path)
    assert all(m.alpha == 0.25 for _, m in libortho.ortho_layers(libortho.load(path)))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(libortho.SaveFormatError, match="not a LibOrtho save"):
        libortho.save(model, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_gguf_quantizer_flag_is_dropped():
    """A model still carrying a (GGUF) quantizer over float weights can be cast and saved afterwards."""
    from libortho.data import _forget_gguf_quantizer

    class Quantizer:
        def remove_quantization_config(self, model):
            model.hf_quantizer, model.is_quantized = None, False

    model = tiny_model("llama")
    model.hf_quantizer, model.is_quantized = Quantizer(), True
    assert _forget_gguf_quantizer(model) is model and model.hf_quantizer is None and not model.is_quantized
    model.half().float()  # transformers refuses these while is_quantized is set
    packed = tiny_model("llama")
    packed.hf_quantizer, packed.is_quantized = Quantizer(), True
    up = packed.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight.data.to(torch.int8), requires_grad=False)
    assert _forget_gguf_quantizer(packed).hf_quantizer is not None  # integer weights: really quantized, kept
