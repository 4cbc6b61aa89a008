"""A declarative config schema and the one loader that walks a document against it.

A config is tables of fields described as data (:class:`Table`, :class:`Field`: type,
bounds or choices, a parser, whether required, where the value goes). :class:`Loader`
checks a parsed TOML or YAML document against them and reports every mistake as
``<file>:<line>: <table>.<field>: <message>``, an unknown name with the closest known
one. :func:`read` reads a file into a document and its line finder, refusing what no
config is (not UTF-8, too large, nested past the parser's depth, a key given twice).

The names of a ``secret`` table's entries are credentials (the API keys of ``[keys]``):
no message prints one. Such an entry is named ``keys["sk-l…23"]`` (its first four and
last two characters, for a name of at least 16 printable ASCII characters) or
``keys[…]`` (nothing of a shorter name), see :func:`mask`; its file and line say which
it is."""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

__all__ = [
    "MAX_CONFIG_BYTES",
    "ConfigError",
    "Field",
    "FieldError",
    "Loader",
    "Locator",
    "Parts",
    "Table",
    "mask",
    "read",
    "sections",
    "show",
]

MIB = 1024 * 1024


class ConfigError(ValueError):
    """A mistake in a config, located by file, line and field."""


class FieldError(ValueError):
    """A field's value is wrong; the message is reported as is."""


Parser = Callable[[Any], Any]


@dataclass(frozen=True)
class Field:
    """One field of a table.

    ``kind`` is the type a value must have: ``"bool"``, ``"int"`` (a whole number),
    ``"number"`` (int or float), ``"str"``, ``"table"`` (a sub-table described by
    ``table``) or ``"any"`` (the parser decides). Booleans are never numbers. A wrong
    type is told ``must be <what>, got <value>``.

    ``low``/``high`` bound numbers (``above``: ``low`` itself excluded; NaN and the
    infinities fail); ``range`` words the bounds in the message instead of the
    computed ``"at least L and at most H"``. ``choices`` lists the strings allowed.
    ``parse`` turns the checked value into the one kept (a rate checked, a duration in
    seconds...) and raises ValueError with the message to report. ``required`` is the
    message when the field is missing (None: optional). ``attr`` names the attribute
    the value goes to (default: the field's name)."""

    name: str
    kind: str
    what: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    above: bool = False
    range: Optional[str] = None
    choices: Tuple[str, ...] = ()
    parse: Optional[Parser] = None
    required: Optional[str] = None
    attr: Optional[str] = None
    table: Optional[Table] = None

    @property
    def target(self) -> str:
        return self.attr or self.name


@dataclass(frozen=True)
class Table:
    """One table of the config.

    A plain table holds ``fields``; an ``array`` is a list of such tables (``[[routes]]``,
    at most ``max_items``). A ``named`` table holds entries by name
    (``[tiers.<name>]``): each entry a table of ``fields`` or, when ``value`` is given,
    one value checked by it (``[keys] "sk-1" = "pro"``); ``shorthand`` names the field
    that an entry given as a plain value sets (``"sk-1" = "pro"`` is
    ``{ tier = "pro" }``). ``nonempty``: the message when a named table has no entry.
    ``required``: the table must be there. ``finish`` turns the checked values of a
    table (or of one entry) into what is kept; it raises :class:`FieldError` with
    ``(field, message)`` arguments to report a rule across the fields. ``secret``: the
    names of a named table's entries are credentials, shown masked in every message
    (:func:`mask`); pass the names of such tables to :func:`read` too."""

    name: str
    fields: Tuple[Field, ...] = ()
    named: bool = False
    array: bool = False
    max_items: int = 1000
    value: Optional[Field] = None
    shorthand: Optional[str] = None
    nonempty: Optional[str] = None
    required: bool = False
    finish: Optional[Callable[[Dict[str, Any]], Any]] = None
    secret: bool = False

    def field(self, name: str) -> Optional[Field]:
        for f in self.fields:
            if f.name == name:
                return f
        return None

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.fields)


# The largest config read: a bound on what one mistyped path (a log file...) costs.
MAX_CONFIG_BYTES = 64 * MIB


# -- where a field is in the file ---------------------------------------------------------

Parts = Tuple[Union[str, int], ...]


class Hidden(str):
    """A name a message shows masked (:func:`mask`): an unknown name inside an entry of a
    secret table, which may well be another credential put at the wrong place. Equal to
    the name itself, so the line finders still find it."""


# The characters mask() may show: printable ASCII but the quote and the backslash (a
# shown part must not close the quotes nor read as an escape).
_SHOWABLE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\"}


