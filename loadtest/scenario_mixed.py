"""A realistic mixed load (issue 14): one measurement window, one server process per system with
its own Redis, everything at once.

    python -m loadtest.bench mixed --target ours,nodesio,pysio --quick \
        --json loadtest/results/mixed-DATE-COMMIT.json

Per system, in one window (``--duration``), one open-loop load of:

* **messages**: the open-loop publisher (:mod:`loadtest.publisher`, the same as ``fanout``) at
  ``--rate`` msgs/s over many DMs (pairs), small rooms (5-10 members) and ``--big-rooms`` big
  rooms (``--big-size`` members, taken from the DM and small-room users); one message per room in
  turn, so the DMs and small rooms carry most messages and the big rooms a few (``--big-weight``
  turns per cycle each). Receivers are the bench's WebSocket clients (:mod:`loadtest.wsclient`:
  per-room seq check, latency from the scheduled time);
* **typing** (ours only: the ``typing`` command, broadcast to the room's other members;
  ``--typists`` second sessions of small-room members, each typing every ``--typing-every`` s,
  over the node's 3 s throttle). The Socket.IO peer servers (loadtest/peers) have no typing event,
  so the peers run without it: reported as "not run", never faked;
* **reconnects / presence churn**: the churn scenario's clients (:mod:`loadtest.scenario_churn`,
  session ``returning``) at ``--churn-rate`` sessions/s, each held ``--hold`` s: ours: hello with a
  cursor for each of the user's rooms (online/offline announcements go to those rooms); peers:
  connect + one join per room;
* **polling clients** (:mod:`loadtest.scenario_polling`'s workers): ``--pollers`` long-polling
  clients in small rooms: ours ``/api/v1/poll``; peers: the Engine.IO polling transport.

Reported per system: node CPU per message (all the node's CPU in the window / messages scheduled
in it), WebSocket and poll delivery p50/p99, achieved vs offered (deliveries, sessions), lost
(seq gaps) and duplicated messages, and what the system could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from array import array
from typing import Any

import orjson

from loadtest import stats
from loadtest.scenario_churn import ChurnWorkers, seed, seed_cursors
from loadtest.scenario_polling import DEFAULT_NODE_ENV, PollWorkers
from loadtest.targets import TARGETS
from loadtest.wsclient import Client, Stats, WorkerPool, mask_frame, run_worker

NAME = "mixed"
HELP = "realistic mixed load: DMs, small and big rooms, typing, reconnects, polling (side by side)"
OWN_CLUSTER = True  # each system gets its own Redis and server, one after the other


def log(msg: str) -> None:
    print(f"[mixed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


now_us = stats.now_us


QUICK = dict(dms=100, small_rooms=40, big_size=200, rate=300.0, churn_rate=4.0, pollers=40,
             typists=30, duration=10.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"small enough for ~30 s per system on 2 cores: {QUICK}")
    p.add_argument("--dms", type=int, default=300, help="direct rooms (pairs)")
    p.add_argument("--small-rooms", type=int, default=100, help="rooms of 5-10 members")
    p.add_argument("--big-rooms", type=int, default=2)
    p.add_argument("--big-size", type=int, default=200, help="members of a big room")
    p.add_argument("--big-weight", type=int, default=1,
                   help="turns of each big room per cycle over all rooms")
    p.add_argument("--rate", type=float, default=600.0, help="messages/s, all rooms together")
    p.add_argument("--typists", type=int, default=60, help="ours: typing sessions")
    p.add_argument("--typing-every", type=float, default=3.5,
                   help="seconds between a typist's typing events (node throttle: 3 s)")
    p.add_argument("--churn-rate", type=float, default=5.0, help="reconnects/s")
    p.add_argument("--hold", type=float, default=2.0, help="seconds a reconnecting session stays")
    p.add_argument("--churn-rooms", type=int, default=3, help="rooms of a reconnecting user")
    p.add_argument("--pollers", type=int, default=100, help="long-polling clients")
    p.add_argument("--wait-ms", type=int, default=20000)
    p.add_argument("--duration", type=float, default=10.0, help="measurement window (s)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the window")
    p.add_argument("--text-bytes", type=int, default=100)
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--poll-workers", type=int, default=1)
    p.add_argument("--p99-limit-ms", type=float, default=200.0,
                   help="a system with a higher WebSocket, poll or reconnect p99 did not keep up")
    p.set_defaults(target="ours,nodesio,pysio", workers=2)


# -- typing sessions (ours), in a process of their own ----------------------------------------------

async def _typing(port: int, pairs: list[list[str]], every: float, t0: int, t1: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    st = Stats()
    clients: list[Client] = []
    failed = 0
    for user, _room in pairs:
        fut: asyncio.Future[Client] = loop.create_future()
        try:
            await loop.create_connection(lambda fut=fut, user=user: Client(st, user, fut),
                                         "127.0.0.1", port)
            clients.append(await asyncio.wait_for(fut, 30))
        except (OSError, ConnectionError, TimeoutError):
            failed += 1
    sent = 0
    n = len(clients)
    i = 0
    while n:
        sched = t0 + int(i * every * 1e6 / n)
        if sched >= t1:
            break
        delay = (sched - now_us()) / 1e6
        if delay > 0:
            await asyncio.sleep(delay)
        c = clients[i % n]
        if c.state == 1:
            room = pairs[i % n][1]
            c.transport.write(mask_frame(1, orjson.dumps({"type": "typing", "room": room})))
            sent += 1
        i += 1
    closed = sum(1 for c in clients if c.state != 1)
    for c in clients:
        if c.transport is not None:
            c.transport.abort()
    return {"connected": n, "failed": failed, "sent": sent, "closed": closed}


def typing_main(conn: Any, port: int, pairs: list[list[str]], every: float, t0: int, t1: int) -> None:
    async def main() -> None:
        conn.send(await _typing(port, pairs, every, t0, t1))
    run_worker(main())


# -- the scenario ---------------------------------------------------------------------------------

class Scenario:
    def __init__(self, args: argparse.Namespace, run_case: Any) -> None:
        self.args = args
        if args.quick:
            defaults = add_arguments_defaults()
            for k, v in QUICK.items():
                if getattr(args, k) == defaults[k]:
                    setattr(args, k, v)

    def layout(self, system: str) -> dict[str, Any]:
        a = self.args
        dms = {f"dm:md{j}a:md{j}b": [f"md{j}a", f"md{j}b"] for j in range(a.dms)}
        small = {f"r-ms{j:04d}": [f"ms{j}x{k}" for k in range(5 + j % 6)] for j in range(a.small_rooms)}
        pool = [u for m in list(small.values()) + list(dms.values()) for u in m]
        big = {f"r-mb{j}": [pool[(j * a.big_size + k) % len(pool)] for k in range(a.big_size)]
               for j in range(a.big_rooms)}
        big = {r: sorted(set(m)) for r, m in big.items()}
        rooms_of: dict[str, list[str]] = {}
        for groups in (dms, small, big):
            for room, members in groups.items():
                for u in members:
                    rooms_of.setdefault(u, []).append(room)
        small_names = list(small)
        churn_pool = max(20, int(a.churn_rate * (a.hold + 4.0)))
        churn_users = [f"mc{j}" for j in range(churn_pool)]
        churn_rooms = [[small_names[(j * a.churn_rooms + k) % len(small_names)]
                        for k in range(a.churn_rooms)] for j in range(churn_pool)]
        pollers = [(f"mp{j}", small_names[j % len(small_names)]) for j in range(a.pollers)]
        typists = [[members[0], room] for room, members in list(small.items())[:a.typists]]
        publish = list(dms) + small_names + [r for r in big for _ in range(a.big_weight)]
        return {"dms": dms, "small": small, "big": big, "rooms_of": rooms_of,
                "churn_users": churn_users, "churn_rooms": churn_rooms, "pollers": pollers,
                "typists": typists, "publish": publish}

    def run(self) -> dict[str, Any]:
        targets = [t.strip() for t in self.args.target.split(",") if t.strip()]
        rows = []
        for system in targets:
            if system not in TARGETS:
                raise SystemExit(f"unknown target {system!r}")
            from loadtest.scenario_compare import peer_available

            why = peer_available(system)
            if why:
                rows.append({"system": system, "error": why})
                log(f"{system}: {why}")
                continue
            try:
                rows.append(self.one(system))
            except Exception as exc:  # reported as such, never as figures
                log(f"{system} failed: {exc!r}")
                rows.append({"system": system, "error": repr(exc)})
        a = self.args
        return {"scenario": NAME, "systems": targets, "rows": rows,
                "layout": {"dms": a.dms, "small_rooms": a.small_rooms, "small_size": "5-10",
                           "big_rooms": a.big_rooms, "big_size": a.big_size,
                           "big_weight": a.big_weight, "rate_msgs": a.rate,
                           "typists": a.typists, "typing_every_s": a.typing_every,
                           "churn_rate": a.churn_rate, "hold_s": a.hold,
                           "churn_rooms": a.churn_rooms, "pollers": a.pollers,
                           "duration_s": a.duration, "warmup_s": a.warmup}}

    def one(self, system: str) -> dict[str, Any]:
        from loadtest.bench import CTX, Cluster, Workers, seed_rooms
        from loadtest.publisher import publisher_main

        a = self.args
        ours = TARGETS[system].dialect == "ws-json"
        lay = self.layout(system)
        env = os.environ.get("CHATCLUSTER_BENCH_NODE_ENV", "")
        os.environ["CHATCLUSTER_BENCH_NODE_ENV"] = ",".join(filter(None, [DEFAULT_NODE_ENV, env]))
        logdir = tempfile.mkdtemp(prefix=f"chatcluster-mixed-{system}-")
        cluster = Cluster([system], a.shards, logdir)
        os.environ["CHATCLUSTER_BENCH_NODE_ENV"] = env
        workers = Workers(a.workers)
        churn = ChurnWorkers(a.workers)
        pollers = None
        server = cluster.servers[system]
        not_run: list[str] = []
        try:
            cursors: list[dict[str, Any]] | None = None
            if ours:
                asyncio.run(seed_rooms(cluster.redis_url, cluster.shards, lay["dms"], kind="direct"))
                rooms = {**lay["small"], **lay["big"]}
                for u, rs in zip(lay["churn_users"], lay["churn_rooms"], strict=True):
                    for r in rs:
                        rooms[r] = rooms[r] + [u]
                for u, r in lay["pollers"]:
                    rooms[r] = rooms[r] + [u]
                asyncio.run(seed(cluster.redis_url, cluster.shards,
                                 {r: sorted(set(m)) for r, m in rooms.items()},
                                 list(lay["rooms_of"]) + lay["churn_users"]))
                cur = asyncio.run(seed_cursors(cluster.redis_url, cluster.shards, list(lay["small"])))
                cursors = [{r: cur[r] for r in rs} for rs in lay["churn_rooms"]]
            else:
                not_run.append("typing (the peer servers have no typing event)")
            users = list(lay["rooms_of"])
            port = int(server.info["ws_port"])
            t = time.monotonic()
            res = workers.connect(f"mixed-{system}", port, users, a.concurrency, TARGETS[system].dialect,
                                  [lay["rooms_of"][u] for u in users] if not ours else None)
            log(f"{system}: {res['ok']} WebSocket clients in {time.monotonic() - t:.1f}s")
            if res["failed"]:
                raise RuntimeError(f"{res['failed']} WebSocket clients failed to connect")
            url = f"http://127.0.0.1:{server.info['http_port'] if ours else port}"
            pollers = PollWorkers(a.poll_workers, url, lay["pollers"], TARGETS[system].dialect)
            reps = pollers.call_all({"op": "sessions", "concurrency": 50})
            if sum(r["failed"] for r in reps):
                raise RuntimeError(f"polling sessions failed: {[r['errors'] for r in reps]}")
            time.sleep(1.0)
            return self.window(system, cluster, workers, churn, pollers, lay, cursors, not_run,
                               CTX, publisher_main)
        finally:
            if pollers is not None:
                pollers.stop()
            churn.stop()
            workers.stop()
            cluster.stop()

    def window(self, system: str, cluster: Any, workers: Any, churn: Any, pollers: Any,
               lay: dict[str, Any], cursors: Any, not_run: list[str], CTX: Any,
               publisher_main: Any) -> dict[str, Any]:
        a = self.args
        ours = TARGETS[system].dialect == "ws-json"
        server = cluster.servers[system]
        port = int(server.info["ws_port"])
        t0 = now_us() + 2_500_000  # the publisher process starts (imports) in this time
        w0 = t0 + int(a.warmup * 1e6)
        w1 = w0 + int(a.duration * 1e6)
        workers.call_all({"op": "phase", "window": [w0, w1]})
        pollers.call_all({"op": "start", "mode": "long", "wait_ms": a.wait_ms, "window": [w0, w1],
                          "bucket_s": 1.0, "stagger_s": 0.5})
        nw = len(churn.pipes)
        churn.send([{
            "op": "step", "host": "127.0.0.1", "port": port, "dialect": TARGETS[system].dialect,
            "users": lay["churn_users"], "rate": a.churn_rate, "index": i, "nworkers": nw,
            "t0": t0, "w0": w0, "w1": w1, "hold": a.hold, "timeout": 10.0, "close_timeout": 5.0,
            "user_offset": 0, "session": "returning", "join_rooms": None,
            "user_rooms": lay["churn_rooms"], "user_cursors": cursors} for i in range(nw)])
        typing = None
        if ours and lay["typists"]:
            typing = WorkerPool(1, typing_main, "mixed-typing",
                                lambda i: (port, lay["typists"], a.typing_every, t0, w1))
        parent, child = CTX.Pipe()
        pub = CTX.Process(target=publisher_main, args=(child,), kwargs=dict(
            redis_host="127.0.0.1", redis_port=cluster.redis_port, shards=cluster.shards,
            rooms=lay["publish"], rate=a.rate, t0_us=t0, t_end_us=w1, text_bytes=a.text_bytes,
            dialect="ours" if ours else system, seq_start=None), daemon=True)
        pub.start()
        sampler = stats.CpuSampler({
            "node": [server.pid], "redis": [cluster.redis.pid], "publisher": [pub.pid],
            "clients": workers.pids + churn.pids + pollers.pids + (typing.pids if typing else [])})
        cpu = stats.sample_window(sampler, w0, w1)
        from loadtest.publisher import publisher_result
        pub_result = publisher_result(parent, pub)
        last_seq = pub_result["last_seq"]
        # Drain: every WebSocket client and poller has the last message of each of its rooms.
        t = time.monotonic()
        caught_up = False
        while time.monotonic() - t < a.drain_timeout:
            prog: dict[str, int] = {}
            for rep in workers.call_all({"op": "progress"}):
                for room, seq in rep.get(f"mixed-{system}", {}).items():
                    prog[room] = min(prog.get(room, seq), seq)
            pprog: dict[str, int] = {}
            for rep in pollers.call_all({"op": "progress"}):
                for room, seq in rep.items():
                    pprog[room] = min(pprog.get(room, seq), seq)
            if all(prog.get(r, 0) >= s for r, s in last_seq.items()) and \
                    all(v >= last_seq.get(r, 0) for r, v in pprog.items()):
                caught_up = True
                break
            time.sleep(0.1)
        drain_s = time.monotonic() - t
        ws = workers.call_all({"op": "report"})
        pollers.call_all({"op": "stop_polling", "timeout": 0.5})
        polls = pollers.call_all({"op": "report"})
        ch = churn.collect(30.0)
        ty = typing.collect(30.0)[0] if typing else None
        if typing:
            for proc in typing.procs:
                proc.join(5)
        # Messages scheduled in the window, per room (the publisher's own schedule).
        interval_us = 1e6 / a.rate
        in_window: dict[str, int] = {}
        i = 0
        while True:
            sched = t0 + int(i * interval_us)
            if sched >= w1:
                break
            if sched >= w0:
                room = lay["publish"][i % len(lay["publish"])]
                in_window[room] = in_window.get(room, 0) + 1
            i += 1
        return self.row(system, lay, cpu, pub_result, caught_up, drain_s, ws, polls, ch, ty,
                        not_run, in_window)

    def row(self, system: str, lay: dict[str, Any], cpu: dict[str, float], pub: dict[str, Any],
            caught_up: bool, drain_s: float, ws: list[Any], polls: list[Any], ch: list[Any],
            ty: dict[str, Any] | None, not_run: list[str], in_window: dict[str, int]) -> dict[str, Any]:
        a = self.args
        d = a.duration
        msgs = sum(in_window.values())  # scheduled in the window (open loop)
        members = {**lay["dms"], **lay["small"], **lay["big"]}
        offered_ws = sum(len(members[r]) * n for r, n in in_window.items())
        offered_poll = sum(in_window.get(r, 0) for _u, r in lay["pollers"])
        lat = array("q")
        for r in ws:
            lat.frombytes(r["latencies"])
        plat = array("q")
        for r in polls:
            plat.frombytes(r["latencies"])
        frames = sum(r["frames_in_window"] for r in ws)
        delivered_polls = sum(r["delivered"] for r in polls)
        welcomed = sum(r["welcomed_in_window"] for r in ch)
        ch_fail: dict[str, int] = {}
        for r in ch:
            for k, v in {**r["fail"], **{f"{k} (after welcome)": v for k, v in r["after"].items()}}.items():
                ch_fail[k] = ch_fail.get(k, 0) + v
        chlat = array("q")
        for r in ch:
            chlat.frombytes(r["lat"])
        gaps = sum(r["gaps"] for r in ws) + sum(r["gaps"] for r in polls)
        dups = sum(r["dups"] for r in ws) + sum(r["dups"] for r in polls)
        pct = stats.percentiles_ms(lat)
        ppct = stats.percentiles_ms(plat)
        cpct = stats.percentiles_ms(chlat)
        requests = sum(r["requests"] for r in polls)
        out = {
            "system": system, "messages_in_window": msgs, "published_total": pub["sent"],
            "publisher_max_lag_ms": pub["max_lag_ms"],
            "node_cpu_s": cpu["node"], "node_cpu_util": cpu["node"] / d,
            "node_cpu_ms_per_msg": cpu["node"] / msgs * 1e3 if msgs else None,
            "redis_cpu_util": cpu["redis"] / d,
            "generator_cpu_util": (cpu["clients"] + cpu["publisher"]) / d,
            "machine_busy_util": cpu["machine_busy"] / d,
            "other_cpu_util": max(0.0, cpu["machine_busy"] - cpu["node"] - cpu["redis"]
                                  - cpu["clients"] - cpu["publisher"]) / d,
            "ws_clients": len(lay["rooms_of"]),
            "ws_offered_per_s": offered_ws / d, "ws_delivered_per_s": frames / d,
            "ws_latency_samples": len(lat), "ws_latency_expected": int(offered_ws),
            "ws_p50_ms": pct["p50_ms"], "ws_p99_ms": pct["p99_ms"], "ws_max_ms": pct["max_ms"],
            "ws_other_frames": sum(r["other_frames"] for r in ws),
            "ws_closed": sum(r["closed"] for r in ws),
            "poll_offered_per_s": offered_poll / d, "poll_delivered_per_s": delivered_polls / d,
            "poll_requests_per_s": requests / d,
            "poll_p50_ms": ppct["p50_ms"], "poll_p99_ms": ppct["p99_ms"],
            "poll_errors": {k: v for r in polls for k, v in r["statuses"].items()},
            "churn_offered_per_s": a.churn_rate, "churn_achieved_per_s": welcomed / d,
            "churn_p50_ms": cpct["p50_ms"], "churn_p99_ms": cpct["p99_ms"],
            "churn_failures": ch_fail,
            "typing": ty, "typing_per_s": (ty["sent"] / (d + a.warmup)) if ty else None,
            "lost": gaps, "dups": dups, "caught_up": caught_up, "drain_s": round(drain_s, 2),
            "not_run": not_run,
        }
        out["complete"] = bool(caught_up and gaps == 0 and dups == 0 and out["ws_closed"] == 0
                               and len(lat) >= 0.99 * int(offered_ws) and not out["poll_errors"]
                               and not ch_fail)
        p99s = [out["ws_p99_ms"], out["poll_p99_ms"], out["churn_p99_ms"]]
        out["kept_up"] = bool(
            out["complete"] and all(v is not None and v <= a.p99_limit_ms for v in p99s)
            and abs(frames - offered_ws) <= 0.03 * offered_ws
            and abs(delivered_polls - offered_poll) <= 0.03 * offered_poll
            and welcomed >= 0.97 * a.churn_rate * d)
        log(f"{system}: node {out['node_cpu_util']:.0%} = {_f(out['node_cpu_ms_per_msg'], 2)} "
            f"ms/msg; ws {frames / d:.0f}/{offered_ws / d:.0f} deliveries/s p50/p99 "
            f"{_f(pct['p50_ms'])}/{_f(pct['p99_ms'])} ms; polls {delivered_polls / d:.0f}/"
            f"{offered_poll / d:.0f}/s p99 {_f(ppct['p99_ms'])}; churn {welcomed / d:.1f}/"
            f"{a.churn_rate}/s p99 {_f(cpct['p99_ms'])} fails {ch_fail}; lost {gaps} dups {dups}; "
            f"complete {out['complete']}, kept up {out['kept_up']}; other processes "
            f"{out['other_cpu_util']:.0%} of a core")
        return out


def add_arguments_defaults() -> dict[str, Any]:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return {k: p.get_default(k) for k in QUICK}


# -- output ----------------------------------------------------------------------------------

_f = stats._f

NAMES = {"ours": "chatcluster", "nodesio": "Node Socket.IO", "pysio": "python-socketio"}


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    head = "| | " + " | ".join(NAMES.get(r["system"], r["system"]) for r in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]

    def line(label: str, fn: Any) -> None:
        cells = []
        for r in rows:
            if "error" in r:
                cells.append("not run: " + r["error"][:60])
            else:
                try:
                    cells.append(fn(r))
                except (KeyError, TypeError):
                    cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    line("node CPU per message (all work / msgs)", lambda r: f"{_f(r['node_cpu_ms_per_msg'], 2)} ms")
    line("node CPU utilisation", lambda r: f"{r['node_cpu_util']:.0%}")
    line("machine busy / generator / other processes' CPU (2 cores = 200%)",
         lambda r: f"{r['machine_busy_util']:.0%} / {r['generator_cpu_util']:.0%} / "
                   f"{r['other_cpu_util']:.0%}")
    line("WebSocket deliveries/s achieved / offered",
         lambda r: f"{r['ws_delivered_per_s']:.0f} / {r['ws_offered_per_s']:.0f}")
    line("WebSocket delivery p50 / p99", lambda r: f"{_f(r['ws_p50_ms'])} / {_f(r['ws_p99_ms'])} ms")
    line("poll deliveries/s achieved / offered",
         lambda r: f"{r['poll_delivered_per_s']:.0f} / {r['poll_offered_per_s']:.0f}")
    line("poll delivery p50 / p99", lambda r: f"{_f(r['poll_p50_ms'])} / {_f(r['poll_p99_ms'])} ms")
    line("reconnects/s achieved / offered",
         lambda r: f"{r['churn_achieved_per_s']:.1f} / {r['churn_offered_per_s']:.0f}")
    line("reconnect p50 / p99 (to welcome / last join)",
         lambda r: f"{_f(r['churn_p50_ms'])} / {_f(r['churn_p99_ms'])} ms")
    line("typing events/s", lambda r: f"{r['typing_per_s']:.1f}" if r["typing"] else "not run")
    line("lost / duplicated", lambda r: f"{r['lost']} / {r['dups']}")
    line("caught up, complete, kept up (p99 <= limit, achieved within 3 %)",
         lambda r: f"{r['caught_up']}, {r['complete']}, {r['kept_up']}")
    line("not run", lambda r: "; ".join(r["not_run"]) or "-")
    return "\n".join(lines)
