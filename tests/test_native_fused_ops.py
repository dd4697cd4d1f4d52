"""The native runner's fused CPU kernels for half-precision layers (RMSNorm with its residual add, rotary, SiLU-gated
product, K/V rows into their blocks) against the ATen reference (:class:`TorchOps`, op for op as the Hugging Face
modules), and a bfloat16 model on them against the same model on the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twinkle_async.engines.torch.attention import causal_packed
from twinkle_async.engines.torch.native.kernels import cpu_kernels
from twinkle_async.engines.torch.native.ops import FusedOps, TorchOps

from conftest import start_stream, within

HALF = [torch.bfloat16, torch.float16]
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # half a unit in the last place, relative


@pytest.fixture(scope='module')
def fused() -> FusedOps:
    kernels = cpu_kernels()
    assert kernels is not None, 'the kernels build on this machine (a C++ compiler is part of the platform)'
    return FusedOps(kernels)


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """Every value within one unit in the last place of the reference, and nearly all of them equal: the same
    computation rounded the same way, not merely a close one."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    bound = 2 * EPS[want.dtype] * want.float().abs() + 1e-6
    assert bool((diff <= bound).all()), f'max diff {diff.max().item()} beyond one ulp'
    assert (got == want).float().mean().item() > 0.98, 'more than 2% of the values differ'


@pytest.mark.parametrize('dtype', HALF)
def test_rms_norm_and_its_residual_add_round_as_the_reference(fused, dtype):
    torch.manual_seed(0)
    x, residual = torch.randn(37, 576, dtype=dtype) * 3, torch.randn(37, 576, dtype=dtype)
    weight = torch.randn(576, dtype=dtype)
    assert_within_one_ulp(fused.rms_norm(x.clone(), weight, 1e-5), TorchOps().rms_norm(x.clone(), weight, 1e-5))
    got_x, want_x = x.clone(), x.clone()
    got = fused.rms_norm(got_x, weight, 1e-5, residual)
    want = TorchOps().rms_norm(want_x, weight, 1e-5, residual)
    assert torch.equal(got_x, want_x), 'the residual add is one rounding: exactly the reference'
    assert torch.equal(got_x, x + residual)
    assert_within_one_ulp(got, want)


@pytest.mark.parametrize('dtype', HALF)
def test_rotary_in_place_on_the_qkv_views_rounds_as_the_reference(fused, dtype):
    torch.manual_seed(1)
    tokens, heads, kv_heads, dim = 19, 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    angles = torch.randn(tokens, dim // 2).repeat(1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    values_before = qkv[:, (heads + kv_heads) * dim:].clone()
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    want_q, want_k = TorchOps().rotate(q.clone(), cos, sin), TorchOps().rotate(k.clone(), cos, sin)
    got_q, got_k = fused.rotate(q, cos, sin), fused.rotate(k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr(), 'rotated in place, in the qkv output'
    assert_within_one_ulp(got_q, want_q)
    assert_within_one_ulp(got_k, want_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], values_before), 'the value heads are left alone'


@pytest.mark.parametrize('dtype', HALF)
def test_silu_gated_product_rounds_as_the_reference(fused, dtype):
    torch.manual_seed(2)
    gate_up = torch.randn(23, 2 * 1536, dtype=dtype) * 4
    assert_within_one_ulp(fused.act_mul(gate_up, F.silu), TorchOps().act_mul(gate_up, F.silu))


@pytest.mark.parametrize('dtype', [torch.float32, *HALF])
def test_argmax_is_torch_argmax_with_ties_to_the_first_and_ragged_tails(fused, dtype):
    torch.manual_seed(5)
    logits = torch.randn(9, 49_157, dtype=dtype)  # a width that leaves a 5-wide tail
    logits[1, 100] = logits[1, 7] = 50             # a tie: the first wins
    logits[2] = float('-inf')                        # nothing finite: index 0, as torch
    logits[3, -1] = 60                               # the last, in the tail
    logits[4, :] = 1.0                               # all equal
    assert torch.equal(fused.kernels.argmax(logits), logits.argmax(-1))
    assert fused.kernels.argmax(logits)[[1, 3, 4]].tolist() == [7, 49_156, 0]


def test_kv_rows_land_where_indexed_assignment_puts_them_and_a_place_outside_is_refused(fused):
    torch.manual_seed(3)
    pool = torch.zeros(10, 3, 16, 64, dtype=torch.bfloat16)
    rows = torch.randn(6, 5 * 64, dtype=torch.bfloat16)[:, 64:4 * 64].view(6, 3, 64)  # a strided view, as k is
    blocks, offsets = torch.tensor([4, 4, 0, 9, 2, 4]), torch.tensor([0, 15, 3, 7, 7, 1])
    want = pool.clone()
    want[blocks, :, offsets] = rows
    fused.kernels.write_rows_(pool, blocks, offsets, rows)
    assert torch.equal(pool, want)
    with pytest.raises(RuntimeError, match='outside the pool'):
        fused.kernels.write_rows_(pool, torch.tensor([10]), torch.tensor([0]), rows[:1])
    with pytest.raises(RuntimeError, match='bfloat16 or float16'):
        fused.rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-5)


