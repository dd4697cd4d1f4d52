"""Security: nothing in a model or adapter directory is unpickled or executed unless the user asks for it.

1. Models load only from safetensors: a pickle checkpoint is refused before any engine starts.
2. Adapters load only from safetensors: a pickled adapter is refused; the engine keeps serving.
3. ``trust_remote_code`` is off unless turned on: a model's own Python code is never imported.
4. The default-model cache is written atomically (staging dir + rename, under a file lock).
5. The CLI never overwrites an output file unless ``--overwrite`` is given.

"Never unpickled" and "never imported" are shown with traps: a pickle whose loading, or a module whose
import, creates a marker file. The marker must not exist afterwards.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from twinkle_async import AsyncSampler, models
from twinkle_async.cli import main
from twinkle_async.engines.torch.args import TorchEngineArgs
from twinkle_async.engines.torch.engine import THREAD_NAME
from twinkle_async.errors import ConfigurationError, InvalidAdapterError, ModelNotFoundError
from twinkle_async.models import DEFAULT_MODEL, require_safetensors, resolve_model

from conftest import ENGINES, TINY_ENGINE_ARGS, chat, child_pids, within

GREEDY = {'max_tokens': 6, 'temperature': 0, 'ignore_eos': True}
REPO = Path(__file__).resolve().parents[2]


# --- traps ----------------------------------------------------------------------------------------------------


class _PickleTrap:
    """Unpickling this object creates the file at ``path`` (``open(path, 'w')``): proof that it was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return open, (self.path, 'w')


def write_pickle_trap(file: Path, marker: Path) -> Path:
    """A pickle checkpoint at ``file`` (a state-dict-shaped dict) that creates ``marker`` when loaded."""
    file.write_bytes(pickle.dumps({'model.embed_tokens.weight': _PickleTrap(marker)}))
    return file


def write_code_trap(directory: Path, marker: Path, module: str = 'evil_model') -> str:
    """A module in ``directory`` whose import creates ``marker``; returns its name for ``auto_map``."""
    (directory / f'{module}.py').write_text(textwrap.dedent(f'''\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text('remote code ran')
        from transformers import LlamaConfig, LlamaForCausalLM


        class EvilConfig(LlamaConfig):
            model_type = 'evil_llama'


        class EvilForCausalLM(LlamaForCausalLM):
            config_class = EvilConfig
        '''))
    return module


def pickle_only_copy(model_dir: Path, directory: Path, marker: Path) -> Path:
    """``model_dir`` with its safetensors replaced by a trapped ``pytorch_model.bin``."""
    shutil.copytree(model_dir, directory)
    for weights in directory.glob('*.safetensors'):
        weights.unlink()
    write_pickle_trap(directory / 'pytorch_model.bin', marker)
    return directory


def remote_code_copy(model_dir: Path, directory: Path, marker: Path, model_type: str) -> Path:
    """``model_dir`` whose config (and tokenizer config) ``auto_map`` points at trapped code in the directory."""
    shutil.copytree(model_dir, directory)
    module = write_code_trap(directory, marker)
    config = json.loads((directory / 'config.json').read_text())
    architecture = 'LlamaForCausalLM' if model_type == 'llama' else 'EvilForCausalLM'
    config.update(model_type=model_type, architectures=[architecture],
                  auto_map={'AutoConfig': f'{module}.EvilConfig', 'AutoModelForCausalLM': f'{module}.EvilForCausalLM'})
    (directory / 'config.json').write_text(json.dumps(config))
    tokenizer_config = json.loads((directory / 'tokenizer_config.json').read_text())
    tokenizer_config['auto_map'] = {'AutoTokenizer': [f'{module}.EvilTokenizer', f'{module}.EvilTokenizer']}
    (directory / 'tokenizer_config.json').write_text(json.dumps(tokenizer_config))
    return directory


def test_the_traps_fire_when_their_contents_are_loaded(tmp_path):
    """The detectors work: unpickling the checkpoint, or importing the module, does write the marker."""
    pickled = write_pickle_trap(tmp_path / 'pytorch_model.bin', tmp_path / 'unpickled')
    pickle.loads(pickled.read_bytes())['model.embed_tokens.weight'].close()
    assert (tmp_path / 'unpickled').exists()
    module = write_code_trap(tmp_path, tmp_path / 'imported')
    spec = importlib.util.spec_from_file_location(f'trap_{tmp_path.name}', tmp_path / f'{module}.py')
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (tmp_path / 'imported').exists()


# --- 1. models load only from safetensors -----------------------------------------------------------------------


