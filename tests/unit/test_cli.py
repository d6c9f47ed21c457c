"""The `distray` command: subcommands, exit codes, error messages, stage dispatch.

    pytest tests/unit/test_cli.py -q
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import distray
from distray import cli, pipeline

COMMANDS = ["generate", "train", "evaluate", "serve", "bench", "run", "report", "config", "data", "make-tiny"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Any:
    """cli.main installs a log handler on the root logger; keep it out of other tests."""
    import logging

    root, pkg = logging.getLogger(), logging.getLogger("distray")
    handlers, root_level, pkg_level = list(root.handlers), root.level, pkg.level
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    pkg.setLevel(pkg_level)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "quick.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "cli-test", "output_dir": str(tmp_path / "runs")},
                # A hub id: prepare leaves it to the engine (a missing local folder would stop).
                "teacher": {"kind": "vllm", "model": "org/teacher"},
                "train": {"lr": 1e-4},
            }
        )
    )
    return path


@pytest.fixture
def fake_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package `fake_distray_stages` on sys.path with stage modules the tests control."""
    pkg = tmp_path / "fake_distray_stages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ok.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            CALLS = []

            @dataclass
            class GenerateResult:
                data_dir: str
                rows: int
                rows_per_s: float
                rejects_dir: str | None = None

            def run(cfg):
                CALLS.append(cfg)
                return GenerateResult(data_dir=cfg.run_dir + "/generate/data", rows=97, rows_per_s=12.3456)
            """
        )
    )
    (pkg / "fails.py").write_text(
        textwrap.dedent(
            """
            from distray.errors import StageError

            def run(cfg):
                raise StageError("teacher engine died: 3 of 4 replicas failed; check GPU memory")
            """
        )
    )
    (pkg / "broken_import.py").write_text("import distray_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in list(sys.modules):
        if name.startswith("fake_distray_stages"):
            monkeypatch.delitem(sys.modules, name)
    return pkg


def fake_stage(monkeypatch: pytest.MonkeyPatch, name: str, module: str) -> None:
    """Point the registry's stage `name` at `module.run`."""
    monkeypatch.setitem(pipeline.REGISTRY, name, dataclasses.replace(pipeline.REGISTRY[name], module=module))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- help and parsing ----------------------------------------------------------------------


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in COMMANDS:
        assert f"    {command}" in out


def test_no_command_and_unknown_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, )[0] == 2
    code, _, err = run_cli(capsys, "distil")
    assert code == 2 and "invalid choice: 'distil'" in err
    assert run_cli(capsys, "config")[0] == 2
    assert run_cli(capsys, "data")[0] == 2
    code, _, err = run_cli(capsys, "train")
    assert code == 2 and "--config" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"distray {distray.__version__}"


def test_python_dash_m_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "distray", "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0 and "make-tiny" in proc.stdout


# ---- config show ---------------------------------------------------------------------------


