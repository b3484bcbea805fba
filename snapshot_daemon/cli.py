"""``ckpt daemon start|stop|status``: the snapshot daemon's commands, added to the ``ckpt`` CLI.

``ckpt`` finds them through the ``ckpt.commands`` entry point (pyproject.toml), so it never imports this layer.
Exit codes as everywhere in ``ckpt``: 0 success, 1 no daemon runs there (status, stop), 2 refused or bad usage.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ckpt.errors import DaemonError, DaemonUnavailableError
from snapshot_daemon import client
from snapshot_daemon.paths import ENV_DIR
from snapshot_daemon.store import _human

EXIT_NONE, EXIT_REFUSED = 1, 2


def _size(text: str) -> int:
    from formats.foreign.hf_safetensors import parse_size  # noqa: PLC0415 - formats.foreign imports torch

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _print_status(doc: dict[str, Any]) -> None:
    print(f"daemon pid {doc['pid']} in {doc['dir']}, up {doc['uptime_secs']:.0f} s")
    print(f"  memory: {_human(doc['memory_used'])} of {_human(doc['memory_budget'])} in {doc['segments']} segments "
          f"(keep last {doc['keep_last']} steps per run)")
    print(f"  clients: {len(doc['clients'])}" + "".join(f"\n    pid {c['pid']} ({c['client']})" for c in doc["clients"]))
    if not doc["runs"]:
        print("  no sealed snapshots")
    for run, steps in doc["runs"].items():
        print(f"  run {run}:")
        for step, e in steps.items():
            state = "sealed" if e["complete"] else f"partial, {len(e['shards'])} of {e['world']} ranks"
            print(f"    step {step}: {state}, {len(e['shards'])} shards, {_human(sum(e['shards'].values()))}")


def cmd_start(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        doc = client.start(args.dir, args.memory_budget, args.keep_last)
    except DaemonError as e:
        print(f"ckpt daemon start: {e}")
        return EXIT_REFUSED
    doc["start_secs"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(doc, sort_keys=True))
    else:
        verb = "started" if doc["started"] else "already running:"
        print(f"ckpt daemon {verb} pid {doc['pid']}, dir {doc['dir']}, socket {doc['socket']}, memory budget "
              f"{_human(doc['memory_budget'])}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        doc = client.status(args.dir)
    except DaemonUnavailableError as e:
        if args.json:
            print(json.dumps({"running": False, "error": str(e)}))
        else:
            print(f"ckpt daemon status: {e}")
        return EXIT_NONE
    if args.json:
        print(json.dumps({"running": True, **doc}, sort_keys=True))
    else:
        _print_status(doc)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        out = client.stop(args.dir)
    except DaemonUnavailableError as e:
        print(json.dumps({"stopped": False, "error": str(e)}) if args.json else f"ckpt daemon stop: {e}")
        return EXIT_NONE
    if args.json:
        print(json.dumps({"stopped": True, **out}, sort_keys=True))
    else:
        print(f"ckpt daemon stopped pid {out['pid']} in {out['dir']}; freed {out['segments']} segments "
              f"({_human(out['freed_bytes'])}): the snapshots it held are gone")
    return 0


def add_parsers(sub: Any, finish: Any) -> None:
    """Add ``daemon start|stop|status`` to the ``ckpt`` parser (``finish`` is ckpt.cli's, unused here: these
    commands read no checkpoint and show no progress)."""
    sp = sub.add_parser("daemon", help="the per-node snapshot daemon: start, stop, status")
    dsub = sp.add_subparsers(dest="daemon_command", required=True)
    where = f"the daemon's directory: socket, pid file, log, segments (default ${ENV_DIR}, else /dev/shm/ckpt-daemon-UID)"
    s = dsub.add_parser("start", help="start a daemon unless one runs; returns once it accepts clients")
    s.add_argument("--dir", help=where)
    s.add_argument("--memory-budget", type=_size, metavar="SIZE",
                   help="most bytes of snapshots it holds, e.g. 64GiB (default: half of the directory's file system)")
    s.add_argument("--keep-last", type=int, default=2, metavar="K",
                   help="sealed steps kept per run once their trainer is gone (default 2)")
    s.add_argument("--json", action="store_true", help="print one JSON document (pid, dir, socket, ...)")
    s.set_defaults(func=cmd_start)
    s = dsub.add_parser("status", help="pid, uptime, memory, clients and sealed steps per run (exit 1: none runs)")
    s.add_argument("--dir", help=where)
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(func=cmd_status)
    s = dsub.add_parser("stop", help="stop the daemon; the snapshots it holds are freed")
    s.add_argument("--dir", help=where)
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(func=cmd_stop)
