"""``ckpt convert`` and ``ckpt diff``: the command-line side of ``formats.foreign``.

Kept apart from ``ckpt.cli`` (which owns the parser and the exit-code conventions). Exit codes: ``convert`` 0 on
success, 2 on bad usage or unreadable/refused input; ``diff`` 0 when the
checkpoints are equal, 1 when they differ (every difference listed), 2 on bad usage or unreadable input.
``--json`` prints one JSON document on stdout; progress bars (bytes/s and ETA) go to stderr, on a terminal only.

No format is special here: the source is looked up in ``formats.foreign.registry`` (Megatron rank directories
included, registered by ``resharding.megatron_dirs``), its own options (``--spec``, ``--dims``, ...) are checked and
passed by the registry's declaration, and what the output says about a source beyond the plan comes from the
format's ``describe`` hook.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

TARGET_CHOICES = ("universal", "dcp", "torch", "safetensors", "deepspeed-universal", "megatron")
#: Flags that set a source format's own options (dest = the option's name); which format takes which is the
#: registry's business (``formats.foreign.registry``), checked once the source format is known.
SOURCE_OPTIONS = ("spec", "dims", "source_layout", "target")


def _load_sources() -> None:
    """Make sure every source format the command line offers is registered: the built-ins, and the readers that live
    above ``formats`` and register themselves on import."""
    import resharding.megatron_register  # noqa: F401, PLC0415 - registers "megatron"


class _SourceChoices:
    """``--from`` / ``--a-format`` / ``--b-format`` choices: ``auto`` and every registered source format, looked
    up only when argparse checks a given value or prints help (building the parser imports no reader)."""

    def _names(self) -> tuple[str, ...]:
        from formats.foreign.registry import source_names

        _load_sources()
        return ("auto", *source_names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Any:
        return iter(self._names())


SOURCE_CHOICES = _SourceChoices()


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


def _dtype(text: str) -> str:
    """``--dtype``: any name ``formats.foreign.parse_dtype`` takes, checked when the command line is parsed."""
    from formats.foreign import parse_dtype

    try:
        parse_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers {text!r}: expected a positive integer")
    return n


def _source(args: argparse.Namespace, path: str, fmt: str, opts: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """The registered format of ``path`` (detected for ``auto``) and the source options given on the command line
    (flags not given left out), parsed by that format where it declares them."""
    from formats.foreign.detect import detect_format, unregistered
    from formats.foreign.registry import find_source, source_names

    if fmt == "auto":
        fmt = detect_format(path, opts)
    entry = find_source(fmt)
    if entry is None:
        raise unregistered(path, fmt, source_names())
    given = {n: getattr(args, n) for n in SOURCE_OPTIONS if getattr(args, n, None) is not None}
    return entry, given


def cmd_convert(args: argparse.Namespace) -> int:
    from ckpt.cli import _storage_options
    from formats.foreign import PLANNED_TARGETS, open_source, plan_conversion, run_conversion
    from formats.foreign.convert import read_model_keys
    from formats.foreign.detect import not_implemented

    if args.to in PLANNED_TARGETS:  # before reading anything
        raise not_implemented(args.to, "writing")
    if args.to == "megatron":
        return _convert_to_megatron(args)
    if args.iteration is not None:
        print(f"ckpt convert: --iteration applies to --to megatron only (the target is {args.to})", file=sys.stderr)
        return EXIT_USAGE
    if args.max_shard_size is not None and args.to != "safetensors":
        print(f"ckpt convert: --max-shard-size applies to --to safetensors only (the target is {args.to})",
              file=sys.stderr)
        return EXIT_USAGE
    _load_sources()
    opts = _storage_options(args)
    entry, given = _source(args, args.src, args.src_format, opts)
    entry.check_options(given)
    entry.check_target(given, args.to)
    options = entry.from_text(given)
    model_keys = read_model_keys(args.model_keys) if args.model_keys is not None else None
    with open_source(args.src, entry.name, allow_pickle=args.allow_pickle, storage_options=opts,
                     model_keys=model_keys, **options) as source:
        notes = entry.notes(source)
        plan = plan_conversion(source, args.dst, args.to, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                               storage_options=opts)
        if args.dry_run:
            _print_plan(args, plan, notes)
            return EXIT_OK
        bar = _bar(args, plan.bytes_out, "convert")
        try:
            result = run_conversion(source, plan, workers=args.workers, overwrite=args.overwrite,
                                    progress=bar.update if bar is not None else None, storage_options=opts)
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        print(json.dumps({**result.to_json(), **notes.json}, indent=1))
        return EXIT_OK
    if plan.skipped:
        print(f"note: {len(plan.skipped)} key(s) not written ({plan.dst_format} cannot hold them): "
              f"{', '.join(plan.skipped[:5])}{', ...' if len(plan.skipped) > 5 else ''}", file=sys.stderr)
    for line in plan.notes:
        print(f"warning: {line}", file=sys.stderr)
    rate = plan.bytes_out / max(result.elapsed_secs, 1e-9)
    cast = f", {plan.cast} cast to {plan.dtype}" if plan.cast else ""
    print(f"OK: {plan.src_format} {plan.src}{notes.label} -> {plan.dst_format} {plan.dst}{notes.written_as}: "
          f"{plan.tensors} tensors{cast}, {plan.values} values, {_mib(plan.bytes_out)} in {result.elapsed_secs:.2f} s "
          f"({_mib(rate)}/s){_config_text(plan)}")
    return EXIT_OK


def _convert_to_megatron(args: argparse.Namespace) -> int:
    """``--to megatron``: a universal checkpoint written as Megatron rank directories of ``--target``
    (``resharding.megatron_export``); the spec and dims default to those the checkpoint records."""
    from ckpt.cli import UsageError, _storage_options
    from ckpt.cli_reshard import _dims, _prog
    from formats.foreign.detect import detect_format
    from resharding.grid import layout_text
    from resharding.megatron_export import export_megatron

    opts = _storage_options(args)
    fmt = detect_format(args.src, opts) if args.src_format == "auto" else args.src_format
    if fmt != "universal":
        raise UsageError(None, f"--to megatron reads a universal checkpoint; {args.src} is {fmt}. Convert it to "
                               f"universal first (ckpt convert {args.src} UNIVERSAL --from {fmt} ...), then export "
                               "that", _prog(args))
    if args.target is None:
        raise UsageError(None, "--to megatron needs --target LAYOUT, the layout to write (e.g. tp=2,pp=2 or "
                               "tp=4,pp=1,ep=2)", _prog(args))
    if args.source_layout is not None:
        raise UsageError(None, "--source-layout is for --from megatron; a universal checkpoint records its layout",
                         _prog(args))
    bars: list[Any] = []

    def start_bar(total: int) -> None:
        bars.append(_bar(args, total, "export"))

    try:
        result = export_megatron(args.src, args.dst, target=args.target, spec=args.spec, dims=_dims(args),
                                 iteration=args.iteration, overwrite=args.overwrite, dry_run=args.dry_run,
                                 on_plan=start_bar, progress=lambda n: bars[0].update(n) if bars and bars[0] else None,
                                 storage_options=opts)
    finally:
        if bars and bars[0] is not None:
            bars[0].close()
    if args.json:
        print(json.dumps({"src": args.src, **result.to_json()}, indent=1))
        return EXIT_OK
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    where = "release" if result.iteration is None else f"iteration {result.iteration}"
    if args.dry_run:
        print(f"dry run: universal {args.src} -> megatron {args.dst} ({where}, spec '{result.spec}', "
              f"{layout_text(result.layout)}): {len(result.files)} file(s)")
        for f in result.files[:20]:
            print(f"  {f}")
        if len(result.files) > 20:
            print(f"  ... {len(result.files) - 20} more")
        return EXIT_OK
    print(f"OK: universal {args.src} -> megatron {args.dst} ({where}, spec '{result.spec}', "
          f"{layout_text(result.layout)}): {len(result.files)} file(s), {_mib(result.bytes_written)} in "
          f"{result.elapsed_secs:.2f} s")
    return EXIT_OK


def _config_text(plan: Any) -> str:
    """What the OK line of a safetensors export says about the model's config files."""
    if plan.configs:
        return f"; wrote {', '.join(plan.configs)}"
    if plan.missing_config:
        return (f"; no config.json written: the checkpoint records no model config, so from_pretrained({plan.dst!r}) "
                "cannot build the model. Record it when saving: ckpt.save(..., model_config=model.config) "
                f"(and generation_config=model.generation_config), or copy the model's config.json into {plan.dst}")
    return ""


