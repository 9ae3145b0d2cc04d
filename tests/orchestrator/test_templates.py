"""Templates: the .ppio-agent.yaml spec, deterministic archives, the SQLite store."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from ppio_sandbox.agent_runtime.errors import TemplateNotFoundError, ValidationError
from ppio_sandbox.orchestrator.templates import (
    AgentSpec,
    RuntimeSpec,
    SandboxSpec,
    TemplateStore,
    content_hash,
    load_agent_spec,
    pack_directory,
    parse_agent_yaml,
    parse_cpu,
    parse_size,
    template_id_for,
    unpack_archive,
)

pytestmark = pytest.mark.anyio  # the async (store) tests run on asyncio and trio

MiB = 1024 * 1024
BASE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Agent",
    "metadata": {"name": "echo", "version": "1.0.0", "author": "me@example.com"},
    "spec": {"entrypoint": "agent.py"},
}


def agent_yaml(**changes: Any) -> str:
    """BASE with dotted-path changes applied; a value of ... deletes the key."""
    doc: dict[str, Any] = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return yaml.safe_dump(doc)


def make_agent(directory: Path, text: str | None = None, code: str = "x = 1\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".ppio-agent.yaml").write_text(text if text is not None else agent_yaml())
    (directory / "agent.py").write_text(code)
    return directory


def stored(template_path: str, name: str = "") -> str | None:
    """A stored file's text, "<dir>" for a directory, None if absent (sync on purpose)."""
    path = Path(template_path) / name
    if path.is_dir():
        return "<dir>"
    return path.read_text() if path.is_file() else None


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


# -- parsing ------------------------------------------------------------------


def test_full_spec_parses_to_exact_structs() -> None:
    text = agent_yaml(
        metadata__description="says it back",
        metadata__created="2025-10-23T10:30:00Z",
        spec__envVars={"MODEL": "x"},
        spec__runtime={"timeout": 60, "memory_limit": "512Mi", "cpu_limit": "500m"},
        spec__sandbox={
            "kind": "process",
            "command": ["python", "app.py"],
            "warm_pool": 2,
            "env": {"KEY": "value", "PORT": 8080},
            "template_id": "my-echo",
        },
        status={"phase": "deployed", "template_id": "garbage", "build_id": [1, 2]},
    )
    assert parse_agent_yaml(text) == AgentSpec(
        name="echo",
        version="1.0.0",
        author="me@example.com",
        description="says it back",
        entrypoint="agent.py",
        runtime=RuntimeSpec(timeout=60.0, memory_limit=512 * MiB, cpu_limit=0.5),
        sandbox=SandboxSpec(
            kind="process",
            command=["python", "app.py"],
            warm_pool=2,
            env={"KEY": "value", "PORT": "8080"},
            template_id="my-echo",
        ),
    )


def test_minimal_spec_takes_defaults() -> None:
    text = "apiVersion: v1\nkind: Agent\nmetadata: {name: a}\nspec: {entrypoint: ./src/a.py}\n"
    assert parse_agent_yaml(text) == AgentSpec(name="a", entrypoint="src/a.py")
    assert RuntimeSpec().timeout == 300.0
    assert SandboxSpec().kind == "inprocess"


