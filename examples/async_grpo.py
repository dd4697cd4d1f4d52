"""Async GRPO with a LoRA policy: rollouts for step k+1 are sampled while step k trains.

What it shows:
  * the trainer holds a PEFT LoRA model (r=8 on q_proj, v_proj) of the default model in this process; the
    sampler serves the same LoRA as an adapter (``add_adapter(name, LoraConfig, tensors)``);
  * one-step-off-policy pipelining: the training step runs in a thread (``asyncio.to_thread``) while the
    next batch of rollouts is sampled; as soon as it ends, its LoRA tensors go to the sampler with
    ``update_weights(tensors, adapter_name=..., version=step)``, even while that batch is still being
    sampled: its remaining tokens come from the new weights;
  * every sampled token says which weights sampled it (``sequence.weight_versions``); the report's
    staleness is the version lag of the tokens trained on (trainer version - sampling version);
  * GRPO: ``num_samples=G`` completions per prompt, advantage = (reward - group mean) / group std, a
    clipped policy-gradient loss on the sampled tokens with the importance ratio between the trainer's
    logprobs and the sampler's (``logprobs=0`` returns the sampled token's logprob), which corrects
    for the off-policy tokens;
  * dynamic sampling (DAPO): ``sample_groups`` over-samples problems and keeps the first groups whose rewards
    are not all equal (a group that agrees has zero advantage: nothing to learn), aborting the rest;
  * the logprob contract: tokens are drawn with top-k/top-p, the sampler returns processed logprobs and the kept
    set of every position (``return_sampling_mask``), and the trainer computes its logprobs with
    ``twinkle_async.rl.trainer_logprobs`` under the same processing; the report shows the mismatch on on-policy
    tokens with the mask (~0) and what a trainer ignoring top-k/top-p would see (the log of the kept mass);
  * a verifiable toy reward: 1 when the completion states the answer, partial credit (0.2-0.5) for a number by
    how close it is, else 0.

Both share this machine's CPU cores, so each side runs slower while the other is busy; the printed
overlap is the fraction of wall time in which rollout and training were both running.

Run (from the repository root):
    .venv/bin/python examples/async_grpo.py                                  # 6 steps, torch engine
    .venv/bin/python examples/async_grpo.py --steps 10 --prompts-per-step 8 --group-size 4 --engine vllm
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

import twinkle_async as ta
from twinkle_async.rl import mismatch, trainer_logprobs

ADAPTER = 'policy'
_NUMBER = re.compile(r'-?\d+')


# -- the task and its reward (pure functions) --
@dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def make_problems(count: int, rng: random.Random) -> list[Problem]:
    problems = []
    for _ in range(count):
        a, b, op = rng.randint(1, 30), rng.randint(1, 30), rng.choice('+-')
        problems.append(Problem(f'What is {a} {op} {b}? Answer with a number.', a + b if op == '+' else a - b))
    return problems


def reward(text: str, answer: int) -> float:
    """1 if the text states the answer, else partial credit for its last number by how close it is, 0 without a
    number."""
    numbers = [int(n) for n in _NUMBER.findall(text)]
    if not numbers:
        return 0.0
    return 1.0 if answer in numbers else 0.2 + 0.3 / (1 + abs(numbers[-1] - answer))


def group_advantages(rewards: list[float]) -> list[float]:
    """GRPO: each reward relative to its group (mean 0, std 1; all zero when the group agrees)."""
    mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
    return [(r - mean) / (std + 1e-4) for r in rewards]


# -- rollouts --
@dataclass
class Rollout:
    """One sampled completion, with what training and the report need."""

    prompt_ids: list[int]
    tokens: list[int]
    sampler_logprobs: list[float]  # under the weights that sampled each token (processed: see the docstring)
    versions: list[int]            # which weights sampled each token
    reward: float
    sequence: ta.SampledSequence   # how its logprobs were computed, and its sampling mask
    advantage: float = 0.0


def chat_of(problem: Problem) -> dict:
    return {'messages': [{'role': 'user', 'content': problem.question}]}


def to_group(response: ta.SampleResponse, problem: Problem) -> list[Rollout]:
    group = [Rollout(response.prompt_token_ids, s.tokens, [row[0][1] for row in s.logprobs], s.weight_versions,
                     reward(s.decoded, problem.answer), s) for s in response.sequences]
    for rollout, advantage in zip(group, group_advantages([r.reward for r in group])):
        rollout.advantage = advantage
    return group


async def sample_batch(sampler: ta.AsyncSampler, problems: list[Problem], args: argparse.Namespace,
                       seed: int) -> tuple[list[list[Rollout]], dict[str, int]]:
    """``args.prompts_per_step`` groups whose rewards differ, sampled from ``problems`` (over-sampled) with
    ``sample_groups``; what dynamic sampling did (groups submitted, rejected, aborted; tokens generated)."""
    params = ta.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_k=20, top_p=0.95, seed=seed,
                               logprobs=0, return_sampling_mask=True)
    by_prompt = {tuple(sampler.template.encode(chat_of(p))['input_ids']): p for p in problems}

    def rewards_differ(response: ta.SampleResponse) -> bool:
        problem = by_prompt[tuple(response.prompt_token_ids)]
        return len({reward(s.decoded, problem.answer) for s in response.sequences}) > 1

    before = sampler.metrics()
    responses = await sampler.sample_groups([chat_of(p) for p in problems], params, num_samples=args.group_size,
                                            accept=rewards_differ, target=args.prompts_per_step,
                                            over_sample=args.over_sample, adapter_name=ADAPTER)
    after = sampler.metrics()
    dynamic = {key: after[key] - before[key] for key in ('rejected_groups', 'aborted_groups', 'generated_tokens')}
    dynamic['accepted_groups'] = len(responses)
    return [to_group(r, by_prompt[tuple(r.prompt_token_ids)]) for r in responses], dynamic


# -- the trainer: a PEFT LoRA model, trained in a worker thread --
class Trainer:
    def __init__(self, model_dir: str, rank: int, lr: float, clip: float, seed: int) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                      target_modules=['q_proj', 'v_proj'])
        self.model = get_peft_model(base, self.lora_config)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.clip = clip

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed as PEFT saves them (what ``add_adapter`` / ``update_weights`` take)."""
        from peft import get_peft_model_state_dict
        return {name: t.detach().clone() for name, t in get_peft_model_state_dict(self.model).items()}

    def train_step(self, batch: list[list[Rollout]], version: int) -> dict[str, Any]:
        """One optimizer step on every sampled token of the batch (one group per forward pass).

        Returns the loss, the mean |log ratio| between trainer and sampler logprobs (about 0 for tokens sampled
        with the trainer's current weights, larger the more off-policy the batch is), and the mismatch on the
        tokens sampled by ``version`` (the trainer's weights before this step) with and without the mask.
        """
        num_tokens = max(sum(len(r.tokens) for group in batch for r in group), 1)
        self.optimizer.zero_grad()
        loss_sum = log_ratio_sum = 0.0
        pairs: dict[str, list[float]] = {'sampler': [], 'masked': [], 'unaware': []}
        for group in batch:
            loss, log_ratio = self._group_loss(group, version, pairs)
            (loss / num_tokens).backward()
            loss_sum += loss.item()
            log_ratio_sum += log_ratio
        self.optimizer.step()
        figures: dict[str, Any] = {'loss': loss_sum / num_tokens, 'log_ratio': log_ratio_sum / num_tokens}
        if pairs['sampler']:
            figures['mismatch'] = mismatch(pairs['sampler'], pairs['masked'])
            figures['mismatch_unaware'] = mismatch(pairs['sampler'], pairs['unaware'])
        return figures

    def _group_loss(self, group: list[Rollout], version: int,
                    pairs: dict[str, list[float]]) -> tuple[torch.Tensor, float]:
        """Sum over the tokens of the clipped policy-gradient loss (PPO-style ratio to the sampler's
        logprobs), and the sum of |log ratio|; ``pairs`` gets the on-policy tokens' logprobs."""
        prompt = len(group[0].prompt_ids)  # a group shares its prompt
        length = max(len(r.tokens) for r in group)
        ids = torch.zeros(len(group), prompt + length, dtype=torch.long)
        attention = torch.zeros_like(ids)
        mask = torch.zeros(len(group), length)  # 1 on sampled tokens, 0 on padding
        old = torch.zeros(len(group), length)
        for i, r in enumerate(group):
            ids[i, :prompt + len(r.tokens)] = torch.tensor(r.prompt_ids + r.tokens)
            attention[i, :prompt + len(r.tokens)] = 1
            mask[i, :len(r.tokens)] = 1.0
            old[i, :len(r.tokens)] = torch.tensor(r.sampler_logprobs)
        # logits at positions prompt-1 .. end-1 predict the completion tokens (the last position predicts nothing)
        logits = self.model(input_ids=ids, attention_mask=attention, logits_to_keep=length + 1).logits[:, :-1]
        new = torch.zeros(len(group), length)
        for i, r in enumerate(group):  # the sampler's processing (temperature, top-k/top-p mask) on our logits
            new[i, :len(r.tokens)] = trainer_logprobs(logits[i, :len(r.tokens)], r.tokens, r.sequence)
            on_policy = [j for j, v in enumerate(r.versions) if v == version]
            if on_policy:
                with torch.no_grad():
                    unaware = trainer_logprobs(logits[i, :len(r.tokens)], r.tokens, r.sequence, use_mask=False)
                pairs['sampler'] += [r.sampler_logprobs[j] for j in on_policy]
                pairs['masked'] += new[i, on_policy].tolist()
                pairs['unaware'] += unaware[on_policy].tolist()
        log_ratio = (new - old) * mask
        ratio = torch.exp(log_ratio)
        advantage = torch.tensor([r.advantage for r in group])[:, None]
        objective = torch.minimum(ratio * advantage, ratio.clamp(1 - self.clip, 1 + self.clip) * advantage)
        return -(objective * mask).sum(), log_ratio.abs().sum().item()


