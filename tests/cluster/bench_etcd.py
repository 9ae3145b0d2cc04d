"""What one etcd round trip costs through the JSON gateway: put, txn, range, keepalive.

    .venv/bin/python -m tests.cluster.bench_etcd [--ops 1000] [--backend asyncio|trio]
        [--no-fsync]

Starts a real 3-member cluster on loopback (fsync on, unless ``--no-fsync``), then one
client, one op at a time, ``--ops`` of each kind against the leader's endpoint and against
a follower's (a follower forwards writes and linearizable reads to the leader). Prints
p50 / p99 / mean in milliseconds. The numbers are for this machine's disk and load: the
run prints its load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Awaitable, Callable

import anyio

from ppio_sandbox.orchestrator.cluster._etcd import Compare, EtcdClient, Op

from .etcd_cluster import EtcdCluster


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def _time(n: int, op: Callable[[int], Awaitable[object]]) -> list[float]:
    for i in range(min(50, n)):  # warm the pooled connection and the server
        await op(i)
    out = []
    for i in range(n):
        t0 = anyio.current_time()
        await op(i)
        out.append((anyio.current_time() - t0) * 1000)
    return out


async def _bench(endpoint: str, label: str, n: int) -> None:
    async with EtcdClient([endpoint]) as etcd:
        owner = f"/bench/{label}/owner"
        await etcd.put(owner, "me")
        kv = await etcd.get(owner)
        assert kv is not None
        fence = [Compare.create_revision(owner, "==", kv.create_revision)]
        lease = await etcd.grant(60)
        ops: dict[str, Callable[[int], Awaitable[object]]] = {
            "put": lambda i: etcd.put(f"/bench/{label}/k{i % 100}", "x" * 100),
            "txn (fenced put)": lambda i: etcd.txn(
                fence, [Op.put(f"/bench/{label}/s{i % 100}", "y" * 100)]
            ),
            "range (linearizable get)": lambda i: etcd.get(f"/bench/{label}/k{i % 100}"),
            "range (serializable get)": lambda i: etcd.get(
                f"/bench/{label}/k{i % 100}", serializable=True
            ),
            "keepalive_once": lambda i: etcd.keepalive_once(lease),
        }
        for name, op in ops.items():
            ms = await _time(n, op)
            print(
                f"{label:9} {name:26} p50 {_pct(ms, 0.5):6.2f} ms  p99 {_pct(ms, 0.99):6.2f} ms"
                f"  mean {statistics.fmean(ms):6.2f} ms  (n={n})",
                flush=True,
            )
        await etcd.revoke(lease)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=1000)
    ap.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args()
    with EtcdCluster(3, fsync=not args.no_fsync) as cluster:
        leader = cluster.leader()
        follower = (leader + 1) % 3
        print(
            f"etcd 3-member cluster on loopback, fsync {'off' if args.no_fsync else 'on'}, "
            f"{args.backend}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
        )

        async def run() -> None:
            await _bench(cluster.endpoints[leader], "leader", args.ops)
            await _bench(cluster.endpoints[follower], "follower", args.ops)

        anyio.run(run, backend=args.backend)


if __name__ == "__main__":
    main()
