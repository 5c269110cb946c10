"""Where the bytes on the wire go: every Fleet API exchange of a loopback deployment, taken apart.

    python benchmarks/bench_wire.py [--nodes 2] [--rounds 5] [--idle 30] [--path warm|today]
                                    [--tls] [--out /tmp/bench-wire]

Runs the same deployment as ``bench_deploy.py`` (digits-label-shift, ``aggregation='mean'``,
evaluation only in the last round; 2 nodes host clients 0, 1 of 4 with one trainer per round, 6
nodes host 6 of 6) with every SuperNode behind the byte-counting proxy, and records every byte
it forwards. The Fleet API of flwr 1.42 is protobuf over HTTP/1.1 (httpx in the SuperNode), so
the recorded streams parse into requests and responses; each is split into

- HTTP: request/status line and headers;
- envelope: the protobuf body minus the object content it carries;
- object heads: the ``<type> <children ids> <length>`` head of each pushed/pulled object
  (the children are 64-character SHA-256 ids);
- array data: the bodies of ``ArrayChunk`` objects (an Array's ``.npy`` bytes: the raw values and
  the ``.npy`` header; packed arrays: one uint8 Array with a JSON layout in front);
- other object bodies: Array/ArrayRecord/RecordDict/Message/ConfigRecord/MetricRecord bodies
  (array metadata, record keys, config values, metrics),

per endpoint (pull-messages polls, heartbeats, push/pull of objects, confirmations ...), for an
idle period before the run (``--idle`` s: what a waiting fleet costs per second) and for each
warm training round (rounds 2..R-1). ``payload`` is what the strategy counts (summary.json:
ArrayRecord bytes incl. ``.npy`` headers). ``--tls``: the same deployment with TLS; the streams are
then counted as TLS records (handshake, application data) instead. Prints a Markdown report (also
``<out>/results-<path><nodes>[-tls].md``). Results: ``RESULTS_edge.md``, "Where the wire bytes go".
"""

from __future__ import annotations

import argparse
import bisect
import collections
import itertools
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_deploy import TODAY, WARM, LoadSampler, _cfg, follow_marking_rounds  # noqa: E402
from flwr.proto.message_pb2 import PullObjectResponse, PushObjectRequest  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import (  # noqa: E402 - reads Flower's object head
    get_object_head_values_from_object_content)

from floral_flwr.deploy.certificates import make_certs  # noqa: E402
from floral_flwr.deploy.deployment import Deployment  # noqa: E402

PARTS = ("http", "envelope", "object heads", "array data", "other object bodies")


@dataclass
class Half:
    """One request or one response: when its first byte passed, its head and its body."""

    t: float
    head: bytes
    body: bytes
    framing: int = 0  # chunked transfer encoding: the chunk-size lines (HTTP, not body)


@dataclass
class Exchange:
    t: float
    path: str
    up: dict[str, int] = field(default_factory=dict)  # part -> bytes
    down: dict[str, int] = field(default_factory=dict)
    objects: list[tuple[str, int, int]] = field(default_factory=list)  # (type, head bytes, body bytes)
    heads: tuple[bytes, bytes] = (b"", b"")  # the request's and the response's HTTP head


def _parse_stream(chunks: list[tuple[float, bytes]]) -> list[Half]:
    """HTTP/1.1 messages (requests or responses) of one direction of one connection."""
    buf, times, out = bytearray(), [], []
    pos = 0
    for t, data in chunks:
        times.append((len(buf), t))
        buf += data

    starts = [start for start, _ in times]

    def time_at(offset: int) -> float:  # when the chunk holding byte ``offset`` passed
        return times[max(0, bisect.bisect_right(starts, offset) - 1)][1]

    while pos < len(buf):
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = bytes(buf[pos:end + 4])
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
        start, body_at = pos, end + 4
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body, p = bytearray(), body_at
            while True:
                eol = buf.find(b"\r\n", p)
                size = int(bytes(buf[p:eol]).split(b";")[0], 16)
                body += buf[eol + 2:eol + 2 + size]
                p = eol + 2 + size + 2
                if size == 0:
                    break
            out.append(Half(time_at(start), head, bytes(body), framing=(p - body_at) - len(body)))
            pos = p
        else:
            n = int(headers.get(b"content-length", b"0"))
            out.append(Half(time_at(start), head, bytes(buf[body_at:body_at + n])))
            pos = body_at + n
    return out


