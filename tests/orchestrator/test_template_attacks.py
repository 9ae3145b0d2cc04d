"""Hostile template uploads: every one is a 400 naming the problem, none a 5xx or a stall.

Each attack comes from an adversarial run (issue 11): YAML alias bombs and
deep nesting, symlink loops, odd tar entries and names, absurd numbers. They
are tried at the unit that must refuse them (the YAML loader, the spec, the
unpacker, the packer) and then all together through ``POST /v1/templates``
of a real server, which must keep answering ``/ping`` meanwhile.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from ppio_sandbox.agent_runtime.errors import ValidationError
from ppio_sandbox.agent_runtime.packaging import _without_status
from ppio_sandbox.client._agent_yaml import replace_status
from ppio_sandbox.orchestrator.templates import (
    TemplateStore,
    load_agent_spec,
    pack_directory,
    parse_agent_yaml,
    unpack_archive,
)

from .conftest import orchestrator
from .test_templates import hard, link, make_agent, member, tar_bytes

MiB = 1024 * 1024
HEAD = "apiVersion: v1\nkind: Agent\nmetadata: {name: attack}\nspec: {entrypoint: agent.py}\n"
NOT_YAML = ".ppio-agent.yaml: not valid YAML:"
ANCHORS = "anchors and aliases (&name, *name) are not allowed"
LOOP = "symlink loop (or a chain of more than 40 links)"
GZIP = {"Content-Type": "application/gzip"}


def bomb(levels: int = 9, width: int = 10) -> str:
    """A "billion laughs" agent file: ``width ** levels`` strings from ~600 bytes.

    It sits in ``spec.envVars`` (any value is accepted there) next to a
    ``status`` block, so code that strips ``status`` by comparing parsed
    documents compares two such trees.
    """
    lines = [f"    l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return (
        "apiVersion: v1\nkind: Agent\nmetadata: {name: bomb}\n"
        "spec:\n  entrypoint: agent.py\n  envVars:\n"
        + "\n".join(lines)
        + "\nstatus: {phase: deployed}\n"
    )


def with_spec(runtime: str = "", sandbox: str = "", metadata: str = "name: attack") -> str:
    spec = ["entrypoint: agent.py"]
    spec += [f"runtime: {{{runtime}}}"] if runtime else []
    spec += [f"sandbox: {{{sandbox}}}"] if sandbox else []
    return f"apiVersion: v1\nkind: Agent\nmetadata: {{{metadata}}}\nspec: {{{', '.join(spec)}}}\n"


# -- the YAML itself ----------------------------------------------------------

HOSTILE_YAML: list[Any] = [
    pytest.param(bomb(), f"{NOT_YAML} {ANCHORS} at line 7", id="billion-laughs"),
    pytest.param(HEAD + "status: &a [1]\n", f"{NOT_YAML} {ANCHORS} at line 5", id="anchor"),
    pytest.param(
        HEAD + "status: " + "[" * 10_000 + "]" * 10_000 + "\n",
        f"{NOT_YAML} nested more than 32 levels deep at line 5",
        id="deep-flow-list",
    ),
    pytest.param(
        HEAD + "status: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
        f"{NOT_YAML} nested more than 32 levels deep at line 5",
        id="deep-flow-map",
    ),
    pytest.param(
        HEAD + "status:\n" + "".join(f"{' ' * (i + 1)}a:\n" for i in range(40)),
        f"{NOT_YAML} nested more than 32 levels deep at line 37",
        id="deep-block-map",
    ),
    pytest.param(
        HEAD + "status: [" + "1, " * 20_000 + "1]\n",
        f"{NOT_YAML} more than 10000 values at line 5",
        id="too-many-values",
    ),
    pytest.param(
        HEAD.replace("{name: attack}", "{name: attack, created: 2025-13-45}"),
        f"{NOT_YAML} cannot read the value (month must be in 1..12) at line 3",
        id="impossible-date",
    ),
    pytest.param(
        HEAD + "status: " + "9" * 5000 + "\n",
        f"{NOT_YAML} an integer of more than 100 digits; quote it if it is text at line 5",
        id="5000-digit-integer",
    ),
    pytest.param(
        HEAD.replace("{name: attack}", '{name: attack, description: "\\udcff"}'),
        f"{NOT_YAML} a string holds a lone surrogate (\\ud800-\\udfff) at line 3",
        id="lone-surrogate",
    ),
    pytest.param(
        HEAD + "#" * (256 * 1024) + "\n",
        ".ppio-agent.yaml: larger than 262144 bytes",
        id="oversize-text",
    ),
]


@pytest.mark.parametrize(("text", "message"), HOSTILE_YAML)
def test_hostile_yaml_is_refused_before_anything_is_built(text: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_agent_yaml(text)
    assert caught.value.message == message


RANGE = "must be a number of seconds above 0 and at most 86400 (a day), got"
OUT_OF_RANGE: list[Any] = [
    pytest.param("timeout: 86401", f"spec.runtime.timeout: {RANGE} 86401", id="timeout-past-a-day"),
    pytest.param(
        "timeout: 99999999999999999999999",
        f"spec.runtime.timeout: {RANGE} 99999999999999999999999",
        id="timeout-huge-int",
    ),
    pytest.param("timeout: 1.0e+400", f"spec.runtime.timeout: {RANGE} inf", id="timeout-1e400"),
    pytest.param("timeout: .nan", f"spec.runtime.timeout: {RANGE} nan", id="timeout-nan"),
    pytest.param(
        "memory_limit: 2Ti", "spec.runtime.memory_limit: '2Ti' is more than 1Ti", id="mem"
    ),
    pytest.param(
        "memory_limit: " + "9" * 60,
        "spec.runtime.memory_limit: 999999999999999999...9999999999999999999 is more than 1Ti",
        id="memory-60-digits",
    ),
    pytest.param(
        "cpu_limit: 2000", "spec.runtime.cpu_limit: 2000 is more than 1024 cores", id="cpu"
    ),
    pytest.param(
        "cpu_limit: " + "9" * 400,
        f"{NOT_YAML} an integer of more than 100 digits; quote it if it is text at line 4",
        id="cpu-400-digits",
    ),
    pytest.param(
        "cpu_limit: '" + "9" * 400 + "'",
        f"spec.runtime.cpu_limit: '{'9' * 37}...{'9' * 38}' is not a CPU amount; "
        'use e.g. "1", 0.5 or "500m"',
        id="cpu-400-digit-string",
    ),
]


@pytest.mark.parametrize(("runtime", "message"), OUT_OF_RANGE)
def test_numbers_must_be_in_a_sane_range(runtime: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_agent_yaml(with_spec(runtime=runtime))
    assert caught.value.message == message


def test_a_quoted_value_in_a_message_is_cut_short() -> None:
    text = with_spec(sandbox="kind: process, command: [" + ", ".join(["1"] * 5000) + "]")
    with pytest.raises(ValidationError) as caught:
        parse_agent_yaml(text)
    assert caught.value.message == (
        "spec.sandbox.command: must be a non-empty list of strings, "
        "got [1, 1, 1, 1, 1, 1, 1, 1, ...]"
    )


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        pytest.param('"\\0"', "'\\x00'", id="nul"),
        pytest.param("k" * 100, f"'{'k' * 37}...{'k' * 38}'", id="long"),
    ],
)
def test_an_odd_key_is_quoted_in_the_message(key: str, shown: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_agent_yaml(HEAD.replace("metadata: {", f"metadata: {{{key}: 1, "))
    assert caught.value.message == (
        f"metadata.{shown}: unknown field; "
        "expected one of author, created, description, name, version"
    )


def test_the_status_strip_does_not_expand_a_bomb() -> None:
    # The packer drops `status` only when it can prove the cut by parsing:
    # a document it refuses to parse keeps its status (and is refused later).
    data = bomb().encode()
    assert _without_status(data) == data


def test_the_cli_status_write_back_refuses_a_bomb() -> None:
    with pytest.raises(ValidationError, match=re.escape(ANCHORS)):
        replace_status(bomb(), {"phase": "deployed"})


# -- the agent directory -------------------------------------------------------


def agent_with(tmp_path: Path, text: str = HEAD) -> Path:
    return make_agent(tmp_path / "agent", text)


def self_loop(agent: Path, name: str) -> None:
    (agent / name).unlink()
    (agent / name).symlink_to(name)


def test_a_symlink_loop_as_the_entrypoint_is_named(tmp_path: Path) -> None:
    agent = agent_with(tmp_path)
    self_loop(agent, "agent.py")
    with pytest.raises(ValidationError) as caught:
        load_agent_spec(agent)
    assert caught.value.message == f"spec.entrypoint: 'agent.py' is a {LOOP}"


def test_an_entrypoint_under_a_looping_directory_is_named(tmp_path: Path) -> None:
    agent = agent_with(tmp_path, HEAD.replace("agent.py", "sub/agent.py"))
    (agent / "sub").symlink_to("sub")
    with pytest.raises(ValidationError) as caught:
        load_agent_spec(agent)
    assert caught.value.message == f"spec.entrypoint: 'sub/agent.py' is a {LOOP}"


def test_a_symlink_loop_as_the_agent_file_is_named(tmp_path: Path) -> None:
    agent = agent_with(tmp_path)
    self_loop(agent, ".ppio-agent.yaml")
    with pytest.raises(ValidationError) as caught:
        load_agent_spec(agent)
    assert caught.value.message == f".ppio-agent.yaml: {LOOP}"


def test_a_chain_of_41_symlinks_to_the_agent_file_is_a_loop(tmp_path: Path) -> None:
    agent = agent_with(tmp_path)
    os.rename(agent / ".ppio-agent.yaml", agent / "l0")
    for i in range(1, 41):
        (agent / f"l{i}").symlink_to(f"l{i - 1}")
    (agent / ".ppio-agent.yaml").symlink_to("l40")
    with pytest.raises(ValidationError) as caught:
        load_agent_spec(agent)
    assert caught.value.message == f".ppio-agent.yaml: {LOOP}"
    (agent / ".ppio-agent.yaml").unlink()
    (agent / ".ppio-agent.yaml").symlink_to("l39")  # 40 links: what Linux follows
    assert load_agent_spec(agent).name == "attack"


def test_the_agent_file_must_be_a_regular_file_inside(tmp_path: Path) -> None:
    agent = agent_with(tmp_path)
    (agent / ".ppio-agent.yaml").unlink()
    (agent / ".ppio-agent.yaml").mkdir()
    with pytest.raises(ValidationError) as caught:
        load_agent_spec(agent)
    assert caught.value.message == ".ppio-agent.yaml: not a regular file"

    (agent / ".ppio-agent.yaml").rmdir()
    (tmp_path / "elsewhere.yaml").write_text(HEAD)
    (agent / ".ppio-agent.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    with pytest.raises(ValidationError) as caught:
        load_agent_spec(agent)
    assert caught.value.message == (
        ".ppio-agent.yaml: a symlink that resolves outside the agent directory"
    )


def looping(agent: Path) -> None:
    (agent / "a").symlink_to("b")
    (agent / "b").symlink_to("a")


def self_looping(agent: Path) -> None:
    self_loop(agent, "agent.py")


def not_utf8(agent: Path) -> None:
    with open(os.path.join(os.fsencode(agent), b"caf\xe9.py"), "w"):
        pass


def too_deep(agent: Path) -> None:
    (agent / "/".join(["d"] * 70)).mkdir(parents=True)


def bomb_file(agent: Path) -> None:
    (agent / ".ppio-agent.yaml").write_text(bomb())


BAD_DIRECTORIES: list[Any] = [
    pytest.param(self_looping, f"agent.py: {LOOP}", id="entrypoint-loop"),
    pytest.param(looping, f"a: {LOOP}", id="a-b-loop"),
    pytest.param(not_utf8, "'caf\\udce9.py': the file name is not valid UTF-8", id="not-utf8"),
    pytest.param(
        too_deep, "/".join(["d"] * 65) + ": more than 64 directory levels deep", id="too-deep"
    ),
    pytest.param(bomb_file, f"{NOT_YAML} {ANCHORS} at line 7", id="yaml-bomb"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("spoil", "message"), BAD_DIRECTORIES)
async def test_serve_template_dir_refuses_with_a_validation_error(
    tmp_path: Path, spoil: Any, message: str
) -> None:
    """``serve --template DIR`` registers the directory through this call."""
    agent = agent_with(tmp_path)
    spoil(agent)
    async with TemplateStore(tmp_path / "data") as store:
        with pytest.raises(ValidationError) as caught:
            await store.register_directory(agent, "acme")
        assert caught.value.message == message
        assert await store.list() == []


# -- the archive ---------------------------------------------------------------


def pax_record(key: bytes, value: bytes) -> bytes:
    """One ``"<length> key=value\\n"`` PAX record, its length counting itself."""
    rest = b" " + key + b"=" + value + b"\n"
    length = len(rest) + len(str(len(rest)))
    length = len(rest) + len(str(length))
    return str(length).encode() + rest


def pax_file(records: bytes) -> bytes:
    """A tar whose first member carries these raw PAX records (malformed on purpose)."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(records)
    body = member("x")
    body.size = 0
    return (
        header.tobuf(tarfile.USTAR_FORMAT)
        + records
        + b"\0" * (-len(records) % 512)
        + body.tobuf(tarfile.USTAR_FORMAT)
        + b"\0" * 1024
    )


