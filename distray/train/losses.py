"""Training losses: SFT cross-entropy and logit distillation on the teacher's top-k logprobs.

    pytest tests/unit/test_losses.py

Every function takes *pre-shifted* targets: position `t` of `labels`, `topk_ids` and
`topk_logprobs` describes the token the model should predict from position `t` (the input token
at `t + 1`), so `logits[:, t]` is scored against them directly. `labels == -100` marks positions
without loss (prompt, padding). Teacher top-k entries that are missing (a row with fewer than k
alternatives, or a position the teacher never scored) carry `MISSING_LOGPROB` (-1e30); -inf or
NaN count as missing too. Missing entries are masked before any arithmetic, and padding is finite,
because -inf − (−inf) = NaN in a backward pass reaches every logit even where a forward `where`
hides it.

The teacher distribution at temperature T is the top-k logprobs divided by T and renormalised over
the k entries; with k = vocabulary this is exactly `softmax(teacher_logits / T)`.

- `kd` (forward KL, KL(p_teacher ‖ q_student)): Σ_k p_k (log p_k − log q_k), with the student's
  log q taken over the *whole* vocabulary, so the loss also pushes student mass into the teacher's
  top-k set (the usual sparse-KD form of DistillKit / TRL).
- `reverse_kl` (KL(q ‖ p)) and `jsd` (β = 0.5) need the student's mass on the teacher's support,
  so they use the student renormalised over the k entries.

All logit losses are multiplied by T² (Hinton et al.) so gradient scale does not shrink with T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "IGNORE_INDEX",
    "MISSING_LOGPROB",
    "LossParts",
    "sft_loss_sum",
    "student_topk_logprobs",
    "teacher_topk_logprobs",
    "topk_present",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "logit_loss_per_position",
    "compute_loss",
]

IGNORE_INDEX = -100
#: Logprob of a missing teacher top-k entry: finite, so masked entries never make NaN gradients.
MISSING_LOGPROB = -1e30
_LOG2 = math.log(2.0)


def topk_present(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """True where a teacher top-k entry is real (not padding, -inf or NaN)."""
    return topk_logprobs > MISSING_LOGPROB / 2


@dataclass
class LossParts:
    """One micro-batch's loss and its pieces.

    `loss` is what is back-propagated (a mean over response tokens). The `*_sum` and `*_count`
    fields let validation average exactly over tokens across batches and workers.
    """

    loss: torch.Tensor
    sft_sum: torch.Tensor
    sft_count: torch.Tensor
    logit_sum: torch.Tensor
    logit_count: torch.Tensor


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over positions with a label, and how many there are.

    Args:
        logits: (B, L, V) student logits.
        labels: (B, L) pre-shifted target ids, -100 where there is no loss.

    Returns:
        `(sum of -log q(label), number of labelled positions)`.
    """
    mask = labels != IGNORE_INDEX
    n = mask.sum()
    if not bool(n):
        # Keep the graph connected (DeepSpeed backward needs a tensor that requires grad).
        return logits.sum() * 0.0, n
    picked = logits[mask].float()
    ce = torch.nn.functional.cross_entropy(picked, labels[mask], reduction="sum")
    return ce, n


def student_topk_logprobs(
    logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log softmax(logits / T) over the full vocabulary, read at the teacher's top-k ids.

    Computed as gathered logits minus one logsumexp, so no second (N, V) tensor is built.

    Args:
        logits: (N, V).
        topk_ids: (N, k); padded entries may hold any valid id (they are masked later).
        temperature: T.

    Returns:
        (N, k) student log-probabilities.
    """
    scaled = logits.float() / temperature
    return scaled.gather(-1, topk_ids.long()) - torch.logsumexp(scaled, dim=-1, keepdim=True)


def teacher_topk_logprobs(topk_logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's top-k distribution at temperature T, renormalised over the k entries.

    Missing entries come out at `MISSING_LOGPROB` (probability 0); everything stays finite.
    """
    present = topk_present(topk_logprobs)
    scaled = (topk_logprobs.float() / temperature).masked_fill(~present, MISSING_LOGPROB)
    return (scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)).masked_fill(~present, MISSING_LOGPROB)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the `present` entries of the last dim.

    Absent entries are replaced by 0 *before* the arithmetic, so neither the value nor the
    gradient ever sees (−inf) − (−inf).
    """
    log_p = log_p.masked_fill(~present, 0.0)
    log_q = log_q.masked_fill(~present, 0.0)
    p = log_p.exp().masked_fill(~present, 0.0)
    return (p * (log_p - log_q)).sum(-1)


def forward_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(p_teacher ‖ q_student) per position, student over the full vocabulary (not × T²).

    Args:
        logits: (N, V) student logits at positions that have teacher top-k.
        topk_ids: (N, k) teacher token ids.
        topk_logprobs: (N, k) teacher logprobs (T = 1), `MISSING_LOGPROB` where missing.
        temperature: T.

    Returns:
        (N,) KL per position.
    """
    log_p = teacher_topk_logprobs(topk_logprobs, temperature)
    log_q = student_topk_logprobs(logits, topk_ids, temperature)
    return _kl_terms(log_p, log_q, topk_present(topk_logprobs))


