"""Fuzz worker for tests/test_fuzz.py (#22): builds small real checkpoints, mutates copies and runs every public
reader on each mutant, one JSON line per case on stdout. Run as ``python -m tests.fuzz_harness ROOT CASES_JSON``;
the parent sets RLIMIT_AS and a wall-clock timeout. A case is {"id", "fmt", "mut", "seed"}; replay one with
CKPT_FUZZ_SEED=<seed>."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

FORMATS = ("universal_manifest", "universal_resealed", "universal_data", "safetensors", "dcp_metadata")
MUTATIONS = ("flip", "truncate", "append", "json")


class CaseTimeout(BaseException):
    pass


def make_state() -> dict[str, Any]:
    import torch
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.arange(20, dtype=torch.int16), "step": 5,
            "lr": 0.001, "name": "run-1"}


def build_originals(root: Path) -> None:
    """One universal checkpoint, one safetensors file, one DCP directory, under ``root`` (idempotent)."""
    import torch
    import ckpt
    if (root / "done").exists():
        return
    state = make_state()
    ckpt.save(state, str(root / "uni"), options=ckpt.SaveOptions(max_chunk_bytes=256, block_bytes=64))
    from safetensors.torch import save_file
    (root / "st").mkdir(exist_ok=True)
    save_file({"w": state["w"], "b": state["b"]}, str(root / "st" / "model.safetensors"))
    import torch.distributed.checkpoint as dcp
    dcp.save({"w": state["w"], "b": state["b"]}, checkpoint_id=str(root / "dcp"), no_dist=True)
    torch.save({"w": state["w"], "b": state["b"]}, str(root / "model.pt"))
    (root / "done").write_text("ok")


# ---- mutations -------------------------------------------------------------------------------------------------

def _json_mutate(doc: Any, rng: random.Random) -> Any:
    """One JSON-aware edit somewhere in ``doc``: numbers to huge/negative/float/str, keys deleted or duplicated,
    values swapped, replaced by lists/dicts/None, or nested deeply."""
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if len(paths) > 5000:
            return
        if isinstance(node, dict):
            for k in list(node):
                paths.append((node, k))
                walk(node[k])
        elif isinstance(node, list):
            for i in range(len(node)):
                paths.append((node, i))
                walk(node[i])
    walk(doc)
    if not paths:
        return doc
    parent, k = rng.choice(paths)
    v = parent[k]
    op = rng.randrange(9)
    if op == 0 and isinstance(v, (int, float)) and not isinstance(v, bool):
        parent[k] = rng.choice([2 ** 63, 2 ** 40, -1, -(2 ** 31), 0.5, float(v) + 1e-3, str(v), v + 1, v ^ 1])
    elif op == 1 and isinstance(parent, dict):
        del parent[k]
    elif op == 2 and isinstance(parent, dict):
        parent[f"{k}_dup"] = v
        other = rng.choice(list(parent))
        parent[k], parent[other] = parent[other], v
    elif op == 3:
        parent[k] = rng.choice([None, [], {}, [v], {"x": v}, True, "", "\x00"])
    elif op == 4:
        deep: Any = v
        for _ in range(rng.choice([50, 600, 3000])):
            deep = [deep] if rng.random() < 0.5 else {"a": deep}
        parent[k] = deep
    elif op == 5 and isinstance(v, str):
        parent[k] = rng.choice(["/step", "../x", "/etc/passwd", v + "x", v[:-1], "a" * 5000, "float4_e2m1fn_x2",
                                "int32", "zstd"])
    elif op == 6 and isinstance(v, list) and v:
        parent[k] = v[::-1] if rng.random() < 0.5 else v + v
    else:
        parent[k] = rng.choice([0, -1, 2 ** 36, "abc", [1], 1.5])
    return doc


def _bytes_mutate(data: bytes, mut: str, rng: random.Random) -> bytes:
    if not data:
        return b"x"
    if mut == "flip":
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if mut == "truncate":
        return data[: rng.randrange(len(data))]
    return data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 4096])))


def mutate(case: dict[str, Any], orig: Path, work: Path) -> tuple[Path, str]:
    """Copy the original of ``case['fmt']`` to ``work`` and mutate it; return (checkpoint path, original path)."""
    import pickle
    from formats import manifest as mf
    fmt, mut, rng = case["fmt"], case["mut"], random.Random(case["seed"])
    if fmt.startswith("universal"):
        src = orig / "uni"
        shutil.copytree(src, work / "uni")
        target = work / "uni"
        if fmt == "universal_data":
            files = sorted(p for p in (target / "data").rglob("*") if p.is_file())
            f = rng.choice(files)
            f.write_bytes(_bytes_mutate(f.read_bytes(), "flip" if mut == "json" else mut, rng))
        else:
            m = target / "manifest.json"
            data = m.read_bytes()
            if mut == "json":
                doc = _json_mutate(json.loads(data), rng)
                text = json.dumps(doc).encode()
                if fmt == "universal_resealed":
                    seal = getattr(mf, "seal", None)
                    try:
                        text = seal(doc) if seal else text
                    except Exception:  # noqa: BLE001 - the doc may no longer be encodable the seal's way
                        pass
                m.write_bytes(text)
            else:
                data = _bytes_mutate(data, mut, rng)
                if fmt == "universal_resealed" and getattr(mf, "reseal", None):
                    data = mf.reseal(data)
                m.write_bytes(data)
        return target, str(src)
    if fmt == "safetensors":
        shutil.copytree(orig / "st", work / "st")
        f = work / "st" / "model.safetensors"
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        if mut == "json":
            doc = _json_mutate(json.loads(data[8:8 + n]), rng)
            head = json.dumps(doc).encode()
            data = len(head).to_bytes(8, "little") + head + data[8 + n:]
        elif mut == "flip":  # flip inside the header mostly
            b = bytearray(data)
            i = rng.randrange(min(len(b), 8 + n))
            b[i] ^= 1 << rng.randrange(8)
            data = bytes(b)
        else:
            data = _bytes_mutate(data, mut, rng)
        f.write_bytes(data)
        return f, str(orig / "st" / "model.safetensors")
    if fmt == "dcp_metadata":
        shutil.copytree(orig / "dcp", work / "dcp")
        f = work / "dcp" / ".metadata"
        data = f.read_bytes()
        if mut == "json":
            md = pickle.loads(data)  # noqa: S301 - our own file
            _mutate_dcp(md, rng)
            data = pickle.dumps(md)
        else:
            data = _bytes_mutate(data, mut, rng)
        f.write_bytes(data)
        return work / "dcp", str(orig / "dcp")
    raise ValueError(fmt)


_DCP_BAD = [0, -1, 5, 2 ** 40, "abc", [1], None, [2 ** 20, 2 ** 20], "float32", 1.5, {}, ()]


def _mutate_dcp(md: Any, rng: random.Random) -> None:
    """Set one field of the DCP metadata (plain values and the allowed classes only) to a wrong type or range."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    fqn = rng.choice(sorted(md.state_dict_metadata))
    tm = md.state_dict_metadata[fqn]
    choice = rng.randrange(5)
    if isinstance(tm, TensorStorageMetadata) and choice < 4 and tm.chunks:
        if choice == 0:
            c = rng.choice(tm.chunks)
            fld = rng.choice(["offsets", "sizes"])
            object.__setattr__(c, fld, rng.choice(_DCP_BAD + [torch.Size([2 ** 40]), torch.Size([])]))
        elif choice == 1:
            object.__setattr__(tm, rng.choice(["size", "chunks", "properties"]), rng.choice(_DCP_BAD))
        elif choice == 2:
            object.__setattr__(tm.properties, "dtype", rng.choice(["float32", None, 5, torch.float64]))
        else:
            tm.chunks = tm.chunks + tm.chunks if rng.random() < 0.5 else []
    else:
        sinfo = md.storage_data
        if sinfo:
            k = rng.choice(list(sinfo))
            v = sinfo[k]
            fld = rng.choice(["offset", "length", "relative_path"])
            object.__setattr__(v, fld, rng.choice(_DCP_BAD + ["../../etc/passwd", "/etc/passwd", 2 ** 62]))


