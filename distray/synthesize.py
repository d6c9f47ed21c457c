"""New prompts written by the teacher from seed examples, self-instruct style.

    distray data synthesize --config jobs/configs/smollm2-135m_to_pruned_kd.yaml \\
        --seeds examples/data/self-instruct/train.jsonl --n 500 --out data/synth.jsonl

Each request shows the teacher `examples_per_prompt` seed prompts drawn at random (a stream per
request index from `--seed`) and asks for one new task (`build_prompt`). The answer is cut to one
task (`parse_answer`) and kept unless a filter refuses it, in this order:

| reason | when |
|---|---|
| `prompt_too_long`, ... | the engine gave no answer (its `error` code; transient failures stop the run instead) |
| `truncated` | the answer hit `max_tokens` before the task ended |
| `empty` / `too_short` / `too_long` | under `min_words` / over `max_words` words |
| `needs_media` | it asks for an image, a plot, audio, ... that a text model cannot give (self-instruct's filter) |
| `meta_task` | it talks about the task list ("a new task that ...", "the above task") instead of being a task |
| `missing_input` | it ends with ":" and gives nothing after it ("Summarize the following text:") |
| `exact_duplicate` | same words (lowercase, punctuation dropped) as a seed or a kept prompt |
| `near_duplicate` | ROUGE-L F1 ≥ `similarity` (0.7, self-instruct's test) with a seed or a kept prompt |

Kept prompts go to OUT in distray's input format, in the seeds' form (`prompt` when every seed
row is a `prompt` row, else `messages`), with a content id and where they came from::

    {"id": "synth-3f9c0a1be2d47a55", "messages": [{"role": "user", "content": "List three ..."}],
     "synth": {"request": 0, "key": "9e1f...", "seeds": ["seed_task_12", "seed_task_40", "seed_task_7"]}}
    {"id": "synth-0b7d51e9c4a2f816", "messages": [{"role": "user", "content": "Rewrite ..."}],
     "synth": {"request": 2, "key": "c40a...", "seeds": ["seed_task_3", "seed_task_99", "seed_task_51"]}}
    {"id": "synth-e2a4c0f3d1b59977", "messages": [{"role": "user", "content": "Is the ..."}],
     "synth": {"request": 3, "key": "77d2...", "seeds": ["seed_task_60", "seed_task_1", "seed_task_8"]}}

Rejects go beside it (OUT.rejects.jsonl, distray's REJECT_SCHEMA, stage `synthesize`). Every
request answered ends in exactly one of the two files, in request order.

Resumable, hence idempotent: requests are asked in rounds, and both files are rewritten after each
round. A rerun reads them back, checks that each recorded request is the one it would ask now (a
different seed file, `--seed`, `--examples-per-prompt`, sampling or teacher is refused), and
only asks for what is missing; with OUT already holding `n` prompts it writes nothing. The
filter flags are not in that check: decisions already in the files stand, new answers meet the
new flags. From
scratch, the same command gives the same file again when the teacher samples deterministically
under a seed (vllm, hf); an API teacher may not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distray.errors import DataError, StageError
from distray.similarity import SIMILARITY, SimilarityIndex, words

if TYPE_CHECKING:
    from distray.config import DistrayConfig, SamplingConfig

__all__ = [
    "NEEDS_MEDIA_WORDS", "Seed", "Filters", "SynthesizeResult", "add_cli_args", "build_prompt",
    "cli_main", "load_seeds", "main", "parse_answer", "plan_request", "reason_code",
    "rejects_path_for", "run",
]

logger = logging.getLogger(__name__)

#: Words of a task a text-only model cannot do (self-instruct's keyword filter, less "file"
#: and "map", which coding tasks use).
NEEDS_MEDIA_WORDS = frozenset({
    "image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs", "draw",
    "plot", "video", "videos", "audio", "music", "diagram", "flowchart",
})

_TASK_MARK = re.compile(r"^[ \t>*#]*task[ \t]*(\d+)[ \t*]*[:.)][ \t*]*", re.I | re.M)
_QUOTES = "\"'`“”"
#: A small teacher often echoes the request ("Write a new task that involves ...") instead of
#: writing a task; the words of `build_prompt` that show it.
_META = re.compile(r"\b(new task|above tasks?|tasks? above|these tasks|example tasks?|task \d+)\b", re.I)


@dataclass(frozen=True)
class Seed:
    """One seed prompt: its row id and the text shown to the teacher (the last user turn)."""

    id: str
    text: str


# ---- prompts and answers -----------------------------------------------------------------


def build_prompt(examples: list[str]) -> str:
    """The user turn that asks for one new task like `examples` (numbered Task 1..k)."""
    k = len(examples)
    shown = "\n\n".join(f"Task {i}:\n{text.strip()}" for i, text in enumerate(examples, 1))
    return (
        f"Here are {k} example tasks that users gave an AI assistant:\n\n{shown}\n\n"
        "Write one new task of your own, different from all of these in topic and wording, that "
        "an AI assistant can do with text alone. Include any input the task needs. Reply with "
        f'the task only, starting with "Task {k + 1}:".'
    )


def plan_request(index: int, seeds: list[Seed], k: int, seed: int) -> list[Seed]:
    """The `k` distinct seeds request `index` shows: a random stream per (seed, index), so a
    request's examples do not depend on how many requests came before it or on `n`."""
    rng = random.Random(f"synthesize:{seed}:{index}")
    return rng.sample(seeds, min(k, len(seeds)))


