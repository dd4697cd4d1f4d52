"""The native runner's CPU decode-attention kernel, reading each row's blocks of the paged cache in place, against
SDPA over each row's positions gathered in order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twinkle_async.engines.torch.native.kernels import cpu_kernels


@pytest.fixture(scope='module')
def kernel():
    built = cpu_kernels()
    assert built is not None, 'the kernel builds on this machine (a C++ compiler is part of the platform)'
    return built


@pytest.mark.parametrize('dtype, tolerance', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('heads, kv_heads', [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize('block_size', [16, 7])
@pytest.mark.parametrize('dim', [64, 128, 48])
def test_each_row_attends_to_its_own_length_over_its_blocks_as_sdpa_does(kernel, dtype, tolerance, heads, kv_heads,
                                                                         dim, block_size):
    torch.manual_seed(heads)
    rows, width = 7, -(-96 // block_size)
    num_blocks = (rows + 2) * width + 3
    keys = torch.randn(num_blocks, kv_heads, block_size, dim, dtype=dtype)
    values = torch.randn(num_blocks, kv_heads, block_size, dim, dtype=dtype)
    tables = torch.randperm(num_blocks)[:(rows + 2) * width].view(rows + 2, width).contiguous()  # scattered blocks
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, dtype=dtype)
    query = qkv[:, :heads * dim].view(rows, heads, dim)  # a view of the projection's output, as the runner passes
    lengths = torch.tensor([1, 5, 96, 33, 64, 2, 80])
    got = kernel.decode_attention(query, keys, values, tables, lengths, 0.125, torch.get_num_threads())
    for row in range(rows):
        length = int(lengths[row])
        row_keys, row_values = (pool[tables[row]].transpose(0, 1).flatten(1, 2)[:, :length].float()
                                for pool in (keys, values))
        expected = F.scaled_dot_product_attention(query[row].float().unsqueeze(1), row_keys, row_values,
                                                  scale=0.125, enable_gqa=heads != kv_heads)[:, 0]
        assert (got[row].float() - expected).abs().max().item() < tolerance, row


def _paged(kv_heads: int, dim: int, block_size: int, slots: int, width: int):
    num_blocks = slots * width + 5
    keys = torch.randn(num_blocks, kv_heads, block_size, dim, dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks)[:slots * width].view(slots, width).contiguous()  # scattered blocks
    return keys, torch.randn_like(keys), tables


@pytest.mark.parametrize('heads, kv_heads, dim', [(9, 3, 64), (8, 1, 128), (4, 4, 64)])
@pytest.mark.parametrize('block_size', [16, 7])
def test_prefill_rows_attend_causally_over_their_cached_prefix_as_sdpa_does(kernel, heads, kv_heads, dim, block_size):
    if not kernel.has_prefill_attention(dim, heads // kv_heads):
        pytest.skip('this CPU has no AVX-512 BF16: the runner prefills through SDPA')
    torch.manual_seed(heads + block_size)
    keys, values, tables = _paged(kv_heads, dim, block_size, slots=3, width=-(-160 // block_size))
    # a whole prompt in slot 1, a 50-row chunk after 100 cached positions in slot 0, 3 rows after 5 in slot 2
    spans = torch.tensor([[0, 37, 1, 0], [37, 87, 0, 100], [87, 90, 2, 5]])
    qkv = torch.randn(90, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16)
    query = qkv[:, :heads * dim].view(90, heads, dim)  # a view of the projection, as the runner passes it
    got = kernel.prefill_attention(query, keys, values, tables, spans, 0.125)
    for first, end, slot, start in spans.tolist():
        length = start + end - first
        row_keys, row_values = (pool[tables[slot]].transpose(0, 1).flatten(1, 2)[:, :length].float()
                                for pool in (keys, values))
        seen = torch.arange(length) <= torch.arange(start, length)[:, None]
        expected = F.scaled_dot_product_attention(query[first:end].float().transpose(0, 1), row_keys, row_values,
                                                  attn_mask=seen, scale=0.125, enable_gqa=heads != kv_heads)
        assert (got[first:end].float().transpose(0, 1) - expected).abs().max().item() < 2e-2, (first, end)


def test_bad_shapes_are_refused_by_name(kernel):
    keys, tables = torch.zeros(4, 2, 8, 32), torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(RuntimeError, match='lengths: int64'):
        kernel.decode_attention(torch.zeros(2, 4, 32), keys, keys, tables, torch.tensor([1, 2], dtype=torch.int32),
                                1.0, 1)
    with pytest.raises(RuntimeError, match='contiguous'):
        kernel.decode_attention(torch.zeros(2, 32, 4).transpose(1, 2), keys, keys, tables, torch.tensor([1, 2]),
                                1.0, 1)
    with pytest.raises(RuntimeError, match='tables: contiguous int64'):
        kernel.decode_attention(torch.zeros(2, 4, 32), keys, keys, tables[:1], torch.tensor([1, 2]), 1.0, 1)
    for lengths in ([1, 17], [0, 2]):  # past the table's 2 blocks of 8; a row with nothing to attend to
        with pytest.raises(RuntimeError, match=r'each length must be in 1\.\.block table width \* block_size'):
            kernel.decode_attention(torch.zeros(2, 4, 32), keys, keys, tables, torch.tensor(lengths), 1.0, 1)
    if kernel.has_prefill_attention(32, 2):
        return
    with pytest.raises(RuntimeError, match='not built for this head size'):
        kernel.prefill_attention(torch.zeros(2, 4, 32, dtype=torch.bfloat16), keys.bfloat16(), keys.bfloat16(),
                                 tables, torch.tensor([[0, 2, 0, 0]]), 1.0)