def mask(name: str) -> str:
    """How a secret name (an API key) is shown in messages: its first four and last two
    characters around an ellipsis, quoted (``"sk-l…23"``), for a name of at least 16
    characters whose shown ones are printable ASCII (at least ten stay hidden); ``…``
    (nothing of it) for any other. The same name is always shown the same way."""
    if len(name) >= 16 and all(c in _SHOWABLE for c in name[:4] + name[-2:]):
        return f'"{name[:4]}\u2026{name[-2:]}"'
    return "\u2026"


def _where(parts: Parts, secret: Collection[str] = ()) -> str:
    """``("tiers", "a", "queue")`` as ``tiers.a.queue``; an index of an array of tables
    as ``routes[0]``; the name of an entry of a ``secret`` table, and a :class:`Hidden`
    name, masked: ``keys["sk-l…23"].team``."""
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, Hidden) or (i == 1 and parts[0] in secret):
            out += f"[{mask(part)}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Short(reprlib.Repr):
    """A repr that never expands a value: a few items per level, a few levels (a YAML
    alias shares one list many times; printed whole, 1 KB of YAML is gigabytes), and
    an integer too long to print in decimal described by its size."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6
        self.maxstring = self.maxother = limit

    def repr_int(self, x: int, level: int) -> str:
        return _integer(x)

    def repr_str(self, x: str, level: int) -> str:
        return repr(x[: self.maxstring + 1])


def _integer(value: int) -> str:
    if value.bit_length() <= 256:
        return repr(value)
    return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short: an error message never carries (nor builds) a whole
    huge value."""
    if isinstance(value, str):
        text = repr(value[: limit + 1])
    elif isinstance(value, int) and not isinstance(value, bool):
        text = _integer(value)
    else:
        text = _Short(limit).repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _name(name: Any) -> str:
    """A table or field name as text (a YAML name may be any scalar: a huge integer
    has no decimal form)."""
    return name if isinstance(name, str) else show(name)


class Locator:
    """Finds the line of a field in the TOML text, for error messages: the line of the
    key under its table's header, else the header of the table, else its parent's.
    ``secret``: the tables whose entries' names are credentials (see :func:`mask`)."""

    _HEADER = re.compile(r"^\[(\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")

    def __init__(self, path: str, text: str, secret: Collection[str] = ()) -> None:
        self.path = path
        self.secret = frozenset(secret)
        # (line, header or None, key or None, occurrence of the header)
        self.entries: List[Tuple[int, str, Optional[str], int]] = []
        # The names a line declares, header's and key's: ("keys", "sk-1", "team").
        self.names: Dict[int, Parts] = {}
        current = ""
        current_names: Parts = ()
        seen: Dict[str, int] = {}
        occurrence = 0
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            header = self._HEADER.match(line)
            if header:
                current = _unquote(header.group(2))
                current_names = _split(header.group(2))
                occurrence = seen.get(current, -1) + 1
                seen[current] = occurrence
                self.entries.append((number, current, None, occurrence))
                self.names[number] = current_names
            elif "=" in line and not line.startswith("#"):
                key = line.split("=", 1)[0]
                self.entries.append((number, current, _unquote(key), occurrence))
                self.names[number] = (*current_names, *_split(key))

    def line(self, parts: Parts) -> int:
        names = [p for p in parts if isinstance(p, str)]
        index = next((p for p in parts if isinstance(p, int)), None)
        for cut in range(len(names), 0, -1):
            head, key = ".".join(names[: cut - 1]), names[cut - 1]
            table = ".".join(names[:cut])
            for number, header, name, occurrence in self.entries:
                if index is not None and occurrence != index and names[0] == header.split(".")[0]:
                    continue
                if header == head and name == key:
                    return number
            # The table's own header, else a deeper one that declares it ([a.b.c] declares a.b).
            for exact in (True, False):
                for number, header, name, occurrence in self.entries:
                    if index is not None and occurrence != index and names[0] == header.split(".")[0]:
                        continue
                    if name is None and (header == table if exact else header.startswith(table + ".")):
                        return number
        return 1

    def where(self, parts: Parts) -> str:
        """``parts`` as a message names them, an entry of a secret table masked."""
        return _where(parts, self.secret)

    def error(self, parts: Parts, message: str) -> ConfigError:
        where = self.where(parts)
        return ConfigError(f"{self.path}:{self.line(parts)}: {where + ': ' if where else ''}{message}")


