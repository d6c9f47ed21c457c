"""Where one on-policy run keeps its rounds, the row layouts, and the phase markers.

    ls runs/quickstart/onpolicy/round-000/

```
<run>/onpolicy/
  settings.json            the settings the rounds were made with (a changed one is refused)
  eval_prompts.jsonl       the fixed prompts of the per-round metrics
  metrics.json  rounds.png the per-round figures and their plot
  round-000/
    prompts.jsonl          this round's fresh training prompts (written once)
    rollouts/part-*.parquet   the student's answers (ROLLOUT_SCHEMA), one shard per batch
    scored/part-*.parquet     the teacher's top-k over those exact tokens (SCORED_SCHEMA)
    self/part-*.parquet       the student's own logprobs of its eval samples (SELF_SCHEMA)
    rejects/                  rows that got no answer or no score (REJECT_SCHEMA): rejects-* are
                              final, retry-* failed transiently and are sent again (settle.py)
    mix/part-*.parquet        the training mix: λ on-policy, 1 − λ off-policy teacher-data rows
    train/                    Ray Train checkpoints, metrics.jsonl, student/ (the export)
    <phase>.done.json         written when a phase has finished, with its figures
```
Rows are written as atomic shards named by a hash of their ids (`distray.teacher.writer`), and
each phase skips the ids already in its output (or its rejects), so a run killed at any moment
and started again finishes the rest without asking an engine twice. A phase whose marker exists
is skipped whole; training resumes from its latest Ray Train checkpoint. A phase with rows
still unsettled (in retry-* shards) writes no marker, so a rerun retries them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from distray import formats as F
from distray.teacher.writer import RETRY_PREFIX

__all__ = [
    "PURPOSE",
    "TRAIN",
    "EVAL_SAMPLE",
    "EVAL_GREEDY",
    "TEACHER_TOKEN_LOGPROBS",
    "STUDENT_TOKEN_LOGPROBS",
    "ROLLOUT_SCHEMA",
    "SCORED_SCHEMA",
    "SELF_SCHEMA",
    "PHASES",
    "ROLLOUT",
    "TEACHER_SCORE",
    "SELF_SCORE",
    "retry_prefix",
    "OnPolicyPaths",
    "RoundPaths",
]

#: Why the student answered a prompt: `train` rows are trained on; `eval_sample` (sampled like
#: the rollouts) and `eval_greedy` rows only feed the round's metrics.
PURPOSE = "purpose"
TRAIN = "train"
EVAL_SAMPLE = "eval_sample"
EVAL_GREEDY = "eval_greedy"

#: The teacher's logprob of each response token (the sampled one, in the top-k or not).
TEACHER_TOKEN_LOGPROBS = "teacher_token_logprobs"
#: The student's own logprob of each token it sampled (eval samples only: reverse KL).
STUDENT_TOKEN_LOGPROBS = "student_token_logprobs"

#: The student's answers: teacher-data columns (top-k empty) and why it answered.
ROLLOUT_SCHEMA = F.TEACHER_DATA_SCHEMA.append(pa.field(PURPOSE, pa.string()))
#: Scored rows: the teacher-data layout (the student's answer, the teacher's top-k), so training
#: reads them like generate's rows.
SCORED_SCHEMA = ROLLOUT_SCHEMA.append(pa.field(TEACHER_TOKEN_LOGPROBS, pa.list_(pa.float32())))
#: The student's logprobs of its own eval samples.
SELF_SCHEMA = pa.schema(
    [(F.ID, pa.string()), (F.INPUT_ID, pa.string()), (STUDENT_TOKEN_LOGPROBS, pa.list_(pa.float32()))]
)

#: The phases of a round, in order; each writes `<phase>.done.json` when it has finished.
PHASES = ("rollouts", "scoring", "mix", "train")

#: The stages whose transient failures get retry shards in rejects/ (see `settle`).
ROLLOUT = "rollout"
TEACHER_SCORE = "teacher-score"
SELF_SCORE = "self-score"


def retry_prefix(stage: str, pass_id: str) -> str:
    """The file-name prefix of one pass's retry shards of `stage`: `retry-<stage>-<pass>`."""
    return f"{RETRY_PREFIX}-{stage}-{pass_id}"


@dataclass(frozen=True)
class OnPolicyPaths:
    """`<run>/onpolicy/` and the files beside the rounds."""

    run_dir: str

    @property
    def root(self) -> str:
        return f"{self.run_dir.rstrip('/')}/onpolicy"

    @property
    def settings(self) -> str:
        return f"{self.root}/settings.json"

    @property
    def eval_prompts(self) -> str:
        return f"{self.root}/eval_prompts.jsonl"

    @property
    def metrics(self) -> str:
        return f"{self.root}/metrics.json"

    @property
    def plot(self) -> str:
        return f"{self.root}/rounds.png"

    def round(self, index: int) -> RoundPaths:
        """The folder of round `index` (0-based)."""
        return RoundPaths(f"{self.root}/round-{index:03d}", index)


@dataclass(frozen=True)
class RoundPaths:
    """The files of one round (see the module docstring)."""

    dir: str
    index: int

    def _p(self, name: str) -> str:
        return f"{self.dir}/{name}"

    @property
    def prompts(self) -> str:
        return self._p("prompts.jsonl")

    @property
    def rollouts(self) -> str:
        return self._p("rollouts")

    @property
    def scored(self) -> str:
        return self._p("scored")

    @property
    def self_scored(self) -> str:
        return self._p("self")

    @property
    def rejects(self) -> str:
        return self._p("rejects")

    @property
    def mix(self) -> str:
        return self._p("mix")

    @property
    def train(self) -> str:
        return self._p("train")

    @property
    def student(self) -> str:
        return self._p("train/student")

    @property
    def tmp(self) -> str:
        return self._p(".tmp")

    def done(self, phase: str) -> str:
        """The marker a finished phase writes."""
        return self._p(f"{phase}.done.json")
