"""On-policy distillation pieces without Ray: config, prompt order, scores, mix, metrics, markers.

    .venv/bin/python -m pytest tests/unit/test_onpolicy.py -q
"""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from distray import formats as F
from distray.config import DistrayConfig
from distray.engines.scoring import answer_scores
from distray.errors import ConfigError, DataError
from distray.onpolicy.layout import (
    EVAL_GREEDY,
    PURPOSE,
    ROLLOUT_SCHEMA,
    SCORED_SCHEMA,
    TEACHER_TOKEN_LOGPROBS,
    TRAIN,
    OnPolicyPaths,
)
from distray.onpolicy.metrics import greedy_figures, sample_figures
from distray.onpolicy.mixing import draw_ids, off_policy_count, write_mix
from distray.onpolicy.rollouts import RolloutSink, rollout_id
from distray.onpolicy.rounds import OnPolicyRun, round_train_settings, scorer_of
from distray.onpolicy.selection import round_slice
from distray.teacher.writer import load_done_ids


def _cfg(tmp_path, **train) -> DistrayConfig:
    return DistrayConfig.model_validate(
        {
            "run": {"name": "op", "output_dir": str(tmp_path)},
            "teacher": {"kind": "vllm", "model": str(tmp_path / "teacher")},
            "student": {"model": str(tmp_path / "student")},
            "generate": {"logprobs": 4},
            "train": {"mode": "on_policy", "loss": "kd", **train},
        }
    )


# ---- config ---------------------------------------------------------------------------------


