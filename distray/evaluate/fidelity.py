"""White-box fidelity to the teacher: how closely each model follows the teacher's own answers.

    distray evaluate --config jobs/configs/quickstart.yaml     # on by default (evaluate.fidelity)
    python -m distray.evaluate.fidelity TEACHER_DIR MODEL_DIR [MODEL_DIR ...] --prompt "..."

These are what distillation papers report when the test set has no labels. The teacher's
greedy answers on the test prompts are the targets; each model is scored on them:

| figure | definition | per row |
|---|---|---|
| teacher_nll | Σ −log p_model(teacher token │ prompt, teacher's earlier tokens) / Σ tokens, in nats per token (lower is closer) | the row's mean |
| token_agreement | 100 · share of those positions where the model's top-1 token is the teacher's | the row's share |
| rouge_l_vs_teacher | ROUGE-L F-measure × 100 of the model's greedy answer against the teacher's | F-measure |

teacher_nll and token_agreement are teacher-forced: one transformers forward pass of the model
over `prompt + teacher answer ids` (the ids the teacher generated, its closing eos included;
`distray.hf_engine.teacher_forced`), in a fresh Ray worker per model. The prompt is rendered
with the model's own tokenizer and chat template (`distray.prompts.render_prompt`), as it is
served. They need the teacher's token ids to mean the same to the model, so a model whose
vocabulary differs from the teacher's, or an API teacher (no local tokenizer or weights), is
skipped with a logged reason. The teacher's own figures are the reference point: its NLL of
its own greedy answers, and an agreement near 100 % (below it only where engines' numerics
differ on a near tie). rouge_l_vs_teacher compares text only, so it applies to every model
whenever the teacher answered.

Token-weighted means: a long answer counts for its length, as in perplexity.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distray import formats as F
from distray.evaluate.scorers import ScoreResult, score
from distray.hf_engine import ForcedScores

__all__ = [
    "FIDELITY_SCORERS",
    "FORCED_SCORERS",
    "FidelityResult",
    "fidelity_scorers",
    "vocab_mismatch",
    "summarize_forced",
    "forced_scores",
    "teacher_targets",
    "measure",
]

logger = logging.getLogger(__name__)

#: The fidelity scorers, in table order.
FIDELITY_SCORERS: tuple[str, ...] = ("teacher_nll", "token_agreement", "rouge_l_vs_teacher")
#: The ones that need the model's logits on the teacher's token ids.
FORCED_SCORERS: tuple[str, ...] = ("teacher_nll", "token_agreement")
#: Rows per teacher-forced forward pass.
BATCH_SIZE = 8


@dataclass
class FidelityResult:
    """The fidelity scorers' results of every model.

    Attributes:
        scores: role → scorer → result (absent where skipped).
        skipped: role → why the teacher-forced scorers were not run for it.
        scored_tokens: role → teacher answer tokens scored teacher-forced.
    """

    scores: dict[str, dict[str, ScoreResult]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    scored_tokens: dict[str, int] = field(default_factory=dict)


def fidelity_scorers(scorers: Sequence[str], auto: bool) -> list[str]:
    """The fidelity scorers to run: all of them when `auto` (evaluate.fidelity), else those
    named in `scorers`; in table order."""
    return [s for s in FIDELITY_SCORERS if auto or s in scorers]


def vocab_mismatch(tok: Any, teacher_tok: Any) -> str | None:
    """Why teacher token ids cannot be scored under `tok`; None when the vocabularies match.

    The same token → id map is what matters: special tokens and the chat template may differ.
    """
    a, b = tok.get_vocab(), teacher_tok.get_vocab()
    if a == b:
        return None
    if len(a) != len(b):
        return f"its vocabulary ({len(a)} tokens) differs from the teacher's ({len(b)})"
    differ = sum(1 for k, v in a.items() if b.get(k) != v)
    return f"its vocabulary maps {differ} of {len(a)} tokens to other ids than the teacher's"


def summarize_forced(forced: Sequence[ForcedScores | None]) -> dict[str, ScoreResult]:
    """teacher_nll and token_agreement of one model from its per-row teacher-forced scores.

    Args:
        forced: one entry per test row; None (or no tokens) where the row was not scored.

    Returns:
        `{"teacher_nll": ..., "token_agreement": ...}`: token-weighted means (nats per token;
        %), per-row means (nats; share 0-1), `n` = rows scored, and `extra` with the token count
        and the perplexity exp(teacher_nll).
    """
    nll_rows: list[float | None] = []
    agree_rows: list[float | None] = []
    nll_sum, agree_sum, tokens, n = 0.0, 0, 0, 0
    for f in forced:
        if f is None or not f.nll:
            nll_rows.append(None)
            agree_rows.append(None)
            continue
        k = len(f.nll)
        nll_rows.append(sum(f.nll) / k)
        agree_rows.append(sum(f.top1_match) / k)
        nll_sum += sum(f.nll)
        agree_sum += sum(f.top1_match)
        tokens += k
        n += 1
    nll = nll_sum / tokens if tokens else None
    agree = 100.0 * agree_sum / tokens if tokens else None
    extra: dict[str, float | None] = {
        "teacher_tokens_scored": float(tokens),
        "teacher_ppl": math.exp(nll) if nll is not None and nll < 700 else None,
    }
    return {
        "teacher_nll": ScoreResult(nll, n, nll_rows, extra),
        "token_agreement": ScoreResult(agree, n, agree_rows),
    }


def forced_scores(
    model_dir: str,
    messages: Sequence[list[dict[str, str]]],
    targets: Sequence[list[int] | None],
    *,
    use_chat_template: bool = True,
    trust_remote_code: bool = False,
    batch_size: int = BATCH_SIZE,
) -> list[ForcedScores | None]:
    """Load a model in this process and score the teacher's answer ids teacher-forced.

    Args:
        model_dir: a HF model folder (loaded with `HFEngine`, on the GPU when there is one).
        messages: the chat prompt of each row.
        targets: the teacher's answer ids of each row; None where the teacher did not answer.
        use_chat_template: render prompts with the model's chat template.
        trust_remote_code: allow model code from the folder.
        batch_size: rows per forward pass.

    Returns:
        One `ForcedScores` per row (None where the target was None).
    """
    from distray.hf_engine import HFEngine, teacher_forced
    from distray.prompts import render_prompt

    engine = HFEngine(model_dir, trust_remote_code=trust_remote_code)
    idx = [i for i, t in enumerate(targets) if t]
    prompts = [render_prompt(engine.tok, messages[i], use_chat_template)[1] for i in idx]
    scored = teacher_forced(
        engine.model, prompts, [list(targets[i] or []) for i in idx], pad_id=engine.pad_id,
        batch_size=batch_size,
    )
    out: list[ForcedScores | None] = [None] * len(targets)
    for i, s in zip(idx, scored, strict=True):
        out[i] = s
    return out


def teacher_targets(outs: Sequence[dict[str, Any] | None], tok: Any) -> list[list[int] | None]:
    """The teacher's answer ids per row: the ids it generated, or its text re-tokenized when the
    engine returned none; None where it did not answer."""
    targets: list[list[int] | None] = []
    for o in outs:
        if not o or o.get(F.RESPONSE) is None:
            targets.append(None)
            continue
        ids = o.get(F.RESPONSE_TOKEN_IDS)
        if ids is None or len(ids) == 0:
            ids = tok(o[F.RESPONSE], add_special_tokens=False)["input_ids"] if o[F.RESPONSE] else []
        targets.append([int(t) for t in ids] or None)
    return targets


def _forced_remote(jobs: dict[str, dict[str, Any]], num_gpus: float, env: dict[str, str]) -> dict[str, Any]:
    """`forced_scores` of every model, each in a fresh Ray worker, all submitted at once."""
    import ray

    @ray.remote(num_cpus=1, num_gpus=num_gpus, max_calls=1)
    def _score(kwargs: dict[str, Any]) -> list[ForcedScores | None]:
        return forced_scores(**kwargs)

    refs = {role: _score.options(runtime_env={"env_vars": env}).remote(kw) for role, kw in jobs.items()}
    return {role: ray.get(ref) for role, ref in refs.items()}


def measure(
    names: Sequence[str],
    models: Sequence[Any],
    outputs: dict[str, list[dict[str, Any] | None]],
    messages: Sequence[list[dict[str, str]]],
    *,
    num_gpus: float = 0.0,
    env: dict[str, str] | None = None,
) -> FidelityResult:
    """The fidelity scorers for every evaluated model against the teacher's answers.

    Args:
        names: the fidelity scorers to run (`fidelity_scorers`).
        models: evaluate's models (`role`, `engine`, `path`; path None for an API model).
        outputs: role → output row per test row (response, response_token_ids).
        messages: the chat prompt of each test row.
        num_gpus: GPUs per scoring worker.
        env: environment of the scoring workers.

    Returns:
        The scores per role and the reasons for what was skipped (also logged).
    """
    from distray.prompts import load_tokenizer

    res = FidelityResult()
    teacher = next((m for m in models if m.role == "teacher"), None)
    if not names:
        return res
    # Every model gets every figure, None where it does not apply (the teacher's ROUGE-L
    # against itself, a skipped model), so metrics.json has the same keys for all.
    n_rows = len(messages)
    for m in models:
        res.scores[m.role] = {k: ScoreResult(None, 0, [None] * n_rows) for k in names}
    if teacher is None or not any(o and o.get(F.RESPONSE) is not None for o in outputs.get("teacher", [])):
        for m in models:
            res.skipped[m.role] = "no teacher answers to compare with (teacher not in evaluate.models)"
        logger.info("evaluate: fidelity scorers skipped: no teacher answers")
        return res
    teacher_text = [o.get(F.RESPONSE) if o else None for o in outputs["teacher"]]
    if "rouge_l_vs_teacher" in names:
        for m in models:
            if m.role != "teacher":
                preds = [o.get(F.RESPONSE) if o else None for o in outputs[m.role]]
                r = score("rouge_l_vs_teacher", preds, teacher_text, teacher_preds=teacher_text)
                res.scores[m.role]["rouge_l_vs_teacher"] = r
    forced = [n for n in names if n in FORCED_SCORERS]
    if not forced:
        return res
    if teacher.path is None:
        for m in models:
            res.skipped[m.role] = (
                f"the teacher ({teacher.engine.model}) is an API model: no local tokenizer or "
                "weights to score its answer ids with"
            )
        logger.info("evaluate: %s skipped: %s", forced, res.skipped[teacher.role])
        return res
    trust = bool(getattr(teacher.engine, "trust_remote_code", False))
    teacher_tok = load_tokenizer(teacher.path, trust)
    targets = teacher_targets(outputs["teacher"], teacher_tok)
    jobs: dict[str, dict[str, Any]] = {}
    for m in models:
        if m.path is None:
            res.skipped[m.role] = "an API model: no weights to score the teacher's answers with"
            continue
        m_trust = bool(getattr(m.engine, "trust_remote_code", False))
        why = vocab_mismatch(load_tokenizer(m.path, m_trust), teacher_tok)
        if why:
            res.skipped[m.role] = why + "; the teacher's token ids mean nothing to it"
            continue
        jobs[m.role] = {
            "model_dir": m.path, "messages": list(messages), "targets": targets,
            "use_chat_template": bool(getattr(m.engine, "apply_chat_template", True)),
            "trust_remote_code": m_trust,
        }
    for role, why in res.skipped.items():
        logger.info("evaluate: %s skipped for %s: %s", "/".join(forced), role, why)
    if not jobs:
        return res
    env_vars = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    for role, per_row in _forced_remote(jobs, num_gpus, env_vars).items():
        summary = summarize_forced(per_row)
        res.scores[role].update({k: v for k, v in summary.items() if k in forced})
        res.scored_tokens[role] = int(summary["teacher_nll"].extra["teacher_tokens_scored"] or 0)
    return res


def main(argv: list[str] | None = None) -> None:
    """Score models against a teacher's greedy answers to a few prompts; print JSON."""
    from distray.hf_engine import HFEngine
    from distray.prompts import load_tokenizer, render_prompt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("teacher")
    p.add_argument("models", nargs="+")
    p.add_argument("--prompt", action="append", default=None, help="a user prompt (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    messages = [[{"role": "user", "content": t}] for t in (args.prompt or ["Name three colours."])]
    teacher = HFEngine(args.teacher)
    answers = teacher.generate([render_prompt(teacher.tok, m, True)[1] for m in messages], max_tokens=args.max_tokens)
    targets: list[list[int] | None] = [a.token_ids or None for a in answers]
    texts: list[str | None] = [a.text for a in answers]
    report: dict[str, Any] = {}
    for model in [args.teacher, *args.models]:
        why = vocab_mismatch(load_tokenizer(model), teacher.tok)
        fig: dict[str, Any] = {"skipped": why} if why else {
            k: r.value for k, r in summarize_forced(forced_scores(model, messages, targets)).items()
        }
        if model != args.teacher:
            engine = HFEngine(model)
            greedy = engine.generate(
                [render_prompt(engine.tok, m, True)[1] for m in messages], max_tokens=args.max_tokens
            )
            fig["rouge_l_vs_teacher"] = score(
                "rouge_l_vs_teacher", [g.text for g in greedy], texts, teacher_preds=texts
            ).value
        report[model] = fig
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
