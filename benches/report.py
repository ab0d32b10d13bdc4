#!/usr/bin/env python3
"""Helpers for benches/bench.sh (standard library only).

  report.py merge KEY=VALUE... [JSON]   one JSON object: the pairs (numbers parsed) plus JSON
  report.py scrape URL                  GET URL, print the body (Prometheus /metrics)
  report.py hist-count FILE             outbox_relay_commit_to_ack_seconds_count in a scrape
  report.py quantiles BEFORE AFTER      JSON: p50/p99/max (ms) of the commit-to-ack histogram
                                        between two scrapes, interpolated within buckets
  report.py render RESULTS.jsonl        the Markdown tables
"""

import json
import math
import sys
import urllib.request

HIST = "outbox_relay_commit_to_ack_seconds"
# The database's share of it: commit to the relay receiving the transaction.
RECEIVE_HIST = "outbox_relay_commit_to_receive_seconds"


def parse_value(v):
    if v == "null":
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def cmd_merge(args):
    out = {}
    for a in args:
        if a.startswith("{"):
            out.update(json.loads(a))
        else:
            k, _, v = a.partition("=")
            out[k] = parse_value(v)
    print(json.dumps(out))


def cmd_scrape(args):
    with urllib.request.urlopen(args[0], timeout=10) as r:
        sys.stdout.write(r.read().decode())