def raw_tar(*entries: tuple[bytes, bytes | None, bytes]) -> bytes:
    """A plain (GNU) tar of ``(name, content or None for a symlink, link target)``
    entries, names as raw bytes: tarfile cannot be asked to write bad UTF-8."""
    blocks = []
    for name, content, target in entries:
        info = member(name.decode("utf-8", "surrogateescape"))
        if content is None:
            info.type, info.linkname = tarfile.SYMTYPE, target.decode("utf-8", "surrogateescape")
        info.size = len(content or b"")
        blocks.append(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        blocks.append((content or b"") + b"\0" * (-len(content or b"") % 512))
    return b"".join(blocks) + b"\0" * 1024


LONG = "n" * 300
UNSAFE_ARCHIVES: list[Any] = [
    pytest.param(tar_bytes(link("agent.py", "agent.py")), f"'agent.py': {LOOP}", id="self-loop"),
    pytest.param(tar_bytes(link("a", "b"), link("b", "a")), f"'a': {LOOP}", id="a-b-loop"),
    pytest.param(
        tar_bytes((member("l0"), b"x"), *(link(f"l{i}", f"l{i - 1}") for i in range(1, 42))),
        f"'l41': {LOOP}",
        id="chain-of-41",
    ),
    pytest.param(
        tar_bytes((member("f"), b"x"), *(link(f"m{i}", f"f/../m{i - 1}") for i in range(1, 3000))),
        f"'m41': {LOOP}",
        id="chain-through-file-dotdot",
    ),
    pytest.param(
        tar_bytes((member("a/" + "/".join(["d"] * 64)), b"x")),
        f"{('a' + '/d' * 64)[:60]!r}...(129 characters): more than 64 directory levels deep",
        id="too-deep",
    ),
    pytest.param(
        tar_bytes((member(LONG), b"x")),
        f"{LONG[:60]!r}...(300 characters): a name component is longer than 255 bytes",
        id="long-component",
    ),
    pytest.param(
        tar_bytes((member("/".join([LONG[:200]] * 6)), b"x")),
        f"{LONG[:60]!r}...(1205 characters): the name is longer than 1024 bytes",
        id="long-name",
    ),
    pytest.param(
        raw_tar((b"caf\xe9.py", b"x", b"")),
        "'caf\\udce9.py': the name is not valid UTF-8",
        id="name-not-utf8",
    ),
    pytest.param(
        raw_tar((b"l", None, b"caf\xe9.py")),
        "'l': the link target is not valid UTF-8",
        id="link-target-not-utf8",
    ),
    pytest.param(
        tar_bytes(link("l", "\0" + "x" * 200)),
        "'l': an empty or NUL link target",
        id="link-target-with-nul",
    ),
    pytest.param(tar_bytes(link("l", "")), "'l': an empty or NUL link target", id="empty-link"),
    pytest.param(
        tar_bytes(link("l", "x/" * 600)),
        "'l': the link target is longer than 1024 bytes",
        id="link-target-too-long",
    ),
]


@pytest.mark.parametrize(("data", "message"), UNSAFE_ARCHIVES)
def test_unsafe_archives_are_refused_naming_the_entry(
    tmp_path: Path, data: bytes, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        unpack_archive(data, tmp_path / "out")
    assert caught.value.message == f"archive entry {message}"


MALFORMED_HEADERS: list[Any] = [
    pytest.param(pax_file(b"9" * 5000 + b" path=x\n"), "ValueError: Exceeds", id="pax-length"),
    pytest.param(
        pax_file(pax_record(b"GNU.sparse.map", b"a,b")),
        "ValueError: invalid literal for int() with base 10: 'a')",
        id="pax-sparse-map",
    ),
]


@pytest.mark.parametrize(("data", "problem"), MALFORMED_HEADERS)
def test_malformed_tar_headers_are_not_a_valid_archive(
    tmp_path: Path, data: bytes, problem: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        unpack_archive(data, tmp_path / "out")
    assert caught.value.message.startswith(f"archive: not a valid tar.gz ({problem}")


@pytest.mark.anyio
async def test_uploads_do_not_draw_on_the_shared_thread_pool(tmp_path: Path) -> None:
    """Unpacking, parsing and hashing run on the store's own threads: a flood
    of uploads cannot take the threads every other request waits on."""
    data = pack_directory(agent_with(tmp_path))
    shared = anyio.to_thread.current_default_thread_limiter()
    async with TemplateStore(tmp_path / "data") as store:
        borrowers = [object() for _ in range(int(shared.total_tokens))]
        for borrower in borrowers:
            await shared.acquire_on_behalf_of(borrower)
        try:
            with anyio.fail_after(10):
                template = await store.put_archive(data, "acme")
        finally:
            for borrower in borrowers:
                shared.release_on_behalf_of(borrower)
        assert template.name == "attack"


# -- through the HTTP API ------------------------------------------------------


def upload(*members: tuple[tarfile.TarInfo, bytes | None], text: str | None = HEAD) -> bytes:
    files = [(member(".ppio-agent.yaml"), text.encode())] if text is not None else []
    return tar_bytes(*files, (member("agent.py"), b"x = 1\n"), *members)


def gzip_bomb() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = member("zeros")
        info.size = 60 * MiB
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    return buf.getvalue()


HTTP_ATTACKS: list[tuple[str, bytes, str]] = [
    ("billion laughs", upload(text=bomb()), f"{NOT_YAML} {ANCHORS} at line 7"),
    (
        "deep list",
        upload(text=HEAD + "status: " + "[" * 10_000 + "]" * 10_000 + "\n"),
        f"{NOT_YAML} nested more than 32 levels deep at line 5",
    ),
    (
        "deep map",
        upload(text=HEAD + "status: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n"),
        f"{NOT_YAML} nested more than 32 levels deep at line 5",
    ),
    (
        "python tag",
        upload(text=HEAD + "status: !!python/object/apply:os.system [true]\n"),
        f"{NOT_YAML} could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' at line 5",
    ),
    ("a scalar", upload(text="just text\n"), ".ppio-agent.yaml: must be a mapping, got a string"),
    ("a list", upload(text="- 1\n- 2\n"), ".ppio-agent.yaml: must be a mapping, got a list"),
    (
        "two documents",
        upload(text=HEAD + "---\n" + HEAD),
        f"{NOT_YAML} expected a single document in the stream, but found another document "
        "at line 5",
    ),
    (
        "impossible date",
        upload(text=with_spec(metadata="name: attack, created: 2025-13-45")),
        f"{NOT_YAML} cannot read the value (month must be in 1..12) at line 3",
    ),
    (
        "lone surrogate",
        upload(text=with_spec(metadata='name: attack, description: "\\udcff"')),
        f"{NOT_YAML} a string holds a lone surrogate (\\ud800-\\udfff) at line 3",
    ),
    (
        "timeout 1e400",
        upload(text=with_spec(runtime="timeout: 1.0e+400")),
        f"spec.runtime.timeout: {RANGE} inf",
    ),
    (
        "timeout 10**23",
        upload(text=with_spec(runtime="timeout: 99999999999999999999999")),
        f"spec.runtime.timeout: {RANGE} 99999999999999999999999",
    ),
    (
        "negative timeout",
        upload(text=with_spec(runtime="timeout: -5")),
        f"spec.runtime.timeout: {RANGE} -5",
    ),
    (
        "NaN timeout",
        upload(text=with_spec(runtime="timeout: .nan")),
        f"spec.runtime.timeout: {RANGE} nan",
    ),
    (
        "warm pool 10**9",
        upload(text=with_spec(sandbox="kind: process, warm_pool: 1000000000")),
        "spec.sandbox.warm_pool: must be an integer from 0 to 100, got 1000000000",
    ),
    (
        "memory 2Ti",
        upload(text=with_spec(runtime="memory_limit: 2Ti")),
        "spec.runtime.memory_limit: '2Ti' is more than 1Ti",
    ),
    (
        "cpu 400 digits",
        upload(text=with_spec(runtime="cpu_limit: " + "9" * 400)),
        f"{NOT_YAML} an integer of more than 100 digits; quote it if it is text at line 4",
    ),
    (
        "oversize agent file",
        upload(text=HEAD + "#" * (256 * 1024) + "\n"),
        ".ppio-agent.yaml: larger than 262144 bytes",
    ),
    (
        "agent file is a loop",
        upload(link(".ppio-agent.yaml", ".ppio-agent.yaml"), text=None),
        f"archive entry '.ppio-agent.yaml': {LOOP}",
    ),
    (
        "agent file is a directory",
        upload((member(".ppio-agent.yaml", tarfile.DIRTYPE), None), text=None),
        ".ppio-agent.yaml: not a regular file",
    ),
    (
        "entrypoint is a loop",
        tar_bytes((member(".ppio-agent.yaml"), HEAD.encode()), link("agent.py", "agent.py")),
        f"archive entry 'agent.py': {LOOP}",
    ),
    ("a-b loop", upload(link("a", "b"), link("b", "a")), f"archive entry 'a': {LOOP}"),
    (
        "hard link to a directory",
        upload((member("d", tarfile.DIRTYPE), None), hard("h", "d")),
        "archive entry 'h': hard link to a non-file",
    ),
    (
        "device",
        upload((member("dev", tarfile.CHRTYPE), None)),
        "archive entry 'dev': only files, directories and links are allowed",
    ),
    (
        "fifo",
        upload((member("p", tarfile.FIFOTYPE), None)),
        "archive entry 'p': only files, directories and links are allowed",
    ),
    (
        "long name",
        upload((member(LONG), b"x")),
        f"archive entry {LONG[:60]!r}...(300 characters): a name component is longer than 255 "
        "bytes",
    ),
    (
        "non-UTF-8 name",
        raw_tar(
            (b".ppio-agent.yaml", HEAD.encode(), b""),
            (b"agent.py", b"x = 1\n", b""),
            (b"caf\xe9.py", b"x", b""),
        ),
        "archive entry 'caf\\udce9.py': the name is not valid UTF-8",
    ),
    (
        "malformed PAX header",
        pax_file(pax_record(b"GNU.sparse.map", b"a,b")),
        "archive: not a valid tar.gz (ValueError: invalid literal for int() with base 10: 'a')",
    ),
    ("gzip bomb", gzip_bomb(), "archive holds more than 52428800 bytes of files"),
]


@pytest.mark.anyio
async def test_every_attack_through_the_api_is_a_400_and_leaves_nothing(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        before = (await o.client.get("/v1/templates")).json()
        answers = {}
        for name, data, _ in HTTP_ATTACKS:
            r = await o.client.post("/v1/templates", content=data, headers=GZIP)
            json = r.headers["content-type"] == "application/json"
            error = (r.json().get("error") if json else None) or {}
            answers[name] = (r.status_code, error.get("type"), error.get("message"))
        assert answers == {
            name: (400, "ValidationError", message) for name, _, message in HTTP_ATTACKS
        }
        assert (await o.client.get("/ping")).status_code == 200
        assert (await o.client.get("/v1/templates")).json() == before
        assert list((tmp_path / "data" / "tmp").iterdir()) == []


@pytest.mark.anyio
async def test_a_yaml_bomb_upload_does_not_stall_other_requests(tmp_path: Path) -> None:
    """One tenant's bomb must not freeze the event loop: /ping answers meanwhile."""
    data = upload(text=bomb())
    async with orchestrator(tmp_path) as o, o.other_client() as other:
        replies: list[httpx.Response] = []
        pings: list[float] = []

        async def deploy() -> None:
            replies.append(await o.client.post("/v1/templates", content=data, headers=GZIP))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(deploy)
                while not replies or not pings:
                    start = time.perf_counter()
                    assert (await other.get("/ping")).status_code == 200
                    pings.append(time.perf_counter() - start)
        assert max(pings) < 1.0, pings
        assert replies[0].status_code == 400
        assert replies[0].json()["error"]["message"] == f"{NOT_YAML} {ANCHORS} at line 7"
