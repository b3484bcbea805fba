"""Synthetic data and the training step: pipeline forward/backward, gradient sums, optimizer step, global loss.

Who calls it: every rank calls ``train_step`` once per step, in step (it is collective over every group).

Loss scaling: rank ``r`` backpropagates ``sum(its token losses) / N`` with ``N`` the number of tokens in the
global batch, and gradients are then *summed* over DP (dense) or expert-DP (experts). That is Megatron's "average
of per-rank means" when the DP shares are equal, and stays exact when they are not (``split`` gives uneven
shares): the result is the gradient of the mean loss over the global batch, whatever the layout.
"""

from __future__ import annotations

import torch

from megatron_ref.comm import all_reduce_, all_reduce_many_, recv, send
from megatron_ref.config import ConfigError
from megatron_ref.model import GPTModel, is_expert
from megatron_ref.optimizer import DenseAdamW, FlatAdamW
from megatron_ref.parallel import rank_of, split_range


def batch(step: int, global_batch: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: ``(tokens, labels)``, each ``[global_batch, seq]`` int64.

    Depends only on its arguments, never on the layout. Each row is an arithmetic sequence modulo ``vocab`` with a
    random start and stride, with 10% of the tokens replaced by noise: learnable, so losses visibly fall.
    """
    g = torch.Generator().manual_seed((seed * 7919 + step * 104729 + 17) % (2**63))
    start = torch.randint(0, vocab, (global_batch, 1), generator=g)
    stride = torch.randint(1, max(2, vocab), (global_batch, 1), generator=g)
    data = (start + stride * torch.arange(seq + 1)) % vocab
    noise = torch.randint(0, vocab, data.shape, generator=g)
    data = torch.where(torch.rand(data.shape, generator=g) < 0.1, noise, data)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def local_share(t: torch.Tensor, dp: int, dp_rank: int) -> torch.Tensor:
    """DP rank ``dp_rank``'s contiguous rows of the global batch (``split`` over ``dp``)."""
    start, count = split_range(t.shape[0], dp, dp_rank)
    return t[start:start + count]


def forward_backward(model: GPTModel, tokens: torch.Tensor, labels: torch.Tensor, n_global: int) -> torch.Tensor:
    """One micro-batch through the pipeline and back; returns this rank's loss share (zero off the last stage).

    Activations go to the same tp/dp coordinates on the next stage, their gradients come back the same way.
    Forward: stage ``s`` receives from ``s-1``, runs, sends to ``s+1``. Backward runs in reverse. No cycles, so
    the blocking send/recv cannot deadlock.
    """
    ps, pc, c = model.ps, model.pc, model.ps.coords
    prev = rank_of(pc, c.tp, c.pp - 1, c.dp) if not ps.first_stage else None
    nxt = rank_of(pc, c.tp, c.pp + 1, c.dp) if not ps.last_stage else None
    shape = (tokens.shape[0], tokens.shape[1], model.mc.hidden)
    if ps.first_stage:
        inp = None
        x = model.embed(tokens)
    else:
        inp = recv(shape, prev).requires_grad_()
        x = inp
    y = model(x)
    if ps.last_stage:
        loss = model.token_losses(y, labels).sum() / n_global
        loss.backward()
        out = loss.detach()
    else:
        send(y.detach(), nxt)
        torch.autograd.backward(y, recv(shape, nxt))
        out = torch.zeros(())
    if inp is not None:
        send(inp.grad, prev)
    return out


def sync_grads(model: GPTModel) -> None:
    """Make every gradient the gradient of the global mean loss (collective over tp, embedding, dp, expert-dp)."""
    ps = model.ps
    for attention in model.attention_layers():
        attention.sync_replica_grads()
    if model.shares_embedding:
        all_reduce_(model.tied_weight().grad, ps, "embedding")
    named = list(model.named_parameters())
    all_reduce_many_([p.grad for n, p in named if not is_expert(n)], ps, "dp")
    all_reduce_many_([p.grad for n, p in named if is_expert(n)], ps, "edp")


def train_step(model: GPTModel, optimizer: DenseAdamW | FlatAdamW, global_batch: int,
               step: int | None = None) -> float:
    """One training step on every rank; returns the global mean loss (the same float on every rank).

    ``step`` picks the batch (default: ``optimizer.iteration``, so a resumed run continues the data stream);
    ``optimizer.iteration`` is incremented.
    """
    mc, pc, ps = model.mc, model.pc, model.ps
    if global_batch < pc.dp:
        raise ConfigError(f"train_step: global_batch={global_batch} < dp={pc.dp}: a DP rank would get no data")
    step = optimizer.iteration if step is None else step
    tokens, labels = batch(step, global_batch, mc.seq, mc.vocab, mc.seed)
    tokens, labels = local_share(tokens, pc.dp, ps.coords.dp), local_share(labels, pc.dp, ps.coords.dp)
    # Gradients exist (as zeros) for every parameter: AdamW skips parameters without one, which would let their
    # ``step`` counters drift apart.
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()
    loss = forward_backward(model, tokens, labels, global_batch * mc.seq)
    sync_grads(model)
    optimizer.step()
    optimizer.iteration += 1
    all_reduce_(loss, ps, "dp")
    all_reduce_(loss, ps, "pp")  # only the last stage holds a non-zero share
    return float(loss.item())
