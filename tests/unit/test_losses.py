"""Distillation losses against references: torch's kl_div on full distributions, temperature, masking.

    .venv/bin/python -m pytest tests/unit/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distray.train.losses import (
    IGNORE_INDEX,
    MISSING_LOGPROB,
    compute_loss,
    forward_kl,
    jsd,
    logit_loss_per_position,
    reverse_kl,
    sft_loss_sum,
)

V = 11


def _full_topk(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with k = vocabulary, in a shuffled order (order must not matter)."""
    n = teacher_logits.shape[0]
    perm = torch.stack([torch.randperm(V) for _ in range(n)])
    logprobs = torch.log_softmax(teacher_logits, -1).gather(-1, perm)
    return perm, logprobs


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, V, generator=g) * 2, torch.randn(7, V, generator=g) * 2


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_forward_kl_equals_kl_div_when_k_is_vocab(logits, T):
    student, teacher = logits
    ids, lps = _full_topk(teacher)
    ours = logit_loss_per_position("kd", student, ids, lps, T).mean()
    ref = (
        F.kl_div(
            F.log_softmax(student / T, -1),
            F.log_softmax(teacher / T, -1),
            log_target=True,
            reduction="batchmean",
        )
        * T**2
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_reverse_kl_and_jsd_match_full_distributions(logits):
    student, teacher = logits
    ids, lps = _full_topk(teacher)
    T = 1.5
    log_p = F.log_softmax(teacher / T, -1)
    log_q = F.log_softmax(student / T, -1)
    rkl_ref = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(reverse_kl(student, ids, lps, T), rkl_ref, rtol=1e-5, atol=1e-6)
    m = 0.5 * (log_p.exp() + log_q.exp())
    jsd_ref = 0.5 * (log_p.exp() * (log_p - m.log())).sum(-1) + 0.5 * (
        log_q.exp() * (log_q - m.log())
    ).sum(-1)
    torch.testing.assert_close(jsd(student, ids, lps, T), jsd_ref, rtol=1e-5, atol=1e-6)
    assert (jsd(student, ids, lps, T) <= math.log(2) + 1e-6).all()


def test_identical_student_and_teacher_give_zero(logits):
    _, teacher = logits
    ids, lps = _full_topk(teacher)
    for kind in ("kd", "reverse_kl", "jsd"):
        loss = logit_loss_per_position(kind, teacher.clone(), ids, lps, 2.0)
        assert loss.abs().max() < 1e-5, kind


def test_topk_subset_is_finite_nonnegative_and_ignores_missing_entries(logits):
    student, teacher = logits
    k = 3
    lps, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    ref = forward_kl(student, ids, lps, 1.0)
    # A 4th column of missing entries (-inf, id 0) changes nothing.
    ids4 = torch.cat([ids, torch.zeros(len(ids), 1, dtype=ids.dtype)], -1)
    lps4 = torch.cat([lps, torch.full((len(ids), 1), float("-inf"))], -1)
    for fn in (forward_kl, reverse_kl, jsd):
        a, b = fn(student, ids, lps, 1.0), fn(student, ids4, lps4, 1.0)
        assert torch.isfinite(b).all()
        assert (b >= -1e-6).all()
        torch.testing.assert_close(a, b)
    assert (ref > 0).all()


def test_temperature_softens_the_teacher():
    # A confident teacher: at high T its target is flatter, so a uniform student is closer.
    teacher = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    student = torch.zeros(1, 4)
    ids = torch.arange(4).unsqueeze(0)
    lps = torch.log_softmax(teacher, -1)
    kl_t1 = forward_kl(student, ids, lps, 1.0)
    kl_t4 = forward_kl(student, ids, lps, 4.0)
    assert kl_t4 < kl_t1
    # The T² factor is applied by logit_loss_per_position.
    torch.testing.assert_close(logit_loss_per_position("kd", student, ids, lps, 4.0), kl_t4 * 16)


def test_gradient_moves_student_toward_teacher(logits):
    student, teacher = logits
    ids, lps = _full_topk(teacher)
    s = student.clone().requires_grad_(True)
    before = logit_loss_per_position("kd", s, ids, lps, 1.0).mean()
    before.backward()
    with torch.no_grad():
        after = logit_loss_per_position("kd", s - 0.5 * s.grad, ids, lps, 1.0).mean()
    assert after < before


def _batch(B: int = 2, L: int = 6, k: int = V):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, L, V, generator=g)
    teacher = torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :2] = IGNORE_INDEX  # prompt
    labels[1, 4:] = IGNORE_INDEX  # padding
    lps, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    return logits, labels, ids, lps


