"""The ``ckpt`` command line: ``inspect``, ``verify``; ``reshard`` and ``spec check`` (``ckpt.cli_reshard``);
``convert`` and ``diff`` (``ckpt.cli_convert``).

Exit codes: 0 success; 1 a check failed (``verify`` found damage); 2 bad usage or unreadable input (a path that is
not a ckpt checkpoint included: the message says what it is and what to pass); 141 (128 + SIGPIPE) when the reader of
stdout went away (``ckpt inspect --json | head``), quietly, as other command-line tools do.
``--json`` prints one JSON document on stdout for scripts, errors included (``{"ok": false, "error": {...}}``);
progress bars go to stderr and only on a terminal. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, Sequence

from ckpt.errors import CheckpointError, CheckpointNotFoundError, UnknownFormatError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: What a shell reports for a process killed by SIGPIPE (128 + 13): the exit of ``ckpt ... | head`` once head is done.
EXIT_BROKEN_PIPE = 141


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _inspect_doc(reader: Any) -> dict[str, Any]:
    from ckpt.loading import natural_key  # keys as people read them: params/2 before params/10
    from formats.dtypes import dtype_from_name, itemsize

    m = reader.manifest
    tensors = []
    for key in sorted(m.tensors, key=natural_key):
        t = m.tensors[key]
        nbytes = t.numel * itemsize(dtype_from_name(t.dtype, key))
        tensors.append({
            "key": key, "dtype": t.dtype, "shape": list(t.shape), "bytes": nbytes,
            "stored_bytes": sum(c.byte_length for c in t.chunks), "chunks": len(t.chunks),
            "codecs": sorted({c.codec for c in t.chunks}), "saved_layout": t.saved_layout,
        })
    return {
        "path": reader.path, "format_version": m.format_version, "writer": m.writer, "save_id": m.save_id,
        "created_unix_secs": m.created_unix_secs, "world_size": m.world_size, "layout": m.layout,
        "files": len(m.files), "stored_bytes": sum(f.size_bytes for f in m.files.values()),
        "tensor_bytes": sum(t["bytes"] for t in tensors), "tensors": tensors,
        "values": {k: m.values[k].value for k in sorted(m.values, key=natural_key)},
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    import ckpt

    with ckpt.open(args.path, _storage_options(args)) as reader:
        doc = _inspect_doc(reader)
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
        return EXIT_OK
    print(f"checkpoint  {doc['path']}")
    print(f"format      ckpt-universal v{doc['format_version']}, written by {doc['writer'].get('library')} "
          f"{doc['writer'].get('version')} (torch {doc['writer'].get('torch')})")
    lay = dict(doc["layout"])
    spec = lay.pop("spec", None)
    print(f"layout      {layout_text(doc['world_size'], lay, spec is not None)}")
    if spec is not None:
        from resharding.spec_bind import SpecBinding

        b = SpecBinding.from_json_dict(spec, doc["path"])
        print(f"spec        '{b.spec.name}' ({b.spec.file}) under "
              f"{','.join(f'{k}={v}' for k, v in b.parallel.items())}; "
              f"dims {', '.join(f'{k}={v}' for k, v in b.dims.items())}")
    print(f"size        {_human_bytes(doc['tensor_bytes'])} of tensors in {len(doc['tensors'])} keys, "
          f"{_human_bytes(doc['stored_bytes'])} in {doc['files']} files")
    width = max([len(t["key"]) for t in doc["tensors"]] + [3])
    print(f"\n{'key':<{width}}  {'dtype':<14} {'shape':<22} {'size':>12} chunks  saved as")
    for t in doc["tensors"]:
        lay = t["saved_layout"]
        saved = "plain" if lay is None else f"mesh {lay['mesh_shape']} {', '.join(lay['placements'])}"
        print(f"{t['key']:<{width}}  {t['dtype']:<14} {str(t['shape']):<22} {_human_bytes(t['bytes']):>12} "
              f"{t['chunks']:>6}  {saved}")
    if doc["values"]:
        print("\nvalues:")
        for k, v in doc["values"].items():
            print(f"  {k} = {v!r}")
    return EXIT_OK


def layout_text(world_size: int, layout: dict[str, Any], spec: bool = False) -> str:
    """The manifest's ``layout`` record (less its spec; ``spec``: it has one) as one line, for ``ckpt inspect``:
    ``saved by 4 ranks; DTensor mesh [2, 2]``."""
    lay = dict(layout)
    lay.pop("world_size", None)
    lay.pop("spec", None)
    meshes = lay.pop("dtensor_mesh_shapes", None) or []
    parts = [f"saved by {world_size} rank{'s' if world_size != 1 else ''}",
             f"DTensor mesh{'es' if len(meshes) > 1 else ''} {', '.join(str(m) for m in meshes)}" if meshes
             else "rank-local tensors cut as the spec below says" if spec else "no DTensor mesh (plain tensors)"]
    parts += [f"{k} {json.dumps(v, default=str)}" for k, v in sorted(lay.items())]
    return "; ".join(parts)


def verify_checkpoint(reader: Any, workers: int = 4, progress: bool = False) -> list[str]:
    """Every problem found: damaged or missing chunk bytes. That every tensor is covered exactly once was checked
    when the manifest was read (``Manifest.from_json`` refuses any other tiling, in O(n log n))."""
    from ckpt.loading import natural_key

    m = reader.manifest
    problems: list[str] = []
    jobs = [(m.tensors[k], c) for k in sorted(m.tensors, key=natural_key) for c in m.tensors[k].chunks]
    total = sum(c.byte_length for _, c in jobs)

    def check(job: Any) -> str | None:
        t, c = job
        try:
            reader.verify_chunk(t, c)
        except CheckpointError as e:
            return str(e)
        except FileNotFoundError as e:
            return f"{reader.path}/{c.file}: missing ({e}); key {t.key!r}"
        return None

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for job, res in zip(jobs, pool.map(check, jobs)):
            if res:
                problems.append(res)
            if bar is not None:
                bar.update(job[1].byte_length)
    if bar is not None:
        bar.close()
    return problems


def cmd_verify(args: argparse.Namespace) -> int:
    import ckpt

    try:
        reader = ckpt.open(args.path, _storage_options(args))
    except (CheckpointNotFoundError, UnknownFormatError):  # no checkpoint there: nothing failed, the path is wrong
        raise
    except CheckpointError as e:  # incomplete or damaged manifest: the check failed
        _report_verify(args, [str(e)], 0)
        return EXIT_FAILED
    with reader:
        show = not args.json and sys.stderr.isatty()
        problems = verify_checkpoint(reader, args.workers, progress=show)
        nchunks = sum(len(t.chunks) for t in reader.manifest.tensors.values())
    _report_verify(args, problems, nchunks)
    return EXIT_FAILED if problems else EXIT_OK


def _report_verify(args: argparse.Namespace, problems: list[str], nchunks: int) -> None:
    if args.json:
        print(json.dumps({"path": args.path, "ok": not problems, "chunks": nchunks, "problems": problems}, indent=1))
    elif problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.path}:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
    else:
        print(f"OK: {args.path}: {nchunks} chunks verified, every tensor covered exactly once")


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if not getattr(args, "storage_options", None):
        return None
    try:
        opts = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        raise UsageError(None, f"--storage-options must be a JSON object such as '{{\"anon\": true}}': {e}",
                         f"ckpt {args.command}") from None
    if not isinstance(opts, dict):
        raise UsageError(None, f"--storage-options must be a JSON object, got {type(opts).__name__}: "
                               f"{args.storage_options}", f"ckpt {args.command}")
    return opts


class UsageError(SystemExit):
    """A command line that is refused: raised by ``Parser.error`` instead of printing, ``parser`` being the
    (sub)command parser that refused it, so ``main`` prints that command's usage (and, with ``--json``, a JSON error
    document); or by a command whose option value does not parse (``--dims``, ``--storage-options``: ``parser`` None,
    ``prog`` the command). A ``SystemExit`` with code 2, as argparse's own, for callers other than ``main``."""

    def __init__(self, parser: argparse.ArgumentParser | None, message: str, prog: str = "ckpt") -> None:
        super().__init__(EXIT_USAGE)
        self.parser = parser
        self.message = message
        self.prog = parser.prog if parser is not None else prog