# -- bookkeeping: busy intervals and staleness --
@dataclass
class Clock:
    """Busy intervals of rollout and training, to measure how much they overlapped."""

    start: float
    rollout: list[tuple[float, float]]
    training: list[tuple[float, float]]

    def overlap_s(self) -> float:
        return sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in self.rollout for b0, b1 in self.training)

    def step_times(self, step: int, step_start: float) -> dict[str, float]:
        """Seconds of step ``step``: its training, the rollout sampled meanwhile (none after the last), all."""
        rollout = self.rollout[step] if step < len(self.rollout) else (0.0, 0.0)
        return {'train_s': self.training[-1][1] - self.training[-1][0], 'rollout_s': rollout[1] - rollout[0],
                'step_s': time.perf_counter() - step_start}


async def timed_rollout(clock: Clock, sampler: ta.AsyncSampler, problems: list[Problem],
                        args: argparse.Namespace, seed: int) -> tuple[list[list[Rollout]], dict[str, int]]:
    begin = time.perf_counter()
    batch = await sample_batch(sampler, problems, args, seed)
    clock.rollout.append((begin, time.perf_counter()))
    return batch


def timed_train(clock: Clock, trainer: Trainer, batch: list[list[Rollout]], version: int) -> dict[str, Any]:
    begin = time.perf_counter()
    figures = trainer.train_step(batch, version)
    clock.training.append((begin, time.perf_counter()))
    return figures


