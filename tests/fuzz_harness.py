"""Fuzz worker for tests/test_fuzz.py (#22): builds small real checkpoints, mutates copies and runs every public
reader on each mutant, one JSON line per case on stdout. Run as ``python -m tests.fuzz_harness ROOT CASES_JSON
[ORIG]`` (ORIG: the originals, built once by ``python -m tests.fuzz_harness --build ORIG``; default ROOT/orig);
the worker sets RLIMIT_AS and a per-reader alarm, the parent a wall-clock timeout. A case is {"id", "fmt", "mut",
"seed"} or {"id", "build", "fmt"} (a named case of ``BUILDERS``); replay one with CKPT_FUZZ_SEED=<seed>."""

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

FORMATS = ("universal_manifest", "universal_resealed", "universal_data", "safetensors", "dcp_metadata", "megatron",
           "deepspeed")
MUTATIONS = ("flip", "truncate", "append", "json")


#: A reader's output larger than this was sized by what a manifest declared, not by real data.
MAX_OUTPUT_BYTES = 1 << 30


class CaseTimeout(BaseException):
    pass


def make_state() -> dict[str, Any]:
    import torch
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.arange(20, dtype=torch.int16), "step": 5,
            "lr": 0.001, "name": "run-1"}


def _produce_megatron(rank: int, world: int, root: str) -> None:
    """One rank of a GPT tp=2 run of the reference Megatron model: two steps, then its Megatron files."""
    import megatron_ref as M
    mc, pc = M.gpt_tiny(), M.ParallelConfig(tp=2)
    model = M.build_model(mc, pc, M.ParallelState.create(pc))
    opt = M.build_optimizer(model)
    for _ in range(2):
        M.train_step(model, opt, 4)
    M.save_megatron(root, model, opt)


def build_foreign(root: Path) -> None:
    """Megatron and DeepSpeed originals written by the producers the convert tests use, on 2 gloo ranks each. It
    spawns processes, so it must run before RLIMIT_AS is set (the worker does it before, the parent once)."""
    from tests.distributed_utils import run_distributed
    if not (root / "megatron").exists():
        run_distributed(_produce_megatron, 2, str(root / "megatron.tmp"), timeout_secs=240)
        (root / "megatron.tmp").rename(root / "megatron")
    if not (root / "deepspeed").exists():
        from tests.deepspeed_producer import DsJob, train_and_save
        run_distributed(train_and_save, 2, DsJob(out=str(root / "deepspeed.tmp"), stage=2, steps=2, model="odd"),
                        timeout_secs=300)
        (root / "deepspeed.tmp").rename(root / "deepspeed")


def build_originals(root: Path) -> None:
    """One universal checkpoint, one safetensors file, one DCP directory, one torch file, and the Megatron and
    DeepSpeed runs, under ``root`` (idempotent)."""
    import torch
    import ckpt
    if (root / "done").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    build_foreign(root)
    shutil.rmtree(root / "uni", ignore_errors=True)
    state = make_state()
    # one data file, so that two chunks' byte offsets can be swapped (unsealed_offsets_swapped)
    ckpt.save(state, str(root / "uni"), options=ckpt.SaveOptions(max_chunk_bytes=256, block_bytes=64,
                                                                 files_per_rank=1))
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
    if fmt in ("megatron", "deepspeed"):
        shutil.copytree(orig / fmt, work / fmt)
        files = sorted(p for p in (work / fmt).rglob("*") if p.is_file() and p.suffix != ".py")
        f = rng.choice(files)
        if mut == "json" and f.suffix == ".pt":
            _torch_mutate(f, rng)
        else:
            f.write_bytes(_bytes_mutate(f.read_bytes(), "flip" if mut == "json" else mut, rng))
        return work / fmt, str(orig / fmt)
    raise ValueError(fmt)


