"""RL helpers: a trainer's logprobs under the sampler's logprob contract, and the mismatch between the two."""

from twinkle_async.rl.logprobs import Mismatch, mismatch, sampler_logprobs, trainer_logprobs

__all__ = ['trainer_logprobs', 'mismatch', 'Mismatch', 'sampler_logprobs']
