"""``ckpt convert`` and ``ckpt diff``: the command-line side of ``formats.foreign``.

Kept apart from ``ckpt.cli`` (which owns the parser and the exit-code conventions). Exit codes: ``convert`` 0 on
success, 2 on bad usage or unreadable/refused input; ``diff`` 0 when the
checkpoints are equal, 1 when they differ (every difference listed), 2 on bad usage or unreadable input.
``--json`` prints one JSON document on stdout; progress bars (bytes/s and ETA) go to stderr, on a terminal only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

SOURCE_CHOICES = ("auto", "universal", "dcp", "torch", "safetensors", "deepspeed", "megatron")
TARGET_CHOICES = ("universal", "dcp", "torch", "safetensors", "deepspeed-universal")


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _bar(args: argparse.Namespace, total: int, desc: str) -> Any:
    if args.json or args.no_progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)


def _size(text: str) -> int:
    from formats.foreign import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected a positive integer")
    return n


def cmd_convert(args: argparse.Namespace) -> int:
    from ckpt.cli import _storage_options
    from formats.foreign import PLANNED_TARGETS, open_source, plan_conversion, run_conversion
    from formats.foreign.detect import not_implemented

    if args.to in PLANNED_TARGETS:  # before reading anything
        raise not_implemented(args.to, "writing")
    if args.max_shard_size is not None and args.to != "safetensors":
        print(f"ckpt convert: --max-shard-size applies to --to safetensors only (the target is {args.to})",
              file=sys.stderr)
        return EXIT_USAGE
    opts = _storage_options(args)
    src_format = args.src_format
    if src_format == "auto":
        from formats.foreign.detect import detect_format

        src_format = detect_format(args.src, opts)
    if src_format == "megatron":
        return _convert_megatron(args, opts)
    spec_options = [f"--{n}" for n in ("spec", "dims", "source-layout", "target")
                    if getattr(args, n.replace("-", "_"), None) is not None]
    if spec_options:
        verb = "applies" if len(spec_options) == 1 else "apply"
        print(f"ckpt convert: {', '.join(spec_options)} {verb} to Megatron rank directories (--from megatron) only; "
              f"the source is {src_format}. To reshard a universal checkpoint use ckpt reshard SRC DST --to LAYOUT.",
              file=sys.stderr)
        return EXIT_USAGE
    with open_source(args.src, src_format, allow_pickle=args.allow_pickle, storage_options=opts) as source:
        plan = plan_conversion(source, args.dst, args.to, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                               storage_options=opts)
        if args.dry_run:
            _print_plan(args, plan)
            return EXIT_OK
        bar = _bar(args, plan.bytes_out, "convert")
        try:
            result = run_conversion(source, plan, workers=args.workers, overwrite=args.overwrite,
                                    progress=bar.update if bar is not None else None, storage_options=opts)
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return EXIT_OK
    if plan.skipped:
        print(f"note: {len(plan.skipped)} key(s) not written ({plan.dst_format} cannot hold them): "
              f"{', '.join(plan.skipped[:5])}{', ...' if len(plan.skipped) > 5 else ''}", file=sys.stderr)
    rate = plan.bytes_out / max(result.elapsed_secs, 1e-9)
    cast = f", {plan.cast} cast to {plan.dtype}" if plan.cast else ""
    print(f"OK: {plan.src_format} {plan.src} -> {plan.dst_format} {plan.dst}: {plan.tensors} tensors{cast}, "
          f"{plan.values} values, {_mib(plan.bytes_out)} in {result.elapsed_secs:.2f} s ({_mib(rate)}/s)")
    return EXIT_OK


def _dims(args: argparse.Namespace, cmd: str) -> "dict[str, Any] | None | int":
    """``--dims`` parsed (None when absent), or ``EXIT_USAGE`` after printing why it is not a JSON object."""
    if args.dims is None:
        return None
    try:
        dims = json.loads(args.dims)
    except json.JSONDecodeError as e:
        dims = e
    if not isinstance(dims, dict):
        print(f"ckpt {cmd}: --dims must be a JSON object such as '{{\"vocab\": 50257}}' (got {args.dims!r})",
              file=sys.stderr)
        return EXIT_USAGE
    return dims


def _convert_megatron(args: argparse.Namespace, opts: dict[str, Any] | None) -> int:
    """``--from megatron``: the rank directories read through a spec (``resharding.megatron_dirs``), written to any
    format; with ``--target``, resharded to that layout (universal only)."""
    from formats.foreign import plan_conversion
    from resharding.megatron_dirs import MegatronSource
    from resharding.megatron_import import run_import, target_binding

    if args.spec is None:
        print("ckpt convert: Megatron rank directories are read through a spec that says how the ranks cut each "
              "tensor: pass --spec gpt|llama|mixtral or a YAML path (and --dims JSON for dims the files' args do not "
              "record)", file=sys.stderr)
        return EXIT_USAGE
    if args.target is not None and args.to != "universal":
        print(f"ckpt convert: --target writes a universal checkpoint; it cannot be combined with --to {args.to}",
              file=sys.stderr)
        return EXIT_USAGE
    dims = _dims(args, "convert")
    if isinstance(dims, int):
        return dims
    with MegatronSource(args.src, args.spec, dims=dims, parallel=args.source_layout,
                        allow_pickle=args.allow_pickle) as source:
        target = None if args.target is None else target_binding(source, args.target).parallel
        plan = plan_conversion(source, args.dst, args.to, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                               storage_options=opts)
        info = {"spec": source.binding.spec.name, "source_layout": source.binding.parallel,
                "dims": source.binding.dims, "target": target}
        if args.dry_run:
            if args.json:
                print(json.dumps({**plan.to_json(), "megatron": info, "dry_run": True}, indent=1))
                return EXIT_OK
            _print_plan(args, plan)
            print(f"  read under {_layout(source.binding.parallel)} with spec '{info['spec']}'"
                  + (f"; then resharded to {_layout(target)}" if target else ""))
            return EXIT_OK
        bar = _bar(args, plan.bytes_out, "convert")
        try:
            result = run_import(source, plan, target=target, workers=args.workers, overwrite=args.overwrite,
                                progress=bar.update if bar is not None else None, storage_options=opts)
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        print(json.dumps({**result.to_json(), "megatron": info}, indent=1))
        return EXIT_OK
    to = f" as {_layout(target)}" if target else ""
    print(f"OK: megatron {plan.src} ({_layout(source.binding.parallel)}, spec '{info['spec']}') -> {plan.dst_format} "
          f"{plan.dst}{to}: {plan.tensors} tensors, {plan.values} values, {_mib(plan.bytes_out)} in "
          f"{result.elapsed_secs:.2f} s")
    return EXIT_OK


def _layout(parallel: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in parallel.items())


def _print_plan(args: argparse.Namespace, plan: Any) -> None:
    if args.json:
        print(json.dumps({**plan.to_json(), "dry_run": True}, indent=1))
        return
    print(f"dry run: {plan.src_format} {plan.src} -> {plan.dst_format} {plan.dst}")
    cast = f"; {plan.cast} cast to {plan.dtype}" if plan.cast else ""
    print(f"  {plan.tensors} tensors ({_mib(plan.bytes_in)} read, {_mib(plan.bytes_out)} written), "
          f"{plan.values} values{cast}")
    print("  would write:")
    for o in plan.outputs:
        print(f"    {o}")
    if plan.skipped:
        print(f"  not written ({plan.dst_format} cannot hold them): {len(plan.skipped)} key(s): "
              f"{', '.join(plan.skipped[:5])}{', ...' if len(plan.skipped) > 5 else ''}")
    if plan.dst_exists:
        print("  the destination already holds a checkpoint: the conversion needs --overwrite")


def _open_side(path: str, fmt: str, args: argparse.Namespace, dims: "dict[str, Any] | None",
               opts: dict[str, Any] | None) -> Any:
    """One side of ``ckpt diff``: Megatron rank directories through ``--spec``, anything else by ``open_source``."""
    from formats.foreign import open_source

    if fmt == "megatron":
        from resharding.megatron_dirs import MegatronSource

        return MegatronSource(path, args.spec, dims=dims, parallel=args.source_layout, allow_pickle=args.allow_pickle)
    return open_source(path, fmt, allow_pickle=args.allow_pickle, storage_options=opts)


def cmd_diff(args: argparse.Namespace) -> int:
    from ckpt.cli import _storage_options
    from formats.foreign import detect_format, diff
    from formats.storage import split_scheme

    if args.atol < 0 or args.rtol < 0:
        print(f"ckpt diff: --atol and --rtol must be >= 0 (got {args.atol}, {args.rtol})", file=sys.stderr)
        return EXIT_USAGE
    opts = _storage_options(args)
    dims = _dims(args, "diff")
    if isinstance(dims, int):
        return dims
    sides = []
    for path, fmt in ((args.a, args.a_format), (args.b, args.b_format)):
        if fmt == "auto" and split_scheme(path)[0] == "file" and detect_format(path, opts) == "megatron":
            fmt = "megatron"
        if fmt == "megatron" and args.spec is None:
            print(f"ckpt diff: {path} holds Megatron rank directories, which are read through a spec: pass --spec "
                  "gpt|llama|mixtral or a YAML path (and --dims JSON, --source-layout LAYOUT where the files' args "
                  "do not say)", file=sys.stderr)
            return EXIT_USAGE
        sides.append((path, fmt))
    with contextlib.ExitStack() as stack:
        a, b = (stack.enter_context(_open_side(path, fmt, args, dims, opts)) for path, fmt in sides)
        common = set(a.tensors) & set(b.tensors)
        bar = _bar(args, sum(a.tensors[k].nbytes + b.tensors[k].nbytes for k in common), "diff")
        try:
            report = diff(a, b, atol=args.atol, rtol=args.rtol, progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    elif report.equal:
        tol = f" within atol {args.atol}, rtol {args.rtol}" if args.atol or args.rtol else ", bit for bit"
        print(f"EQUAL: {report.a} ({report.a_format}) and {report.b} ({report.b_format}) hold the same "
              f"{report.keys_compared} keys with the same dtypes, shapes and values{tol}")
    else:
        print(f"DIFFERENT: {report.a} ({report.a_format}) vs {report.b} ({report.b_format}): "
              f"{len(report.differences)} difference(s) among {report.keys_compared} common keys")
        for d in report.differences:
            print(f"  - {d.key}: {d.detail}")
    return EXIT_OK if report.equal else EXIT_FAILED


def add_parsers(sub: Any, storage_option: Any) -> None:
    sp = sub.add_parser(
        "convert", help="convert between the universal format, PyTorch DCP, torch.save files, safetensors, "
                        "DeepSpeed ZeRO and Megatron rank directories",
        description="Convert a checkpoint between formats, streaming one tensor at a time. Formats: universal "
                    "(ckpt), dcp (PyTorch Distributed Checkpoint directory), torch (one torch.save file), "
                    "safetensors (a file, or a Hugging Face directory, sharded with model.safetensors.index.json). "
                    "deepspeed (a ZeRO-1/2/3 save_checkpoint directory, read), megatron (rank directories "
                    "mp_rank_*/, read through --spec), deepspeed-universal (DeepSpeed's universal checkpoint "
                    "layout, written; DeepSpeed loads it with load_universal).")
    sp.add_argument("src", help="source checkpoint: directory, file, or URL (URLs for universal checkpoints only)")
    sp.add_argument("dst", help="destination: a directory (universal, dcp, safetensors) or a file path (torch)")
    sp.add_argument("--from", dest="src_format", choices=SOURCE_CHOICES, default="auto",
                    help="source format (default auto: manifest.json -> universal, .metadata -> dcp, *.safetensors "
                         "or model.safetensors.index.json -> safetensors, one .pt/.pth/.bin file -> torch); "
                         "latest + global_step*/ or *_model_states.pt -> deepspeed; mp_rank_*/ or iter_*/ -> "
                         "megatron (needs --spec))")
    sp.add_argument("--to", choices=TARGET_CHOICES, default="universal",
                    help="target format (default universal); deepspeed-universal: DST is the tag directory, "
                         "its parent gets latest_universal")
    sp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                    help="cast model weights (floating tensors under model/) to this dtype; optimizer state, step "
                         "counters, integer and fp8 tensors keep theirs")
    sp.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                    help="largest safetensors shard, e.g. 500MB, 5GB (default), 2GiB")
    sp.add_argument("--workers", type=_workers, default=1, metavar="N",
                    help="output files written in parallel (default 1); peak memory is about N tensors")
    sp.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    sp.add_argument("--allow-pickle", action="store_true",
                    help="load pickled objects that torch's weights_only loader refuses (torch.save files, DCP "
                         "values and metadata); this can run code stored in the checkpoint: trusted files only")
    sp.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at the destination")
    sp.add_argument("--spec", metavar="SPEC",
                    help="--from megatron: how the ranks cut each tensor: a shipped spec (gpt, llama, mixtral) or a "
                         "YAML path")
    sp.add_argument("--dims", metavar="JSON",
                    help="--from megatron: model dims for the spec, e.g. '{\"vocab\": 50257}' (default: from the "
                         "files' args)")
    sp.add_argument("--source-layout", metavar="LAYOUT",
                    help="--from megatron: the layout the files were written under, e.g. tp=2,pp=2,dp=2,zero=1 "
                         "(default: the files' args, else the directory names and files)")
    sp.add_argument("--target", metavar="LAYOUT",
                    help="--from megatron: write the universal checkpoint as this layout's ranks would have saved it, "
                         "e.g. tp=1,pp=4,dp=2[,ep=..][,zero=..]")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    storage_option(sp)
    sp.set_defaults(func=cmd_convert)

    sp = sub.add_parser("diff", help="compare two checkpoints of any supported formats key by key (exit 1 if they "
                                     "differ)")
    sp.add_argument("a", help="first checkpoint (any supported format)")
    sp.add_argument("b", help="second checkpoint (any supported format)")
    sp.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0: bit-exact)")
    sp.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0: bit-exact)")
    sp.add_argument("--a-format", choices=SOURCE_CHOICES, default="auto", help="format of A (default auto)")
    sp.add_argument("--b-format", choices=SOURCE_CHOICES, default="auto", help="format of B (default auto)")
    sp.add_argument("--allow-pickle", action="store_true", help="as for convert: trusted files only")
    sp.add_argument("--spec", metavar="SPEC", help="for a Megatron side: as for convert (a shipped spec or a YAML path)")
    sp.add_argument("--dims", metavar="JSON", help="for a Megatron side: as for convert")
    sp.add_argument("--source-layout", metavar="LAYOUT", help="for a Megatron side: as for convert")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    storage_option(sp)
    sp.set_defaults(func=cmd_diff)
