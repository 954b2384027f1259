import pytest
import torch

from libortho import sieve


@pytest.mark.parametrize("trial", range(25))
def test_density_is_exact(trial):
    g = torch.Generator().manual_seed(trial)
    n, k = (int(v) for v in torch.randint(1, 300, (2,), generator=g))
    density = float(torch.rand(1, generator=g)) * 0.98 + 0.01
    r = torch.randn(n, k, generator=g)
    for score in ("magnitude", "random", "hessian"):
        h = torch.eye(k) * torch.rand(k, generator=g) if score == "hessian" else None
        csr = sieve.sieve(r, density, score, hessian=h, seed=trial)
        assert csr.nnz == int(density * n * k + 0.5)
        assert int(csr.row_ptr[-1]) == csr.nnz and csr.row_ptr.numel() == n + 1


def test_density_005_keeps_five_percent_not_ninety_five():
    r = torch.randn(256, 512)
    csr = sieve.sieve(r, 0.05)
    assert csr.nnz == round(0.05 * 256 * 512) == 6554


def test_keeps_the_largest_and_values_exact():
    r = torch.randn(64, 128)
    csr = sieve.sieve(r, 0.1, "magnitude", value_dtype=torch.float16)
    dense = csr.to_dense()
    kept = dense != 0
    assert float(r.abs()[kept].min()) >= float(r.abs()[~kept].max())
    assert torch.equal(dense[kept], r[kept].half().float())


def test_ties_are_deterministic_and_go_to_lower_index():
    score = torch.ones(10, 10)
    idx = sieve.select_topk(score, 7)
    assert idx.tolist() == list(range(7))
    prefer = torch.zeros(10, 10, dtype=torch.bool)
    prefer[9, 3] = True
    assert sieve.select_topk(score, 2, prefer=prefer).tolist() == [0, 93]


def test_nan_scores_rank_last():
    score = torch.tensor([[float("nan"), 1.0, 2.0]])
    assert sieve.select_topk(score, 2).tolist() == [1, 2]


def test_random_is_seeded():
    r = torch.randn(50, 60)
    a = sieve.sieve(r, 0.1, "random", seed=3)
    b = sieve.sieve(r, 0.1, "random", seed=3)
    c = sieve.sieve(r, 0.1, "random", seed=4)
    assert torch.equal(a.col_idx, b.col_idx) and not torch.equal(a.col_idx, c.col_idx)


def test_csr_dtypes():
    small = sieve.sieve(torch.randn(4, 32767), 0.01)
    big = sieve.sieve(torch.randn(2, 40000), 0.01, value_dtype=torch.bfloat16)
    assert small.row_ptr.dtype == torch.int32 and small.col_idx.dtype == torch.int16
    assert big.col_idx.dtype == torch.int32 and big.values.dtype == torch.bfloat16


@pytest.mark.parametrize("density", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_density_outside_open_interval(density):
    with pytest.raises(ValueError, match=r"density"):
        sieve.sieve(torch.randn(4, 4), density)


def test_bad_score_and_missing_hessian():
    with pytest.raises(ValueError, match="score"):
        sieve.sieve(torch.randn(4, 4), 0.5, "size")
    with pytest.raises(ValueError, match="Hessian"):
        sieve.sieve(torch.randn(4, 4), 0.5, "hessian")
    with pytest.raises(ValueError, match="shape"):
        sieve.sieve(torch.randn(4, 4), 0.5, "hessian", hessian=torch.eye(5))
