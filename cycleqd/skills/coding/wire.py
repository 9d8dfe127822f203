"""Plain-data wire format of the coding judge (stdlib only; also shipped into sandboxes).

A value crosses a process boundary only as JSON built from this closed set of builtin
types, never as a pickled object, so whatever comes back is rebuilt from scratch by the
reader: a candidate's object with a forged ``__eq__`` arrives as the plain list/str/int it
contains (or is refused), and nothing the candidate defines ever runs in the judge.

Encoding (``encode``; ``decode`` is its inverse and builds fresh builtin objects):

========================  ==========================================
``None``, ``bool``, str    the JSON value itself
``int``                    JSON number if ``|x| < 2**53``, else ``["i", "<decimal>"]``
``float``                  ``["f", repr(x)]`` (exact; ``nan``/``inf`` included)
``complex``                ``["c", repr(x.real), repr(x.imag)]``
``list`` / ``tuple``       ``["l", [...]]`` / ``["t", [...]]``
``set`` / ``frozenset``    ``["s", [...]]`` / ``["fs", [...]]`` (items in a canonical order)
``dict``                   ``["d", [[k, v], ...]]`` (insertion order)
``bytes`` / ``bytearray``  ``["b", hex]`` / ``["ba", hex]``
``range``                  ``["r", start, stop, step]``
iterator (results only)    ``["it", [...]]``: decoded as an iterator over a fresh list
dict views (results)       ``["dk", [...]]``, ``["dv", [...]]``, ``["di", [[k, v], ...]]``
other objects (results)    ``["o", type name, truth value]``: decoded as an :class:`Opaque`
========================  ==========================================

An :class:`Opaque` result (e.g. the ``re.Match`` that ``assert check_str("annie")`` only
tests for truth) keeps nothing of the candidate's object but its type name and its truth
value, which the candidate could have sent as ``True``/``False`` anyway; it equals only
itself, so no ``==`` against an expected value can pass with it.

Limits: nesting deeper than :data:`MAX_DEPTH`, more than :data:`MAX_ITEMS` items in one
container, or an ``int`` beyond Python's digit limit raise :class:`WireError`.

:func:`normalize` (used only by the candidate's own harness, for honest programs) maps
values that the benchmarks' ``==`` treats as their builtin base -- subclasses of builtins
(namedtuple, ``Counter``, ``OrderedDict``, ``defaultdict``), numpy scalars, iterators and
dict views -- onto the table above, exactly as the old in-process ``assert f(x) == y``
would have compared them. It is a convenience, not a defence: the judge only ever sees the
plain data, whatever the candidate sends.
"""

from __future__ import annotations

# ``json`` imports ``re`` (~30 ms of start-up per candidate sandbox): imported lazily, the
# candidate's harness writes its results with :func:`to_text` instead.

MAX_DEPTH = 100
MAX_ITEMS = 1_000_000
_SMALL = 2 ** 53


class WireError(ValueError):
    """A value that is not plain data (or too big / too deep) for the wire."""


_ESC = {i: "\\u%04x" % i for i in range(0x20)}
_ESC.update({ord('"'): '\\"', ord("\\"): "\\\\", 0x7F: "\\u007f"})


def to_text(enc: object) -> str:
    """Encoded structure (lists, str, int, bool, None) -> single-line JSON text (non-ASCII
    kept as is, lone surrogates escaped) without importing ``json``."""
    parts: list[str] = []
    stack = [enc]
    while stack:
        x = stack.pop()
        if isinstance(x, _Raw):
            parts.append(x.text)
        elif x is None:
            parts.append("null")
        elif x is True:
            parts.append("true")
        elif x is False:
            parts.append("false")
        elif type(x) is int:
            parts.append(str(x))
        elif type(x) is str:
            t = x.translate(_ESC)
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates -> \udxxx escapes (valid JSON)
                t = t.encode("utf-8", "backslashreplace").decode("utf-8")
            parts.append('"' + t + '"')
        elif type(x) is list:
            stack.append(_Raw("]"))
            for i in range(len(x) - 1, -1, -1):
                stack.append(x[i])
                if i:
                    stack.append(_Raw(","))
            stack.append(_Raw("["))
        else:
            raise WireError(f"cannot write {type(x).__name__}")
    return "".join(parts)


