"""The large-M path switch (LIBORTHO_PREFILL / set_prefill) of the CUDA backend; CPU-only checks."""
import pytest
import torch

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
    monkeypatch.setenv("LIBORTHO_PREFILL", "cublas")
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


@pytest.mark.parametrize("m,density,n,k,want", [
    (32, 0.02, 4096, 4096, True), (32, 0.05, 4096, 4096, False), (32, 0.005, 1024, 4096, False),
    (64, 0.01, 14336, 4096, True), (64, 0.02, 14336, 4096, False), (64, 0.005, 4096, 4096, False),
    (48, 0.01, 4096, 11008, True), (48, 0.02, 4096, 11008, False), (64, 0.005, 11008, 4096, True),
    (17, 0.0, 1024, 4096, True)])
def test_auto_sends_ortho_streams_to_the_gemm_only_where_it_measured_faster(m, density, n, k, want):
    nnz = int(density * n * k)
    assert cuda.use_gemm("auto", m, nnz * m, n * k) is want
    assert cuda.use_gemm("gemm", m, nnz * m, n * k) and not cuda.use_gemm("dequant", m, nnz * m, n * k)


def test_gemm_ortho_limit_has_room_for_a_sieve_that_keeps_a_few_more():
    """At M = 64 and 1 % the 06:3x UTC kernel table sent the large shapes to the merge path by the sieve's rounding
    (587203 entries for 0.01 * 14336 * 4096 = 587202.56)."""
    for n, k in ((4096, 14336), (14336, 4096), (4096, 11008)):
        assert cuda.use_gemm("auto", 64, (round(0.01 * n * k) + 2) * 64, n * k)
        assert not cuda.use_gemm("auto", 64, int(0.0101 * n * k) * 64, n * k)


def test_cutlass_policy_switch(monkeypatch):
    monkeypatch.setenv("LIBORTHO_PREFILL", "cutlass")
    assert cuda.prefill() == "cutlass"
    assert not cuda.use_gemm("cutlass", 512) and not cuda.use_gemm("cutlass", 17)  # its fallback is dequantize + cuBLAS
    # cutlass: every call CUTLASS takes, in the form auto would pick, else the cooperative one
    assert cuda.cutlass_form("cutlass", 17, 64, 64, 132) == 0 and cuda.cutlass_form("cutlass", 4096, 4096, 4096, 132) == 0
    assert cuda.cutlass_form("cutlass", 128, 4096, 4096, 132) == 1
    assert cuda.cutlass_form("dequant", 512, 4096, 4096, 132) is None
    assert cuda.cutlass_form("gemm", 512, 4096, 4096, 132) is None


# (m, out_features, in_features, SMs, form): the H200's 132 SMs on the Llama shapes measured (cutlass-vs-dequant-H200.json,
# cutlass-tiles-H200.json), then the wave arithmetic on other shapes and SM counts: cooperative 128x128 tiles (0) where
# they fill >= 0.6 of their waves' slots, ping-pong 64x128 (1) where those fill < 0.6 of one wave and its own tiles fill
# 0.45-1 of one wave on layers of 2^24+ weights, else None (dequantize + cuBLAS)
@pytest.mark.parametrize("m,n,k,sms,form", [
    (128, 14336, 4096, 132, 0), (128, 11008, 4096, 132, 0), (128, 4096, 4096, 132, 1), (256, 4096, 4096, 132, 1),
    (256, 4096, 14336, 132, 1), (128, 4096, 11008, 132, 1), (256, 11008, 4096, 132, 0), (512, 4096, 4096, 132, 0),
    (512, 14336, 4096, 132, 0), (512, 4096, 14336, 132, 0), (512, 1024, 4096, 132, None), (128, 1024, 4096, 132, None),
    (1024, 4096, 4096, 132, None), (2048, 14336, 4096, 132, None), (64, 14336, 4096, 132, None),
    (65, 14336, 4096, 132, 0), (512, 4096, 4096, 114, None), (512, 4096, 4096, 128, 0), (128, 10240, 4096, 132, 0),
    (128, 10112, 4096, 132, None), (384, 5632, 4096, 132, 0), (384, 5760, 4096, 132, None),
    (128, 4096, 4032, 132, None), (128, 3712, 8192, 132, None), (128, 3840, 8192, 132, 1), (256, 4224, 4096, 132, 1), (256, 4352, 4096, 132, None)])
def test_auto_picks_the_cutlass_form_whose_tiles_fill_the_waves(m, n, k, sms, form):
    assert cuda.cutlass_form("auto", m, n, k, sms) == form
    assert cuda.cutlass_form("dequant", m, n, k, sms) is None