# ---- readers ---------------------------------------------------------------------------------------------------

def readers(fmt: str, path: Path, orig: str, work: Path) -> list[tuple[str, Callable[[], Any]]]:
    import torch
    import ckpt
    from tests.cli_utils import run_cli

    def cli(*args: str) -> Callable[[], Any]:
        def go() -> Any:
            r = run_cli(*args)
            if r.returncode not in (0, 1) and "Traceback" in r.stderr:
                raise RuntimeError(r.stderr[-2000:])
            return r.returncode
        return go

    out: list[tuple[str, Callable[[], Any]]] = []
    if fmt.startswith("universal"):
        def load() -> Any:
            st = {"w": torch.zeros(16, 8), "b": torch.zeros(20, dtype=torch.int16), "step": 0, "lr": 0.0,
                  "name": ""}
            ckpt.load(st, str(path))
            return st

        def open_all() -> Any:
            with ckpt.open(str(path)) as r:
                return {k: r.read(k) for k in r.keys()}
        out += [("load", load), ("open", open_all), ("verify", cli("verify", str(path))),
                ("inspect", cli("inspect", str(path)))]
        out += [("convert", cli("convert", str(path), str(work / "out.pt"), "--to", "torch"))]
    else:
        dst = "st_out" if fmt != "safetensors" else "uni_out"
        to = "safetensors" if fmt != "safetensors" else "universal"
        out += [("convert", cli("convert", str(path), str(work / dst), "--to", to))]
    out += [("diff", cli("diff", str(path), orig))]
    return out