def parse_answer(answer: str) -> tuple[str, bool]:
    """Cut one task out of a teacher's answer.

    A leading "Task N:" label is dropped; a following one (the teacher went on to write more
    tasks) ends the task, as does the end of the answer. Quotes around the whole task go.

    Returns:
        `(task text, ended)`: `ended` is True when a following "Task N:" label closed it.
    """
    text = answer.strip()
    marks = list(_TASK_MARK.finditer(text))
    if marks and marks[0].start() == 0:
        text = text[marks[0].end():]
        marks = list(_TASK_MARK.finditer(text))
    ended = bool(marks)
    if marks:
        text = text[: marks[0].start()]
    text = text.strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    elif text and text[0] in _QUOTES and text.count(text[0]) == 1:
        text = text[1:].strip()  # an opening quote the teacher never closed
    return text, ended


# ---- filters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """What a new task must pass (see the module docstring's table)."""

    min_words: int = 3
    max_words: int = 300
    similarity: float = SIMILARITY

    def check(
        self, text: str, ended: bool, finish_reason: str | None, index: SimilarityIndex
    ) -> tuple[str, str] | None:
        """`(reason, detail)` when `text` is refused, else None."""
        if finish_reason == "length" and not ended:
            return "truncated", "the answer hit max_tokens before the task ended; raise --max-tokens"
        n = len(words(text))
        if not text.strip():
            return "empty", "no task text in the answer"
        if n < self.min_words:
            return "too_short", f"{n} words < --min-words {self.min_words}"
        if n > self.max_words:
            return "too_long", f"{n} words > --max-words {self.max_words}"
        media = sorted(set(words(text)) & NEEDS_MEDIA_WORDS)
        if media:
            return "needs_media", f"asks for {', '.join(media)}, which a text model cannot give"
        meta = _META.search(text)
        if meta:
            return "meta_task", f"talks about the task list ({meta.group(0)!r}) instead of being a task"
        if text.rstrip().endswith(":"):
            return "missing_input", "ends with ':' and gives no input after it"
        hit = index.match(text)
        if hit is not None:
            reason, key, score = hit
            return reason, f"ROUGE-L {score:.2f} with {key}"
        return None


# ---- the command -------------------------------------------------------------------------


def rejects_path_for(out: str) -> str:
    """`new.jsonl` → `new.rejects.jsonl` (beside the output)."""
    return (out[: -len(".jsonl")] if out.endswith(".jsonl") else out) + ".rejects.jsonl"


@dataclass
class SynthesizeResult:
    """What `run` left: kept prompts in `out`, rejects beside it, counts by reason."""

    out: str
    rejects_path: str
    wanted: int
    kept: int
    requests: int
    new_requests: int
    reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"{self.kept} kept of {self.wanted} wanted, {sum(self.reasons.values())} rejected, "
            f"of {self.requests} requests filed ({self.new_requests} sent this run) → {self.out}"
        ]
        for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<20} {count:>8}")
        lines.append(f"rejects written to {self.rejects_path}")
        return "\n".join(lines)


