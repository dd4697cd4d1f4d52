"""The native runner's CPU decode-attention kernel, reading each row's blocks of the paged cache in place, against
SDPA over each row's positions gathered in order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twinkle_async.engines.torch.native.kernels import decode_attention_kernel


@pytest.fixture(scope='module')
def kernel():
    built = decode_attention_kernel()
    assert built is not None, 'the kernel builds on this machine (a C++ compiler is part of the platform)'
    return built


@pytest.mark.parametrize('dtype, tolerance', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('heads, kv_heads', [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize('block_size', [16, 7])
def test_each_row_attends_to_its_own_length_over_its_blocks_as_sdpa_does(kernel, dtype, tolerance, heads, kv_heads,
                                                                         block_size):
    torch.manual_seed(heads)
    rows, width, dim = 7, -(-96 // block_size), 64
    num_blocks = (rows + 2) * width + 3
    keys = torch.randn(num_blocks, kv_heads, block_size, dim, dtype=dtype)
    values = torch.randn(num_blocks, kv_heads, block_size, dim, dtype=dtype)
    tables = torch.randperm(num_blocks)[:(rows + 2) * width].view(rows + 2, width).contiguous()  # scattered blocks
    query = torch.randn(rows, heads, dim, dtype=dtype)
    lengths = torch.tensor([1, 5, 96, 33, 64, 2, 80])
    got = kernel.decode_attention(query, keys, values, tables, lengths, 0.125, torch.get_num_threads())
    for row in range(rows):
        length = int(lengths[row])
        row_keys, row_values = (pool[tables[row]].transpose(0, 1).flatten(1, 2)[:, :length].float()
                                for pool in (keys, values))
        expected = F.scaled_dot_product_attention(query[row].float().unsqueeze(1), row_keys, row_values,
                                                  scale=0.125, enable_gqa=heads != kv_heads)[:, 0]
        assert (got[row].float() - expected).abs().max().item() < tolerance, row


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
    with pytest.raises(RuntimeError, match='past the block table'):
        kernel.decode_attention(torch.zeros(2, 4, 32), keys, keys, tables, torch.tensor([1, 17]), 1.0, 1)
