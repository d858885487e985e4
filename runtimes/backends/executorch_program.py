"""Read and check an ExecuTorch program (.pte) in Python, before ExecuTorch sees it.

ExecuTorch trusts its input: a random file of the right size aborts the process, a
corrupt table offset segfaults it, with or without its own flatbuffer verification
(which names bad bytes in a message its Python bindings cannot decode). So a program
is walked here first, as ExecuTorch's flatbuffer schema for programs lays it out:

    bytes 0-4    offset of the root table (Program)       bytes 4-8  identifier "ET12"
    bytes 8-40   extended header "eh00": flatbuffer size, where segments start
    flatbuffer   Program -> execution plans (methods) -> values, chains, operators, delegates
    segments     constants and delegate blobs, at offsets the flatbuffer gives

Every offset, vector and string is bounds-checked, every union tag and index (value,
operator, delegate, instruction, buffer, segment) is checked against what it indexes,
every tensor's bytes against the buffer it lives in. What is read back: each method's
planned memory, input shapes, and the constant methods (get_max_context_len, ...).
Torch-free; a problem is one ProgramError line.

Not checked: what each operator expects of its arguments (their kinds and dtypes), which
only its kernel knows. A program whose tables are sound but hand an operator a value of
the wrong kind still stops inside ExecuTorch; in a bundle, its sha256 in the manifest is
what catches such a change.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from edgekit.errors import BundleError
from edgekit.machine import check_memory
from edgekit.manifest import METHOD_TEXT_DECODER, Manifest

T = TypeVar("T")

FILE_IDENTIFIER = b"ET12"
_HEADER_MAGIC = b"eh00"
_HEADER_OFFSET = 8
_HEADER_MIN_LENGTH = 24

# Bytes per element of the ScalarType values ExecuTorch implements (its ScalarType enum).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 12: 1, 13: 1, 14: 4, 15: 2, 16: 1, 17: 1,
                 22: 2, 23: 1, 24: 1, 25: 1, 26: 1, 27: 2, 28: 4, 29: 8}
# KernelTypes union tags (the schema's order, NONE = 0).
_NULL, _INT, _BOOL, _DOUBLE, _TENSOR, _STRING, _INT_LIST, _DOUBLE_LIST, _BOOL_LIST, _TENSOR_LIST, _OPT_TENSOR_LIST = (
    range(1, 12))
# InstructionArguments union tags.
_KERNEL_CALL, _DELEGATE_CALL, _MOVE_CALL, _JUMP_FALSE_CALL, _FREE_CALL = range(1, 6)
_INLINE, _SEGMENT = 0, 1  # DataLocation of a delegate's blob
_EXTERNAL = 1  # TensorDataLocation: the weights are in the .ptd beside the program


class ProgramError(ValueError):
    """The file is not a well-formed ExecuTorch program."""


@dataclass
class MethodInfo:
    name: str
    planned_memory: list[int]  # non_const_buffer_sizes: what ExecuTorch allocates at method load
    inputs: list[tuple[int, ...] | None] = field(default_factory=list)  # tensor sizes (None: not a tensor)
    constant: Any = None  # a constant method's value: int, float, bool or a list of them


@dataclass
class ProgramInfo:
    methods: dict[str, MethodInfo]
    external: dict[str, int] = field(default_factory=dict)  # tensors in the .ptd: name -> bytes it must hold

    def constant(self, name: str) -> Any:
        method = self.methods.get(name)
        return None if method is None else method.constant


class _Buf:
    """Bounds-checked little-endian reads of a flatbuffer."""

    def __init__(self, data: memoryview, size: int) -> None:
        self.data, self.size = data, size

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos < 0 or n < 0 or pos + n > self.size:
            raise ProgramError(f"{what} at byte {pos} lies outside the program")

    def u8(self, pos: int, what: str = "a value") -> int:
        self._need(pos, 1, what)
        return self.data[pos]

    def scalar(self, fmt: str, pos: int, what: str = "a value") -> Any:
        n = struct.calcsize(fmt)
        self._need(pos, n, what)
        return struct.unpack_from("<" + fmt, self.data, pos)[0]

    def deref(self, pos: int, what: str) -> int:
        return pos + self.scalar("I", pos, what)


class _Table:
    def __init__(self, buf: _Buf, pos: int, what: str) -> None:
        self.buf, self.pos, self.what = buf, pos, what
        vtable = pos - buf.scalar("i", pos, what)
        self.vsize = buf.scalar("H", vtable, f"{what}'s field table")
        tsize = buf.scalar("H", vtable + 2, f"{what}'s field table")
        if self.vsize < 4 or self.vsize % 2:
            raise ProgramError(f"{what} has a malformed field table")
        buf._need(vtable, self.vsize, f"{what}'s field table")
        buf._need(pos, tsize, what)
        self.vtable, self.tsize = vtable, tsize

    def _field(self, slot: int, width: int) -> int | None:
        at = 4 + 2 * slot
        if at >= self.vsize:
            return None
        off = self.buf.scalar("H", self.vtable + at)
        if off == 0:
            return None
        if off + width > self.tsize:
            raise ProgramError(f"{self.what} has a field outside its table")
        return self.pos + off

    def scalar(self, slot: int, fmt: str, default: Any = 0) -> Any:
        at = self._field(slot, struct.calcsize(fmt))
        return default if at is None else self.buf.scalar(fmt, at, self.what)

    def table(self, slot: int, what: str) -> _Table | None:
        at = self._field(slot, 4)
        return None if at is None else _Table(self.buf, self.buf.deref(at, what), what)

    def vector(self, slot: int, what: str, elem: int) -> tuple[int, int]:
        """(start, length) of a vector of `elem`-byte elements; (0, 0) if absent."""
        at = self._field(slot, 4)
        if at is None:
            return 0, 0
        start = self.buf.deref(at, what)
        n = self.buf.scalar("I", start, what)
        self.buf._need(start + 4, n * elem, what)
        return start + 4, n

    def scalars(self, slot: int, fmt: str, what: str) -> list[Any]:
        start, n = self.vector(slot, what, struct.calcsize(fmt))
        return list(struct.unpack_from(f"<{n}{fmt}", self.buf.data, start)) if n else []

    def tables(self, slot: int, what: str) -> list[_Table]:
        start, n = self.vector(slot, what, 4)
        return [_Table(self.buf, self.buf.deref(start + 4 * i, what), f"{what}[{i}]") for i in range(n)]

    def string(self, slot: int, what: str) -> str | None:
        at = self._field(slot, 4)
        if at is None:
            return None
        start = self.buf.deref(at, what)
        n = self.buf.scalar("I", start, what)
        self.buf._need(start + 4, n + 1, what)
        raw = bytes(self.buf.data[start + 4:start + 4 + n])
        if self.buf.data[start + 4 + n] != 0:
            raise ProgramError(f"{what} is not a terminated string")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProgramError(f"{what} is not UTF-8 text") from None

    def union(self, slot: int, what: str, tags: int) -> tuple[int, _Table | None]:
        tag = self.scalar(slot, "B")
        if tag > tags:
            raise ProgramError(f"{what} has an unknown kind {tag}")
        value = self.table(slot + 1, what)
        if tag and value is None:
            raise ProgramError(f"{what} of kind {tag} has no value")
        return tag, value


def read_program(path: Path) -> ProgramInfo:
    """Check `path` is a well-formed ExecuTorch program and read what edgekit needs of it."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_OFFSET + 32)
        if len(head) < 8 or head[4:8] != FILE_IDENTIFIER:
            raise ProgramError(f"not an ExecuTorch program (no {FILE_IDENTIFIER.decode()} identifier)")
        flat_size, segment_base = size, 0
        if head[_HEADER_OFFSET:_HEADER_OFFSET + 4] == _HEADER_MAGIC:
            length, flat_size, segment_base = struct.unpack_from("<IQQ", head, _HEADER_OFFSET + 4)
            if length < _HEADER_MIN_LENGTH or not _HEADER_OFFSET + length <= flat_size <= size or segment_base > size:
                raise ProgramError("its header gives sizes outside the file")
            if segment_base and segment_base < flat_size:
                raise ProgramError("its segments overlap its tables")
        data = fh.read(flat_size - len(head))
    buf = _Buf(memoryview(head + data), flat_size)
    program = _Table(buf, buf.deref(0, "the program"), "the program")
    segments = [(t.scalar(0, "Q"), t.scalar(1, "Q")) for t in program.tables(4, "segments")]
    for i, (offset, length) in enumerate(segments):
        if segment_base + offset + length > size:
            raise ProgramError(f"segment {i} lies past the end of the file ({size} bytes)")
    constants = _constant_sizes(program, segments)
    inline_blobs = len(program.tables(3, "inline delegate data"))
    for t in program.tables(7, "named data"):
        t.string(0, "a named data key")
        if t.scalar(1, "I") >= len(segments):
            raise ProgramError("named data points to a segment the program does not have")
    for t in program.tables(6, "mutable data segments"):
        _subsegments(t, segments, "mutable data")
    info = ProgramInfo({})
    for i, plan in enumerate(program.tables(1, "execution plans")):
        method = _method(plan, f"method {i}", constants=constants, segments=len(segments), inline=inline_blobs,
                         external=info.external)
        info.methods[method.name] = method
    return info


