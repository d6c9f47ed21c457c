"""The seed's Azure ML example, on distray: distil a teacher into a student, then evaluate.

    python examples/seed_azure_example.py            # runs on an embedded local Ray, CPU, minutes
    python examples/seed_azure_example.py --submit http://127.0.0.1:8265   # as a Ray job

The seed's sample uses DeepSeek-V3 and Phi-4-mini; this file runs anywhere, so it uses the
quickstart's stand-ins (a 3.2M-parameter teacher distray trains itself on the built-in `reverse`
task, and an 8× smaller student). Swap in `teacher_model="deepseek-ai/DeepSeek-V3"` and
`student_model="microsoft/Phi-4-mini-instruct"` on a GPU cluster.
"""

from __future__ import annotations

import argparse
import json
import logging

from distray import DistillationJob


def build_job() -> DistillationJob:
    return DistillationJob(
        teacher_model={
            "kind": "vllm",
            "name": "demo-teacher-3M",
            "model": "runs/_cache/demo-teacher-reverse",
            "engine_kwargs": {"max_model_len": 128, "enforce_eager": True, "dtype": "float32"},
        },
        student_model="runs/_cache/demo-student-init",
        task_type="custom",
        hyperparameters={
            "learning_rate": 3e-3,
            "batch_size": 32,
            "num_epochs": 6,
            "temperature": 0.0,  # the teacher's sampling temperature (its output softness)
            "logprobs": 5,
            "loss": "kd",
        },
        name="seed-example",
        data={"builtin": {"name": "reverse", "n_train": 4000, "n_validation": 200, "n_test": 200}},
        demo={"train_teacher": True},
        generate={"sampling": {"max_tokens": 16}},
        train={"max_seq_len": 48, "warmup_steps": 20},
        evaluate={
            "max_tokens": 16,
            "engine_kwargs": {"max_model_len": 128, "enforce_eager": True, "dtype": "float32"},
        },
        resources={"num_cpus": 4},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submit", metavar="ADDRESS", help="submit as a Ray job to this address")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = build_job()
    if args.submit:
        job.submit(args.submit)
        print("job status:", job.status())
        print("final status:", job.wait())
    else:
        # Stages 1 and 2 of the seed's process; run() also trains the baseline student on
        # demo.baseline_labels ground-truth labels, which evaluate() then compares against.
        job.run(stages=["generate", "train"])
        results = job.evaluate(metrics=["accuracy", "bleu_score", "inference_time"])
        print(json.dumps(results["comparison"], indent=2))
        print("every figure:", results["metrics_path"], "| report:", results["report_path"])