def test_bfloat16_projections_on_packed_weights_equal_aten_until_the_weights_change(fused):
    if not fused._packs:
        pytest.skip("this torch or CPU has no oneDNN bfloat16 linear: projections stay on ATen's GEMM")
    torch.manual_seed(8)
    layer = torch.nn.Linear(96, 160, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(37, 96, dtype=torch.bfloat16)
    assert_within_one_ulp(fused.linear(x, layer), F.linear(x, layer.weight, layer.bias))
    layer.weight.data.copy_(torch.randn(160, 96))  # in place, as a weight update writes it
    stale = fused.linear(x, layer)
    assert not torch.equal(stale, F.linear(x, layer.weight, layer.bias)), 'the packed copy is what runs'
    fused.weights_changed()
    assert_within_one_ulp(fused.linear(x, layer), F.linear(x, layer.weight, layer.bias))


def test_a_bfloat16_model_on_the_kernels_matches_itself_on_the_reference(tiny_model_dir):
    from transformers import AutoConfig

    from twinkle_async.engines.torch.native.checkpoint import load_native

    model = load_native(tiny_model_dir, AutoConfig.from_pretrained(tiny_model_dir), torch.bfloat16,
                        torch.device('cpu'), 256)
    assert isinstance(model.ops, FusedOps), 'a bfloat16 model on CPU runs on the kernels'
    torch.manual_seed(4)
    lengths = [5, 40, 17]
    input_ids = torch.randint(0, model.shape.vocab, (sum(lengths),))
    positions = torch.cat([torch.arange(n) for n in lengths])
    bounds = [0, 5, 45, 62]
    scale = model.shape.head_dim ** -0.5

    def attention(layer, query, key, value):
        return causal_packed(query, key, value, bounds, scale).reshape(len(query), -1)

    with torch.no_grad():
        got = model.logits(model(input_ids, positions, attention)).float()
        model.ops = TorchOps()
        want = model.logits(model(input_ids, positions, attention)).float()
    assert (got - want).abs().max().item() < 0.05 * want.std().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95


@pytest.fixture(scope='module')
def bf16_model_dir(tiny_model_dir, tmp_path_factory):
    """A Llama with the kernels' head size (64) and 3 query heads per K/V head."""
    from tiny_model import build_family_model
    return build_family_model(tiny_model_dir, tmp_path_factory.mktemp('bf16-llama'), 'llama', hidden_size=384,
                              num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)


@pytest.mark.parametrize('batched_tokens', [128, 4096], ids=['chunked', 'whole'])
async def test_a_bfloat16_prompt_prefilled_by_the_kernels_scores_as_a_full_hf_forward(bf16_model_dir, batched_tokens):
    from transformers import AutoModelForCausalLM

    from twinkle_async import AsyncSampler

    prompt = torch.randint(3, 1000, (300,), generator=torch.Generator().manual_seed(6)).tolist()
    model = AutoModelForCausalLM.from_pretrained(bf16_model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    args = {'dtype': 'bfloat16', 'max_num_batched_tokens': batched_tokens, 'max_model_len': 1024, 'max_num_seqs': 4}
    async with AsyncSampler(str(bf16_model_dir), engine='torch', engine_args=args) as sampler:
        forward = sampler.engine.core.parts.forward
        if not forward.prefill_kernel:
            pytest.skip('this CPU has no AVX-512 BF16: prompts go through SDPA')
        calls = []
        kernel = forward.kernel
        forward.kernel = _Spy(kernel, calls)
        # a row decodes (its first token out) in the forwards that prefill the prompt
        decoding, deltas = await start_stream(sampler, {'input_ids': prompt[:20]}, {'max_tokens': 40,
                                                                                    'ignore_eos': True})
        response = await within(sampler.sample({'input_ids': prompt}, {'max_tokens': 1, 'prompt_logprobs': 0}), 120)
        await within(decoding)
        assert sum(len(delta.token_ids) for delta in deltas) == 40
        forward.kernel = kernel
    got = torch.tensor([row for row in response.prompt_logprobs[1:]])
    assert calls.count('prefill_attention') >= 2 * (3 if batched_tokens == 128 else 1), calls  # 2 layers a forward
    assert 'decode_attention' in calls
    assert (got - expected).abs().max().item() < 0.15, (got - expected).abs().max().item()  # 0.067 here


class _Spy:
    """The kernel module, recording which of its functions are called."""

    def __init__(self, kernel, calls):
        self._kernel, self._calls = kernel, calls

    def __getattr__(self, name):
        self._calls.append(name)
        return getattr(self._kernel, name)


async def test_a_bfloat16_engine_serves_updated_weights_and_sleep_drops_the_packed_copies(bf16_model_dir):
    from transformers import AutoModelForCausalLM

    from twinkle_async import AsyncSampler

    prompt = torch.randint(3, 1000, (60,), generator=torch.Generator().manual_seed(9)).tolist()
    model = AutoModelForCausalLM.from_pretrained(bf16_model_dir, dtype=torch.bfloat16).eval()
    torch.manual_seed(10)
    new_weights = {name: (t + 0.05 * torch.randn_like(t) if name.endswith('proj.weight') else t)
                   for name, t in model.state_dict().items()}
    model.load_state_dict(new_weights)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]

    async def prompt_logprobs(sampler) -> torch.Tensor:
        response = await within(sampler.sample({'input_ids': prompt}, {'max_tokens': 1, 'prompt_logprobs': 0}))
        return torch.tensor(response.prompt_logprobs[1:])

    args = {'dtype': 'bfloat16', 'max_model_len': 256, 'max_num_seqs': 2}
    async with AsyncSampler(str(bf16_model_dir), engine='torch', engine_args=args) as sampler:
        ops = sampler.engine.core.parts.forward.model.ops
        if not getattr(ops, '_packs', False):
            pytest.skip("this torch or CPU has no oneDNN bfloat16 linear: projections stay on ATen's GEMM")
        before = await prompt_logprobs(sampler)
        assert len(ops._packed) > 0, 'the projections ran on packed copies'
        await within(sampler.update_weights(new_weights))
        after = await prompt_logprobs(sampler)
        await within(sampler.sleep(2))
        assert ops._packed == {}, 'sleep(2) frees the packed copies with the weights'
        await within(sampler.update_weights(new_weights))
        await within(sampler.wake_up())
        again = await prompt_logprobs(sampler)
    assert (before - expected).abs().max().item() > 0.5, 'the update changes the scores (else this proves nothing)'
    assert (after - expected).abs().max().item() < 0.15, (after - expected).abs().max().item()
    assert torch.equal(again, after)
