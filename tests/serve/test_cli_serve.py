"""``twinkle-async serve`` as a user runs it: a process that prints its URL, answers the openai client, needs the
key it was given, and shuts down cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

import openai
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def first_line_with(process: subprocess.Popen, marker: str, seconds: float = 180) -> str:
    """The first stdout line holding ``marker`` (read on a thread so the wait has a timeout)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    while True:
        line = lines.get(timeout=seconds)
        if marker in line:
            return line


def test_serve_prints_its_url_answers_needs_the_key_and_stops_on_ctrl_c(tiny_model_dir):
    command = [sys.executable, '-m', 'twinkle_async', 'serve', '--model', str(tiny_model_dir), '--engine', 'torch',
               '--port', '0', '--api-key', 'k', '--dtype', 'float32', '--max-model-len', '256']
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = first_line_with(process, 'serving').split(' at ')[1].strip()
        assert url.startswith('http://127.0.0.1:') and url.endswith('/v1')
        client = openai.OpenAI(base_url=url, api_key='k', max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=str(tiny_model_dir), max_tokens=3, temperature=0,
                                               messages=[{'role': 'user', 'content': 'hi'}],
                                               extra_body={'ignore_eos': True})
        assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (3, 'length')
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key='wrong', max_retries=0).models.list()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0 and 'stopped' in err and 'Traceback' not in err, err[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


@pytest.mark.slow
def test_serve_on_two_ray_replicas_keeps_a_sessions_trajectory(tiny_model_dir, ray_environment):
    import httpx

    command = [sys.executable, '-m', 'twinkle_async', 'serve', '--model', str(tiny_model_dir), '--engine', 'torch',
               '--port', '0', '--ray', '--dp', '2', '--dtype', 'float32', '--max-model-len', '256']
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = first_line_with(process, 'serving', 300).split(' at ')[1].strip()
        client = openai.OpenAI(base_url=url, api_key='none', max_retries=0, timeout=120)
        messages, sampled = [{'role': 'user', 'content': 'hi'}], []
        for turn in range(3):
            reply = client.chat.completions.create(
                model=str(tiny_model_dir), messages=messages, max_tokens=4, temperature=0,
                extra_headers={'X-Session-ID': 'ray-session'}, extra_body={'return_token_ids': True})
            sampled.append(reply.choices[0].model_extra['token_ids'])
            messages += [{'role': 'assistant', 'content': reply.choices[0].message.content},
                         {'role': 'user', 'content': f'turn {turn}'}]
        trajectory = httpx.get(f'{url}/sessions/ray-session/trajectory', timeout=60).json()
        (segment,) = trajectory['segments']
        assert [t for t, m in zip(segment['token_ids'], segment['loss_mask']) if m] == sum(sampled, [])
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0 and 'stopped' in err, err[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
