"""Derivations: the ``Derivation`` value type and the ATerm ``.drv`` text
form (spec/store-formats.md §9, §11).

Holds ``DerivationOutput`` (one output tuple, kept as the three ATerm
strings), ``Derivation``, ``parse_derivation`` (strict, bounded) and
``print_derivation`` (byte-exact with Nix 2.8's ``unparse``).  Hashing
modulo, output paths and the output check are in ``derivation_hash``.
Pure and sans-IO; used by the worker (decoding client derivations) and by
the supervisor (registering ``.drv`` files).

Strictness: the parser accepts exactly the texts Nix itself writes, so that
``print_derivation(parse_derivation(t)) == t`` for every accepted ``t``.
Nix 2.8 is more lenient (leading commas, unsorted or duplicate entries, raw
control characters, non-hex fixed hashes, non-canonical paths); such texts
are refused with a ``DerivationError``, as is anything over the caps in
``limits``.  Strings are ``str``; a ``.drv`` given as bytes is decoded as
UTF-8 with ``surrogateescape`` so that any byte string survives a round trip
(``derivation_bytes`` encodes back the same way).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from nixwarden.shared import limits
from nixwarden.shared.errors import StoreRefusal
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.storepath import BadStorePath, StoreDir, StorePath, check_name

DRV_EXTENSION = ".drv"


class DerivationError(StoreRefusal):
    """A derivation is malformed or inconsistent (message as Nix words it)."""


def encode_text(text: str) -> bytes:
    """Bytes of a derivation string (UTF-8, ``surrogateescape``).

    Raises:
        DerivationError: ``text`` holds a lone surrogate that no byte
            string decodes to.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise DerivationError("derivation contains a string that is not a byte string") from None


class OutputKind(str, enum.Enum):
    """What an output tuple declares (spec §9.1 table)."""

    INPUT_ADDRESSED = "input-addressed"
    DEFERRED = "deferred"
    FIXED = "fixed"
    FLOATING = "floating"
    IMPURE = "impure"


class DerivationType(str, enum.Enum):
    """The kind of a whole derivation (Nix's ``BasicDerivation::type``)."""

    INPUT_ADDRESSED = "input-addressed"
    DEFERRED = "deferred"
    FIXED = "fixed"
    FLOATING = "floating"
    IMPURE = "impure"


#: Method prefix of an output's hashAlgo field, by method (spec §7).
_METHOD_PREFIX = {"flat": "", "nar": "r:", "text": "text:", "git": "git:"}
_HEX = re.compile(r"[0-9a-f]*")


def _split_hash_algo(hash_algo: str) -> tuple[str, HashAlgo]:
    """``r:sha256`` -> ("nar", SHA256); ``sha1`` -> ("flat", SHA1)."""
    method, rest = "flat", hash_algo
    for name, prefix in _METHOD_PREFIX.items():
        if prefix and hash_algo.startswith(prefix):
            method, rest = name, hash_algo[len(prefix):]
            break
    try:
        algo = HashAlgo.parse(rest)
    except ValueError as e:
        raise DerivationError(str(e)) from None
    if method == "text" and algo is not HashAlgo.SHA256:
        raise DerivationError(
            f"text content address hash should use sha256, but uses {algo.value}")
    return method, algo


def _check_verbatim(value: str, what: str) -> None:
    """Fields Nix writes unescaped cannot hold a quote or a backslash."""
    if '"' in value or "\\" in value:
        raise DerivationError(f"{what} '{value}' contains a quote or a backslash")


def _check_output_name(name: str) -> None:
    try:
        check_name(name, name)
    except BadStorePath:
        raise DerivationError(f"invalid derivation output name '{name}'") from None