def test_on_policy_section_defaults_when_mode_is_set(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    assert cfg.train.on_policy is not None
    assert cfg.train.on_policy.lmbda == 0.5 and cfg.train.on_policy.sampling.temperature == 1.0
    assert DistrayConfig().train.mode == "off_policy" and DistrayConfig().train.on_policy is None


def test_on_policy_refuses_sft_and_several_samples(tmp_path) -> None:
    with pytest.raises(ValidationError, match="train.loss"):
        _cfg(tmp_path, loss="sft")
    with pytest.raises(ValidationError, match="sampling.n"):
        _cfg(tmp_path, on_policy={"sampling": {"n": 2}})
    with pytest.raises(ValidationError, match="lmbda"):
        _cfg(tmp_path, on_policy={"lmbda": 0})


def test_an_api_teacher_cannot_score(tmp_path) -> None:
    cfg = DistrayConfig.model_validate(
        {
            "teacher": {"kind": "openai", "model": "gpt-4o", "extra_body": {"return_tokens_as_token_ids": True}},
            "generate": {"logprobs": 4},
            "train": {"mode": "on_policy", "loss": "kd"},
        }
    )
    with pytest.raises(ConfigError, match="local teacher"):
        scorer_of(cfg)


def test_round_learning_rate_follows_the_run_schedule(tmp_path) -> None:
    cfg = _cfg(tmp_path, lr=1e-3, warmup_steps=0, min_lr_ratio=0.0, on_policy={"rounds": 4, "steps_per_round": 10})
    lrs = [round_train_settings(cfg, r)["lr"] for r in range(4)]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-3 and lrs[-1] > 0
    s = round_train_settings(cfg, 0)
    assert s["max_steps"] == 10 and s["min_lr_ratio"] == 1.0 and s["validation_fraction"] == 0.0


def test_rounds_train_on_the_logit_loss_only(tmp_path) -> None:
    """No cross-entropy on the student's own samples, whatever train.alpha says."""
    cfg = _cfg(tmp_path, alpha=0.3, on_policy={"rounds": 2})
    assert cfg.train.alpha == 0.3
    assert all(round_train_settings(cfg, r)["alpha"] == 1.0 for r in range(2))


# ---- prompts --------------------------------------------------------------------------------


def test_rounds_take_fresh_prompts_in_a_fixed_order() -> None:
    ids = [f"p{i}" for i in range(10)]
    r0, r1 = round_slice(ids, 0, 0, 4), round_slice(ids, 0, 1, 4)
    assert len(r0) == 4 and not set(r0) & set(r1)
    assert round_slice(list(reversed(ids)), 0, 0, 4) == r0  # input order does not matter
    assert round_slice(ids, 1, 0, 4) != r0  # the seed does
    r2 = round_slice(ids, 0, 2, 4)  # wraps around: 2 new, then the first again
    assert len(set(r0 + r1 + r2)) == 10
    assert round_slice(ids, 0, 0, 50) and len(round_slice(ids, 0, 0, 50)) == 10


# ---- scores ---------------------------------------------------------------------------------


def test_answer_scores_keep_top_k_and_the_sampled_token() -> None:
    positions = [
        {7: {"logprob": -0.1, "rank": 1}, 3: {"logprob": -2.5, "rank": 2}, 9: {"logprob": -6.0, "rank": 30}},
        {"4": {"logprob": -0.5, "rank": 1}, "5": {"logprob": -1.0, "rank": 2}, "6": None},
    ]
    ids, lps, own = answer_scores(positions, [9, 5], k=2)
    assert ids == [[7, 3], [4, 5]]
    assert lps[0] == pytest.approx([-0.1, -2.5])
    assert own == pytest.approx([-6.0, -1.0])  # the sampled token, outside the top-k or not


# ---- rollouts sink --------------------------------------------------------------------------


def test_rollout_sink_writes_answers_once_and_leaves_engine_errors_for_a_rerun(tmp_path) -> None:
    rp = OnPolicyPaths(str(tmp_path)).round(0)
    meta = {rollout_id(0, TRAIN, f"in-{i}"): (TRAIN, f"in-{i}") for i in range(3)}
    rids = list(meta)
    answered = [
        {F.INPUT_ID: rids[0], F.MESSAGES: [{"role": "user", "content": "a"}], F.RESPONSE: "x",
         F.RESPONSE_TOKEN_IDS: [5, 2], "error": None},
        {F.INPUT_ID: rids[1], F.MESSAGES: [{"role": "user", "content": "b"}], "error": "engine_error: boom"},
        {F.INPUT_ID: rids[2], F.MESSAGES: [{"role": "user", "content": "c"}], "error": "prompt_too_long: 900"},
    ]
    out = RolloutSink(rp, meta, "student-round-000")(pa.Table.from_pylist(answered))
    assert out.column(F.ID).to_pylist() == [rids[0]]
    assert out.column(F.INPUT_ID).to_pylist() == ["in-0"]
    assert out.column(PURPOSE).to_pylist() == [TRAIN]
    done = load_done_ids([rp.rollouts, rp.rejects])
    assert len(done) == 2  # the answer and the final reject; the engine error is retried


# ---- mix ------------------------------------------------------------------------------------


def _scored_row(i: int, purpose: str = TRAIN) -> dict:
    return {
        F.ID: f"on-{i}", F.INPUT_ID: f"in-{i}", F.MESSAGES: [{"role": "user", "content": "q"}],
        F.RESPONSE: "a", F.RESPONSE_TOKEN_IDS: [1, 2, 3], F.TOPK_TOKEN_IDS: [[1], [2], [3]],
        F.TOPK_LOGPROBS: [[-0.1], [-0.2], [-0.3]], F.FINISH_REASON: "stop", PURPOSE: purpose,
        TEACHER_TOKEN_LOGPROBS: [-0.1, -0.2, -0.3],
    }


def test_mix_has_lambda_share_and_a_fresh_draw_per_round(tmp_path) -> None:
    rp = OnPolicyPaths(str(tmp_path)).round(1)
    (tmp_path / "onpolicy/round-001/scored").mkdir(parents=True)
    rows = [_scored_row(i) for i in range(4)] + [_scored_row(9, EVAL_GREEDY)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORED_SCHEMA), f"{rp.scored}/part-a.parquet")
    teacher = tmp_path / "gen"
    teacher.mkdir()
    off = [{**_scored_row(100 + i), F.ID: f"off-{i}"} for i in range(20)]
    for r in off:
        r.pop(PURPOSE), r.pop(TEACHER_TOKEN_LOGPROBS)
    pq.write_table(pa.Table.from_pylist(off, schema=F.TEACHER_DATA_SCHEMA), teacher / "part-0.parquet")
    figures = write_mix(rp, str(teacher), 0.5, seed=0)
    assert figures == {"on_policy_rows": 4, "off_policy_rows": 4, "on_policy_tokens": 12, "off_policy_tokens": 12}
    mix = pq.read_table(rp.mix).column(F.ID).to_pylist()
    assert sorted(m for m in mix if m.startswith("on-")) == [f"on-{i}" for i in range(4)]  # no eval row
    assert off_policy_count(4, 1.0) == 0 and off_policy_count(10, 0.25) == 30
    ids = [f"off-{i}" for i in range(20)]
    assert draw_ids(ids, 4, 0, 1) == draw_ids(ids, 4, 0, 1) != draw_ids(ids, 4, 0, 2)
    with pytest.raises(DataError, match="generate"):
        write_mix(rp, None, 0.5, seed=0)


