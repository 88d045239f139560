"""The collectives of a compiled XLA program, from its HLO text (`compiled.as_text()`), with their bytes.

Each collective instruction (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute;
the asynchronous `-start` forms counted once, their `-done` halves not at all) is counted as many times
as its computation runs per call of the program: the entry once, a while loop's body and condition
times the loop's trip count (the `known_trip_count` XLA writes into the while's backend_config, else
the integer constant the loop condition compares against), nested loops multiplied, and computations
called from fusions, conditionals and async wrappers as often as their caller.

The size of one collective is its result (the gathered array of an all-gather, the block a
collective-permute moves, the array of an all-reduce), for a reduce-scatter its unreduced input.
`ici_bytes` is the traffic of one chip as the roofline charges it: the size once, twice for an
all-reduce (a reduce-scatter then an all-gather), an upper bound on the (n - 1) / n share a ring moves.
"""

from __future__ import annotations

import collections
import dataclasses
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
    "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_CALLS = re.compile(
    r"\b(body|condition|calls|to_apply|branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)


def array_bytes(text: str) -> list[int]:
    """Bytes of each array shape written in `text` (e.g. "bf16[4,8]{1,0}" -> [64])."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(int(n * _DTYPE_BYTES[dtype]))
    return out


@dataclasses.dataclass
class Collective:
    kind: str
    name: str
    computation: str
    bytes: int  # one execution
    count: int  # executions per program call
    source: str = ""  # the JAX operation it came from (the HLO's op_name metadata)


def _parse(hlo: str):
    """{computation: [(name, shape, opcode, rest)]} and the entry's name."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation's header
            words = line.split()
            is_entry = words[0] == "ENTRY"
            current = words[1 if is_entry else 0].lstrip("%")
            comps[current] = []
            entry = current if is_entry else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _INSTRUCTION.match(line)):
            comps[current].append(m.groups())
    return comps, entry


def _trip_count(rest: str, condition: list) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    if m:
        return int(m.group(1))
    constants = [int(c) for _, shape, op, r in condition if op == "constant"
                 for c in re.findall(r"^(-?\d+)\)", r) if re.match(r"^[su](32|64)\[\]", shape)]  # fmt: skip
    return max(constants) if constants else 1


def collectives(hlo: str) -> list[Collective]:
    """Every collective instruction of the module with its size and executions per call."""
    comps, entry = _parse(hlo)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    times = collections.Counter({entry: 1})
    order, seen = [entry], {entry}
    # Callers before callees: HLO text lists callees first, so walk the call graph from the entry.
    i = 0
    while i < len(order):
        comp = order[i]
        i += 1
        for _, _, op, rest in comps.get(comp, []):
            calls = dict((k, v) for k, v in _CALLS.findall(rest))
            trips = 1
            if op == "while" and "condition" in calls:
                trips = _trip_count(rest, comps.get(calls["condition"].lstrip("%"), []))
            for key, value in _CALLS.findall(rest):
                for callee in re.findall(r"%?([\w.\-]+)", value.strip("{}")):
                    if callee not in comps:
                        continue
                    times[callee] += times[comp] * (trips if key in ("body", "condition") else 1)
                    if callee not in seen:
                        seen.add(callee)
                        order.append(callee)
    out = []
    for comp in order:
        shapes = {name: shape for name, shape, _, _ in comps.get(comp, [])}
        for name, shape, op, rest in comps.get(comp, []):
            kind = op.removesuffix("-start")
            if kind not in KINDS or op.endswith("-done"):
                continue
            # The result is what moves (the gathered array, the permuted block; an async `-start`'s
            # tuple holds its buffers), except for a reduce-scatter, whose unreduced input is larger.
            # Compiled HLO names operands (`reduce-scatter(%x)`); their shapes are on their own lines.
            size = max(array_bytes(shape) + [0])
            if kind == "reduce-scatter":
                operands = rest.split(")", 1)[0]
                names = re.findall(r"%([\w.\-]+)", operands)
                size = max(
                    [size, *array_bytes(operands), *array_bytes(" ".join(shapes.get(o, "") for o in names))]
                )
            src = re.search(r'op_name="([^"]*)"', rest)
            out.append(Collective(kind, name, comp, size, times[comp], src.group(1) if src else ""))
    return out


def top(hlo: str, n: int = 10) -> list[dict]:
    """The `n` collectives moving the most bytes per call, with their source operation."""
    rows = [{"kind": c.kind, "count": c.count, "GB": c.bytes * c.count / 1e9, "source": c.source[-120:]}
            for c in collectives(hlo)]  # fmt: skip
    return sorted(rows, key=lambda r: -r["GB"])[:n]


def summary(hlo: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": executions per call, "bytes": total size, "ici_bytes": roofline traffic}}."""
    out = {k: {"count": 0, "bytes": 0, "ici_bytes": 0} for k in KINDS}
    for c in collectives(hlo):
        row = out[c.kind]
        row["count"] += c.count
        row["bytes"] += c.bytes * c.count
        row["ici_bytes"] += c.bytes * c.count * (2 if c.kind == "all-reduce" else 1)
    return out