@dataclass(frozen=True, slots=True)
class DerivationOutput:
    """One output tuple, kept as its ATerm fields (spec §9.1).

    ``path`` is the full store path, or None where the ATerm has ``""``;
    ``hash_algo`` is ``""`` or ``<method prefix><algo>`` (``r:sha256``);
    ``hash`` is ``""``, lower-case hex (fixed) or ``impure``.  The kind
    follows from which fields are set; inconsistent combinations raise
    ``DerivationError`` when built.
    """

    path: str | None
    hash_algo: str = ""
    hash: str = ""

    def __post_init__(self) -> None:
        if self.path is not None:
            _check_verbatim(self.path, "output path")
            if not self.path.startswith("/"):
                raise DerivationError(f"bad path '{self.path}' in derivation")
        _check_verbatim(self.hash_algo, "output hash algorithm")
        _check_verbatim(self.hash, "output hash")
        self._check_kind()

    def _check_kind(self) -> None:
        if not self.hash_algo:
            if self.hash:
                raise DerivationError(f"output hash '{self.hash}' without a hash algorithm")
            return
        _, algo = _split_hash_algo(self.hash_algo)
        if self.hash in ("", "impure"):
            if self.path is not None:
                raise DerivationError(f"content-addressed output has a path '{self.path}'")
            return
        if len(self.hash) != 2 * algo.size or not _HEX.fullmatch(self.hash):
            raise DerivationError(
                f"hash '{self.hash}' is not a base-16 {algo.value} hash")
        if self.path is None:
            raise DerivationError("fixed output has no path")

    # --- construction by kind -------------------------------------------------

    @classmethod
    def input_addressed(cls, path: str) -> DerivationOutput:
        """An output whose path was computed from the derivation."""
        return cls(path)

    @classmethod
    def deferred(cls) -> DerivationOutput:
        """An input-addressed output whose path is not known yet."""
        return cls(None)

    @classmethod
    def fixed(cls, method: str, hash: Hash, path: str) -> DerivationOutput:
        """A fixed-output (``outputHash``) output."""
        return cls(path, _METHOD_PREFIX[method] + hash.algo.value, hash.to_base16())

    @classmethod
    def floating(cls, method: str, algo: HashAlgo) -> DerivationOutput:
        """A floating content-addressed output (path known after the build)."""
        return cls(None, _METHOD_PREFIX[method] + algo.value)

    @classmethod
    def impure(cls, method: str, algo: HashAlgo) -> DerivationOutput:
        """An impure output (experimental ``impure-derivations``)."""
        return cls(None, _METHOD_PREFIX[method] + algo.value, "impure")

    # --- views ------------------------------------------------------------------

    @property
    def kind(self) -> OutputKind:
        """Which of the five output kinds this tuple declares."""
        if not self.hash_algo:
            return OutputKind.DEFERRED if self.path is None else OutputKind.INPUT_ADDRESSED
        if self.hash == "impure":
            return OutputKind.IMPURE
        return OutputKind.FLOATING if not self.hash else OutputKind.FIXED

    @property
    def method(self) -> str | None:
        """Ingestion method ("flat", "nar", "text", "git") of a CA output."""
        return _split_hash_algo(self.hash_algo)[0] if self.hash_algo else None

    @property
    def algo(self) -> HashAlgo | None:
        """Hash algorithm of a CA output."""
        return _split_hash_algo(self.hash_algo)[1] if self.hash_algo else None

    @property
    def content_hash(self) -> Hash | None:
        """The declared content hash of a fixed output."""
        if self.kind is not OutputKind.FIXED:
            return None
        _, algo = _split_hash_algo(self.hash_algo)
        return Hash(algo, bytes.fromhex(self.hash))


def _env_key(item: tuple[str, str]) -> bytes:
    return encode_text(item[0])