DATA_IDENTIFIER = b"FT01"
_DATA_HEADER_MAGIC = b"FH01"


def read_program_data(path: Path) -> dict[str, int]:
    """Check `path` is a well-formed ExecuTorch data file (.ptd, ExecuTorch's FlatTensor: laid out as
    a program, with an "FT01" identifier and an "FH01" header); returns the bytes each
    named tensor holds."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_OFFSET + 40)
        if len(head) < _HEADER_OFFSET + 40 or head[4:8] != DATA_IDENTIFIER:
            raise ProgramError(f"not an ExecuTorch data file (no {DATA_IDENTIFIER.decode()} identifier)")
        if head[_HEADER_OFFSET:_HEADER_OFFSET + 4] != _DATA_HEADER_MAGIC:
            raise ProgramError(f"not an ExecuTorch data file (no {_DATA_HEADER_MAGIC.decode()} header)")
        _length, flat_offset, flat_size, segment_base = struct.unpack_from("<IQQQ", head, _HEADER_OFFSET + 4)
        flat_end = flat_offset + flat_size
        if not len(head) <= flat_end <= size or segment_base > size or (segment_base and segment_base < flat_end):
            raise ProgramError("its header gives sizes outside the file")
        data = head + fh.read(flat_end - len(head))
    buf = _Buf(memoryview(data), flat_end)
    root = _Table(buf, buf.deref(0, "the data file"), "the data file")
    segments = [(t.scalar(0, "Q"), t.scalar(1, "Q")) for t in root.tables(1, "segments")]
    for i, (offset, length) in enumerate(segments):
        if segment_base + offset + length > size:
            raise ProgramError(f"segment {i} lies past the end of the file ({size} bytes)")
    held = {}
    for i, t in enumerate(root.tables(2, "named tensors")):
        key = t.string(0, f"named tensor {i}'s name") or ""
        index = t.scalar(1, "I")
        if index >= len(segments):
            raise ProgramError(f"named tensor {key!r} is in a segment the file does not have")
        held[key] = segments[index][1]
    return held


def _subsegments(t: _Table, segments: list[tuple[int, int]], what: str) -> list[int]:
    """Sizes of the sub-buffers a SubsegmentOffsets cuts its segment into."""
    offsets = t.scalars(1, "Q", what)
    if not offsets:
        return []
    index = t.scalar(0, "I")
    if index >= len(segments):
        raise ProgramError(f"{what} is in segment {index}, which the program does not have")
    ends = [*offsets[1:], segments[index][1]]
    if any(b < a for a, b in zip(offsets, ends)):
        raise ProgramError(f"{what} offsets are out of order or past their segment")
    return [b - a for a, b in zip(offsets, ends)]


def _constant_sizes(program: _Table, segments: list[tuple[int, int]]) -> list[int]:
    """Bytes available to constant buffer i (index 0 is reserved for non-constants)."""
    inline = program.tables(2, "constant buffers")
    if inline:
        return [t.vector(0, "a constant buffer", 1)[1] for t in inline]
    segment = program.table(5, "the constant segment")
    return [] if segment is None else _subsegments(segment, segments, "the constant segment")


def _method(plan: _Table, what: str, *, constants: list[int], segments: int, inline: int,
            external: dict[str, int]) -> MethodInfo:
    name = plan.string(0, f"{what}'s name") or ""
    what = f"method {name!r}"
    meta = plan.table(1, f"{what}'s container metadata")
    if meta is not None:
        meta.string(0, f"{what}'s input spec")
        meta.string(1, f"{what}'s output spec")
    planned = plan.scalars(8, "q", f"{what}'s planned memory")
    if any(n < 0 for n in planned):
        raise ProgramError(f"{what} plans a negative amount of memory")
    values = plan.tables(2, f"{what}'s values")
    n = len(values)
    operators = plan.tables(6, f"{what}'s operators")
    for op in operators:
        op.string(0, f"{what}'s operator name")
        op.string(1, f"{what}'s operator overload")
    delegates = plan.tables(7, f"{what}'s delegates")
    for d in delegates:
        _delegate(d, what, segments=segments, inline=inline)
    kinds = [_value(v, f"{what} value {i}", n=n, planned=planned, constants=constants, external=external)
             for i, v in enumerate(values)]
    inputs = _indices(plan.scalars(3, "i", f"{what}'s inputs"), n, f"{what}'s inputs")
    outputs = _indices(plan.scalars(4, "i", f"{what}'s outputs"), n, f"{what}'s outputs")
    for c, chain in enumerate(plan.tables(5, f"{what}'s chains")):
        _chain(chain, f"{what} chain {c}", n=n, operators=len(operators), delegates=len(delegates))
    info = MethodInfo(name=name, planned_memory=planned,
                      inputs=[kinds[i][1] if kinds[i][0] == _TENSOR else None for i in inputs])
    if not inputs and outputs:
        info.constant = _constant_value(outputs, kinds)
    return info


def _indices(items: list[int], n: int, what: str, *, none_ok: bool = False) -> list[int]:
    for i in items:
        if not (0 <= i < n or (none_ok and i == -1)):
            raise ProgramError(f"{what} refer to value {i}; the method has {n}")
    return items


def _value(v: _Table, what: str, *, n: int, planned: list[int], constants: list[int],
           external: dict[str, int]) -> tuple[int, Any]:
    """(kind, detail): a tensor's sizes, a list's items; everything a kind points at checked."""
    kind, val = v.union(0, what, 11)
    if kind == _TENSOR:
        return kind, _tensor(val, what, planned=planned, constants=constants, external=external)
    if kind == _STRING:
        val.string(0, what)
    elif kind == _INT_LIST:
        return kind, _indices(val.scalars(0, "q", what), n, what)
    elif kind in (_TENSOR_LIST, _OPT_TENSOR_LIST):
        _indices(val.scalars(0, "i", what), n, what, none_ok=kind == _OPT_TENSOR_LIST)
    elif kind in (_DOUBLE_LIST, _BOOL_LIST):
        val.vector(0, what, 8 if kind == _DOUBLE_LIST else 1)
    elif kind in (_INT, _BOOL, _DOUBLE):
        return kind, val.scalar(0, {_INT: "q", _BOOL: "?", _DOUBLE: "d"}[kind], 0)
    return kind, None


def _tensor(t: _Table, what: str, *, planned: list[int], constants: list[int],
            external: dict[str, int]) -> tuple[int, ...]:
    scalar_type = t.scalar(0, "b")
    if scalar_type not in _SCALAR_BYTES:
        raise ProgramError(f"{what} has an unknown element type {scalar_type}")
    sizes = tuple(t.scalars(2, "i", what))
    if any(s < 0 for s in sizes):
        raise ProgramError(f"{what} has a negative size")
    dim_order = t.scalars(3, "B", what)
    if sorted(dim_order) != list(range(len(sizes))):
        raise ProgramError(f"{what}'s dim order does not match its {len(sizes)} dims")
    nbytes = math.prod(sizes) * _SCALAR_BYTES[scalar_type]
    allocation = t.table(6, what)
    extra = t.table(9, what)
    is_external = False
    if extra is not None:
        name = extra.string(1, what)
        is_external = extra.scalar(2, "b") == _EXTERNAL
        if is_external:
            if not name:
                raise ProgramError(f"{what} is stored outside the program but has no name")
            external[name] = max(external.get(name, 0), nbytes)
    if allocation is not None:
        memory_id = allocation.scalar(0, "I")
        offset = allocation.scalar(1, "I") | allocation.scalar(2, "I") << 32
        if not 0 < memory_id < len(planned) or offset + nbytes > planned[memory_id]:
            raise ProgramError(f"{what} lies outside the memory its method plans")
    buffer = t.scalar(5, "I")
    if buffer and not is_external and allocation is None and (buffer >= len(constants) or nbytes > constants[buffer]):
        raise ProgramError(f"{what} is larger than its constant data, or has none")
    return sizes


def _delegate(d: _Table, what: str, *, segments: int, inline: int) -> None:
    d.string(0, f"{what}'s delegate id")
    processed = d.table(1, f"{what}'s delegate data")
    if processed is None:
        raise ProgramError(f"{what} has a delegate without data")
    location, index = processed.scalar(0, "b"), processed.scalar(1, "I")
    if location not in (_INLINE, _SEGMENT) or index >= (inline if location == _INLINE else segments):
        raise ProgramError(f"{what} has a delegate whose data the program does not have")
    for spec in d.tables(2, f"{what}'s compile specs"):
        spec.string(0, f"{what}'s compile spec key")
        spec.vector(1, f"{what}'s compile spec value", 1)


def _chain(chain: _Table, what: str, *, n: int, operators: int, delegates: int) -> None:
    _indices(chain.scalars(0, "i", what), n, f"{what}'s inputs")
    _indices(chain.scalars(1, "i", what), n, f"{what}'s outputs")
    instructions = chain.tables(2, f"{what}'s instructions")
    for k, instruction in enumerate(instructions):
        where = f"{what} instruction {k}"
        kind, args = instruction.union(0, where, 5)
        if kind == 0:
            raise ProgramError(f"{where} is empty")
        if kind in (_KERNEL_CALL, _DELEGATE_CALL):
            index, limit = args.scalar(0, "i"), operators if kind == _KERNEL_CALL else delegates
            if not 0 <= index < limit:
                raise ProgramError(f"{where} calls {'operator' if kind == _KERNEL_CALL else 'delegate'} {index}; "
                                   f"the method has {limit}")
            _indices(args.scalars(1, "i", where), n, f"{where}'s arguments")
        elif kind == _MOVE_CALL:
            _indices([args.scalar(0, "i"), args.scalar(1, "i")], n, where)
        elif kind == _JUMP_FALSE_CALL:
            _indices([args.scalar(0, "i")], n, where)
            if not 0 <= args.scalar(1, "i") <= len(instructions):
                raise ProgramError(f"{where} jumps outside its chain")
        else:
            _indices([args.scalar(0, "i")], n, where)
    for frames in chain.tables(3, f"{what}'s stack trace"):
        for frame in frames.tables(0, f"{what}'s stack frames"):
            for slot in (0, 2, 3):
                frame.string(slot, f"{what}'s stack frame")


def _constant_value(outputs: list[int], kinds: list[tuple[int, Any]]) -> Any:
    """What a constant method (no inputs) returns: one scalar, or a list for several outputs."""
    out = []
    for i in outputs:
        kind, detail = kinds[i]
        if kind not in (_INT, _BOOL, _DOUBLE):
            return None
        out.append(detail)
    return out[0] if len(out) == 1 else out


# --- the program against its manifest -----------------------------------------------------


def check_exported_files(root: Path, manifest: Manifest) -> tuple[int, str] | None:
    """The program agrees with the manifest (methods, input shapes, data file, chunk size) and
    fits this machine; returns (the context it was exported for, where that is written)."""
    name = manifest.extra.get("program") or manifest.method(METHOD_TEXT_DECODER).file
    program = _read(read_program, root, name, "ExecuTorch program")
    for method in manifest.methods:
        if method.file == name:
            _check_method(program, method, name)
    _check_program_data(root, manifest, program, name)
    planned = sum(sum(m.planned_memory[1:]) for m in program.methods.values())  # [0] is the constants' slot
    check_memory(f"{name}'s planned memory", planned, error=BundleError)
    seq_len = program.constant("get_max_seq_len")
    for where, value in (("extra.max_seq_len", manifest.extra.get("max_seq_len")),
                         (f"methods.{METHOD_TEXT_DECODER}.extra.max_seq_len",
                          manifest.method(METHOD_TEXT_DECODER).extra.get("max_seq_len"))):
        if value is not None and isinstance(seq_len, int) and value > seq_len:
            raise BundleError(f"bundle manifest key '{where}' is {value}, but {name} takes at most {seq_len} "
                              "tokens per call (get_max_seq_len)")
    context = program.constant("get_max_context_len")
    if not isinstance(context, int) or isinstance(context, bool):
        raise BundleError(f"bundle file {name} has no get_max_context_len: it was not exported by edgekit")
    return context, f"{name} get_max_context_len"


def _read(reader: Callable[[Path], T], root: Path, name: str, what: str) -> T:
    try:
        return reader(root / name)
    except ProgramError as exc:
        raise BundleError(f"bundle file {name} is not a valid {what}: {exc}") from None
    except OSError as exc:
        raise BundleError(f"bundle file {name} cannot be read: {exc.strerror or exc}") from None


def _check_method(program: ProgramInfo, method: Any, name: str) -> None:
    found = program.methods.get(method.name)
    if found is None:
        raise BundleError(f"bundle manifest lists method {method.name}, which {name} does not have")
    if len(found.inputs) != len(method.inputs):
        raise BundleError(f"bundle manifest gives method {method.name} {len(method.inputs)} inputs; "
                          f"{name} has {len(found.inputs)}")
    for spec, sizes in zip(method.inputs, found.inputs):
        if sizes is None:
            continue
        static = [(d, s) for d, s in zip(spec.shape, sizes) if isinstance(d, int)]
        if len(spec.shape) != len(sizes) or any(d != s for d, s in static):
            raise BundleError(f"bundle manifest gives {method.name} input {spec.name} shape {list(spec.shape)}; "
                              f"{name} has {list(sizes)}")


def _check_program_data(root: Path, manifest: Manifest, program: ProgramInfo, name: str) -> None:
    data_name = manifest.extra.get("program_data")
    if not program.external:
        return
    if not data_name:
        raise BundleError(f"{name} keeps its weights in a data file, and the manifest names none (extra.program_data)")
    held = _read(read_program_data, root, data_name, "ExecuTorch data file")
    for tensor, nbytes in program.external.items():
        if held.get(tensor, -1) < nbytes:
            raise BundleError(f"bundle file {data_name} lacks weight {tensor!r} ({nbytes} bytes) that {name} reads")