@dataclasses.dataclass
class EngineStarts:
    """Engine start attempts seen while a test runs: vLLM ``AsyncLLM`` builds, torch engine threads, processes."""

    attempts: list[str]
    children_before: set[int]
    threads_before: int

    def new_children(self) -> set[int]:
        return child_pids() - self.children_before

    def new_engine_threads(self) -> int:
        return _torch_engine_threads() - self.threads_before


def _torch_engine_threads() -> int:
    return sum(t.name == THREAD_NAME for t in threading.enumerate())


@pytest.fixture()
def engine_starts(monkeypatch: pytest.MonkeyPatch) -> EngineStarts:
    from vllm.v1.engine.async_llm import AsyncLLM

    from twinkle_async.engines.torch.engine import TorchEngine

    starts = EngineStarts([], child_pids(), _torch_engine_threads())

    def refuse(kind: str) -> Callable[..., Any]:
        def start(*args: Any, **kwargs: Any) -> Any:
            starts.attempts.append(kind)
            raise AssertionError(f'the {kind} engine was started')
        return start

    monkeypatch.setattr(AsyncLLM, 'from_engine_args', refuse('vllm'))
    monkeypatch.setattr(TorchEngine, '__init__', refuse('torch'))
    return starts


def test_require_safetensors_names_the_pickle_files_it_refuses(tiny_model_dir, tmp_path):
    require_safetensors(tiny_model_dir)
    (tmp_path / 'pytorch_model.bin').write_bytes(b'not read')
    with pytest.raises(ConfigurationError, match='safetensors') as info:
        require_safetensors(tmp_path)
    assert 'pytorch_model.bin' in str(info.value) and 'pickle checkpoints are refused' in str(info.value)


@pytest.mark.parametrize('engine', ENGINES)
async def test_a_pickle_checkpoint_is_refused_before_the_engine_starts(engine, tiny_model_dir, tmp_path,
                                                                       engine_starts):
    marker = tmp_path / 'unpickled'
    model_dir = pickle_only_copy(tiny_model_dir, tmp_path / 'model', marker)
    sampler = AsyncSampler(str(model_dir), engine=engine, engine_args=TINY_ENGINE_ARGS)
    with pytest.raises(ConfigurationError, match='safetensors') as info:
        await within(sampler.start(), 60)
    assert 'pytorch_model.bin' in str(info.value) and 'pickle' in str(info.value)
    assert engine_starts.attempts == [] and engine_starts.new_engine_threads() == 0
    assert engine_starts.new_children() == set(), 'no engine process was spawned'
    assert not marker.exists(), 'the pickle checkpoint was never unpickled'


def test_vllm_loads_safetensors_only_by_default(tiny_model_dir):
    """Defence in depth: even past ``require_safetensors``, vLLM's loader is told to read safetensors only."""
    from twinkle_async.engines.vllm.args import build_engine_args

    assert build_engine_args(str(tiny_model_dir), None, on_cpu=True).load_format == 'safetensors'


# --- 2. adapters load only from safetensors ---------------------------------------------------------------------


async def test_a_pickled_adapter_is_refused_and_the_engine_keeps_serving(sampler, lora_dirs, tmp_path):
    marker = tmp_path / 'unpickled'
    adapter = tmp_path / 'pickled-adapter'
    shutil.copytree(lora_dirs['a'], adapter)
    (adapter / 'adapter_model.safetensors').unlink()
    write_pickle_trap(adapter / 'adapter_model.bin', marker)
    with pytest.raises(InvalidAdapterError, match='pickle') as info:
        await within(sampler.add_adapter('pickled', str(adapter)))
    assert 'adapter_model.bin' in str(info.value)
    assert not marker.exists(), 'the pickled adapter was never unpickled'
    assert 'pickled' not in sampler.list_adapters()
    response = await within(sampler.sample(chat('still serving?'), GREEDY))
    assert len(response.sequences[0].tokens) == GREEDY['max_tokens']


# --- 3. trust_remote_code is off unless the user turns it on ----------------------------------------------------


def test_trust_remote_code_defaults_to_off_on_both_engines(tiny_model_dir):
    from vllm import AsyncEngineArgs

    from twinkle_async.engines.vllm.args import build_engine_args

    assert TorchEngineArgs().trust_remote_code is False
    assert {f.name: f.default for f in dataclasses.fields(AsyncEngineArgs)}['trust_remote_code'] is False
    assert build_engine_args(str(tiny_model_dir), None, on_cpu=True).trust_remote_code is False


