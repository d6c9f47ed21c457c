"""`ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/X.yaml [key=value ...]`

The whole pipeline (same as `distray run X.yaml ...`) on the job's Ray cluster: generate →
train → evaluate → serve + bench → report. Extra flags: `--stages generate,train`, `--force`.

runtime_env settings (pass with --runtime-env-json or a runtime_env.yaml):
- env_vars: HF_TOKEN for gated hub models; OPENAI_API_KEY (or the variable named by
  teacher.api_key_env) for API teachers; VLLM_CPU_KVCACHE_SPACE on CPU-only clusters.
- pip: only when the cluster image lacks distray: ["distray[gpu]"]; otherwise the uploaded
  working dir is imported as is.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main("run"))
