"""The v1 configuration table: $LIBORTHO_V1_CFG parsing (cuda.py) and the probe's suggestion
(benchmarks/probes/v1_configs.py). No GPU needed; the kernels' side is in test_cuda.py."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

from libortho.ops import cuda as cuda_backend

_spec = importlib.util.spec_from_file_location(
    "v1_configs", Path(__file__).resolve().parents[1] / "benchmarks" / "probes" / "v1_configs.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_parse_v1_table_accepts_classes_and_spaces():
    assert cuda_backend.parse_v1_table(" tall_m4=4, short_m4 = 8,m16=7,") == {"tall_m4": 4, "short_m4": 8, "m16": 7}
    assert cuda_backend.parse_v1_table("") == {}


@pytest.mark.parametrize("spec,words", [("x=1", "not class=index"), ("tall_m4", "not class=index"),
                                        ("tall_m4=a", "must be an integer"), ("m16=3", "takes configurations 6, 7"),
                                        ("short_m8=8", "takes configurations 0, 1, 2, 3, 4, 5, 9, 11, 14, 15, 18, 20, 21, 24$"),
                                        ("m16=9", "takes configurations 6, 7, 10, 12, 22$"),
                                        ("short_m4=-1", "0, 1, 2, 3, 4, 5, 8, 9, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25$")])
def test_parse_v1_table_names_what_is_wrong(spec, words):
    with pytest.raises(ValueError, match=words):
        cuda_backend.parse_v1_table(spec)


@pytest.mark.parametrize("var,value", [("LIBORTHO_V1_CFG", "tall_m4=10"), ("LIBORTHO_V1_LEAN", "maybe")])
def test_bad_env_raises_before_any_build(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    monkeypatch.setitem(cuda_backend._state, "ext", None)
    monkeypatch.setitem(cuda_backend._state, "error", None)
    with pytest.raises(ValueError, match=value):
        cuda_backend.build()
    assert cuda_backend._state["ext"] is None and cuda_backend._state["error"] is None


def test_probe_classes_mirror_the_kernel_dispatch():
    sms = 132                                   # H200: tall grids from ceil(N / 16) >= 396 blocks
    assert probe.v1_class(4096, 11008, 1, sms) == "short_long_k"
    assert probe.v1_class(4096, 4096, 4, sms) == "short_m4"
    assert probe.v1_class(2112, 4096, 8, sms) == "short_m8" and probe.v1_class(2096, 4096, 8, sms) == "tiny"
    assert probe.v1_class(1024, 4096, 1, sms) == "tiny" and probe.v1_class(1024, 14336, 4, sms) == "tiny"
    assert probe.v1_class(4096, 11008, 16, sms) == "m16_long_k" and probe.v1_class(1024, 8192, 9, sms) == "m16_long_k"
    assert probe.v1_class(11008, 4096, 2, sms) == "tall_m4"
    assert probe.v1_class(14336, 4096, 5, sms) == "tall_m8"
    assert probe.v1_class(6320, 4096, 16, sms) == "m16" and probe.v1_class(6336, 4096, 9, sms) == "m16_tall"
    assert probe.v1_class(4096, 4096, 16, sms) == "m16"
    assert probe.v1_class(4096, 4096, 17, sms) == "m32" and probe.v1_class(2112, 4096, 32, sms) == "m32"
    assert probe.v1_class(2096, 4096, 24, sms) == "m32_tiny" and probe.v1_class(1024, 4096, 32, sms) == "m32_tiny"
    assert probe.v1_class(4096, 4096, 33, sms) == "m64" and probe.v1_class(1024, 4096, 64, sms) == "m64"
    assert probe.v1_class(6336, 4096, 1, sms) == "tall_m4" and probe.v1_class(6320, 4096, 1, sms) == "short_m4"
    heavy = probe.HEAVY_ORTHO                   # from this many entries at alpha != 0 a tall grid counts as short
    assert probe.v1_class(11008, 4096, 2, sms, heavy) == "short_m4"
    assert probe.v1_class(11008, 4096, 2, sms, heavy - 1) == "tall_m4"
    assert probe.v1_class(11008, 4096, 1, sms, heavy) == "tall_m4"  # at M = 1 a tall grid stays tall
    assert probe.v1_class(11008, 4096, 8, sms, heavy) == "short_m8"
    assert probe.v1_class(11008, 4096, 16, sms, heavy) == "m16"
    assert probe.v1_class(4096, 11008, 4, sms, heavy) == "short_m4"
    assert probe.v1_class(4096, 11008, 8, sms, heavy) == "short_m8"
    assert probe.v1_class(4096, 11008, 16, sms, heavy) == "m16_long_k"


def _row(n, k, m, times, wrong=()):
    row = {"N": n, "K": k, "M": m}
    for i, t in times.items():
        row[probe.CONFIGS[i]] = {"alpha0_us": t, "alpha1_us": t, "rel_err": 0.0, "ok": i not in wrong}
    return row


def test_suggest_table_picks_the_least_total_time_among_correct_configs():
    rows = [_row(4096, 4096, 1, {0: 7.0, 1: 6.0, 3: 6.5}),
            _row(4096, 4096, 4, {0: 8.0, 1: 9.0, 3: 7.0}),       # class total: 0 -> 15, 1 -> 15, 3 -> 13.5
            _row(11008, 4096, 1, {1: 5.0, 4: 4.0}, wrong={4}),   # the faster one is wrong: not picked
            _row(1024, 4096, 16, {6: 10.0, 7: 9.0, 3: 1.0})]     # 3 cannot serve M 9-16
    assert probe.suggest_table(rows, probe.CONFIGS, 132) == {"short_m4": 3, "tall_m4": 1, "m16": 7}


def test_suggest_table_offers_the_x_ring_to_m4_classes_only():
    rows = [_row(4096, 4096, 1, {0: 7.0, 8: 5.0}), _row(4096, 4096, 8, {0: 9.0, 2: 8.0})]
    assert probe.suggest_table(rows, probe.CONFIGS, 132) == {"short_m4": 8, "short_m8": 2}


def test_suggest_table_counts_a_heavy_rows_calls_in_their_own_classes():
    """A heavy row on a tall grid: its alpha 0 time picks the tall class's configuration, its alpha 1 time
    the short class's (v1.cu kHeavyOrtho)."""
    row = {"N": 11008, "K": 4096, "M": 2, "ortho_nnz": probe.HEAVY_ORTHO}
    for i, (a0, a1) in {1: (5.0, 30.0), 8: (6.0, 20.0)}.items():
        row[probe.CONFIGS[i]] = {"alpha0_us": a0, "alpha1_us": a1, "rel_err": 0.0, "ok": True}
    assert probe.suggest_table([row], probe.CONFIGS, 132) == {"tall_m4": 1, "short_m4": 8}


