"""Reliability: engine faults. A dead engine fails every waiter within seconds and refuses new work at once.

Faults: the torch engine thread raising (in the model's forward mid-batch, in the scheduler, in its loop while
paused); the vLLM engine-core process killed (SIGKILL). Waiters: ``sample`` callers, ``stream`` consumers
mid-stream, requests queued behind a full engine, requests kept or held by ``pause('keep')``, an
``update_weights`` in flight. Afterwards: new calls fail with ``EngineDeadError`` at once, the sampler closes
(twice), a new sampler on the same model serves what a never-faulted one serves, and no engine thread or
process is left behind (also after a clean close).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import psutil
import pytest
from safetensors.torch import load_file

from twinkle_async import AsyncSampler
from twinkle_async.engines.torch.engine import THREAD_NAME
from twinkle_async.errors import EngineDeadError

from conftest import TINY_ENGINE_ARGS, chat, child_pids, start_stream, within
from tiny_model import build_tiny_lora

FAULT_ARGS = {'max_model_len': 256, 'max_num_seqs': 4}  # 4 running, the rest queued
LONG = {'max_tokens': 200, 'ignore_eos': True}  # never finishes before the fault: the engine is frozen first
GREEDY = {'max_tokens': 24, 'temperature': 0, 'ignore_eos': True}
PROMPTS = [chat(p) for p in ('def main():', 'import os', 'class A:')]
FAULT_TO_ERROR_LIMIT = 10.0  # seconds from the fault to the last waiter's EngineDeadError
AT_ONCE = 2.0  # seconds a call on a dead engine may take to refuse


@pytest.fixture(scope='module')
def new_weights(tiny_model_dir: Path) -> dict:
    """A weight update a trainer could send: one of the model's own tensors."""
    return {'model.norm.weight': load_file(tiny_model_dir / 'model.safetensors')['model.norm.weight']}


@pytest.fixture(scope='module')
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora(tiny_model_dir, tmp_path_factory.mktemp('fault-lora') / 'a', 'a', seed=1)


