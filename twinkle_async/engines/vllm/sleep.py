"""``SleepMode``: vLLM's sleep mode behind the engine protocol's ``sleep`` / ``wake_up`` (GPUs; the engine must start
with ``engine_args={'enable_sleep_mode': True}``).

Level 1 offloads the weights and drops the KV cache; level 2 drops both. Waking is done in two steps, weights then KV
cache, so that ``sleep(2)`` -> ``update_weights`` -> ``wake_up()`` serves the new weights: an update while asleep
wakes the weights alone (into which it then loads), and ``wake_up`` the KV cache last.
"""

from __future__ import annotations

from typing import Any

from twinkle_async.errors import ConfigurationError, NotSupportedError

__all__ = ['SleepMode']

_NO_SLEEP = ("sleep()/wake_up() need vLLM's sleep mode: start the engine with engine_args={'enable_sleep_mode': "
             'True} (GPUs only; vLLM-CPU has none): use pause(), or the torch engine\'s sleep()')


class SleepMode:
    """What is asleep (``'weights'``, ``'kv_cache'``) and the calls that put it to sleep and wake it, in order."""

    def __init__(self, llm: Any, enabled: bool) -> None:
        self.llm, self.enabled = llm, enabled
        self.asleep: set[str] = set()
        self.weights_dropped = False  # level 2 until weights were sent

    def check(self) -> None:
        """Raises NotSupportedError: the engine was started without sleep mode."""
        if not self.enabled:
            raise NotSupportedError(_NO_SLEEP)

    async def sleep(self, level: int) -> None:
        """Free the KV cache (level 1: the weights go to host memory; level 2: they are dropped)."""
        self.check()
        if level not in (1, 2):
            raise NotSupportedError(f'sleep level must be 1 or 2, got {level!r}')
        await self.llm.sleep(level)
        self.asleep = {'weights', 'kv_cache'}
        self.weights_dropped = self.weights_dropped or level == 2

    async def wake_weights(self) -> None:
        """Before weights are loaded into a sleeping engine: their memory back, the KV cache still asleep."""
        if 'weights' in self.asleep:
            await self.llm.wake_up(tags=['weights'])
            self.asleep.discard('weights')

    def weights_loaded(self) -> None:
        """A base-model update was applied (vLLM reloads every weight of the checkpoint)."""
        self.weights_dropped = False

    async def wake_up(self) -> None:
        """Weights, then the KV cache.

        Raises:
            ConfigurationError: after ``sleep(2)``, no weights were sent (the model would serve garbage).
        """
        self.check()
        if self.weights_dropped:
            raise ConfigurationError('after sleep(2) the weights are gone: send them with update_weights() before '
                                     'wake_up()')
        await self.wake_weights()
        if 'kv_cache' in self.asleep:
            await self.llm.wake_up(tags=['kv_cache'])
            self.asleep.discard('kv_cache')

    @property
    def sleeping(self) -> bool:
        return bool(self.asleep)