def _object_parts(content: bytes, ex: Exchange) -> tuple[int, int, int]:
    """(head bytes, array data bytes, other body bytes) of one object's content."""
    kind, _, body_len = get_object_head_values_from_object_content(content)
    head = len(content) - body_len
    ex.objects.append((kind, head, body_len))
    return (head, body_len, 0) if kind == "ArrayChunk" else (head, 0, body_len)


def _split(ex: Exchange, half: Half, upstream: bool) -> dict[str, int]:
    parts = dict.fromkeys(PARTS, 0)
    parts["http"] = len(half.head) + half.framing
    contents: list[bytes] = []
    name = ex.path.rsplit("/", 1)[-1]
    try:
        if upstream and name == "push-object":
            contents = [PushObjectRequest.FromString(half.body).object_content]
        elif not upstream and name == "pull-object":
            contents = [PullObjectResponse.FromString(half.body).object_content]
    except Exception:  # noqa: BLE001 - a body we cannot parse counts as envelope
        contents = []
    carried = 0
    for c in contents:
        if c:
            head, data, other = _object_parts(c, ex)
            parts["object heads"] += head
            parts["array data"] += data
            parts["other object bodies"] += other
            carried += len(c)
    parts["envelope"] = len(half.body) - carried
    return parts


def exchanges(record: list[tuple[float, int, bool, bytes]]) -> list[Exchange]:
    """Every request/response pair recorded by the proxy tap, in time order."""
    streams: dict[tuple[int, bool], list[tuple[float, bytes]]] = collections.defaultdict(list)
    for t, conn, upstream, data in record:
        streams[(conn, upstream)].append((t, data))
    out = []
    for conn in sorted({c for c, _ in streams}):
        requests = _parse_stream(streams.get((conn, True), []))
        responses = _parse_stream(streams.get((conn, False), []))
        for req, resp in zip(requests, responses):  # httpx: one request at a time per connection
            path = req.head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            ex = Exchange(req.t, path, heads=(req.head, resp.head))
            ex.up = _split(ex, req, True)
            ex.down = _split(ex, resp, False)
            out.append(ex)
    return sorted(out, key=lambda e: e.t)


def _table(groups: dict[str, list[Exchange]], per: float, label: str) -> list[str]:
    """Per endpoint: requests and bytes up/down per ``label``, split into PARTS."""
    lines = [f"| endpoint | requests per {label} | up bytes | down bytes | " + " | ".join(
        f"{p} up/down" for p in PARTS) + " |", "|---" * (4 + len(PARTS)) + "|"]
    total_up = total_down = 0.0
    totals = {p: [0.0, 0.0] for p in PARTS}
    for path, exs in sorted(groups.items(), key=lambda kv: -sum(sum(e.up.values()) + sum(e.down.values())
                                                                 for e in kv[1])):
        up = sum(sum(e.up.values()) for e in exs) / per
        down = sum(sum(e.down.values()) for e in exs) / per
        total_up, total_down = total_up + up, total_down + down
        cells = []
        for p in PARTS:
            u, d = sum(e.up[p] for e in exs) / per, sum(e.down[p] for e in exs) / per
            totals[p][0] += u
            totals[p][1] += d
            cells.append(f"{u:,.0f} / {d:,.0f}")
        lines.append(f"| `{path}` | {len(exs) / per:.1f} | {up:,.0f} | {down:,.0f} | " + " | ".join(cells) + " |")
    lines.append(f"| **all** | {sum(len(v) for v in groups.values()) / per:.1f} | **{total_up:,.0f}** | "
                 f"**{total_down:,.0f}** | " + " | ".join(f"{u:,.0f} / {d:,.0f}" for u, d in totals.values()) + " |")
    return lines