def test_config_show_prints_resolved_yaml_with_overrides(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = run_cli(capsys, "config", "show", str(config_file), "train.lr=3e-5")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["train"]["lr"] == pytest.approx(3e-5)
    assert resolved["teacher"]["kind"] == "vllm"
    assert resolved["serve"]["port"] == 8000  # defaults are filled in


def test_misspelled_key_exits_2_with_a_suggestion(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, err = run_cli(capsys, "config", "show", str(config_file), "train.lr_rate=3e-5")
    assert code == 2
    assert out == ""
    assert "`train.lr_rate` is not a setting; did you mean `train.lr`" in err
    assert "Traceback" not in err


def test_config_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "config", "show", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "generate", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in err


def test_overrides_after_an_option_still_count(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    code, out, _ = run_cli(capsys, "config", "show", "-v", str(config_file), "run.name=late")
    assert code == 0 and yaml.safe_load(out)["run"]["name"] == "late"
    code, _, err = run_cli(capsys, "config", "show", str(config_file), "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err


# ---- data check / make-task / make-tiny ------------------------------------------------------


def test_data_check_100_lines_3_corrupt(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": f"question {i}"}) for i in range(100)]
    lines[3] = "{not json"
    lines[50] = json.dumps({"messages": [{"role": "user", "content": 7}]})
    lines[99] = json.dumps({"prompt": ""})
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.jsonl"

    code, out, _ = run_cli(capsys, "data", "check", str(data), "--rejects", str(rejects))

    assert code == 0
    assert "97 valid, 3 rejected" in out
    for reason in ("invalid_json", "non_string_content", "empty_prompt"):
        assert reason in out
    assert len(rejects.read_text().splitlines()) == 3


def test_data_check_missing_input_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "data", "check", str(tmp_path / "none.jsonl"))
    assert code == 1 and "does not exist" in err and "Traceback" not in err


def test_data_check_applies_the_prompts_generate_sends(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import distray.inputs
    from distray.tasks import COT_INSTRUCTION

    seen: dict[str, Any] = {}

    class Check:
        def summary(self) -> str:
            return "1 valid, 0 rejected"

    monkeypatch.setattr(
        distray.inputs, "check_input", lambda path, rejects_path, **kw: seen.update(kw) or Check()
    )
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": {
        "system_prompt": "Pick one of {labels}.", "labels": ["yes", "no"], "chain_of_thought": True,
    }}))
    code, _, _ = run_cli(capsys, "data", "check", str(tmp_path / "x.jsonl"), "--config", str(config))
    assert code == 0
    assert seen["system_prompt"] == f"Pick one of yes, no. {COT_INSTRUCTION}"
    assert seen["prompt_template"] == "{prompt}"


def test_make_task_help_says_what_it_writes(capsys: pytest.CaptureFixture[str]) -> None:
    import inspect

    from distray.tasks import make_task

    defaults = inspect.signature(make_task).parameters
    code, out, _ = run_cli(capsys, "data", "make-task", "--help")
    assert code == 0
    text = " ".join(out.split())
    n_val, n_test = defaults["n_validation"].default, defaults["n_test"].default
    assert n_val == n_test  # the help text says "each"
    assert f"training rows (train.jsonl); validation.jsonl and test.jsonl get {n_val} rows each" in text


def test_make_task_and_make_tiny_call_their_functions(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import distray.tasks
    import distray.tiny

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        distray.tasks, "make_task", lambda *a: calls.append(("task", *a)) or {"train": "x"}, raising=False
    )
    monkeypatch.setattr(
        distray.tiny, "make_tiny", lambda out, **kw: calls.append(("tiny", out, kw)) or out
    )
    code, out, _ = run_cli(capsys, "data", "make-task", "reverse", "--out", "d", "--n", "40", "--seed", "3")
    assert code == 0 and "make-task ok" in out
    code, out, _ = run_cli(capsys, "make-tiny", "--out", "m", "--layers", "3", "--vocab", "600")
    assert code == 0 and "make-tiny ok" in out
    assert calls == [
        ("task", "reverse", "d", 40, 3),
        ("tiny", "m", {"layers": 3, "hidden": 128, "heads": 4, "vocab_size": 600}),
    ]
    code, _, err = run_cli(capsys, "make-tiny", "--out", "m", "--layers", "0")
    assert code == 2 and "must be ≥ 1" in err


# ---- stage dispatch ------------------------------------------------------------------------


def test_stage_runs_and_prints_one_summary_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config_file: Path,
    fake_stages: Path,
) -> None:
    fake_stage(monkeypatch, "generate", "fake_distray_stages.ok")
    code, out, _ = run_cli(capsys, "generate", "--config", str(config_file), "run.name=r2")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("generate ok in ")
    assert "rows 97" in lines[0] and "rows_per_s 12.35" in lines[0]
    assert "/runs/r2/generate/data" in lines[0]
    assert "rejects_dir" not in lines[0]  # None fields are left out
    import fake_distray_stages.ok as ok  # type: ignore[import-not-found]

    assert ok.CALLS[0].run.name == "r2"


def test_import_error_inside_a_stage_is_not_swallowed(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config_file: Path,
    fake_stages: Path,
) -> None:
    fake_stage(monkeypatch, "train", "fake_distray_stages.broken_import")
    with pytest.raises(ModuleNotFoundError, match="distray_missing_dependency_xyz"):
        cli.main(["train", "--config", str(config_file)])