NAME_RULE = (
    "use lowercase letters, digits and '-' "
    "(1-48 characters, starting and ending with a letter or digit)"
)
ID_RULE = NAME_RULE.replace("1-48", "1-63")
PROCESS = {"spec__sandbox__kind": "process"}
ONLY_PROCESS = "only process sandboxes take it; set spec.sandbox.kind: process"
OUTSIDE = "must be a relative path inside the agent directory"
TIMEOUT = "spec.runtime.timeout: must be a number of seconds above 0 and at most 86400 (a day), got"
MEMORY = "is not a size; use e.g. 512Mi or 1Gi"
CPU = 'is not a CPU amount; use e.g. "1", 0.5 or "500m"'
NOT_LIST = "spec.sandbox.command: must be a non-empty list of strings, got"
POOL = "spec.sandbox.warm_pool: must be an integer from 0 to 100, got"
BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"apiVersion": "v2"}, "apiVersion: must be 'v1', got 'v2'"),
    ({"apiVersion": ...}, "apiVersion: must be 'v1', got None"),
    ({"kind": "Pod"}, "kind: must be 'Agent', got 'Pod'"),
    (
        {"extra": 1},
        "extra: unknown field; expected one of apiVersion, kind, metadata, spec, status",
    ),
    ({"metadata": [1]}, "metadata: must be a mapping, got a list"),
    ({"metadata__name": ...}, "metadata.name: required"),
    ({"metadata__name": "My Agent"}, f"metadata.name: 'My Agent' is not a valid name; {NAME_RULE}"),
    ({"metadata__name": "-echo"}, f"metadata.name: '-echo' is not a valid name; {NAME_RULE}"),
    ({"metadata__name": "a" * 49}, f"metadata.name: '{'a' * 49}' is not a valid name; {NAME_RULE}"),
    (
        {"metadata__nmae": "x"},
        "metadata.nmae: unknown field; expected one of author, created, description, name, version",
    ),
    (
        {"metadata__version": 1.1},
        'metadata.version: must be a string, got a number (quote it, e.g. "1.10")',
    ),
    ({"metadata__author": ["me"]}, "metadata.author: must be a string, got a list"),
    (
        {"metadata__description": "d" * 4097},
        "metadata.description: must be at most 4096 characters, without NUL bytes",
    ),
    ({"spec": "agent.py"}, "spec: must be a mapping, got a string"),
    ({"spec__entrypoint": ...}, "spec.entrypoint: required"),
    ({"spec__entrypoint": "../agent.py"}, f"spec.entrypoint: '../agent.py' {OUTSIDE}"),
    ({"spec__entrypoint": "/srv/agent.py"}, f"spec.entrypoint: '/srv/agent.py' {OUTSIDE}"),
    ({"spec__entrypoint": "."}, f"spec.entrypoint: '.' {OUTSIDE}"),
    (
        {"spec__entrypoint": "run.sh"},
        "spec.entrypoint: 'run.sh' must be a Python file (.py) unless a command is set",
    ),
    ({"spec__runtime": [60]}, "spec.runtime: must be a mapping, got a list"),
    (
        {"spec__runtime__memory": "1Gi"},
        "spec.runtime.memory: unknown field; expected one of cpu_limit, memory_limit, timeout",
    ),
    ({"spec__runtime__timeout": 0}, f"{TIMEOUT} 0"),
    ({"spec__runtime__timeout": -5}, f"{TIMEOUT} -5"),
    ({"spec__runtime__timeout": "60"}, f"{TIMEOUT} '60'"),
    ({"spec__runtime__timeout": True}, f"{TIMEOUT} True"),
    ({"spec__runtime__memory_limit": "12Zi"}, f"spec.runtime.memory_limit: '12Zi' {MEMORY}"),
    ({"spec__runtime__memory_limit": 0}, f"spec.runtime.memory_limit: 0 {MEMORY}"),
    ({"spec__runtime__cpu_limit": "2x"}, f"spec.runtime.cpu_limit: '2x' {CPU}"),
    ({"spec__runtime__cpu_limit": 0}, f"spec.runtime.cpu_limit: 0 {CPU}"),
    (
        {"spec__sandbox__kind": "docker"},
        "spec.sandbox.kind: must be 'inprocess' or 'process', got 'docker'",
    ),
    ({"spec__sandbox__command": ["python", "a.py"]}, f"spec.sandbox.command: {ONLY_PROCESS}"),
    ({"spec__sandbox__warm_pool": 2}, f"spec.sandbox.warm_pool: {ONLY_PROCESS}"),
    ({"spec__sandbox__env": {"A": "b"}}, f"spec.sandbox.env: {ONLY_PROCESS}"),
    ({**PROCESS, "spec__sandbox__command": "python app.py"}, f"{NOT_LIST} 'python app.py'"),
    ({**PROCESS, "spec__sandbox__command": []}, f"{NOT_LIST} []"),
    ({**PROCESS, "spec__sandbox__command": ["python", 1]}, f"{NOT_LIST} ['python', 1]"),
    ({**PROCESS, "spec__sandbox__warm_pool": -1}, f"{POOL} -1"),
    ({**PROCESS, "spec__sandbox__warm_pool": 101}, f"{POOL} 101"),
    ({**PROCESS, "spec__sandbox__warm_pool": "2"}, f"{POOL} '2'"),
    ({**PROCESS, "spec__sandbox__env": ["A=b"]}, "spec.sandbox.env: must be a mapping, got a list"),
    (
        {**PROCESS, "spec__sandbox__env": {"1BAD": "x"}},
        "spec.sandbox.env.1BAD: is not a valid environment variable name",
    ),
    (
        {**PROCESS, "spec__sandbox__env": {"DEBUG": True}},
        "spec.sandbox.env.DEBUG: must be a string, got a boolean",
    ),
    (
        {"spec__sandbox__template_id": "Foo_Bar"},
        f"spec.sandbox.template_id: 'Foo_Bar' is not a valid id; {ID_RULE}",
    ),
    (
        {"spec__sandbox__warmpool": 1},
        "spec.sandbox.warmpool: unknown field; "
        "expected one of command, env, kind, network, template_id, warm_pool",
    ),
]