class _Raw:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _sort_key(enc: object) -> str:
    return to_text(enc)


class Opaque:
    """Stand-in for a result that is not plain data: only its type name and truth value.
    Compares equal to nothing but itself (object identity); not hashable-equal to values."""

    __slots__ = ("truth", "type_name")

    def __init__(self, type_name: str, truth: bool) -> None:
        self.type_name, self.truth = type_name, truth

    def __bool__(self) -> bool:
        return self.truth

    def __repr__(self) -> str:
        return f"<opaque {self.type_name} result>"


def encode(x: object, depth: int = 0, opaque: bool = False) -> object:
    """``x`` (exact builtin types only) -> JSON-compatible structure. Raises WireError.
    ``opaque``: objects of other types become ``["o", type name, bool(x)]`` (results only).
    """
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        if -_SMALL < x < _SMALL:
            return x
        try:
            return ["i", str(x)]
        except ValueError as e:  # beyond sys.get_int_max_str_digits()
            raise WireError(f"int too large: {e}") from None
    if t is float:
        return ["f", repr(x)]
    if t is complex:
        return ["c", repr(x.real), repr(x.imag)]
    if t is list or t is tuple:
        if len(x) > MAX_ITEMS:
            raise WireError(f"more than {MAX_ITEMS} items")
        return ["l" if t is list else "t", [encode(v, depth + 1, opaque) for v in x]]
    if t is set or t is frozenset:
        if len(x) > MAX_ITEMS:
            raise WireError(f"more than {MAX_ITEMS} items")
        items = sorted((encode(v, depth + 1, opaque) for v in x), key=_sort_key)
        return ["s" if t is set else "fs", items]
    if t is dict:
        if len(x) > MAX_ITEMS:
            raise WireError(f"more than {MAX_ITEMS} items")
        return ["d", [[encode(k, depth + 1, opaque), encode(v, depth + 1, opaque)] for k, v in x.items()]]
    if t is bytes:
        return ["b", x.hex()]
    if t is bytearray:
        return ["ba", bytes(x).hex()]
    if t is range:
        return ["r", x.start, x.stop, x.step] if all(
            -_SMALL < v < _SMALL for v in (x.start, x.stop, x.step)) else _bad(x)
    if opaque:
        return ["o", str(getattr(t, "__name__", "?"))[:60], bool(x)]
    raise WireError(f"not plain data: {t.__name__}")


def _bad(x: object) -> object:
    raise WireError(f"not plain data: {type(x).__name__}")


def _decode_int(s: object) -> int:
    if not isinstance(s, str) or not s.lstrip("-").isdigit():
        raise WireError(f"bad int {s!r:.40}")
    return int(s)


def _decode_float(s: object) -> float:
    if not isinstance(s, str) or len(s) > 40:
        raise WireError(f"bad float {s!r:.40}")
    return float(s)


def decode(j: object, depth: int = 0) -> object:
    """Inverse of :func:`encode` (plus the result-only tags). Raises WireError."""
    if depth > MAX_DEPTH + 2:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    if j is None or isinstance(j, (bool, str)):
        return j
    if type(j) is int:
        return j
    if type(j) is not list or not j or not isinstance(j[0], str):
        raise WireError(f"bad encoded value {j!r:.60}")
    tag, rest = j[0], j[1:]
    try:
        if tag == "i":
            return _decode_int(rest[0])
        if tag == "f":
            return _decode_float(rest[0])
        if tag == "c":
            return complex(_decode_float(rest[0]), _decode_float(rest[1]))
        if tag == "b":
            return bytes.fromhex(rest[0])
        if tag == "ba":
            return bytearray.fromhex(rest[0])
        if tag == "o":
            name, truth = rest
            if type(truth) is not bool:
                raise WireError("bad opaque")
            return Opaque(str(name)[:60], truth)
        if tag == "r":
            a, b, c = rest
            if not all(type(v) is int for v in (a, b, c)):
                raise WireError("bad range")
            return range(a, b, c)
        items = rest[0]
        if type(items) is not list or len(rest) != 1:
            raise WireError(f"bad container {tag!r}")
        if tag in ("d", "di"):
            pairs = []
            for kv in items:
                if type(kv) is not list or len(kv) != 2:
                    raise WireError("bad dict item")
                pairs.append((decode(kv[0], depth + 1), decode(kv[1], depth + 1)))
            return dict(pairs) if tag == "d" else dict(pairs).items()
        vals = [decode(v, depth + 1) for v in items]
        if tag == "l":
            return vals
        if tag == "t":
            return tuple(vals)
        if tag == "s":
            return set(vals)
        if tag == "fs":
            return frozenset(vals)
        if tag == "it":
            return iter(vals)
        if tag == "dk":
            return dict.fromkeys(vals).keys()
        if tag == "dv":
            return dict(enumerate(vals)).values()
    except WireError:
        raise
    except (TypeError, ValueError, IndexError, OverflowError) as e:
        raise WireError(f"bad encoded {tag!r}: {e}") from None
    raise WireError(f"unknown tag {tag!r:.20}")


