"""Model id resolution: local dirs, the embedded default (converted once, safely), hub ids offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from twinkle_async.errors import ModelNotFoundError
from twinkle_async.models import resolve_model


def test_local_directory_and_bad_paths(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ModelNotFoundError, match='no config.json'):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match='/definitely/not/here'):
        resolve_model('/definitely/not/here')


def test_offline_hub_ids_fail_at_once_naming_the_id():
    with pytest.raises(ModelNotFoundError, match='someorg/somemodel'):
        resolve_model('hf://someorg/somemodel')


def test_default_model_is_converted_into_the_cache(default_model_dir):
    names = set(os.listdir(default_model_dir))
    assert {'config.json', 'model.safetensors', 'tokenizer.json', '.twinkle-async-complete'} <= names


@pytest.mark.slow
def test_two_processes_converting_at_once_both_get_a_complete_model(tmp_path):
    code = 'from twinkle_async.models import resolve_model; print(resolve_model("smollm2-135m-instruct"))'
    env = {**os.environ, 'TWINKLE_ASYNC_CACHE': str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    model_dir = paths.pop()
    assert os.path.isfile(os.path.join(model_dir, '.twinkle-async-complete'))
    staging = os.listdir(os.path.join(str(tmp_path), 'models'))
    leftovers = [n for n in staging if n.startswith('.smollm2-135m-instruct-')]
    assert leftovers == [], 'no half-written staging directory is left behind'
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers == 30
