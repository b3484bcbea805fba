"""Multi-process gloo tests: real FSDP2 / native TP / FSDP2-over-TP producers, load-time resharding between them.

Every rank is a spawned CPU process (``run_distributed``). Starting ranks costs seconds, so each spawn runs many
checks: the producer fixtures save one checkpoint each and return the unsharded reference state (gathered with
``full_tensor``); the consumer tests load every checkpoint into several layouts in one spawn and compare every
parameter, every optimizer moment and every step counter bit-exactly (``torch.equal``) with that reference.

Worker functions are module-level (they cross the process boundary by reference) and return plain data; they
collect mismatches instead of asserting, so that every rank stays in step through the collectives and the parent
reports every problem at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import ckpt
from formats.dtypes import dtype_from_name
from tests.distributed_utils import run_distributed

pytestmark = pytest.mark.distributed

# Dims chosen so that shards are uneven at 2 and/or 4 ranks: VOCAB=10 (5/5 at 2, 3/3/3/1 at 4), HEAD_OUT=5
# (3/2, 2/2/1/0: one rank holds nothing), HIDDEN=12 even everywhere, DIM=8.
VOCAB, DIM, HIDDEN, HEAD_OUT = 10, 8, 12, 5
#: Rows of the ``wide`` replicated table: 512 x 512 fp32 = 1 MiB, the size at which replicas are split among holders.
TABLE_ROWS = 512
LR, TARGET_LR = 1e-2, 0.5
TRAIN_STEPS = 2
SAVED_STEP = 3


class TinyNet(nn.Module):
    """Embedding -> LayerNorm -> MLP (up/down) with a residual -> head; ``wide`` adds a 1 MiB table that stays
    replicated under tensor parallelism."""

    def __init__(self, wide: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, HEAD_OUT)
        self.table = nn.Parameter(torch.randn(TABLE_ROWS, TABLE_ROWS) * 0.02) if wide else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(idx))
        if self.table is not None:
            h = h + self.table[idx, :DIM]
        h = self.down(torch.relu(self.up(h))) + h
        return self.head(h)


# ---------------------------------------------------------------- helpers that run inside the ranks


def _tp_plan() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # LayerNorm (and ``table``) are left out of the plan: they stay plain, replicated tensors, as without
    # sequence parallelism. RowwiseParallel makes ``down.bias`` a Replicate() DTensor.
    return {
        "emb": RowwiseParallel(input_layouts=Replicate()),
        "up": ColwiseParallel(),
        "down": RowwiseParallel(),
        "head": ColwiseParallel(output_layouts=Replicate()),
    }


def build(kind: str, world_size: int, seed: int, wide: bool = False, lr: float = LR) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A TinyNet sharded as ``kind``, and its AdamW. Collective for every kind but ``plain``.

    ``plain``: unsharded; ``fsdp``: FSDP2 over a 1-D mesh of every rank; ``tp``: native TP over every rank;
    ``fsdp_tp``: FSDP2 over TP on a (2, 2) ("dp", "tp") mesh; ``hsdp``: FSDP2 sharding over "shard" and
    replicating over "replicate" of a (2, 2) mesh (placements ``(Replicate(), Shard(0))``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(seed)
    model = TinyNet(wide)
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
        fully_shard(model.up, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind == "tp":
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, _tp_plan())
    elif kind == "hsdp":
        assert world_size == 4, "hsdp needs a (2, 2) mesh"
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model.up, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind == "fsdp_tp":
        assert world_size == 4, "fsdp_tp needs a (2, 2) mesh"
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], _tp_plan())
        fully_shard(model.up, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    elif kind != "plain":
        raise ValueError(kind)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, optim


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int = TRAIN_STEPS) -> None:
    """A few AdamW steps on the same data on every rank (so optimizer state exists)."""
    g = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (4, 6), generator=g)
        model(idx).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded tensors of the checkpointable state, keyed as the checkpoint keys them, and the optimizer's
    hyperparameters. Collective (``full_tensor``) for sharded models."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {f"model/{k}": _full(v) for k, v in get_model_state_dict(model).items()}
    osd = get_optimizer_state_dict(model, optim)
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            out[f"optim/state/{fqn}/{name}"] = _full(v) if isinstance(v, torch.Tensor) else v
    hyper = [{k: v for k, v in g.items() if k in ("lr", "weight_decay", "betas", "eps")} for g in osd["param_groups"]]
    return out, {"param_groups": hyper}


def compare(got: dict[str, Any], want: dict[str, Any], what: str) -> list[str]:
    """Every difference between two ``full_state`` tensor dicts (bit-exact)."""
    problems = []
    if set(got) != set(want):
        problems.append(f"{what}: keys differ: missing {sorted(set(want) - set(got))}, "
                        f"unexpected {sorted(set(got) - set(want))}")
    for k in sorted(set(got) & set(want)):
        a, b = got[k], want[k]
        if not isinstance(b, torch.Tensor):
            if a != b:
                problems.append(f"{what}: {k}: {a!r} != {b!r}")
        elif a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            problems.append(f"{what}: {k}: loaded {a.dtype}{list(a.shape)} differs from saved {b.dtype}{list(b.shape)}")
    return problems


def placements_of(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, str]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    out = {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()}
    for fqn, st in get_optimizer_state_dict(model, optim)["state"].items():
        out[f"optim/{fqn}/exp_avg"] = str(getattr(st["exp_avg"], "placements", "plain"))
    return out


# ---------------------------------------------------------------- rank functions (module level: picklable)


def _produce(rank: int, world_size: int, kind: str, path: str, wide: bool) -> dict[str, Any]:
    """Train a ``kind`` model, save it, and return (rank 0) the unsharded reference state."""
    model, optim = build(kind, world_size, seed=0, wide=wide)
    train(model, optim)
    result = ckpt.save({"model": model, "optim": optim, "step": SAVED_STEP}, path)
    ref, hyper = full_state(model, optim)
    return {
        "ref": ref if rank == 0 else None,
        "hyper": hyper,
        "placements": placements_of(model, optim),
        "bytes_written": result.bytes_written_this_rank,
        "total_bytes": result.total_bytes,
    }


def _consume(rank: int, world_size: int, jobs: list[tuple[str, str, str, bool, str | None]],
             refs: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """Load each (name, path, target kind, wide, resave path) job into a freshly built, differently initialised
    target and compare it with the reference ``refs[name]``; then save it again if a resave path is given.
    Return every mismatch (this rank's view)."""
    problems: list[str] = []
    for name, path, kind, wide, resave in jobs:
        what = f"{name} -> {kind}({world_size})"
        ref, ref_hyper = refs[name]
        model, optim = build(kind, world_size, seed=1, wide=wide, lr=TARGET_LR)
        before, _ = full_state(model, optim)
        if not any(k.startswith("model/") and not torch.equal(before[k], ref[k]) for k in ref):
            problems.append(f"{what}: the target equals the reference before loading; the check would prove nothing")
        # The target has never stepped: its AdamW state is empty and ``get_optimizer_state_dict`` initialises it,
        # as on a fresh resume.
        state: dict[str, Any] = {"model": model, "optim": optim, "step": 0}
        ckpt.load(state, path)
        if state["step"] != SAVED_STEP:
            problems.append(f"{what}: step {state['step']!r}, expected {SAVED_STEP}")
        got, hyper = full_state(model, optim)
        problems += compare(got, ref, what)
        if hyper != ref_hyper:
            problems.append(f"{what}: optimizer hyperparameters {hyper} != saved {ref_hyper}")
        if resave is not None:
            ckpt.save(state, resave)
    return problems


def expected_keys(wide: bool) -> set[str]:
    names = [n for n, _ in TinyNet(wide).named_parameters()]
    return {f"model/{n}" for n in names} | {
        f"optim/state/{n}/{s}" for n in names for s in ("step", "exp_avg", "exp_avg_sq")}


def check_checkpoint(path: str, ref: dict[str, Any]) -> list[str]:
    """Read every tensor of the checkpoint at ``path`` in this process and compare with ``ref``; check that the
    chunks tile each tensor exactly once and that nothing was stored twice."""
    from formats.box import Box, boxes_tile

    problems = []
    with ckpt.open(path) as r:
        m = r.manifest
        if set(m.tensors) != set(ref):
            problems.append(f"{path}: tensor keys {sorted(m.tensors)} != {sorted(ref)}")
        for key, e in m.tensors.items():
            for p in boxes_tile([Box(ch.offsets, ch.sizes) for ch in e.chunks], tuple(e.shape)):
                problems.append(f"{path}: {key}: {p}")
            if key in ref and not torch.equal(r.read(key), ref[key]):
                problems.append(f"{path}: {key} differs from the reference")
        logical = sum(e.numel * dtype_from_name(e.dtype, key).itemsize for key, e in m.tensors.items())
        stored = sum(f.size_bytes for f in m.files.values())
        if stored != logical:
            problems.append(f"{path}: {stored} bytes stored for {logical} bytes of tensors (replicas written twice?)")
        if r.read("step") != SAVED_STEP:
            problems.append(f"{path}: step {r.read('step')!r}")
    return problems


# ---------------------------------------------------------------- producer fixtures (one spawn each)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


def _produce_fixture(root: Path, name: str, kind: str, world_size: int, wide: bool) -> dict[str, Any]:
    path = str(root / name)
    out = run_distributed(_produce, world_size, kind, path, wide, timeout_secs=120)
    assert set(out[0]["ref"]) == expected_keys(wide), sorted(out[0]["ref"])
    return {"name": name, "path": path, "world_size": world_size, "wide": wide, "ref": out[0]["ref"],
            "hyper": out[0]["hyper"], "per_rank": out}


@pytest.fixture(scope="module")
def ckpt_2d(ckpt_root: Path) -> dict[str, Any]:
    """FSDP2 over TP on a (2, 2) mesh, saved by 4 ranks."""
    return _produce_fixture(ckpt_root, "fsdp_tp4", "fsdp_tp", 4, wide=False)


@pytest.fixture(scope="module")
def ckpt_tp(ckpt_root: Path) -> dict[str, Any]:
    """Native TP over 2 ranks with replicated LayerNorm, bias and a 1 MiB replicated table."""
    return _produce_fixture(ckpt_root, "tp2", "tp", 2, wide=True)


@pytest.fixture(scope="module")
def ckpt_plain(ckpt_root: Path) -> dict[str, Any]:
    """An unsharded model saved by a single process."""
    return _produce_fixture(ckpt_root, "plain1", "plain", 1, wide=False)


def _jobs(*specs: tuple[Any, ...]) -> tuple[list[tuple[str, str, str, bool, str | None]], dict[str, Any]]:
    """(checkpoint fixture, target kind[, resave path]) -> ``_consume`` jobs and references."""
    jobs = [(c["name"], c["path"], kind, c["wide"], rest[0] if rest else None) for c, kind, *rest in specs]
    refs = {c["name"]: (c["ref"], c["hyper"]) for c, *_ in specs}
    return jobs, refs


def _assert_no_problems(results: list[list[str]]) -> None:
    problems = [f"rank {r}: {p}" for r, ps in enumerate(results) for p in ps]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- tests


@pytest.mark.timeout(180)
def test_fsdp_over_tp_uses_strided_shard(ckpt_2d: dict[str, Any]) -> None:
    placements = ckpt_2d["per_rank"][0]["placements"]
    strided = sorted(k for k, v in placements.items() if "_StridedShard" in v)
    assert "up.weight" in strided and "optim/up.weight/exp_avg" in strided, placements
    assert "(Shard(dim=0), Shard(dim=1))" in placements["down.weight"], placements
    # The manifest records the saved layout, _StridedShard included.
    with ckpt.open(ckpt_2d["path"]) as r:
        desc = r.info("model/up.weight").saved_layout
        assert desc is not None and desc["mesh_shape"] == [2, 2], desc
        assert any("_StridedShard" in p for p in desc["placements"]), desc
        assert r.read("step") == SAVED_STEP


@pytest.mark.timeout(240)
def test_reshard_into_four_ranks(ckpt_2d: dict[str, Any], ckpt_tp: dict[str, Any], ckpt_plain: dict[str, Any],
                                 tmp_path: Path) -> None:
    """(2,2) FSDP+TP -> (4,) FSDP, -> (2,2) HSDP, -> TP(4) and -> (2,2) FSDP+TP again; TP(2) -> FSDP(4) and
    -> TP(4); unsharded -> FSDP(4) and -> (2,2) FSDP+TP. The FSDP(4) and HSDP targets save again; those
    checkpoints are read back here. TP(4) shards are uneven (vocab 3/3/3/1, head 2/2/1/0)."""
    resaved = {"fsdp4": str(tmp_path / "fsdp4"), "hsdp": str(tmp_path / "hsdp")}
    jobs, refs = _jobs((ckpt_2d, "fsdp", resaved["fsdp4"]), (ckpt_2d, "hsdp", resaved["hsdp"]), (ckpt_2d, "tp"),
                       (ckpt_2d, "fsdp_tp"), (ckpt_tp, "fsdp"), (ckpt_tp, "tp"), (ckpt_plain, "fsdp"),
                       (ckpt_plain, "fsdp_tp"))
    _assert_no_problems(run_distributed(_consume, 4, jobs, refs, timeout_secs=150))
    for path in resaved.values():
        problems = check_checkpoint(path, ckpt_2d["ref"])
        assert not problems, "\n".join(problems)


@pytest.mark.timeout(240)
def test_reshard_into_two_ranks(ckpt_2d: dict[str, Any], ckpt_tp: dict[str, Any], ckpt_plain: dict[str, Any]) -> None:
    """(2,2) FSDP+TP -> (2,) FSDP and -> TP(2); TP(2) -> FSDP(2); unsharded -> FSDP(2) and -> TP(2)."""
    jobs, refs = _jobs((ckpt_2d, "fsdp"), (ckpt_2d, "tp"), (ckpt_tp, "fsdp"), (ckpt_plain, "fsdp"),
                       (ckpt_plain, "tp"))
    _assert_no_problems(run_distributed(_consume, 2, jobs, refs, timeout_secs=150))


@pytest.mark.timeout(240)
def test_reshard_into_one_process(ckpt_2d: dict[str, Any], ckpt_tp: dict[str, Any]) -> None:
    """(2,2) FSDP+TP -> a plain module in one process; TP(2) -> plain."""
    jobs, refs = _jobs((ckpt_2d, "plain"), (ckpt_tp, "plain"))
    _assert_no_problems(run_distributed(_consume, 1, jobs, refs, timeout_secs=150))


@pytest.mark.timeout(180)
def test_replicated_tensors_written_once_and_balanced(ckpt_tp: dict[str, Any], ckpt_2d: dict[str, Any],
                                                      ckpt_plain: dict[str, Any]) -> None:
    """Every tensor's chunks tile it exactly once (replicas deduplicated, nothing stored twice), large replicas
    are split among their holders, and no rank writes more than its share plus the largest chunk. Every stored
    tensor reads back equal to the producer's reference."""
    placements = ckpt_tp["per_rank"][0]["placements"]
    # The TP save holds replicas of both kinds: plain tensors on every rank and Replicate() DTensors.
    assert placements["norm.weight"] == "plain" and placements["table"] == "plain", placements
    assert "Replicate()" in placements["down.bias"], placements

    for c in (ckpt_tp, ckpt_2d, ckpt_plain):
        problems = check_checkpoint(c["path"], c["ref"])
        assert not problems, "\n".join(problems)
        ws = c["world_size"]
        with ckpt.open(c["path"]) as r:
            m = r.manifest
            assert m.world_size == ws
            stored = sum(f.size_bytes for f in m.files.values())
            per_rank = [0] * ws
            for f in m.files.values():
                per_rank[f.rank] += f.size_bytes
            assert per_rank == [x["bytes_written"] for x in c["per_rank"]], per_rank
            largest = max(ch.byte_length for e in m.tensors.values() for ch in e.chunks)
            assert max(per_rank) <= stored / ws + largest, (c["name"], per_rank, largest)
            if c is ckpt_tp:
                # 1 MiB replicas are split among their holders, so both ranks wrote a part of each.
                for key in ("model/table", "optim/state/table/exp_avg", "optim/state/table/exp_avg_sq"):
                    writers = {m.files[ch.file].rank for ch in m.tensors[key].chunks}
                    assert writers == {0, 1}, (key, writers)
                assert max(per_rank) <= 1.1 * stored / ws, per_rank


# Read amplification: a (4002, 256) fp32 tensor (4 MB) saved column-sharded over 4 ranks with 4 KiB checksum
# blocks, loaded row-sharded (uneven: 1001/1001/1001/999 rows). Each rank needs a contiguous row range of every
# stored chunk; reading whole chunks would cost 4x.
AMP_SHAPE = (4002, 256)
AMP_BLOCK_BYTES = 4096


def _amp_tensor() -> torch.Tensor:
    return torch.randn(AMP_SHAPE, generator=torch.Generator().manual_seed(7))


def _read_amplification(rank: int, world_size: int, path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ckpt.loading
    from formats.reader import ChunkReader

    mesh = init_device_mesh("cpu", (world_size,))
    full = _amp_tensor()
    ckpt.save({"w": distribute_tensor(full, mesh, [Shard(1)])}, path,
              options=ckpt.SaveOptions(block_bytes=AMP_BLOCK_BYTES))
    dest = distribute_tensor(torch.zeros(AMP_SHAPE), mesh, [Shard(0)])

    readers: list[ChunkReader] = []

    class RecordingReader(ChunkReader):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            readers.append(self)

    ckpt.loading.ChunkReader = RecordingReader  # type: ignore[misc]  # this process only
    try:
        ckpt.load({"w": dest}, path)
    finally:
        ckpt.loading.ChunkReader = ChunkReader  # type: ignore[misc]
    local = dest.to_local()
    rows = local.shape[0]
    start = min(rank * math.ceil(AMP_SHAPE[0] / world_size), AMP_SHAPE[0])
    return {
        "equal": torch.equal(local, full[start:start + rows]),
        "bytes_needed": local.numel() * local.element_size(),
        "bytes_read": sum(r.bytes_read for r in readers),
        "bytes_checked": sum(r.bytes_checked for r in readers),
    }


@pytest.mark.timeout(180)
def test_row_sharded_load_reads_only_what_it_needs(tmp_path: Path) -> None:
    path = str(tmp_path / "amp")
    results = run_distributed(_read_amplification, 4, path, timeout_secs=120)
    with ckpt.open(path) as r:
        n_chunks = len(r.info("w").chunks)
    for rank, res in enumerate(results):
        assert res["equal"], f"rank {rank}: loaded rows differ from the saved tensor"
        needed, read = res["bytes_needed"], res["bytes_read"]
        # At least what it needs (the recording reader saw the load), at most one partial checksum block at each
        # end of each chunk region, and about 1 overall.
        assert needed <= read <= needed + 2 * AMP_BLOCK_BYTES * n_chunks, (rank, needed, read)
        assert read / needed <= 1.05, f"rank {rank}: read amplification {read / needed:.3f}"
        # The check before the first write (docs/loading.md) reads the same ranges once more, no others.
        assert res["bytes_checked"] == read, (rank, res["bytes_checked"], read)

    full = _amp_tensor()
    with ckpt.open(path) as r:
        part = r.read("w", (slice(1000, 1100),))
        assert torch.equal(part, full[1000:1100])
        needed = part.numel() * 4
        assert needed <= r.bytes_read <= needed + 2 * AMP_BLOCK_BYTES * n_chunks, (needed, r.bytes_read)
        # A whole stored chunk: exactly its bytes.
        before = r.bytes_read
        cols = r.info("w").chunks[1]
        part = r.read("w", (slice(None), slice(cols.offsets[1], cols.offsets[1] + cols.sizes[1])))
        assert torch.equal(part, full[:, cols.offsets[1]:cols.offsets[1] + cols.sizes[1]])
        assert r.bytes_read - before == part.numel() * 4
        # One row (an int index drops the dim).
        before = r.bytes_read
        row = r.read("w", 17)
        assert row.shape == (AMP_SHAPE[1],) and torch.equal(row, full[17])
        assert r.bytes_read - before <= n_chunks * 2 * AMP_BLOCK_BYTES


class _Refuser:
    """A user Stateful object whose ``load_state_dict`` raises, on rank 1, a ``CheckpointError`` subclass defined
    inside a function (which cannot be pickled to travel between ranks)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.v = torch.arange(3.0)

    def state_dict(self) -> dict[str, Any]:
        return {"v": self.v}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.rank == 1:
            class LocalRefusal(ckpt.CheckpointError):
                pass

            raise LocalRefusal("this object refuses its state")


def _errors(rank: int, world_size: int, root: str) -> dict[str, tuple[str, str, float]]:
    """Failures on one rank must raise the same error on every rank, promptly, and leave the group usable.

    Returns case -> (exception class name or "no error", message, seconds taken)."""
    import time

    out: dict[str, tuple[str, str, float]] = {}

    def attempt(case: str, fn: Any) -> None:
        t0 = time.monotonic()
        try:
            fn()
            out[case] = ("no error", "", time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out[case] = (type(e).__name__, str(e), time.monotonic() - t0)

    torch.manual_seed(0)
    model = TinyNet()  # the same plain model on every rank: a replicated save
    ckpt.save({"model": model, "step": 1}, f"{root}/good")

    torch.manual_seed(1)
    target = TinyNet()
    if rank == 2:
        target.head = nn.Linear(DIM, HEAD_OUT + 1)
    attempt("mis-shaped tensor on rank 2", lambda: ckpt.load({"model": target, "step": 0}, f"{root}/good"))

    w = torch.zeros(4, 3 if rank == 1 else 4)
    attempt("inconsistent shapes at save", lambda: ckpt.save({"w": w}, f"{root}/bad"))
    attempt("open the failed save", lambda: ckpt.open(f"{root}/bad"))

    odd = object() if rank == 3 else 0
    attempt("unsupported value on rank 3", lambda: ckpt.load({"model": TinyNet(), "x": odd}, f"{root}/good", strict=False))
    attempt("missing checkpoint", lambda: ckpt.load({"model": TinyNet()}, f"{root}/nowhere"))

    refuser = _Refuser(rank)
    ckpt.save({"obj": refuser}, f"{root}/refuser")
    attempt("unpicklable error class on rank 1", lambda: ckpt.load({"obj": refuser}, f"{root}/refuser"))

    # The group still works: a correct load succeeds everywhere.
    fresh = TinyNet()
    state = {"model": fresh, "step": 0}
    attempt("good load after errors", lambda: ckpt.load(state, f"{root}/good"))
    same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    out["loaded values"] = (str(same and state["step"] == 1), "", 0.0)
    return out


@pytest.mark.timeout(180)
def test_errors_are_raised_on_every_rank(tmp_path: Path) -> None:
    results = run_distributed(_errors, 4, str(tmp_path), timeout_secs=120)
    # Whatever ckpt error class rank 3 raised for its unsupported value, every rank raises the same.
    unsupported_cls = results[3]["unsupported value on rank 3"][0]
    assert issubclass(getattr(ckpt, unsupported_cls), ckpt.CheckpointError), results[3]
    for rank, got in enumerate(results):
        slow = {case: secs for case, (_, _, secs) in got.items() if secs > 20}
        assert not slow, f"rank {rank}: errors were not raised promptly: {slow}"
        cls, msg, _ = got["mis-shaped tensor on rank 2"]
        assert cls == "ShardMismatchError", (rank, cls, msg)
        assert "rank 2" in msg and "model/head.weight" in msg and "rank 0:" not in msg, (rank, msg)
        cls, msg, _ = got["inconsistent shapes at save"]
        assert cls == "ShardMismatchError" and "'w'" in msg, (rank, cls, msg)
        cls, msg, _ = got["open the failed save"]
        assert cls in ("IncompleteCheckpointError", "CheckpointNotFoundError"), (rank, cls, msg)
        cls, msg, _ = got["unsupported value on rank 3"]
        assert cls == unsupported_cls and "rank 3" in msg and "'x'" in msg and "rank 0:" not in msg, (rank, cls, msg)
        cls, msg, _ = got["unpicklable error class on rank 1"]
        assert cls == "CheckpointError" and "rank 1: LocalRefusal: this object refuses" in msg, (rank, cls, msg)
        cls, msg, _ = got["missing checkpoint"]
        assert cls == "CheckpointNotFoundError", (rank, cls, msg)
        assert got["good load after errors"][0] == "no error", (rank, got["good load after errors"])
        assert got["loaded values"][0] == "True", rank