def _print_plan(args: argparse.Namespace, plan: Any, notes: Any) -> None:
    if args.json:
        print(json.dumps({**plan.to_json(), **notes.json, "dry_run": True}, indent=1))
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
    for line in plan.notes:
        print(f"  warning: {line}")
    if plan.missing_config:
        print(f"  {_config_text(plan)[2:]}")
    for line in notes.dry_run:
        print(line)


def cmd_diff(args: argparse.Namespace) -> int:
    """Both sides opened by ``open_source``; each gets the source options (``--spec``, ...) its format takes."""
    from ckpt.cli import _storage_options
    from formats.foreign import diff, open_source

    if args.atol < 0 or args.rtol < 0:
        print(f"ckpt diff: --atol and --rtol must be >= 0 (got {args.atol}, {args.rtol})", file=sys.stderr)
        return EXIT_USAGE
    _load_sources()
    opts = _storage_options(args)
    sides = [_source(args, path, fmt, opts) + (path,) for path, fmt in ((args.a, args.a_format),
                                                                         (args.b, args.b_format))]
    with contextlib.ExitStack() as stack:
        a, b = (stack.enter_context(open_source(path, entry.name, allow_pickle=args.allow_pickle, storage_options=opts,
                                                **entry.from_text(entry.take(given))))
                for entry, given, path in sides)
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


