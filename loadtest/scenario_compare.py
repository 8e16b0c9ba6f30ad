"""Side by side (issue 14): ours, Node.js Socket.IO and python-socketio, every case at one equal
offered load, in one run, one results file, one plot, one table.

    python -m loadtest.bench compare            # full: 12 s windows (~15 min on 2 shared cores)
    python -m loadtest.bench compare --quick    # 4 s windows, no retries (~6 min)
    python -m loadtest.bench compare --systems ours --cases fanout-500x2,churn-fresh

Each case is the existing scenario, run through its own command line (so ``--json`` of the
scenario alone gives the same figures), with its own Redis, servers and client processes:

* ``fanout-10x100``, ``fanout-100x10``, ``fanout-500x2``: :class:`loadtest.bench.Fanout` with a
  one-step "sweep" at the case's rate (open-loop publisher, ~100 B texts, every system in turn);
  kept up = the fan-out rule of docs/benchmarks.md (>= 97 % of the offered deliveries in the
  window, nothing lost, duplicated or closed, p99 <= 100 ms).
* ``churn-fresh`` (a user never seen before connects and joins one room: ours hello + join,
  Socket.IO connect + ``join`` acked) and ``churn-returning`` (a user in 10 rooms comes back:
  ours hello with a current cursor per room, Socket.IO connect + 10 joins): ``scenario_churn``
  with ``--session``; kept up = achieved >= 97 % and p99 <= 200 ms (the churn rule).
* ``polling``: 200 long-polling clients in 10 rooms (ours: ``/api/v1/poll`` with ``wait_ms``;
  peers: the Engine.IO polling transport), ``scenario_polling``; kept up = every message
  delivered in order, nothing lost or duplicated, and p99 <= 100 ms.

The cost per operation is the server process's CPU (user + system) over the window divided by
the operations of the window: messages published (fan-out), sessions welcomed (churn), poll
requests (polling). A row that did not keep up is never evidence for a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

NAME = "compare"
HELP = "ours vs Node Socket.IO vs python-socketio: fan-out, churn, polling at equal offered load"
OWN_CLUSTER = True

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "loadtest" / "results"
SYSTEMS = ("ours", "nodesio", "pysio")

# key: (kind, description, offered load, unit of one operation)
CASES: dict[str, dict[str, Any]] = {
    "fanout-10x100": {"kind": "fanout", "rooms": 10, "room_size": 100, "rate": 500,
                      "what": "10 rooms of 100, 500 msgs/s (50,000 deliveries/s)"},
    "fanout-100x10": {"kind": "fanout", "rooms": 100, "room_size": 10, "rate": 1000,
                      "what": "100 rooms of 10, 1,000 msgs/s"},
    "fanout-500x2": {"kind": "fanout", "rooms": 500, "room_size": 2, "rate": 1000,
                     "what": "500 rooms of 2, 1,000 msgs/s"},
    "churn-fresh": {"kind": "churn", "session": "fresh", "rate": 150,
                    "what": "fresh user: connect + join 1 room, 150/s"},
    "churn-returning": {"kind": "churn", "session": "returning", "rate": 100, "rooms_per_user": 10,
                        "what": "returning user in 10 rooms (ours: hello with cursors; "
                                "Socket.IO: connect + 10 joins), 100/s"},
    "polling": {"kind": "polling", "pollers": 200, "rooms": 10, "rate": 20,
                "what": "200 long-polling clients in 10 rooms, 20 msgs/s (peers: Engine.IO polling)"},
}
QUICK_CASES = tuple(CASES)
UNITS = {"fanout": "message", "churn": "session", "polling": "poll"}


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="short windows (4 s), no retries: ~6 minutes on 2 shared cores")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated, of ours, nodesio, pysio (default all three; a peer "
                        "that is not installed is left out and said so)")
    p.add_argument("--cases", default="", help=f"comma-separated subset of: {', '.join(CASES)}")
    p.add_argument("--window", type=float, default=None,
                   help="measurement window per step, s (default 12, --quick 4)")
    p.add_argument("--out", default=None,
                   help="path prefix of the outputs (.json, .png, .md); default "
                        "loadtest/results/compare-DATE-COMMIT[-quick]")


def peer_available(system: str) -> str | None:
    """None if the system can run here, else why not."""
    if system == "nodesio":
        if not (REPO / "loadtest" / "peers" / "node_modules" / "@socket.io" / "redis-streams-adapter").is_dir():
            return "not installed (run `bash loadtest/peers/install.sh`: needs node and npm)"
        try:
            subprocess.run(["node", "--version"], capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return "node not on PATH"
    if system == "pysio":
        try:
            import socketio  # noqa: F401
        except ImportError:
            return "python-socketio not installed (run `bash loadtest/peers/install.sh`)"
    return None


# -- one case per sub-run ----------------------------------------------------------------------

def case_argv(key: str, case: dict[str, Any], systems: list[str], window: float,
              quick: bool) -> list[list[str]]:
    """The scenario command lines of one case (one per system where the scenario takes one)."""
    retries = "0" if quick else "1"
    if case["kind"] == "fanout":
        return [["fanout", "--target", ",".join(systems), "--rooms", str(case["rooms"]),
                 "--room-size", str(case["room_size"]), "--rates", str(case["rate"]),
                 "--sweep-duration", str(window), "--repeat", "0", "--sweep-retries", retries]
                + (["--drain-timeout", "3"] if quick else [])]
    if case["kind"] == "churn":
        argv = ["churn", "--target", ",".join(systems), "--session", case["session"],
                "--rates", str(case["rate"]), "--duration", str(window), "--hold", "1",
                "--retries", retries, "--no-leak-check",
                "--warmup-step", "0" if quick else "5", "--idle-baseline", "1" if quick else "3"]
        if quick:  # a step that falls behind must not cost minutes of draining
            argv += ["--timeout", "5", "--close-timeout", "2", "--settle", "1"]
        if case["session"] == "returning":
            argv += ["--rooms-per-user", str(case["rooms_per_user"])]
        else:
            argv += ["--rooms-per-user", "0"]
        return [argv]
    if case["kind"] == "polling":
        return [["polling", "--target", s, "--pollers", str(case["pollers"]), "--rooms",
                 str(case["rooms"]), "--rates", str(case["rate"]), "--modes", "long",
                 "--idle-seconds", "0", "--no-ws", "--duration", str(window),
                 "--warmup", "1" if quick else "2"] + (["--drain-timeout", "3"] if quick else [])
                for s in systems]
    raise ValueError(case["kind"])


def rows_of(key: str, case: dict[str, Any], doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary rows (one per system) of one sub-run's results document."""
    rows: list[dict[str, Any]] = []
    kind = case["kind"]
    if kind == "fanout":
        last: dict[str, dict[str, Any]] = {}
        retried: dict[str, bool] = {}
        for r in doc["sweep"]:
            if r.get("retried"):
                retried[r["target"]] = True
                continue
            last[r["target"]] = r
        for target, r in last.items():
            # Per message delivered in the window (a step that fell behind delivered fewer than
            # it was offered: dividing by the offered count would flatter it).
            ops = r["deliveries_in_window"] / r["room_size"]
            rows.append({"system": target, "offered": r["rate_msgs"], "unit": "message",
                         "achieved": r["deliveries_per_s"] / r["room_size"],
                         "cpu_ms_per_op": r["node_cpu_s"] / ops * 1e3 if ops else None,
                         "cpu_us_per_delivery": r["node_cpu_us_per_delivery"],
                         "node_cpu_util": r["node_cpu_util"],
                         "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "p999_ms": r["p999_ms"],
                         "kept_up": r["kept_up"], "retried": retried.get(target, False),
                         "other_cpu_util": r["other_cpu_util"],
                         "lost": r["gaps"], "dups": r["dups"]})
    elif kind == "churn":
        last = {}
        retried = {}
        for r in doc["steps"]:
            if r.get("label"):
                continue
            if r.get("retried"):
                retried[r["target"]] = True
                continue
            last[r["target"]] = r
        for target, r in last.items():
            rows.append({"system": target, "offered": r["rate"], "unit": "session",
                         "achieved": r["achieved_per_s"],
                         "cpu_ms_per_op": r["node_cpu_ms_per_session"],
                         "node_cpu_util": r["node_cpu_util"],
                         "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "p999_ms": r["p999_ms"],
                         "kept_up": r["kept_up"], "retried": retried.get(target, False),
                         "other_cpu_util": r["other_cpu_util"],
                         "redis_calls_per_op": r["redis_calls_per_session"],
                         "failed": r["failed"]})
    elif kind == "polling":
        for r in doc["results"]:
            if not r["transport"].startswith("poll"):
                continue
            kept = bool(r.get("complete") and r["p99_ms"] is not None and r["p99_ms"] <= 100.0)
            rows.append({"system": doc["target"], "offered": r["rate_msgs"], "unit": "poll",
                         "achieved": r["delivered_per_s"] / max(1, r["room_size"]),
                         "cpu_ms_per_op": (r["node_cpu_us_per_request"] / 1e3
                                           if r.get("node_cpu_us_per_request") else None),
                         "cpu_us_per_delivery": r["node_cpu_us_per_delivered"],
                         "requests_per_s": r.get("requests_per_s"),
                         "node_cpu_util": r["node_cpu_util"],
                         "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "p999_ms": r["p999_ms"],
                         "kept_up": kept, "retried": False,
                         "other_cpu_util": r["other_cpu_util"],
                         "redis_calls_per_op": r.get("redis_commands_per_request"),
                         "lost": r["gaps"], "dups": r["dups"]})
    for row in rows:
        row["case"] = key
    return rows