# -- waiters --
async def outcome(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    """The result or the exception of ``awaitable``, and when it came."""
    try:
        result = await awaitable
    except Exception as exc:
        return exc, time.monotonic()
    return result, time.monotonic()


async def consume(sampler: AsyncSampler, text: str, first_token: asyncio.Event) -> int:
    tokens = 0
    async for delta in sampler.stream(chat(text), LONG):
        tokens += len(delta.token_ids)
        first_token.set()
    return tokens


async def freeze_a_full_engine(sampler: AsyncSampler) -> dict[str, asyncio.Task]:
    """Two streams mid-stream and two samples running, two samples queued behind them (max_num_seqs=4),
    then one request held: all frozen by ``pause('keep')``, so none can finish before the fault."""
    await within(sampler.pause('keep'))  # all six start in one step, the first four in FIFO order
    first_tokens = [asyncio.Event(), asyncio.Event()]
    waiters = {f'stream{i}': asyncio.create_task(outcome(consume(sampler, f's{i}', first_tokens[i])))
               for i in range(2)}
    for name in ('sample0', 'sample1', 'queued0', 'queued1'):
        waiters[name] = asyncio.create_task(outcome(sampler.sample(chat(name), LONG)))
    await within(until_requests(sampler, 6))
    await within(sampler.resume())
    await within(asyncio.gather(*(event.wait() for event in first_tokens)))
    await within(sampler.pause('keep'))
    waiters['held0'] = asyncio.create_task(outcome(sampler.sample(chat('held0'), LONG)))
    await within(until_requests(sampler, 7))
    return waiters


async def until_requests(sampler: AsyncSampler, count: int) -> None:
    """Until the engine counts ``count`` requests (running, queued or held)."""
    while True:
        stats = await sampler.engine.stats()
        if stats.running + stats.waiting >= count:
            return
        await asyncio.sleep(0.01)


async def fault_to_last_error(waiters: dict[str, asyncio.Task], fault_at: Callable[[], Optional[float]],
                              label: str) -> float:
    """Asserts every waiter failed with EngineDeadError; returns seconds from the fault to the last error."""
    _, pending = await asyncio.wait(waiters.values(), timeout=FAULT_TO_ERROR_LIMIT + 20)
    for task in pending:
        task.cancel()
    assert not pending, f'still waiting: {[name for name, task in waiters.items() if task in pending]}'
    outcomes = {name: task.result() for name, task in waiters.items()}
    wrong = {name: result for name, (result, _) in outcomes.items() if not isinstance(result, EngineDeadError)}
    assert not wrong, wrong
    fault = fault_at()
    assert fault is not None, 'the fault never fired'
    latency = max(when for _, when in outcomes.values()) - fault
    print(f'\n{label}: fault -> last of {len(waiters)} EngineDeadErrors ({", ".join(waiters)}) in {latency:.3f} s')
    assert 0 <= latency < FAULT_TO_ERROR_LIMIT
    return latency


# -- after the death --
async def drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def assert_refuses_new_work_at_once(sampler: AsyncSampler, weights: dict, lora: Path) -> None:
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        'sample': lambda: sampler.sample(chat('after'), GREEDY),
        'stream': lambda: drain(sampler.stream(chat('after'), GREEDY)),
        'update_weights': lambda: sampler.update_weights(weights),
        'add_adapter': lambda: sampler.add_adapter('late', lora),
        'pause': lambda: sampler.pause('keep'),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(EngineDeadError):
            await within(call(), 10)
        assert time.monotonic() - started < AT_ONCE, f'{name} took {time.monotonic() - started:.1f} s to refuse'


async def assert_new_sampler_serves_like(reference: AsyncSampler, model_dir: Path) -> None:
    """A new sampler on the same model (same engine_args as ``reference``) serves its greedy tokens; it closes
    cleanly, twice."""
    fresh = AsyncSampler(str(model_dir), engine=reference.engine_kind, engine_args=TINY_ENGINE_ARGS)
    await within(fresh.start(), 300)
    try:
        got = await within(fresh.sample(PROMPTS, GREEDY))
    finally:
        await within(fresh.close(), 60)
    await within(fresh.close(), 10)
    expected = await within(reference.sample(PROMPTS, GREEDY))
    assert [r.sequences[0].tokens for r in got] == [r.sequences[0].tokens for r in expected]
    assert all(len(r.sequences[0].tokens) == GREEDY['max_tokens'] for r in got)


def torch_engine_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Torch engine threads alive now that were not before (those of the session fixtures)."""
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive() and t not in before]


# -- torch: the engine thread raises --
class Fault:
    """Raises in the engine thread once armed (and, when ``gate`` is given, once it is set); records when.

    ``reached`` is set when the engine thread gets to the fault armed (so it waits there for ``gate``).
    """

    def __init__(self, gate: Optional[threading.Event] = None) -> None:
        self.armed = False
        self.gate = gate
        self.reached = threading.Event()
        self.at: Optional[float] = None

    def check(self) -> None:
        if not self.armed:
            return
        self.reached.set()
        if self.gate is not None:
            self.gate.wait(FAULT_TO_ERROR_LIMIT)
        self.at = time.monotonic()
        raise RuntimeError('injected engine fault')


def inject(target: Any, attribute: str, fault: Fault) -> None:
    """Wrap ``target.attribute`` (on the live object) so that it calls ``fault.check()`` first."""
    original = getattr(target, attribute)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        fault.check()
        return original(*args, **kwargs)

    setattr(target, attribute, wrapped)


def inject_after_arrivals(core: Any, fault: Fault) -> None:
    """The engine loop calls ``fault.check()`` right after it took in a new request (paused: held it)."""
    original = core._handle

    def handle(command: str, payload: Any) -> None:
        original(command, payload)
        if command == 'add':
            fault.check()

    core._handle = handle


def signal_update_submitted(core: Any) -> tuple[threading.Event, Callable[[], None]]:
    """An event set once the next call reaches the engine thread's inbox, and what starts watching for it."""
    submitted, watching = threading.Event(), threading.Event()
    original = core.call

    def call(function: Any, reply: Any) -> None:
        original(function, reply)
        if watching.is_set():
            submitted.set()

    core.call = call
    return submitted, watching.set


@pytest.mark.parametrize('site', ['model forward', 'scheduler'])
async def test_torch_thread_raising_mid_batch_fails_every_waiter_and_an_update_in_flight(
        site, tiny_model_dir, torch_sampler, new_weights, lora_dir):
    threads_before = set(threading.enumerate())
    sampler = AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=FAULT_ARGS)
    await within(sampler.start())
    core = sampler.engine.core
    submitted, watch_for_update = signal_update_submitted(core)
    fault = Fault(gate=submitted)
    if site == 'model forward':
        inject(core.lora.model, 'forward', fault)
    else:
        inject(core.scheduler, 'schedule', fault)
    waiters = await freeze_a_full_engine(sampler)
    stats = await within(sampler.engine.stats())
    assert (stats.used_slots, stats.waiting) == (4, 3)  # 4 running; 2 queued + 1 held
    fault.armed = True
    await within(sampler.resume())
    assert await within(asyncio.to_thread(fault.reached.wait, 10))  # the engine thread waits in the fault
    watch_for_update()  # it raises once the update's call is in its inbox
    waiters['update_weights'] = asyncio.create_task(outcome(sampler.update_weights(new_weights)))

    await fault_to_last_error(waiters, lambda: fault.at, f'torch, {site} raising')
    assert submitted.is_set(), 'the update reached the engine thread before it died'
    assert 'injected engine fault' in str(waiters['sample0'].result()[0])
    await after_the_death(sampler, torch_sampler, tiny_model_dir, new_weights, lora_dir, threads_before)


