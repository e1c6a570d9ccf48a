"""The headers as Python reads them, so that the bindings cannot drift from the C: the constants
of `inferlab.h`, the prototypes of `api.h`, each call's arguments checked against its prototype, and
the decode tape's calls written from those prototypes."""
from __future__ import annotations

import ctypes
import functools
import re

import torch

from inferlab.kernels.builder import ROOT


def _constants() -> dict[str, int]:
    """`#define IL_NAME value` lines of inferlab.h, values evaluated in order (they may use earlier ones)."""
    consts: dict[str, int] = {}
    text = (ROOT / "inferlab.h").read_text()
    for name, expr in re.findall(r"^#define (IL_\w+) ([^/\n]+?)\s*(?:/\*.*)?$", text, re.M):
        if re.fullmatch(r"[\w\s()+*-]+", expr) and not name.startswith("IL_CAT") and name != "IL":
            consts[name] = int(eval(expr, {"__builtins__": {}}, dict(consts)))  # noqa: S307 - our own header
    return consts


C = _constants()
DTYPE_CODES = {torch.float32: C["IL_F32"], torch.bfloat16: C["IL_BF16"]}
WEIGHT_CODES = frozenset(v for k, v in C.items() if k.startswith("IL_W_"))
_CTYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}


@functools.cache
def prototypes() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """name -> (return type, [(C type, parameter name)]) for every entry point in api.h."""
    text = re.sub(r"/\*.*?\*/", "", (ROOT / "api.h").read_text(), flags=re.S)
    protos = {}
    for ret, name, params in re.findall(r"(\w+) IL\((\w+)\)\(([^)]*)\);", text):
        if ret not in ("int", "void"):
            raise ValueError(f"api.h: {name} returns {ret}; an entry point returns int (a status) or void")
        parsed = []
        for p in " ".join(params.split()).split(", "):
            ctype, pname = re.fullmatch(r"(.+?)\s*(\w+)", p).groups()
            ctype = ctype.replace(" *", "*")
            if not ctype.endswith("*") and ctype not in _CTYPES:
                raise ValueError(f"api.h: {name}'s parameter {pname} is a {ctype}; the bindings take "
                                 f"{', '.join(_CTYPES)} and pointers")
            parsed.append((ctype, pname))
        protos[name] = (ret, parsed)
    if len(protos) != text.count(" IL("):  # a declaration the pattern above does not read
        raise ValueError(f"api.h: {text.count(' IL(')} entry points declared, {len(protos)} read: write each as "
                         "`int IL(name)(type name, ..., int num_threads);`")
    return protos


@functools.cache
def tape_ops() -> dict[str, int]:
    """Entry point -> its tape op code: every entry point in api.h's order whose arguments a tape entry
    holds, so a new op needs nothing for a tape to replay it. Not the tape itself, nor the two that
    return a value where a tape reads a status."""
    names = [n for n, (_, params) in prototypes().items()
             if n not in ("tape_run", "x16_products", "cpu_features") and len(params) <= C["IL_TAPE_MAX_ARGS"]]
    return {name: code for code, name in enumerate(names, start=1)}


def tape_calls() -> str:
    """generic/tape.c's calls, one `case` per tape op, each argument read as its prototype's type
    (P: a pointer, I: an int, L: an int64_t, F: a float): written into the build by builder.py."""
    read = {"int": "I", "int64_t": "L", "float": "F"}
    lines = ["/* Written by inferlab/kernels/header.py (tape_calls) from api.h, for generic/tape.c. */",
             "#define IL_TAPE_CALLS \\"]
    for name, code in tape_ops().items():
        ret, params = prototypes()[name]
        args = ", ".join(f"{'P' if ctype.endswith('*') else read[ctype]}({i})" for i, (ctype, _) in enumerate(params))
        call = f"((__typeof__({name}_generic) *)fn)({args})"
        lines.append(f"    case {code}: {'status = ' if ret == 'int' else ''}{call}; break; \\")
    lines[-1] = lines[-1].removesuffix(" \\")  # the macro's last line: a backslash there joins the file's end
    return "\n".join(lines) + "\n"


def _ctype(ctype: str):
    return ctypes.c_void_p if ctype.endswith("*") else _CTYPES[ctype]


@functools.cache
def _pointers(name: str) -> tuple[bool, ...]:
    """Which of an entry point's arguments (all but num_threads) are pointers, by api.h."""
    return tuple(ctype.endswith("*") for ctype, _ in prototypes()[name][1][:-1])


def check_args(name: str, args: tuple) -> None:
    """A call's arguments against the prototype, before C sees them: ctypes takes extra arguments
    silently (one more became num_threads) and a tensor for an int as its address (a crash)."""
    pointers = _pointers(name)
    if len(args) != len(pointers):
        raise TypeError(f"kernel {name} takes {len(pointers)} arguments (num_threads is added), got {len(args)}")
    for i, (a, pointer) in enumerate(zip(args, pointers)):
        if isinstance(a, torch.Tensor) != pointer and not (pointer and a is None):
            param = prototypes()[name][1][i]
            raise TypeError(f"kernel {name}: {' '.join(param)} takes {'a tensor or None' if pointer else 'a number'}"
                            f", got {type(a).__name__}")
    at = _wtype_at(name)
    if at is not None and args[at] not in WEIGHT_CODES:  # a block size of 0 in C: a division by it
        raise ValueError(f"kernel {name}: weight type {args[at]} is none of inferlab.h's IL_W_*")


@functools.cache
def _wtype_at(name: str) -> int | None:
    return next((i for i, (_, param) in enumerate(prototypes()[name][1]) if param == "wtype"), None)