def _same(a: Any, b: Any) -> bool:
    import torch
    if a.keys() != b.keys():
        return False
    for k, v in b.items():
        if isinstance(v, torch.Tensor):
            if not (isinstance(a[k], torch.Tensor) and a[k].dtype == v.dtype and torch.equal(a[k], v)):
                return False
        elif a[k] != v:
            return False
    return True


def run_case(case: dict[str, Any], orig: Path, work: Path, per_reader_s: int) -> dict[str, Any]:
    """Mutate and run each reader; per reader 'ok', 'error:<CheckpointError subclass>' or 'RAW:<type>: msg'."""
    import ckpt
    res: dict[str, Any] = {"id": case["id"], "seed": case.get("seed"), "results": {}}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if "build" in case:
            path, o = build_named(case, orig, work)
        else:
            path, o = mutate(case, orig, work)
    except Exception as e:  # noqa: BLE001 - the mutation could not be made; not a reader's fault
        res["skipped"] = f"{type(e).__name__}: {e}"
        return res
    fmt = case.get("fmt", "universal_manifest")
    for name, fn in readers(fmt, path, o, work):
        t0 = time.perf_counter()
        signal.alarm(per_reader_s)
        try:
            got = fn()
            outcome = "ok"
            if name == "load" and fmt.startswith("universal") and not _same(got, make_state()):
                outcome = "RAW:SilentChange: load succeeded with values that differ from the original"
        except CaseTimeout:
            outcome = f"RAW:Timeout: over {per_reader_s} s"
        except ckpt.CheckpointError as e:
            outcome = f"error:{type(e).__name__}"
        except BaseException as e:  # noqa: BLE001 - exactly what the fuzz is looking for
            outcome = f"RAW:{type(e).__name__}: {str(e)[:300]}"
            if os.environ.get("CKPT_FUZZ_TRACE"):
                traceback.print_exc(file=sys.stderr)
        finally:
            signal.alarm(0)
        res["results"][name] = outcome
        res.setdefault("secs", {})[name] = round(time.perf_counter() - t0, 3)
    return res


def build_named(case: dict[str, Any], orig: Path, work: Path) -> tuple[Path, str]:
    return BUILDERS[case["build"]](orig, work)


def _uni_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], tuple[Path, str]]:
    """A named manifest case: ``edit`` the parsed manifest of a copy, then re-seal it (so it reaches the parser)."""
    def build(orig: Path, work: Path) -> tuple[Path, str]:
        from formats import manifest as mf
        shutil.copytree(orig / "uni", work / "uni")
        m = work / "uni" / "manifest.json"
        doc = json.loads(m.read_bytes())
        edit(doc)
        seal = getattr(mf, "seal", None)
        m.write_bytes(seal(doc) if seal else json.dumps(doc).encode())
        return work / "uni", str(orig / "uni")
    return build


