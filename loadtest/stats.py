"""Measurement helpers for the benchmark: CPU sampling, percentiles, summaries, Markdown."""

from __future__ import annotations

import statistics
import time
from array import array
from typing import Any

import psutil


def _proc_cpu(pids: list[int]) -> tuple[float, float]:
    """(user + system, system) CPU seconds of ``pids``."""
    total = system = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
            system += t.system
        except psutil.NoSuchProcess:
            pass
    return total, system


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def now_us() -> int:
    return time.time_ns() // 1000


def sample_window(sampler: CpuSampler, w0_us: int, w1_us: int) -> dict[str, Any]:
    """Wait for the window ``[w0_us, w1_us]`` (wall clock, µs), sampling CPU over exactly it."""
    time.sleep(max(0.0, (w0_us - now_us()) / 1e6))
    sampler.start()
    time.sleep(max(0.0, (w1_us - now_us()) / 1e6))
    return sampler.stop()


class CpuSampler:
    """User+system CPU seconds of groups of processes between :meth:`start` and :meth:`stop`.

    ``machine_busy`` is the whole machine's busy time over the same window, so that CPU used
    by anything else running (other people's tests) shows up in the report.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start_values: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            out[name], out[name + "_sys"] = _proc_cpu(pids)
        out["machine_busy"] = _machine_busy()
        return out

    def start(self) -> None:
        self.start_values = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        return {k: end[k] - self.start_values[k] for k in end}


def percentiles_ms(lat_us: array) -> dict[str, float | None]:
    if not lat_us:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    s = sorted(lat_us)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, int(p * n))] / 1000.0

    return {"p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": s[-1] / 1000.0}


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def one_line(r: dict[str, Any]) -> str:
    return (f"{r['target']:>5} rate {r['rate_msgs']:>6.0f}/s: {r['deliveries_per_s']:>9,.0f} del/s "
            f"({r['deliveries_per_s'] / r['offered_deliveries_per_s']:.1%}), node CPU "
            f"{r['node_cpu_util']:.0%} (sys {r['node_sys_share']:.0%}), {_f(r['deliveries_per_node_cpu_s'], 0)} del/CPU-s, "
            f"p50/p99/p99.9 {_f(r['p50_ms'], 2)}/{_f(r['p99_ms'], 2)}/{_f(r['p999_ms'], 2)} ms, "
            f"gen CPU {r['generator_cpu_util']:.0%} redis {r['redis_cpu_util']:.0%} other "
            f"{r['other_cpu_util']:.0%} {'OK' if r['kept_up'] else 'BEHIND'}")


SUMMARY_KEYS = ("rate_msgs", "deliveries_per_s", "node_cpu_util", "node_cpu_us_per_delivery",
                "deliveries_per_node_cpu_s", "p50_ms", "p99_ms", "p999_ms", "max_ms",
                "generator_cpu_util", "clients_cpu_util", "publisher_cpu_util", "redis_cpu_util",
                "other_cpu_util")


def summarize(measured: list[dict[str, Any]], targets: list[str]) -> dict[str, Any]:
    """Medians over the repeats, per label and target, and the ratios between targets."""
    out: dict[str, Any] = {}
    for label in sorted({r["label"] for r in measured}):
        per: dict[str, Any] = {}
        for target in targets:
            runs = [r for r in measured if r["label"] == label and r["target"] == target]
            if not runs:
                continue
            med = {}
            for k in SUMMARY_KEYS:
                vals = [r[k] for r in runs if r.get(k) is not None]
                med[k] = statistics.median(vals) if vals else None
            med["runs"] = len(runs)
            med["all_kept_up"] = all(r["kept_up"] for r in runs)
            per[target] = med
        out[label] = per
    # Ratio of deliveries per node CPU-second, ours / naive, pairing runs of the same repeat
    # (taken back to back) before taking the median.
    if "ours" in targets and "naive" in targets:
        ratios: dict[str, Any] = {}
        for label in out:
            pairs = []
            for r in measured:
                if r["label"] != label or r["target"] != "ours":
                    continue
                for n in measured:
                    if n["label"] == label and n["target"] == "naive" and n["repeat"] == r["repeat"]:
                        if r["deliveries_per_node_cpu_s"] and n["deliveries_per_node_cpu_s"]:
                            pairs.append(r["deliveries_per_node_cpu_s"] / n["deliveries_per_node_cpu_s"])
            ratios[label] = {"efficiency_ratio_median": statistics.median(pairs) if pairs else None,
                             "pairs": pairs}
        out["ours_over_naive"] = ratios
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Command: `{doc['command']}`", ""]
    m = doc["machine"]
    lines.append(f"Machine: {m['nproc']} x {m['cpu_model']}, Python {m['python']}, "
                 f"websockets {m['websockets']}, load average at start {m['loadavg_at_start']}")
    lines.append("")
    if doc["scenario"] == "fanout":
        lines += ["### Rate sweep", "",
                  "| target | msgs/s | offered del/s | delivered del/s | node CPU | node µs/delivery "
                  "| del per node CPU-s | p50 ms | p99 ms | p99.9 ms | generator CPU | Redis CPU "
                  "| other CPU | kept up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in doc["sweep"]:
            lines.append(
                f"| {r['target']} | {r['rate_msgs']:,.0f} | {r['offered_deliveries_per_s']:,.0f} "
                f"| {r['deliveries_per_s']:,.0f} | {r['node_cpu_util']:.0%} "
                f"| {_f(r['node_cpu_us_per_delivery'], 2)} | {_f(r['deliveries_per_node_cpu_s'], 0)} "
                f"| {_f(r['p50_ms'], 2)} | {_f(r['p99_ms'], 2)} | {_f(r['p999_ms'], 2)} "
                f"| {r['generator_cpu_util']:.0%} | {r['redis_cpu_util']:.0%} "
                f"| {r['other_cpu_util']:.0%} | {'yes' if r['kept_up'] else 'no'} |")
        lines += ["", "### Peak and half-peak (medians of the repeats)", "",
                  "| run | target | msgs/s | delivered del/s | node CPU | node µs/delivery "
                  "| del per node CPU-s | p50 ms | p99 ms | p99.9 ms | max ms | clients CPU "
                  "| publisher CPU | Redis CPU | other CPU | runs | all kept up |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        summary = doc["summary"]
        for label in ("peak", "half-peak"):
            for target, s in summary.get(label, {}).items():
                lines.append(
                    f"| {label} | {target} | {s['rate_msgs']:,.0f} | {s['deliveries_per_s']:,.0f} "
                    f"| {s['node_cpu_util']:.0%} | {_f(s['node_cpu_us_per_delivery'], 2)} "
                    f"| {_f(s['deliveries_per_node_cpu_s'], 0)} | {_f(s['p50_ms'], 2)} "
                    f"| {_f(s['p99_ms'], 2)} | {_f(s['p999_ms'], 2)} | {_f(s['max_ms'], 1)} "
                    f"| {s['clients_cpu_util']:.0%} | {s['publisher_cpu_util']:.0%} "
                    f"| {s['redis_cpu_util']:.0%} | {s['other_cpu_util']:.0%} | {s['runs']} "
                    f"| {'yes' if s['all_kept_up'] else 'no'} |")
        ratio = summary.get("ours_over_naive")
        if ratio:
            lines.append("")
            for label, r in ratio.items():
                lines.append(f"Deliveries per node CPU-second, ours / naive ({label}, median of "
                             f"back-to-back pairs): **{_f(r['efficiency_ratio_median'], 2)}** "
                             f"(pairs: {', '.join(f'{p:.2f}' for p in r['pairs'])})")
        peak = doc.get("peak_rate_msgs", {})
        if peak:
            lines.append("")
            lines.append("Peak sustained rate (msgs/s): " + ", ".join(
                f"{t} {v:,.0f} ({v * doc['args']['room_size']:,.0f} deliveries/s)" for t, v in peak.items()))
    elif doc["scenario"] == "scaling":
        lines += ["| nodes | msgs published | Redis commands/msg | of which reading "
                  "| Redis command time µs/msg | of which reading | Redis process CPU µs/msg "
                  "| top commands per msg |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in doc["results"]:
            top = ", ".join(f"{k} {v / r['published']:.2f}" for k, v in list(r["commands"].items())[:5])
            lines.append(f"| {r['nodes']} | {r['published']:,} | {r['commands_per_msg']:.2f} "
                         f"| {r['read_commands_per_msg']:.2f} | {r['command_usec_per_msg']:.1f} "
                         f"| {r['read_command_usec_per_msg']:.1f} | {r['redis_cpu_us_per_msg']:.1f} | {top} |")
    elif doc["scenario"] == "idle":
        lines += ["| target | connections | node RSS before MiB | after MiB | KiB per connection "
                  "| connects/s | idle node CPU | Redis cmds/s idle | loop lag max ms "
                  "| probe echo ms (median / max) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in doc["results"]:
            probe = r.get("probe") or {}
            lines.append(f"| {r['target']} | {r['connections']:,} | {r['rss_before_mib']:.1f} "
                         f"| {r['rss_after_mib']:.1f} | {r['kib_per_connection']:.1f} "
                         f"| {r['connects_per_s']:,.0f} | {r['idle_cpu_util']:.1%} "
                         f"| {_f(r.get('redis_commands_per_s'), 0)} | {_f(r.get('loop_lag_ms_max'), 1)} "
                         f"| {_f(probe.get('echo_ms_median'), 2)} / {_f(probe.get('echo_ms_max'), 2)} |")
    return "\n".join(lines)


def plot_fanout(doc: dict[str, Any], path: str) -> None:
    """p50 and p99 latency against offered deliveries/s, one line per target, from the rate
    sweep (targets interleaved step by step, seconds apart), on log axes; a step that did not
    keep up (after its retry) is drawn hollow. The peak/half-peak repeats are in the tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc.get("sweep", []) if r.get("p99_ms") and not r.get("retried")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = sorted((r for r in rows if r["target"] == target),
                      key=lambda r: r["offered_deliveries_per_s"])
        for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
            x = [r["offered_deliveries_per_s"] for r in mine]
            y = [r[key] for r in mine]
            (line,) = ax.plot(x, y, "-", alpha=0.5)
            ok = [(a, b) for a, b, r in zip(x, y, mine, strict=True) if r["kept_up"]]
            bad = [(a, b) for a, b, r in zip(x, y, mine, strict=True) if not r["kept_up"]]
            if ok:
                ax.plot(*zip(*ok, strict=True), "o", color=line.get_color(), label=target)
            if bad:
                ax.plot(*zip(*bad, strict=True), "o", mfc="none", color=line.get_color())
    a = doc["args"]
    for ax, key in zip(axes, ("p50", "p99"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered deliveries/s")
        ax.set_ylabel(f"{key} latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"fan-out, {a['rooms']} rooms of {a['room_size']}, one server process each "
                 "(hollow: did not keep up)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def redis_call(port: int, *args: Any) -> Any:
    """One command to the Redis on ``port`` (localhost), over a plain socket."""
    import socket

    from loadtest.publisher import RespReader, _cmd

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_cmd(*args))
        return RespReader(sock).read()


def redis_info(port: int, section: str) -> dict[str, str]:
    text = redis_call(port, "INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def commandstats(port: int) -> dict[str, int]:
    """Calls per command, plus ``usec:<command>``: Redis's own time spent in it."""
    out = {}
    for k, v in redis_info(port, "commandstats").items():
        fields = dict(f.split("=", 1) for f in v.split(","))
        out[k.removeprefix("cmdstat_")] = int(fields["calls"])
        out["usec:" + k.removeprefix("cmdstat_")] = int(fields["usec"])
    return out
