"""The relay of two checkouts, taking turns: did a change make it faster?

    python -m bench.relay_ab BEFORE AFTER [--pairs 8] [--messages 3000] [--sessions 10]

BEFORE and AFTER are checkouts of this repository (``git worktree add /tmp/before HEAD~3``);
each run starts ``python -m bench.relay_server`` in one of them as ``bench.relay`` does (this
interpreter, that checkout's package first on the path) against one ``smtp-sink``, drives it
with ``smtp-source`` and reads CPU from ``/proc``: the relay process's and its writer child's
apart. The two take turns, the order swapping every pair, so that both see the same minutes
of a shared VM, whose speed moves by up to 2x within one; the medians are printed last.
Sequential blocks of runs misled this project once (a 10% gain that alternating pairs showed
to be noise); this is the measure for a change of a few percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from .common import ROOT, smtp_sink
from .relay import drive, message_file, own_cpu, serving, tree


def one_run(
    checkout: Path, sink: int, msg: Path, n: int, sessions: int, reuse: bool
) -> dict[str, float]:
    """The relay of ``checkout``: msgs/s, and CPU µs a message of it and of its children."""
    with serving("ours-process", sink, n + 10, checkout=checkout) as (server, port):
        children = tree(server.pid)[1:]
        relay0, child0 = own_cpu(server.pid), sum(own_cpu(c) for c in children)
        wall, errors = drive(port, msg, n, sessions, reuse)
        relay1, child1 = own_cpu(server.pid), sum(own_cpu(c) for c in children)
    if errors:
        sys.exit(f"{checkout}: smtp-source reported errors: {errors[:3]}")
    return {
        "msgs_per_s": n / wall,
        "relay_cpu_us": (relay1 - relay0) / n * 1e6,
        "child_cpu_us": (child1 - child0) / n * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("before", type=Path, help="a checkout of this repository")
    ap.add_argument("after", type=Path, help="another checkout (the working tree: .)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", default="2k", choices=["2k", "100k", "5m"])
    ap.add_argument("--new-sessions", action="store_true", help="a new session per message")
    ap.add_argument("--json", type=Path, help="write every run and the medians here")
    a = ap.parse_args()
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    for name, checkout in trees.items():
        if not (checkout / "bench" / "relay_server.py").is_file():
            ap.error(f"{name}: {checkout} is not a checkout of this repository")
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    (ROOT / "bench" / ".cache").mkdir(parents=True, exist_ok=True)  # serving's stores
    with tempfile.TemporaryDirectory() as tmp, smtp_sink() as (sink, _):
        msg = message_file(Path(tmp), a.size)
        for i in range(a.pairs):
            order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
            for name in order:
                got = one_run(trees[name], sink, msg, a.messages, a.sessions, not a.new_sessions)
                runs[name].append(got)
                print(f"pair {i} {name:6s} {got['msgs_per_s']:7.0f} msgs/s  relay "
                      f"{got['relay_cpu_us']:6.0f} µs  child {got['child_cpu_us']:5.0f} µs",
                      flush=True)  # fmt: skip
    medians = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    for name, m in medians.items():
        print(f"median {name:6s} {m['msgs_per_s']:7.0f} msgs/s  relay {m['relay_cpu_us']:6.0f} µs"
              f"  child {m['child_cpu_us']:5.0f} µs  ({trees[name]})")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()},
                                      "runs": runs, "medians": medians}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