def test_sft_loss_matches_cross_entropy_on_labelled_positions():
    logits, labels, _, _ = _batch()
    s, n = sft_loss_sum(logits, labels)
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert int(n) == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(s / n, ref)


def test_masked_positions_do_not_affect_loss():
    logits, labels, ids, lps = _batch()
    base = compute_loss(logits, labels, loss="kd", alpha=0.5, topk_ids=ids, topk_logprobs=lps)
    noisy = logits.clone()
    noisy[labels == IGNORE_INDEX] = torch.randn_like(noisy[labels == IGNORE_INDEX]) * 100
    other = compute_loss(noisy, labels, loss="kd", alpha=0.5, topk_ids=ids, topk_logprobs=lps)
    torch.testing.assert_close(base.loss, other.loss)
    # Positions without teacher logprobs drop out of the logit part only.
    lps2 = lps.clone()
    lps2[0, 3] = float("-inf")
    part = compute_loss(logits, labels, loss="kd", alpha=1.0, topk_ids=ids, topk_logprobs=lps2)
    assert int(part.logit_count) == int(base.logit_count) - 1


def test_mix_is_alpha_weighted():
    logits, labels, ids, lps = _batch()
    sft = compute_loss(logits, labels, loss="sft")
    kd = compute_loss(logits, labels, loss="kd", alpha=1.0, topk_ids=ids, topk_logprobs=lps)
    mix = compute_loss(logits, labels, loss="kd", alpha=0.3, topk_ids=ids, topk_logprobs=lps)
    torch.testing.assert_close(mix.loss, 0.3 * kd.loss + 0.7 * sft.loss)


def test_logit_loss_without_topk_fails_and_empty_batch_is_zero_with_grad():
    logits, labels, _, _ = _batch()
    with pytest.raises(ValueError, match="top-k"):
        compute_loss(logits, labels, loss="kd")
    x = logits.clone().requires_grad_(True)
    out = compute_loss(x, torch.full_like(labels, IGNORE_INDEX), loss="sft")
    assert float(out.loss) == 0.0
    out.loss.backward()  # still part of the graph


@pytest.mark.parametrize("pad", [MISSING_LOGPROB, float("-inf")])
@pytest.mark.parametrize("kind", ["kd", "reverse_kl", "jsd"])
def test_mixed_k_batch_has_finite_gradients_and_the_unpadded_loss(kind, pad):
    # Two rows of one batch with k = 4 and k = 2: the collator pads the second row's top-k.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, V, generator=g)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[:, 0] = IGNORE_INDEX
    lps, ids = torch.log_softmax(torch.randn(2, 5, V, generator=g), -1).topk(4, -1)
    lps = lps.clone()
    lps[1, :, 2:] = pad
    ids[1, :, 2:] = 0

    x = logits.clone().requires_grad_(True)
    padded = compute_loss(x, labels, loss=kind, alpha=1.0, temperature=2.0, topk_ids=ids, topk_logprobs=lps)
    padded.loss.backward()
    assert torch.isfinite(padded.loss) and torch.isfinite(x.grad).all(), kind

    # The same rows one at a time, each with only its own k entries.
    logit_sum = 0.0
    grads = []
    for row, k in ((0, 4), (1, 2)):
        xr = logits[row : row + 1].clone().requires_grad_(True)
        part = compute_loss(
            xr, labels[row : row + 1], loss=kind, alpha=1.0, temperature=2.0,
            topk_ids=ids[row : row + 1, :, :k], topk_logprobs=lps[row : row + 1, :, :k],
        )
        # alpha = 1: loss = logit_sum / count, so this is the row's share of the batch loss.
        (part.loss * part.logit_count / padded.logit_count).backward()
        logit_sum = logit_sum + part.logit_sum
        grads.append(xr.grad)
    torch.testing.assert_close(padded.logit_sum, logit_sum)
    torch.testing.assert_close(x.grad, torch.cat(grads), rtol=1e-5, atol=1e-6)
