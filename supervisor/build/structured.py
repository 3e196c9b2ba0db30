"""Structured attributes (``__structuredAttrs``): ``.attrs.json`` and
``.attrs.sh`` byte-exact with Nix 2.8 (spec/local-store.md §8.3).

Holds the JSON reading and printing rules of the nlohmann library Nix 2.8
uses (``parse_json``, ``dump_json``), ``prepare_structured_attrs`` (Nix's
``ParsedDerivation::prepareStructuredAttrs``: ``outputs`` and
``exportReferencesGraph`` data), ``attrs_sh`` (``writeStructuredAttrsShell``)
and ``attrs_json`` / ``structured_files`` (what ``writeStructuredAttrs``
writes).  Pure; run by the supervisor's build code in the session that
starts a build.

Trust: ``__json`` is client-supplied text of up to ``MAX_DRV_SIZE`` bytes.
It must be UTF-8 JSON with finite numbers and no lone surrogates, as
nlohmann requires; nesting deeper than Python's recursion limit is
refused (Nix would accept it).  The shell rendering quotes every string
with ``'...'`` and only emits top-level names matching
``[A-Za-z_][A-Za-z0-9_]*``, so a value can never become shell code.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Collection, Mapping
from decimal import Decimal
from typing import Any

from nixwarden.shared.derivation import Derivation, DerivationError, encode_text
from nixwarden.shared.storepath import StoreDir
from nixwarden.supervisor.build import BuildSetupError
from nixwarden.supervisor.build.placeholders import hash_placeholder, input_rewrites, rewrite
from nixwarden.supervisor.build.refgraph import ClosureInfo, json_type_name, structured_graphs

_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
_SH_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- reading (nlohmann::json::parse) ---------------------------------------------

def _parse_int(text: str) -> int | float:
    """nlohmann keeps int64 and uint64 integers; larger ones become doubles."""
    if len(text) <= 21:
        value = int(text)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
    return _parse_float(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number overflow parsing '{text}'")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"syntax error: invalid literal '{name}'")


#: Deepest JSON nesting accepted.  Nix has no limit; ours keeps the
#: recursive printer well inside Python's recursion limit (real structured
#: attributes nest a handful of levels).
MAX_JSON_DEPTH = 256


def _check_value(value: Any) -> None:
    """nlohmann rejects lone surrogates written as ``\\u`` escapes; we also
    refuse nesting deeper than ``MAX_JSON_DEPTH``."""
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            todo.extend((k, depth + 1) for k in item)
            todo.extend((v, depth + 1) for v in item.values())


def parse_json(text: str) -> Any:
    """Parse JSON as nlohmann does (strict UTF-8, finite numbers, last
    duplicate key wins, integers kept exactly within int64/uint64).

    Args:
        text: a derivation string (``surrogateescape`` for raw bytes).
    Raises:
        ValueError: not JSON nlohmann would accept (the reason differs
            from nlohmann's wording), or nested too deeply.
    """
    try:
        decoded = encode_text(text).decode("utf-8")
        value = json.loads(decoded, parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_reject_constant)
        _check_value(value)
        return value
    except (UnicodeError, RecursionError, DerivationError) as e:
        raise ValueError(f"invalid JSON: {type(e).__name__}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"syntax error: {e}") from None


# --- printing (nlohmann::json::dump) ---------------------------------------------

def _exponent(e: int) -> str:
    return ("-" if e < 0 else "+") + f"{abs(e):02d}"


def _float_text(x: float) -> str:
    """nlohmann's ``to_chars``: shortest digits, fixed form for decimal
    exponents in [-3, 15], otherwise ``d.ddde+XX`` (spec: json.hpp)."""
    if not math.isfinite(x):
        return "null"
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign, digits, exp = Decimal(repr(abs(x))).as_tuple()
    text = "".join(map(str, digits)).rstrip("0")
    exp += len(digits) - len(text)
    k, n = len(text), len(text) + exp
    prefix = "-" if x < 0 else ""
    if k <= n <= 15:
        return prefix + text + "0" * (n - k) + ".0"
    if 0 < n <= 15:
        return prefix + text[:n] + "." + text[n:]
    if -4 < n <= 0:
        return prefix + "0." + "0" * -n + text
    mantissa = text if k == 1 else text[0] + "." + text[1:]
    return prefix + mantissa + "e" + _exponent(n - 1)


def dump_json(value: Any) -> str:
    """``nlohmann::json::dump()``: compact, keys in bytewise order, UTF-8
    kept, control characters escaped, doubles printed as ``_float_text``."""
    parts: list[str] = []
    _dump(value, parts.append)
    return "".join(parts)


def _dump(value: Any, out: Callable[[str], None]) -> None:
    if isinstance(value, dict):
        out("{")
        for i, key in enumerate(sorted(value)):
            out("," if i else "")
            out(json.dumps(key, ensure_ascii=False) + ":")
            _dump(value[key], out)
        out("}")
    elif isinstance(value, list):
        out("[")
        for i, item in enumerate(value):
            out("," if i else "")
            _dump(item, out)
        out("]")
    elif isinstance(value, float):
        out(_float_text(value))
    else:  # None, bool, int, str
        out(json.dumps(value, ensure_ascii=False))


# --- .attrs.sh (writeStructuredAttrsShell) --------------------------------------

def shell_escape(text: str) -> str:
    """Nix's ``shellEscape``: ``'...'`` with ``'`` written as ``'\\''``."""
    return "'" + text.replace("'", "'\\''") + "'"


def _to_float32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _c_int(value: int | float) -> int:
    """``static_cast<int>`` on x86-64: wrap integers, truncate doubles,
    INT_MIN for doubles out of range."""
    if isinstance(value, float):
        value = math.trunc(value) if abs(value) < 2**31 else -(2**31)
    return (value + 2**31) % 2**32 - 2**31


def _number_text(value: int | float) -> str | None:
    """A number is written as an ``int`` when its ``float`` value is whole."""
    f = _to_float32(float(value))
    if math.isinf(f) or math.ceil(f) == f:
        return str(_c_int(value))
    return None


def _simple(value: Any) -> str | None:
    """Shell text of a string, number, null or Boolean; None otherwise."""
    if isinstance(value, str):
        return shell_escape(value)
    if isinstance(value, bool):
        return "1" if value else ""
    if isinstance(value, (int, float)):
        return _number_text(value)
    if value is None:
        return "''"
    return None


def _compound(value: Any) -> str | None:
    """``declare -a``/``-A`` body of a flat array/object; None if nested."""
    if isinstance(value, list):
        items = [_simple(v) for v in value]
        return None if None in items else "".join(f"{s} " for s in items)
    if isinstance(value, dict):
        pairs = [(shell_escape(k), _simple(value[k])) for k in sorted(value)]
        return None if any(s is None for _, s in pairs) else "".join(
            f"[{k}]={s} " for k, s in pairs)
    return None


def attrs_sh(attrs: Mapping[str, Any]) -> str:
    """``.attrs.sh`` text for a structured-attrs object (before rewriting).

    Strings, numbers with a whole ``float`` value, null and Booleans become
    ``declare name=...``; arrays and objects of only those become
    ``declare -a``/``declare -A``; everything else, and names that are not
    shell variable names, are skipped.
    """
    lines = []
    for key in sorted(attrs):
        if not _SH_VAR.fullmatch(key):
            continue
        value = attrs[key]
        simple = _simple(value)
        if simple is not None:
            lines.append(f"declare {key}={simple}\n")
            continue
        body = _compound(value)
        if body is not None:
            flag = "-a" if isinstance(value, list) else "-A"
            lines.append(f"declare {flag} {key}=({body})\n")
    return "".join(lines)


# --- the files a structured build gets (prepareStructuredAttrs, writeStructuredAttrs)

def is_structured(drv: Derivation) -> bool:
    """True if the derivation has structured attributes (``__json`` in env)."""
    return "__json" in drv.env


def drv_label(drv: Derivation, drv_path: str | None) -> str:
    """How Nix names the derivation in messages (the ``.drv`` base name)."""
    return drv_path.rsplit("/", 1)[-1] if drv_path else f"{drv.name}.drv"


def structured_attrs(drv: Derivation, drv_path: str | None = None) -> dict[str, Any] | None:
    """The parsed ``__json`` object, or None for a non-structured derivation.

    Raises:
        BuildSetupError: ``cannot process __json attribute of '<drv>': ...``,
            or a ``__json`` that is not an object (null counts as empty).
    """
    if not is_structured(drv):
        return None
    try:
        attrs = parse_json(drv.env["__json"])
    except ValueError as e:
        raise BuildSetupError(
            f"cannot process __json attribute of '{drv_label(drv, drv_path)}': {e}") from None
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise BuildSetupError(
            f"[json.exception.type_error.305] cannot use operator[] with a string "
            f"argument with {json_type_name(attrs)}")
    return attrs


def prepare_structured_attrs(drv: Derivation, *, store_dir: StoreDir,
                             input_paths: Collection[str] = (),
                             closure_info: ClosureInfo | None = None,
                             drv_path: str | None = None,
                             attrs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The JSON object before rewriting: ``__json`` plus ``outputs``
    (output name -> placeholder) plus one key per ``exportReferencesGraph``
    entry; None for a non-structured derivation.

    ``attrs``, if given, is ``structured_attrs(drv)`` already parsed; it is
    updated in place and returned.

    Raises:
        BuildSetupError: see ``structured_attrs`` and ``structured_graphs``.
    """
    if attrs is None:
        attrs = structured_attrs(drv, drv_path)
    if attrs is None:
        return None
    attrs["outputs"] = {name: hash_placeholder(name) for name in drv.outputs}
    attrs.update(structured_graphs(attrs, store_dir=store_dir, input_paths=input_paths,
                                   closure_info=closure_info))
    return attrs


def _rewrite_outputs(attrs: dict[str, Any], rewrites: Mapping[str, str]) -> None:
    outputs = attrs["outputs"]
    if not isinstance(outputs, dict) or not all(isinstance(v, str) for v in outputs.values()):
        raise BuildSetupError("[json.exception.type_error.302] type must be object and "
                              "hold strings, as 'outputs' of structured attributes")
    attrs["outputs"] = {k: rewrite(v, rewrites) for k, v in outputs.items()}


def structured_files(drv: Derivation, rewrites: Mapping[str, str], *, store_dir: StoreDir,
                     input_paths: Collection[str] = (),
                     closure_info: ClosureInfo | None = None,
                     drv_path: str | None = None,
                     attrs: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """``(.attrs.json text, .attrs.sh text)`` as Nix 2.8 writes them.

    Args:
        drv: the derivation.
        rewrites: ``placeholders.input_rewrites`` of the build.
        store_dir, input_paths, closure_info: for ``exportReferencesGraph``
            (see ``refgraph``).
        drv_path: the ``.drv`` path, for messages.
        attrs: ``structured_attrs(drv)`` if already parsed (consumed).
    Returns:
        None for a non-structured derivation.
    Raises:
        BuildSetupError: as Nix refuses the derivation.
    """
    attrs = prepare_structured_attrs(drv, store_dir=store_dir, input_paths=input_paths,
                                     closure_info=closure_info, drv_path=drv_path,
                                     attrs=attrs)
    if attrs is None:
        return None
    _rewrite_outputs(attrs, rewrites)
    return rewrite(dump_json(attrs), rewrites), rewrite(attrs_sh(attrs), rewrites)


def attrs_json(drv: Derivation, output_paths: Mapping[str, str], *, store_dir: StoreDir,
               input_paths: Collection[str] = (), closure_info: ClosureInfo | None = None,
               drv_path: str | None = None) -> str | None:
    """The ``.attrs.json`` text for a build writing to ``output_paths``."""
    files = structured_files(drv, input_rewrites(drv, output_paths), store_dir=store_dir,
                             input_paths=input_paths, closure_info=closure_info,
                             drv_path=drv_path)
    return None if files is None else files[0]