async def train_and_sync(clock: Clock, trainer: Trainer, sampler: ta.AsyncSampler, batch: list[list[Rollout]],
                         step: int) -> tuple[dict[str, Any], int]:
    """Train step ``step`` in a thread, then send the new LoRA weights to the sampler as version ``step``."""
    figures = await asyncio.to_thread(timed_train, clock, trainer, batch, step - 1)
    version = await sampler.update_weights(trainer.lora_tensors(), adapter_name=ADAPTER, version=step)
    return figures, version


def batch_figures(batch: list[list[Rollout]], trainer_version: int) -> dict[str, Any]:
    """Mean reward, and how stale the batch's tokens are: the version lag behind the trainer's weights."""
    rollouts = [r for group in batch for r in group]
    lags = [trainer_version - v for r in rollouts for v in r.versions] or [0]
    return {'reward': statistics.fmean([r.reward for r in rollouts] or [0.0]), 'staleness': statistics.fmean(lags),
            'max_staleness': max(lags), 'tokens': sum(len(r.tokens) for r in rollouts),
            'versioned_tokens': sum(len(r.versions) for r in rollouts),
            'token_versions': sorted({v for r in rollouts for v in r.versions})}


# -- the loop --
async def grpo(sampler: ta.AsyncSampler, trainer: Trainer, args: argparse.Namespace) -> dict:
    """``args.steps`` GRPO steps; the batch of step k+1 is sampled while step k trains."""
    rng = random.Random(args.seed)
    clock = Clock(time.perf_counter(), [], [])
    await sampler.add_adapter(ADAPTER, trainer.lora_config, trainer.lora_tensors())  # served as version 0
    candidates = math.ceil(args.prompts_per_step * args.over_sample) * 2  # problems offered to sample_groups
    batch, dynamic = await timed_rollout(clock, sampler, make_problems(candidates, rng), args, args.seed)
    steps = []
    for step in range(1, args.steps + 1):
        step_start = time.perf_counter()
        figures = {**batch_figures(batch, trainer_version=step - 1), **dynamic}
        training = train_and_sync(clock, trainer, sampler, batch, step)
        if step < args.steps:  # sample the next batch while this one trains
            problems = make_problems(candidates, rng)
            rollout = timed_rollout(clock, sampler, problems, args, args.seed + 1000 * step)
            (train_figures, version), (batch, dynamic) = await asyncio.gather(training, rollout)
        else:
            train_figures, version = await training
        steps.append({'step': step, 'version': version, **figures, **train_figures,
                      **clock.step_times(step, step_start)})
        print_step(steps[-1])
    return summarize(steps, clock, sampler.weight_version)