def _torch_mutate(f: Path, rng: random.Random) -> None:
    """One edit deep inside a torch file we wrote ourselves: a tensor's shape, dtype or length, an int made huge or
    negative, a key deleted, a string changed or a list shortened; saved back with torch.save."""
    import torch
    obj = torch.load(f, map_location="cpu", weights_only=False)  # noqa: S614 - our own original
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any, depth: int) -> None:
        if depth > 30 or len(paths) > 20000:
            return
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else \
            vars(node).items() if hasattr(node, "__dict__") and not isinstance(node, torch.Tensor) else ()
        for k, v in list(items):
            paths.append((node, k))
            walk(v, depth + 1)
    walk(obj, 0)
    if not paths:
        raise ValueError("nothing to edit")
    parent, k = rng.choice(paths)
    get = (lambda: getattr(parent, k)) if not isinstance(parent, (dict, list)) else (lambda: parent[k])
    v = get()
    if isinstance(v, torch.Tensor):
        new: Any = rng.choice([lambda t: t.flatten()[:-1] if t.numel() else t.reshape(-1), lambda t: t.reshape(-1),
                               lambda t: t.unsqueeze(0), lambda t: t.to(torch.int32), lambda t: t.to(torch.float64),
                               lambda t: t.flatten()[:0], lambda t: torch.cat([t.flatten(), t.flatten()])])(v)
    elif isinstance(v, bool) or v is None:
        new = rng.choice([1, "x", None, []])
    elif isinstance(v, int):
        new = rng.choice([2 ** 40, 2 ** 63 - 1, -1, -(2 ** 31), 0, v + 1, str(v)])
    elif isinstance(v, float):
        new = rng.choice([float("nan"), -1.0, 1e308, int(v)])
    elif isinstance(v, str):
        new = rng.choice(["", v + "x", v[:-1], "../../etc/passwd", "/etc/passwd", "a" * 5000])
    elif isinstance(v, (list, tuple)) and v:
        new = type(v)(v[:-1]) if rng.random() < 0.6 else type(v)(list(v) + list(v))
    else:
        new = rng.choice([None, 0, "x", [], {}])
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[k]
    elif isinstance(parent, (dict, list)):
        parent[k] = new
    else:
        setattr(parent, k, new)
    torch.save(obj, f)


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

class Clobbered(Exception):
    """A load that raised CheckpointError had already changed the caller's state (#22 item 7)."""


class Accepted(Exception):
    """A reader accepted an input that must be refused (an unsealed manifest edit)."""


def readers(fmt: str, path: Path, orig: str, work: Path, name: str = "") -> list[tuple[str, Callable[[], Any]]]:
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
        dest = DESTS.get(name, blank_state)

        def load() -> Any:
            st = dest()
            try:
                ckpt.load(st, str(path), options=ckpt.LoadOptions(**LOAD_OPTIONS.get(name, {})))
            except ckpt.CheckpointError:
                if not _same(st, dest()):
                    raise Clobbered("load raised CheckpointError after changing the destination") from None
                raise
            return st

        def open_all() -> Any:
            with ckpt.open(str(path)) as r:
                if name in READ_HEAD:  # a whole read would really need the declared bytes
                    return {k: r.read(k, slice(0, 10)) for k in r.keys()}
                return {k: r.read(k) for k in r.keys()}
        out += [("load", load), ("open", open_all), ("verify", cli("verify", str(path))),
                ("inspect", cli("inspect", str(path)))]
        out += [("convert", cli("convert", str(path), str(work / "out.pt"), "--to", "torch"))]
    elif fmt == "megatron":
        out += [("convert", cli("convert", str(path), str(work / "uni_out"), "--from", "megatron", "--spec", "gpt",
                                 "--no-progress")),
                ("diff", cli("diff", str(path), orig, "--spec", "gpt", "--no-progress"))]
        return out
    elif fmt == "deepspeed":
        # (``ckpt inspect`` reads universal checkpoints only: exit 2 on these)
        out += [("convert", cli("convert", str(path), str(work / "uni_out"), "--from", "deepspeed"))]
    elif fmt == "torch":
        out += [("convert", cli("convert", str(path), str(work / "uni_out"), "--to", "universal"))]
    else:
        dst = "st_out" if fmt != "safetensors" else "uni_out"
        to = "safetensors" if fmt != "safetensors" else "universal"
        out += [("convert", cli("convert", str(path), str(work / dst), "--to", to))]
    out += [("diff", cli("diff", str(path), orig))]
    return out


def blank_state() -> dict[str, Any]:
    """The destination of the ``load`` reader: ``make_state``'s keys, all zeros."""
    import torch
    return {"w": torch.zeros(16, 8), "b": torch.zeros(20, dtype=torch.int16), "step": 0, "lr": 0.0, "name": ""}