def _split(name: str) -> Tuple[str, ...]:
    """A dotted TOML name's parts, unquoted: ``keys."sk.1"`` is ``("keys", "sk.1")``."""
    return tuple(p.strip().strip("\"'") for p in re.split(r"\.(?=(?:[^\"']*[\"'][^\"']*[\"'])*[^\"']*$)", name))


def _unquote(name: str) -> str:
    return ".".join(_split(name))


_YAML_MERGE = "tag:yaml.org,2002:merge"


def _merged_keys(node: Any, seen: Set[int]) -> List[Any]:
    """The key nodes a YAML merge (``<<``) brings into a mapping: those of the merged
    mapping (or mappings), and of their own merges; each mapping once."""
    import yaml

    sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
    out: List[Any] = []
    for source in sources:
        if not isinstance(source, yaml.MappingNode) or id(source) in seen:
            continue
        seen.add(id(source))
        for k, v in source.value:
            out.extend(_merged_keys(v, seen) if k.tag == _YAML_MERGE else [k])
    return out


class _YamlLocator(Locator):
    """Finds the line of a field in a YAML document, from the parser's marks; refuses a
    key given twice in one mapping (YAML would keep the last silently)."""

    def __init__(self, path: str, text: str, secret: Collection[str] = ()) -> None:
        import yaml

        self.path = path
        self.secret = frozenset(secret)
        self.marks: Dict[Parts, int] = {}
        walked = set()

        def walk(node: Any, prefix: Parts) -> None:
            if id(node) in walked:  # an alias: walked once (aliases of aliases stay linear)
                return
            walked.add(id(node))
            if isinstance(node, yaml.MappingNode):
                names = set()
                for k, v in node.value:
                    name = (*prefix, str(k.value))
                    if k.tag == _YAML_MERGE:
                        # "<<: *defaults": its names are this mapping's too; one given
                        # again here would silently replace the merged one.
                        for merged_key in _merged_keys(v, set()):
                            twice = (*prefix, str(merged_key.value))
                            if merged_key.value in names:
                                line = merged_key.start_mark.line + 1
                                raise ConfigError(f"{path}:{line}: {self.where(twice)}: given twice (keep one)")
                            names.add(merged_key.value)
                        continue
                    if k.value in names:
                        raise ConfigError(f"{path}:{k.start_mark.line + 1}: {self.where(name)}: given twice (keep one)")
                    names.add(k.value)
                    self.marks.setdefault(name, k.start_mark.line + 1)
                    walk(v, name)
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    self.marks.setdefault((*prefix, i), v.start_mark.line + 1)
                    walk(v, (*prefix, i))

        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())

    def line(self, parts: Parts) -> int:
        for cut in range(len(parts), 0, -1):
            found = self.marks.get(parts[:cut])
            if found:
                return found
        return 1


def _toml() -> Any:
    try:
        import tomllib

        return tomllib
    except ImportError:  # pragma: no cover - Python < 3.11
        import tomli  # type: ignore[import-not-found]

        return tomli


def _parse(path: str, text: str, secret: Collection[str]) -> Tuple[Any, Locator]:
    """The document and its line finder, for TOML or (by the file's suffix) YAML."""
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML configs need PyYAML: pip install 'nexus-limits[yaml]'") from None
        try:
            doc = yaml.safe_load(text)
            loc: Locator = _YamlLocator(path, text, secret)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f"{mark.line + 1}:" if mark is not None else ""
            raise ConfigError(f"{path}:{line} invalid YAML: {getattr(error, 'problem', None) or error}") from None
        except RecursionError:
            raise ConfigError(f"{path}:1: invalid YAML: nested too deeply") from None
        except ConfigError:
            raise
        except ValueError as error:  # a number Python cannot read (past 4,300 digits)
            raise _number_error(path, text, "YAML", error) from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}:1: the config must be a mapping of sections")
        return doc, loc
    toml = _toml()
    try:
        doc = toml.loads(text)
    except toml.TOMLDecodeError as error:
        raise _toml_error(path, text, str(error), secret) from None
    except RecursionError:
        raise ConfigError(f"{path}:1: invalid TOML: nested too deeply") from None
    except ValueError as error:  # a number Python cannot read (past 4,300 digits)
        raise _number_error(path, text, "TOML", error) from None
    return doc, Locator(path, text, secret)


def _number_error(path: str, text: str, language: str, error: ValueError) -> ConfigError:
    """The parser's int() refused a number: the line of the first very long one."""
    found = re.search(r"[0-9a-fA-F_:]{1000,}", text)
    line = text.count("\n", 0, found.start()) + 1 if found else 1
    return ConfigError(f"{path}:{line}: invalid {language}: a number is too long to read ({error})")