def dumps(x: object) -> str:
    """``encode(x)`` as canonical single-line JSON text."""
    return to_text(encode(x))


def loads(s: str) -> object:
    """Inverse of :func:`dumps` (``json.loads`` + :func:`decode`); raises WireError."""
    import json
    try:
        return decode(json.loads(s))
    except WireError:
        raise
    except (ValueError, RecursionError, MemoryError, TypeError) as e:
        raise WireError(f"unreadable: {type(e).__name__}") from None


def call_key(name: str, args: tuple, kwargs: dict) -> str:
    """Canonical text of one call ``name(*args, **kwargs)`` (arguments as plain data)."""
    return to_text([name, encode(list(args)), [[k, encode(v)] for k, v in sorted(kwargs.items())]])


def decode_call(key: str) -> tuple[str, list, dict]:
    """Inverse of :func:`call_key`: (name, args, kwargs) as fresh objects."""
    import json
    name, args, kwargs = json.loads(key)
    return name, decode(args), {k: decode(v) for k, v in kwargs}


def normalize(x: object, depth: int = 0) -> object:
    """Map what the benchmarks' ``==`` treats as a builtin onto exact builtin types (see
    the module docstring); anything else is returned unchanged (and refused by encode)."""
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    t = type(x)
    if x is None or t in (bool, int, float, str, complex, bytes, bytearray, range):
        return x
    n = depth + 1
    if t is list or t is tuple:
        return t(normalize(v, n) for v in x)
    if t is set or t is frozenset:
        return t(normalize(v, n) for v in x)
    if t is dict:
        return {normalize(k, n): normalize(v, n) for k, v in x.items()}
    if type(x).__module__ == "numpy" and getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        return normalize(x.item(), n)
    for base in (bool, int, float, str, complex, bytes):
        if isinstance(x, base):
            return base(x)
    if isinstance(x, tuple):
        return tuple(normalize(v, n) for v in x)
    if isinstance(x, list):
        return [normalize(v, n) for v in x]
    if isinstance(x, frozenset):
        return frozenset(normalize(v, n) for v in x)
    if isinstance(x, set):
        return {normalize(v, n) for v in x}
    if isinstance(x, dict):
        return {normalize(k, n): normalize(v, n) for k, v in dict.items(x)}
    return x


def encode_result(x: object) -> str:
    """One call's return value as wire text: :func:`normalize`, then encode; iterators and
    dict views get their result-only tags. Raises WireError."""
    t = type(x)
    name = t.__name__
    if name == "dict_keys":
        return to_text(["dk", [encode(normalize(v), opaque=True) for v in x]])
    if name == "dict_values":
        return to_text(["dv", [encode(normalize(v), opaque=True) for v in x]])
    if name == "dict_items":
        pairs = [[encode(normalize(k), opaque=True), encode(normalize(v), opaque=True)]
                 for k, v in x]
        return to_text(["di", pairs])
    if hasattr(t, "__next__") and hasattr(t, "__iter__"):
        items = []
        for v in x:
            items.append(encode(normalize(v), opaque=True))
            if len(items) > MAX_ITEMS:
                raise WireError(f"more than {MAX_ITEMS} items")
        return to_text(["it", items])
    return to_text(encode(normalize(x), opaque=True))