def _same(a: Any, b: Any) -> bool:
    import torch
    if not isinstance(a, dict) or a.keys() != b.keys():
        return False
    for k, v in b.items():
        if isinstance(v, torch.Tensor):
            if not (isinstance(a[k], torch.Tensor) and a[k].dtype == v.dtype and torch.equal(a[k], v)):
                return False
        elif a[k] != v:
            return False
    return True


def run_case(case: dict[str, Any], orig: Path, work: Path, per_reader_s: int) -> dict[str, Any]:
    """Mutate and run each reader; per reader 'ok' (an API reader) or 'exit N' (a CLI one, N its exit code),
    'error:<CheckpointError subclass>' or 'RAW:<type>: msg'."""
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
    named = case.get("build", "")
    for name, fn in readers(fmt, path, o, work, named):
        t0 = time.perf_counter()
        signal.alarm(per_reader_s)
        try:
            got = fn()
            outcome = f"exit {got}" if name in CLI_READERS else "ok"
            if name == "load" and named not in DESTS and not _same(got, make_state()):
                outcome = "RAW:SilentChange: load succeeded with values that differ from the original"
            if name in MUST_REFUSE.get(named, ()) and (name not in CLI_READERS or got == 0):
                raise Accepted(f"{name} accepted an input it must refuse")
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
    outs = [p for o in work.glob("*out*") for p in ([o] if o.is_file() else o.rglob("*"))]
    huge = [str(p) for p in outs if p.is_file() and p.stat().st_size > MAX_OUTPUT_BYTES]
    if huge:  # a convert that laid out a file sized by a forged manifest (#22 item 2)
        res["results"]["outputs"] = f"RAW:HugeOutput: {huge[:3]}"
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
        e["/".join(["c"] * (i + 1))] = {"kind": "container", "type": "dict"}


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


def _write_doc(path: Path, doc: dict[str, Any]) -> None:
    """Write an edited manifest re-sealed where this code has seals (so the edit reaches the checks behind it)."""
    from formats import manifest as mf
    seal = getattr(mf, "seal", None)
    (path / "manifest.json").write_bytes(seal(doc) if seal else json.dumps(doc, indent=1).encode())


def _saved(state: Callable[[], dict[str, Any]], **options: Any) -> Callable[[Path, Path], tuple[Path, str]]:
    """A named case that is the project's own checkpoint of ``state()`` saved with ``options``, diffed with itself."""
    def build(orig: Path, work: Path) -> tuple[Path, str]:
        import ckpt
        ckpt.save(state(), str(work / "uni"), options=ckpt.SaveOptions(**options))
        shutil.copytree(work / "uni", work / "uni_copy")
        return work / "uni", str(work / "uni_copy")
    return build


def _zstd_no_content_size(orig: Path, work: Path) -> tuple[Path, str]:
    """Entry ``b`` as one zstd chunk whose frame has no content size, declaring 2^36 uint8 (before: a 64 GiB
    allocation in read, MemoryError in verify)."""
    import zstandard
    from formats import checksum
    shutil.copytree(orig / "uni", work / "uni")
    doc = json.loads((work / "uni" / "manifest.json").read_bytes())
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 1000)
    e = doc["entries"]["b"]
    c = dict(e["chunks"][0])
    with open(work / "uni" / c["file"], "ab") as f:
        c["byte_offset"] = f.tell()
        f.write(frame)
    c.update(offsets=[0], sizes=[2 ** 36], codec="zstd", byte_length=len(frame), raw_byte_length=2 ** 36,
             block_bytes=len(frame), checksums=[checksum.digest(frame)])
    e.update(dtype="uint8", shape=[2 ** 36], chunks=[c])
    doc["files"][c["file"]]["size_bytes"] = os.path.getsize(work / "uni" / c["file"])
    _write_doc(work / "uni", doc)
    return work / "uni", str(orig / "uni")


#: The real zstd bomb decodes to this many bytes (256 MiB, not the issue's 1 GiB: convert and diff of 1 GiB take
#: minutes on a 2-core machine; the bound tested, output plus little more under RLIMIT_AS, is the same).
BOMB_BYTES = 256 << 20