def load_seeds(path: str) -> tuple[list[Seed], bool]:
    """Seed prompts of an input file or folder, and whether every row was a `prompt` row.

    Raises:
        DataError: the file is missing, or holds no valid row.
    """
    from distray import formats as F
    from distray.inputs import iter_input_rows

    seeds: list[Seed] = []
    prompt_form = True
    bad: Counter[str] = Counter()
    for row, rej in iter_input_rows(path):
        if row is None:
            bad[rej.reason if rej is not None else "?"] += 1
            continue
        prompt_form &= row[F.PROMPT] is not None
        users = [t["content"] for t in row[F.MESSAGES] if t["role"] == "user"]
        seeds.append(Seed(str(row[F.ID]), row[F.PROMPT] if row[F.PROMPT] is not None else users[-1]))
    if bad:
        logger.warning("synthesize: %d seed rows of %s are not valid input (%s); run "
                       "`distray data check %s`", sum(bad.values()), path, dict(bad), path)
    if not seeds:
        raise DataError(f"--seeds `{path}` holds no valid input row; see `distray data check {path}`")
    return seeds, prompt_form


class Synthesizer:
    """One synthesize run: the plan of requests, the rows kept and refused so far, the rounds."""

    def __init__(
        self, cfg: DistrayConfig, seeds: list[Seed], prompt_form: bool, out: str, *,
        n: int, examples_per_prompt: int, seed: int, sampling: SamplingConfig,
        filters: Filters, max_requests: int,
    ) -> None:
        from distray.teacher.rows import sampling_key, teacher_ident

        if not cfg.all_teachers:
            raise DataError("synthesize needs a teacher: set `teacher` in the config")
        self.cfg, self.teacher = cfg, _local_folder(cfg.all_teachers[0])
        self.pool = [s for s in seeds if len(words(s.text)) <= filters.max_words] or seeds
        self.prompt_form, self.out, self.rejects_path = prompt_form, out, rejects_path_for(out)
        self.n, self.k, self.seed, self.sampling = n, examples_per_prompt, seed, sampling
        self.filters, self.max_requests = filters, max_requests
        self._ident = [teacher_ident(self.teacher), sampling_key(sampling, None)]
        self.index = SimilarityIndex(filters.similarity)
        for s in seeds:
            self.index.add(s.id, s.text)
        self.kept: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []  # REJECT_SCHEMA records
        self.done = 0  # requests 0..done-1 are in `kept` or `rejects`

    def request(self, i: int) -> tuple[str, list[dict[str, str]], list[str]]:
        """`(key, messages, seed ids)` of request `i`: the key names the prompt and who answers."""
        from distray.formats import content_hash

        shown = plan_request(i, self.pool, self.k, self.seed)
        messages = [{"role": "user", "content": build_prompt([s.text for s in shown])}]
        return content_hash("synthesize", messages, *self._ident), messages, [s.id for s in shown]

    def resume(self) -> None:
        """Read back OUT and its rejects: the longest run of requests 0..m-1 both hold.

        Raises:
            DataError: a recorded request is not the one this command would ask.
        """
        from distray import storage

        by_index: dict[int, tuple[str, Any]] = {}
        for path, kept in ((self.out, True), (self.rejects_path, False)):
            if not storage.exists(path):
                continue
            for line in storage.read_text(path).splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    meta = rec["synth"] if kept else json.loads(rec["row"])
                    by_index[int(meta["request"])] = (str(meta["key"]), (kept, rec))
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(
                        f"`{path}` holds a row that `distray data synthesize` did not write "
                        f"({line[:80]!r}); give another --out"
                    ) from e
        while self.done in by_index:
            key, (kept, rec) = by_index[self.done]
            if key != self.request(self.done)[0]:
                raise DataError(
                    f"`{self.out}` holds request {self.done} asked with other settings (the seeds, "
                    "--seed, --examples-per-prompt, the sampling flags or the teacher changed); "
                    "give another --out, or delete it and its .rejects.jsonl to start over"
                )
            if kept:
                self.kept.append(rec)
                self.index.add(rec["id"], _text_of(rec))
            else:
                self.rejects.append(rec)
            self.done += 1
        if self.done:
            logger.info("synthesize: resuming after %d requests (%d kept)", self.done, len(self.kept))

    def round_size(self) -> int:
        need = self.n - len(self.kept)
        rate = len(self.kept) / self.done if self.done >= 8 else 0.8
        size = math.ceil(need / max(rate, 0.2) * 1.1)
        return min(max(size, need, 8), self.max_requests - self.done)

    def ask(self, first: int, count: int) -> list[dict[str, Any]]:
        """Answers to requests first..first+count-1, in request order (one engine pass)."""
        import ray.data

        from distray.ray_utils import init_ray
        from distray.teacher import generate_dataset

        init_ray(self.cfg)
        rows = []
        for i in range(first, first + count):
            key, messages, _ = self.request(i)
            rows.append({"id": key, "messages": messages, "prompt": None, "reference": None})
        order = {r["id"]: n for n, r in enumerate(rows)}
        ds = ray.data.from_items(rows)
        answered = generate_dataset(ds, self.teacher, self.cfg, sampling=self.sampling, logprobs=None)
        out = sorted(answered.take_all(), key=lambda r: order[r["input_id"]])
        if len(out) != count:
            raise StageError(f"synthesize: the teacher returned {len(out)} rows for {count} requests")
        return out

    def take(self, i: int, answer: dict[str, Any]) -> None:
        """File request `i`'s answer as a kept prompt or a reject."""
        from distray import formats as F
        from distray.engines.results import ERROR
        from distray.teacher.publish import is_transient

        key, _, seed_ids = self.request(i)
        if answer.get(ERROR) and is_transient(answer):
            raise StageError(
                f"synthesize: the teacher failed on request {i} ({answer[ERROR]}); the requests "
                f"before it are saved in {self.out}: rerun the same command to go on"
            )
        raw = answer.get(F.RESPONSE) or ""
        text, ended = parse_answer(raw)
        new_id = "synth-" + hashlib.sha256(" ".join(words(text)).encode()).hexdigest()[:16]
        meta = {"request": i, "key": key, "seeds": seed_ids}
        if answer.get(ERROR):
            code, _, detail = str(answer[ERROR]).partition(": ")
            refused: tuple[str, str] | None = (code, detail)
        else:
            refused = self.filters.check(text, ended, answer.get(F.FINISH_REASON), self.index)
        if refused is not None:
            row = json.dumps({**meta, "text": text, "answer": raw}, ensure_ascii=False)
            self.rejects.append(F.Reject("synthesize", refused[0], refused[1], row, input_id=key,
                                         id=new_id if text else None).to_dict())
        else:
            prompt: dict[str, Any] = (
                {F.PROMPT: text} if self.prompt_form
                else {F.MESSAGES: [{"role": "user", "content": text}]}
            )
            self.kept.append({F.ID: new_id, **prompt, "synth": meta})
            self.index.add(new_id, text)
        self.done += 1

    def write(self) -> None:
        from distray import storage

        storage.write_jsonl(self.rejects_path, self.rejects)
        storage.write_jsonl(self.out, self.kept)

    def run(self) -> int:
        """Ask rounds until `n` are kept or `max_requests` are spent; returns requests sent."""
        sent = 0
        while len(self.kept) < self.n and self.done < self.max_requests:
            first, count = self.done, self.round_size()
            answers = self.ask(first, count)
            sent += count
            try:
                for i, answer in enumerate(answers, first):
                    if len(self.kept) >= self.n:
                        break  # the rest were asked for nothing; a larger --n asks them again
                    self.take(i, answer)
            finally:
                self.write()
            logger.info("synthesize: round of %d requests → %d of %d kept", count, len(self.kept), self.n)
        if len(self.kept) < self.n:
            logger.warning("synthesize: %d of %d kept after %d requests (--max-requests); see the "
                           "reasons in %s", len(self.kept), self.n, self.done, self.rejects_path)
        return sent


