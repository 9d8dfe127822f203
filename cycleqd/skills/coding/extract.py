"""Code out of a model reply: the fenced block (or bare code) that holds the solution,
with the helpers it needs from other blocks (:func:`extract_code`), then only what a
solution needs at import time (:func:`sanitize_code`, evalplus' intent). Pure text and
``ast``; nothing here runs code."""

from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Sequence

__all__ = ["extract_code", "sanitize_code"]

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_LANGS = {"", "python", "py", "python3", "py3", "pycon", "python2"}
_CODE_START_RE = re.compile(
    r"^(?:(?:async\s+def|def|class|import|from\s+\S+\s+import)\b|@"
    r"|[A-Za-z_][A-Za-z0-9_]*\s*(?::[^=\n]+)?=(?!=))", re.MULTILINE)


#: What ``ast.parse`` raises on code it cannot take: besides SyntaxError/ValueError, deeply
#: nested input (a reply of thousands of ``-`` or ``(``) raises RecursionError/MemoryError.
_UNPARSEABLE = (SyntaxError, ValueError, RecursionError, MemoryError)


def _parse(code: str) -> ast.Module:
    """``ast.parse`` without SyntaxWarnings (e.g. invalid escapes in model code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(code)


def _parseable_prefix(code: str) -> str | None:
    """The longest prefix of whole lines of ``code`` that parses (None if none does)."""
    lines = code.rstrip().splitlines()
    for end in range(len(lines), 0, -1):
        text = "\n".join(lines[:end])
        if not text.strip():
            break
        try:
            _parse(text)
            return text + "\n"
        except _UNPARSEABLE:
            continue
    return None


def defines(code: str, name: str) -> bool:
    """Whether ``code`` has a ``def name(`` line (any indent; async too)."""
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _top_level_defs(tree: ast.Module) -> dict[str, ast.stmt]:
    return {n.name: n for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _names_used(nodes: Sequence[ast.AST]) -> set[str]:
    used: set[str] = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                used.add(sub.id)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                used.add(sub.value.id)
    return used


def _segment(src_lines: list[str], node: ast.stmt) -> str:
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(src_lines[start - 1:node.end_lineno])


def extract_code(reply: str, entry_point: str | None = None) -> str:
    """Pull the solution code out of a model reply.

    Rules, in order:
    1. fenced blocks (```` ```python ````, ```` ``` ````, ```` ```py ````..., a last block
       left open by a cut-off reply included); blocks tagged with another language
       (bash, text, output...) are used only if there is no other;
    2. the first block defining ``entry_point`` (else the first block with a ``def``, else
       the first block), cut to its longest parseable prefix; imports and the helper
       functions/classes it calls that other blocks define are prepended;
    3. without fences: from the first line starting with ``def``/``class``/``import``/
       ``from .. import``/``@``/``NAME =`` to the longest parseable stretch (trailing prose
       dropped);
       a reply that is only an indented body (HumanEval-style completion) is kept as is.

    Args:
        reply: the model's text.
        entry_point: the tested function's name (improves block choice).
    Returns:
        Python source (possibly not parseable when nothing better exists; never raises).
    """
    if not isinstance(reply, str):
        return ""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(reply)]
    py = [b for lang, b in blocks if lang in _PY_LANGS] or [b for _, b in blocks]
    py = [b for b in py if b.strip()]
    if py:
        chosen = None
        if entry_point:
            chosen = next((b for b in py if defines(b, entry_point)), None)
        if chosen is None:
            chosen = next((b for b in py if re.search(r"^\s*def\s", b, re.MULTILINE)), py[0])
        code = _parseable_prefix(chosen) or chosen
        return _add_helpers(code, [b for b in py if b is not chosen])
    # no fences: bare code inside prose
    stripped = reply.strip("\n")
    first = next((ln for ln in stripped.splitlines() if ln.strip()), "")
    if first[:1] in (" ", "\t") and not first.lstrip().startswith(("def ", "async def ")):
        return stripped + "\n"  # a bare indented function body (HumanEval completion)
    m = _CODE_START_RE.search(stripped)
    if m is None:
        return _parseable_prefix(stripped) or stripped
    tail = stripped[m.start():]
    return _parseable_prefix(tail) or tail


def _add_helpers(code: str, others: Sequence[str]) -> str:
    """Prepend imports and needed top-level definitions found in other blocks."""
    try:
        tree = _parse(code)
    except _UNPARSEABLE:
        return code
    defined = set(_top_level_defs(tree))
    missing = _names_used(tree.body) - defined
    extra: list[str] = []
    for other in others:
        src = _parseable_prefix(other)
        if src is None:
            continue
        otree, olines = _parse(src), src.splitlines()
        for node in otree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                seg = _segment(olines, node)
                if seg not in code and seg not in extra:
                    extra.append(seg)
            elif (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.name in missing):
                extra.append(_segment(olines, node))
                missing.discard(node.name)
    return ("\n".join(extra) + "\n\n" + code) if extra else code


def sanitize_code(code: str, entry_point: str | None = None) -> str:
    """Keep only what a solution needs at import time: imports, function and class
    definitions, ``try`` blocks of imports, and module-level assignments whose names the
    kept definitions use. Drops demo calls, prints, asserts, loops and ``__main__`` blocks
    (the same intent as evalplus' sanitizer). Unparseable code is returned unchanged.
    """
    try:
        tree = _parse(code)
    except _UNPARSEABLE:
        return code
    lines = code.splitlines()
    defs = [n for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    used = _names_used(defs)
    keep: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                             ast.ClassDef)) or isinstance(node, ast.Try) and all(isinstance(s, (ast.Import, ast.ImportFrom))
                                               for s in node.body):
            keep.append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for tg in targets for t in ast.walk(tg) if isinstance(t, ast.Name)}
            if names & used:
                keep.append(node)
    if not keep:
        return code
    return "\n\n".join(_segment(lines, n) for n in keep) + "\n"