@pytest.mark.parametrize(("changes", "message"), BAD_FIELDS)
def test_each_bad_field_is_named_in_the_error(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_agent_yaml(agent_yaml(**changes))
    assert caught.value.message == message
    assert caught.value.details == {"field": message.split(": ", 1)[0]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", ".ppio-agent.yaml: empty; expected apiVersion, kind, metadata and spec"),
        ("- a\n- b\n", ".ppio-agent.yaml: must be a mapping, got a list"),
        (
            "a: [1\n",
            ".ppio-agent.yaml: not valid YAML: "
            "expected ',' or ']', but got '<stream end>' at line 2",
        ),
        (
            "a: 1\n---\nb: 2\n",
            ".ppio-agent.yaml: not valid YAML: "
            "expected a single document in the stream, but found another document at line 2",
        ),
    ],
)
def test_documents_that_are_not_an_agent_mapping_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_agent_yaml(text)
    assert caught.value.message == message


def test_load_agent_spec_checks_the_entrypoint_on_disk(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent")
    assert load_agent_spec(agent).entrypoint == "agent.py"

    (agent / "agent.py").unlink()
    with pytest.raises(ValidationError, match=r"^spec.entrypoint: 'agent.py' is not a file in"):
        load_agent_spec(agent)

    (agent / "agent.py").mkdir()
    with pytest.raises(ValidationError, match=r"^spec.entrypoint: 'agent.py' is not a file in"):
        load_agent_spec(agent)

    (agent / "agent.py").rmdir()
    outside = tmp_path / "outside.py"
    outside.write_text("x = 1")
    (agent / "agent.py").symlink_to(outside)
    with pytest.raises(ValidationError) as caught:
        load_agent_spec(agent)
    assert caught.value.message == (
        "spec.entrypoint: 'agent.py' resolves outside the agent directory"
    )

    (agent / ".ppio-agent.yaml").unlink()
    with pytest.raises(ValidationError) as caught:
        load_agent_spec(agent)
    assert caught.value.message == (".ppio-agent.yaml: not found at the top of the agent directory")


def test_load_agent_spec_refuses_non_utf8(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent")
    (agent / ".ppio-agent.yaml").write_bytes(b"\xff\xfe name")
    with pytest.raises(ValidationError, match=r"^\.ppio-agent\.yaml: not UTF-8 text$"):
        load_agent_spec(agent)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512Mi", 512 * MiB),
        ("1Gi", 1024 * MiB),
        ("1G", 10**9),
        ("500k", 500_000),
        ("2Ki", 2048),
        ("1.5Gi", 1536 * MiB),
        ("1024", 1024),
        (1024, 1024),
        (" 64 Mi ", 64 * MiB),
    ],
)
def test_parse_size(value: str | int, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["12Zi", "1gb", "Mi", "", "0", "-1", "1.5.2Gi", 0, -5, True, 1.5])
def test_parse_size_refuses(value: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1.0), (0.5, 0.5), ("500m", 0.5), (2, 2.0), ("0.25", 0.25), ("1500m", 1.5)],
)
def test_parse_cpu(value: str | float, expected: float) -> None:
    assert parse_cpu(value) == expected


@pytest.mark.parametrize("value", ["2x", "m", "", "0", "0m", "-1", 0, -0.5, True, float("inf")])
def test_parse_cpu_refuses(value: Any) -> None:
    with pytest.raises(ValueError, match="CPU amount"):
        parse_cpu(value)