def summarize(steps: list[dict], clock: Clock, sampler_version: int) -> dict:
    wall = time.perf_counter() - clock.start
    tokens = max(sum(s['tokens'] for s in steps), 1)
    return {'steps': steps, 'synced_versions': [s['version'] for s in steps], 'sampler_version': sampler_version,
            'mean_staleness': sum(s['staleness'] * s['tokens'] for s in steps) / tokens,
            'wall_s': wall, 'overlap': clock.overlap_s() / wall,
            'rollout_s': sum(b - a for a, b in clock.rollout), 'train_s': sum(b - a for a, b in clock.training)}


def print_step(s: dict) -> None:
    print(f"step {s['step']:>3}  reward {s['reward']:.3f}  loss {s['loss']:+.4f}  |log ratio| {s['log_ratio']:.1e}  "
          f"staleness {s['staleness']:.2f} (max {s['max_staleness']}, token versions {s['token_versions']})  "
          f"train {s['train_s']:.1f} s  rollout {s['rollout_s']:.1f} s  step {s['step_s']:.1f} s", flush=True)
    print(f"         sample_groups: {s['accepted_groups']} groups with differing rewards kept, {s['rejected_groups']} "
          f"rejected, {s['aborted_groups']} aborted when the target was met ({s['generated_tokens']} tokens generated)")
    if 'mismatch' in s:
        print(f"         mismatch on on-policy tokens, trainer_logprobs with the mask: {s['mismatch']}")
        print(f"         ... ignoring top-k/top-p (plain log-softmax at the temperature): {s['mismatch_unaware']}")


# -- entry points --
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=6, help='training steps')
    parser.add_argument('--prompts-per-step', type=int, default=4, help='problems per batch')
    parser.add_argument('--group-size', type=int, default=4, help='GRPO group: completions per problem')
    parser.add_argument('--max-tokens', type=int, default=24, help='tokens per completion at most')
    parser.add_argument('--lr', type=float, default=5e-4)
    parser.add_argument('--lora-rank', type=int, default=8)
    parser.add_argument('--clip', type=float, default=0.2, help='PPO clip range of the importance ratio')
    parser.add_argument('--over-sample', type=float, default=1.5,
                        help='sample_groups runs this many times the groups it needs at once')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--engine', choices=['torch', 'vllm'], default='torch')
    parser.add_argument('--model', default=ta.DEFAULT_MODEL, help='model id or local HF directory')
    return parser.parse_args(argv)


async def amain(argv: Optional[list[str]] = None) -> dict:
    """Run the loop and return its figures (for tests and notebooks: ``await amain([...])``)."""
    args = parse_args(argv)
    width = math.ceil(args.prompts_per_step * args.over_sample)
    engine_args: dict[str, Any] = {'max_model_len': 1024, 'max_num_seqs': max(width * args.group_size, 2),
                                   'logprobs_mode': 'processed_logprobs'}
    async with ta.AsyncSampler(args.model, engine=args.engine, engine_args=engine_args) as sampler:
        trainer = await asyncio.to_thread(Trainer, str(sampler.model_dir), args.lora_rank, args.lr, args.clip,
                                          args.seed)
        report = await grpo(sampler, trainer, args)
    print(f"{args.steps} steps in {report['wall_s']:.1f} s: rollout busy {report['rollout_s']:.1f} s, "
          f"training busy {report['train_s']:.1f} s, overlap {report['overlap']:.2f} of wall time; "
          f"mean staleness {report['mean_staleness']:.2f} versions; weight versions synced {report['synced_versions']}")
    return report


def main(argv: Optional[list[str]] = None) -> dict:
    return asyncio.run(amain(argv))


if __name__ == '__main__':  # the vLLM engine spawns processes: keep the entry point guarded
    main(sys.argv[1:])
