"""Adaptive gating's curriculum (Li et al., EMNLP 2023): order training samples by routing.

For every training sample n, C_n = [r_1, ..., r_L] with r_l the share of the sample's
tokens that MoE layer l sends to two experts. The anchor a is the sample with the fewest
two-expert tokens (the smallest sum_l r_l; the first such sample on a tie). Samples are
ordered by cosine similarity to the anchor, most similar first:

    cos(C_n, C_a) = C_n . C_a / (|C_n| |C_a|)

and the order is recomputed with the current model at the start of every epoch.

The zero anchor. If the anchor sends no token to two experts in any layer, C_a = 0 and the
cosine is undefined (0 / 0). We then order by Euclidean distance to the anchor,
|C_n - C_a| = |C_n|, smallest first: every sample with no two-expert token comes first
(it routes exactly like the anchor), then the others by how little they use two experts.
This is the only case with a zero vector: when C_a != 0 every sample has sum_l r_l >= that
of the anchor > 0. Equal keys keep the samples' index order (similarities are rounded to
12 decimals first, so float noise cannot reorder parallel vectors).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimoe.analysis import RoutingRecorder
from minimoe.data import Batch


@torch.no_grad()
def two_expert_share(
    model: nn.Module,
    inputs: Tensor,
    valid: Tensor | None = None,
    batch_size: int = 512,
    input_name: str = "idx",
) -> Tensor:
    """(N, L) inputs -> (N, layers): per sample and MoE layer, the share of its tokens sent
    to more than one expert. ``valid`` (N, L) bool picks the tokens that count (e.g. not
    padding); a sample with no valid token gets share 0. The model runs in eval mode, in
    chunks of ``batch_size`` samples, and is put back in the mode it was in.
    """
    if inputs.dim() != 2:
        raise ValueError(f"inputs must have shape (samples, length), got {tuple(inputs.shape)}")
    if valid is not None and valid.shape != inputs.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} != inputs shape {tuple(inputs.shape)}")
    num, length = inputs.shape
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with RoutingRecorder(model) as rec:
        for chunk in inputs.split(batch_size):
            model(**{input_name: chunk.to(device)})
    model.train(was_training)
    two = torch.stack(
        [(rec.routing(layer).mask.sum(1) > 1).view(num, length) for layer in range(len(rec))], dim=1
    )  # (N, layers, L)
    valid = torch.ones_like(inputs, dtype=torch.bool) if valid is None else valid.bool()
    counted = (two & valid[:, None, :].cpu()).sum(2).float()  # (N, layers)
    return counted / valid.sum(1, keepdim=True).cpu().clamp_min(1).float()


def curriculum_order(shares: Tensor) -> Tensor:
    """(N, layers) two-expert shares -> (N,) sample indices, the anchor's likes first.

    Cosine similarity to the anchor (fewest two-expert tokens), descending; for a zero
    anchor, distance to it (|C_n|) ascending. See the module docstring.
    """
    if shares.dim() != 2 or shares.shape[0] == 0:
        raise ValueError(
            f"shares must have shape (samples >= 1, layers), got {tuple(shares.shape)}"
        )
    shares = shares.double()
    anchor = shares[shares.sum(1).argmin()]  # (layers,)
    if not anchor.any():
        return shares.norm(dim=1).argsort(stable=True)  # distance to the zero anchor
    similarity = F.cosine_similarity(shares, anchor[None], dim=1)  # (N,)
    similarity = similarity.clamp(max=1.0).round(decimals=12)  # parallel vectors tie at exactly 1
    return similarity.argsort(descending=True, stable=True)


class CurriculumSampler:
    """An epoch-ordered batch sampler for ``train(model, sampler, ...)``.

    Every call returns the next ``batch_size`` samples of the epoch's order as a batch
    ``{name: tensor[indices]}`` (the last batch of an epoch may be smaller; nothing is
    dropped, as dropping would always drop the hardest samples). At the start of each epoch
    the order is recomputed: by ``curriculum_order(two_expert_share(model, ...))`` when
    ``curriculum`` is True, else a random permutation from the trainer's generator (the
    control: same epochs, no ordering). ``ranking_seconds`` adds up the time spent ranking,
    the curriculum's overhead.
    """

    def __init__(
        self,
        model: nn.Module,
        samples: Batch,
        batch_size: int,
        curriculum: bool = True,
        valid: Tensor | None = None,
        input_name: str = "idx",
    ):
        sizes = {v.shape[0] for v in samples.values()}
        if input_name not in samples or len(sizes) != 1:
            raise ValueError(
                f"samples need {input_name!r} and one length for every tensor, got {sizes}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.samples, self.batch_size = model, samples, batch_size
        self.curriculum, self.valid, self.input_name = curriculum, valid, input_name
        self.num_samples = sizes.pop()
        self.order: Tensor | None = None
        self.position = 0
        self.epochs = 0
        self.ranking_seconds = 0.0
        self.mean_shares: list[list[float]] = []  # per epoch, per layer (curriculum only)

    def new_epoch(self, generator: torch.Generator) -> None:
        if self.curriculum:
            start = time.perf_counter()
            shares = two_expert_share(
                self.model, self.samples[self.input_name], self.valid, input_name=self.input_name
            )
            self.order = curriculum_order(shares)
            self.ranking_seconds += time.perf_counter() - start
            self.mean_shares.append(shares.mean(0).tolist())
        else:
            self.order = torch.randperm(self.num_samples, generator=generator)
        self.position = 0
        self.epochs += 1

    def __call__(self, generator: torch.Generator) -> Batch:
        if self.order is None or self.position >= self.num_samples:
            self.new_epoch(generator)
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {name: t[idx] for name, t in self.samples.items()}
