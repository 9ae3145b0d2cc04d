"""A template a tenant deploys that is also shared is listed once: the tenant's own.

The README's walkthrough copies ``examples/templates/assistant`` (served with
``serve --template``) and deploys the copy: the same content, so the same
template id, held by the tenant and by the shared set. ``GET /v1/templates``
and ``ppio-sandbox-cli agent list`` show it once, the tenant's record (an
record the deploy made, created after the shared one); a tenant without a
copy still sees the shared one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_cli_client import ECHO, cli
from tests.e2e.test_orchestrator_serve import ServeProcess

KEYS = {"own": ("k-own", "s3cret-own"), "other": ("k-other", "s3cret-other")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("listing")
    keys = [f"{tenant}:{key}:{secret}" for tenant, (key, secret) in KEYS.items()]
    args = ["--template", str(ECHO), "--log-level", "WARNING"]
    for spec in keys:
        args += ["--api-key", spec]
    with ServeProcess(root / "work", *args, data_dir=root / "data", tcp="127.0.0.1") as served:
        yield served


def listed(server: ServeProcess, tenant: str) -> list[dict[str, Any]]:
    secret = KEYS[tenant][1]
    reply = httpx.get(
        f"{server.base_url}/v1/templates",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return list(reply.json()["templates"])


def test_a_tenants_copy_of_a_shared_template_is_listed_once(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, tmp_path: Path
) -> None:
    (shared,) = [t for t in listed(server, "own") if t["name"] == "echo"]

    copy = tmp_path / "my-agent"
    shutil.copytree(ECHO, copy)
    key, secret = KEYS["own"]
    auth = ["--api-key", key, "--api-secret", secret]
    deployed = cli(
        capsys,
        server,
        "agent deploy --json --config",
        str(copy / ".ppio-agent.yaml"),
        *auth,
        auth=False,
    )
    assert deployed.code == 0, deployed.err
    own = deployed.json()["template"]
    assert own["template_id"] == shared["template_id"]  # same content, same id
    assert own["created_at"] > shared["created_at"]  # but a record of the tenant's own

    # Through the API: one record of that id, the tenant's own.
    mine = [t for t in listed(server, "own") if t["template_id"] == shared["template_id"]]
    assert len(mine) == 1, mine
    assert mine[0]["created_at"] == own["created_at"]

    # Through the CLI: once in the JSON, one row in the table.
    as_json = cli(capsys, server, "agent list --json", *auth, auth=False)
    assert as_json.code == 0, as_json.err
    ids = [t["template_id"] for t in as_json.json()["templates"]]
    assert ids.count(shared["template_id"]) == 1, ids
    table = cli(capsys, server, "agent list", *auth, auth=False)
    assert table.code == 0, table.err
    rows = [line.split() for line in table.out.splitlines()[1:]]
    assert [row[0] for row in rows].count(shared["template_id"]) == 1, table.out

    # Another tenant has no copy: it sees the shared template, as before.
    (theirs,) = [t for t in listed(server, "other") if t["template_id"] == shared["template_id"]]
    assert theirs["created_at"] == shared["created_at"]
