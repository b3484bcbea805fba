"""``ckpt reshard`` and ``ckpt spec check``: the command-line side of the spec language and the resharding engine.

Kept apart from ``ckpt.cli`` (which owns the parser and the exit-code conventions) so each module stays about
one concern. Exit codes: 0 success; 1 a check failed (``spec check`` found unmatched rules or keys); 2 bad usage
(an option value that does not parse included: ``ckpt.cli.UsageError``) or unreadable input (a bad spec is reported
with its file:line:column).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _dims(args: argparse.Namespace) -> dict[str, Any] | None:
    from ckpt.cli import UsageError

    if not args.dims:
        return None
    try:
        dims = json.loads(args.dims)
    except json.JSONDecodeError as e:
        raise UsageError(None, f"--dims must be a JSON object such as '{{\"hidden\": 4096}}': {e}",
                         _prog(args)) from None
    if not isinstance(dims, dict):
        raise UsageError(None, f"--dims must be a JSON object, got {type(dims).__name__}: {args.dims}", _prog(args))
    return dims


def _prog(args: argparse.Namespace) -> str:
    return f"ckpt {args.command}" + (f" {args.spec_command}" if getattr(args, "spec_command", None) else "")


def _bar(args: argparse.Namespace, total: int, desc: str) -> Any:
    if args.json or not sys.stderr.isatty() or args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)


def cmd_reshard(args: argparse.Namespace) -> int:
    from formats.reader import read_manifest
    from formats.storage import open_storage
    from formats.manifest import MANIFEST_NAME
    from resharding.offline import reshard, source_binding
    from resharding.spec_bind import SpecBinding, parse_parallel, resolve_spec
    from ckpt.errors import CheckpointExistsError
    from ckpt.cli import _storage_options

    opts = _storage_options(args)
    src = open_storage(args.src, opts)
    dst = open_storage(args.dst, opts)
    manifest = read_manifest(src)
    target = parse_parallel(args.to)
    if args.spec is not None:
        dims = _dims(args)
        if dims is None:
            saved = manifest.layout.get("spec") if isinstance(manifest.layout, dict) else None
            if saved is None:
                from ckpt.cli import UsageError

                raise UsageError(None, f"--spec needs --dims (JSON) for a checkpoint that records no spec ({src.url}); "
                                       "pass the model dimensions, e.g. --dims '{\"hidden\": 4096, ...}'", _prog(args))
            dims = dict(saved["dims"])
        binding = SpecBinding(resolve_spec(args.spec), dims, target)
    else:
        binding = source_binding(manifest, src.url).with_parallel(target)
    if dst.exists(MANIFEST_NAME) and not args.overwrite and not args.dry_run:
        raise CheckpointExistsError(f"{dst.url}: a committed checkpoint is already there; pass --overwrite to "
                                    "replace it, or choose another destination")
    bars: list[Any] = []

    def start_bar(total: int) -> None:
        bars.append(_bar(args, total, "reshard"))

    def advance(n: int) -> None:
        if bars and bars[0] is not None:
            bars[0].update(n)

    result = reshard(src, dst, binding, dry_run=args.dry_run, on_plan=start_bar, progress=advance)
    if bars and bars[0] is not None:
        bars[0].close()
    doc = {"src": src.url, "dst": dst.url, "to": binding.parallel, "spec": binding.spec.name,
           "ranks": result.ranks, "bytes": result.bytes_written, "bytes_read": result.bytes_read,
           "seconds": round(result.elapsed_secs, 3), "dry_run": bool(args.dry_run)}
    if args.json:
        print(json.dumps(doc, indent=1))
    elif args.dry_run:
        print(f"dry run: would write {result.bytes_written / 2**20:.1f} MiB for {result.ranks} ranks of "
              f"{_layout_text(binding.parallel)} at {dst.url}")
    else:
        rate = result.bytes_written / max(result.elapsed_secs, 1e-9) / 2**20
        print(f"OK: {dst.url}: {result.ranks} ranks of {_layout_text(binding.parallel)} "
              f"({result.bytes_written / 2**20:.1f} MiB, {result.elapsed_secs:.2f} s, {rate:.0f} MiB/s)")
    return EXIT_OK


def _layout_text(parallel: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in parallel.items())


def cmd_spec_check(args: argparse.Namespace) -> int:
    from spec_lang import check, match_shipped
    from resharding.spec_bind import resolve_spec

    if args.spec == "auto" and args.against is None:
        from ckpt.cli import UsageError

        raise UsageError(None, "spec 'auto' picks a shipped spec by the keys of a checkpoint: pass --against "
                               "CHECKPOINT", _prog(args))
    keys: list[str] | None = None
    settings: dict[str, int] | None = None
    matched = None
    if args.against is not None:
        keys, settings = _keys_of(args)
    if args.spec == "auto":
        assert keys is not None
        matched, reports = match_shipped(keys)
        if matched is None:
            tried = "; ".join(f"{n}: {len(r.unmatched_keys)} key(s) match no rule" for n, r in reports.items())
            print(f"FAILED: no shipped spec describes the keys of {args.against} ({tried}); write a spec for this "
                  "model (docs/spec-language.md)", file=sys.stderr)
            if args.json:
                print(json.dumps({"spec": "auto", "against": args.against, "ok": False, "matched": None,
                                  "tried": {n: len(r.unmatched_keys) for n, r in reports.items()}}, indent=1))
            return EXIT_FAILED
    spec = resolve_spec(matched or args.spec)
    doc: dict[str, Any] = {"spec": spec.name, "file": spec.file, "valid": True}
    if args.spec == "auto":
        doc["matched"] = matched
        if not args.json:
            print(f"matched: shipped spec '{matched}' describes the keys of {args.against}")
    if args.against is None:
        if args.json:
            print(json.dumps(doc, indent=1))
        else:
            print(f"OK: {spec.file}: spec '{spec.name}' is valid ({len(spec.params)} parameter rules, "
                  f"{len(spec.state)} state rules)")
        return EXIT_OK
    assert keys is not None
    report = check(spec, keys, settings=settings)
    if not report.ok and args.spec != "auto":
        better, _ = match_shipped(keys)
        if better is not None and better != spec.name:
            doc["matching_shipped_spec"] = better
    doc.update(against=args.against, ok=report.ok, keys=len(keys),
               unmatched_rules=[str(r) for r in report.unmatched_rules],
               unmatched_keys=list(report.unmatched_keys),
               inactive_rules=[str(r) for r in report.inactive_rules])
    if args.json:
        print(json.dumps(doc, indent=1))
    elif report.ok:
        print(f"OK: every rule of {spec.file} matches a key of {args.against}, and every one of its {len(keys)} keys "
              "matches a rule")
    else:
        hint = (f"\nThe shipped spec '{doc['matching_shipped_spec']}' describes these keys: pass it instead"
                if "matching_shipped_spec" in doc else "")
        print(f"FAILED: {spec.file} against {args.against}:\n{report.format()}{hint}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def _keys_of(args: argparse.Namespace) -> tuple[list[str], dict[str, int] | None]:
    """Rank-local keys to check a spec against: a spec-saved checkpoint's ranks, or a checkpoint's own keys."""
    import ckpt
    from ckpt.cli import _storage_options
    from formats.foreign.detect import detect_format
    from resharding.spec_bind import SpecBinding

    opts = _storage_options(args)
    if detect_format(args.against, opts) == "megatron":
        from resharding.megatron_files import local_keys, megatron_settings

        return local_keys(args.against), megatron_settings(args.against)
    with ckpt.open(args.against, opts) as reader:
        m = reader.manifest
    saved = m.layout.get("spec") if isinstance(m.layout, dict) else None
    if saved is None:
        return m.keys(), None
    b = SpecBinding.from_json_dict(saved, args.against)  # the rank-local keys the saving ranks held
    keys: set[str] = set(m.values)
    for r in range(b.world_size):
        keys.update(b.rank_layout(r).keys())
    return sorted(keys), {k: int(v) for k, v in b.parallel.items() if k != "order"}


def add_parsers(sub: Any, finish: Any) -> None:
    sp = sub.add_parser("reshard", help="rewrite a checkpoint as another parallel layout would have saved it")
    sp.add_argument("src", help="source checkpoint (directory or URL)")
    sp.add_argument("dst", help="destination (must not hold a committed checkpoint unless --overwrite)")
    sp.add_argument("--to", required=True, metavar="LAYOUT",
                    help="target layout, e.g. tp=2,pp=4,dp=1[,ep=2][,zero=1][,order=tp-ep-dp-pp]")
    sp.add_argument("--spec", help="spec name (gpt, llama, mixtral) or YAML path; default: the one the source "
                                   "was saved with")
    sp.add_argument("--dims", metavar="JSON", help="model dimensions for --spec; default: the source's")
    sp.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")
    sp.add_argument("--dry-run", action="store_true", help="plan only: print what would be written")
    finish(sp, cmd_reshard)

    sp = sub.add_parser("spec", help="resharding specs: check one")
    spsub = sp.add_subparsers(dest="spec_command", required=True)
    c = spsub.add_parser("check", help="validate a spec; with --against, list rules that match no key and keys "
                                       "that no rule matches")
    c.add_argument("spec", help="spec YAML path, a shipped name (gpt, llama, mixtral, gpt-te, llama-te, mixtral-te), "
                                "or auto: the shipped spec that describes --against (printed as 'matched: ...')")
    c.add_argument("--against", metavar="CHECKPOINT", help="a checkpoint whose keys the spec should describe: a "
                                                            "universal checkpoint or Megatron rank directories")
    c.add_argument("--dims", metavar="JSON", help="model dimensions (default: those the checkpoint records)")
    finish(c, cmd_spec_check, progress=False)