@dataclass(frozen=True)
class Derivation:
    """A derivation (spec §9).  Containers are normalised when built.

    ``outputs`` and ``env`` are re-ordered by key (env bytewise),
    ``input_drvs`` maps full ``.drv`` paths to sorted output names, and
    ``input_srcs`` is sorted.  ``name`` is the derivation name (the ``.drv``
    path's name without ``.drv``); it is not part of the ATerm.
    """

    outputs: Mapping[str, DerivationOutput]
    input_drvs: Mapping[str, tuple[str, ...]]
    input_srcs: tuple[str, ...]
    platform: str
    builder: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    name: str

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "outputs", dict(sorted(self.outputs.items())))
        setattr_(self, "input_drvs", {
            p: tuple(sorted(set(o))) for p, o in sorted(self.input_drvs.items())})
        setattr_(self, "input_srcs", tuple(sorted(set(self.input_srcs))))
        setattr_(self, "args", tuple(self.args))
        setattr_(self, "env", dict(sorted(self.env.items(), key=_env_key)))
        self._check_verbatim_fields()

    def _check_verbatim_fields(self) -> None:
        if not self.name:
            raise DerivationError("derivation has an empty name")
        for name in self.outputs:
            _check_output_name(name)
        for path, outs in self.input_drvs.items():
            _check_verbatim(path, "input derivation")
            for out in outs:
                _check_output_name(out)
        for path in self.input_srcs:
            _check_verbatim(path, "input source")
        _check_verbatim(self.platform, "platform")

    def type(self) -> DerivationType:
        """The derivation's kind, as Nix's ``BasicDerivation::type``.

        Raises:
            DerivationError: no outputs, mixed kinds, more than one fixed
                output or one not named ``out``, floating outputs with
                different hash algorithms.
        """
        kinds = {o.kind for o in self.outputs.values()}
        if not kinds:
            raise DerivationError("must have at least one output")
        if len(kinds) > 1:
            raise DerivationError("can't mix derivation output types")
        kind = kinds.pop()
        if kind is OutputKind.FIXED:
            if len(self.outputs) > 1:
                raise DerivationError("only one fixed output is allowed for now")
            if "out" not in self.outputs:
                raise DerivationError('single fixed output must be named "out"')
        if kind is OutputKind.FLOATING and len({o.algo for o in self.outputs.values()}) > 1:
            raise DerivationError("all floating outputs must use the same hash type")
        return DerivationType(kind.value)

    @property
    def is_builtin(self) -> bool:
        """True for ``builtin:`` builders (``builtin:fetchurl``, ...)."""
        return self.builder.startswith("builtin:")

    @property
    def references(self) -> tuple[str, ...]:
        """What the ``.drv`` refers to: input sources and input derivations."""
        return tuple(sorted(set(self.input_srcs) | set(self.input_drvs)))


# --- printing (Nix's Derivation::unparse) ---------------------------------------

_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _esc(s: str) -> str:
    return '"' + s.translate(_ESCAPES) + '"'


def _verb_list(items: Iterator[str] | tuple[str, ...]) -> str:
    return "[" + ",".join(f'"{s}"' for s in items) + "]"


def _print_output(name: str, out: DerivationOutput, mask: bool) -> str:
    path = "" if mask or out.path is None else out.path
    return f'("{name}","{path}","{out.hash_algo}","{out.hash}")'


def print_derivation(drv: Derivation, *, mask_outputs: bool = False,
                     input_drvs_override: Mapping[str, tuple[str, ...]] | None = None) -> str:
    """The ATerm text of ``drv``, byte-exact with Nix 2.8 (spec §9.1-§9.2).

    Args:
        drv: the derivation.
        mask_outputs: write every output path, and every env value whose
            key is an output name, as ``""`` (for hashing modulo, §10.1).
        input_drvs_override: written instead of ``drv.input_drvs``, in the
            given order (hashing modulo passes hex hashes, sorted).
    Returns:
        The text; ``derivation_bytes`` gives its bytes.
    """
    inputs = drv.input_drvs if input_drvs_override is None else input_drvs_override
    env = drv.env
    parts = [
        "Derive([",
        ",".join(_print_output(n, o, mask_outputs) for n, o in drv.outputs.items()),
        "],[",
        ",".join(f'("{p}",{_verb_list(o)})' for p, o in inputs.items()),
        "],", _verb_list(drv.input_srcs),
        ',"', drv.platform, '",', _esc(drv.builder),
        ",[", ",".join(_esc(a) for a in drv.args), "],[",
        ",".join(f"({_esc(k)},{_esc('' if mask_outputs and k in drv.outputs else v)})"
                 for k, v in env.items()),
        "])",
    ]
    return "".join(parts)


def derivation_bytes(drv: Derivation, **kwargs) -> bytes:
    """``print_derivation`` encoded as the ``.drv`` file's bytes.

    Raises:
        DerivationError: a string cannot be encoded (see ``encode_text``).
    """
    return encode_text(print_derivation(drv, **kwargs))


