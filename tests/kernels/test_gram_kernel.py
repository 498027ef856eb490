"""The Gram kernel against float64 PyTorch: every dtype, K, layout and reduction mode."""

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, KS, assert_gram_close, randn

from tolaria.kernels.gram import MAX_BLOCK_K, gram, tile_shape
from tolaria.kernels.rows import as_rows


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_matches_float64(dtype, k, deterministic):
    j = randn(k, 157, dtype=dtype, seed=k)
    g = gram(j, deterministic=deterministic)
    assert g.shape == (k, k) and g.dtype == torch.float64 and g.device == j.device
    assert_gram_close(g, j, dtype)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 64, 65, 300])
def test_any_n_with_many_tiles_and_programs(n):
    # 16-column tiles spread over 3 programs: every program loops, and N picks the tail's owner.
    j = randn(5, n, dtype=torch.bfloat16, seed=n)
    for deterministic in (True, False):
        assert_gram_close(gram(j, deterministic=deterministic, block_n=16, num_programs=3), j, torch.bfloat16)


@pytest.mark.parametrize("k,n", [(1, 4099), (2, 1031), (3, 301), (4, 257), (5, 77), (8, 65), (8, 1000)])
def test_short_rows_are_folded_into_segments(k, n):
    # Fewer than 16 rows: each row is cut into up to 16 / K segments that fill the tensor-core tile.
    j = randn(k, n, dtype=torch.bfloat16, seed=k)
    rows, segments, _ = tile_shape(as_rows(j), k, True, 16)
    assert segments > 1 and rows * segments == 16
    for deterministic in (True, False):
        assert_gram_close(gram(j, deterministic=deterministic, block_n=16, num_programs=3), j, torch.bfloat16)
    rows = [r.clone() for r in j]
    assert_gram_close(gram(rows, block_n=16, num_programs=2), j, torch.bfloat16)


def test_out_dtype_float32():
    j = randn(4, 99)
    g = gram(j, out_dtype=torch.float32)
    assert g.dtype == torch.float32
    assert_gram_close(g, j, torch.float32)


LAYOUTS = {
    "contiguous": lambda base: base[:, :101],
    "row_stride_gt_n": lambda base: base[:, 3:104],
    "every_other_row": lambda base: base[::2, :101],
    "column_stride_2": lambda base: base[:, :202:2],
    "transposed": lambda base: base[:, :101].t().contiguous().t(),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_matrices(layout, dtype):
    base = randn(12, 256, dtype=dtype, seed=3)
    j = LAYOUTS[layout](base)
    assert j.shape[1] == 101
    assert as_rows(j).table is None  # addressed by strides, not copied
    assert_gram_close(gram(j, block_n=32, num_programs=2), j, dtype)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_separate_tensors_are_not_stacked(dtype):
    rows = [randn(113, dtype=dtype, seed=s) for s in range(7)]
    layout = as_rows(rows)
    assert layout.table is not None and layout.table.device == DEVICE  # a row table, no stacking
    assert_gram_close(gram(rows), torch.stack(rows), dtype)


def test_views_of_one_buffer_use_strides():
    buf = randn(6, 80)
    assert as_rows(list(buf.unbind(0))).table is None
    assert_gram_close(gram(list(buf.unbind(0))), buf, torch.float32)


def test_rows_with_mixed_column_strides():
    a = randn(2, 150, seed=1)
    rows = [a[0, :75], a[1, ::2], randn(75, seed=2)]
    assert_gram_close(gram(rows), torch.stack([r.contiguous() for r in rows]), torch.float32)


def test_row_tables_are_cached():
    rows = [randn(50, seed=s) for s in range(3)]
    assert as_rows(rows).table is as_rows(list(rows)).table


def test_more_rows_than_one_block():
    k = MAX_BLOCK_K + 3  # two row blocks: three block pairs, the mirror block written by symmetry
    j = randn(k, 33, seed=9)
    for deterministic in (True, False):
        g = gram(j, deterministic=deterministic)
        assert_gram_close(g, j, torch.float32)
        assert torch.equal(g, g.T) or not deterministic


def test_deterministic_mode_is_bitwise_reproducible_and_symmetric():
    j = randn(9, 300, dtype=torch.bfloat16, seed=4)
    first = gram(j, block_n=16, num_programs=3)
    for _ in range(3):
        assert torch.equal(gram(j, block_n=16, num_programs=3), first)
    assert torch.equal(first, first.T)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
def test_nonfinite_rows_show_on_the_diagonal():
    j = randn(4, 70)
    j[2, 5] = float("nan")
    j[3, 9] = float("inf")
    d = gram(j).diagonal()
    assert torch.isfinite(d[:2]).all() and not torch.isfinite(d[2:]).any()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="K x N"):
        gram(randn(2, 3, 4))
    with pytest.raises(ValueError, match="row 1"):
        gram([randn(10), randn(11)])
    with pytest.raises(ValueError, match="out_dtype"):
        gram(randn(2, 10), out_dtype=torch.float16)
    with pytest.raises(ValueError, match="block_n"):
        gram(randn(2, 10), block_n=24)
    with pytest.raises(TypeError, match="int32"):
        gram(torch.ones(2, 10, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="Triton kernels"):
        gram(torch.empty(2, 10, device="meta"))
