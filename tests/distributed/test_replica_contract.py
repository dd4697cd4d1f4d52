"""The engine contract suite on a one-replica ``ReplicaEngine`` (the torch engine in a Ray actor): every contract
test that takes the shared sampler runs here unchanged, through the Ray layer."""

from __future__ import annotations

import inspect

import pytest
import pytest_asyncio
import test_contract_adapters
import test_contract_bad_inputs
import test_contract_cancellation
import test_contract_generation
import test_contract_pause
import test_contract_timeouts
import test_contract_weights

from twinkle_async import DeviceMesh
from twinkle_async.ray.replica_engine import ReplicaEngine

from conftest import TINY_ENGINE_ARGS, ray_sampler

pytestmark = pytest.mark.slow

_SHARED = {'sampler', 'with_adapters', 'pausable', 'bounded', 'synced'}  # the sampler and the fixtures around it


def _adopt(module) -> None:
    """Take ``module``'s fixtures and its tests that use the shared sampler into this module."""
    short = module.__name__.removeprefix('test_contract_')
    for name, value in vars(module).items():
        if name in _SHARED - {'sampler'}:
            globals()[name] = value
        elif name.startswith('test_') and _SHARED & set(inspect.signature(value).parameters):
            globals()[f'test_{short}__{name.removeprefix("test_")}'] = value


for _module in (test_contract_generation, test_contract_bad_inputs, test_contract_cancellation,
                test_contract_adapters, test_contract_pause, test_contract_timeouts, test_contract_weights):
    _adopt(_module)


@pytest_asyncio.fixture(scope='module', loop_scope='session')
async def sampler(ray_environment, tiny_model_dir):
    """The contract's shared sampler, served by one replica actor; ``max_pending_requests`` is accepted with
    ``remote_group`` (the timeouts contract then bounds it at 2 and sees the third request refused)."""
    async with ray_sampler('contract', tiny_model_dir, engine='torch', engine_args=TINY_ENGINE_ARGS,
                           device_mesh=DeviceMesh.from_sizes(dp_size=1), max_pending_requests=256) as remote:
        assert isinstance(remote.engine, ReplicaEngine) and remote.admission.max_pending == 256
        yield remote