# --- parsing --------------------------------------------------------------------

_SPECIAL_ESCAPED = re.compile(r'[\\"\n\r\t]')
_SPECIAL_VERBATIM = re.compile(r'[\\"]')
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
#: A whole well-formed string body, matched in one go (the common case).
_FAST_ESCAPED = re.compile(r'"([^"\\\n\r\t]*(?:\\[\\"nrt][^"\\\n\r\t]*)*)"')
_FAST_VERBATIM = re.compile(r'"([^"\\]*)"')


def _unescape(body: str) -> str:
    """Decode a body ``_FAST_ESCAPED`` matched: every backslash run starts an escape."""
    if "\\" not in body:
        return body
    return "\\".join(
        part.replace("\\n", "\n").replace("\\r", "\r").replace("\\t", "\t")
        .replace('\\"', '"') for part in body.split("\\\\"))


class _Reader:
    """Cursor over the ATerm text; every method raises DerivationError."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise DerivationError(f"expected string '{token}'")
        self.pos += len(token)

    def string(self, escaped: bool) -> str:
        """A quoted string; ``escaped`` fields may hold Nix's five escapes."""
        m = (_FAST_ESCAPED if escaped else _FAST_VERBATIM).match(self.text, self.pos)
        if m is not None:
            self.pos = m.end()
            return _unescape(m.group(1)) if escaped else m.group(1)
        return self._string_slow(escaped)

    def _string_slow(self, escaped: bool) -> str:
        """Character by character, to name what is wrong."""
        self.expect('"')
        pattern = _SPECIAL_ESCAPED if escaped else _SPECIAL_VERBATIM
        parts, pos = [], self.pos
        while True:
            m = pattern.search(self.text, pos)
            if m is None:
                raise DerivationError("unterminated string in derivation")
            parts.append(self.text[pos:m.start()])
            char, pos = m.group(), m.end()
            if char == '"':
                self.pos = pos
                return "".join(parts)
            if char != "\\":
                raise DerivationError(f"unescaped control character {char!r} in derivation")
            if not escaped:
                raise DerivationError("backslash in an unescaped derivation field")
            if pos == len(self.text):
                raise DerivationError("unterminated string in derivation")
            decoded = _UNESCAPE.get(self.text[pos])
            if decoded is None:
                raise DerivationError(
                    f"invalid escape sequence '\\{self.text[pos]}' in derivation")
            parts.append(decoded)
            pos += 1

    def items(self, limit: int) -> Iterator[int]:
        """Iterate a list's elements; the opening ``[`` is already read."""
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return
        for n in range(limit):
            yield n
            char = self.text[self.pos:self.pos + 1]
            self.pos += 1
            if char == "]":
                return
            if char != ",":
                raise DerivationError("expected string ',' or ']'")
        raise DerivationError(f"derivation has a list of more than {limit} elements")

    def strings(self, escaped: bool) -> list[str]:
        return [self.string(escaped) for _ in self.items(limits.MAX_DRV_LIST_ITEMS)]


def _check_sorted(keys: list, what: str) -> None:
    """Nix writes sets and maps strictly ascending; anything else is refused."""
    for a, b in zip(keys, keys[1:]):
        if not a < b:
            raise DerivationError(f"{what} in derivation are not sorted or not unique")


