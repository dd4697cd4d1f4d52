"""``remote_class`` / ``remote_function`` (Twinkle's decorators): a user's class as 2 actors of a device group, its
methods dispatched and collected as Twinkle's are; the pure dispatch and collect rules against hand computations."""

from __future__ import annotations

import os
import sys
from typing import Optional

import pytest
import torch

from twinkle_async import DeviceMesh, remote_class, remote_function
from twinkle_async.errors import ConfigurationError, InvalidRequestError, NotSupportedError
from twinkle_async.ray.dispatch import collect_results, dispatch_args

from conftest import local_ray_cluster


@remote_class()
class Scorer:
    """A reward model stand-in: scores texts by length, says which process scored them."""

    def __init__(self, scale: float, device_mesh: Optional[DeviceMesh] = None) -> None:
        self.scale, self.replicas = scale, device_mesh.dp_size if device_mesh else 1

    @remote_function(dispatch='slice_dp', collect='flatten')
    def score(self, texts: list[str]) -> list[tuple[int, float]]:
        return [(os.getpid(), len(text) * self.scale) for text in texts]

    @remote_function(dispatch='all', collect='none')
    def where(self) -> tuple[int, int]:
        return os.getpid(), self.replicas

    @remote_function(execute='first', collect='first')
    def first_only(self) -> int:
        return os.getpid()

    @remote_function(dispatch='all', collect='sum')
    def total(self, value: int) -> int:
        return value

    @remote_function()
    def fail(self) -> None:
        raise KeyError('the reward for "x" is missing')

    def local_only(self) -> str:
        return 'here'


@pytest.fixture(scope='module')
def cluster(ray_environment):
    """A local Ray cluster with a 2-worker CPU group; this test module travels to the workers by value (pytest
    imports it under a name they cannot import)."""
    import ray
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with local_ray_cluster('rewards', object_store_mib=128):
        yield


def test_a_user_class_runs_as_two_actors_of_a_group(cluster):
    scorer = Scorer(2.0, remote_group='rewards', device_mesh=DeviceMesh.from_sizes(world_size=2, dp_size=2))
    places = scorer.where()
    assert len(places) == 2 and len({pid for pid, _ in places}) == 2 and os.getpid() not in {p for p, _ in places}
    assert [replicas for _, replicas in places] == [2, 2]
    texts = ['a', 'bb', 'ccc', 'dddd', 'eeeee']
    scored = scorer.score(texts)
    assert [score for _, score in scored] == [2.0, 4.0, 6.0, 8.0, 10.0]  # joined in order
    first, second = places[0][0], places[1][0]
    assert [pid for pid, _ in scored] == [first, first, first, second, second]  # 'slice_dp' split 3 + 2
    assert scorer.first_only() == first
    assert scorer.total(5) == 10
    with pytest.raises(KeyError, match='the reward for "x" is missing') as raised:
        scorer.fail()
    assert type(raised.value) is KeyError  # the actor's own exception, not Ray's wrapper of it
    with pytest.raises(NotSupportedError, match='local_only is not a remote_function'):
        scorer.local_only()
    with pytest.raises(InvalidRequestError, match='a batch of 1 for 2 replicas'):
        scorer.score(['one'])


def test_without_a_remote_group_the_class_is_local():
    scorer = Scorer(3.0)
    assert scorer.score(['ab']) == [(os.getpid(), 6.0)] and scorer.local_only() == 'here'


def test_dispatch_and_collect_rules():
    args, kwargs = ([1, 2, 3, 4, 5], 'x'), {'k': [10, 20, 30], 'v': 7}
    assert dispatch_args('slice', 2, args, kwargs) == [(([1, 2, 3], 'x'), {'k': [10, 20], 'v': 7}),
                                                        (([4, 5], 'x'), {'k': [30], 'v': 7})]
    assert dispatch_args('all', 2, args, kwargs) == [(args, kwargs)] * 2
    batch = {'ids': torch.arange(6).reshape(3, 2), 'names': ('a', 'b', 'c')}
    parts = dispatch_args('slice_dp', 2, (batch,), {})
    assert torch.equal(parts[0][0][0]['ids'], torch.tensor([[0, 1], [2, 3]])) and parts[1][0][0]['names'] == ('c',)
    assert dispatch_args('slice', 2, (('a', 'b'),), {})[0] == ((('a', 'b'),), {})  # 'slice' cuts lists only
    custom = dispatch_args(lambda n, i, a, k, device_mesh: ((i, n, device_mesh), {}), 2, (), {}, 'mesh')
    assert custom == [((0, 2, 'mesh'), {}), ((1, 2, 'mesh'), {})]
    assert collect_results('flatten', [[1], [2, 3]]) == [1, 2, 3] and collect_results('mean', [1, 3]) == 2
    assert collect_results('none', [7]) == 7 and collect_results('none', [7, 8]) == [7, 8]
    assert collect_results(lambda r, device_mesh: (r, device_mesh), [1], 'mesh') == ([1], 'mesh')
    with pytest.raises(ConfigurationError, match='dispatch must be one of'):
        remote_function(dispatch='scatter')
    with pytest.raises(ConfigurationError, match='collect must be one of'):
        remote_function(collect='last_pp')