@pytest.mark.parametrize('engine', ENGINES)
async def test_a_custom_architecture_needs_trust_remote_code_and_its_code_never_runs(engine, tiny_model_dir,
                                                                                      tmp_path):
    marker = tmp_path / 'imported'
    model_dir = remote_code_copy(tiny_model_dir, tmp_path / 'model', marker, model_type='evil_llama')
    sampler = AsyncSampler(str(model_dir), engine=engine, engine_args=TINY_ENGINE_ARGS)
    try:
        with pytest.raises(ConfigurationError, match='trust_remote_code'):
            await within(sampler.start())
    finally:
        await within(sampler.close())
    assert not marker.exists(), "the model's own code was never imported"


@pytest.mark.parametrize('engine', ENGINES)
async def test_trust_remote_code_turned_on_does_run_the_models_code(engine, tiny_model_dir, tmp_path):
    """The switch is honoured (the trap fires); its code failing is a typed error, not its raw exception."""
    marker = tmp_path / 'imported'
    model_dir = remote_code_copy(tiny_model_dir, tmp_path / 'model', marker, model_type='evil_llama')
    sampler = AsyncSampler(str(model_dir), engine=engine, engine_args={**TINY_ENGINE_ARGS, 'trust_remote_code': True})
    try:
        with pytest.raises(ConfigurationError, match='EvilTokenizer'):  # the trap defines no tokenizer class
            await within(sampler.start())
    finally:
        await within(sampler.close())
    assert marker.exists()


@pytest.mark.parametrize('sampler', ['torch', pytest.param('vllm', marks=pytest.mark.slow)], indirect=True)
async def test_a_llama_with_an_auto_map_is_served_by_the_built_in_class(sampler, tiny_model_dir, tmp_path):
    """The tiny model's weights, so the same greedy tokens as the session sampler of that engine."""
    expected = await within(sampler.sample(chat('hello'), GREEDY))
    marker = tmp_path / 'imported'
    model_dir = remote_code_copy(tiny_model_dir, tmp_path / 'model', marker, model_type='llama')
    async with AsyncSampler(str(model_dir), engine=sampler.engine_kind, engine_args=TINY_ENGINE_ARGS) as own:
        response = await within(own.sample(chat('hello'), GREEDY))
    assert response.sequences[0].tokens == expected.sequences[0].tokens
    assert not marker.exists(), "the model's own code was never imported"


# --- 4. the default-model cache is written atomically -----------------------------------------------------------


