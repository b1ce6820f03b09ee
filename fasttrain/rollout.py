"""RL's data: a rollout source that plays the loader's part for the one training loop.

Per optimizer step (rows_per_step = --batch-tokens / --seq-len sampled answers over all ranks):

    prompts   the next rows_per_step / G problems of the epoch's seeded order; rank r of W takes
              the r-th W-th of them (G = --samples-per-prompt)
    sample    G answers per prompt on the generation engine (KV cache), from the model being trained
    reward    1 if the task's checker accepts the answer, else 0 (fasttrain.evals.is_correct)
    advantage A_i = (r_i - mean(r)) / (std(r) + eps) within each prompt's group of G; a group whose
              answers all score alike gets A = 0: it says nothing about which answer is better
    batch     one row per answer: prompt + answer (+ <|assistant_end|> when it stopped), the
              answer's tokens scored with weight A_i, the prompt and padding not at all

The loop's loss is then sum_i A_i * (-log p(answer_i tokens)) / (global count of scored tokens):
REINFORCE with group-relative advantages (GRPO without its ratio clipping and KL term, as in
nanochat's chat RL): on-policy, one update per batch of samples, no value network.

Exact resume: the cursor (epoch, position in the epoch) is the only state. Each prompt's group is
sampled from a generator seeded by (seed, epoch, position), so the same weights and cursor give
the same samples on any number of ranks.

Under FSDP every forward is a collective: every rank samples the same number of groups, one after
the other, and the ranks agree on when each group's generation ends (Engine.generate's agree_done).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fasttrain.data.batch import IGNORE_INDEX, Batch
from fasttrain.data.loader import epoch_order
from fasttrain.engine import Engine
from fasttrain.errors import ConfigError
from fasttrain.evals import is_correct
from fasttrain.parallel import DistInfo, all_reduce_max, all_reduce_sum


@dataclass
class Problem:
    """A prompt with a checkable answer."""
    prompt: list[int]  # token ids: the rendered chat up to and including <|assistant_start|>
    reference: str  # the reference answer the checker compares with
    kind: str  # how it is checked: "text" (normalised match) or "number" (GSM8K's final number)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards (P, G): G samples per prompt -> advantages (P, G), each group's rewards minus their
    mean, over their standard deviation (population, so it is defined for G >= 2). A group whose
    rewards are all equal gets exactly 0."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def rollout_rows(samples: list[tuple[list[int], list[int], float]], pad_id: int) -> Batch:
    """One micro-batch from samples (prompt ids, answer ids, advantage): row b holds prompt +
    answer (the answer ends with the stop token when it stopped), the targets predicting the
    answer's tokens scored with weight = advantage; padded with pad_id to the longest row, padding
    unscored and a segment of its own."""
    seqs = [prompt + answer for prompt, answer, _ in samples]
    T = max(len(s) for s in seqs) - 1  # a row of T inputs holds T + 1 tokens
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(B, T)
    seg_lens = []
    for b, ((prompt, _, advantage), seq) in enumerate(zip(samples, seqs)):
        n = len(seq) - 1
        input_ids[b, :n] = torch.tensor(seq[:-1])
        first = len(prompt) - 1  # the input position that predicts the answer's first token
        targets[b, first:n] = torch.tensor(seq[first + 1:])
        weights[b, first:n] = advantage
        seg_lens += [n, T - n] if n < T else [n]
    cu_seqlens = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(seg_lens).cumsum(0)
    return Batch(input_ids, targets, cu_seqlens, T, weights)


class RolloutSource:
    """The loader of the RL stage: next_step() samples, scores and returns this rank's
    micro-batches; state_dict()/load_state_dict() hold the prompt cursor. bind(model) must be
    called with the model being trained before the first step (the loop does it)."""

    def __init__(self, problems: list[Problem], tokenizer, rows_per_step: int, micro_batch_rows: int,
                 info: DistInfo, *, samples_per_prompt: int, seq_len: int, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0):
        G, W = samples_per_prompt, info.world_size
        if rows_per_step % (G * W):
            raise ConfigError(f"--batch-tokens / --seq-len = {rows_per_step} sampled answers per step must be a "
                              f"multiple of --samples-per-prompt ({G}) x ranks ({W})")
        if (rows_per_step // W) % micro_batch_rows:
            raise ConfigError(f"--micro-batch ({micro_batch_rows}) must divide the {rows_per_step // W} answers "
                              f"each rank trains on per step")
        if not problems:
            raise ConfigError("no prompts to sample from")
        too_long = next((i for i, p in enumerate(problems) if len(p.prompt) >= seq_len), None)
        if too_long is not None:
            raise ConfigError(f"prompt {too_long} is {len(problems[too_long].prompt)} tokens, which leaves no room "
                              f"for an answer in --seq-len {seq_len}; raise --seq-len")
        self.problems, self.tokenizer, self.info = problems, tokenizer, info
        self.prompts_per_step, self.group = rows_per_step // G, G
        self.micro_batch_rows, self.seq_len, self.max_new_tokens = micro_batch_rows, seq_len, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.stop_id = tokenizer.special_id("<|assistant_end|>")
        self.epoch, self.position = 0, 0  # the cursor: the next prompt of the epoch's order
        self.last_stats: dict = {}
        self.model = None
        self._order: tuple[int, np.ndarray] | None = None

    def bind(self, model):
        self.model = model

    # --- the prompt stream ---------------------------------------------------------------------
    def _order_of(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, len(self.problems)))
        return self._order[1]

    def step_prompts(self) -> list[tuple[int, int, int]]:
        """(epoch, position, problem index) of every prompt of the next step, all ranks', in order;
        does not move the cursor."""
        out, epoch, position = [], self.epoch, self.position
        for _ in range(self.prompts_per_step):
            if position == len(self.problems):
                epoch, position = epoch + 1, 0
            out.append((epoch, position, int(self._order_of(epoch)[position])))
            position += 1
        return out

    # --- one step --------------------------------------------------------------------------------
    def _agree_done(self, done: bool) -> bool:
        if self.info.world_size == 1:
            return done
        still_running = torch.tensor(0 if done else 1, device=self.info.device)
        return int(all_reduce_max(still_running)) == 0

    @torch.no_grad()
    def _sample_group(self, problem: Problem, epoch: int, position: int) -> list[tuple[list[int], bool]]:
        """G answers to one prompt: (tokens, stopped), from a generator seeded by the prompt's
        place in the stream, so the samples do not depend on the rank that draws them."""
        seed = int(np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0])
        generator = torch.Generator(device=self.info.device).manual_seed(seed)
        max_new = min(self.max_new_tokens, self.seq_len - len(problem.prompt))
        answers = Engine(self.model).generate([problem.prompt] * self.group, max_new, temperature=self.temperature,
                                              top_k=self.top_k, stop_ids=(self.stop_id,), generator=generator,
                                              agree_done=self._agree_done)
        # an answer shorter than max_new ended at the stop token (the only other end, a full
        # context, comes later: prompt + max_new <= seq_len <= the model's max_seq_len)
        return [(a, len(a) < max_new) for a in answers]

    def next_step(self) -> list[Batch]:
        if self.model is None:
            raise RuntimeError("RolloutSource.bind(model) was not called before the first step")
        t0 = time.perf_counter()
        mine = self.step_prompts()
        per_rank = len(mine) // self.info.world_size
        mine = mine[self.info.rank * per_rank:(self.info.rank + 1) * per_rank]
        rewards, samples = [], []
        for epoch, position, index in mine:
            problem = self.problems[index]
            group = self._sample_group(problem, epoch, position)
            replies = [self.tokenizer.decode(answer).strip() for answer, _ in group]
            rewards.append([float(is_correct(problem.kind, r, problem.reference)) for r in replies])
            samples += [(problem.prompt, answer + [self.stop_id] * stopped) for answer, stopped in group]
        sample_s = time.perf_counter() - t0
        rewards = torch.tensor(rewards)  # (prompts on this rank, G)
        advantages = group_advantages(rewards).flatten().tolist()
        rows = [(p, a, adv) for (p, a), adv in zip(samples, advantages)]
        batches = [rollout_rows(rows[i:i + self.micro_batch_rows], self.tokenizer.bos_id)
                   for i in range(0, len(rows), self.micro_batch_rows)]

        # the step's figures over all ranks (one all-reduce): rewards, solved prompts, lengths
        totals = torch.tensor([rewards.sum().item(), rewards.numel(), (rewards.amax(dim=1) > 0).sum().item(),
                               rewards.size(0), sum(len(a) for _, a in samples),
                               (rewards.std(dim=1) == 0).sum().item(), sum(b.input_ids.numel() for b in batches)],
                              dtype=torch.float64, device=self.info.device)
        reward_sum, n, solved, prompts, answer_tokens, flat, train_tokens = all_reduce_sum(totals).tolist()
        # rewards are 0/1, so the mean reward is the pass@1 of the step's prompts
        self.last_stats = {"wait_s": time.perf_counter() - t0, "train_tokens": train_tokens,
                           "metrics": {"reward": reward_sum / n, "pass@1": reward_sum / n,
                                       f"pass@{self.group}": solved / prompts, "answer_tokens": answer_tokens / n,
                                       "zero_advantage_groups": flat / prompts,
                                       "sample_tokens_per_s": answer_tokens / sample_s}}
        last = self.step_prompts()[-1]
        self.epoch, self.position = last[0], last[1] + 1
        return batches

    # --- the loader interface ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = state["epoch"], state["position"]

    def close(self):
        pass
