"""The large-M path switch (LIBORTHO_PREFILL / set_prefill) of the CUDA backend; CPU-only checks."""
import pytest

from libortho.ops import cuda


def test_prefill_default_env_and_override(monkeypatch):
    monkeypatch.delenv("LIBORTHO_PREFILL", raising=False)
    assert cuda.prefill() == "auto"
    monkeypatch.setenv("LIBORTHO_PREFILL", "gemm")
    assert cuda.prefill() == "gemm"
    try:
        cuda.set_prefill("dequant")
        assert cuda.prefill() == "dequant"
    finally:
        cuda.set_prefill(None)
    assert cuda.prefill() == "gemm"


def test_prefill_rejects_unknown_paths(monkeypatch):
    monkeypatch.setenv("LIBORTHO_PREFILL", "cutlass")
    with pytest.raises(ValueError, match="not a prefill path"):
        cuda.prefill()
    with pytest.raises(ValueError, match="not one of"):
        cuda.set_prefill("fast")


@pytest.mark.parametrize("value,want", [("", -1), ("auto", -1), ("0", 0), ("7", 7)])
def test_gemm_cfg_parses(value, want):
    assert cuda.parse_gemm_cfg(value) == want


@pytest.mark.parametrize("value", ["8", "-1", "x", "1.5"])
def test_gemm_cfg_rejects(value):
    with pytest.raises(ValueError, match="LIBORTHO_GEMM_CFG"):
        cuda.parse_gemm_cfg(value)


@pytest.mark.parametrize("policy,m,want", [("auto", 17, True), ("auto", 64, True), ("auto", 65, False),
                                           ("auto", 512, False), ("gemm", 512, True), ("gemm", 17, True),
                                           ("dequant", 17, False), ("dequant", 4096, False)])
def test_which_calls_the_policy_sends_to_the_gemm(policy, m, want):
    assert cuda.use_gemm(policy, m) is want


def test_auto_keeps_heavy_ortho_streams_on_the_merge_path(monkeypatch):
    monkeypatch.setattr(cuda, "GEMM_ORTHO_WORK_MAX", 1000)
    assert cuda.use_gemm("auto", 32, 1000) and not cuda.use_gemm("auto", 32, 1001)
    assert cuda.use_gemm("gemm", 32, 10**9) and cuda.use_gemm("auto", 32, 0)
