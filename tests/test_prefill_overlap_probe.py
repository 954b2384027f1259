"""benchmarks/probes/prefill_overlap.py: the row slices it dequantizes and multiplies must be the layer's rows."""
import importlib.util
from pathlib import Path

import pytest
import torch

from libortho import OrthoLinear, quant
from libortho.ops.reference import ortho_linear_reference
from libortho.sieve import CSR, check_csr, sieve

spec = importlib.util.spec_from_file_location(
    "prefill_overlap", Path(__file__).resolve().parents[1] / "benchmarks" / "probes" / "prefill_overlap.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


@pytest.mark.parametrize("n,parts", [(50, 2), (50, 3), (16, 4), (4096, 4), (11008, 3), (1024, 1)])
def test_row_slices_cover_the_rows_at_strip_boundaries(n, parts):
    b = probe.row_slices(n, parts)
    assert b[0][0] == 0 and b[-1][1] == n
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(b, b[1:]))          # consecutive
    assert all(lo % 16 == 0 and lo < hi for lo, hi in b)                   # strip-aligned, none empty
    assert len(b) == min(parts, -(-n // 16))


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_slices_of_a_layer_are_its_rows(parts, symmetric):
    torch.manual_seed(parts)
    n, k = 50, 96
    w = torch.randn(n, k)
    codes, grid = quant.quantize(w, 4, 32, symmetric)
    lay = OrthoLinear.pack(codes, grid, sieve(w - quant.dequantize(codes, grid), 0.1), None, torch.float16)
    eye = torch.eye(k, dtype=torch.float16)  # x = I: the output is W^T, exactly

    def rows(op):
        return ortho_linear_reference(eye, op["qweight"], op["scales"], op["zeros"], op["row_ptr"], op["col_idx"],
                                      op["values"], None, 1.0, 4, 32, op["N"], k)

    for n0, n1 in probe.row_slices(n, parts):  # what the CUDA op reads beyond the reference: a valid CSR, whole strips
        op = probe.slice_operands(lay, n0, n1)
        check_csr(CSR(op["row_ptr"], op["col_idx"], op["values"], (n1 - n0, k)))
        strips = -(-(n1 - n0) // 16)
        assert op["qweight"].shape[0] == op["scales"].shape[0] == strips
        assert op["zeros"] is None if symmetric else op["zeros"].shape[0] == strips
    full = rows(probe.slice_operands(lay, 0, n))
    parts_out = [rows(probe.slice_operands(lay, n0, n1)) for n0, n1 in probe.row_slices(n, parts)]
    assert torch.equal(torch.cat(parts_out, dim=1), full)
    assert sum(probe.slice_operands(lay, n0, n1)["values"].numel() for n0, n1 in probe.row_slices(n, parts)) \
        == lay.ortho_nnz > 0


def test_rotating_copies_are_equal_separate_layers(monkeypatch):
    """The setup both prefill probes share: W and its packed layer, copied as bench_kernels says, not aliased."""
    from libortho.eval import bench_kernels
    monkeypatch.setattr(bench_kernels, "_copies", lambda nbytes: 3)
    torch.manual_seed(0)
    ws, lays, gs = probe.rotating_copies(48, 320, device="cpu")
    assert len(ws) == len(lays) == 3 and gs == 128
    assert all(torch.equal(w, ws[0]) and w.data_ptr() != ws[0].data_ptr() for w in ws[1:])
    assert all(torch.equal(a.qweight, lays[0].qweight) and a.qweight.data_ptr() != lays[0].qweight.data_ptr()
               for a in lays[1:])
    assert lays[0].ortho_nnz == 0 and lays[0].bits == 4


def test_probe_parser_defaults():
    args = probe.probe_parser("probe\nmore").parse_args([])
    assert args.m == [512] and args.slices == [2, 4] and args.out is None
    assert args.shapes == [f"{n}x{k}" for n, k in probe.SHAPES]


def test_timed_row_names_each_group_and_prints_against_bf16(monkeypatch, capsys):
    from libortho.eval import bench_kernels
    monkeypatch.setattr(bench_kernels, "time_interleaved", lambda groups, replays, calls: [10.0, 15.0][:len(groups)])
    row = probe.timed_row({"bf16": [None], "seq": [None]}, (64, 128, 512), {"split2": 1e-4}, 3, 4)
    assert row == {"N": 64, "K": 128, "M": 512, "bf16_us": 10.0, "seq_us": 15.0, "rel_err_vs_seq": {"split2": 1e-4}}
    assert "seq 15.00 (1.50x)" in capsys.readouterr().out
