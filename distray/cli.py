"""The `distray` command: one subcommand per stage, plus config, data and tiny-model helpers.

    distray run jobs/configs/quickstart.yaml train.lr=3e-5
    distray train --config jobs/configs/quickstart.yaml train.max_steps=20
    distray config show jobs/configs/quickstart.yaml train.lr=3e-5
    distray data check prompts.jsonl --rejects rejects.jsonl

The CLI only loads the config and hands it to `distray.pipeline` (the one stage registry, and
`prepare` for the run); stage modules are imported when their command runs, so `distray --help` does not load vLLM, Ray or DeepSpeed.
Exit codes: 0 success, 2 usage or config error, 1 run failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from distray.console import LOG_FORMAT
from distray.errors import ConfigError, DistrayError, UsageError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

logger = logging.getLogger("distray.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2



class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as `UsageError` so `main` owns the exit code."""

    def error(self, message: str) -> Any:  # argparse's own type is NoReturn
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


# ---- helpers -----------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    # Only the CLI and jobs/ configure handlers; library modules just log. distray's own logger
    # gets its own handler and does not propagate: importing ray.serve.llm replaces the root
    # logger's handlers with a JSON formatter, which would otherwise swallow our dense lines.
    # Third-party INFO chatter (httpx per request, filelock, ...) stays at WARNING unless -v.
    def make() -> logging.Handler:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._distray = True  # type: ignore[attr-defined]
        return handler

    for name in ("", "distray"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if getattr(h, "_distray", False):
                lg.removeHandler(h)
        lg.addHandler(make())
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    ours = logging.getLogger("distray")
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False


def _load(config: str | None, overrides: Sequence[str]) -> Any:
    from distray.config import load_config

    return load_config(config, list(overrides))


_MAX_VALUE_CHARS = 300  # long enough for a few output paths, short enough for one line


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        text = ", ".join(f"{k}={_fmt_value(x)}" for k, x in v.items())
        return "{" + _clip(text) + "}"
    if isinstance(v, (list, tuple)):
        text = ", ".join(_fmt_value(x) for x in v)
        return "[" + _clip(text) + "]"
    return str(v)


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def format_result(command: str, result: Any, elapsed_s: float) -> str:
    """One summary line for a stage result.

    Uses `result.summary()` when the result has one, else the dataclass fields.
    """
    summary = getattr(result, "summary", None)
    if callable(summary):
        body = str(summary())
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        body = " | ".join(
            f"{f.name} {_fmt_value(getattr(result, f.name))}"
            for f in dataclasses.fields(result)
            if getattr(result, f.name) is not None
        )
    elif result is None:
        body = "done"
    else:
        body = _fmt_value(result)
    return f"{command} ok in {elapsed_s:.1f} s | {body}"


def _print_result(command: str, result: Any, t0: float) -> None:
    print(format_result(command, result, time.perf_counter() - t0), flush=True)


# ---- commands ----------------------------------------------------------------------------


def _captured(args: argparse.Namespace, cfg: Any) -> Any:
    """The console capture for a command that works in a run folder (see distray.console)."""
    global _log_path
    from distray.console import capture
    from distray.prepare import run_dir_of

    run_dir = run_dir_of(cfg)
    verbose = bool(getattr(args, "verbose", False)) or not _real_stdio()
    _log_path = None if verbose else f"{run_dir}/logs/driver.log"
    return capture(run_dir, verbose=verbose, cfg=cfg)


def _real_stdio() -> bool:
    """True when sys.stdout/stderr are the process's fds 1 and 2 (not replaced by a test
    harness or a notebook, whose own capture must be left alone)."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _eval_model_overrides(items: Sequence[str]) -> list[str]:
    """`evaluate --model NAME=PATH` as overrides: `evaluate.extra_models.NAME=PATH`, after
    `evaluate.models=[teacher]` (the run's own student and baseline only when an override names
    them, since scoring a folder must not need a trained run)."""
    out = []
    for item in items:
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path or "." in name:
            raise UsageError(f"--model `{item}` is not NAME=PATH; write e.g. --model kd=runs/kd/train/student")
        if os.path.exists(os.path.expanduser(path)):  # else a URI or an alias, resolved later
            path = os.path.abspath(os.path.expanduser(path))
        out.append(f"evaluate.extra_models.{name}={path}")
    return ["evaluate.models=[teacher]", *out] if out else []


def _cmd_stage(args: argparse.Namespace) -> int:
    from distray import pipeline

    model = getattr(args, "model", None)
    if args.config is None and model is None:
        raise UsageError(f"`distray {args.command}` needs --config CONFIG (or --model PATH to serve a folder)")
    extra = _eval_model_overrides(getattr(args, "eval_models", None) or [])
    cfg = _load(args.config, [*extra, *args.overrides, *([f"serve.model={model}"] if model else [])])
    t0 = time.perf_counter()
    with _captured(args, cfg) as cap:
        result = pipeline.run_stage(cfg, args.command, force=getattr(args, "force", False),
                                    confirm=_confirm(args))
        if cap is not None:
            print(format_result(args.command, result, time.perf_counter() - t0), file=cap.out, flush=True)
            return EXIT_OK
    _print_result(args.command, result, t0)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    stages = None
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    force = args.force
    if force is not None and "=" in force:  # `run CONFIG --force a=b`: an override, not a stage
        args.overrides, force = [*args.overrides, force], "all"
    cfg = _load(args.config, args.overrides)
    from distray import pipeline

    if stages:
        unknown = [s for s in stages if s not in pipeline.STAGES]
        if unknown:
            raise UsageError(
                f"--stages has unknown stage(s) {', '.join(unknown)}; choose from "
                f"{', '.join(pipeline.STAGES)}"
            )
    t0 = time.perf_counter()
    with _captured(args, cfg) as cap:
        result = pipeline.run(cfg, stages=stages, force=force or False, confirm=_confirm(args))
        if cap is not None:
            print(format_result("run", result, time.perf_counter() - t0), file=cap.out, flush=True)
            return EXIT_OK
    _print_result("run", result, t0)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from distray.report import build_report

    t0 = time.perf_counter()
    result = build_report(args.run_dir)
    _print_result("report", result, t0)
    return EXIT_OK


def _cmd_config_show(args: argparse.Namespace) -> int:
    from distray.config import dump_config

    cfg = _load(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return EXIT_OK


def _cmd_data_check(args: argparse.Namespace) -> int:
    from distray.inputs import check_input

    kwargs: dict[str, Any] = {}
    if args.config is not None:
        from distray.tasks import task_prompts

        # Rows are checked as the generate stage would see them: the same system prompt and
        # template (`{labels}` filled, the chain-of-thought instruction added), and the local
        # teacher's chat template (a row it refuses is a reject there too).
        cfg = _load(args.config, [])
        system_prompt, prompt_template = task_prompts(cfg.task)
        kwargs = {"system_prompt": system_prompt, "prompt_template": prompt_template}
        local = [t for t in cfg.all_teachers if t.kind != "openai"]
        if local and args.tokenizer is None:
            t = local[0]
            kwargs.update(tokenizer=t.model, apply_chat_template=getattr(t, "apply_chat_template", True),
                          trust_remote_code=t.trust_remote_code)
    if args.tokenizer is not None:
        kwargs["tokenizer"] = args.tokenizer
    check = check_input(args.input, rejects_path=args.rejects, **kwargs)
    print(check.summary(), flush=True)
    return EXIT_OK


def _cmd_data_make_task(args: argparse.Namespace) -> int:
    from distray import tasks

    t0 = time.perf_counter()
    result = tasks.make_task(args.name, args.out, args.n, args.seed)
    _print_result("make-task", result if result is not None else args.out, t0)
    return EXIT_OK


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from distray import tiny

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads}
    if args.vocab is not None:
        kwargs["vocab_size"] = args.vocab
    result = tiny.make_tiny(args.out, **kwargs)
    _print_result("make-tiny", result, t0)
    return EXIT_OK


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from distray.models import fetch

    t0 = time.perf_counter()
    _print_result("models fetch", fetch(args.alias, args.out, force=args.force), t0)
    return EXIT_OK


def _cmd_models_list(args: argparse.Namespace) -> int:
    from distray.models import ALIASES

    for name, alias in sorted(ALIASES.items()):
        print(f"{name}\t{alias.origin} ({alias.license}) from PyPI {alias.package}=={alias.version}", flush=True)
    return EXIT_OK


def _cmd_make_student(args: argparse.Namespace) -> int:
    from distray.models import make_student

    t0 = time.perf_counter()
    out = make_student(args.teacher, args.layers, args.out, args.select, args.calibration)
    _print_result("make-student", out, t0)
    return EXIT_OK


# ---- parser ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be ≥ 1")
    return value


def _yes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--yes", "-y", action="store_true",
                   help="do not ask before --force deletes finished work")


def _confirm(args: argparse.Namespace) -> Any:
    """The question `--force` asks before deleting finished work: on a terminal, unless --yes."""
    if getattr(args, "yes", False) or not sys.stdin.isatty():
        return None

    def ask(question: str) -> bool:
        print(question + " [y/N] ", end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().strip().lower() in ("y", "yes")

    return ask


def build_parser() -> argparse.ArgumentParser:
    """The `distray` argument parser (all subcommands)."""
    # -v works before or after the subcommand; SUPPRESS keeps a subparser from resetting it.
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging and full tracebacks on failure")
    parser = _Parser(
        prog="distray",
        description="LLM knowledge distillation on Ray: generate → train → evaluate/serve/bench.",
        epilog="Exit codes: 0 success, 1 run failure, 2 usage or config error.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="debug logs and full tracebacks")
    parser.add_argument("--version", action="version", version=f"distray {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_stage_commands(sub, verbose)
    _add_run_command(sub, verbose)
    p = sub.add_parser(
        "report", help="write report.md and plots for a run folder", parents=[verbose]
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (<output_dir>/<run.name>)")
    p.set_defaults(func=_cmd_report)
    _add_config_and_data_commands(sub, verbose)
    _add_model_commands(sub, verbose)
    return parser


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-5"
    )


def _add_stage_commands(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """`distray <stage> --config ...` for every registered stage with a command."""
    from distray.stages import REGISTRY

    for stage in REGISTRY.values():
        if not stage.command:
            continue
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help, parents=[verbose])
        serve = stage.name == "serve"
        p.add_argument("--config", "-c", required=not serve, metavar="CONFIG",
                       help="YAML config file" + (" (default: every default, with --model)" if serve else ""))
        if serve:
            p.add_argument("--model", metavar="PATH", help="serve this Hugging Face model folder "
                           "instead of the run's student (same as serve.model=PATH)")
        if stage.name == "evaluate":
            p.add_argument("--model", action="append", dest="eval_models", metavar="NAME=PATH",
                           help="evaluate this model folder as NAME beside the teacher (repeatable; "
                           "evaluate.extra_models.NAME=PATH); the run's student and baseline too only "
                           "with evaluate.models=[teacher,student,baseline]")
        _overrides(p)
        if stage.has_lineage:
            p.add_argument(
                "--force", action="store_true",
                help=f"DELETE {stage.name}'s outputs first and redo it (asks on a terminal when "
                "they are finished; a new run.name keeps them instead)",
            )
            _yes(p)
        p.set_defaults(func=_cmd_stage)


def _add_run_command(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """`distray run CONFIG`: the whole pipeline."""
    from distray.stages import STAGES as PIPELINE_STAGES

    run_stages = ", ".join(PIPELINE_STAGES)
    p = sub.add_parser(
        "run",
        help=f"run the whole pipeline: {run_stages} (bench deploys the models on Ray Serve)",
        description=f"Run the pipeline's stages in order ({run_stages}); stages whose outputs "
        "exist are skipped unless --force.",
        parents=[verbose],
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config file")
    _overrides(p)
    p.add_argument(
        "--stages", metavar="a,b", help=f"only these stages, from {','.join(PIPELINE_STAGES)}"
    )
    p.add_argument(
        "--force", nargs="?", const="all", default=None, metavar="STAGE[,STAGE]",
        help="DELETE the outputs of these stages (all that run, when none is named) and redo "
        "them; asks on a terminal before deleting finished work",
    )
    _yes(p)
    p.set_defaults(func=_cmd_run)


def _add_config_and_data_commands(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """`distray config show`, `distray data check|make-task|synthesize` and `distray make-tiny`."""
    p = sub.add_parser("config", help="inspect configs", parents=[verbose])
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    c = config_sub.add_parser(
        "show", help="print the resolved config as YAML (defaults filled in)", parents=[verbose]
    )
    c.add_argument("config", metavar="CONFIG", help="YAML config file")
    _overrides(c)
    c.set_defaults(func=_cmd_config_show)
    p.set_defaults(func=_needs_action(p))

    p = sub.add_parser("data", help="check input data, write built-in tasks, synthesize prompts", parents=[verbose])
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    c = data_sub.add_parser(
        "check",
        help="validate an input file or folder: valid and rejected counts by reason",
        parents=[verbose],
    )
    c.add_argument("input", metavar="INPUT", help="JSONL/JSON/Parquet file or folder, or a URI")
    c.add_argument("--rejects", metavar="PATH", help="write rejects here (.jsonl or .parquet)")
    c.add_argument(
        "--config", "-c", metavar="CONFIG", help="apply this config's task.system_prompt/template"
    )
    c.add_argument(
        "--tokenizer", metavar="MODEL",
        help="check rows against this model's chat template (default: the config's local teacher)",
    )
    c.set_defaults(func=_cmd_data_check)
    c = data_sub.add_parser(
        "make-task",
        help="write a built-in synthetic task (train/validation/test)",
        parents=[verbose],
    )
    c.add_argument("name", metavar="NAME", help="task name, e.g. reverse, date, sentiment")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder")
    c.add_argument(
        "--n",
        required=True,
        type=_positive_int,
        metavar="N",
        help="training rows (train.jsonl); validation.jsonl and test.jsonl get 200 rows each",
    )
    c.add_argument("--seed", type=int, default=0, metavar="S", help="generator seed (default 0)")
    c.set_defaults(func=_cmd_data_make_task)
    from distray.synthesize import add_cli_args as synthesize_args  # sets func too

    synthesize_args(data_sub.add_parser("synthesize", parents=[verbose], help="let the teacher "
                                        "write new prompts from seed examples (self-instruct)"))
    p.set_defaults(func=_needs_action(p))

    p = sub.add_parser(
        "make-tiny",
        help="write a tiny random Llama + byte-level tokenizer (HF folder) for tests and demos",
        parents=[verbose],
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--layers", type=_positive_int, default=2, metavar="N", help="default 2")
    p.add_argument("--hidden", type=_positive_int, default=128, metavar="N", help="default 128")
    p.add_argument("--heads", type=_positive_int, default=4, metavar="N", help="default 4")
    p.add_argument("--vocab", type=_positive_int, metavar="N", help="tokenizer vocabulary size")
    p.set_defaults(func=_cmd_make_tiny)


def _add_model_commands(sub: Any, verbose: argparse.ArgumentParser) -> None:
    """`distray models fetch|list` and `distray make-student`."""
    from distray.models.aliases import ALIASES
    from distray.models.pruning import SELECTIONS

    p = sub.add_parser("models", help="models distray can fetch without the hub", parents=[verbose])
    models_sub = p.add_subparsers(dest="models_command", metavar="ACTION", parser_class=_Parser)
    c = models_sub.add_parser(
        "fetch", parents=[verbose],
        help="write an offline alias as a Hugging Face folder (cached, checksummed, checked)",
    )
    c.add_argument("alias", choices=sorted(ALIASES), metavar="ALIAS", help=", ".join(sorted(ALIASES)))
    c.add_argument("--out", metavar="DIR", help="folder to write (default: the shared cache)")
    c.add_argument("--force", action="store_true", help="rebuild even when a checked copy exists")
    c.set_defaults(func=_cmd_models_fetch)
    c = models_sub.add_parser("list", help="the aliases and where each comes from", parents=[verbose])
    c.set_defaults(func=_cmd_models_list)
    p.set_defaults(func=_needs_action(p))

    p = sub.add_parser(
        "make-student", parents=[verbose],
        help="a student made from the teacher by depth pruning (keeps N decoder layers)",
        description="Keep N of the teacher's decoder layers (Minitron-style depth pruning); the "
        "student shares the teacher's tokenizer, so logit KD applies.",
    )
    p.add_argument("--from", dest="teacher", required=True, metavar="TEACHER",
                   help="teacher folder or alias")
    p.add_argument("--layers", type=_positive_int, required=True, metavar="N", help="layers to keep")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--select", choices=SELECTIONS, default="uniform",
                   help="uniform (evenly spaced) or block-influence (drop the layers that change "
                   "their hidden state least, as ShortGPT)")
    p.add_argument("--calibration", metavar="FILE", help="prompts for block-influence (JSONL/Parquet)")
    p.set_defaults(func=_cmd_make_student)


def _needs_action(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def missing(_: argparse.Namespace) -> int:
        raise UsageError(f"choose an action\n{p.format_usage().strip()}")

    return missing


def _version() -> str:
    from distray import __version__

    return __version__


# ---- entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the exit code (0 ok, 1 run failure, 2 usage or config error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        try:
            args, extras = parser.parse_known_args(argv)
        except SystemExit as e:  # --help and --version exit 0 through argparse
            return int(e.code or 0)
        # argparse ends a `nargs="*"` positional at the first option, so overrides written after
        # an option (`run CONFIG --force a=b`) come back as extras; they are overrides all the same.
        if extras:
            if hasattr(args, "overrides") and all(
                "=" in x and not x.startswith("-") for x in extras
            ):
                args.overrides = [*args.overrides, *extras]
            else:
                raise UsageError(
                    f"unrecognized arguments: {' '.join(extras)}\n{parser.format_usage().strip()}"
                )
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        verbose = bool(getattr(args, "verbose", False))
        _setup_logging(verbose)
        return int(args.func(args))
    except (ConfigError, UsageError) as e:
        _report_error(e, verbose=False, with_log=False)  # the message is the whole story
        return EXIT_USAGE
    except DistrayError as e:
        _report_error(e, verbose)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("distray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an engine's or a library's own error: say it in one line, log the rest
        if verbose or _log_path is None:
            raise
        _report_error(RuntimeError(f"{type(e).__name__}: {e}"), verbose=False)
        return EXIT_FAILURE


_MAX_ERROR_LINES = 6

#: The log of the command running now (set once its run folder is known; None with -v).
_log_path: str | None = None


def _report_error(e: BaseException, verbose: bool, with_log: bool = True) -> None:
    if verbose:
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    message = str(e) or type(e).__name__
    lines = message.splitlines()
    if not verbose and _log_path and len(lines) > _MAX_ERROR_LINES:
        # Ray's errors carry whole memory reports and worker lists; the log keeps them all.
        message = "\n".join(lines[:_MAX_ERROR_LINES]) + f"\n... ({len(lines) - _MAX_ERROR_LINES} more lines in the log)"
    print(f"distray: error: {message}", file=sys.stderr, flush=True)
    if with_log and _log_path and not verbose and os.path.isfile(_log_path):
        from distray.console import error_tail

        tail = [ln for ln in error_tail(_log_path) if message[:60] not in ln]
        if tail:
            print("last error lines of the log:\n  " + "\n  ".join(tail), file=sys.stderr)
        print(f"full log: {_log_path}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