def _zeros_u8() -> dict[str, Any]:
    import torch
    return {"x": torch.zeros(BOMB_BYTES, dtype=torch.uint8)}


#: Bytes of the sparse file and its one checksum block: 4 GiB, not the issue's 64 GiB, since every read of the
#: block hashes it all (64 GiB: about a minute per reader here); 4 GiB is still far over the RLIMIT_AS headroom.
SPARSE_BYTES = 2 ** 32


def _sparse_block(orig: Path, work: Path) -> tuple[Path, str]:
    """One raw chunk of SPARSE_BYTES uint8 in a sparse file with one checksum block that big, and wrong (before:
    the block was read whole into memory)."""
    import ckpt
    import torch
    n = SPARSE_BYTES
    ckpt.save({"x": torch.zeros(1)}, str(work / "uni"))
    doc = json.loads((work / "uni" / "manifest.json").read_bytes())
    e = doc["entries"]["x"]
    c = e["chunks"][0]
    with open(work / "uni" / c["file"], "r+b") as f:
        f.truncate(n)
    doc["files"][c["file"]]["size_bytes"] = n
    e.update(dtype="uint8", shape=[n])
    c.update(sizes=[n], byte_offset=0, byte_length=n, raw_byte_length=n, block_bytes=n, checksums=["0" * 16])
    _write_doc(work / "uni", doc)
    return work / "uni", str(orig / "uni")


def _declared_2e40(orig: Path, work: Path) -> tuple[Path, str]:
    """``w`` declared as 2^40 uint8 in a file declared 2^40 bytes long (before: convert --to torch laid out 1 TiB)."""
    shutil.copytree(orig / "uni", work / "uni")
    doc = json.loads((work / "uni" / "manifest.json").read_bytes())
    e = doc["entries"]["w"]
    c, n = e["chunks"][0], 2 ** 40
    doc["files"][c["file"]]["size_bytes"] = n
    e.update(dtype="uint8", shape=[n], chunks=[c])
    c.update(offsets=[0], sizes=[n], byte_offset=0, byte_length=n, raw_byte_length=n, block_bytes=n)
    _write_doc(work / "uni", doc)
    return work / "uni", str(orig / "uni")


def _staircase(orig: Path, work: Path) -> tuple[Path, str]:
    """Column j of a 10,000 x 10,000 tensor as rows [0, j) and [j, m): 20,000 zstd chunks whose extents overlap
    along both dims in a 4 MB manifest (before: 46 s to validate)."""
    import ckpt
    import torch
    from formats import checksum
    m = 10_000
    ckpt.save({"x": torch.zeros(1)}, str(work / "uni"))
    doc = json.loads((work / "uni" / "manifest.json").read_bytes())
    f = next(iter(doc["files"]))
    empty = checksum.digest(b"")
    chunks = [{"offsets": [o, j], "sizes": [sz, 1], "file": f, "byte_offset": 0, "byte_length": 0, "codec": "zstd",
               "raw_byte_length": sz, "block_bytes": 1, "checksums": [empty]}
              for j in range(m) for o, sz in ((0, j), (j, m - j)) if sz]
    doc["entries"]["x"] = {"kind": "tensor", "dtype": "uint8", "shape": [m, m], "chunks": chunks}
    _write_doc(work / "uni", doc)
    return work / "uni", str(work / "uni")


def _empty_containers(doc: dict[str, Any]) -> None:
    for i in range(20_000):
        doc["entries"][f"c{i}/d"] = {"kind": "container", "type": "dict"}