class _Parser:
    """Parses one ATerm derivation (spec §9) under a store directory."""

    def __init__(self, text: str, store_dir: StoreDir):
        self.r = _Reader(text)
        self.store_dir = store_dir

    def path(self, value: str, drv: bool = False) -> str:
        """A full store path, canonical and inside the store."""
        try:
            sp = self.store_dir.parse(value)
        except BadStorePath:
            raise DerivationError(f"bad path '{value}' in derivation") from None
        if self.store_dir.print(sp) != value or (drv and not sp.is_derivation):
            raise DerivationError(f"bad path '{value}' in derivation")
        return value

    def output(self) -> tuple[str, DerivationOutput]:
        r = self.r
        r.expect("(")
        name = r.string(False)
        _check_output_name(name)
        fields = []
        for _ in range(3):
            r.expect(",")
            fields.append(r.string(False))
        r.expect(")")
        path, hash_algo, hash_ = fields
        out = DerivationOutput(self.path(path) if path else None, hash_algo, hash_)
        return name, out

    def input_drv(self) -> tuple[str, tuple[str, ...]]:
        r = self.r
        r.expect("(")
        path = self.path(r.string(False), drv=True)
        r.expect(",[")
        outs = r.strings(False)
        _check_sorted(outs, "input derivation outputs")
        r.expect(")")
        return path, tuple(outs)

    def env_entry(self) -> tuple[str, str]:
        r = self.r
        r.expect("(")
        key = r.string(True)
        r.expect(",")
        value = r.string(True)
        r.expect(")")
        return key, value

    def derivation(self, name: str) -> Derivation:
        r = self.r
        r.expect("Derive([")
        outputs = [self.output() for _ in r.items(limits.MAX_DRV_OUTPUTS)]
        _check_sorted([n for n, _ in outputs], "output names")
        r.expect(",[")
        inputs = [self.input_drv() for _ in r.items(limits.MAX_DRV_LIST_ITEMS)]
        _check_sorted([p for p, _ in inputs], "input derivations")
        r.expect(",[")
        srcs = [self.path(p) for p in r.strings(False)]
        _check_sorted(srcs, "input sources")
        r.expect(",")
        platform = r.string(False)
        r.expect(",")
        builder = r.string(True)
        r.expect(",[")
        args = r.strings(True)
        r.expect(",[")
        env = [self.env_entry() for _ in r.items(limits.MAX_DRV_LIST_ITEMS)]
        _check_sorted([encode_text(k) for k, _ in env], "environment variables")
        r.expect(")")
        if r.pos != len(r.text):
            raise DerivationError("unexpected data after the end of the derivation")
        return Derivation(dict(outputs), dict(inputs), tuple(srcs), platform, builder,
                          tuple(args), dict(env), name)


def _decode(text: str | bytes) -> str:
    if isinstance(text, str):
        size = len(encode_text(text))
    else:
        size = len(text)
        text = text.decode("utf-8", "surrogateescape")
    if size > limits.MAX_DRV_SIZE:
        raise DerivationError(f"derivation is larger than {limits.MAX_DRV_SIZE} bytes")
    return text


def parse_derivation(text: str | bytes, store_dir: StoreDir, name: str) -> Derivation:
    """Parse an ATerm ``.drv`` strictly (see the module docstring).

    Args:
        text: the ``.drv`` contents.
        store_dir: every path inside must be a canonical store path here.
        name: the derivation name, or the full ``.drv`` path (then the name
            is taken from it and messages name the path, as Nix's do).
            An empty name means ``env["name"]``.
    Returns:
        The derivation; ``print_derivation`` of it gives ``text`` back.
    Raises:
        DerivationError: ``error parsing derivation '<name>': <reason>``.
    """
    try:
        drv_name = _derivation_name_arg(name, store_dir)
        drv = _Parser(_decode(text), store_dir).derivation(drv_name or "?")
        return drv if drv_name else _with_env_name(drv)
    except DerivationError as e:
        raise DerivationError(f"error parsing derivation '{name}': {e}") from None


def _derivation_name_arg(name: str, store_dir: StoreDir) -> str:
    """The derivation name from ``name``, which may be a full .drv path."""
    if not name.startswith("/"):
        return name
    try:
        return derivation_name(store_dir.parse(name))
    except BadStorePath as e:
        raise DerivationError(str(e)) from None


def _with_env_name(drv: Derivation) -> Derivation:
    env_name = drv.env.get("name", "")
    if not env_name:
        raise DerivationError("derivation has no name")
    return dataclasses.replace(drv, name=env_name)


def derivation_name(drv_path: StorePath) -> str:
    """The derivation name of a ``.drv`` store path (``x-foo.drv`` -> ``foo``).

    Raises:
        DerivationError: not a ``.drv`` path.
    """
    if not drv_path.is_derivation or drv_path.name == DRV_EXTENSION:
        raise DerivationError(f"path '{drv_path}' is not a derivation")
    return drv_path.name[:-len(DRV_EXTENSION)]