def add_parsers(sub: Any, finish: Any) -> None:
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
    sp.add_argument("--from", dest="src_format", choices=SOURCE_CHOICES, default="auto", metavar="FORMAT",
                    help="source format, one of %(choices)s (default auto: manifest.json -> universal, .metadata -> dcp, *.safetensors "
                         "or model.safetensors.index.json -> safetensors, one .pt/.pth/.bin file -> torch); "
                         "latest + global_step*/ or *_model_states.pt -> deepspeed; mp_rank_*/ or iter_*/ -> "
                         "megatron (needs --spec))")
    sp.add_argument("--to", choices=TARGET_CHOICES, default="universal",
                    help="target format (default universal); deepspeed-universal: DST is the tag directory, "
                         "its parent gets latest_universal")
    sp.add_argument("--dtype", type=_dtype, metavar="DTYPE",
                    help="bf16, fp16, fp32, fp64 or torch's names (bfloat16, float16, half, float32, float, "
                         "float64, double, torch.bfloat16); cast model weights (floating tensors under model/) to this dtype; optimizer state, step "
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
    sp.add_argument("--model-keys", metavar="FILE",
                    help="--from torch: the names of model.named_parameters() in order (one per line, or a JSON "
                         "list), to key an optim.state_dict() saved in the file by parameter name (default: the "
                         "file's model state dict, where its tensors are the optimizer's parameters)")
    sp.add_argument("--spec", metavar="SPEC",
                    help="--from megatron: how the ranks cut each tensor: a shipped spec (gpt, llama, mixtral in "
                         "Megatron-Core's local naming; gpt-te, llama-te, mixtral-te in its Transformer Engine "
                         "naming; a family name picks the naming from the files' keys, auto also the family) or a "
                         "YAML path. --to megatron: the naming to write (default: the spec the checkpoint records)")
    sp.add_argument("--dims", metavar="JSON",
                    help="--from megatron: model dims for the spec, e.g. '{\"vocab\": 50257}' (default: from the "
                         "files' args); --to megatron: dims that override the recorded ones")
    sp.add_argument("--source-layout", metavar="LAYOUT",
                    help="--from megatron: the layout the files were written under, e.g. tp=2,pp=2,dp=2,zero=1 "
                         "(default: the files' args, else the directory names and files)")
    sp.add_argument("--target", metavar="LAYOUT",
                    help="--from megatron: write the universal checkpoint as this layout's ranks would have saved it, "
                         "e.g. tp=1,pp=4,dp=2[,ep=..][,zero=..]; --to megatron (required): the layout of the rank "
                         "directories to write, e.g. tp=2,pp=2[,ep=2][,dp=2,zero=1]")
    sp.add_argument("--iteration", metavar="N|release",
                    help="--to megatron: the iteration to record (iter_XXXXXXX/ and the tracker file); default: the "
                         "checkpoint's iteration value, else release")
    finish(sp, cmd_convert)

    sp = sub.add_parser("diff", help="compare two checkpoints of any supported formats key by key (exit 1 if they "
                                     "differ)")
    sp.add_argument("a", help="first checkpoint (any supported format)")
    sp.add_argument("b", help="second checkpoint (any supported format)")
    sp.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0: bit-exact)")
    sp.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0: bit-exact)")
    sp.add_argument("--a-format", choices=SOURCE_CHOICES, default="auto", metavar="FORMAT",
                    help="format of A, one of %(choices)s (default auto)")
    sp.add_argument("--b-format", choices=SOURCE_CHOICES, default="auto", metavar="FORMAT",
                    help="format of B (default auto)")
    sp.add_argument("--allow-pickle", action="store_true", help="as for convert: trusted files only")
    sp.add_argument("--spec", metavar="SPEC", help="for a Megatron side: as for convert (a shipped spec or a YAML path)")
    sp.add_argument("--dims", metavar="JSON", help="for a Megatron side: as for convert")
    sp.add_argument("--source-layout", metavar="LAYOUT", help="for a Megatron side: as for convert")
    finish(sp, cmd_diff)
