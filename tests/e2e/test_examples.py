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
    keys = ("--api-key", "demo:k1:s3cret")
    with serving(
        tmp_path / "serve",
        "--template",
        template,
        *keys,
        data_dir=tmp_path / "data",
        tcp="127.0.0.1",
    ) as server:
        credentials = {
            "PPIO_API_KEY": "k1",
            "PPIO_API_SECRET": "s3cret",
            "PPIO_BEARER_TOKEN": "s3cret",
        }
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "agent_runtime" / "client_example.py")],
            env={**os.environ, "PPIO_BASE_URL": server.base_url, **credentials},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    assert "auth='hmac'" in out  # the seed's HMAC client
    assert "Templates: assistant (deployed)" in out
    assert "Response: {'answer': \"(1) you said 'Hello, world!'" in out
    assert "before that: 'my name is Ada'" in out  # the session remembered turn 1
    assert "chunk: said" in out  # and streamed turn 3
    assert "Session closed: session sess-" in out
    assert "Template not found: " in out
    assert "no-such-agent" in out
    assert "Bearer response: {'answer': \"(1) you said 'bearer?'" in out
    assert "Authentication failed" not in out
    assert "Unexpected" not in out


def test_demo_runs_both_parts_through_the_client_and_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--sessions", "20", "--turns", "2"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PPIO_")},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "POST /invocations 'hello' -> {'response': 'Processed: hello'" in out  # part 1
    assert "templates: assistant-" in out  # part 2, through the client
    assert "one-shot: (1) you said 'hello'" in out
    assert "  turn 3: (3) you said 'thanks'; before that: 'what is the weather?'" in out
    assert "  streamed: (4) you said 'stream it'" in out
    cli_table = out.split("$ ppio-sandbox-cli session list\n", 1)[1].splitlines()
    assert cli_table[0].split()[:3] == ["SESSION", "ID", "TEMPLATE"]
    assert cli_table[1].split()[2:4] == ["ready", "4"]  # the session, mid-conversation
    assert "turns answered      | 40" in out
    assert "errors              | 0" in out
    assert "demo finished" in out
    assert "burst [" in done.stderr  # the progress bar


def test_cluster_demo_moves_a_session_off_a_killed_node() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.cluster_demo"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PPIO_")},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("owner n1:") == 3  # turns 2-4, sent through other nodes, ran on n1
    assert "kill -9 n1" in out
    assert "restored from its checkpoint: (5) you said 'again'; before that: 'p4'" in out
    assert "members now: n2, n3" in out