# The parser's errors that quote a name: ('keys', 'sk-1') or 'sk-1'.
_QUOTES_NAMES = ("Cannot declare", "Cannot mutate", "Cannot redefine", "Duplicate inline table key")


def _toml_error(path: str, text: str, message: str, secret: Collection[str] = ()) -> ConfigError:
    """A TOML syntax error at its line; a key given twice is named. The parser's words
    may quote names (``Cannot declare ('keys', 'sk-1') twice``): on a line that names a
    secret table, they are left out and its entry is named masked."""
    found = re.search(r"\(at line (\d+), column \d+\)", message)
    if found is None:
        return ConfigError(f"{path}: invalid TOML: {message}")
    line = int(found.group(1))
    loc = Locator(path, text, secret)
    names = loc.names.get(line, ())
    if names and (message.startswith("Cannot overwrite a value") or "twice" in message):
        return ConfigError(f"{path}:{line}: {loc.where(names)}: given twice (keep one)")
    if message.startswith(_QUOTES_NAMES) and loc.secret.intersection(names):
        # (keys = { "sk-1" = "a", "sk-1" = "b" } under another table names it too.)
        where = f"{loc.where(names)}: " if names else ""
        words = re.split(r"\s+[(\'\"]", message, maxsplit=1)[0]
        return ConfigError(f"{path}:{line}: {where}invalid TOML: {words}")
    return ConfigError(f"{path}:{line}: invalid TOML: {message}")


# -- the loader ---------------------------------------------------------------------------


def _close(name: Any, known: Sequence[str]) -> Optional[str]:
    """The known name closest to ``name``, if one is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_name(name: Any, known: Sequence[str], secret: bool = False) -> str:
    """An unknown name as a message shows it: :class:`Hidden` (masked) when it is like
    no known name and may be an API key put at the wrong place: any such name inside
    a secret table's entry (a key indented one level too deep), else one that holds a
    digit (no field's name does: a key under the wrong table header, its own forgotten)."""
    text = _name(name)
    if _close(text, known) is None and (secret or any(c.isdigit() for c in text)):
        return Hidden(text)
    return text


def _unknown(name: Any, known: Sequence[str], what: str) -> str:
    close = _close(name, known)
    hint = f"; did you mean {close!r}?" if close else ""
    return f"unknown {what}{hint} (expected one of: {', '.join(known)})"


_KINDS: Dict[str, Callable[[Any], bool]] = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "any": lambda v: True,
}


def _not_text(value: str) -> bool:
    """Whether a string holds a lone surrogate (YAML's ``"\\ud800"`` escape): no file,
    header or Redis key can carry it, and encoding it anywhere later raises."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_NOT_TEXT = "must be text (it holds a lone surrogate such as '\\ud800')"


def _a(value: Any) -> str:
    """What a value is, without a character of it: "an integer", "a list"."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    return next((what for kind, what in kinds.items() if isinstance(value, kind)), f"a {type(value).__name__}")


