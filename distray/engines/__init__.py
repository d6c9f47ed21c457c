"""The engine layer every stage shares, one module per `teacher.kind`: vllm (ray.data.llm),
openai (HTTP), hf (transformers generate). `engine_for(config)` gives the kind's `Engine`
(`engines.base`), whose `generate(ds, sampling, logprobs, max_prompt_tokens=...)` fills
`engines.common.RESULT_COLUMNS` on teacher rows and keeps the row's own columns.

    python -c "from distray.engines import engine_for; help(engine_for)"

Beside the engines: `common` (prompt preparation, finish reasons, top-k), `results` (the error
marker and the rejects record).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

from distray.engines.base import Endpoint, Engine

if TYPE_CHECKING:
    from distray.config import HFTeacher, OpenAITeacher, VLLMTeacher

__all__ = ["Endpoint", "Engine", "engine_for"]

#: kind → the module whose `ENGINE` class runs it (imported on first use: vLLM, HTTP and
#: transformers code load only for the kind a run uses).
_MODULES = {"vllm": "distray.engines.vllm", "openai": "distray.engines.openai", "hf": "distray.engines.hf"}


def engine_for(config: VLLMTeacher | OpenAITeacher | HFTeacher) -> Engine:
    """The `Engine` of `config.kind`.

    Raises:
        TypeError: a config of no known kind.
    """
    module = _MODULES.get(getattr(config, "kind", ""))
    if module is None:
        raise TypeError(f"unknown engine kind of {type(config).__name__}; known: {sorted(_MODULES)}")
    return cast(Engine, importlib.import_module(module).ENGINE(config))