# ---- metrics --------------------------------------------------------------------------------


def test_reverse_kl_and_teacher_nll() -> None:
    teacher = [[math.log(0.5), math.log(0.25)], [math.log(0.5)]]
    student = [[math.log(0.5), math.log(0.5)], [math.log(1.0)]]
    m = sample_figures(teacher, student)
    k3 = [0.0, 0.5 - 1 + math.log(2), 0.5 - 1 + math.log(2)]  # (r − 1) − log r, r = p/q
    assert m["reverse_kl"] == pytest.approx(sum(k3) / 3)
    assert m["reverse_kl_seq"] == pytest.approx(sum(k3) / 2)
    assert sample_figures([[-5.0]], [[-1.0]])["reverse_kl"] > 0  # never negative
    g = greedy_figures([
        {TEACHER_TOKEN_LOGPROBS: [-1.0, -3.0], F.RESPONSE: "ab ", F.REFERENCE: "ab"},
        {TEACHER_TOKEN_LOGPROBS: [-2.0], F.RESPONSE: "x", F.REFERENCE: "y"},
    ])
    assert g["teacher_nll"] == pytest.approx(2.0) and g["greedy_exact_match"] == 0.5
    assert sample_figures([], []) == {} and greedy_figures([]) == {}


# ---- phases ---------------------------------------------------------------------------------


def test_a_finished_phase_is_not_run_again(tmp_path) -> None:
    job = OnPolicyRun(_cfg(tmp_path))
    rp = job.paths.round(0)
    calls = []
    first = job.phase(rp, "rollouts", lambda: calls.append(1) or {"rollout_rows": 3})
    again = job.phase(rp, "rollouts", lambda: calls.append(1) or {"rollout_rows": 99})
    assert calls == [1] and again == first and "rollouts_s" in first
    assert json.loads(open(rp.done("rollouts")).read())["rollout_rows"] == 3
    assert ROLLOUT_SCHEMA.names[-1] == PURPOSE


def test_every_scoring_request_carries_the_same_sampling_params() -> None:
    from distray.engines.vllm import score_request

    good = score_request({"_ids": [1, 2, 3], "_n_prompt": 2, "error": None}, 5)
    refused = score_request({"_ids": [1], "_n_prompt": 1, "error": "too_long: 900 tokens"}, 5)
    # A block that mixes both must not leave nulls in sampling_params: vLLM would then get
    # max_tokens as a float and its engine core would die.
    assert refused["sampling_params"] == good["sampling_params"]
    assert good["sampling_params"]["max_tokens"] == 1 and good["sampling_params"]["prompt_logprobs"] == 5
    assert refused["__inference_error__"] and good["__inference_error__"] == ""
