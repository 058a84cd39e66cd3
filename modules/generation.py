"""Autoregressive decoding with the KV cache (greedy, temperature, top-k, top-p): one sequence
(:func:`generate_until`) or a group of completions of one prompt (:func:`generate_group`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunelab.modules.transformer import TransformerDecoder


def filtered_probs(
    logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Sampling probabilities [..., vocab] from ``logits`` [..., vocab]: divided by
    ``temperature`` (> 0), softmaxed, then restricted to the ``top_k`` most likely tokens and to
    the smallest most-likely set reaching ``top_p`` (renormalised)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token if the tokens ranked above it already reach top_p (the top one stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token id from ``logits`` [vocab].

    Args:
        logits: scores of the next token.
        temperature: 0 = greedy (argmax); otherwise logits are divided by it before softmax.
        top_k: keep only the k most likely tokens.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
        generator: RNG for sampling; it may live on any device (probabilities are moved to it).
    """
    if temperature <= 0.0:
        return int(logits.argmax())
    probs = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Generated:
    """What :func:`generate_until` produced and why it stopped.

    Attributes:
        ids: the generated ids (prompt and stop id excluded).
        reason: ``"stop_token"`` (``stop_id`` was drawn), ``"stop_when"`` (the caller's test
            held: a stop string, say) or ``"max_new_tokens"``.
        stop_id: the stop token drawn, for ``"stop_token"``.
    """

    ids: list[int]
    reason: str
    stop_id: int | None = None


def generate(model: TransformerDecoder, prompt_ids: list[int], **kwargs) -> list[int]:
    """The generated ids of :func:`generate_until` (same arguments), without the stop reason."""
    return generate_until(model, prompt_ids, **kwargs).ids


@torch.no_grad()
def generate_until(
    model: TransformerDecoder,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens=(),
    stop_when: Callable[[list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
) -> Generated:
    """Generate up to ``max_new_tokens`` ids after ``prompt_ids`` (batch of one).

    The prompt is prefilled in one forward, then one token per step through the KV cache.
    The model is put in eval mode for the call (LoRA dropout off) and restored afterwards;
    caches the call sets up are torn down again.

    Args:
        model: a ``TransformerDecoder`` (with or without LoRA).
        prompt_ids: the prompt's token ids (non-empty).
        max_new_tokens: most ids to generate.
        temperature: 0 = greedy; see ``sample_next_token`` for the sampling options.
        top_k: top-k filter when sampling.
        top_p: nucleus filter when sampling.
        stop_tokens: ids that end generation; the stop id is not returned.
        stop_when: called with the ids so far after each new id; True ends generation there
            (the id that made it true is kept).
        generator: RNG for sampling (reproducible outputs).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: generation needs at least one token (e.g. BOS)")
    if max_new_tokens <= 0:
        return Generated([], "max_new_tokens")
    stop = set(int(t) for t in stop_tokens)
    device = model.tok_embeddings.weight.device
    total = len(prompt_ids) + max_new_tokens

    own_caches = not model.caches_are_enabled() or model.causal_mask.shape[0] < total
    if own_caches:
        model.setup_caches(1, total, device=device)
    else:
        model.reset_caches()
    was_training = model.training
    model.eval()
    out: list[int] = []
    result = Generated(out, "max_new_tokens")
    try:
        tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, p)
        input_pos = torch.arange(len(prompt_ids), device=device)
        for _ in range(max_new_tokens):
            # Only the last position's logits are needed: skip the [p, vocab] prompt logits.
            hidden = model(tokens, input_pos=input_pos, return_hidden=True)[:, -1:]  # (1, 1, dim)
            logits = model.logits_from_hidden(hidden)[0, 0]  # (vocab,)
            next_id = sample_next_token(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            if next_id in stop:
                result = Generated(out, "stop_token", next_id)
                break
            out.append(next_id)
            if stop_when is not None and stop_when(out):
                result = Generated(out, "stop_when")
                break
            tokens = torch.tensor([[next_id]], dtype=torch.long, device=device)  # (1, 1)
            input_pos = input_pos[-1:] + 1
    finally:
        model.train(was_training)
        if own_caches:
            model.teardown_caches()
    return result


@torch.no_grad()
def generate_group(
    model: TransformerDecoder,
    prompt_ids: list[int],
    num_generations: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens=(),
    generator: torch.Generator | None = None,
    all_finished: Callable[[bool], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_generations`` completions of one prompt, decoded together (GRPO's group).

    The rows share the prompt, so they need no padding: the prompt is prefilled once for the
    whole group (a batch of identical rows) and then every row decodes one token per step
    through a KV cache sized for the group (``num_generations`` x prompt + ``max_new_tokens``).
    A row that draws a stop id keeps it as its last token (it is part of what is trained: the
    model learns to stop) and is padded after it; decoding ends when every row has stopped.

    Args:
        model: a ``TransformerDecoder`` (LoRA adapters live: no second copy of the weights).
        prompt_ids: the prompt's token ids (non-empty).
        num_generations: completions (rows) to draw.
        max_new_tokens: the longest completion (``max_completion_len``).
        temperature, top_k, top_p: as :func:`sample_next_token` (0 = greedy).
        stop_tokens: ids that end a completion.
        generator: RNG for sampling (reproducible rollouts).
        all_finished: given whether this group has finished, whether decoding may stop; a
            sharded model (FSDP) passes one that asks every rank, since each decode step is a
            collective all ranks must take together. Default: stop when this group is done.

    Returns:
        ``(completions [G, L] int64, lengths [G])``: L <= ``max_new_tokens``, each row's ids up
        to and including its stop id, then padding (the row's last id repeated; use ``lengths``).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: generation needs at least one token (e.g. BOS)")
    g, device = num_generations, model.tok_embeddings.weight.device
    stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)) or [-1], device=device)
    model.setup_caches(g, len(prompt_ids) + max_new_tokens, device=device)
    was_training = model.training
    model.eval()
    out = torch.zeros(g, max_new_tokens, dtype=torch.long, device=device)
    lengths = torch.full((g,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(g, dtype=torch.bool, device=device)
    try:
        tokens = torch.tensor([prompt_ids] * g, dtype=torch.long, device=device)  # (G, p)
        input_pos = torch.arange(len(prompt_ids), device=device)
        for t in range(max_new_tokens):
            hidden = model(tokens, input_pos=input_pos, return_hidden=True)[:, -1]  # (G, dim)
            logits = model.logits_from_hidden(hidden)  # (G, vocab)
            if temperature <= 0.0:
                next_ids = logits.argmax(-1)
            else:
                probs = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                if generator is not None:
                    probs = probs.to(generator.device)
                next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
            next_ids = torch.where(done, out[:, max(t - 1, 0)], next_ids)  # finished rows repeat their last id
            out[:, t] = next_ids
            stopped = ~done & torch.isin(next_ids, stop)
            lengths = torch.where(stopped, t + 1, lengths)
            done |= stopped
            finished = bool(done.all())
            if all_finished(finished) if all_finished is not None else finished:
                out = out[:, : t + 1]
                break
            tokens = next_ids[:, None]  # (G, 1)
            input_pos = input_pos[-1:] + 1
    finally:
        model.train(was_training)
        model.teardown_caches()
    return out, lengths
