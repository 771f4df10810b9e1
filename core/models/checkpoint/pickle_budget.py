"""An estimate, before unpickling, of the memory a pickle's objects will take, so that a small ``data.pkl``
of millions of one-byte opcodes (empty lists, dicts, strings) is refused instead of built.

Every opcode is charged a reference slot; opcodes that create an object are charged CPython's size for it
(64-bit, without counting shared small ints). Large byte and string payloads cost about their length, so a
BackdoorBench result, whose pickle is mostly image bytes, stays close to its size.
"""

from __future__ import annotations

import pickletools

from core.models.checkpoint.errors import CheckpointError

_SLOT = 8
# what creating each object costs beyond its reference slot (sys.getsizeof of the empty object, rounded up)
_OBJECT_BYTES = {
    "EMPTY_LIST": 56, "LIST": 56, "EMPTY_DICT": 64, "DICT": 64, "EMPTY_SET": 216, "FROZENSET": 216,
    "ADDITEMS": 16, "TUPLE": 40, "TUPLE1": 48, "TUPLE2": 56, "TUPLE3": 64,
    "SETITEM": 48, "SETITEMS": 48, "APPEND": 8, "APPENDS": 8,
    "BININT": 32, "BININT1": 0, "BININT2": 32, "INT": 32, "LONG": 32, "LONG1": 40, "LONG4": 40,
    "BINFLOAT": 24, "FLOAT": 24,
    "PUT": 16, "BINPUT": 16, "LONG_BINPUT": 16, "MEMOIZE": 16,
    "REDUCE": 64, "NEWOBJ": 64, "NEWOBJ_EX": 64, "OBJ": 64, "INST": 64, "BUILD": 16,
    "BINPERSID": 64, "PERSID": 64, "GLOBAL": 0, "STACK_GLOBAL": 0,
}  # fmt: skip
_PAYLOAD_OPCODES = {
    "BINUNICODE": 49, "SHORT_BINUNICODE": 49, "BINUNICODE8": 49, "UNICODE": 49, "STRING": 49,
    "BINSTRING": 49, "SHORT_BINSTRING": 49, "BINBYTES": 33, "SHORT_BINBYTES": 33, "BINBYTES8": 33,
    "BYTEARRAY8": 57,
}  # fmt: skip


class PickleBudget:
    """The running estimate for one pickle, charged opcode by opcode, so that any pass over the opcodes (this
    module's own, or the static inspection's) stops as soon as the budget is spent."""

    def __init__(self, size: int, ratio: float, slack_bytes: int) -> None:
        self.size, self.ratio, self.slack_bytes = size, ratio, slack_bytes
        self.budget = ratio * size + slack_bytes
        self.spent = 0

    def charge(self, name: str, arg: object) -> None:
        """Add what opcode ``name`` with argument ``arg`` builds; raise :class:`CheckpointError` past the budget."""
        self.spent += _SLOT + _OBJECT_BYTES.get(name, 0)
        extra = _PAYLOAD_OPCODES.get(name)
        if extra is not None and isinstance(arg, str | bytes | bytearray):
            self.spent += extra + len(arg)
        if self.spent > self.budget:
            raise CheckpointError(
                f"PyTorch checkpoint's data.pkl ({self.size} bytes) would build more than {int(self.budget)} "
                f"bytes of objects (the limit is {self.ratio:g} times its size + {self.slack_bytes} bytes): it "
                "is made of millions of tiny objects, as no state dict or BackdoorBench result is"
            )


def check_pickle_budget(data: bytes, ratio: float, slack_bytes: int) -> None:
    """Raise :class:`CheckpointError` when the objects ``data`` unpickles to would take more than
    ``ratio`` times its size plus ``slack_bytes``; stops reading as soon as the budget is spent."""
    budget = PickleBudget(len(data), ratio, slack_bytes)
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            budget.charge(opcode.name, arg)
    except CheckpointError:
        raise
    except (ValueError, EOFError, KeyError, IndexError, TypeError, UnicodeDecodeError, OverflowError) as e:
        raise CheckpointError(f"PyTorch checkpoint's data.pkl is corrupt: {type(e).__name__}: {str(e)[:200]}") from e