def test_cutlass_include_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("LIBORTHO_CUTLASS", "0")
    assert cuda.cutlass_include() is None
    monkeypatch.delenv("LIBORTHO_CUTLASS")
    monkeypatch.setenv("LIBORTHO_CUTLASS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="no include/cutlass/cutlass.h"):
        cuda.cutlass_include()
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("// stand-in\n")
    assert cuda.cutlass_include() == tmp_path / "include"
    monkeypatch.delenv("LIBORTHO_CUTLASS_DIR")
    found = cuda.cutlass_include()  # the nvidia-cutlass wheel's, when it is installed
    assert found is None or (found / "cutlass" / "cutlass.h").is_file()


@pytest.mark.parametrize("policy,m,want", [("auto", 16, False), ("auto", 17, True), ("auto", 32, True),
                                           ("auto", 33, False), ("gemm", 24, False), ("dequant", 24, False),
                                           ("cutlass", 24, False)])
def test_which_calls_the_policy_sends_to_v1_above_16_tokens(policy, m, want):
    assert cuda.use_v1_wide(policy, m) is want


@pytest.mark.parametrize("m,density,n,k,want", [
    (32, 0.05, 4096, 4096, True), (32, 0.05, 4096, 14336, True), (17, 0.05, 11008, 4096, True),   # large layers: up to 5 %
    (32, 0.06, 4096, 4096, False),                                                                # beyond what was measured
    (32, 0.01, 1024, 4096, True), (17, 0.01, 1024, 4096, True), (17, 0.02, 1024, 4096, False),    # small: up to 1 % at 32
    (24, 0.02, 1024, 4096, False), (32, 0.0, 1024, 4096, True)])
def test_v1_above_16_tokens_takes_an_ortho_stream_where_it_beat_the_merge(m, density, n, k, want):
    nnz = int(density * n * k)
    assert cuda.use_v1_wide("auto", m, nnz * m, n * k) is want
    assert not cuda.use_v1_wide("gemm", m, nnz * m, n * k) and not cuda.use_v1_wide("auto", 33, nnz * 33, n * k)


@pytest.mark.parametrize("m,n,sms,want", [
    (33, 4096, 132, True), (64, 4096, 132, True), (65, 4096, 132, False),  # 128 blocks of 32 rows: one wave, 97 % full
    (48, 4224, 132, True), (48, 4225, 132, False),                          # 133 blocks: a second wave
    (48, 2112, 132, True), (48, 2080, 132, False),                          # 65 blocks: fewer than half the SMs
    (48, 1024, 132, False), (48, 11008, 132, False), (48, 14336, 132, False), (48, 2048, 78, True)])
def test_v1_takes_33_to_64_tokens_where_its_blocks_make_one_wave(m, n, sms, want):
    """M 33-64: configuration 31 (32-row blocks) beat the GEMM on the 4096-row Llama shapes only; with an ortho
    stream in play it goes where the GEMM's add would."""
    k = 14336
    assert cuda.use_v1_wide("auto", m, 0, n * k, n, sms) is want
    assert not cuda.use_v1_wide("gemm", m, 0, n * k, n, sms) and not cuda.use_v1_wide("auto", m, 0, n * k)
    for density in (0.005, 0.02):  # the GEMM's add: up to 0.64 * weights of nnz * M on layers of 4e7+ weights
        work = int(density * n * k) * m
        assert cuda.use_v1_wide("auto", m, work, n * k, n, sms) is (want and cuda.use_gemm("auto", m, work, n * k))
    assert cuda.use_v1_wide("auto", 48, int(0.005 * 4096 * 14336) * 48, 4096 * 14336, 4096, 132)
    assert not cuda.use_v1_wide("auto", 48, int(0.005 * 4096 * 4096) * 48, 4096 * 4096, 4096, 132)  # < 4e7 weights


@pytest.mark.parametrize("bits,gs,k,offset,want", [
    (4, 128, 4096, 0, True), (4, 4096, 4096, 0, True), (4, 64, 4096, 0, True), (4, 512, 4096, 0, True),
    (3, 128, 4096, 0, False), (4, 32, 4096, 0, False), (4, 192, 4608, 0, False), (4, 1024, 4096, 0, False),
    (4, 128, 4160, 0, True), (4, 128, 1000, 0, False),
    (4, 128, 4096, 4, False)])  # x rows not 16-byte aligned
def test_what_v1_takes_above_16_tokens(bits, gs, k, offset, want):
    x2 = torch.zeros(24 * k + 8, dtype=torch.bfloat16)[offset:offset + 24 * k].view(24, k)
    assert cuda.v1_wide_takes(x2, bits, gs, k) is want


def test_v1_ortho_limit_has_room_for_a_sieve_that_keeps_a_few_more():
    """A sieve asked for 5 % may keep an entry or two more; those layers still take v1 + add (the 05:47 UTC table sent
    4096x14336 and 14336x4096 at M = 32 to the merge path by one entry)."""
    for n, k in ((4096, 14336), (14336, 4096)):
        nnz = int(0.05 * n * k) + 2
        assert cuda.use_v1_wide("auto", 32, nnz * 32, n * k)
        assert not cuda.use_v1_wide("auto", 32, int(0.0505 * n * k) * 32, n * k)