def test_template_id_is_name_and_digest_prefix_unless_explicit() -> None:
    spec = AgentSpec(name="echo", entrypoint="agent.py")
    assert template_id_for(spec, "deadbeef" + "0" * 56) == "echo-deadbeef"
    explicit = AgentSpec(name="echo", entrypoint="a.py", sandbox=SandboxSpec(template_id="mine"))
    assert template_id_for(explicit, "deadbeef") == "mine"
    bad = AgentSpec(name="echo", entrypoint="a.py", sandbox=SandboxSpec(template_id="No"))
    with pytest.raises(ValidationError, match=r"^spec.sandbox.template_id: 'No' is not a valid id"):
        template_id_for(bad, "deadbeef")


# -- archives -----------------------------------------------------------------


def archive_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


def test_pack_is_deterministic_and_ignores_mtimes_modes_and_junk(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent")
    (agent / "lib").mkdir()
    (agent / "lib" / "util.py").write_text("y = 2\n")
    first = pack_directory(agent)
    assert pack_directory(agent) == first
    assert content_hash(pack_directory(agent)) == content_hash(first)
    assert len(content_hash(first)) == 64

    os.utime(agent / "agent.py", (1, 1))
    os.chmod(agent / "lib" / "util.py", 0o600)
    for junk in (".git", "__pycache__", ".venv", "lib/__pycache__"):
        (agent / junk).mkdir()
        (agent / junk / "x").write_text("junk")
    (agent / "lib" / "util.cpython-311.pyc").write_bytes(b"\0")
    assert pack_directory(agent) == first
    assert archive_names(first) == [".ppio-agent.yaml", "agent.py", "lib", "lib/util.py"]

    (agent / "agent.py").write_text("x = 2\n")
    assert content_hash(pack_directory(agent)) != content_hash(first)


def test_status_written_back_by_the_cli_does_not_change_the_hash(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent")
    before = content_hash(pack_directory(agent))
    status = "status:\n  phase: deployed\n  last_deployed: '2025-10-23T10:35:00Z'\n"
    (agent / ".ppio-agent.yaml").write_text(agent_yaml() + status)
    assert content_hash(pack_directory(agent)) == before
    (agent / ".ppio-agent.yaml").write_text(agent_yaml(metadata__version="2.0.0") + status)
    assert content_hash(pack_directory(agent)) != before


def test_pack_then_unpack_round_trips_files_modes_and_inner_links(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent")
    (agent / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(agent / "run.sh", 0o755)
    (agent / "data").mkdir()
    (agent / "data" / "link.py").symlink_to("../agent.py")
    unpack_archive(pack_directory(agent), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "agent.py").read_text() == "x = 1\n"
    assert os.stat(out / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(out / "agent.py").st_mode & 0o111 == 0
    assert os.readlink(out / "data" / "link.py") == "../agent.py"


def test_pack_refuses_a_symlink_leading_outside(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent")
    (agent / "secrets").symlink_to("/etc/passwd")
    with pytest.raises(ValidationError, match=r"^secrets: symlink to '/etc/passwd' points outside"):
        pack_directory(agent)


def test_pack_refuses_an_absolute_symlink_even_to_inside(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "agent")
    (agent / "again.py").symlink_to(agent / "agent.py")
    with pytest.raises(ValidationError, match=r"^again.py: symlink to '/.*' points outside"):
        pack_directory(agent)


def link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return member(name, tarfile.SYMTYPE, target), None


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return member(name, tarfile.LNKTYPE, target), None


ONLY_FILES = "only files, directories and links are allowed"
UNSAFE: list[tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]] = [
    ([(member("../evil"), b"x")], "archive entry '../evil': '..' would leave the destination"),
    (
        [(member("a/../../evil"), b"x")],
        "archive entry 'a/../../evil': '..' would leave the destination",
    ),
    ([(member("/abs"), b"x")], "archive entry '/abs': absolute paths are not allowed"),
    ([link("pw", "/etc/passwd")], "archive entry 'pw': symlink to '/etc/passwd' points outside"),
    ([link("up", "../x")], "archive entry 'up': symlink to '../x' points outside"),
    (
        [link("y", "."), link("x", "y/y/../..")],
        "archive entry 'x': symlink resolves outside the destination",
    ),
    (
        [hard("hl", "../etc/passwd")],
        "archive entry '../etc/passwd': '..' would leave the destination",
    ),
    ([hard("hl", "missing")], "archive entry 'hl': hard link to 'missing', not in the archive"),
    ([(member("dev", tarfile.CHRTYPE), None)], f"archive entry 'dev': {ONLY_FILES}"),
    ([(member("fifo", tarfile.FIFOTYPE), None)], f"archive entry 'fifo': {ONLY_FILES}"),
    (
        [link("d", "sub"), (member("sub", tarfile.DIRTYPE), None), (member("d/x"), b"x")],
        "archive entry under 'd' goes through a non-directory",
    ),
    ([(member("a"), b"1"), (member("a"), b"2")], "archive entry 'a' appears twice"),
    ([(member("big"), b"x" * 2000)], "archive holds more than 1000 bytes of files"),
    ([(member(f"f{i}"), b"") for i in range(4)], "archive has more than 3 entries"),
]


@pytest.mark.parametrize(("members", "message"), UNSAFE)
def test_unsafe_archives_are_refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        unpack_archive(tar_bytes(*members), tmp_path / "out", max_bytes=1000, max_files=3)
    assert caught.value.message == message
    assert not (tmp_path / "evil").exists()


def test_a_gzip_bomb_is_cut_off_while_decompressing(tmp_path: Path) -> None:
    bomb = tar_bytes((member("zeros"), b"\0" * (8 * MiB)))
    assert len(bomb) < 64 * 1024
    with pytest.raises(ValidationError, match="more than"):
        unpack_archive(bomb, tmp_path / "out", max_bytes=MiB)


def test_garbage_is_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"^archive: not a valid tar.gz"):
        unpack_archive(b"\x1f\x8bnot really gzip", tmp_path / "out")
    with pytest.raises(ValidationError, match=r"^archive: not a valid tar.gz"):
        unpack_archive(b"plain garbage" * 100, tmp_path / "out2")


# -- the store ----------------------------------------------------------------


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    return make_agent(tmp_path / "agent")


async def test_put_get_list_delete(tmp_path: Path, agent_dir: Path) -> None:
    data = pack_directory(agent_dir)
    digest = content_hash(data)
    async with TemplateStore(tmp_path / "data") as store:
        template = await store.put_archive(data, "acme")
        assert (template.id, template.name, template.version) == (
            f"echo-{digest[:8]}",
            "echo",
            "1.0.0",
        )
        assert (template.tenant, template.phase, template.digest) == ("acme", "pending", digest)
        assert (template.build_log, template.error, template.deployed_at) == ("", None, None)
        assert template.created_at == template.updated_at
        assert template.spec == load_agent_spec(agent_dir)
        assert template.path == str(tmp_path / "data" / "templates" / digest)
        assert stored(template.path, "agent.py") == "x = 1\n"
        assert await store.get(template.id, "acme") == template
        assert await store.get(template.id) == template
        assert await store.list("acme") == [template]
        assert await store.list() == [template]

        assert await store.delete(template.id, "acme") == template
        assert await store.list() == []
        assert stored(template.path) is None
        with pytest.raises(TemplateNotFoundError, match=f"^template '{template.id}' not found$"):
            await store.get(template.id, "acme")
        with pytest.raises(TemplateNotFoundError):
            await store.delete(template.id, "acme")
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


async def test_a_tenant_sees_only_its_own_templates(tmp_path: Path, agent_dir: Path) -> None:
    async with TemplateStore(tmp_path / "data") as store:
        template = await store.register_directory(agent_dir, "acme")
        await store.set_phase(template.id, "deployed")
        for call in (store.get, store.resolve, store.delete):
            with pytest.raises(TemplateNotFoundError):
                await call(template.id, "globex")
        with pytest.raises(TemplateNotFoundError):
            await store.resolve("echo", "globex")
        with pytest.raises(TemplateNotFoundError):
            await store.set_phase(template.id, "failed", tenant="globex")
        assert await store.list("globex") == []
        assert (await store.get(template.id, "acme")).phase == "deployed"


async def test_identical_content_for_two_tenants_shares_the_id_and_files(
    tmp_path: Path, agent_dir: Path
) -> None:
    async with TemplateStore(tmp_path / "data") as store:
        mine = await store.register_directory(agent_dir, "acme")
        theirs = await store.register_directory(agent_dir, "globex")
        assert (theirs.id, theirs.path, theirs.tenant) == (mine.id, mine.path, "globex")
        assert len(await store.list()) == 2
        await store.delete(mine.id, "acme")
        assert stored(theirs.path) == "<dir>"
        assert await store.get(mine.id, "globex") == theirs
        await store.delete(theirs.id, "globex")
        assert stored(theirs.path) is None


async def test_redeploying_identical_content_returns_the_same_record(
    tmp_path: Path, agent_dir: Path
) -> None:
    async with TemplateStore(tmp_path / "data") as store:
        first = await store.register_directory(agent_dir, "acme")
        deployed = await store.set_phase(first.id, "deployed", log="ping ok")
        os.utime(agent_dir / "agent.py", (5, 5))
        assert await store.register_directory(agent_dir, "acme") == deployed
        assert await store.put_archive(pack_directory(agent_dir), "acme") == deployed

        (agent_dir / "agent.py").write_text("x = 2\n")
        second = await store.register_directory(agent_dir, "acme")
        assert second.id != first.id
        assert second.id.startswith("echo-")
        assert second.phase == "pending"
        assert {t.id for t in await store.list("acme")} == {first.id, second.id}
        assert stored(second.path, "agent.py") == "x = 2\n"
        assert stored(first.path, "agent.py") == "x = 1\n"


async def test_resolve_by_id_or_by_name_to_the_newest_deployed(
    tmp_path: Path, agent_dir: Path
) -> None:
    async with TemplateStore(tmp_path / "data") as store:
        with pytest.raises(TemplateNotFoundError, match=r"^no template or agent named 'echo'$"):
            await store.resolve("echo", "acme")
        old = await store.register_directory(agent_dir, "acme")
        with pytest.raises(
            TemplateNotFoundError, match=r"^agent 'echo' has no deployed template yet$"
        ):
            await store.resolve("echo", "acme")
        assert await store.resolve(old.id, "acme") == old  # an exact id, whatever its phase

        (agent_dir / "agent.py").write_text("x = 2\n")
        new = await store.register_directory(agent_dir, "acme")
        await store.set_phase(new.id, "deployed")
        await store.set_phase(old.id, "deployed")
        assert (await store.resolve("echo", "acme")).id == old.id
        await store.set_phase(new.id, "deployed")
        assert (await store.resolve("echo", "acme")).id == new.id
        await store.set_phase(new.id, "failed", error="smoke test failed")
        assert (await store.resolve("echo", "acme")).id == old.id
        assert (await store.resolve("echo", None)).id == old.id


async def test_set_phase_records_log_tail_error_and_deploy_time(
    tmp_path: Path, agent_dir: Path
) -> None:
    async with TemplateStore(tmp_path / "data") as store:
        template = await store.register_directory(agent_dir, "acme")
        building = await store.set_phase(template.id, "building", log="step 1\n")
        assert (building.phase, building.build_log, building.deployed_at) == (
            "building",
            "step 1\n",
            None,
        )
        assert building.updated_at > template.updated_at
        log = "".join(f"line {i}\n" for i in range(1000))
        failed = await store.set_phase(template.id, "failed", log=log, error="ping timed out")
        assert failed.build_log == log.encode()[-4096:].decode()
        assert len(failed.build_log.encode()) == 4096
        assert failed.error == "ping timed out"
        deployed = await store.set_phase(template.id, "deployed")
        assert (deployed.build_log, deployed.error) == (failed.build_log, None)
        assert deployed.deployed_at == deployed.updated_at
        with pytest.raises(ValueError, match="unknown phase 'done'"):
            await store.set_phase(template.id, "done")  # type: ignore[arg-type]
        with pytest.raises(TemplateNotFoundError):
            await store.set_phase("nope", "deployed")


async def test_templates_survive_a_restart(tmp_path: Path, agent_dir: Path) -> None:
    async with TemplateStore(tmp_path / "data") as store:
        template = await store.register_directory(agent_dir, "acme")
        deployed = await store.set_phase(template.id, "deployed", log="ok")
    async with TemplateStore(tmp_path / "data") as store:
        assert await store.get(template.id, "acme") == deployed
        assert await store.list() == [deployed]
        assert stored(deployed.path, "agent.py") is not None


async def test_an_interrupted_build_is_failed_on_reopen_and_retried_by_redeploy(
    tmp_path: Path, agent_dir: Path
) -> None:
    async with TemplateStore(tmp_path / "data") as store:
        pending = await store.register_directory(agent_dir, "acme")
        (agent_dir / "agent.py").write_text("x = 2\n")
        building = await store.register_directory(agent_dir, "acme")
        await store.set_phase(building.id, "building", log="starting")
    async with TemplateStore(tmp_path / "data") as store:
        for template_id in (pending.id, building.id):
            failed = await store.get(template_id)
            assert (failed.phase, failed.error) == ("failed", "interrupted by a restart")
        assert (await store.get(building.id)).build_log == "starting"
        retried = await store.register_directory(agent_dir, "acme")
        assert (retried.id, retried.phase, retried.error) == (building.id, "pending", None)
        assert retried.created_at == building.created_at


async def test_an_explicit_template_id_is_updated_in_place_within_its_tenant(
    tmp_path: Path, agent_dir: Path
) -> None:
    (agent_dir / ".ppio-agent.yaml").write_text(agent_yaml(spec__sandbox={"template_id": "mine"}))
    async with TemplateStore(tmp_path / "data") as store:
        first = await store.register_directory(agent_dir, "acme")
        assert first.id == "mine"
        await store.set_phase("mine", "deployed")
        (agent_dir / "agent.py").write_text("x = 2\n")
        second = await store.register_directory(agent_dir, "acme")
        assert (second.id, second.phase, second.deployed_at) == ("mine", "pending", None)
        assert second.digest != first.digest
        assert second.created_at == first.created_at
        assert [t.digest for t in await store.list()] == [second.digest]
        assert stored(first.path) == "<dir>"  # old files may still serve sessions until restart

        # Another tenant's 'mine' is its own: a second row, and acme's stays as it was.
        (agent_dir / "agent.py").write_text("x = 3\n")
        theirs = await store.register_directory(agent_dir, "globex")
        assert (theirs.id, theirs.tenant, theirs.phase) == ("mine", "globex", "pending")
        assert theirs.digest not in (first.digest, second.digest)
        assert await store.get("mine", "acme") == second
        assert await store.get("mine", "globex") == theirs
        await store.delete("mine", "globex")
        assert await store.get("mine", "acme") == second
    async with TemplateStore(tmp_path / "data"):
        assert stored(first.path) is None
        assert stored(theirs.path) is None
        assert stored(second.path) == "<dir>"


async def test_uploads_are_validated_and_leave_nothing_behind(
    tmp_path: Path, agent_dir: Path
) -> None:
    async with TemplateStore(tmp_path / "data", max_archive_bytes=10_000) as store:
        with pytest.raises(ValidationError, match=r"^archive entry '\.\./evil'"):
            await store.put_archive(tar_bytes((member("../evil"), b"x")), "acme")
        (agent_dir / ".ppio-agent.yaml").write_text(agent_yaml(kind="Pod"))
        with pytest.raises(ValidationError, match=r"^kind: must be 'Agent', got 'Pod'$"):
            await store.register_directory(agent_dir, "acme")
        with pytest.raises(ValidationError, match=r"^archive holds more than 10000 bytes"):
            await store.put_archive(tar_bytes((member("big"), b"x" * 20_000)), "acme")
        assert await store.list() == []
    assert list((tmp_path / "data" / "tmp").iterdir()) == []
    assert list((tmp_path / "data" / "templates").iterdir()) == []


async def test_an_archive_of_the_folder_itself_is_accepted(tmp_path: Path, agent_dir: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(agent_dir, arcname="my-agent")
    async with TemplateStore(tmp_path / "data") as store:
        template = await store.put_archive(buf.getvalue(), "acme")
        assert template.digest == content_hash(pack_directory(agent_dir))
        assert stored(template.path, ".ppio-agent.yaml") is not None


async def test_one_store_per_data_dir(tmp_path: Path) -> None:
    async with TemplateStore(tmp_path / "data"):
        with pytest.raises(RuntimeError, match="in use by another TemplateStore"):
            await TemplateStore(tmp_path / "data").open()
    async with TemplateStore(tmp_path / "data") as store:
        assert await store.list() == []
    with pytest.raises(RuntimeError, match="not open"):
        await store.list()


async def test_concurrent_deploys_of_the_same_content_make_one_record(
    tmp_path: Path, agent_dir: Path
) -> None:
    data = pack_directory(agent_dir)
    results: list[Any] = []
    async with TemplateStore(tmp_path / "data") as store:

        async def deploy(tenant: str) -> None:
            results.append(await store.put_archive(data, tenant))

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(deploy, "acme" if i % 2 else "globex")
        assert len({(t.tenant, t.id, t.created_at) for t in results}) == 2
        assert sorted(t.tenant for t in await store.list()) == ["acme", "globex"]
        assert len(list((tmp_path / "data" / "templates").iterdir())) == 1