def test_suggest_table_keeps_a_heavy_m1_row_in_the_tall_class():
    """At M = 1 a heavy stream does not move a tall grid (v1.cu v1_class): both alphas' times count there."""
    row = {"N": 11008, "K": 4096, "M": 1, "ortho_nnz": probe.HEAVY_ORTHO}
    for i, (a0, a1) in {1: (5.0, 30.0), 8: (6.0, 20.0)}.items():
        row[probe.CONFIGS[i]] = {"alpha0_us": a0, "alpha1_us": a1, "rel_err": 0.0, "ok": True}
    assert probe.suggest_table([row], probe.CONFIGS, 132) == {"tall_m4": 8}


def test_suggest_table_counts_only_alpha0_above_16_tokens():
    """M 17-32 takes the table only with no ortho stream in play (v1.cu), so there only alpha 0 times count."""
    row = {"N": 4096, "K": 4096, "M": 32, "ortho_nnz": 1000}
    for i, (a0, a1) in {26: (10.0, 50.0), 27: (9.0, 90.0)}.items():
        row[probe.CONFIGS[i]] = {"alpha0_us": a0, "alpha1_us": a1, "rel_err": 0.0, "ok": True}
    assert probe.suggest_table([row], probe.CONFIGS, 132) == {"m32": 27}