class Loader:
    """Checks a document's tables against their :class:`Table` specs."""

    def __init__(self, path: str, loc: Locator) -> None:
        self.path = path
        self.loc = loc

    def value(self, spec: Field, value: Any, parts: Parts) -> Any:
        """One field's value checked against its spec, or a ConfigError naming it."""
        kind = spec.kind
        if kind == "table":
            if not isinstance(value, dict):
                raise self.loc.error(parts, "must be a table")
            assert spec.table is not None
            return self.table(spec.table, value, parts)
        if not _KINDS[kind](value):
            raise self.loc.error(parts, f"must be {spec.what}, got {show(value)}")
        if isinstance(value, str) and _not_text(value):
            raise self.loc.error(parts, f"{_NOT_TEXT}, got {show(value)}")
        if spec.choices and value not in spec.choices:
            listed = ", ".join(repr(c) for c in spec.choices[:-1]) + f" or {spec.choices[-1]!r}"
            raise self.loc.error(parts, f"must be {listed}, got {show(value)}")
        if spec.low is not None or spec.high is not None:
            low = -math.inf if spec.low is None else spec.low
            high = math.inf if spec.high is None else spec.high
            # Written so that NaN fails: every comparison with it is false.
            fits = (value > low if spec.above else value >= low) and value <= high
            if not fits:
                if spec.range is not None:
                    bounds = spec.range
                else:
                    bound = f"above {low:g}" if spec.above else f"at least {low:g}"
                    bounds = f"{bound} and at most {high:g}"
                raise self.loc.error(parts, f"must be {bounds}, got {show(value)}")
        if spec.parse is not None:
            try:
                return spec.parse(value)
            except FieldError as error:
                # FieldError(field, message): a field inside the value (a table given to
                # an "any" field) is named.
                if len(error.args) == 2:
                    raise self.loc.error((*parts, str(error.args[0])), str(error.args[1])) from None
                raise self.loc.error(parts, str(error)) from None
            except (ValueError, TypeError, OverflowError) as error:
                raise self.loc.error(parts, str(error)) from None
        return float(value) if kind == "number" else value

    def table(self, spec: Table, doc: Mapping[Any, Any], parts: Parts) -> Any:
        """A table's fields checked: unknown names refused (with the closest known one),
        required ones asked for, each value checked; ``finish`` applied."""
        for name in doc:
            if not isinstance(name, str) or spec.field(name) is None:
                shown = _unknown_name(name, spec.names, bool(parts) and parts[0] in self.loc.secret)
                raise self.loc.error((*parts, shown), _unknown(shown, spec.names, "field"))
        out: Dict[str, Any] = {}
        for f in spec.fields:
            if f.name in doc:
                out[f.target] = self.value(f, doc[f.name], (*parts, f.name))
            elif f.required is not None:
                raise self.loc.error(parts, f.required)
        return self.finished(spec, out, parts)

    def finished(self, spec: Table, values: Dict[str, Any], parts: Parts) -> Any:
        if spec.finish is None:
            return values
        try:
            return spec.finish(values)
        except FieldError as error:
            where, message = error.args if len(error.args) == 2 else (None, error.args[0])
            raise self.loc.error(parts + ((where,) if where else ()), message) from None
        except (ValueError, TypeError, OverflowError) as error:
            raise self.loc.error(parts, str(error)) from None

    def section(self, spec: Table, doc: Mapping[str, Any]) -> Any:
        """A top-level table: plain, an array of tables, or named entries."""
        parts: Parts = (spec.name,)
        if spec.name not in doc:
            if spec.required:
                raise ConfigError(f"{self.path}:1: [{spec.name}] is missing")
            return {}
        raw = doc[spec.name]
        if spec.array:
            if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
                raise self.loc.error(parts, f"must be a list of tables ([[{spec.name}]])")
            if len(raw) > spec.max_items:
                raise self.loc.error(parts, f"at most {spec.max_items} entries, got {len(raw)}")
            return [self.table(spec, item, (*parts, i)) for i, item in enumerate(raw)]
        if not isinstance(raw, dict):
            raise self.loc.error(parts, "must be a table")
        if not spec.named:
            return self.table(spec, raw, parts)
        if not raw and spec.nonempty:
            raise self.loc.error(parts, spec.nonempty)
        entries: Dict[str, Any] = {}
        for name, entry in raw.items():
            where = (*parts, _name(name))
            if not isinstance(name, str):
                if spec.secret:
                    raise self.loc.error(where, f"names must be strings (quote it), got {_a(name)}")
                raise self.loc.error(where, f"names must be strings, got {show(name)}")
            if _not_text(name):
                if spec.secret:
                    raise self.loc.error(where, f"the name {_NOT_TEXT}")
                # Located at the name, labelled by its table: the name itself cannot be printed.
                line = self.loc.line(where)
                raise ConfigError(f"{self.path}:{line}: {_where(parts)}: the name {show(name)} {_NOT_TEXT}")
            if spec.value is not None:
                entries[name] = self.value(spec.value, entry, where)
                continue
            if spec.shorthand is not None and not isinstance(entry, dict):
                entry = {spec.shorthand: entry}
            if not isinstance(entry, dict):
                raise self.loc.error(where, "must be a table")
            entries[name] = self.table(spec, entry, where)
        return entries


def read(path: str, secret: Collection[str] = ()) -> Tuple[Dict[str, Any], Locator]:
    """A config file's document and its line finder (TOML, or YAML by the suffix).
    ``secret``: the tables whose entries' names are credentials, masked in every
    message (:func:`mask`)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config: {error.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: the config is larger than {MAX_CONFIG_BYTES // MIB} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the config must be UTF-8 text") from None
    return _parse(path, text, secret)


def sections(doc: Mapping[Any, Any], loc: Locator, schema: Sequence[Table]) -> None:
    """Refuses a top-level name the schema does not have, naming the closest."""
    known = [t.name for t in schema]
    for name in doc:
        if name not in known:
            shown = _unknown_name(name, known)
            raise loc.error((shown,), _unknown(shown, known, "section"))
