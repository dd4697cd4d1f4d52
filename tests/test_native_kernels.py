"""The native runner's CPU decode-attention kernel against SDPA over the padded cache (the path it replaces)."""

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
def test_each_row_attends_to_its_own_length_as_sdpa_does(kernel, dtype, tolerance, heads, kv_heads):
    torch.manual_seed(heads)
    rows, slots, capacity, dim = 7, 9, 96, 64
    keys = torch.randn(slots, kv_heads, capacity, dim, dtype=dtype)
    values = torch.randn(slots, kv_heads, capacity, dim, dtype=dtype)
    query = torch.randn(rows, heads, dim, dtype=dtype)
    lengths = torch.tensor([1, 5, 96, 33, 64, 2, 80])
    got = kernel.decode_attention(query, keys, values, lengths, 0.125, torch.get_num_threads())
    for row in range(rows):
        length = int(lengths[row])
        expected = F.scaled_dot_product_attention(
            query[row].float().unsqueeze(1), keys[row, :, :length].float(), values[row, :, :length].float(),
            scale=0.125, enable_gqa=heads != kv_heads)[:, 0]
        assert (got[row].float() - expected).abs().max().item() < tolerance, row


def test_bad_shapes_are_refused_by_name(kernel):
    keys = torch.zeros(2, 2, 8, 32)
    with pytest.raises(RuntimeError, match='lengths: int64'):
        kernel.decode_attention(torch.zeros(2, 4, 32), keys, keys, torch.tensor([1, 2], dtype=torch.int32), 1.0, 1)
    with pytest.raises(RuntimeError, match='contiguous'):
        kernel.decode_attention(torch.zeros(2, 32, 4).transpose(1, 2), keys, keys, torch.tensor([1, 2]), 1.0, 1)
