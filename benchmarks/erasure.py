"""Erasure codec speed on one core: ``snapshot_daemon.erasure.Codec`` against reedsolo, zfec and pyeclib (ISA-L).

Run ``python -m benchmarks.erasure [--shard-mib 32] [--repeats 5]`` (``make bench`` installs the peers: the
``bench`` extra). For each (k, m) in (3, 1), (4, 2), (8, 2), (8, 3), in one run, on random bytes:

* **encode**: k data shards of ``--shard-mib`` each -> m parity shards;
* **decode**: the k data shards from k survivors when m *data* shards are lost (the most work a decode does);
* **memcpy**: ``np.copyto`` of the same k shards into buffers allocated beforehand, the ceiling.

GB/s is data bytes (k x shard) per second, median of ``--repeats``; one thread (numpy does not thread these ops,
and ``torch.set_num_threads(1)`` plus ``OMP_NUM_THREADS=1`` are set before any library loads). Peers, each where
it installs:

* ``ours``: outputs allocated per call, as the peers do; ``ours (out=)``: parity written into buffers allocated
  once (how the daemon calls it, into its segments);
* ``zfec``: ``Encoder(k, k+m).encode(shards, parity ids)`` and ``Decoder.decode``;
* ``pyeclib isa_l_rs_cauchy`` / ``isa_l_rs_vand``: ``ECDriver.encode(bytes)``, which also splits the input and adds
  fragment headers (one copy more than the others), and ``decode`` of k fragments (its output is joined again);
* ``reedsolo``: pure Python ``RSCodec(m, nsize=k+m)``, encode of 64 KiB and decode of 4 KiB only (it runs at a
  few MB/s and kB/s); the reference oracle of the tests, shown for scale.

Writes ``docs/benchmarks/erasure.{json,md,png}``. Not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import _report as rep  # noqa: E402
from snapshot_daemon.erasure import Codec, packet_bytes  # noqa: E402

CODES = ((3, 1), (4, 2), (8, 2), (8, 3))
OUT = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "benchmarks")


def _median_secs(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm: plans, tables, first touch of reused buffers
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return rep.median(times)


def _ours(k: int, m: int, data: list[np.ndarray], repeats: int) -> dict[str, Any]:
    codec = Codec(k, m)
    parity = codec.encode(data)
    out = [np.empty_like(p) for p in parity]
    survivors = {i: s for i, s in enumerate(data + parity) if i >= m}
    got = codec.decode(survivors)
    assert all(np.array_equal(a, b) for a, b in zip(got, data)), "ours: decode is not the data"
    return {"encode": _median_secs(lambda: codec.encode(data), repeats),
            "encode_out": _median_secs(lambda: codec.encode(data, out=out), repeats),
            "decode": _median_secs(lambda: codec.decode(survivors), repeats),
            "packet_bytes": packet_bytes(k, m), "xor_ops_per_block": len(codec._encoder.ops)}


def _zfec(k: int, m: int, data: list[np.ndarray], repeats: int) -> dict[str, Any] | None:
    try:
        import zfec  # noqa: PLC0415
    except ImportError:
        return None
    blocks = [d.tobytes() for d in data]
    enc, dec = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
    parity_ids = list(range(k, k + m))
    parity = enc.encode(blocks, parity_ids)
    ids = list(range(m, k + m))
    shares = (blocks + list(parity))[m:]
    got = dec.decode(shares, ids)
    assert [bytes(g) for g in got] == blocks, "zfec: decode is not the data"
    return {"encode": _median_secs(lambda: enc.encode(blocks, parity_ids), repeats),
            "decode": _median_secs(lambda: dec.decode(shares, ids), repeats)}


def _pyeclib(k: int, m: int, data: list[np.ndarray], repeats: int, ec_type: str) -> dict[str, Any] | None:
    try:
        from pyeclib.ec_iface import ECDriver  # noqa: PLC0415

        driver = ECDriver(k=k, m=m, ec_type=ec_type)
    except Exception:  # noqa: BLE001 - not installed, or this backend is not in its liberasurecode
        return None
    whole = b"".join(d.tobytes() for d in data)
    frags = driver.encode(whole)
    survivors = frags[m:]  # the first m fragments are data: lose those
    assert driver.decode(survivors) == whole, f"pyeclib {ec_type}: decode is not the data"
    return {"encode": _median_secs(lambda: driver.encode(whole), repeats),
            "decode": _median_secs(lambda: driver.decode(survivors), repeats)}


def _reedsolo(k: int, m: int, nbytes: int = 64 * 1024) -> dict[str, Any] | None:
    try:
        import reedsolo  # noqa: PLC0415
    except ImportError:
        return None
    rs = reedsolo.RSCodec(m, nsize=k + m)
    msg = bytes(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8))
    t = time.perf_counter()
    coded = rs.encode(msg)
    enc = time.perf_counter() - t
    # Erase the first m symbols of every codeword (data symbols), then decode: on the first 4 KiB of data only,
    # as reedsolo's erasure decode runs at a few kB/s.
    n = k + m
    words = -(-4096 // k)
    msg, coded = msg[: words * k], coded[: words * n]
    damaged = bytearray(coded)
    erase = [i for i in range(len(coded)) if i % n < m]
    for i in erase:
        damaged[i] = 0
    t = time.perf_counter()
    got = rs.decode(bytes(damaged), erase_pos=erase)[0]
    dec = time.perf_counter() - t
    assert bytes(got) == msg, "reedsolo: decode is not the data"
    return {"encode": enc, "decode": dec * nbytes / len(msg), "bytes": nbytes}


def run(shard_mib: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    shard = shard_mib << 20
    rows = []
    for k, m in CODES:
        rng = np.random.default_rng(k * 10 + m)
        data = [rng.integers(0, 256, shard, dtype=np.uint8) for _ in range(k)]
        nbytes = k * shard
        dst = [np.empty_like(d) for d in data]
        memcpy = _median_secs(lambda: [np.copyto(a, b) for a, b in zip(dst, data)], repeats)
        row: dict[str, Any] = {"k": k, "m": m, "data_bytes": nbytes, "memcpy_gbps": nbytes / memcpy / 1e9}
        ours = _ours(k, m, data, repeats)
        row["ours"] = {"encode_gbps": nbytes / ours["encode"] / 1e9, "encode_out_gbps": nbytes / ours["encode_out"] / 1e9,
                       "decode_gbps": nbytes / ours["decode"] / 1e9, "packet_bytes": ours["packet_bytes"],
                       "xor_ops_per_block": ours["xor_ops_per_block"]}
        for name, res in (("zfec", _zfec(k, m, data, repeats)),
                          ("pyeclib isa_l_rs_cauchy", _pyeclib(k, m, data, repeats, "isa_l_rs_cauchy")),
                          ("pyeclib isa_l_rs_vand", _pyeclib(k, m, data, repeats, "isa_l_rs_vand"))):
            row[name] = None if res is None else {"encode_gbps": nbytes / res["encode"] / 1e9,
                                                  "decode_gbps": nbytes / res["decode"] / 1e9}
        rs = _reedsolo(k, m)
        row["reedsolo"] = None if rs is None else {"encode_gbps": rs["bytes"] / rs["encode"] / 1e9,
                                                   "decode_gbps": rs["bytes"] / rs["decode"] / 1e9,
                                                   "bytes": rs["bytes"]}
        z = row["zfec"]
        row["ours_vs_zfec_encode"] = None if z is None else row["ours"]["encode_gbps"] / z["encode_gbps"]
        row["ours_decode_vs_encode"] = row["ours"]["decode_gbps"] / row["ours"]["encode_gbps"]
        rows.append(row)
        zs = "-" if z is None else "{:.2f}/{:.2f}".format(z["encode_gbps"], z["decode_gbps"])
        print(f"({k},{m}) ours encode {row['ours']['encode_gbps']:.2f} (out= {row['ours']['encode_out_gbps']:.2f}) "
              f"decode {row['ours']['decode_gbps']:.2f} GB/s; zfec {zs}; memcpy {row['memcpy_gbps']:.2f}", flush=True)
    return {"benchmark": "erasure", "command": rep.command_line(), "machine": rep.machine_info(),
            "load_average": rep.load_average(), "shard_bytes": shard, "repeats": repeats,
            "git": rep.git_revision(os.path.dirname(os.path.abspath(__file__))), "rows": rows}


PEERS = ("ours", "ours (out=)", "zfec", "pyeclib isa_l_rs_cauchy", "pyeclib isa_l_rs_vand", "reedsolo")


def _value(row: dict[str, Any], peer: str, op: str) -> float | None:
    if peer == "ours (out=)":
        return row["ours"]["encode_out_gbps"] if op == "encode" else None
    r = row.get(peer)
    return None if r is None else r[f"{op}_gbps"]


def render(result: dict[str, Any]) -> str:
    lines = ["# Erasure codec, one core", "",
             f"Command: `{result['command']}`. Shards of {result['shard_bytes'] >> 20} MiB, median of "
             f"{result['repeats']}; GB/s of data bytes (k x shard). Decode rebuilds m lost *data* shards. "
             "reedsolo encodes 64 KiB and decodes 4 KiB only. pyeclib's encode also splits the input and adds headers.", "",
             rep.describe_machine_md(result["machine"]), ""]
    headers = ["(k, m)", "op"] + list(PEERS) + ["memcpy", "ours / zfec"]
    rows = []
    for r in result["rows"]:
        for op in ("encode", "decode"):
            ratio = r["ours_vs_zfec_encode"] if op == "encode" else (
                None if r["zfec"] is None else r["ours"]["decode_gbps"] / r["zfec"]["decode_gbps"])
            rows.append([f"({r['k']}, {r['m']})", op] + [rep.fmt(_value(r, p, op), 6 if p == "reedsolo" else 2)
                                                          for p in PEERS]
                        + [rep.fmt(r["memcpy_gbps"]), rep.fmt(ratio, 1, "x")])
    lines.append(rep.markdown_table(headers, rows))
    lines += ["", "Ours: decode / encode: " + ", ".join(
        f"({r['k']}, {r['m']}) {r['ours_decode_vs_encode']:.2f}" for r in result["rows"]) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    labels = [f"({r['k']},{r['m']}) {op}" for r in result["rows"] for op in ("encode", "decode")]
    series = {p: [_value(r, p, op) for r in result["rows"] for op in ("encode", "decode")]
              for p in PEERS if p != "reedsolo"}
    series["memcpy"] = [r["memcpy_gbps"] for r in result["rows"] for _ in (0, 1)]
    rep.grouped_bar_plot(path, "Erasure coding, one core (GB/s of data)", labels, series, "GB/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard-mib", type=int, default=32, help="bytes per shard, MiB (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is reported")
    p.add_argument("--out", default=OUT, help="folder for erasure.{json,md,png} (default docs/benchmarks)")
    a = p.parse_args(argv)
    result = run(a.shard_mib, a.repeats)
    print(rep.write_outputs(a.out, "erasure", result, render, plot))


if __name__ == "__main__":
    main()
