"""Static inspection of an uploaded checkpoint before anything loads it: which globals every pickle member
imports and what it would call, as findings with a severity and the byte offset of the opcode.

Nothing here unpickles: ``pickletools.genops`` only decodes opcodes, and a small stack model follows which
global each REDUCE/NEWOBJ/INST/OBJ/BUILD would apply to. One pass, each stack item pushed and popped once,
so the time is linear in the pickle's size, which ``CheckpointLimits.max_pickle_bytes`` caps. The loaders
still decide what may load; a ``high`` finding makes the upload refused before they run.
"""

from __future__ import annotations

import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.models.checkpoint.archive import open_archive, read_record
from core.models.checkpoint.errors import CheckpointError, CheckpointLimits, check_global_name
from core.models.checkpoint.pickle_budget import PickleBudget
from core.models.checkpoint.safetensors_file import SAFETENSORS_EXTENSIONS, looks_like_safetensors
from core.models.checkpoint.torch_zip import TORCH_EXTENSIONS

Severity = Literal["high", "medium", "low", "info"]



def _torch_allowed_globals() -> set[str]:
    """What ``torch.load(weights_only=True)`` itself may call (tensor rebuilders, dtypes, ``torch.Size``):
    calling those runs no code of the file's choosing; empty if this torch keeps the list elsewhere."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return {str(k) for k in _get_allowed_globals()}
    except (ImportError, AttributeError, TypeError):  # a private API: fall back to our own list alone
        return set()


# globals a torch state dict names: what our loaders rebuild themselves (see backdoorbench.SafeUnpickler)
# and what torch's weights_only unpickler allows
_ALLOWED = {
    "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
} | _torch_allowed_globals()  # fmt: skip
# callables that run code, a shell, or import anything on their own: refused wherever they appear
_CODE_MODULES = {
    "os", "posix", "nt", "subprocess", "pty", "runpy", "timeit", "importlib", "code", "codeop", "shutil",
    "socket", "pickle", "_pickle", "marshal", "ctypes", "sys", "webbrowser", "commands", "popen2",
}  # fmt: skip
_CODE_BUILTINS = {
    "exec", "eval", "compile", "__import__", "getattr", "setattr", "delattr", "open", "breakpoint", "input",
    "globals", "locals", "vars",
}  # fmt: skip
_BACKDOORBENCH_KEYS = {"bd_train", "bd_test", "clean_data", "model_name"}
_CALL_OPS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ"}


@dataclass(frozen=True)
class Finding:
    """One thing the inspection saw: a rule, how serious, what, and where (pickle member, opcode offset)."""

    rule_id: str
    severity: Severity
    message: str
    member: str
    offset: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report's and the 422 body's shape: ``{rule_id, severity, message, location: {member, offset}}``."""
        return {"rule_id": self.rule_id, "severity": self.severity, "message": self.message,
                "location": {"member": self.member, "offset": self.offset}}


def is_code_callable(qualified: str) -> bool:
    """True for a global that runs code, a command or an import when called (``os.system``, ``builtins.exec``)."""
    module, _, name = qualified.rpartition(".")
    root = module.split(".")[0]
    if root in _CODE_MODULES:
        return True
    return module in ("builtins", "__builtin__") and name in _CODE_BUILTINS


def inspect_checkpoint(path: str | Path, filename: str | None = None,
                       limits: CheckpointLimits = CheckpointLimits()) -> list[Finding]:
    """Findings for the file at ``path`` (``filename`` is the client's name); raises :class:`CheckpointError`
    only for a file no loader would open either (the loader's own message says why)."""
    path = Path(path)
    name = Path(filename or path.name).name
    suffix = Path(name).suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        return [Finding("AD000", "info", "safetensors: a JSON header and raw tensors, no code", name)]
    if suffix not in TORCH_EXTENSIONS:
        return []  # load_checkpoint refuses the format with its own message
    with open(path, "rb") as f:
        if looks_like_safetensors(f.read(9)):
            return [Finding("AD000", "info", "safetensors content under a torch name: no code", name)]
    findings: list[Finding] = []
    with open_archive(path) as zf:
        for member in _pickle_members(zf):
            data = read_record(zf, member, limits.max_pickle_bytes) or b""
            findings.extend(inspect_pickle(data, member, limits))
    return findings


def high_findings(findings: list[Finding]) -> list[Finding]:
    """The findings that make an upload refused: the file would run code if a permissive loader opened it."""
    return [f for f in findings if f.severity == "high"]


def _pickle_members(zf: zipfile.ZipFile) -> list[str]:
    return [n for n in zf.namelist() if n.endswith(".pkl")]


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _Called:
    """What a call on ``callee`` returns: calling it again is a nested ``__reduce__``."""

    callee: str


def inspect_pickle(data: bytes, member: str, limits: CheckpointLimits = CheckpointLimits()) -> list[Finding]:
    """Findings for one pickle: the globals it imports and every call or BUILD applied to a global outside
    the allowlist; linear in ``len(data)``, and the list of globals is capped by ``max_pickle_globals``."""
    if len(data) > limits.max_pickle_bytes:
        raise CheckpointError(f"pickle member {member!r} is over the limit of {limits.max_pickle_bytes} bytes")
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    strings: set[str] = set()
    imported: dict[str, int] = {}
    calls: list[tuple[str, str, int]] = []  # (kind, callee or '', offset)
    # the loader's memory estimate, charged in this same pass: a pickle of millions of tiny objects is refused
    # here at once instead of being walked to its end first
    budget = PickleBudget(len(data), limits.max_pickle_memory_ratio, limits.pickle_memory_slack_bytes)
    try:
        for op, arg, pos in pickletools.genops(data):
            budget.charge(op.name, arg)
            _step(op, arg, pos or 0, stack, marks, memo, strings, imported, calls, limits, member)
    except CheckpointError:
        raise
    except (ValueError, EOFError, KeyError, IndexError, TypeError, UnicodeDecodeError, OverflowError) as e:
        return [Finding("AD900", "high", f"pickle is corrupt and cannot be inspected: {type(e).__name__}: "
                        f"{str(e)[:200]}", member)]
    backdoorbench = len(strings & _BACKDOORBENCH_KEYS) >= 2 and "model" in strings
    return _judge(imported, calls, backdoorbench, member, limits)