def _layout(layout: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["entries"]["w"].__setitem__("saved_layout", layout)


def _fp4() -> dict[str, Any]:
    import torch
    return {"x": torch.arange(16, dtype=torch.uint8).view(torch.float4_e2m1fn_x2), "y": torch.ones(3)}


def _fp4_with_float32(orig: Path, work: Path) -> tuple[Path, str]:
    """A float4_e2m1fn_x2 checkpoint, loaded into float32 (DESTS) and diffed with the same keys in float32."""
    import ckpt
    import torch
    ckpt.save(_fp4(), str(work / "uni"))
    ckpt.save({"x": torch.zeros(16), "y": torch.ones(3)}, str(work / "uni_f32"))
    return work / "uni", str(work / "uni_f32")


def _st_fifo(orig: Path, work: Path) -> tuple[Path, str]:
    (work / "st").mkdir()
    os.mkfifo(work / "st" / "model.safetensors")
    return work / "st" / "model.safetensors", str(orig / "st" / "model.safetensors")


def _st_nested(side: str) -> Callable[[Path, Path], tuple[Path, str]]:
    """A safetensors directory with a ``side`` JSON file nested 100,000 deep (before: RecursionError)."""
    def build(orig: Path, work: Path) -> tuple[Path, str]:
        shutil.copytree(orig / "st", work / "st")
        (work / "st" / side).write_text("[" * 100_000 + "]" * 100_000)
        return work / "st", str(orig / "st")
    return build


def _torch_empty_key(orig: Path, work: Path) -> tuple[Path, str]:
    import torch
    torch.save({"": torch.ones(3), "w": torch.zeros(2)}, str(work / "model.pt"))
    return work / "model.pt", str(orig / "model.pt")


def _unsealed(edit: Callable[[str], str]) -> Callable[[Path, Path], tuple[Path, str]]:
    """A named case: ``edit`` the manifest's text in place and keep whatever seal it had (must be refused)."""
    def build(orig: Path, work: Path) -> tuple[Path, str]:
        shutil.copytree(orig / "uni", work / "uni")
        m = work / "uni" / "manifest.json"
        text = m.read_text()
        edited = edit(text)
        if edited == text:
            raise ValueError("the edit changed nothing")
        m.write_text(edited)
        return work / "uni", str(orig / "uni")
    return build


def _swap_offsets(text: str) -> str:
    """The two chunks of ``w`` (one data file) swap byte offsets and checksums: every data checksum still holds."""
    import re
    doc = json.loads(text)
    a, b = doc["entries"]["w"]["chunks"]
    if a["file"] != b["file"]:
        raise ValueError("the chunks of w are in different files")
    line = next(ln for ln in text.splitlines() if ln.startswith('  "w": '))
    a["byte_offset"], b["byte_offset"] = b["byte_offset"], a["byte_offset"]
    a["checksums"], b["checksums"] = b["checksums"], a["checksums"]
    new = '  "w": ' + json.dumps(doc["entries"]["w"]) + ("," if line.endswith(",") else "")
    return text.replace(line, new) if re.search(r'"byte_offset"', line) else text


# Named cases from #22 items 2-7 that are reader inputs ("fmt" picks the readers run on them).
BUILDERS: dict[str, Callable[[Path, Path], tuple[Path, str]]] = {
    "key_slash_step": _uni_edit(_rename_key("step", "/step")),
    "nested_600_containers": _uni_edit(_nest),
    "root_container_list": _uni_edit(lambda d: d["entries"].__setitem__(
        "", {"kind": "container", "type": "list", "length": 5})),
    "int_keys_w": _uni_edit(lambda d: d["entries"].__setitem__(
        "", {"kind": "container", "type": "dict", "int_keys": ["w"]})),
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
    "zstd_no_content_size_2e36": _zstd_no_content_size,
    "zstd_bomb_256mib": _saved(_zeros_u8, codec="zstd", max_chunk_bytes=BOMB_BYTES),
    "sparse_block_bytes_2e32": _sparse_block,
    "declared_file_2e40": _declared_2e40,
    "container_length_2e31": _uni_edit(lambda d: d["entries"].__setitem__(
        "big", {"kind": "container", "type": "list", "length": 2 ** 31})),
    "st_fifo_model_safetensors": _st_fifo,
    "st_nested_config_json": _st_nested("config.json"),
    "st_nested_index_json": _st_nested("model.safetensors.index.json"),
    "torch_empty_key": _torch_empty_key,
    "saved_layout_empty": _uni_edit(_layout({})),
    "saved_layout_wrong_types": _uni_edit(_layout({"mesh_shape": 5, "placements": 3})),
    "saved_layout_names_str": _uni_edit(_layout({"mesh_shape": [2], "placements": ["R"], "mesh_dim_names": "dp"})),
    "saved_layout_list": _uni_edit(_layout([])),
    "float4_into_float32": _fp4_with_float32,
    "staircase_20000_chunks": _staircase,
    "empty_containers_20000": _uni_edit(_empty_containers),
    "max_chunk_bytes_4_20000_chunks": _saved(lambda: {"w": __import__("torch").arange(20_000, dtype=__import__(
        "torch").float32)}, max_chunk_bytes=4),
    "unsealed_lr_0.003": _unsealed(lambda t: t.replace('"value": 0.001', '"value": 0.003')),
    "unsealed_step_6": _unsealed(lambda t: t.replace('"value": 5}', '"value": 6}')),
    "unsealed_name_run-2": _unsealed(lambda t: t.replace('"run-1"', '"run-2"')),
    "unsealed_offsets_swapped": _unsealed(_swap_offsets),
    "unsealed_float32_int32": _unsealed(lambda t: t.replace('"dtype": "float32"', '"dtype": "int32"')),
}
_FMT_PREFIX = {"dcp": "dcp_metadata", "st_": "safetensors", "torch_": "torch"}
NAMED_FMT = {k: next((v for p, v in _FMT_PREFIX.items() if k.startswith(p)), "universal_manifest") for k in BUILDERS}


def _dest_of(key: str, n: int, dtype: str = "float32") -> Callable[[], dict[str, Any]]:
    def dest() -> dict[str, Any]:
        import torch
        return {key: torch.zeros(n, dtype=getattr(torch, dtype))}
    return dest


#: Named cases whose ``load`` destination is not ``blank_state`` (and whose success is not compared to make_state).
DESTS: dict[str, Callable[[], dict[str, Any]]] = {
    "zstd_bomb_256mib": _dest_of("x", BOMB_BYTES, "uint8"),
    "sparse_block_bytes_2e32": _dest_of("x", 1),
    "max_chunk_bytes_4_20000_chunks": _dest_of("w", 20_000),
    "float4_into_float32": lambda: {**_dest_of("x", 16)(), **_dest_of("y", 3)()},
    "staircase_20000_chunks": _dest_of("x", 1),
}
#: Named cases loaded with these LoadOptions.
LOAD_OPTIONS: dict[str, dict[str, Any]] = {"float4_into_float32": {"allow_dtype_cast": True}}
#: Named cases whose ``open`` reader reads the first 10 elements of each key, not all (4 GiB of real bytes).
READ_HEAD = {"sparse_block_bytes_2e32"}
#: Named cases that ``load`` and ``open`` must refuse: edits of a sealed manifest that were not re-sealed.
#: Named case -> the readers that must refuse it (an API reader by a CheckpointError, a CLI one by a non-zero exit):
#: inputs the old code accepted silently, where "no raw exception" alone would not show the fix.
MUST_REFUSE: dict[str, frozenset[str]] = {
    **{k: frozenset({"load", "open", "convert"}) for k in BUILDERS if k.startswith("unsealed_")},
    "key_slash_step": frozenset({"load", "open", "convert"}),
    "nested_600_containers": frozenset({"load", "open", "convert"}),
    "declared_file_2e40": frozenset({"load", "open", "convert"}),
    "dcp_data_symlink_outside": frozenset({"convert", "diff"}),
}
#: Readers that run the CLI (their outcome is its exit code).
CLI_READERS = frozenset({"verify", "inspect", "convert", "diff"})


def main() -> None:
    if sys.argv[1] == "--build":
        import torch  # noqa: F401
        import ckpt  # noqa: F401
        build_originals(Path(sys.argv[2]))
        return
    root, cases_file = Path(sys.argv[1]), Path(sys.argv[2])
    orig = Path(sys.argv[3]) if len(sys.argv) > 3 else root / "orig"
    extra = int(os.environ.get("CKPT_FUZZ_AS_EXTRA", str(3 << 29)))
    per_reader_s = int(os.environ.get("CKPT_FUZZ_READER_SECS", "20"))

    def on_alarm(*_: Any) -> None:
        raise CaseTimeout()
    signal.signal(signal.SIGALRM, on_alarm)
    import torch  # noqa: F401 - before measuring the address space
    import ckpt  # noqa: F401
    build_originals(orig)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for case in json.loads(cases_file.read_text()):
        print(json.dumps(run_case(case, orig, root / "work", per_reader_s)), flush=True)


if __name__ == "__main__":
    main()
