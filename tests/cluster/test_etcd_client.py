"""The etcd client against real 3-member etcd clusters, on asyncio and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
import pytest

from ppio_sandbox.orchestrator.cluster._etcd import (
    Compare,
    DeleteResult,
    EtcdClient,
    EtcdCompacted,
    EtcdLeaseNotFound,
    EtcdUnavailable,
    KeyValue,
    LeaseKeeper,
    Op,
    PrefixCache,
    PutResult,
    RangeResult,
    WatchEvent,
    parse_cluster_url,
    prefix_range_end,
)

from .etcd_cluster import EtcdCluster

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def client(endpoints: list[str], timeout: float = 2.0) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(endpoints, timeout=timeout) as c:
        yield c


def now() -> float:
    return anyio.current_time()


# -- pure helpers ---------------------------------------------------------------------


def test_prefix_range_end_and_cluster_url() -> None:
    assert prefix_range_end(b"a/") == b"a0"
    assert prefix_range_end("é") == b"\xc3\xaa"  # a str key is its utf-8 bytes
    assert prefix_range_end(b"a\xff\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\0"
    assert prefix_range_end(b"") == b"\0"
    assert parse_cluster_url("etcd://h1:1,h2:2") == ["http://h1:1", "http://h2:2"]
    with pytest.raises(ValueError, match="etcd://"):
        parse_cluster_url("http://h1:1")


# -- kv -------------------------------------------------------------------------------


async def test_put_get_delete_prefix(etcd_cluster: EtcdCluster, key_prefix: str) -> None:
    async with client(etcd_cluster.endpoints) as etcd:
        p = key_prefix
        assert await etcd.get(p + "missing") is None
        rev = await etcd.put(p + "a", "1")
        kv = await etcd.get(p + "a")
        assert kv is not None
        assert (kv.key, kv.value, kv.version) == ((p + "a").encode(), b"1", 1)
        assert kv.create_revision == kv.mod_revision == rev
        rev2 = await etcd.put(p + "a", b"")  # an empty value: omitted on the wire
        kv = await etcd.get(p + "a")
        assert kv is not None
        assert (kv.value, kv.version, kv.create_revision, kv.mod_revision) == (b"", 2, rev, rev2)

        binary = p.encode() + b"\xff\x00bin"
        await etcd.put(binary, b"\x00\xff")
        for i in range(5):
            await etcd.put(f"{p}list/{i}", str(i))
        await etcd.put(p[:-1] + "0", "outside")  # the key just past the prefix
        kvs, list_rev = await etcd.get_prefix(p + "list/", page_size=2)  # three pages
        assert [kv.value for kv in kvs] == [b"0", b"1", b"2", b"3", b"4"]
        assert list_rev >= max(kv.mod_revision for kv in kvs)
        everything, _ = await etcd.get_prefix(p)
        assert [kv.key for kv in everything] == sorted(kv.key for kv in everything)
        assert binary in {kv.key for kv in everything}
        assert (p[:-1] + "0").encode() not in {kv.key for kv in everything}
        got = await etcd.get(binary, serializable=True)
        assert got is not None
        assert got.value == b"\x00\xff"

        assert await etcd.delete(p + "a") == 1
        assert await etcd.delete(p + "a") == 0
        assert await etcd.delete_prefix(p + "list/") == 5
        assert (await etcd.get_prefix(p + "list/"))[0] == []
        assert await etcd.delete_prefix(p) == 1  # the binary key; "outside" stays
        assert await etcd.get(p[:-1] + "0") is not None
        await etcd.delete(p[:-1] + "0")


async def test_txn_create_if_absent_race_and_fence(
    etcd_cluster: EtcdCluster, key_prefix: str
) -> None:
    eps = etcd_cluster.endpoints
    async with client(eps) as a, client(eps[1:] + eps[:1]) as b:
        leases = {"a": await a.grant(30), "b": await b.grant(30)}
        wins: dict[str, list[str]] = {"a": [], "b": []}

        async def claim(name: str, etcd: EtcdClient, key: str) -> None:
            res = await etcd.txn(
                [Compare.create_revision(key, "==", 0)],
                [Op.put(key, name, lease=leases[name])],
                [Op.range(key)],
            )
            if res.succeeded:
                assert isinstance(res.responses[0], PutResult)
                assert res.responses[0].revision == res.revision
                wins[name].append(key)
            else:
                held = res.responses[0]
                assert isinstance(held, RangeResult)
                assert held.kvs[0].value != name.encode()

        keys = [f"{key_prefix}owner/{i}" for i in range(10)]
        for key in keys:
            async with anyio.create_task_group() as tg:
                tg.start_soon(claim, "a", a, key)
                tg.start_soon(claim, "b", b, key)
        assert sorted(wins["a"] + wins["b"]) == sorted(keys)  # exactly one winner per key
        for name in ("a", "b"):
            for key in wins[name]:
                kv = await a.get(key)
                assert kv is not None
                assert (kv.value, kv.lease) == (name.encode(), leases[name])
        info = await a.ttl(leases["a"], keys=True)
        assert sorted(info.keys) == sorted(k.encode() for k in wins["a"])
        assert 0 < info.ttl <= info.granted_ttl == 30

        # A fenced write: allowed while the owner key is the one created at revision n.
        owner = keys[0]
        owner_kv = await a.get(owner)
        assert owner_kv is not None
        n = owner_kv.create_revision
        state = key_prefix + "state"
        fence = [Compare.create_revision(owner, "==", n)]
        assert (await a.txn(fence, [Op.put(state, "v1")])).succeeded
        await a.delete(owner)
        await b.put(owner, "someone else")  # same key, a new create_revision
        res = await a.txn(fence, [Op.put(state, "v2")], [Op.range(owner)])
        assert not res.succeeded
        kv = await a.get(state)
        assert kv is not None
        assert kv.value == b"v1"

        # The other compare targets.
        kv = await a.get(state)
        assert kv is not None
        ok = await a.txn(
            [
                Compare.mod_revision(state, "==", kv.mod_revision),
                Compare.version(state, "<", 2),
                Compare.value(state, "==", "v1"),
                Compare.lease(state, "==", 0),
                Compare.create_revision(state, ">", 0),
            ],
            [Op.delete(state, prev_kv=True), Op.range(key_prefix, prefix=True, limit=1)],
        )
        assert ok.succeeded
        deleted = ok.responses[0]
        assert isinstance(deleted, DeleteResult)
        assert deleted.deleted == 1
        assert deleted.prev_kvs[0].value == b"v1"
        assert not (await a.txn([Compare.value(owner, "!=", "someone else")], [])).succeeded
        for lease in leases.values():
            assert await a.revoke(lease)
        assert (await a.get_prefix(key_prefix + "owner/"))[0] == [await a.get(owner)]
        await a.delete_prefix(key_prefix)


# -- leases ---------------------------------------------------------------------------


async def test_lease_expiry_deletes_bound_keys_seen_by_watch(
    etcd_cluster: EtcdCluster, key_prefix: str
) -> None:
    async with client(etcd_cluster.endpoints) as etcd:
        lease = await etcd.grant(1)  # the shortest etcd allows with a 500 ms election
        assert await etcd.keepalive_once(lease) == 1
        key = key_prefix + "ephemeral"
        rev = await etcd.put(key, "here", lease=lease)
        events: list[WatchEvent] = []
        with anyio.fail_after(10):
            async with etcd.watch(key_prefix, start_revision=rev, prev_kv=True) as w:
                async for ev in w:
                    events.append(ev)
                    if ev.type == "DELETE":
                        break
        assert [e.type for e in events] == ["PUT", "DELETE"]
        assert events[1].kv.key == key.encode()
        assert events[1].prev_kv is not None
        assert events[1].prev_kv.value == b"here"
        assert await etcd.get(key) is None
        with pytest.raises(EtcdLeaseNotFound):
            await etcd.keepalive_once(lease)
        with pytest.raises(EtcdLeaseNotFound):
            await etcd.ttl(lease)
        with pytest.raises(EtcdLeaseNotFound):
            await etcd.put(key, "again", lease=lease)
        assert not await etcd.revoke(lease)


async def test_lease_keeper_renews_then_loses_a_revoked_lease(
    etcd_cluster: EtcdCluster, key_prefix: str
) -> None:
    async with client(etcd_cluster.endpoints) as etcd:
        keeper = await LeaseKeeper.grant(etcd, 1)
        key = key_prefix + "kept"
        await etcd.put(key, "x", lease=keeper.lease_id)
        async with keeper:
            start = now()
            with anyio.fail_after(5):
                while keeper.renewals < 4:  # ~1.3 s at ttl/3: past the 1 s TTL
                    await anyio.sleep(0.05)
            assert now() - start > 1.0
            assert await etcd.get(key) is not None
            assert keeper.alive
            assert keeper.last_renewed <= now() < keeper.valid_until
            assert keeper.valid_until == pytest.approx(keeper.last_renewed + 0.9)

            assert await etcd.revoke(keeper.lease_id)  # behind the keeper's back
            revoked = now()
            with anyio.fail_after(3):
                await keeper.lost.wait()
            assert now() - revoked <= keeper.interval + 0.5
            assert "gone" in keeper.lost_reason
            assert not keeper.alive
        assert await etcd.get(key) is None


# -- failure: members killed, paused, quorum lost ----------------------------------------


async def test_quorum_loss_fails_fast_and_loses_the_lease(fresh_etcd_cluster: EtcdCluster) -> None:
    cluster = fresh_etcd_cluster
    async with client(cluster.endpoints, timeout=0.5) as etcd:
        cache = PrefixCache(etcd, "/q/")
        await etcd.put("/q/before", "1")
        keeper = await LeaseKeeper.grant(etcd, 2)
        async with anyio.create_task_group() as tg:
            await tg.start(cache.run)
            await cache.wait_for(lambda items: b"/q/before" in items, timeout=5)
            await tg.start(keeper.run)
            survivor = cluster.leader()  # the leader survives: it must step down by itself
            for i in range(3):
                if i != survivor:
                    cluster.kill(i)

            # Calls answer EtcdUnavailable within their timeout: no hang.
            for call in (
                lambda: etcd.get("/q/before"),
                lambda: etcd.put("/q/during", "x"),
                lambda: etcd.txn([Compare.create_revision("/q/t", "==", 0)], [Op.put("/q/t", "")]),
                lambda: etcd.keepalive_once(keeper.lease_id),
            ):
                t0 = now()
                with pytest.raises(EtcdUnavailable):
                    await call()
                assert now() - t0 < etcd.timeout + 0.5

            with anyio.fail_after(5):
                await keeper.lost.wait()
            assert keeper.lost_at is not None
            assert keeper.valid_until <= keeper.lost_at <= keeper.valid_until + 0.3
            assert "valid_until" in keeper.lost_reason

            # The cache's watch ends (no leader) and it can't re-list: not synced.
            with anyio.fail_after(10):
                while cache.synced:
                    await anyio.sleep(0.05)
            assert isinstance(cache.last_error, EtcdUnavailable)

            # Quorum back: the client and the cache recover by themselves.
            for i in range(3):
                if i != survivor:
                    cluster.restart(i, wait=False)
            with anyio.fail_after(10):
                while True:
                    try:
                        await etcd.put("/q/after", "2")
                        break
                    except EtcdUnavailable:
                        await anyio.sleep(0.05)
            items = await cache.wait_for(lambda items: b"/q/after" in items, timeout=10)
            assert set(items) >= {b"/q/before", b"/q/after"}
            assert cache.relists >= 2
            tg.cancel_scope.cancel()


async def test_failover_from_a_hung_and_a_killed_member(fresh_etcd_cluster: EtcdCluster) -> None:
    cluster = fresh_etcd_cluster
    leader = cluster.leader()
    followers = [i for i in range(3) if i != leader]
    order = [followers[0], leader, followers[1]]
    endpoints = [cluster.endpoints[i] for i in order]
    async with client(endpoints, timeout=1.0) as etcd:
        await etcd.put("k", "v")
        assert etcd.current_endpoint == cluster.endpoints[followers[0]]

        cluster.pause(followers[0])  # accepts connections, answers nothing
        t0 = now()
        kv = await etcd.get("k")
        elapsed = now() - t0
        assert kv is not None
        assert kv.value == b"v"
        assert 0.45 <= elapsed < 1.0  # half the timeout on the hung member, then the next
        assert etcd.current_endpoint == cluster.endpoints[leader]
        cluster.resume(followers[0])

    # The leader killed: refused at once, then "no leader" from the others until they
    # elect one, within the call's deadline.
    async with client([cluster.endpoints[i] for i in (leader, *followers)], timeout=3.0) as etcd:
        await etcd.get("k")
        assert etcd.current_endpoint == cluster.endpoints[leader]
        cluster.kill(leader)
        t0 = now()
        await etcd.put("k", "v2")
        assert now() - t0 < etcd.timeout
        assert etcd.current_endpoint != cluster.endpoints[leader]
        kv = await etcd.get("k")
        assert kv is not None
        assert kv.value == b"v2"


# -- watch and cache --------------------------------------------------------------------


async def test_watch_from_a_compacted_revision(etcd_cluster: EtcdCluster, key_prefix: str) -> None:
    async with client(etcd_cluster.endpoints) as etcd:
        first = await etcd.put(key_prefix + "a", "1")
        last = await etcd.put(key_prefix + "a", "2")
        await etcd.compact(last)

        async def drain() -> None:
            async with etcd.watch(key_prefix, start_revision=first) as w:
                async for _ in w:
                    pass

        with pytest.raises(EtcdCompacted) as caught, anyio.fail_after(5):
            await drain()
        assert caught.value.compact_revision == last
        with pytest.raises(EtcdCompacted):
            await etcd.range(key_prefix + "a", revision=first)


async def test_prefix_cache_converges(etcd_cluster: EtcdCluster, key_prefix: str) -> None:
    p = key_prefix
    async with client(etcd_cluster.endpoints) as etcd:
        for i in range(20):
            await etcd.put(f"{p}{i:02}", "initial")
        cache = PrefixCache(etcd, p)
        async with anyio.create_task_group() as tg:
            await tg.start(cache.run)
            assert cache.synced
            assert len(cache.items) == 20

            async def writer(start: int) -> None:
                for i in range(start, 20, 2):
                    await etcd.put(f"{p}{i:02}", f"v{i}")
                    if i % 3 == 0:
                        await etcd.delete(f"{p}{i:02}")
                await etcd.put(f"{p}done{start}", "")

            async with anyio.create_task_group() as writers:
                writers.start_soon(writer, 0)
                writers.start_soon(writer, 1)

            def done(items: Mapping[bytes, KeyValue]) -> bool:
                return {f"{p}done0".encode(), f"{p}done1".encode()} <= set(items)

            items = await cache.wait_for(done, timeout=10)
            kvs, rev = await etcd.get_prefix(p)
            assert dict(items) == {kv.key: kv for kv in kvs}
            assert cache.revision == rev
            with pytest.raises(TimeoutError):
                await cache.wait_for(lambda items: b"never" in items, timeout=0.1)
            tg.cancel_scope.cancel()
        await etcd.delete_prefix(p)


async def test_watch_cancellation_is_prompt(etcd_cluster: EtcdCluster, key_prefix: str) -> None:
    async with client(etcd_cluster.endpoints) as etcd:
        rev = await etcd.put(key_prefix + "a", "1")
        got: list[WatchEvent] = []

        async def watch_forever() -> None:
            async with etcd.watch(key_prefix, start_revision=rev) as w:
                async for ev in w:
                    got.append(ev)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_forever)
            with anyio.fail_after(5):
                while not got:  # the stream is up and idle
                    await anyio.sleep(0.01)
            t0 = now()
            tg.cancel_scope.cancel()
        assert now() - t0 < 0.5  # not waiting for the network: a busy CI machine

        # A deadline around an idle watch, and the client still works afterwards.
        t0 = now()
        with anyio.move_on_after(0.2):
            async with etcd.watch(key_prefix + "idle/") as w:
                async for _ in w:
                    pass
        assert 0.2 <= now() - t0 < 0.7
        assert await etcd.get(key_prefix + "a") is not None