class Parser(argparse.ArgumentParser):
    """The ``ckpt`` parser; argparse builds every sub-command parser with this class too (``parser_class``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


class _VersionAction(argparse.Action):
    """``--version``: the package's version and torch's, looked up only when asked (torch takes a second to import)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """``ckpt 0.1.0 (torch 2.5.1, python 3.11.9)``: the installed package's version (the source tree's when it is not
    installed) and those of torch and Python."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from ckpt import __version__

    try:
        ours = version("ckpt")
    except PackageNotFoundError:
        ours = __version__
    return f"ckpt {ours} (torch {torch.__version__}, python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ckpt", description="Inspect, verify, reshard, convert and compare checkpoints.")
    p.add_argument("--version", action=_VersionAction, help="print the versions of ckpt, torch and Python, and exit")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("path", help="checkpoint directory or URL (file://, memory://, s3://...)")
        sp.add_argument("--json", action="store_true", help="print one JSON document for scripts")
        sp.add_argument("--storage-options", metavar="JSON",
                        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')

    sp = sub.add_parser("inspect", help="keys, dtypes, shapes, sizes and the layout a checkpoint was saved under")
    common(sp)
    sp.set_defaults(func=cmd_inspect)
    sp = sub.add_parser("verify", help="re-read every chunk, check checksums and that every element is covered once")
    common(sp)
    sp.add_argument("--workers", type=int, default=4, help="parallel chunk reads (default 4)")
    sp.set_defaults(func=cmd_verify)

    def finish(sp: argparse.ArgumentParser, func: Any, progress: bool = True) -> None:
        """The options a command that reads checkpoints ends with (``--no-progress`` where it shows a bar), and the
        function that runs it."""
        if progress:
            sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        sp.add_argument("--json", action="store_true", help="print one JSON document for scripts")
        sp.add_argument("--storage-options", metavar="JSON", help="fsspec options as JSON")
        sp.set_defaults(func=func)

    from ckpt.cli_reshard import add_parsers  # noqa: PLC0415

    add_parsers(sub, finish)
    from ckpt.cli_convert import add_parsers as add_convert_parsers  # noqa: PLC0415

    add_convert_parsers(sub, finish)
    for add in plugin_commands():
        add(sub, finish)
    return p


#: Entry-point group of commands that live in higher layers (``ckpt daemon``: ``snapshot_daemon.cli``), found at
#: run time so that ``ckpt`` never imports them (DESIGN.md, Layers).
COMMANDS_GROUP = "ckpt.commands"


def plugin_commands() -> list[Any]:
    """The ``add_parsers(sub, finish)`` functions registered under ``ckpt.commands``, by name."""
    from importlib.metadata import entry_points  # noqa: PLC0415

    return [ep.load() for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse would report these with the top-level usage; the sub-command's is the useful one
            command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        return _usage_error(e, argv)
    try:
        rc = int(args.func(args))
        sys.stdout.flush()  # here, not at exit: a reader that went away is reported below, not as a traceback
        return rc
    except BrokenPipeError:
        return _broken_pipe()
    except UsageError as e:  # a command that checks its own arguments (parser.error)
        return _usage_error(e, argv)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"ckpt {args.command}: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            try:
                _print_error_doc(args.command, type(e).__name__, str(e), EXIT_USAGE)
            except BrokenPipeError:
                return _broken_pipe()
        return EXIT_USAGE


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the innermost sub-command ``args`` names (``ckpt spec check`` -> the ``check`` parser)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def _usage_error(e: UsageError, argv: list[str]) -> int:
    """Report a refused command line as argparse does, with the usage of the sub-command that refused it."""
    if e.parser is not None:
        e.parser.print_usage(sys.stderr)
    print(f"{e.prog}: error: {e.message}", file=sys.stderr)
    if "--json" in argv:
        with contextlib.suppress(BrokenPipeError):
            _print_error_doc(e.prog.removeprefix("ckpt").strip() or None, "UsageError", e.message, EXIT_USAGE)
    return EXIT_USAGE


def _print_error_doc(command: str | None, error_type: str, message: str, exit_code: int) -> None:
    """With ``--json``, errors are a JSON document on stdout too: ``{"ok": false, "command", "exit_code", "error":
    {"type", "message"}}`` (``ok`` as in ``verify --json``); the message still goes to stderr for people."""
    print(json.dumps({"ok": False, "command": command, "exit_code": exit_code,
                      "error": {"type": error_type, "message": message}}, indent=1))
    sys.stdout.flush()


def _broken_pipe() -> int:
    """stdout's reader went away (``ckpt inspect --json | head``): no traceback, stdout pointed at /dev/null so that
    the interpreter's last flush cannot fail again, and the exit a shell shows for a pipeline's killed writer."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (tests capture it): nothing will flush into a pipe
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    # ``python -m ckpt.cli`` runs this file as ``__main__``; the commands import ``ckpt.cli`` (``UsageError``), a
    # second copy whose classes this copy's ``main`` would not catch. Run that copy's ``main``.
    from ckpt.cli import main as _main

    sys.exit(_main())
