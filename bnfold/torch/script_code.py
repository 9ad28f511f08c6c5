"""Find file ops in a TorchScript archive's serialized code (``code/**.py``), token by token.

TorchScript code runs at ``torch.jit.load`` (a class's ``__setstate__``) and in forward. It
cannot import Python, but it can call any registered op, and some open files:
``torch.from_file(name, True, n)`` creates (or maps for writing) a file, ``torch.save`` writes one.
The code is Python syntax, read by TorchScript's own lexer, which (like Python's) skips blanks,
comments and backslash-newlines anywhere between tokens, and whose parser accepts parentheses
around a callee (``(torch.from_file)(...)``), ``ops.aten.from_file(...)`` and
``getattr(torch, "from_" "file")`` (adjacent literals concatenated, octal escapes decoded). A
regex over the text misses those; this module reads the code with Python's :mod:`tokenize`
instead and refuses the archive where

* any name token equals a forbidden name (:func:`forbidden_names`): a file op or a foreign
  namespace, whatever precedes it (``torch``, ``ops.aten``, a dot after a line continuation);
* a string literal, or a run of adjacent literals (TorchScript concatenates them), decodes to a
  forbidden name or a dotted chain with one (the argument ``getattr`` needs);
* a comment holds a forbidden word (TorchScript parses ``# type:`` comments; code that
  ``torch.jit.save`` writes has no comments at all);
* the text does not tokenize (an error token, a bad dedent, an unterminated string, bytes that
  are no UTF-8): no honest ``torch.jit.save`` writes that, and a lexer difference could hide a
  call, so the archive is treated as crafted.

Python's tokenizer never sees less code than TorchScript's: its comments end at ``\\r`` or
``\\n`` (TorchScript's only at ``\\n``), and TorchScript's strings end on their line.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from bnfold.torch.process_state import PROCESS_STATE_LOCK

__all__ = ["FILE_OPS", "FOREIGN_NAMESPACES", "ScriptFinding", "find_file_op", "forbidden_names",
           "schema_file_ops"]

#: torch ops that open files or connections: a model calling one is refused (aten ops with a
#: file-name argument in torch 2.13's schemas, see :func:`schema_file_ops`, and the distributed
#: and debugging namespaces)
FILE_OPS = ("from_file", "save", "load_tensor")
FOREIGN_NAMESPACES = ("debugprims", "c10d", "_c10d_functional", "symm_mem")

#: a string argument named for a file or a folder in an op schema ('filename', 'path', 'dir', ...)
FILE_ARGUMENT = re.compile(r"(?:^|_)(?:file|filename|fname|path|dir|directory)s?(?:_|$)", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SKIPPED = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)


def schema_file_ops() -> frozenset[tuple[str, str]]:
    """``(namespace, name)`` of every op registered in this torch whose schema has a string
    argument named for a file or a folder (``aten::from_file(str filename, ...)``)."""
    found = set()
    for schema in torch._C._jit_get_all_schemas():
        if any("str" in str(arg.type) and FILE_ARGUMENT.search(arg.name) for arg in schema.arguments):
            namespace, _, name = schema.name.partition("::")
            found.add((namespace, name))
    return frozenset(found)


@lru_cache(maxsize=1)
def forbidden_names() -> frozenset[str]:
    """The names no TorchScript code may use: :data:`FILE_OPS`, :data:`FOREIGN_NAMESPACES`, and
    the op names :func:`schema_file_ops` finds in the torch that runs (a torch upgrade adding one
    is covered before the list is updated)."""
    return frozenset(FILE_OPS) | frozenset(FOREIGN_NAMESPACES) | {name for _, name in schema_file_ops()}


@dataclass(frozen=True)
class ScriptFinding:
    """Why the code member ``member`` is refused: a forbidden ``name`` at ``line``, or code that
    does not tokenize (``name`` empty, ``why`` the tokenizer's reason)."""

    member: str
    line: int
    name: str = ""
    why: str = ""

    def describe(self) -> str:
        if self.name:
            return (f"TorchScript code '{self.member}' (line {self.line}) uses '{self.name}', an op that opens "
                    "files or connections (from_file, save, ...); it runs when the archive loads or the model "
                    "runs")
        return (f"TorchScript code '{self.member}' (line {self.line}) is not valid TorchScript source "
                f"({self.why}); torch.jit.save never writes that, so the archive is corrupt or crafted to hide "
                "a call")


def _string_value(text: str) -> str | None:
    """A literal's decoded value (octal and other escapes as TorchScript decodes them)."""
    try:
        with PROCESS_STATE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an invalid escape: DeprecationWarning/SyntaxWarning
            value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def _names_a_forbidden(value: str, names: frozenset[str]) -> str | None:
    parts = value.strip().split(".")
    return next((p.strip() for p in parts if p.strip() in names), None)


def _tokens(text: str) -> Iterator[tokenize.TokenInfo]:
    return tokenize.generate_tokens(io.StringIO(text).readline)


def _scan(tokens: Iterable[tokenize.TokenInfo], member: str, names: frozenset[str]) -> ScriptFinding | None:
    run: list[tokenize.TokenInfo] = []  # adjacent string literals, concatenated by TorchScript

    def end_run() -> ScriptFinding | None:
        if not run:
            return None
        values = [_string_value(t.string) for t in run]
        joined = "".join(v for v in values if v is not None)
        first = run[0].start[0]
        run.clear()
        hit = _names_a_forbidden(joined, names)
        return ScriptFinding(member, first, hit) if hit else None

    for tok in tokens:
        if tok.type == tokenize.STRING:
            run.append(tok)
            continue
        if tok.type in (tokenize.NL, tokenize.COMMENT) and run:
            pass  # literals on the next line inside brackets still concatenate
        else:
            found = end_run()
            if found is not None:
                return found
        if tok.type == tokenize.ERRORTOKEN:
            return ScriptFinding(member, tok.start[0], why=f"unexpected {tok.string!r}")
        if tok.type == tokenize.NAME and tok.string in names:
            return ScriptFinding(member, tok.start[0], tok.string)
        if tok.type == tokenize.COMMENT:
            word = next((w for w in _WORD.findall(tok.string) if w in names), None)
            if word is not None:
                return ScriptFinding(member, tok.start[0], word)
        elif tok.type not in _SKIPPED and tok.type not in (tokenize.OP, tokenize.NUMBER, tokenize.NAME):
            return ScriptFinding(member, tok.start[0], why=f"unexpected token {tokenize.tok_name[tok.type]}")
    return end_run()


def find_file_op(member: str, code: bytes) -> ScriptFinding | None:
    """The first forbidden use in the code member ``member`` (its bytes ``code``), a finding
    where it does not tokenize, or None where it uses no file op."""
    try:
        text = code.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ScriptFinding(member, code[:exc.start].count(b"\n") + 1, why="bytes that are not UTF-8")
    try:
        return _scan(_tokens(text), member, forbidden_names())
    except (tokenize.TokenError, SyntaxError) as exc:  # IndentationError is a SyntaxError
        line = exc.args[1][0] if isinstance(exc, tokenize.TokenError) and len(exc.args) > 1 else (
            getattr(exc, "lineno", None) or 0)
        return ScriptFinding(member, int(line), why=str(exc.args[0]) if exc.args else type(exc).__name__)