def buckets(path, hist=HIST):
    """{le: cumulative count} and the total count of a histogram (commit-to-ack by default)."""
    out, count = {}, 0
    with open(path) as f:
        for line in f:
            if line.startswith(hist + "_bucket"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[math.inf if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
            elif line.startswith(hist + "_count"):
                count = float(line.rsplit(" ", 1)[1])
    return out, count


def cmd_hist_count(args):
    print(int(buckets(args[0])[1]))


def quantile(q, cum):
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    les = sorted(cum)
    total = cum[math.inf]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for le in les:
        if cum[le] >= rank:
            if le == math.inf:
                return lower  # beyond the last finite bucket: its bound is all we know
            return lower + (le - lower) * (rank - below) / max(cum[le] - below, 1e-12)
        lower, below = le, cum[le]
    return lower


def window(args, hist):
    """The histogram's cumulative buckets between two scrapes, and their total."""
    before, _ = buckets(args[0], hist)
    after, _ = buckets(args[1], hist)
    cum = {le: after[le] - before.get(le, 0.0) for le in after}
    return cum, cum.get(math.inf, 0.0)


def summary(prefix, cum, total):
    """p50/p99 (interpolated) and the exact share over 10 ms (a bucket bound, the p99 target)."""
    below10 = cum.get(0.01)
    return {
        f"{prefix}_over_10ms_pct": 100 * (1 - below10 / total) if total and below10 is not None else None,
        f"{prefix}_p50_ms": quantile(0.5, cum) * 1000,
        f"{prefix}_p99_ms": quantile(0.99, cum) * 1000,
    }


def cmd_quantiles(args):
    cum, total = window(args, HIST)
    # The histogram keeps no maximum: the smallest bucket bound holding every observation.
    finite = [le for le in sorted(cum) if le != math.inf and cum[le] >= total]
    upper = finite[0] if finite else math.inf
    out = {
        "ack_count": int(total),
        "ack_max_le_ms": upper * 1000 if upper != math.inf else None,
        **summary("ack", cum, total),
    }
    cum, total = window(args, RECEIVE_HIST)
    if total:
        out.update(summary("receive", cum, total))
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------
# Rendering.

def fmt(v, digits=0, unit=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def per100k(cpu, n):
    return None if cpu is None or not n else cpu * 100000 / n


def median(values, key=lambda v: v):
    """The median by `key` (the lower middle one for an even count)."""
    values = sorted(values, key=key)
    return values[(len(values) - 1) // 2]


def median_run(runs):
    """The run with the median duration."""
    return median(runs, key=lambda r: r["secs"])


def rate(r):
    return r["n"] / r["secs"] if r and r.get("secs") else None


def spread(runs):
    if len(runs) < 2:
        return ""
    rates = sorted(r["n"] / r["secs"] for r in runs)
    return f"{rates[0]:,.0f}–{rates[-1]:,.0f} ({len(runs)} runs)"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mb(kb):
    return None if kb is None else kb / 1024


def others(r, *own):
    """Cores busy with anything but the measured processes during the run (other work on the
    machine, autovacuum, the harness), from /proc/stat."""
    if r.get("machine_cpu_s") is None or not r.get("wall_s"):
        return None
    mine = sum(v for v in own if v is not None)
    return max(r["machine_cpu_s"] - mine, 0) / r["wall_s"]


def render_drain(res, out):
    drain = [r for r in res if r["section"] == "drain"]
    if not drain:
        return
    first = drain[0]
    batch = next((r["poll_batch"] for r in drain if "poll_batch" in r), "?")
    by = {}
    for r in drain:
        by.setdefault(r["kind"], []).append(r)
    dec = median_run(by["decode"]) if "decode" in by else None
    dec_rate = rate(dec)
    names = {
        "sqldecode": "decoding alone, in a backend (`pg_logical_slot_peek_binary_changes`)",
        "decode": "`pg_recvlogical` (decode limit)",
        "relay": "**outbox-relay**",
        "poller": f"polling publisher (batch {batch})",
    }
    rows = []
    for kind in ("decode", "relay", "poller", "sqldecode"):
        if kind not in by:
            continue
        m = median_run(by[kind])
        n = m["n"]
        db_cpu = m.get("walsender_cpu_s") if kind != "poller" else m.get("backend_cpu_s")
        broker = (m.get("watch_cpu_s") or [None])[0]
        rows.append([
            names[kind],
            fmt(rate(m)),
            fmt(m["bytes"] / m["secs"] / 1e6, 1),
            fmt(rate(m) / dec_rate, 2) if dec_rate else "n/a",
            fmt(m["secs"], 2),
            fmt(per100k(m.get("cpu_s"), n), 3),
            fmt(mb(m.get("hwm_kb")), 1),
            fmt(per100k(db_cpu, n), 3),
            fmt(per100k(broker, n), 3),
            fmt(others(m, m.get("cpu_s"), db_cpu, broker), 2),
            spread(by[kind]),
        ])
    out.append(f"### Backlog drain: {first['n']:,} events in transactions of {first['txn']:,}, "
               f"{first['payload_avg']:.0f}-byte payloads, {first['keys']} keys, "
               f"{first['tables']} table, 2 topics × {first['partitions']} partitions\n")
    out.append(table(
        ["", "events/s", "payload MB/s", "× decode limit", "seconds", "CPU s / 100k events",
         "peak RSS MB", "DB-side CPU s / 100k", "broker CPU s / 100k", "other load (cores)",
         "spread (events/s)"],
        rows))
    if "floor" in by:
        f = median(by["floor"], key=lambda r: r["cpu_s_per_100k"])
        out.append(f"\nlibrdkafka alone (`bench_floor`: the same {f['records']:,} records, keys and "
                   f"headers produced straight to the broker with the relay's settings, reports "
                   f"served on the producing thread, no database): {f['records'] / f['secs']:,.0f} "
                   f"records/s at {f['cpu_s_per_100k']:.3f} CPU s / 100k records "
                   f"(median of {len(by['floor'])}), the floor under any relay built on librdkafka.")
    if "poller" in by and "produce_s" in median_run(by["poller"]):
        p = median_run(by["poller"])
        out.append(f"\nPolling publisher's time: locking SELECT {p['select_s']:.1f} s, producing until "
                   f"acknowledged {p['produce_s']:.1f} s, DELETE + COMMIT {p['delete_s']:.1f} s "
                   f"({p['batches']:,} batches).")
    out.append("\nseconds: outbox-relay from process start until the slot's `confirmed_flush_lsn` "
               "passed the last commit (all acknowledged by the broker); pg_recvlogical and the "
               "poller until they exit. CPU: user + system of all the process's threads "
               "(`/proc/PID/stat`). DB-side CPU: the walsender decoding the slot "
               "(pg_recvlogical, relay), the backend serving the poller's queries (its "
               "autovacuum work not included) or the backend decoding in SQL. The last row is "
               "no publisher: the same decoding with no client and no network (the rows are "
               "counted, not sent), an upper bound for any streaming client. Other load: cores busy with anything else on the "
               "machine during the run (other work sharing it, autovacuum, the harness). Median "
               "run by duration when repeated.\n")


def render_quota(res, out):
    q = [r for r in res if r["section"] == "quota"]
    if not q:
        return
    dec = [r for r in res if r["section"] == "drain" and r["kind"] == "decode"]
    dec_rate = rate(median_run(dec)) if dec else None
    rows = []
    for r in q:
        if r.get("skipped"):
            out.append(f"### Relay under a CPU quota\n\nskipped: {r['skipped']}\n")
            return
        quota = r["quota_pct"] / 100
        used = r["cpu_s"] / r["secs"]
        rows.append([
            f"{r['quota_pct']}% of one core ({r['quota_how']})",
            fmt(rate(r)),
            fmt(rate(r) / dec_rate, 2) if dec_rate else "n/a",
            fmt(r["secs"], 2),
            fmt(used, 2),
            fmt(rate(r) / quota),
            fmt(rate(r) / used) if used else "n/a",
            fmt(per100k(r["cpu_s"], r["n"]), 3),
            fmt(mb(r.get("hwm_kb")), 1),
        ])
    out.append(f"### Relay under a CPU quota: the same {q[0]['n']:,}-event backlog\n")
    out.append(table(
        ["limit", "events/s", "× decode limit", "seconds", "cores used", "events/s per core of quota",
         "events/s per core used", "CPU s / 100k events", "peak RSS MB"], rows))
    out.append("")


def render_compare(res, out):
    c = [r for r in res if r["section"] == "compare"]
    if not c:
        return
    by = {}
    for r in c:
        by.setdefault(r["bin"], []).append(r)
    rows = []
    for b, runs in by.items():
        m = median_run(runs)
        cpus = sorted(per100k(r.get("cpu_s"), r["n"]) for r in runs if r.get("cpu_s") is not None)
        rows.append([
            f"`{b}`",
            fmt(rate(m)),
            fmt(m["secs"], 2),
            fmt(median(cpus), 3) if cpus else "n/a",
            f"{cpus[0]:.3f}–{cpus[-1]:.3f}" if cpus else "n/a",
            fmt(mb(m.get("hwm_kb")), 1),
            fmt(per100k(m.get("walsender_cpu_s"), m["n"]), 3),
            spread(runs),
        ])
    out.append(f"### Two relay builds in turns: {c[0]['n']:,} events in transactions of "
               f"{c[0]['txn']:,}\n")
    out.append(table(
        ["relay", "events/s", "seconds", "CPU s / 100k events (median)", "CPU range",
         "peak RSS MB", "walsender CPU s / 100k", "spread (events/s)"], rows))
    out.append("\nevents/s, seconds and RSS: the median run by duration; CPU: the median of the "
               "runs' own CPU per event.\n")


def render_latency(res, out):
    lat = [r for r in res if r["section"] == "latency"]
    if not lat:
        return
    rows = []
    for r in lat:
        rows.append([
            fmt(r["rate"]),
            "with a consumer" if r.get("consumer", True) else "relay alone",
            fmt(r["achieved_per_s"]),
            fmt(r["committed"]),
            fmt(r.get("ack_p50_ms"), 2),
            fmt(r.get("ack_p99_ms"), 2),
            ("≤ " + fmt(r["ack_max_le_ms"], 1)) if r.get("ack_max_le_ms") is not None else "n/a",
            fmt(r.get("ack_over_10ms_pct"), 2, " %"),
            fmt(r.get("receive_p50_ms"), 2),
            fmt(r.get("receive_p99_ms"), 2),
            fmt(r.get("receive_over_10ms_pct"), 2, " %"),
            fmt(r.get("direct_p50_ms"), 2),
            fmt(r.get("direct_p99_ms"), 2),
            fmt(r.get("e2e_p50_ms"), 2),
            fmt(r.get("e2e_p99_ms"), 2),
            fmt(r.get("e2e_max_ms"), 1),
            fmt(r.get("consumed")),
            fmt(100 * r["relay_cpu_s"] / r["wall_s"], 1, " %"),
            fmt(100 * r["walsender_cpu_s"] / r["wall_s"], 1, " %") if r.get("walsender_cpu_s") is not None else "n/a",
            fmt(100 * r["broker_cpu_s"] / r["wall_s"], 1, " %") if r.get("broker_cpu_s") is not None else "n/a",
            fmt(r["machine_cpu_s"] / r["wall_s"], 2),
        ])
    out.append(f"### Latency: single-event transactions at a fixed rate for {lat[0]['secs']:g} s\n")
    out.append(table(
        ["target tx/s", "broker serves", "achieved tx/s", "events", "commit→ack p50 ms", "p99 ms", "max ms",
         "acks > 10 ms", "commit→receive p50 ms", "p99 ms", "> 10 ms", "baseline send→ack p50 ms", "p99 ms", "commit→consumer p50 ms", "p99 ms", "max ms", "consumed", "relay CPU", "walsender CPU",
         "broker CPU", "machine busy (cores)"], rows))
    out.append("\ncommit→ack: the relay's `outbox_relay_commit_to_ack_seconds` histogram "
               "(PostgreSQL commit timestamp to the broker's acknowledgement), difference of "
               "two `/metrics` scrapes, quantiles interpolated linearly inside buckets "
               "(bounds 1, 2.5, 5, 7.5, 10, 15, 25 ms...), max = the bucket bound holding the slowest; acks > 10 ms is exact (a bucket "
               "bound), where p99 interpolated inside (10, 25] ms overstates a tail just past "
               "10 ms. commit→receive: the relay's `outbox_relay_commit_to_receive_seconds` "
               "(commit timestamp to the relay reading the transaction's Begin), the database's "
               "share of commit→ack. baseline: "
               "the same records at the same rate produced straight to the broker with the "
               "relay's producer settings (`bench_load --direct`, no database), right after; "
               "what the relay adds is the difference; it runs with no consumer, like the "
               "\"relay alone\" rows (\"with a consumer\": the same load again while "
               "`bench_load` reads the topics). "
               "commit→consumer: a consumer in `bench_load` subtracts the row's "
               "`clock_timestamp()` (taken in the INSERT, just before its commit) from the time "
               "it reads the record; it includes the consumer's fetch latency. CPU columns: "
               "share of one core during the load (from the load's start until the relay "
               "acknowledged the last event); machine busy: all processes, both cores.\n")


def render_eos(res, out):
    e = [r for r in res if r["section"] == "eos"]
    if not e:
        return
    drains = [r for r in e if r.get("kind") == "relay"]
    modes = ["at-least-once", "exactly-once"]
    if drains:
        by = {m: [r for r in drains if r["delivery"] == m] for m in modes}
        base = rate(median_run(by["at-least-once"])) if by["at-least-once"] else None
        rows = []
        for mode in modes:
            runs = by[mode]
            if not runs:
                continue
            m = median_run(runs)
            broker = (m.get("watch_cpu_s") or [None])[0]
            rows.append([
                f"`{mode}`",
                fmt(rate(m)),
                fmt(rate(m) / base, 2) if base else "n/a",
                fmt(m["secs"], 2),
                fmt(per100k(m.get("cpu_s"), m["n"]), 3),
                fmt(mb(m.get("hwm_kb")), 1),
                fmt(per100k(m.get("walsender_cpu_s"), m["n"]), 3),
                fmt(per100k(broker, m["n"]), 3),
                fmt(others(m, m.get("cpu_s"), m.get("walsender_cpu_s"), broker), 2),
                ", ".join(fmt(r.get("loadavg"), 2) for r in runs),
                spread(runs),
            ])
        f = drains[0]
        out.append(f"### At-least-once vs exactly-once: draining {f['n']:,} events in transactions "
                   f"of {f['txn']:,}, {f['payload_avg']:.0f}-byte payloads, 2 topics × "
                   f"{f['partitions']} partitions\n")
        out.append(table(
            ["delivery", "events/s", "× at-least-once", "seconds", "relay CPU s / 100k events",
             "peak RSS MB", "walsender CPU s / 100k", "broker CPU s / 100k",
             "other load (cores)", "load avg (1 min) at start", "spread (events/s)"], rows))
        out.append("\nThe same backlog (the slot reset to the same copy) drained in turns "
                   "(ABBA...), from process start until `confirmed_flush_lsn` passed the last "
                   "commit; exactly-once with the relay's defaults (a Kafka transaction committed "
                   "at 10,000 events or 100 ms, a position record in it) and a transactional id "
                   "of its own per run. Median run by duration.\n")
    lat = [r for r in e if r.get("kind") == "latency"]
    if lat:
        rows = []
        for mode in modes:
            runs = [r for r in lat if r["delivery"] == mode]
            if not runs:
                continue
            # With --repeat: the run with the median commit-to-consumer p99.
            r = median(runs, key=lambda r: r.get("e2e_p99_ms") or 0)
            rows.append([
                f"`{mode}`",
                "read_committed" if r.get("read_committed") else "read_uncommitted",
                fmt(r["rate"]),
                fmt(r["achieved_per_s"]),
                fmt(r["committed"]),
                fmt(r.get("consumed")),
                fmt(r.get("e2e_p50_ms"), 2),
                fmt(r.get("e2e_p99_ms"), 2),
                fmt(r.get("e2e_max_ms"), 1),
                fmt(r.get("ack_p50_ms"), 2),
                fmt(r.get("ack_p99_ms"), 2),
                fmt(100 * r["relay_cpu_s"] / r["wall_s"], 1, " %"),
                fmt(100 * r["broker_cpu_s"] / r["wall_s"], 1, " %") if r.get("broker_cpu_s") is not None else "n/a",
                fmt(r["machine_cpu_s"] / r["wall_s"], 2),
                ", ".join(fmt(x.get("loadavg"), 2) for x in runs),
            ])
        out.append(f"### At-least-once vs exactly-once: commit→consumer, single-event "
                   f"transactions at {lat[0]['rate']:,} /s for {lat[0]['secs']:g} s\n")
        out.append(table(
            ["delivery", "consumer", "target tx/s", "achieved tx/s", "events", "consumed",
             "commit→consumer p50 ms", "p99 ms", "max ms", "commit→ack p50 ms", "p99 ms",
             "relay CPU", "broker CPU", "machine busy (cores)", "load avg (1 min) at start"],
            rows))
        out.append("\ncommit→consumer: `bench_load`'s consumer (`isolation.level=read_committed` "
                   "for exactly-once: a record is readable once its Kafka transaction commits) "
                   "subtracts the row's `clock_timestamp()` from the time it reads the record. "
                   "commit→ack: the relay's histogram, as in the latency table; in exactly-once "
                   "mode it stops at the record's acknowledgement, before the transaction "
                   "commits. With --repeat: the run with the median commit→consumer p99; the "
                   "load averages of all runs.\n")


def lsn(text):
    """A pg_lsn ('16/B374D848') as a number."""
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def slot_cell(m):
    """When the slot got past the last commit, or how far behind it stayed."""
    if m.get("slot_secs") is not None:
        return fmt(m["slot_secs"], 2)
    cell = f"not within {m.get('grace', 0):g} s more"
    if m.get("confirmed_lsn") and m.get("last_commit"):
        behind = lsn(m["last_commit"]) - lsn(m["confirmed_lsn"])
        cell += f" (stayed {behind / 1e6:,.1f} MB of WAL before it)"
    return cell


def render_debezium(res, out):
    d = [r for r in res if r["section"] == "debezium"]
    if not d:
        return
    drains = [r for r in d if r["kind"] == "drain"]
    name = {"relay": "**outbox-relay**", "debezium": "Debezium (Connect standalone)"}
    if drains:
        f = drains[0]
        rows = []
        for variant in ("default", "small-heap", "quota"):
            for system in ("relay", "debezium"):
                runs = [r for r in drains if r["variant"] == variant and r["system"] == system]
                if not runs:
                    continue
                timed = [r for r in runs if r.get("records_secs")]
                m = median(timed, key=lambda r: r["records_secs"]) if timed else runs[0]
                secs = m.get("records_secs")
                label = name[system]
                if system == "debezium":
                    label += f", `-Xmx{m['heap']}`"
                if variant == "quota":
                    label += f", 1 CPU ({m.get('quota_how', 'quota')})"
                broker = (m.get("watch_cpu_s") or [None])[0]
                slots = [r.get("slot_secs") for r in runs]
                steady_s = secs - m["first_secs"] if secs and m.get("first_secs") is not None else None
                rows.append([
                    label,
                    fmt(m["n"] / secs if secs else None),
                    fmt(m.get("first_secs"), 2),
                    fmt((m["n"] - 1) / steady_s if steady_s else None),
                    fmt(secs, 2),
                    slot_cell(m),
                    fmt(per100k(m.get("records_cpu_s"), m["n"]), 3),
                    fmt(per100k(m["records_cpu_s"] - m["first_cpu_s"], m["n"])
                        if m.get("first_cpu_s") is not None and m.get("records_cpu_s") is not None
                        else None, 3),
                    fmt(mb(m.get("hwm_kb")), 1),
                    fmt(per100k(m.get("walsender_cpu_s"), m["n"]), 3),
                    fmt(per100k(broker, m["n"]), 3),
                    fmt(others(m, m.get("cpu_s"), m.get("walsender_cpu_s"), broker), 2),
                    f"{sum(s is not None for s in slots)} of {len(slots)}",
                    ", ".join(fmt(r["n"] / r["records_secs"]) for r in timed) if len(runs) > 1 else "",
                ])
        out.append(f"### Against Debezium: draining {f['n']:,} events in transactions of "
                   f"{f['txn']:,}, {f['payload_avg']:.0f}-byte payloads, 2 topics × "
                   f"{f['partitions']} partitions (Debezium mode `{f['mode']}`)\n")
        out.append(table(
            ["", "events/s", "first record in Kafka (s)", "events/s after the first",
             "all records in Kafka (s)", "slot confirmed past the last commit (s)",
             "CPU s / 100k events", "of which after the first record", "peak RSS MB", "walsender CPU s / 100k",
             "broker CPU s / 100k", "other load (cores)", "runs whose slot got there",
             "all runs (events/s)"], rows))
        out.append("\nEach on its own copy of the same pristine slot, in turns (the order reversed "
                   "every other round), from process start: until the sum of its topics' end "
                   "offsets grew by the backlog (events/s is computed from this), and until its "
                   "slot's `confirmed_flush_lsn` reached the WAL position just before the last "
                   "COMMIT (Debezium confirms only when Connect flushes offsets, every 10 s, "
                   "and its offsets carry the commit LSN of the transaction before the one its "
                   "last record came from, so without later traffic its slot stays behind the "
                   "last transaction; at most the stated time more is waited). CPU: user + system of all the "
                   "process's threads (`/proc/PID/stat` of the relay, of the Connect JVM) until "
                   "all records were in Kafka, start-up included; \"after the first record\" "
                   "leaves the start-up out (the CPU used once the first record was in Kafka, "
                   "still per 100k events of the backlog). Peak RSS: VmHWM over the whole run. 1 CPU: "
                   "`cpu.cfs_quota_us` = `cpu.cfs_period_us` for the process alone. Median run "
                   "by the time until all records were in Kafka.\n")
    steady = [r for r in d if r["kind"] == "steady"]
    if steady:
        rows = []
        rates = []
        for r in steady:
            if r["rate"] not in rates:
                rates.append(r["rate"])
        for rt in rates:
            for system in ("relay", "debezium"):
                runs = [r for r in steady if r["rate"] == rt and r["system"] == system]
                if not runs:
                    continue
                r = median(runs, key=lambda r: r.get("e2e_p99_ms") or 0)
                label = name[system] + (f", `-Xmx{r['heap']}`" if system == "debezium" else "")
                rows.append([
                    fmt(rt),
                    label,
                    fmt(r["achieved_per_s"]),
                    fmt(r["committed"]),
                    fmt(r.get("consumed")),
                    fmt(r.get("e2e_p50_ms"), 2),
                    fmt(r.get("e2e_p99_ms"), 2),
                    fmt(r.get("e2e_max_ms"), 1),
                    fmt(100 * r["cpu_s"] / r["wall_s"], 1, " %"),
                    fmt(mb(r.get("rss_kb")), 1),
                    fmt(mb(r.get("hwm_kb")), 1),
                    fmt(100 * r["walsender_cpu_s"] / r["wall_s"], 1, " %") if r.get("walsender_cpu_s") is not None else "n/a",
                    fmt(100 * r["broker_cpu_s"] / r["wall_s"], 1, " %") if r.get("broker_cpu_s") is not None else "n/a",
                    fmt(r["machine_cpu_s"] / r["wall_s"], 2),
                    ", ".join(fmt(x.get("e2e_p99_ms"), 2) for x in runs) if len(runs) > 1 else "",
                ])
        out.append(f"### Against Debezium: single-event transactions at a fixed rate for "
                   f"{steady[0]['secs']:g} s, commit→consumer\n")
        out.append(table(
            ["target tx/s", "", "achieved tx/s", "events", "consumed", "commit→consumer p50 ms",
             "p99 ms", "max ms", "CPU (of one core)", "RSS MB at the end", "peak RSS MB",
             "walsender CPU", "broker CPU", "machine busy (cores)", "all runs' p99 ms"], rows))
        out.append("\nEach started on a fresh slot of its own and warmed up (2 s at 100 "
                   "transactions/s, until the consumer had them all), then `bench_load`: a "
                   "consumer reading its topics subtracts the row's `clock_timestamp()` from "
                   "the time it reads the record. CPU: from the load's start until the consumer "
                   "had every record, as a share of one core. With --repeat: the run with the "
                   "median p99.\n")
    first = [r for r in d if r["kind"] == "first"]
    if first:
        rows = []
        for system in ("relay", "debezium"):
            runs = [r for r in first if r["system"] == system]
            if not runs:
                continue
            secs = [r["records_secs"] for r in runs if r.get("records_secs") is not None]
            rows.append([
                name[system],
                ", ".join(f"{1000 * s:,.0f}" for s in secs),
                fmt(median(secs), 2, " s") if secs else "n/a",
                fmt(mb(median(runs, key=lambda r: r.get("hwm_kb") or 0).get("hwm_kb")), 1),
            ])
        out.append("### Against Debezium: from process start to the first record in Kafka\n")
        out.append(table(["", "runs (ms)", "median", "peak RSS MB by then"], rows))
        out.append("\nOne event waiting in a fresh slot; the clock runs from the process's "
                   "start until its topics' end offsets moved.\n")


def render_memory(res, out):
    mem = [r for r in res if r["section"] == "memory"]
    if not mem:
        return
    rows = []
    for r in mem:
        if r.get("skipped"):
            rows.append([r["scenario"], fmt(r["n"]), "skipped: " + r["skipped"], "", "", ""])
            continue
        rows.append([
            r["scenario"],
            fmt(r["n"]),
            fmt(r["secs"], 2),
            fmt(rate(r)),
            fmt(mb(r.get("hwm_kb")), 1),
            fmt(r.get("cpu_s"), 2),
        ])
    out.append("### Memory: one transaction of many events\n")
    out.append(table(["scenario", "events", "drain s (commit → confirmed)", "events/s",
                      "peak RSS MB (VmHWM)", "relay CPU s"], rows))
    out.append("\nThe relay is started (and idle, streaming) before the transaction commits; "
               "peak RSS covers its whole life. The frozen broker gets SIGSTOP right after the "
               "commit and SIGCONT after the stated time.\n")


def render_scaling(res, out):
    sc = [r for r in res if r["section"] == "scaling"]
    if not sc:
        return
    groups = [("payload", "Payload size", lambda r: f"{r['payload_avg']:,.0f} B"),
              ("tables", "Outbox tables",
               lambda r: f"{r['tables']} table{'s' if int(r['tables']) > 1 else ''}"),
              ("source", "Source of events",
               lambda r: "pg_logical_emit_message" if r["tables"] == "message" else "outbox table"),
              ("backlog", "Backlog size", lambda r: f"{r['n']:,} events")]
    for dim, title, label in groups:
        rs = [r for r in sc if r["dim"] == dim]
        if not rs:
            continue
        variants = []
        for r in rs:
            if r["variant"] not in variants:
                variants.append(r["variant"])
        rows = []
        for v in variants:
            dec = [r for r in rs if r["variant"] == v and r["kind"] == "decode"]
            rel = [r for r in rs if r["variant"] == v and r["kind"] == "relay"]
            d = median_run(dec) if dec else None
            m = median_run(rel) if rel else None
            base = m or d
            rows.append([
                label(base),
                fmt(base["n"]),
                fmt(rate(d)),
                fmt(rate(m)),
                fmt(rate(m) / rate(d), 2) if d and m else "n/a",
                fmt(m["bytes"] / m["secs"] / 1e6, 1) if m else "n/a",
                fmt(per100k(m["cpu_s"], m["n"]), 3) if m else "n/a",
                fmt(1e6 * m["cpu_s"] / m["n"], 2) if m else "n/a",
                fmt(per100k(m.get("walsender_cpu_s"), m["n"]), 3) if m else "n/a",
                fmt(mb(m.get("hwm_kb")), 1) if m else "n/a",
                fmt(base["wal_bytes"] / 1e6, 1) if base.get("wal_bytes") is not None else "n/a",
            ])
        first = rs[0]
        out.append(f"### Scaling: {title.lower()} (transactions of {first['txn']:,})\n")
        out.append(table([title.split()[0].lower(), "events", "decode limit events/s",
                          "relay events/s", "× decode limit", "relay MB/s",
                          "relay CPU s / 100k", "relay CPU µs / event", "walsender CPU s / 100k",
                          "peak RSS MB", "backlog WAL MB"], rows))
        out.append("")


def cmd_render(args):
    res = []
    with open(args[0]) as f:
        for line in f:
            line = line.strip()
            if line:
                res.append(json.loads(line))
    out = []
    render_drain(res, out)
    render_quota(res, out)
    render_compare(res, out)
    render_latency(res, out)
    render_eos(res, out)
    render_debezium(res, out)
    render_memory(res, out)
    render_scaling(res, out)
    print("\n".join(out))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "merge": cmd_merge,
        "scrape": cmd_scrape,
        "hist-count": cmd_hist_count,
        "quantiles": cmd_quantiles,
        "render": cmd_render,
    }[cmd](args)


if __name__ == "__main__":
    main()