def _student_on_support(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Student log-probabilities renormalised over the teacher's present top-k entries."""
    gathered = logits.float().gather(-1, topk_ids.long()) / temperature
    gathered = gathered.masked_fill(~topk_present(topk_logprobs), MISSING_LOGPROB)
    return gathered - torch.logsumexp(gathered, dim=-1, keepdim=True)


def reverse_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(q_student ‖ p_teacher) per position on the teacher's top-k support (not × T²)."""
    log_p = teacher_topk_logprobs(topk_logprobs, temperature)
    log_q = _student_on_support(logits, topk_ids, topk_logprobs, temperature)
    return _kl_terms(log_q, log_p, topk_present(topk_logprobs))


def jsd(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Jensen-Shannon divergence (β = 0.5) per position on the teacher's top-k support."""
    present = topk_present(topk_logprobs)
    log_p = teacher_topk_logprobs(topk_logprobs, temperature)
    log_q = _student_on_support(logits, topk_ids, topk_logprobs, temperature)
    # Finite inputs only: logaddexp(−inf, −inf) has a NaN gradient.
    log_m = torch.logaddexp(log_p, log_q) - _LOG2
    return 0.5 * _kl_terms(log_p, log_m, present) + 0.5 * _kl_terms(log_q, log_m, present)


_LOGIT_LOSSES = {"kd": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def logit_loss_per_position(
    kind: str,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """`kd` / `reverse_kl` / `jsd` per position, × T².

    Raises:
        ValueError: unknown kind.
    """
    try:
        fn = _LOGIT_LOSSES[kind]
    except KeyError as e:
        raise ValueError(f"logit loss `{kind}` is not one of {sorted(_LOGIT_LOSSES)}") from e
    return fn(logits, topk_ids, topk_logprobs, temperature) * temperature**2


def compute_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "sft",
    alpha: float = 0.5,
    temperature: float = 1.0,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
) -> LossParts:
    """The training loss of one micro-batch: `sft`, or `alpha·logit + (1 − alpha)·sft`.

    The logit part averages over positions that have a label *and* at least one present teacher
    logprob; the SFT part over positions with a label.

    Args:
        logits: (B, L, V) student logits.
        labels: (B, L) pre-shifted target ids.
        loss: `sft`, `kd`, `reverse_kl` or `jsd`.
        alpha: weight of the logit loss.
        temperature: distillation temperature T.
        topk_ids: (B, L, k) teacher top-k ids, needed for logit losses.
        topk_logprobs: (B, L, k) teacher top-k logprobs, `MISSING_LOGPROB` (or -inf) where missing.

    Returns:
        The loss and its token-summed pieces.

    Raises:
        ValueError: a logit loss without top-k tensors.
    """
    sft_sum, sft_n = sft_loss_sum(logits, labels)
    sft_mean = sft_sum / sft_n.clamp(min=1)
    zero = sft_sum.new_zeros(())
    if loss == "sft":
        return LossParts(sft_mean, sft_sum.detach(), sft_n, zero, sft_n.new_zeros(()))
    if topk_ids is None or topk_logprobs is None:
        raise ValueError(f"train.loss `{loss}` needs the teacher's top-k ids and logprobs")
    mask = (labels != IGNORE_INDEX) & topk_present(topk_logprobs).any(-1)
    n = mask.sum()
    if bool(n):
        per_pos = logit_loss_per_position(
            loss, logits[mask], topk_ids[mask], topk_logprobs[mask], temperature
        )
        logit_sum = per_pos.sum()
    else:
        logit_sum = logits.sum() * 0.0
    logit_mean = logit_sum / n.clamp(min=1)
    total = alpha * logit_mean + (1.0 - alpha) * sft_mean
    return LossParts(total, sft_sum.detach(), sft_n, logit_sum.detach(), n)
