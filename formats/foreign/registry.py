"""The source registry: every format ``open_source`` reads, ``ckpt convert`` converts and ``ckpt diff`` compares.

A format registers an opener and the options it takes (``register_source``); ``open_source(path, fmt, **options)``
looks the format up, checks the options against the declaration and calls the opener. Nothing else in the
conversion path names a format. The built-in formats register in ``formats.foreign.builtin_sources`` (loaded on the
first look-up, so registration order is: the built-ins, then whatever registers later); formats whose readers live a
layer up register themselves when their module is imported: Megatron rank directories from
``resharding.megatron_dirs``, which ``ckpt convert`` / ``ckpt diff`` import. ``formats`` never imports them.

Options. ``allow_pickle`` and ``storage_options`` are offered to every source (``open_source`` takes them for any
format); a source receives the ones it declares, and one it does not declare is a permission or a transport it never
needs (safetensors never unpickles) or, for ``storage_options``, means that it reads local paths only. Every other
option is format-specific: given to a format that does not declare it, or missing where the format requires it, it
raises ``SourceOptionError`` naming the format and the option. Options are named as keywords (``source_layout``);
messages use the command line's spelling of the same name (``--source-layout``), the flag ``ckpt convert`` has
for it.

Who calls it: ``formats.foreign.convert`` (``open_source``, ``convert``), ``formats.foreign.detect`` (``detect``
hooks), ``ckpt.cli_convert`` (choices, options, what to print), and modules that register a format, at import
time. One process; registration is not meant to race with look-ups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ckpt.errors import CheckpointError, UnknownFormatError
from formats.storage import split_scheme

if TYPE_CHECKING:
    from formats.foreign.source import Source

#: Options ``open_source`` offers every source; each source receives those it declares.
AMBIENT_OPTIONS = ("allow_pickle", "storage_options")


class SourceOptionError(CheckpointError):
    """An option a source format does not take, one it requires and did not get, or a value it cannot use; the
    message names the format and the option."""


@dataclass(frozen=True)
class SourceOption:
    """One option of a source format, passed to its opener as keyword ``name``.

    ``required``: when set, the option must be given, and this text says what to pass (the error prefixes the
    path). ``from_text``: how the command line turns the flag's text into the value (None: the text itself); it
    raises ``SourceOptionError`` for text it cannot use. ``targets``: when the option is given, the formats the
    source can be written as (``--target``, a layout a universal checkpoint is chunked for, needs a universal
    destination).
    """

    name: str
    help: str = ""
    required: str | None = None
    from_text: Callable[[str], Any] | None = None
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"source option {self.name!r}: expected a Python identifier (a keyword of the opener)")

    @property
    def flag(self) -> str:
        return option_flag(self.name)


def option_flag(name: str) -> str:
    """An option's spelling on the command line: ``source_layout`` -> ``--source-layout``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class SourceNotes:
    """What ``ckpt convert`` reports about an opened source beyond the conversion plan.

    ``json``: keys added to the ``--json`` document; ``label``: printed after the source path; ``written_as``:
    after the destination; ``dry_run``: lines added to the ``--dry-run`` listing.
    """

    json: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    written_as: str = ""
    dry_run: tuple[str, ...] = ()


Opener = Callable[..., "Source"]