async def after_the_death(sampler: AsyncSampler, reference: AsyncSampler, model_dir: Path, new_weights: dict,
                          lora_dir: Path, threads_before: set[threading.Thread]) -> None:
    """New work refused at once; close (twice) stops the thread; a new sampler serves like ``reference``."""
    await assert_refuses_new_work_at_once(sampler, new_weights, lora_dir)
    await within(sampler.close())
    await within(sampler.close())
    assert torch_engine_threads(threads_before) == []
    await assert_new_sampler_serves_like(reference, model_dir)
    assert torch_engine_threads(threads_before) == []


async def test_torch_loop_raising_while_paused_fails_kept_queued_and_held_requests(
        tiny_model_dir, torch_sampler, new_weights, lora_dir):
    threads_before = set(threading.enumerate())
    sampler = AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=FAULT_ARGS)
    await within(sampler.start())
    fault = Fault()
    inject_after_arrivals(sampler.engine.core, fault)
    waiters = await freeze_a_full_engine(sampler)
    fault.armed = True
    waiters['held1'] = asyncio.create_task(outcome(sampler.sample(chat('held1'), LONG)))  # held, then the fault

    await fault_to_last_error(waiters, lambda: fault.at, 'torch, loop raising while paused')
    await after_the_death(sampler, torch_sampler, tiny_model_dir, new_weights, lora_dir, threads_before)


async def test_torch_close_fails_open_requests_stops_the_thread_and_can_be_repeated(tiny_model_dir, torch_sampler):
    threads_before = set(threading.enumerate())
    sampler = AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=FAULT_ARGS)
    await within(sampler.start())
    assert len(torch_engine_threads(threads_before)) == 1
    task, _ = await start_stream(sampler, chat('x'), {'max_tokens': 240, 'ignore_eos': True})
    await within(sampler.close())
    with pytest.raises(EngineDeadError):
        await within(task, 10)
    await within(sampler.close())
    assert torch_engine_threads(threads_before) == []


# -- vLLM: the engine-core process is killed --
def engine_core_processes(exclude: set[int]) -> list[psutil.Process]:
    """vLLM engine-core processes started by this test (not those of the session's shared engines)."""
    return [p for p in psutil.Process().children(recursive=True)
            if p.pid not in exclude and 'EngineCore' in p.name() + ' '.join(p.cmdline())]


def _is_resource_tracker(process: psutil.Process) -> bool:
    """multiprocessing's one resource tracker per interpreter: shared, not the engine's to stop."""
    return 'multiprocessing.resource_tracker' in ' '.join(process.cmdline())


def leftover_processes(before: set[int]) -> list[list[str]]:
    """Command lines of live child processes that were not there ``before``."""
    leftover = []
    for process in psutil.Process().children(recursive=True):
        try:
            if (process.pid not in before and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
                    and not _is_resource_tracker(process)):
                leftover.append(process.cmdline())
        except psutil.NoSuchProcess:
            pass
    return leftover


def gate_rpcs(engine: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold vLLM's collective_rpc calls: ``sent`` is set when one is made, which goes on once ``go`` is set."""
    sent, go = asyncio.Event(), asyncio.Event()
    original = engine.llm.collective_rpc

    async def collective_rpc(*args: Any, **kwargs: Any) -> Any:
        sent.set()
        await go.wait()
        return await original(*args, **kwargs)

    engine.llm.collective_rpc = collective_rpc
    return sent, go


@pytest.mark.slow
async def test_vllm_engine_core_killed_fails_every_waiter_then_a_new_sampler_serves_and_nothing_is_left(
        tiny_model_dir, vllm_sampler, new_weights, lora_dir):
    before = child_pids()
    sampler = AsyncSampler(str(tiny_model_dir), engine='vllm', engine_args=FAULT_ARGS)
    await within(sampler.start(), 300)
    waiters = await freeze_a_full_engine(sampler)
    rpc_sent, rpc_go = gate_rpcs(sampler.engine)
    waiters['update_weights'] = asyncio.create_task(outcome(sampler.update_weights(new_weights)))
    await within(rpc_sent.wait())  # the update is in flight: its first call to the workers is on its way
    cores = engine_core_processes(exclude=before)
    assert cores, 'vLLM runs its engine core in a child process'
    killed_at = time.monotonic()
    for process in cores:
        os.kill(process.pid, signal.SIGKILL)
    rpc_go.set()

    await fault_to_last_error(waiters, lambda: killed_at, 'vllm, engine core killed')
    await assert_refuses_new_work_at_once(sampler, new_weights, lora_dir)
    await within(sampler.close(), 60)
    await within(sampler.close(), 10)
    assert leftover_processes(before) == []
    await assert_new_sampler_serves_like(vllm_sampler, tiny_model_dir)
    assert leftover_processes(before) == []