class Scenario:
    def __init__(self, args: argparse.Namespace, run_case: Callable[[list[str]], dict[str, Any]]) -> None:
        self.args = args
        self.run_case = run_case

    def run(self) -> dict[str, Any]:
        a = self.args
        t_start = time.time()
        window = a.window if a.window is not None else (4.0 if a.quick else 12.0)
        keys = [k.strip() for k in a.cases.split(",") if k.strip()] or list(
            QUICK_CASES if a.quick else CASES)
        for k in keys:
            if k not in CASES:
                raise SystemExit(f"unknown case {k!r}; known: {', '.join(CASES)}")
        systems: list[str] = []
        missing: dict[str, str] = {}
        for s in [x.strip() for x in a.systems.split(",") if x.strip()]:
            why = peer_available(s)
            if why is None:
                systems.append(s)
            else:
                missing[s] = why
                log(f"{s}: left out: {why}")
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        prefix = a.out or str(RESULTS / (f"compare-{time.strftime('%Y-%m-%d', time.gmtime())}-"
                                         f"{commit[:7]}" + ("-quick" if a.quick else "")))
        runs: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        for key in keys:
            case = CASES[key]
            for argv in case_argv(key, case, systems, window, a.quick):
                t = time.time()
                log(f"{key}: python -m loadtest.bench {' '.join(argv)}")
                try:
                    doc = self.run_case(argv)
                except (Exception, SystemExit) as exc:  # one broken case must not lose the rest
                    log(f"{key}: failed: {exc!r}")
                    runs.append({"case": key, "argv": argv, "error": repr(exc),
                                 "traceback": traceback.format_exc(), "wall_s": time.time() - t})
                    continue
                case_rows = rows_of(key, case, doc)
                rows += case_rows
                runs.append({"case": key, "argv": argv, "wall_s": round(time.time() - t, 1),
                             "doc": doc})
                for r in case_rows:
                    log(f"{key} {r['system']}: {_fmt(r['cpu_ms_per_op'], 3)} ms/{r['unit']}, "
                        f"p50/p99 {_fmt(r['p50_ms'])}/{_fmt(r['p99_ms'])} ms, "
                        f"{'kept up' if r['kept_up'] else 'DID NOT KEEP UP'}")
        first: dict[str, Any] = next((x["doc"] for x in runs if "doc" in x), {})
        m = first.get("machine", {})
        machine_line = (f"{m.get('nproc')} x {m.get('cpu_model')}, {m.get('mem_total_gib')} GiB, "
                        f"Python {m.get('python')}, load average at start {m.get('loadavg_at_start')}"
                        if m else "?")
        out = {"scenario": NAME, "repo_commit": commit, "node_commit": first.get("node_commit", "?"),
               "machine_line": machine_line,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
               "quick": a.quick, "window_s": window, "systems": systems, "missing": missing,
               "cases": {k: CASES[k] for k in keys}, "rows": rows, "runs": runs,
               "duration_s": round(time.time() - t_start, 1),
               "loadavg_at_end": os.getloadavg(), "outputs": {}}
        a.json = a.json or prefix + ".json"
        a.plot = None  # the plot is written here, not by bench.main
        png = prefix + ".png"
        try:
            plot(out, png)
            out["outputs"]["plot"] = os.path.relpath(png, REPO)
        except Exception as exc:  # matplotlib missing: the JSON and table still count
            log(f"plot failed: {exc!r}")
        out["outputs"]["json"] = os.path.relpath(a.json, REPO)
        md = prefix + ".md"
        out["outputs"]["markdown"] = os.path.relpath(md, REPO)
        Path(md).write_text(markdown(out) + "\n")
        log(f"done in {out['duration_s']:.0f} s: {a.json}, {png}, {md}")
        return out


