"""The ``twinkle-async`` command line, run in-process on the tiny model."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from twinkle_async import SamplingParams
from twinkle_async.cli import build_parser, main, sampling_overrides

from conftest import hf_greedy, load_hf


@pytest.fixture()
def model_args(tiny_model_dir) -> list[str]:
    return ['--model', str(tiny_model_dir), '--max-model-len', '256']


def test_single_prompt_streams_the_greedy_reply(model_args, tiny_model_dir, capsys):
    assert main(['sample', 'hello there', '--temperature', '0', '--max-tokens', '8', '--ignore-eos', *model_args]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_hf(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template([{'role': 'user', 'content': 'hello there'}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
    assert printed.strip() == tokenizer.decode(hf_greedy(model, list(prompt), 8), skip_special_tokens=True).strip()


def test_file_mode_writes_in_order_and_refuses_to_overwrite(model_args, tmp_path, capsys):
    source = tmp_path / 'in.jsonl'
    lines = [{'prompt': f'question {i}', 'id': i} for i in range(5)] + [{'input_ids': [3, 4, 5], 'id': 5}]
    source.write_text(''.join(json.dumps(line) + '\n' for line in lines))
    target = tmp_path / 'out.jsonl'
    argv = ['sample', '-i', str(source), '-o', str(target), '--num-samples', '2', '--max-tokens', '6',
            '--ignore-eos', '--seed', '1', '--no-progress', *model_args]
    assert main(argv) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row['id'] for row in rows] == list(range(6))
    assert all(len(row['response']['sequences']) == 2 for row in rows)
    assert all(len(s['tokens']) == 6 for row in rows for s in row['response']['sequences'])
    assert 'tokens/s' in capsys.readouterr().err
    before = target.read_text()
    assert main(argv) == 2
    assert 'already exists' in capsys.readouterr().err and target.read_text() == before


def test_bad_line_aborts_unless_skipped(model_args, tmp_path, capsys):
    source = tmp_path / 'in.jsonl'
    source.write_text('{"prompt": "ok"}\n{"input_ids": []}\n')
    target = tmp_path / 'out.jsonl'
    base = ['sample', '-i', str(source), '-o', str(target), '--max-tokens', '3', '--no-progress', *model_args]
    assert main(base) == 1
    assert 'line 2' in capsys.readouterr().err
    assert main([*base, '--overwrite', '--skip-errors']) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert 'response' in rows[0] and 'empty' in rows[1]['error']


def test_typed_errors_print_a_message_without_traceback(model_args, capsys):
    assert main(['sample', 'x', '--temperature', '-1', *model_args]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error:') and 'temperature' in err and 'Traceback' not in err


def test_every_sampling_param_has_a_flag_that_reaches_sampling_params():
    args = build_parser().parse_args([
        'sample', 'hi', '--max-tokens', '7', '--seed', '3', '--stop', 'x', '--stop', 'yz',
        '--include-stop-str-in-output', '--temperature', '0.5', '--top-k', '4', '--top-p', '0.9',
        '--repetition-penalty', '1.2', '--logprobs', '2', '--prompt-logprobs', '1', '-n', '3', '--ignore-eos',
        '--return-sampling-mask'])
    given = sampling_overrides(args)
    assert set(given) == set(SamplingParams.model_fields), 'a field without a flag'
    assert SamplingParams(**given) == SamplingParams(
        max_tokens=7, seed=3, stop=['x', 'yz'], include_stop_str_in_output=True, temperature=0.5, top_k=4, top_p=0.9,
        repetition_penalty=1.2, logprobs=2, prompt_logprobs=1, num_samples=3, ignore_eos=True,
        return_sampling_mask=True)