def test_stage_failure_exits_1_one_line_traceback_only_verbose(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config_file: Path,
    fake_stages: Path,
) -> None:
    fake_stage(monkeypatch, "bench", "fake_distray_stages.fails")
    code, _, err = run_cli(capsys, "bench", "--config", str(config_file))
    assert code == 1
    assert err.strip().splitlines() == [
        "distray: error: teacher engine died: 3 of 4 replicas failed; check GPU memory"
    ]
    code, _, err = run_cli(capsys, "bench", "-v", "--config", str(config_file))
    assert code == 1 and "Traceback" in err and "StageError" in err


def test_run_passes_stages_and_force(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config_file: Path,
) -> None:
    import distray.pipeline

    calls: list[Any] = []

    @dataclass
    class PipelineResult:
        run_dir: str

        def summary(self) -> str:
            return f"run folder {self.run_dir}"

    monkeypatch.setattr(
        distray.pipeline,
        "run",
        lambda cfg, stages, force, confirm=None: calls.append((stages, force)) or PipelineResult(cfg.run_dir),
    )
    code, out, _ = run_cli(capsys, "run", str(config_file), "--stages", "generate,train", "--force", "train.lr=1e-5")
    assert code == 0
    assert calls == [(["generate", "train"], "all")]  # `--force a=b`: a=b is an override
    assert out.strip().startswith("run ok in ") and "run folder" in out
    code, _, _ = run_cli(capsys, "run", str(config_file), "--force", "train")
    assert code == 0 and calls[-1] == (None, "train")  # `--force STAGE`: that stage only
    code, _, err = run_cli(capsys, "run", str(config_file), "--stages", "generate,distil")
    assert code == 2 and "distil" in err
    code, _, err = run_cli(capsys, "run", str(config_file), "--stages", "serve")
    assert code == 2 and "choose from generate, train, evaluate, bench, report" in err


def test_run_help_offers_the_pipelines_stages(capsys: pytest.CaptureFixture[str]) -> None:
    from distray.pipeline import STAGES

    code, out, _ = run_cli(capsys, "run", "--help")
    assert code == 0
    assert f"only these stages, from {','.join(STAGES)}" in " ".join(out.split())
    assert "serve" not in ",".join(STAGES)  # the pipeline has no serve stage: bench deploys


# ---- which demo stand-ins a stage command builds ---------------------------------------------


@pytest.fixture
def demo_config(tmp_path: Path) -> Path:
    """A quickstart-like config: built-in task, demo teacher/student folders not built yet."""
    path = tmp_path / "demo.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "demo", "output_dir": str(tmp_path / "runs")},
                "data": {"builtin": {"name": "reverse", "n_train": 8, "n_validation": 0, "n_test": 4}},
                "teacher": {"kind": "vllm", "model": str(tmp_path / "cache" / "teacher")},
                "student": {"model": str(tmp_path / "cache" / "student-init")},
                "serve": {"serve_teacher": True},
                "demo": {"train_teacher": True},
            }
        )
    )
    return path


@pytest.fixture
def demo_calls(monkeypatch: pytest.MonkeyPatch, fake_stages: Path) -> list[bool]:
    """Each `prepare_demo` call, as whether it was asked for the baseline; every stage command
    runs the fake stage."""
    import distray.demo

    calls: list[bool] = []
    monkeypatch.setattr(
        distray.demo, "prepare_demo",
        lambda cfg, baseline=True: calls.append(baseline and "baseline" in cfg.evaluate.models),
    )
    for name in pipeline.COMMANDS:
        fake_stage(monkeypatch, name, "fake_distray_stages.ok")
    return calls


@pytest.mark.parametrize(
    ("command", "builds"), [("generate", [False]), ("train", [False]), ("evaluate", [True])]
)
def test_stage_commands_build_only_the_demo_parts_they_need(
    capsys: pytest.CaptureFixture[str], demo_config: Path, demo_calls: list[bool],
    command: str, builds: list[bool],
) -> None:
    code, _, err = run_cli(capsys, command, "--config", str(demo_config))
    assert code == 0, err
    assert demo_calls == builds  # generate/train: teacher + student init, no baseline
    import fake_distray_stages.ok as ok  # type: ignore[import-not-found]

    assert ok.CALLS[-1].evaluate.models == ["teacher", "student", "baseline"]  # config unchanged
    assert Path(ok.CALLS[-1].data.test).is_file()  # built-in task files written


