"""The shipped examples run as a newcomer would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.test_orchestrator_serve import serving

ROOT = Path(__file__).resolve().parents[2]


def test_client_example_talks_to_an_orchestrator_hosting_the_assistant(tmp_path: Path) -> None:
    template = str(ROOT / "examples" / "templates" / "assistant")
    with serving(
        tmp_path / "serve", "--template", template, data_dir=tmp_path / "data", tcp="127.0.0.1"
    ) as server:
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "agent_runtime" / "client_example.py")],
            env={**os.environ, "PPIO_BASE_URL": server.base_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    assert "Response: {'answer': \"(1) you said 'Hello, world!'" in out
    assert "before that: 'my name is Ada'" in out  # the session remembered turn 1
    assert "chunk: said" in out  # and streamed turn 3