def _step(op: pickletools.OpcodeInfo, arg: object, pos: int, stack: list[object], marks: list[int],
          memo: dict[int, object], strings: set[str], imported: dict[str, int],
          calls: list[tuple[str, str, int]], limits: CheckpointLimits, member: str) -> None:
    name = op.name
    if isinstance(arg, str) and name not in ("GLOBAL", "INST"):
        if len(arg) <= 64:
            strings.add(arg)
        stack.append(arg)
        return
    if name in ("GLOBAL", "INST"):
        module, _, attr = str(arg).partition(" ")
        g = _Global(f"{module}.{attr}"[:200])
        _note_import(g.name, pos, imported, limits, member)
        if name == "INST":
            _pop_mark(stack, marks)
            calls.append(("INST", g.name, pos))
            stack.append(_Called(g.name))
        else:
            stack.append(g)
        return
    if name == "STACK_GLOBAL":
        attr, module = stack.pop() if stack else None, stack.pop() if stack else None
        g = _Global(f"{module}.{attr}"[:200] if isinstance(module, str) and isinstance(attr, str) else "?.?")
        _note_import(g.name, pos, imported, limits, member)
        stack.append(g)
        return
    if name == "MARK":
        marks.append(len(stack))
        return
    if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        key = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[call-overload]
        memo[key] = stack[-1] if stack else None
        return
    if name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo.get(int(arg)))  # type: ignore[call-overload]
        return
    if name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
        for _ in range(1 if name == "REDUCE" else 2 if name == "NEWOBJ" else 3):
            stack.pop() if stack else None
        callee = stack.pop() if stack else None
        stack.append(_record_call(name, callee, pos, calls))
        return
    if name == "OBJ":
        base = marks.pop() if marks else len(stack)
        items = stack[base:]
        del stack[base:]
        stack.append(_record_call("OBJ", items[0] if items else None, pos, calls))
        return
    if name == "BUILD":
        stack.pop() if stack else None
        target = stack[-1] if stack else None
        if isinstance(target, _Called):
            calls.append(("BUILD", target.callee, pos))
        return
    # every other opcode: pop what it consumes (down to the mark if it takes one), push what it makes
    before = op.stack_before
    if pickletools.markobject in before:
        _pop_mark(stack, marks)
        before = before[: before.index(pickletools.markobject)]
    for _ in before:
        stack.pop() if stack else None
    stack.extend([None] * len(op.stack_after))


def _record_call(kind: str, callee: object, pos: int, calls: list[tuple[str, str, int]]) -> _Called:
    if isinstance(callee, _Global):
        calls.append((kind, callee.name, pos))
        return _Called(callee.name)
    if isinstance(callee, _Called):
        calls.append(("NESTED", callee.callee, pos))
        return _Called(f"({callee.callee}(...))")
    calls.append((kind, "", pos))
    return _Called("?")


def _pop_mark(stack: list[object], marks: list[int]) -> None:
    base = marks.pop() if marks else 0
    del stack[base:]


def _note_import(qualified: str, pos: int, imported: dict[str, int], limits: CheckpointLimits, member: str) -> None:
    if qualified not in imported:
        check_global_name(qualified)
        if len(imported) >= limits.max_pickle_globals:
            raise CheckpointError(f"pickle member {member!r} names more than {limits.max_pickle_globals} distinct "
                                  "globals; a BackdoorBench result names a few dozen")
        imported[qualified] = pos


def _judge(imported: dict[str, int], calls: list[tuple[str, str, int]], backdoorbench: bool, member: str,
           limits: CheckpointLimits) -> list[Finding]:
    out: list[Finding] = []
    for qualified, pos in imported.items():
        if is_code_callable(qualified):
            out.append(Finding("AD101", "high", f"imports {qualified}, a callable that runs code or commands",
                               member, pos))
    flagged: set[tuple[str, str]] = set()
    for kind, callee, pos in calls:
        if kind == "NESTED":
            out.append(Finding("AD103", "high", f"calls what a call of {callee} returned (a nested __reduce__): "
                               "code chosen at load time", member, pos))
        elif not callee:
            out.append(Finding("AD104", "high", f"{kind} on something that is not a named global", member, pos))
        elif callee in _ALLOWED or callee.startswith("torch.") and callee.endswith("Storage"):
            continue
        elif (kind, callee) not in flagged and not is_code_callable(callee):
            flagged.add((kind, callee))
            if backdoorbench:
                out.append(Finding("AD201", "medium", f"{kind} of {callee}: outside the allowlist; the "
                                   "BackdoorBench loader replaces it with an inert placeholder", member, pos))
            else:
                out.append(Finding("AD102", "high", f"{kind} of {callee}, a global outside the allowlist of a "
                                   "state dict: loading would call it", member, pos))
    listed = 0
    for qualified, pos in imported.items():
        if is_code_callable(qualified):
            continue
        if listed >= limits.max_listed_globals:
            break
        listed += 1
        known = qualified in _ALLOWED or qualified.startswith("torch.") and qualified.endswith("Storage")
        out.append(Finding("AD001", "info" if known else "low", f"imports {qualified}"
                           + ("" if known else " (outside the state-dict allowlist)"), member, pos))
    return out
