"""benchmarks/ncu_top.py: top stall locations from an ncu source-page CSV."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("ncu_top", Path(__file__).resolve().parents[1] / "benchmarks" / "ncu_top.py")
ncu_top = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ncu_top)

HEAD = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_long_sb","stall_wait",'
        '"stall_wait (Not Issued)"\n')


def _kernel(name, rows):
    return f'"Kernel Name","{name}",\n' + HEAD + "".join(
        f'"0x{a:x}","{src}","{s}","{ex}","{lsb}","{w}","99"\n' for a, src, s, ex, lsb, w in rows)


def test_sections_and_ranking(capsys, tmp_path, monkeypatch):
    text = _kernel("k0", [(0x10, "LDG R1", 3, "1,024", 3, 0), (0x20, "PRMT R2", 40, "2,048", 38, 2),
                          (0x30, "HMMA R4", 7, "512", 0, 7)]) + _kernel("k1", [(0x10, "FADD R1", 5, "8", 1, 4)])
    secs = ncu_top.sections(text)
    assert [len(s) for s in secs] == [3, 1]
    lines = ncu_top.top(secs[0], 2)
    assert len(lines) == 2 and "PRMT R2" in lines[0] and "HMMA R4" in lines[1]
    assert "long_sb 38" in lines[0] and "wait 2" in lines[0] and "99" not in lines[0]  # Not-Issued columns left out
    f = tmp_path / "src.csv"
    f.write_text(text)
    monkeypatch.setattr("sys.argv", ["ncu_top.py", str(f), "1"])
    ncu_top.main()
    out = capsys.readouterr().out
    assert "== kernel 0: 50 stall samples, 3584 warp instructions executed" in out
    assert "== kernel 1: 5 stall samples, 8 warp instructions executed" in out