def _by_path(exs: list[Exchange]) -> dict[str, list[Exchange]]:
    groups: dict[str, list[Exchange]] = collections.defaultdict(list)
    for e in exs:
        groups[e.path].append(e)
    return groups


TLS_TYPES = {20: "change-cipher-spec", 21: "alert", 22: "handshake", 23: "application data"}


def tls_records(record: list[tuple[float, int, bool, bytes]]) -> list[tuple[float, bool, int, int]]:
    """(time, upstream, content type, length incl. the 5-byte header) of every TLS record."""
    streams: dict[tuple[int, bool], list[tuple[float, bytes]]] = collections.defaultdict(list)
    for t, conn, upstream, data in record:
        streams[(conn, upstream)].append((t, data))
    out = []
    for (_, upstream), chunks in streams.items():
        buf = b"".join(d for _, d in chunks)
        starts = list(itertools.accumulate([0] + [len(d) for _, d in chunks[:-1]]))
        pos = 0
        while pos + 5 <= len(buf):
            n = int.from_bytes(buf[pos + 3:pos + 5], "big")
            t = chunks[max(0, bisect.bisect_right(starts, pos) - 1)][0]
            out.append((t, upstream, buf[pos], 5 + n))
            pos += 5 + n
    return sorted(out)


def _tls_report(recs: list[tuple[float, bool, int, int]], windows: list[tuple[float, float]], per: float,
                label: str) -> list[str]:
    """TLS records in ``windows``: count and bytes per type and direction, per ``label``. A TLS 1.3
    application-data record adds 22 bytes to what it carries (5 header, 1 inner type, 16 tag)."""
    lines = [f"| TLS record type | records up / down per {label} | bytes up / down per {label} |", "|---|---|---|"]
    for kind in sorted({r[2] for r in recs}):
        sel = [r for r in recs if r[2] == kind and any(a <= r[0] < b for a, b in windows)]
        up = [r for r in sel if r[1]]
        down = [r for r in sel if not r[1]]
        lines.append(f"| {TLS_TYPES.get(kind, kind)} | {len(up) / per:.1f} / {len(down) / per:.1f} | "
                     f"{sum(r[3] for r in up) / per:,.0f} / {sum(r[3] for r in down) / per:,.0f} |")
    sel = [r for r in recs if any(a <= r[0] < b for a, b in windows)]
    lines.append(f"| **all** | {sum(r[1] for r in sel) / per:.1f} / {sum(not r[1] for r in sel) / per:.1f} | "
                 f"**{sum(r[3] for r in sel if r[1]) / per:,.0f}** / **{sum(r[3] for r in sel if not r[1]) / per:,.0f}** |")
    return lines


