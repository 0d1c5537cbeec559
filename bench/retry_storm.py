"""Retry storms: what the retry budget holds back, and what retries save when an instance dies.

(a) Every instance fails. Three instances answer every request with 503; the client sends an
    open-loop load for 20 s through a `meshlib.Mesh` whose Route has `retries: {attempts: 3}`.
    Upstream attempts are counted at the backends (their hit counters, in shared memory), not
    only by the client, and divided by the requests sent:
    - default budget (20% of requests, at least 10 retries/s, over a 10 s window), at --rate;
    - no budget (`budget: {percent: 100, min_per_second: 1000000}`), at half of --rate so that
      the upstream attempt rate stays within what one client process can send;
    - 20% with no reserve (`min_per_second: 0`; not a default), which isolates the share.
    Figures for the whole run, for the steady state after the first budget window, and the
    budget's model (1 + max(percent/100, min_per_second/rate)) at the rate achieved.
    Targets: at most 1.2 attempts per request with the default budget, 3.0 without.

(b) One instance dies under load. Three healthy instances (50 ms service time), each in its own
    process; the client sends --rate req/s for 30 s through a Route with
    `retries: {attempts: 3, on: [5xx, reset, connect-failure]}` and a 1 s timeout; halfway
    through, one instance's process is killed with SIGKILL (a crash: its connections drop, new
    ones are refused; at 50 ms and 100 req/s about two requests are in flight on it). Run with
    the retries alone (only the default failure accrual on connection failures ejects), with
    outlier detection on the Destination, and with a circuit breaker instead. Target: at least
    99.9% of requests succeed over the whole run; every failure is listed by what it failed with.

The default rate is 100 req/s: a failing attempt costs this async client about 3 ms of CPU on a
shared 2-core machine (each retried attempt also opens a new connection, as the failed
response is closed unread), so 200 req/s x 3 attempts is beyond one client process here and
the open loop would fall behind (the start lag printed shows it when it does).

Backends are the pure-ASGI app of `bench/load_balancing.py` under uvicorn in separate processes
on 127.0.0.1; the load generator is its open loop (requests start at a fixed rate, evenly
spaced, whatever the answers do).

    python bench/retry_storm.py               # full run (~3 minutes)
    python bench/retry_storm.py --quick       # smoke run (~1.5 minutes)
    python bench/retry_storm.py --rate 200    # on a quiet machine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _plots
import httpx
from _common import RESULTS, load_average, machine_info, median, table, write_json
from load_balancing import Fleet, Outcome, figures, open_loop

from meshlib import Mesh
from meshlib.rules import load_yaml

SERVICE = "backend"
MAX_ATTEMPTS_WITH_BUDGET = 1.2
PRECISION = 0.001
"""Targets are judged at the precision the table prints: the floor's start-up allowance (its
retries leave the window with their slot while the share stays) can add a retry or two per
2,000 requests over a 20 s run; the steady state shows the share alone."""
ATTEMPTS_WITHOUT_BUDGET = 3.0
SUCCESS_TARGET = 0.999
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=300)


def endpoints_yaml(addresses: list[str]) -> str:
    lines = "\n".join(f"  - {{address: {a}}}" for a in addresses)
    return f"kind: Endpoints\nservice: {SERVICE}\nendpoints:\n{lines}\n"


# -- (a) every instance failing ----------------------------------------------------------------


@dataclass(frozen=True)
class BudgetCase:
    key: str
    title: str
    budget: str | None  # the `budget:` of the retries, as YAML flow; None: the defaults
    percent: float  # for the model of the expected attempts per request
    min_per_second: float
    rate_share: float = 1.0  # runs at this share of --rate (keeps the upstream attempt rate similar)


BUDGET_CASES = [
    BudgetCase("default_budget", "default budget (20%, >= 10/s)", None, 20.0, 10.0),
    BudgetCase(
        "no_budget", "no budget (100% + 1e6/s)", "{percent: 100, min_per_second: 1000000}", 100, 1e6, 0.5
    ),
    BudgetCase("no_reserve", "20%, no reserve (NOT default)", "{percent: 20, min_per_second: 0}", 20.0, 0.0),
]


def storm_rules(addresses: list[str], case: BudgetCase) -> str:
    budget = f", budget: {case.budget}" if case.budget else ""
    return (
        endpoints_yaml(addresses) + f"---\nkind: Route\nservice: {SERVICE}\nroutes:\n"
        f"  - name: all\n    retries: {{attempts: 3{budget}}}\n"
    )


def expected_attempts(case: BudgetCase, rate: float, attempts: int = 3) -> float:
    """The budget's steady state when every attempt fails: retries per second are capped at
    the greater of min_per_second and percent% of the request rate, and each request takes at
    most attempts - 1 of them."""
    retries_per_s = max(case.min_per_second, case.percent / 100 * rate)
    return 1 + min(attempts - 1, retries_per_s / rate)


def run_storm(fleet: Fleet, case: BudgetCase, args: argparse.Namespace) -> dict[str, Any]:
    rate = args.rate * case.rate_share
    mesh = Mesh(service="storm-client")
    mesh.apply_rules(load_yaml(storm_rules(fleet.addresses, case), source=f"{case.key}.yaml"), case.key)
    started = [0]
    samples: list[tuple[float, int, int]] = []  # (t, requests started, backend hits so far)
    hits0 = sum(fleet.hit_counts())

    def sample(t: float) -> None:
        samples.append((t, started[0], sum(fleet.hit_counts()) - hits0))

    async def main() -> list[Outcome]:
        async with mesh.client(limits=LIMITS) as client:

            async def send() -> httpx.Response:
                started[0] += 1
                return await client.get(f"http://{SERVICE}/work")

            return await open_loop(send, rate, args.seconds, every_second=sample)

    try:
        outcomes = asyncio.run(main())
        time.sleep(0.2)  # the last answers' hit counts
        hits = sum(fleet.hit_counts()) - hits0
        retries = mesh.stats.counter("retries", SERVICE)
        refused = mesh.stats.counter("budget_exhausted", SERVICE)
    finally:
        mesh.close()
    requests = started[0]  # sent (a request the client could not send never reached a backend)
    # steady state: between the samples taken at the end of the first budget window and at the
    # last start; the hit counters lag the client a little at both ends alike
    first = next((s for s in samples if s[0] >= args.window), None)
    last = samples[-1] if samples else None
    steady = None
    if first is not None and last is not None and last[1] > first[1]:
        steady = {
            "from_s": first[0],
            "to_s": last[0],
            "requests": last[1] - first[1],
            "attempts": last[2] - first[2],
            "attempts_per_request": (last[2] - first[2]) / (last[1] - first[1]),
        }
    sent = sorted(o.due + o.lag for o in outcomes if o.error not in ("client-saturated", "cancelled"))
    achieved = (len(sent) - 1) / (sent[-1] - sent[0]) if len(sent) > 1 and sent[-1] > sent[0] else rate
    per_second = [
        {"t": t, "requests": n - pn, "attempts": h - ph}
        for (t, n, h), (_, pn, ph) in zip(samples[1:], samples[:-1], strict=True)
    ]
    ratios = sorted(p["attempts"] / p["requests"] for p in per_second if p["requests"])
    return {
        "title": case.title,
        "budget": case.budget or "defaults (percent 20, min_per_second 10, window 10s)",
        "rate_per_s": rate,
        "achieved_rate_per_s": achieved,
        "requests": requests,
        "upstream_attempts": hits,
        "attempts_per_request": hits / requests if requests else None,
        "steady_state": steady,
        "median_second_attempts_per_request": median(ratios),
        "expected_attempts_per_request": expected_attempts(case, achieved),
        "client_retries": retries,
        "client_budget_refusals": refused,
        "client_counted_attempts": requests + retries,
        "statuses": dict(Counter(o.status if o.status is not None else o.error for o in outcomes)),
        "start_lag_p99_ms": figures(outcomes)["start_lag_p99_ms"],
        "per_second": per_second,
    }


# -- (b) one instance killed ---------------------------------------------------------------------


@dataclass(frozen=True)
class KillCase:
    key: str
    title: str
    destination: str  # extra Destination fields, YAML


KILL_CASES = [
    KillCase("retries_only", "retries only", ""),
    KillCase(
        "retries_outlier",
        "retries + outlier_detection",
        "outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection: 30s,"
        " max_ejection_percent: 50}\n",
    ),
    KillCase(
        "retries_breaker",
        "retries + circuit_breaker",
        "circuit_breaker: {consecutive_failures: 5, open_for: 30s}\n",
    ),
]


def kill_rules(addresses: list[str], case: KillCase) -> str:
    return (
        endpoints_yaml(addresses)
        + f"---\nkind: Destination\nservice: {SERVICE}\nload_balancer: round_robin\n{case.destination}"
        + f"---\nkind: Route\nservice: {SERVICE}\nroutes:\n  - name: all\n    timeout: 1s\n"
        "    retries: {attempts: 3, on: [5xx, reset, connect-failure]}\n"
    )


def run_kill(case: KillCase, args: argparse.Namespace) -> dict[str, Any]:
    half = args.kill_seconds / 2
    with Fleet(3, separate=True, delay=args.service_ms / 1e3) as fleet:
        mesh = Mesh(service="kill-client")
        rules = kill_rules(fleet.addresses, case)
        mesh.apply_rules(load_yaml(rules, source=f"{case.key}.yaml"), case.key)
        hits0 = fleet.hit_counts()
        at_kill: list[int] = []

        def kill() -> None:
            at_kill.extend(fleet.hit_counts())
            fleet.kill(0)

        async def main() -> list[Outcome]:
            async with mesh.client(limits=LIMITS) as client:

                async def send() -> httpx.Response:
                    return await client.get(f"http://{SERVICE}/work")

                return await open_loop(send, args.rate, args.kill_seconds, events=[(half, kill)])

        try:
            outcomes = asyncio.run(main())
            hits = [h - h0 for h, h0 in zip(fleet.hit_counts(), hits0, strict=True)]
            stats = {
                "retries": mesh.stats.counter("retries", SERVICE),
                "budget_refusals": mesh.stats.counter("budget_exhausted", SERVICE),
                "retries_cut_by_deadline": mesh.stats.counter("retry_deadline", SERVICE),
                "ejections": mesh.stats.counter("ejections", SERVICE),
                "breaker_opened": mesh.stats.counter("breaker_open", fleet.addresses[0]),
            }
        finally:
            mesh.close()
    whole = figures(outcomes)
    after = figures([o for o in outcomes if o.due >= half])
    failed = [o for o in outcomes if not o.ok]
    retried = [o for o in outcomes if o.ok and (o.attempt or 1) > 1]
    return {
        "title": case.title,
        "rules": rules.replace(fleet.addresses[0], "KILLED")
        .replace(fleet.addresses[1], "ADDR1")
        .replace(fleet.addresses[2], "ADDR2"),
        "killed_at_s": half,
        "whole_run": whole,
        "after_kill": after,
        "hits_per_instance": hits,
        "hits_on_killed_before_kill": (at_kill[0] - hits0[0]) if at_kill else None,
        "client": stats,
        "succeeded_after_a_retry": len(retried),
        # started before the kill and answered by a retry: in flight when the process died
        "succeeded_after_a_retry_started_before_kill": sum(1 for o in retried if o.due + o.lag < half),
        "failures": [
            {"t_s": round(o.due, 3), "after_kill_s": round(o.due - half, 3), "what": o.error or o.status}
            for o in failed[:100]
        ],
        "failures_by_second_after_kill": dict(
            Counter(int(o.due - half) for o in failed if o.due >= half).most_common()
        ),
        "per_second_from_kill": per_second_from_kill(outcomes, half),
    }


def per_second_from_kill(outcomes: list[Outcome], kill_at: float) -> list[dict[str, Any]]:
    """Requests by the second they were due to start in, counted from the kill (t_s = -1: the
    second before it): started, succeeded at the first attempt, succeeded after a retry, failed."""
    bins: dict[int, Counter[str]] = {}
    for o in outcomes:
        b = bins.setdefault(math.floor(o.due - kill_at), Counter())
        b["started"] += 1
        if not o.ok:
            b["failed"] += 1
        elif (o.attempt or 1) > 1:
            b["succeeded_after_retry"] += 1
        else:
            b["succeeded_first_attempt"] += 1
    keys = ("started", "succeeded_first_attempt", "succeeded_after_retry", "failed")
    return [{"t_s": t, **{k: bins[t][k] for k in keys}} for t in sorted(bins)]


# -- plot ------------------------------------------------------------------------------------------


def plot(storm: dict[str, Any], kills: dict[str, Any], args: argparse.Namespace, path: Path) -> bool:
    """(a) upstream attempts and requests per second through each budget run; (b) per kill
    case, requests per second by outcome around the kill. False without matplotlib."""
    made = _plots.figure(2, max(1, len(kills)), size=(13.0, 9.0))
    if made is None:
        return False
    fig, axes = made
    grid = axes[0].get_gridspec()
    for ax in axes[: len(axes) // 2]:
        ax.remove()
    top = fig.add_subplot(grid[0, :])
    series: dict[str, tuple[list[float], list[float]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for k, r in enumerate(storm.values()):
        xs = [p["t"] - 0.5 for p in r["per_second"]]
        color = f"C{k}"
        series[f"{r['title']}: upstream attempts"] = (xs, [p["attempts"] for p in r["per_second"]])
        styles[f"{r['title']}: upstream attempts"] = {"color": color, "marker": ".", "linewidth": 1.6}
        series[f"{r['title']}: requests sent"] = (xs, [p["requests"] for p in r["per_second"]])
        styles[f"{r['title']}: requests sent"] = {"color": color, "linestyle": ":", "linewidth": 1.2}
    top.axvline(
        args.window, color="grey", linestyle="--", linewidth=1, label="end of the first budget window"
    )
    _plots.curves(
        top,
        series,
        styles=styles,
        title=f"(a) 3 of 3 instances answer 503; retries {{attempts: 3}}; open loop, {args.rate:g} req/s "
        f"(no budget: {args.rate * BUDGET_CASES[1].rate_share:g}) for {args.seconds:g} s per budget; "
        "attempts counted at the backends",
        xlabel="time since the run started, s",
        ylabel="per second",
        legend=False,
    )
    top.set_ylim(0, 1.6 * max((y for xs, ys in series.values() for y in ys), default=1))
    top.legend(fontsize=_plots.LEGEND_SIZE, loc="upper center", ncol=3)
    outcomes = {
        "succeeded_first_attempt": ("succeeded at the first attempt", "C2", "-"),
        "succeeded_after_retry": ("succeeded after a retry", "C0", "-"),
        "failed": ("failed", "C3", "-"),
    }
    bottom = axes[len(axes) // 2 :]
    for ax, r in zip(bottom, kills.values(), strict=False):
        rows = r["per_second_from_kill"]
        xs = [p["t_s"] + 0.5 for p in rows]
        series = {label: (xs, [p[key] for p in rows]) for key, (label, _, _) in outcomes.items()}
        styles = {label: {"color": c, "linestyle": ls, "marker": "."} for label, c, ls in outcomes.values()}
        ax.axvline(0, color="black", linestyle="--", linewidth=1, label="instance killed (SIGKILL)")
        w = r["whole_run"]
        _plots.curves(
            ax,
            series,
            styles=styles,
            title=f"(b) {r['title']}: {w['requests'] - w['succeeded']} of {w['requests']:,} failed",
            xlabel="request start, s since the kill",
            ylabel="requests per second (log scale above 1)",
            legend=False,
        )
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=-0.2, top=max(args.rate * 2, 10))
        if ax is bottom[0]:
            ax.legend(fontsize=_plots.LEGEND_SIZE, loc="upper left", bbox_to_anchor=(0.0, 0.9))
    _plots.suptitle(
        fig,
        "Retry storms. (a) top: what the retry budget holds back when every instance fails. "
        f"(b) bottom: one of 3 instances ({args.service_ms:g} ms) killed with SIGKILL at "
        f"{args.kill_seconds / 2:g} s of {args.kill_seconds:g}; {args.rate:g} req/s open loop; "
        "retries {attempts: 3, on: [5xx, reset, connect-failure]}, timeout 1s",
    )
    return _plots.save(fig, path)


# -- main ------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rate", type=float, default=100.0, help="requests started per second (no budget: half of it)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each (a) run")
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="length of each (b) run")
    parser.add_argument("--service-ms", type=float, default=50.0, help="service time in (b), ms")
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--json", type=Path, default=RESULTS / "retry_storm.json", help="results file")
    parser.add_argument("--png", type=Path, default=RESULTS / "retry_storm.png", help="plot file")
    args = parser.parse_args(argv)
    args.window = 10.0  # the budget's window (the default)
    if args.quick:
        args.seconds, args.kill_seconds = min(args.seconds, 12.0), min(args.kill_seconds, 16.0)

    info = machine_info()
    print(
        f"python {info['python']} on {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"httpx {info['packages']['httpx']}, uvicorn {info['packages']['uvicorn']}, "
        f"load {info['load_average']}"
    )
    started = time.perf_counter()

    print(
        f"(a) 3 instances answering 503; open loop for {args.seconds:g} s per budget",
        flush=True,
    )
    storm: dict[str, Any] = {}
    with Fleet(3) as fleet:
        for i in range(3):
            fleet.fails[i] = 503
        for case in BUDGET_CASES:
            r = storm[case.key] = run_storm(fleet, case, args)
            st = r["steady_state"]
            print(
                f"  {case.title:<32} {r['attempts_per_request']:.3f} attempts/request "
                f"(steady state {st['attempts_per_request'] if st else float('nan'):.3f}; "
                f"model {r['expected_attempts_per_request']:.3f}; {r['achieved_rate_per_s']:.0f} req/s; "
                f"start lag p99 {r['start_lag_p99_ms']:.0f} ms)",
                flush=True,
            )

    print(
        f"(b) 3 instances ({args.service_ms:g} ms), one killed at {args.kill_seconds / 2:g} s; "
        f"{args.rate:g} req/s open loop for {args.kill_seconds:g} s each",
        flush=True,
    )
    kills: dict[str, Any] = {}
    for kcase in KILL_CASES:
        r = kills[kcase.key] = run_kill(kcase, args)
        w = r["whole_run"]
        print(
            f"  {kcase.title:<32} success {w['success_rate']:.3%} ({w['requests'] - w['succeeded']} failed: "
            f"{w['failures'] or 'none'})",
            flush=True,
        )
    elapsed = time.perf_counter() - started

    default, nobudget = storm["default_budget"], storm["no_budget"]
    targets = {
        "default_budget_at_most_1_2": default["attempts_per_request"] <= MAX_ATTEMPTS_WITH_BUDGET + PRECISION,
        "default_budget_steady_state_at_most_1_2": bool(
            default["steady_state"]
            and default["steady_state"]["attempts_per_request"] <= MAX_ATTEMPTS_WITH_BUDGET + PRECISION
        ),
        "no_budget_3_0": abs(nobudget["attempts_per_request"] - ATTEMPTS_WITHOUT_BUDGET) < 0.01,
        **{
            f"kill_{k}_success_at_least_99_9": r["whole_run"]["success_rate"] >= SUCCESS_TARGET
            for k, r in kills.items()
        },
    }

    print()
    rows = []
    for key, r in storm.items():
        st = r["steady_state"]
        target = "-"
        if key == "default_budget":
            target = f"<= 1.2 {verdict(targets['default_budget_at_most_1_2'])}"
        elif key == "no_budget":
            target = f"3.0 {verdict(targets['no_budget_3_0'])}"
        rows.append(
            [
                r["title"],
                f"{r['achieved_rate_per_s']:.0f}",
                r["requests"],
                r["upstream_attempts"],
                f"{r['attempts_per_request']:.3f}",
                f"{st['attempts_per_request']:.3f}" if st else "-",
                f"{r['median_second_attempts_per_request']:.3f}",
                f"{r['expected_attempts_per_request']:.3f}",
                r["client_retries"],
                r["client_budget_refusals"],
                target,
            ]
        )
    print(
        table(
            [
                "(a) all instances 503",
                "req/s",
                "requests",
                "attempts",
                "per req",
                f"after {args.window:g} s",
                "median s",
                "model",
                "retries",
                "refused",
                "target",
            ],
            rows,
        )
    )
    print(
        "(attempts counted at the backends; req/s: the rate achieved; model: 1 + max(percent/100,"
        " min_per_second/rate) at that rate; median s: the median second's attempts per request)"
    )
    print()
    rows = []
    for key, r in kills.items():
        w, a = r["whole_run"], r["after_kill"]
        failures = ", ".join(f"{n} {what}" for what, n in w["failures"].items()) or "-"
        rows.append(
            [
                r["title"],
                w["requests"],
                w["requests"] - w["succeeded"],
                f"{w['success_rate']:.3%}",
                f"{a['success_rate']:.3%}",
                f"{w['p99_ms']:.1f}",
                r["client"]["retries"],
                f"{r['succeeded_after_a_retry']} ({r['succeeded_after_a_retry_started_before_kill']})",
                failures,
                verdict(targets[f"kill_{key}_success_at_least_99_9"]),
            ]
        )
    print(
        table(
            [
                "(b) one of 3 killed",
                "requests",
                "failed",
                "success",
                "after kill",
                "p99 ms",
                "retries",
                "saved (in flight)",
                "failed with",
                ">= 99.9%",
            ],
            rows,
        )
    )
    print(
        "(saved: requests answered by a retry; in flight: of those, started before the kill. "
        f"{elapsed:.0f} s)"
    )

    png = plot(storm, kills, args, args.png)
    if png:
        print(f"wrote {args.png}")
    info["load_average_end"] = load_average()
    write_json(
        args.json,
        {
            "benchmark": "retry_storm",
            "machine": info,
            "config": {
                "rate_per_s": args.rate,
                "no_budget_rate_per_s": args.rate * BUDGET_CASES[1].rate_share,
                "storm_seconds": args.seconds,
                "kill_seconds": args.kill_seconds,
                "kill_service_time_ms": args.service_ms,
                "budget_window_s": args.window,
                "backends": "uvicorn (h11, asyncio), pure ASGI app; (a) one process for the 3 instances, "
                "(b) one process per instance, the killed one ended with SIGKILL",
                "arrivals": "open loop, evenly spaced",
                "attempts_counted": "at the backends (shared-memory hit counters)",
                "storm_rules_example": storm_rules(["ADDR0", "ADDR1", "ADDR2"], BUDGET_CASES[0]),
                "quick": args.quick,
                "elapsed_s": round(elapsed, 1),
                "plot": str(args.png) if png else None,
            },
            "targets": {
                "max_attempts_per_request_with_budget": MAX_ATTEMPTS_WITH_BUDGET,
                "attempts_per_request_without_budget": ATTEMPTS_WITHOUT_BUDGET,
                "min_success_rate_with_a_killed_instance": SUCCESS_TARGET,
                **targets,
            },
            "storm": storm,
            "kill": kills,
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