# -- output ---------------------------------------------------------------------------------------

def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.{nd}f}"


def markdown(doc: dict[str, Any]) -> str:
    systems = doc["systems"]
    lines = [f"Commit {doc['repo_commit'][:7]}, {doc['date_utc']} UTC, "
             f"{'--quick, ' if doc['quick'] else ''}{doc['window_s']:.0f} s windows, "
             f"run took {doc['duration_s'] / 60:.1f} min. Node code {doc.get('node_commit', '?')}; "
             f"machine {doc.get('machine_line', '?')}. Cost = server process CPU per operation; "
             f"p50/p99 end to end (fan-out, polling: scheduled send to receipt; churn: scheduled "
             f"connect to the last answer). **no** = did not keep up at this load: its figures "
             f"are no evidence for a ratio.", ""]
    if doc.get("missing"):
        lines += ["Left out: " + "; ".join(f"{s}: {why}" for s, why in doc["missing"].items()), ""]
    head = "| case | " + " | ".join(f"{s}: CPU/op, p50 / p99 ms, kept up" for s in systems) + " |"
    lines += [head, "|---|" + "---|" * len(systems)]
    by = {(r["case"], r["system"]): r for r in doc["rows"]}
    for key, case in doc["cases"].items():
        cells = []
        for s in systems:
            r = by.get((key, s))
            if r is None:
                err = next((x["error"] for x in doc["runs"] if x["case"] == key and "error" in x), None)
                cells.append("failed: " + err[:60] if err else "-")
                continue
            cost = (f"{r['cpu_ms_per_op'] * 1e3:,.0f} µs/{r['unit']}" if r["cpu_ms_per_op"] is not None
                    and r["cpu_ms_per_op"] < 1 else f"{_fmt(r['cpu_ms_per_op'], 2)} ms/{r['unit']}")
            cells.append(f"{cost}, {_fmt(r['p50_ms'])} / {_fmt(r['p99_ms'])}, "
                         f"{'yes' if r['kept_up'] else '**no**'}"
                         + (f" (achieved {r['achieved']:,.0f}/s)" if not r["kept_up"] else ""))
        lines.append(f"| {case['what']} | " + " | ".join(cells) + " |")
    ratios = []
    for key in doc["cases"]:
        o, n = by.get((key, "ours")), by.get((key, "nodesio"))
        if o and n and o["cpu_ms_per_op"] and n["cpu_ms_per_op"]:
            both = o["kept_up"] and n["kept_up"]
            ratios.append(f"{key} {o['cpu_ms_per_op'] / n['cpu_ms_per_op']:.1f}×"
                          + ("" if both else " (not both kept up: no evidence)"))
    if ratios:
        lines += ["", "CPU per operation, ours / Node Socket.IO: " + ", ".join(ratios)]
    other = [r["other_cpu_util"] for r in doc["rows"] if r.get("other_cpu_util") is not None]
    if other:
        lines += ["", f"Other processes' CPU during the windows (the machine is shared): "
                      f"{min(other):.0%}-{max(other):.0%} of one core."]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(doc["cases"])
    systems = doc["systems"]
    by = {(r["case"], r["system"]): r for r in doc["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(systems))
    colors = {"ours": "#1f77b4", "nodesio": "#2ca02c", "pysio": "#ff7f0e"}
    for ax, field, title in ((axes[0], "cpu_ms_per_op", "server CPU per operation (ms, log)"),
                             (axes[1], "p99_ms", "p99 latency (ms, log)")):
        for i, s in enumerate(systems):
            xs, ys, hatches = [], [], []
            for j, key in enumerate(cases):
                r = by.get((key, s))
                if r is None or r.get(field) is None:
                    continue
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(r[field])
                hatches.append(r["kept_up"])
            bars = ax.bar(xs, ys, width, label=s, color=colors.get(s))
            for bar, kept in zip(bars, hatches, strict=True):
                if not kept:
                    bar.set_hatch("//")
                    bar.set_alpha(0.5)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"compare @ {doc['repo_commit'][:7]}, {doc['date_utc']} UTC"
                 f"{' (--quick)' if doc['quick'] else ''}; hatched = did not keep up; "
                 "shared 2-core machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def rederive(path: str) -> None:
    """``python -m loadtest.scenario_compare FILE.json``: the rows, table and plot of a saved run
    again from its raw scenario documents (after a change to how rows are derived; no new
    measurement). Rewrites FILE.json's rows and the .md and .png next to it."""
    doc = json.loads(Path(path).read_text())
    rows: list[dict[str, Any]] = []
    for run in doc["runs"]:
        if "doc" in run:
            rows += rows_of(run["case"], doc["cases"][run["case"]], run["doc"])
    doc["rows"] = rows
    doc["rows_derived_by"] = "loadtest/scenario_compare.py rows_of (re-derived from the raw runs)"
    Path(path).write_text(json.dumps(doc, indent=2, default=str))
    prefix = path[:-5] if path.endswith(".json") else path
    plot(doc, prefix + ".png")
    Path(prefix + ".md").write_text(markdown(doc) + "\n")
    print(markdown(doc))


if __name__ == "__main__":
    rederive(sys.argv[1])