@dataclass(frozen=True)
class SourceFormat:
    """A registered format: ``opener(path, **options)`` returns an open ``Source``. See ``register_source``."""

    name: str
    opener: Opener
    description: str
    options: tuple[SourceOption, ...] = ()
    detect: Callable[[str], bool] | None = None
    describe: Callable[["Source"], SourceNotes] | None = None
    misuse_hint: str = ""

    def option(self, name: str) -> SourceOption | None:
        return next((o for o in self.options if o.name == name), None)

    def takes(self, name: str) -> bool:
        return self.option(name) is not None

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ``SourceOptionError`` for options this format does not take (ambient ones excepted), naming the
        formats that do take them."""
        unknown = [n for n in options if n not in AMBIENT_OPTIONS and not self.takes(n)]
        if not unknown:
            return
        flags = ", ".join(option_flag(n) for n in unknown)
        verb = "applies" if len(unknown) == 1 else "apply"
        owners = [e for e in _entries().values() if e is not self and any(e.takes(n) for n in unknown)]
        if not owners:
            mine = ", ".join(o.flag for o in self.options if o.name not in AMBIENT_OPTIONS) or "none"
            raise SourceOptionError(f"{flags}: no registered source format takes such an option; the source is "
                                    f"{self.name} (its options: {mine})")
        where = " or ".join(f"{e.description} (--from {e.name})" for e in owners)
        hints = "".join(f" {e.misuse_hint}" for e in owners if e.misuse_hint)
        raise SourceOptionError(f"{flags} {verb} to {where} only; the source is {self.name}.{hints}")

    def check_target(self, options: Mapping[str, Any], dst_format: str) -> None:
        """Raise ``SourceOptionError`` if a given option restricts the targets and ``dst_format`` is not one."""
        for o in self.options:
            if o.targets is not None and options.get(o.name) is not None and dst_format not in o.targets:
                raise SourceOptionError(f"{o.flag} writes a {' or '.join(o.targets)} checkpoint; it cannot be combined "
                                        f"with --to {dst_format}")

    def take(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The given (not None) options this format declares: what one side of ``ckpt diff`` receives."""
        return {n: v for n, v in options.items() if v is not None and self.takes(n) and n not in AMBIENT_OPTIONS}

    def from_text(self, texts: Mapping[str, str]) -> dict[str, Any]:
        """Command-line texts (option name -> text) turned into values by each option's ``from_text``."""
        out: dict[str, Any] = {}
        for name, text in texts.items():
            o = self.option(name)
            out[name] = o.from_text(text) if o is not None and o.from_text is not None else text
        return out

    def notes(self, source: "Source") -> SourceNotes:
        return self.describe(source) if self.describe is not None else SourceNotes()

    def open(self, path: str, *, allow_pickle: bool = False, storage_options: dict[str, Any] | None = None,
             **options: Any) -> "Source":
        """Check ``options`` and call the opener. Sources that take no ``storage_options`` read local paths only
        (given the path without ``file://``)."""
        options = {n: v for n, v in options.items() if v is not None}
        self.check_options(options)
        missing = [o for o in self.options if o.required is not None and o.name not in options]
        if missing:
            raise SourceOptionError(f"{path}: {missing[0].required}")
        kwargs = dict(options)
        if self.takes("allow_pickle"):
            kwargs["allow_pickle"] = allow_pickle
        if self.takes("storage_options"):
            kwargs["storage_options"] = storage_options
        else:
            scheme, rest = split_scheme(path)
            if scheme != "file":
                raise UnknownFormatError(f"{path}: {self.name} checkpoints are read from local paths only")
            path = rest if path.startswith("file://") else path
        return self.opener(path, **kwargs)


_REGISTRY: dict[str, SourceFormat] = {}
_builtins_loaded = False


def _entries() -> dict[str, SourceFormat]:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        import formats.foreign.builtin_sources  # noqa: F401, PLC0415 - registers universal, dcp, torch, ...
    return _REGISTRY


def register_source(name: str, opener: Opener, *, description: str,
                    options: "tuple[SourceOption | str, ...]" = (), detect: Callable[[str], bool] | None = None,
                    describe: Callable[["Source"], SourceNotes] | None = None, misuse_hint: str = "",
                    replace: bool = False) -> SourceFormat:
    """Register format ``name``: ``opener(path, **options)`` opens it as a ``Source``.

    ``description``: what the format is, for messages ("Megatron rank directories"). ``options``: what the opener
    takes besides the path (a string is an option with no extras; list ``"allow_pickle"`` and/or
    ``"storage_options"`` to receive those). ``detect(local_path)``: True for paths of this format that
    ``detect_format``'s built-in rules do not recognise (tried before it gives up). ``describe(source)``: what
    ``ckpt convert`` prints about the opened source. ``misuse_hint``: added to the error when this format's
    options are given for another format. Raises ``ValueError`` if ``name`` is taken, unless ``replace``.
    """
    entries = _entries()
    if name in entries and not replace:
        raise ValueError(f"source format {name!r} is already registered (by {entries[name].opener!r}); pass "
                         "replace=True to replace it")
    if name == "auto":
        raise ValueError("'auto' is not a format name (it asks detect_format)")
    opts = tuple(SourceOption(o) if isinstance(o, str) else o for o in options)
    entry = SourceFormat(name, opener, description, opts, detect, describe, misuse_hint)
    entries[name] = entry
    return entry


def unregister_source(name: str) -> None:
    """Forget format ``name`` (tests, plugins that are unloaded). Unknown names are ignored."""
    _entries().pop(name, None)


def find_source(name: str) -> SourceFormat | None:
    """The registered format ``name``, or None."""
    return _entries().get(name)


def source_names() -> tuple[str, ...]:
    """Every registered format, in registration order."""
    return tuple(_entries())


def detected_sources(local_path: str) -> list[str]:
    """The registered formats whose ``detect`` hook claims ``local_path``."""
    return [e.name for e in _entries().values() if e.detect is not None and e.detect(local_path)]


__all__ = ["AMBIENT_OPTIONS", "SourceFormat", "SourceNotes", "SourceOption", "SourceOptionError", "detected_sources",
           "find_source", "option_flag", "register_source", "source_names", "unregister_source"]