def _local_folder(teacher: Any) -> Any:
    """The teacher with an offline model alias (`smollm2-135m-instruct`) replaced by its fetched
    folder, as `distray.prepare` does for a run; an endpoint's model name stays as written."""
    from distray.engines import engine_for
    from distray.models.aliases import resolve_model

    if not engine_for(teacher).local:
        return teacher
    return teacher.model_copy(update={"model": resolve_model(teacher.model)})


def reason_code(reason: str) -> str:
    """`near_duplicate: ROUGE-L 0.81 with seed_task_3` → `near_duplicate`."""
    return reason.split(":", 1)[0].strip()


def _text_of(row: dict[str, Any]) -> str:
    return str(row["prompt"]) if row.get("prompt") is not None else str(row["messages"][-1]["content"])


def run(
    cfg: DistrayConfig, seeds: str, out: str, n: int, *, examples_per_prompt: int = 3,
    seed: int = 0, temperature: float = 0.7, top_p: float = 0.95, max_tokens: int = 256,
    filters: Filters | None = None, max_requests: int | None = None,
) -> SynthesizeResult:
    """Write `n` new prompts to `out` (see the module docstring), resuming what is there.

    Args:
        cfg: the config whose teacher (`teacher`, or the first of `teachers`) writes the tasks.
        seeds: an input file or folder (`{"prompt"}` or `{"messages"}` rows).
        out: the JSONL to write; rejects go to `rejects_path_for(out)`.
        n: prompts to keep.
        examples_per_prompt: seeds shown per request.
        seed: the stream of seed draws, and the sampling seed.
        temperature, top_p, max_tokens: the teacher's sampling for writing tasks.
        filters: what a task must pass; default `Filters()`.
        max_requests: most requests in all (default 5·n: a small teacher keeps 1 in 3).

    Raises:
        DataError: no valid seed, or `out` was written by other settings.
        StageError: the teacher failed in a way a rerun may fix (the work so far is saved).
    """
    from distray.config import SamplingConfig

    filters = filters or Filters()
    pool, prompt_form = load_seeds(seeds)
    k = min(examples_per_prompt, len(pool))
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=max_tokens, n=1,
                              seed=seed, stop=[f"Task {k + 2}:"])
    syn = Synthesizer(cfg, pool, prompt_form, out, n=n, examples_per_prompt=k, seed=seed,
                      sampling=sampling, filters=filters, max_requests=max_requests or 5 * n)
    syn.resume()
    sent = syn.run()
    result = SynthesizeResult(
        out=out, rejects_path=syn.rejects_path, wanted=n, kept=len(syn.kept), requests=syn.done,
        new_requests=sent, reasons=dict(Counter(reason_code(r["reason"]) for r in syn.rejects)),
    )
    logger.info("synthesize: %d prompts → %s, %d rejects → %s", result.kept, out,
                sum(result.reasons.values()), syn.rejects_path)
    return result


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """The flags of `distray data synthesize` (cli.py adds the parser)."""

    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} must be ≥ 1")
        return value

    def fraction(text: str) -> float:
        value = float(text)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
        return value

    def temperature(text: str) -> float:
        value = float(text)
        if not 0 <= value <= 5:
            raise argparse.ArgumentTypeError(f"{value} must be in [0, 5]")
        return value

    p.add_argument("--config", "-c", required=True, metavar="CONFIG", help="its teacher writes the tasks")
    p.add_argument("--seeds", required=True, metavar="PATH", help="seed prompts (distray input rows)")
    p.add_argument("--n", required=True, type=positive, metavar="N", help="new prompts to keep")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="kept prompts; rejects beside it")
    p.add_argument("--examples-per-prompt", type=positive, default=3, metavar="K", help="default 3")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="example draws and sampling seed")
    p.add_argument("--temperature", type=temperature, default=0.7, metavar="T", help="default 0.7")
    p.add_argument("--top-p", type=fraction, default=0.95, metavar="P", help="default 0.95")
    p.add_argument("--max-tokens", type=positive, default=256, metavar="N", help="per answer, default 256")
    p.add_argument("--max-requests", type=positive, default=None, metavar="N", help="default 5×n")
    p.add_argument("--min-words", type=positive, default=Filters.min_words, metavar="N", help="default 3")
    p.add_argument("--max-words", type=positive, default=Filters.max_words, metavar="N", help="default 300")
    p.add_argument("--similarity", type=fraction, default=SIMILARITY, metavar="F",
                   help="refuse ROUGE-L F1 ≥ F with a seed or a kept prompt (default 0.7)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cli_main)


def cli_main(args: argparse.Namespace) -> int:
    """`distray data synthesize`: load the config, run, print the summary; the exit code."""
    import os
    import sys

    from distray.config import load_config
    from distray.console import capture

    t0 = time.perf_counter()
    cfg = load_config(args.config, list(args.overrides))
    try:  # a test harness or notebook that replaced stdout keeps its own capture
        real = sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    # Ray's and vLLM's lines go to <OUT's folder>/logs/driver.log, distray's to the console.
    verbose = bool(getattr(args, "verbose", False)) or not real
    with capture(os.path.dirname(args.out) or ".", verbose=verbose):
        result = main(args, cfg)
    print(f"synthesize ok in {time.perf_counter() - t0:.1f} s | {result.summary()}", flush=True)
    return 0


def main(args: argparse.Namespace, cfg: DistrayConfig) -> SynthesizeResult:
    """Run from parsed `add_cli_args` flags and the loaded config."""
    return run(
        cfg, args.seeds, args.out, args.n, examples_per_prompt=args.examples_per_prompt,
        seed=args.seed, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
        filters=Filters(args.min_words, args.max_words, args.similarity),
        max_requests=args.max_requests,
    )