def test_serve_and_bench_build_no_demo_and_say_what_to_run(
    capsys: pytest.CaptureFixture[str], demo_config: Path, demo_calls: list[bool]
) -> None:
    for command in ("serve", "bench"):
        code, _, err = run_cli(capsys, command, "--config", str(demo_config))
        assert code == 2
        assert "`distray generate` and `distray train` first (or `distray run`)" in err
    code, _, err = run_cli(capsys, "serve", "--config", str(demo_config), "serve.serve_teacher=false")
    assert code == 0, err
    ep = "bench.endpoints=[{name: s, base_url: 'http://127.0.0.1:1/v1', model: s}]"
    code, _, err = run_cli(capsys, "bench", "--config", str(demo_config), ep)
    assert code == 0, err  # measures given endpoints: deploys nothing, needs no teacher
    assert demo_calls == []


# ---- the public API ------------------------------------------------------------------------


def test_public_api_is_small_and_lazy() -> None:
    # The exact list is pinned in tests/unit/test_api.py.
    for name in distray.__all__:
        assert getattr(distray, name) is not None
    with pytest.raises(AttributeError):
        distray.not_a_name  # noqa: B018
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, distray; print('pyarrow' in sys.modules, 'ray' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stdout.split() == ["False", "False"]  # importing distray stays cheap


# ---- jobs/_entry.py (ray job submit entrypoints) ---------------------------------------------


@pytest.fixture
def entry() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "jobs" / "_entry.py"
    spec = importlib.util.spec_from_file_location("distray_jobs_entry", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "x.yaml", "--force", "a=1"],
        ["--config=x.yaml", "--force", "a=1"],
        ["-c", "x.yaml", "--force", "a=1"],
        ["-c=x.yaml", "--force", "a=1"],
        ["-cx.yaml", "--force", "a=1"],
        ["--force", "--config", "x.yaml", "a=1"],
    ],
)
def test_job_entry_moves_every_config_form_first(entry: Any, args: list[str]) -> None:
    out = entry.config_first(args)
    assert out[0] == "x.yaml"
    assert sorted(out[1:]) == ["--force", "a=1"]


def test_job_entry_config_without_a_path_is_a_usage_error(
    entry: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    for args in (["a=1", "--config"], ["--config", "--force"], ["--config="]):
        assert entry.main("run", args) == cli.EXIT_USAGE
        assert "--config needs a path" in capsys.readouterr().err
    assert calls == []
    assert entry.main("run", ["--config=x.yaml", "--stages", "generate"]) == 0
    assert calls == [["run", "x.yaml", "--stages", "generate"]]


def test_models_list_and_make_student_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from distray.tiny import make_tiny

    code, out, _ = run_cli(capsys, "models", "list")
    assert code == 0 and out.startswith("smollm2-135m-instruct\t") and "Apache-2.0" in out
    teacher = make_tiny(tmp_path / "t", layers=4, hidden=64, heads=2)
    code, out, err = run_cli(capsys, "make-student", "--from", teacher, "--layers", "2", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("make-student ok in ") and str(tmp_path / "s") in out
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 2
    code, _, err = run_cli(capsys, "models", "fetch", "smollm3")
    assert code == 2 and "smollm2-135m-instruct" in err


def test_data_check_applies_the_teachers_chat_template(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import shutil

    from distray.tiny import make_tiny

    model = Path(make_tiny(tmp_path / "m", layers=1, hidden=64, heads=2))
    # A template that refuses a system turn, as some instruct models' templates do.
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}\n{% endfor %}"
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}) + "\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": {"kind": "hf", "model": str(model)}, "student": {"model": str(model)}}))
    code, out, err = run_cli(capsys, "data", "check", str(rows), "--config", str(cfg))
    assert code == 0, err
    assert "1 valid" in out and "1 rejected" in out and "System role not supported" in out
    shutil.rmtree(model)