def run(out: Path, nodes: int, rounds: int, idle: float, path: str, tls: bool = False) -> str:
    partitions = 4 if nodes == 2 else nodes
    extra = "fraction-train=0.5 fraction-evaluate=0.5" if nodes == 2 else ""
    runtime = WARM if path == "warm" else TODAY
    poll = "" if path == "warm" else "reply-poll=0"
    name = f"wire-{path}{nodes}" + ("-tls" if tls else "")
    work = out / f"work-{name}"
    certs = make_certs(work / "certs", nodes) if tls else None
    record: list[tuple[float, int, bool, bytes]] = []
    lock = threading.Lock()

    def tap(conn: int, upstream: bool, data: bytes) -> None:
        with lock:
            record.append((time.monotonic(), conn, upstream, data))

    with LoadSampler() as load, Deployment(work, nodes, partitions, state_root=work / "state", proxy=True,
                                           runtime=runtime, certs=certs) as d:
        assert d.byte_counter is not None
        d.byte_counter.tap = tap
        d.wait_warm()
        idle_from = time.monotonic()
        time.sleep(idle)  # the fleet waits for a run: polls and heartbeats only
        idle_to = time.monotonic()
        run_id = d.submit(ROOT, _cfg(out, name, rounds, f"{extra} {poll} min-available-nodes={nodes}"))
        status, marks = follow_marking_rounds(d, run_id, out / name, time.monotonic)
    summary = json.loads((out / name / "summary.json").read_text())
    warm_windows = [(marks[r], marks[r + 1]) for r in range(1, rounds - 1) if r in marks and r + 1 in marks]
    load_s = load.summary()
    head = [f"### {nodes} SuperNodes, {path} path{', TLS' if tls else ''} ({status}; load average "
            f"{load_s['load-min']:.1f} / {load_s['load-median']:.1f} / {load_s['load-max']:.1f} min/median/max)", "",
            f"payload per round (strategy's count, ArrayRecord incl. .npy headers): up "
            f"{summary.get('bytes-up-per-round'):,.0f} / down {summary.get('bytes-down-per-round'):,.0f}; "
            f"warm rounds {len(warm_windows)}, mean "
            f"{statistics.mean(b - a for a, b in warm_windows) if warm_windows else float('nan'):.2f} s"]
    if tls:  # encrypted: count TLS records instead of HTTP exchanges
        recs = tls_records(record)
        n_warm = max(1, len(warm_windows))
        return "\n".join(head + ["", f"Idle fleet ({idle:.0f} s before the run), per second:", "",
                                 *_tls_report(recs, [(idle_from, idle_to)], idle_to - idle_from, "s"), "",
                                 "Warm training round (rounds 2..R-1), per round:", "",
                                 *_tls_report(recs, warm_windows, n_warm, "round"), ""])
    exs = exchanges(record)
    idle_exs = [e for e in exs if idle_from <= e.t < idle_to]
    warm_exs = [e for e in exs if any(a <= e.t < b for a, b in warm_windows)]
    warm_s = statistics.mean(b - a for a, b in warm_windows) if warm_windows else float("nan")
    n_warm = max(1, len(warm_windows))
    objects = collections.Counter()
    object_bytes = collections.Counter()
    for e in warm_exs:
        for kind, head, body in e.objects:
            objects[kind] += 1
            object_bytes[kind] += head + body
    # every recorded byte must land in some exchange's parts (else the parser lost something)
    rec_up = sum(len(x[3]) for x in record if x[2])
    rec_down = sum(len(x[3]) for x in record if not x[2])
    got_up = sum(sum(e.up.values()) for e in exs)
    got_down = sum(sum(e.down.values()) for e in exs)
    lines = [head[0], "", head[2] + f" ({warm_s:.2f} s); parsed {got_up:,} of {rec_up:,} bytes up "
             f"and {got_down:,} of {rec_down:,} down into {len(exs):,} HTTP exchanges", "",
             f"Idle fleet ({idle:.0f} s before the run), per second:", "",
             *_table(_by_path(idle_exs), idle_to - idle_from, "s"), "",
             "Warm training round (rounds 2..R-1), per round:", "",
             *_table(_by_path(warm_exs), n_warm, "round"), "",
             "Objects moved per warm round (count, bytes incl. head): " + ", ".join(
                 f"{k} {objects[k] / n_warm:.1f} ({object_bytes[k] / n_warm:,.0f})" for k in sorted(objects)), ""]
    sample = next((e for e in warm_exs if e.path.endswith("pull-messages")), None)
    if sample is not None:  # what an HTTP head carries (every request has one)
        lines += ["One pull-messages request and response head, as on the wire:", "", "```",
                  sample.heads[0].decode(errors="replace").rstrip(), "", sample.heads[1].decode(errors="replace").rstrip(),
                  "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--path", choices=["warm", "today"], default="warm")
    ap.add_argument("--tls", action="store_true", help="TLS between SuperNodes and SuperLink (counts TLS records)")
    ap.add_argument("--out", default="/tmp/bench-wire")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    text = run(out, a.nodes, a.rounds, a.idle, a.path, a.tls)
    print(text)
    (out / f"results-{a.path}{a.nodes}{'-tls' if a.tls else ''}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
