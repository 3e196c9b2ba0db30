"""Hashing derivations modulo their inputs, and the paths that follow from
it (spec/store-formats.md §9.4, §10, §11; Nix 2.8 ``hashDerivationModulo``,
``staticOutputHashes``, ``checkDerivationOutputs``, ``writeDerivation``).

Pure and sans-IO: where an input ``.drv`` must be read, the caller passes a
``resolve`` function (full ``.drv`` path -> ``Derivation``) and may pass a
``cache`` dict that memoises input hashes across calls (keyed by ``.drv``
path, like Nix's ``drvHashes``).  Input derivations are walked with an
explicit stack, so deep chains cannot exhaust Python's recursion limit, and
a cycle (possible only with a lying ``resolve``) is an error.  Used by the
supervisor when it registers ``.drv`` files and checks their outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from nixwarden.shared.derivation import (
    DRV_EXTENSION, Derivation, DerivationError, DerivationType, OutputKind, encode_text,
    print_derivation)
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.storepath import BadStorePath, StoreDir, StorePath, output_path_name

Resolve = Callable[[str], Derivation]

#: What impure derivations hash to (Nix's ``impureOutputHash``).
IMPURE_OUTPUT_HASH = Hash.compute(HashAlgo.SHA256, b"impure")


@dataclass(frozen=True)
class DrvHash:
    """Result of hashing a derivation modulo (Nix's ``DrvHash``).

    ``hashes`` maps every output name to its hash; ``deferred`` is True
    when the derivation is floating CA or impure, or depends on one, so
    that its output paths are not known before inputs are built.
    """

    hashes: Mapping[str, Hash]
    deferred: bool = False

    def __getitem__(self, output: str) -> Hash:
        return self.hashes[output]


def _sha256(text: str) -> Hash:
    return Hash.compute(HashAlgo.SHA256, encode_text(text))


def fixed_output_path(drv: Derivation, store_dir: StoreDir, output: str = "out") -> StorePath:
    """The path Nix computes for a fixed output from its hash (§11.1).

    Raises:
        DerivationError: ``output`` is not a fixed output, or the name is
            not a valid store-path name.
    """
    out = drv.outputs.get(output)
    if out is None or out.kind is not OutputKind.FIXED:
        raise DerivationError(f"output '{output}' of '{drv.name}' is not a fixed output")
    try:
        return store_dir.make_fixed_output_path(
            out.method, out.content_hash, output_path_name(drv.name, output))
    except (BadStorePath, ValueError) as e:
        raise DerivationError(str(e)) from None


def _fixed_hashes(drv: Derivation, store_dir: StoreDir) -> DrvHash:
    hashes = {}
    for name, out in drv.outputs.items():
        path = store_dir.print(fixed_output_path(drv, store_dir, name))
        hashes[name] = _sha256(f"fixed:out:{out.hash_algo}:{out.hash}:{path}")
    return DrvHash(hashes)


def _hash_one(drv: Derivation, store_dir: StoreDir, inputs: Mapping[str, DrvHash],
              mask: bool) -> DrvHash:
    """``hashDerivationModulo`` of one derivation whose inputs are hashed."""
    kind = drv.type()
    if kind is DerivationType.FIXED:
        return _fixed_hashes(drv, store_dir)
    if kind is DerivationType.IMPURE:
        return DrvHash({o: IMPURE_OUTPUT_HASH for o in drv.outputs}, deferred=True)
    deferred = kind is DerivationType.FLOATING
    by_hex: dict[str, set[str]] = {}
    for path, outs in drv.input_drvs.items():
        res = inputs[path]
        deferred = deferred or res.deferred
        for out in outs:
            if out not in res.hashes:
                raise DerivationError(
                    f"derivation '{path}' does not have an output named '{out}'")
            by_hex.setdefault(res.hashes[out].to_base16(), set()).add(out)
    override = {h: tuple(sorted(by_hex[h])) for h in sorted(by_hex)}
    digest = _sha256(print_derivation(drv, mask_outputs=mask, input_drvs_override=override))
    return DrvHash({o: digest for o in drv.outputs}, deferred)


def _resolve(resolve: Resolve, path: str) -> Derivation:
    drv = resolve(path)
    if not isinstance(drv, Derivation):
        raise TypeError(f"resolve({path!r}) did not return a Derivation")
    return drv


def _hash_inputs(drv: Derivation, store_dir: StoreDir, resolve: Resolve,
                 cache: dict[str, DrvHash]) -> None:
    """Fill ``cache`` with the unmasked hash of every input, depth first."""
    stack = [(p, False) for p in reversed(drv.input_drvs)]
    loaded: dict[str, Derivation] = {}
    while stack:
        path, expanded = stack.pop()
        if path in cache:
            continue
        if expanded:
            cache[path] = _hash_one(loaded.pop(path), store_dir, cache, mask=False)
            continue
        if path in loaded:
            raise DerivationError(f"derivation '{path}' depends on itself")
        loaded[path] = _resolve(resolve, path)
        stack.append((path, True))
        stack.extend((p, False) for p in reversed(loaded[path].input_drvs) if p not in cache)


def hash_derivation_modulo(drv: Derivation, store_dir: StoreDir, resolve: Resolve,
                           mask_outputs: bool = True,
                           cache: dict[str, DrvHash] | None = None) -> DrvHash:
    """Nix 2.8's ``hashDerivationModulo`` (spec §10.1).

    Fixed-output derivations hash to ``sha256("fixed:out:<algo>:<hex>:<path>")``;
    others to sha256 of the ATerm with input ``.drv`` paths replaced by the
    hex of their own (unmasked) hash modulo, re-sorted, and with the own
    outputs masked when ``mask_outputs``.

    Args:
        drv: the derivation.
        store_dir: the store directory of every path involved.
        resolve: reads an input ``.drv`` given its full path; its errors
            propagate.
        mask_outputs: True for the derivation's own output paths (Nix's
            ``staticOutputHashes``); inputs are always hashed unmasked.
        cache: input hashes by ``.drv`` path, read and extended.
    Returns:
        One hash per output, and whether the result is deferred.
    Raises:
        DerivationError: an invalid kind mix, a missing input output, a
            dependency cycle.
    """
    cache = {} if cache is None else cache
    if drv.type() not in (DerivationType.FIXED, DerivationType.IMPURE):
        _hash_inputs(drv, store_dir, resolve, cache)
    return _hash_one(drv, store_dir, cache, mask=mask_outputs)


def _hash_for(drv_hash: DrvHash | Mapping[str, Hash] | Hash, output: str) -> Hash:
    if isinstance(drv_hash, Hash):
        return drv_hash
    hashes = drv_hash.hashes if isinstance(drv_hash, DrvHash) else drv_hash
    if output not in hashes:
        raise DerivationError(f"no hash modulo for output '{output}'")
    return hashes[output]


def output_paths(drv: Derivation, store_dir: StoreDir,
                 drv_hash_modulo: DrvHash | Mapping[str, Hash] | Hash) -> dict[str, str | None]:
    """The static output paths, as full paths (None where not yet known).

    Input-addressed outputs: ``make_output_path("output:<o>", hash[o], name)``
    with ``drv_hash_modulo`` from ``hash_derivation_modulo(mask_outputs=True)``;
    fixed outputs: from their content hash; deferred, floating and impure
    outputs: None.

    Raises:
        DerivationError: a name that makes no valid store path, or no hash
            for an input-addressed output.
    """
    result: dict[str, str | None] = {}
    for name, out in drv.outputs.items():
        if out.kind is OutputKind.INPUT_ADDRESSED:
            result[name] = store_dir.print(_make_output_path(
                store_dir, name, _hash_for(drv_hash_modulo, name), drv.name))
        elif out.kind is OutputKind.FIXED:
            result[name] = store_dir.print(fixed_output_path(drv, store_dir, name))
        else:
            result[name] = None
    return result


def _make_output_path(store_dir: StoreDir, output: str, drv_hash: Hash,
                      drv_name: str) -> StorePath:
    try:
        return store_dir.make_output_path(output, drv_hash, drv_name)
    except BadStorePath as e:
        raise DerivationError(str(e)) from None


def _to_store_path(ref: str | StorePath, store_dir: StoreDir) -> StorePath:
    if isinstance(ref, StorePath):
        return ref
    try:
        return store_dir.parse(ref)
    except BadStorePath as e:
        raise DerivationError(str(e)) from None


def text_store_path_for(drv_text: str | bytes, name: str,
                        references: Iterable[str | StorePath],
                        store_dir: StoreDir) -> StorePath:
    """The store path of a ``.drv`` file (spec §9.4, Nix's ``writeDerivation``).

    Args:
        drv_text: the ATerm text (bytes are hashed as given).
        name: the derivation name; ``.drv`` is appended.
        references: input sources and input ``.drv`` paths (full or parsed).
        store_dir: the store directory.
    Raises:
        DerivationError: a reference outside the store or an invalid name.
    """
    data = drv_text if isinstance(drv_text, bytes) else encode_text(drv_text)
    refs = [_to_store_path(r, store_dir) for r in references]
    try:
        return store_dir.make_text_path(
            name + DRV_EXTENSION, Hash.compute(HashAlgo.SHA256, data), refs)
    except BadStorePath as e:
        raise DerivationError(str(e)) from None


def derivation_store_path(drv: Derivation, store_dir: StoreDir) -> StorePath:
    """The store path ``drv`` gets when written (text of ``print_derivation``)."""
    return text_store_path_for(print_derivation(drv), drv.name, drv.references, store_dir)


def _check_env(drv: Derivation, drv_path: str, var: str, expected: str) -> None:
    if drv.env.get(var) != expected:
        raise DerivationError(
            f"derivation '{drv_path}' has incorrect environment variable '{var}', "
            f"should be '{expected}'")


def _check_path(drv_path: str, stated: str | None, expected: str) -> None:
    if stated != expected:
        raise DerivationError(
            f"derivation '{drv_path}' has incorrect output '{stated}', should be '{expected}'")


def check_outputs(drv: Derivation, store_dir: StoreDir, resolve: Resolve, *,
                  drv_path: str | None = None,
                  cache: dict[str, DrvHash] | None = None) -> None:
    """Nix 2.8's ``checkDerivationOutputs``, run when a ``.drv`` is registered.

    Every input-addressed output path must be the one hashing modulo gives,
    and every input-addressed or fixed output must have an env variable of
    its name holding that path.  Stricter than 2.8 (like newer Nix): a fixed
    output's stated path must equal the path its hash gives (2.8 ignores
    the stated path and recomputes it, so such a ``.drv`` would mean
    something else to it than to us).

    Args:
        drv: the derivation.
        store_dir: the store directory.
        resolve: reads input ``.drv`` files (see ``hash_derivation_modulo``).
        drv_path: the ``.drv`` path for messages; default: the path ``drv``
            gets when written.
        cache: input hash memo (see ``hash_derivation_modulo``).
    Raises:
        DerivationError: with Nix's message.
    """
    if drv_path is None:
        drv_path = store_dir.print(derivation_store_path(drv, store_dir))
    drv.type()
    drv_hash = None
    for name, out in drv.outputs.items():
        if out.kind is OutputKind.INPUT_ADDRESSED:
            if drv_hash is None:
                drv_hash = hash_derivation_modulo(drv, store_dir, resolve, True, cache)
            expected = store_dir.print(
                _make_output_path(store_dir, name, drv_hash[name], drv.name))
        elif out.kind is OutputKind.FIXED:
            expected = store_dir.print(fixed_output_path(drv, store_dir, name))
        else:
            continue
        _check_path(drv_path, out.path, expected)
        _check_env(drv, drv_path, name, expected)