def _rename_key(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["entries"][new] = doc["entries"].pop(old)
    return edit


def _nest(doc: dict[str, Any]) -> None:
    e = doc["entries"]
    for i in range(600):
        e["/".join(["c"] * (i + 1))] = {"type": "container", "container": "dict", "length": 1}


def _fifo_manifest(orig: Path, work: Path) -> tuple[Path, str]:
    shutil.copytree(orig / "uni", work / "uni")
    (work / "uni" / "manifest.json").unlink()
    os.mkfifo(work / "uni" / "manifest.json")
    return work / "uni", str(orig / "uni")


def _sparse_manifest(orig: Path, work: Path) -> tuple[Path, str]:
    shutil.copytree(orig / "uni", work / "uni")
    with open(work / "uni" / "manifest.json", "r+b") as f:
        f.truncate(8 << 30)
    return work / "uni", str(orig / "uni")


def _dcp_edit(edit: Callable[[Any], None]) -> Callable[[Path, Path], tuple[Path, str]]:
    def build(orig: Path, work: Path) -> tuple[Path, str]:
        import pickle
        shutil.copytree(orig / "dcp", work / "dcp")
        f = work / "dcp" / ".metadata"
        md = pickle.loads(f.read_bytes())  # noqa: S301 - our own file
        edit(md)
        f.write_bytes(pickle.dumps(md))
        return work / "dcp", str(orig / "dcp")
    return build


def _dcp_set(target: str, field: str, value: Any) -> Callable[[Any], None]:
    def edit(md: Any) -> None:
        tm = md.state_dict_metadata["w"]
        obj = {"tensor": tm, "chunk": tm.chunks[0] if tm.chunks else None, "props": tm.properties,
               "storage": next(iter(md.storage_data.values()))}[target]
        object.__setattr__(obj, field, value)
    return edit


def _dcp_symlink(orig: Path, work: Path) -> tuple[Path, str]:
    shutil.copytree(orig / "dcp", work / "dcp")
    for f in (work / "dcp").glob("*.distcp"):
        outside = work / f"outside_{f.name}"
        f.rename(outside)
        f.symlink_to(outside)
    return work / "dcp", str(orig / "dcp")


# Named cases from #22 items 2-7 that are reader inputs ("fmt" picks the readers run on them).
BUILDERS: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    "key_slash_step": _uni_edit(_rename_key("step", "/step")),
    "nested_600_containers": _uni_edit(_nest),
    "root_container_list": _uni_edit(lambda d: d["entries"].__setitem__(
        "", {"type": "container", "container": "list", "length": 5})),
    "int_keys_w": _uni_edit(lambda d: d["entries"].__setitem__(
        "", {"type": "container", "container": "dict", "length": 5, "int_keys": ["w"]})),
    "fifo_manifest": _fifo_manifest,
    "manifest_8gb_sparse": _sparse_manifest,
    "dcp_offset_abc": _dcp_edit(_dcp_set("storage", "offset", "abc")),
    "dcp_length_list": _dcp_edit(_dcp_set("storage", "length", [1])),
    "dcp_chunks_none": _dcp_edit(_dcp_set("tensor", "chunks", None)),
    "dcp_size_5": _dcp_edit(_dcp_set("tensor", "size", 5)),
    "dcp_properties_none": _dcp_edit(_dcp_set("tensor", "properties", None)),
    "dcp_dtype_str": _dcp_edit(_dcp_set("props", "dtype", "float32")),
    "dcp_size_2e40": _dcp_edit(_dcp_set("tensor", "size", __import__("torch").Size([2 ** 20, 2 ** 20]))),
    "dcp_data_symlink_outside": _dcp_symlink,
}
NAMED_FMT = {k: ("dcp_metadata" if k.startswith("dcp") else "universal_manifest") for k in BUILDERS}


def main() -> None:
    root, cases_file = Path(sys.argv[1]), Path(sys.argv[2])
    extra = int(os.environ.get("CKPT_FUZZ_AS_EXTRA", str(3 << 29)))
    per_reader_s = int(os.environ.get("CKPT_FUZZ_READER_SECS", "20"))

    def on_alarm(*_: Any) -> None:
        raise CaseTimeout()
    signal.signal(signal.SIGALRM, on_alarm)
    import torch  # noqa: F401 - before measuring the address space
    import ckpt  # noqa: F401
    build_originals(root / "orig")
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for case in json.loads(cases_file.read_text()):
        print(json.dumps(run_case(case, root / "orig", root / "work", per_reader_s)), flush=True)


if __name__ == "__main__":
    main()
