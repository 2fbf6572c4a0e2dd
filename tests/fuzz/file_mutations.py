"""Deterministic mutations of input files, for the file-mutation fuzz test.

Two kinds: byte-level (bit flips, random bytes, non-UTF-8 bytes, truncation, deletion,
duplication -- what a damaged download or a wrong file gives) and structure-level (the file
parsed, one value replaced by a value of another type or out of range, a key removed or an
unknown one added, written back -- what a hand-edited or hostile file gives).  Every mutation
is a pure function of ``random.Random(seed)``, so a failing case is reproduced by its seed.
"""

from __future__ import annotations

import copy
import json
import random
import tomllib
from collections.abc import Callable
from typing import Any

# Values that each break some reader's assumption: wrong types, negative numbers, numbers past
# 32 and 64 bits, huge strings, path-like strings, deep nesting.
INTERESTING: list[Any] = [
    None, True, False, 0, -1, 1, 255, 256, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 64, -(1 << 64), 10**30,
    1.5, -0.0, "", "x", "0x10", "-1", "HLT", "[/x]", "[bold]", "../../../etc/passwd", "/etc/passwd", "\u00e9\u4e2d", "A" * 5000,
    [], [1, "a"], {}, {"k": 1}, [[[[[[[[[[]]]]]]]]]],
]


def _bit_flip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return b"\x80"
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _random_byte(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    i = rng.randrange(len(data))
    return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]


def _insert_non_utf8(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\x00", b"\xfe\xff"]) + data[i:]


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _delete_span(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 64):]


def _duplicate_span(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randint(1, 256))
    return data[:j] + data[i:j] + data[j:]


def _random_bytes(rng: random.Random, data: bytes) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 7, 512, 2048]))


def _replace_digits(rng: random.Random, data: bytes) -> bytes:
    """A number in the file made negative, huge, or not a number."""
    digits = [i for i, c in enumerate(data) if 0x30 <= c <= 0x39]
    if not digits:
        return data
    i = rng.choice(digits)
    return data[:i] + rng.choice([b"-", b"99999999999999999999999", b"1e400", b"x", b"."]) + data[i:]


BYTE_MUTATORS: list[Callable[[random.Random, bytes], bytes]] = [
    _bit_flip, _random_byte, _insert_non_utf8, _truncate, _delete_span, _duplicate_span, _random_bytes, _replace_digits,
]


# --- structured -----------------------------------------------------------------------------------
def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:20]):
            out += _paths(v, prefix + (i,))
    return out


def mutate_value(rng: random.Random, doc: Any) -> Any:
    """``doc`` (JSON-like) with one value replaced, one key removed or an unknown key added."""
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return copy.deepcopy(rng.choice(INTERESTING))
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    action = rng.randrange(6)
    if action == 0 and isinstance(parent, dict):
        del parent[last]
    elif action == 1 and isinstance(parent, dict):
        parent[rng.choice(["extra", "kind", "0", ""])] = copy.deepcopy(rng.choice(INTERESTING))
    elif action == 2 and isinstance(parent[last], str):
        parent[last] = parent[last][: rng.randrange(len(parent[last]) + 1)] + rng.choice(["", "\u0000", "%", "\\", "\""])
    else:
        parent[last] = copy.deepcopy(rng.choice(INTERESTING))
    return doc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return '"null"'  # TOML has no null


def to_toml(doc: dict[str, Any]) -> str:
    """``doc`` as TOML (inline tables and arrays: enough for mutated scenarios)."""
    return "".join(f"{json.dumps(str(k))} = {_toml_value(v)}\n" for k, v in doc.items())


def mutate_json(rng: random.Random, data: bytes) -> bytes:
    doc = json.loads(data)
    return json.dumps(mutate_value(rng, doc)).encode()


def mutate_json_lines(rng: random.Random, data: bytes) -> bytes:
    lines = data.decode().splitlines()
    i = rng.randrange(len(lines))
    lines[i] = json.dumps(mutate_value(rng, json.loads(lines[i])))
    return ("\n".join(lines) + "\n").encode()


def mutate_toml(rng: random.Random, data: bytes) -> bytes:
    doc = tomllib.loads(data.decode())
    mutated = mutate_value(rng, doc)
    return to_toml(mutated if isinstance(mutated, dict) else {"value": mutated}).encode()


STRUCTURED = {"json": mutate_json, "jsonl": mutate_json_lines, "toml": mutate_toml}


def mutate(seed: int, data: bytes, structure: str) -> tuple[str, bytes]:
    """One mutation of ``data`` (a file of ``structure`` json | jsonl | toml | bytes): its name
    and the new contents.  Half of the mutations are structure-level when the format has one."""
    rng = random.Random(seed)
    if structure in STRUCTURED and rng.random() < 0.5:
        return f"{structure}-value", STRUCTURED[structure](rng, data)
    mutator = rng.choice(BYTE_MUTATORS)
    return mutator.__name__.lstrip("_"), mutator(rng, data)
