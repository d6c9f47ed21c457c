"""Checkpoints distray reads itself are loaded as tensors only, never unpickled as code.

    .venv/bin/python -m pytest tests/unit/test_train_checkpoint.py -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distray.errors import StageError
from distray.train.export import load_checkpoint_state_dict


class _Payload:
    """Unpickling this runs a command: what a hostile checkpoint file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _stage0_checkpoint(root: Path, module: dict) -> Path:
    tag = root / "step00000001"
    tag.mkdir(parents=True)
    (root / "latest").write_text("step00000001")
    torch.save({"module": module, "ds_version": "0.19.8", "distray": {"step": 1}}, tag / "mp_rank_00_model_states.pt")
    return root


def test_a_plain_stage0_checkpoint_loads_as_fp32_tensors(tmp_path):
    ckpt = _stage0_checkpoint(tmp_path / "ok", {"w": torch.ones(2, 2, dtype=torch.bfloat16)})
    sd = load_checkpoint_state_dict(str(ckpt))
    assert sd["w"].dtype == torch.float32 and sd["w"].sum().item() == 4.0


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _stage0_checkpoint(tmp_path / "bad", {"w": torch.ones(1), "x": _Payload(marker)})
    with pytest.raises(StageError, match="mp_rank_00_model_states.pt"):
        load_checkpoint_state_dict(str(ckpt))
    assert not marker.exists()