@pytest.fixture()
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``TWINKLE_ASYNC_CACHE``; returns the folder the default model is converted into."""
    monkeypatch.setenv('TWINKLE_ASYNC_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(models, '_gguf_package_dir', lambda: tmp_path)
    return tmp_path / 'cache' / 'models'


def fake_conversion(calls: list[Path], fail: bool = False) -> Callable[[Path, Path], None]:
    """Stands in for the 40 s dequantization: writes a config, then fails (``fail``) or writes weights."""
    def dequantize(gguf_dir: Path, staging: Path) -> None:
        calls.append(staging)
        (staging / 'config.json').write_text('{}')
        if fail:
            raise OSError('disk full (injected)')
        (staging / 'model.safetensors').write_bytes(b'weights')
    return dequantize


def leftovers(models_dir: Path) -> list[str]:
    """Everything in the cache folder except the lock file."""
    return sorted(name for name in os.listdir(models_dir) if not name.endswith('.lock'))


def is_complete(model_dir: Path) -> bool:
    names = set(os.listdir(model_dir))
    return {'config.json', 'model.safetensors', '.twinkle-async-complete'} <= names


def test_a_conversion_failing_midway_leaves_nothing_and_the_next_call_converts(models_dir, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, '_dequantize_into', fake_conversion(calls, fail=True))
    with pytest.raises(ModelNotFoundError, match='disk full'):
        resolve_model(DEFAULT_MODEL)
    assert len(calls) == 1 and leftovers(models_dir) == [], 'no target dir and no staging dir'
    monkeypatch.setattr(models, '_dequantize_into', fake_conversion(calls))
    target = resolve_model(DEFAULT_MODEL)
    assert is_complete(target) and leftovers(models_dir) == [DEFAULT_MODEL]
    assert resolve_model(DEFAULT_MODEL) == target and len(calls) == 2, 'converted once more, then cached'


def test_a_target_without_the_completion_marker_is_replaced_not_trusted(models_dir, monkeypatch):
    stale = models_dir / DEFAULT_MODEL
    stale.mkdir(parents=True)
    (stale / 'config.json').write_text('{"half": "written"}')
    (stale / 'model-00001-of-00002.safetensors').write_bytes(b'truncated')
    calls: list[Path] = []
    monkeypatch.setattr(models, '_dequantize_into', fake_conversion(calls))
    target = resolve_model(DEFAULT_MODEL)
    assert target == stale and len(calls) == 1 and is_complete(target)
    assert (target / 'config.json').read_text() == '{}'
    assert not (target / 'model-00001-of-00002.safetensors').exists()


def test_a_staging_dir_left_by_a_killed_converter_is_removed(models_dir, monkeypatch):
    killed = models_dir / f'.{DEFAULT_MODEL}-killed'
    killed.mkdir(parents=True)
    (killed / 'config.json').write_text('{}')
    monkeypatch.setattr(models, '_dequantize_into', fake_conversion([]))
    assert is_complete(resolve_model(DEFAULT_MODEL))
    assert leftovers(models_dir) == [DEFAULT_MODEL]


_RACER = '''
import fcntl, pathlib, sys, time, types
from twinkle_async import models
root, me = pathlib.Path(sys.argv[1]), sys.argv[2]
other = '1' if me == '0' else '0'


def wait_for(condition, what):
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def converted_by(name):
    log = root / 'conversions.log'
    return log.exists() and name in log.read_text().split()


def flock(handle, operation):
    # the real lock; a process that finds it taken says so before waiting on it
    if operation == fcntl.LOCK_EX:
        try:
            return fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (root / f'blocked-{me}').touch()
    return fcntl.flock(handle, operation)


def dequantize(gguf_dir, staging):
    with open(root / 'conversions.log', 'a') as log:
        log.write(me + '\\n')
    (staging / 'config.json').write_text('{}')
    # finish only once the other process is blocked on the lock, or converting too (no lock: the bug)
    wait_for(lambda: (root / f'blocked-{other}').exists() or converted_by(other), 'the other never tried')
    (staging / 'model.safetensors').write_bytes(b'weights')


models._gguf_package_dir = lambda: root
models._dequantize_into = dequantize
models.fcntl = types.SimpleNamespace(LOCK_EX=fcntl.LOCK_EX, LOCK_UN=fcntl.LOCK_UN, flock=flock)
(root / f'ready-{me}').touch()
wait_for(lambda: (root / f'ready-{other}').exists(), 'the other process never got ready')
print(models.resolve_model(models.DEFAULT_MODEL))
'''


def test_two_processes_resolving_into_an_empty_cache_convert_once(tmp_path):
    env = {**os.environ, 'TWINKLE_ASYNC_CACHE': str(tmp_path / 'cache')}
    procs = [subprocess.Popen([sys.executable, '-c', _RACER, str(tmp_path), str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1, 'both got the same directory'
    assert len((tmp_path / 'conversions.log').read_text().split()) == 1, 'the conversion ran once'
    target = Path(paths.pop())
    assert is_complete(target) and leftovers(target.parent) == [DEFAULT_MODEL]


# --- 5. the CLI never overwrites an output file unless told -----------------------------------------------------


@pytest.fixture()
def file_run(tiny_model_dir: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """CLI arguments sampling a one-line JSONL file into ``out.jsonl`` (which does not exist yet)."""
    source = tmp_path / 'in.jsonl'
    source.write_text('{"prompt": "hello"}\n')
    target = tmp_path / 'out.jsonl'
    argv = ['sample', '-i', str(source), '-o', str(target), '--max-tokens', '2', '--ignore-eos', '--no-progress',
            '--model', str(tiny_model_dir), '--max-model-len', '256']
    return argv, target


def test_the_cli_refuses_to_overwrite_an_output_file_without_overwrite(file_run, capsys):
    argv, target = file_run
    target.write_bytes(b'precious rollouts\n')
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert '--overwrite' in err and 'model loaded' not in err, 'refused before loading the model'
    assert target.read_bytes() == b'precious rollouts\n'
    assert main([*argv, '--overwrite']) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]['response']['sequences'][0]['tokens']) == 2


def test_the_cli_does_not_write_through_a_dangling_symlink(file_run, tmp_path, capsys):
    """An output path that is a symlink to a file not yet there counts as an existing file."""
    argv, target = file_run
    victim = tmp_path / 'victim'
    target.symlink_to(victim)
    assert main(argv) != 0
    assert '--overwrite' in capsys.readouterr().err
    assert not victim.exists() and target.is_symlink()


def test_a_cli_run_that_crashes_leaves_the_file_it_would_overwrite_as_it_was(file_run, monkeypatch):
    """``--overwrite`` replaces the file whole once the run is done, never empties it first."""
    from twinkle_async import cli_jsonl
    argv, target = file_run
    target.write_bytes(b'precious rollouts\n')

    async def crash(run, lines, stream, args):
        stream.write('{"half": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_jsonl, '_sample_lines', crash)
    assert main([*argv, '--overwrite']) == 130
    assert target.read_bytes() == b'precious rollouts\n'
    assert [p.name for p in target.parent.iterdir() if p.name.endswith('.partial')] == []
