"""Serving never copies a half-exported student from a bucket."""

from __future__ import annotations

import pytest

from distray import storage
from distray.cluster import EXPORT_MARKER, localize_model
from distray.errors import StageError


def test_a_run_student_without_its_export_marker_is_not_copied() -> None:
    pytest.importorskip("fsspec")
    root = "memory://bucket/runs/r/train/student"
    storage.write_text(f"{root}/config.json", "{}")
    storage.write_text(f"{root}/model.safetensors", "half")  # the upload is still going
    with pytest.raises(StageError, match=EXPORT_MARKER):
        localize_model(root)
