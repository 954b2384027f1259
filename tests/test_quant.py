import pytest
import torch

from libortho import quant


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (16, 64), (37, 200), (192, 576), (33, 130)])
def test_pack_roundtrip_exact(bits, shape):
    q = torch.randint(0, 2 ** bits, shape, dtype=torch.uint8)
    packed = quant.pack(q, bits)
    n_pad, k_pad = quant.padded_shape(*shape)
    assert packed.shape == (n_pad // 16, k_pad // 64, 32 * bits) and packed.dtype == torch.int32
    assert torch.equal(quant.unpack(packed, bits, *shape), q)


def test_int4_nibble_pairs_are_mma_fragments():
    # the kernel's contract: word `step` of lane l, nibble pair i = fragment elements (2i, 2i+1)
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    words = quant.pack(q, 4).reshape(32, 4).to(torch.int64) & 0xFFFFFFFF
    for lane in (0, 5, 31):
        for step in range(4):
            for i in range(4):
                lo = (int(words[lane, step]) >> (4 * i)) & 0xF
                hi = (int(words[lane, step]) >> (4 * i + 16)) & 0xF
                for j, val in ((2 * i, lo), (2 * i + 1, hi)):
                    r = lane // 4 + 8 * ((j // 2) % 2)
                    c = 16 * step + 2 * (lane % 4) + j % 2 + 8 * (j // 4)
                    assert val == q[r, c]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [576, 200, 64])
def test_error_within_half_step(bits, group_size, symmetric, k):
    w = torch.randn(24, k) * torch.rand(24, 1) * 3
    q, grid = quant.quantize(w, bits, group_size, symmetric)
    g = quant.effective_group_size(group_size, k)
    assert grid.scales.shape == (24, -(-k // g))
    step = grid.scales.float().repeat_interleave(g, dim=1)[:, :k]
    err = (w - quant.dequantize(q, grid)).abs()
    assert bool((err <= 0.5 * step * (1 + 1e-3) + 1e-6).all())
    assert int(q.max()) < 2 ** bits


def test_short_last_group_uses_its_own_range():
    w = torch.zeros(2, 576)
    w[:, 512:] = 100.0  # only the short last group (64 wide at g128) is large
    w[:, :512] = 0.01
    q, grid = quant.quantize(w, 4, 128, True)
    assert grid.scales.shape == (2, 5)
    assert float(grid.scales[0, 4]) > 1000 * float(grid.scales[0, 0])


def test_group_params_roundtrip():
    s = torch.randn(37, 5)
    assert torch.equal(quant.unpack_group_params(quant.pack_group_params(s), 37), s)


@pytest.mark.parametrize("bits", [1, 5, 16, "4", 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(4, 64), bits=bits)


@pytest.mark.parametrize("gs", [0, 16, 100, 512, -2])
def test_bad_group_size(gs):
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize(torch.randn(4, 64), group_size=gs)


def test_int4_nibble_offsets_follow_the_cute_layout():
    """The INT4 tiles as one flat nibble layout, the rule a CUTLASS mixed-input GEMM would be given for them
    (benchmarks/probes/cutlass_layout_check.cu: CUTLASS's reordered register-A layout with four k16 atoms per thread,
    tiles K-innermost, is this rule): nibble ((n/16) Tk + k/64) 1024 + 32 lane + 8 (c/16) + slot, with
    r = n % 16, c = k % 64, lane = (r%8)*4 + (c%8)/2 and slot = (c%2)*4 + r/8 + 2 ((c%16)/8)."""
    n, k = 48, 320
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    words = quant.pack(q, 4).reshape(-1).to(torch.int64) & 0xFFFFFFFF
    tk = quant.padded_shape(n, k)[1] // 64
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(k), indexing="ij")
    r, c = rows % 16, cols % 64
    lane, slot = (r % 8) * 4 + (c % 8) // 2, (c % 2) * 4 + r // 8 + 2 * ((c % 16) // 8)
    nibble = ((rows // 16) * tk + cols // 64) * 1024 + 32 * lane + 8 * (c // 16) + slot
    assert torch.equal((words[nibble // 8] >> (4 * (nibble % 8))) & 0xF, q.to(torch.int64))


def test_pack_rejects_codes_too_wide():
    with pytest.raises(ValueError, match="exceed"):
        quant.pack(torch.full((4, 8), 9, dtype=torch.uint8), 3)