def test_suggestion_report_ranks_each_class_offline(tmp_path, capsys, monkeypatch):
    """--suggest-from: a saved probe's classes again without a GPU, best first, each with its ratio to the best."""
    rows = [_row(4096, 4096, 1, {0: 7.0, 1: 6.0, 3: 6.5}), _row(4096, 4096, 4, {0: 8.0, 1: 9.0, 3: 7.0}),
            _row(4096, 4096, 8, {0: 5.0, 2: 4.0}, wrong={2, 0})]
    saved = tmp_path / "probe.json"
    saved.write_text(json.dumps({"configs": probe.CONFIGS, "rows": rows}))
    monkeypatch.setattr("sys.argv", ["v1_configs.py", "--suggest-from", str(saved)])
    probe.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("short_m4: 3 ") and "27.00 us (1.000)" in lines[0]
    assert "0 " + probe.CONFIGS[0] + " 30.00 us (1.111)" in lines[0]
    assert lines[1] == "short_m8: no configuration correct on all its rows"


def test_suggest_table_leaves_out_a_class_with_no_config_correct_on_all_rows():
    rows = [_row(4096, 4096, 8, {0: 5.0, 2: 4.0}, wrong={2}), _row(2112, 4096, 8, {0: 3.0, 2: 2.0}, wrong={0})]
    assert probe.suggest_table(rows, probe.CONFIGS, 132) == {}


@pytest.mark.parametrize("value,expected", [("", cuda_backend.ORTHO_XT_AUTO), ("auto", cuda_backend.ORTHO_XT_AUTO),
                                            (" ON ", 0), ("off", -1), ("4096", 4096), ("0", 0)])
def test_parse_ortho_xt(value, expected):
    assert cuda_backend.parse_ortho_xt(value) == expected


@pytest.mark.parametrize("value", ["-1", "sometimes", "1e6"])
def test_parse_ortho_xt_names_what_is_wrong(value):
    with pytest.raises(ValueError, match="expected auto, on, off"):
        cuda_backend.parse_ortho_xt(value)


def _cu_int_array(name: str) -> tuple[int, ...]:
    csrc = Path(cuda_backend.__file__).parent / "csrc"
    src = "\n".join(p.read_text() for p in sorted(csrc.glob("*.cu*")))
    m = re.search(rf"constexpr int {name}\[[^\]]*\] = \{{([^}}]*)\}};", src)
    assert m, f"{name} not found in the kernel sources"
    return tuple(int(v) for v in m.group(1).split(","))


def test_python_mirrors_of_the_kernel_tables_match_the_kernel_sources():
    """cuda.py's V1_CONFIG_MAX_M and class limits mirror v1.cuh / v1.cu (kV1CfgMaxM, kClassMaxM): a configuration
    added on one side only would be refused or offered wrongly without a GPU test noticing on CPU CI."""
    assert _cu_int_array("kV1CfgMaxM") == cuda_backend.V1_CONFIG_MAX_M
    assert _cu_int_array("kClassMaxM") == tuple(cuda_backend._V1_CLASS_MAX_M[c] for c in cuda_backend.V1_CLASSES)
    assert len(probe.CONFIGS) == len(cuda_backend.V1_CONFIG_MAX_M)


@pytest.mark.parametrize("value,expected", [("", True), ("on", True), (" OFF ", False), ("1", True), ("0", False)])
def test_parse_v1_lean(value, expected):
    assert cuda_backend.parse_v1_lean(value) is expected


def test_parse_v1_lean_names_what_is_wrong():
    with pytest.raises(ValueError, match="expected on or off"):
        cuda_backend.parse_v1_lean("sometimes")
