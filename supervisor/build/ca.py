"""Content-addressed derivations (experimental ``ca-derivations``), as Nix 2.8 does them.

* Floating outputs are built at a scratch path and moved to the path their
  content gives, hashed modulo self-references (spec store-formats §11.2,
  §11.3); each becomes a realisation ``sha256:<hash modulo>!<output>``.
* A derivation that depends on such outputs is *resolved* before it is
  built: its input derivations are replaced by their realised outputs and
  the downstream placeholders in its environment by their paths; the
  resolved derivation is written to the store and built instead.
Process: session.

Trust: derivations are client-supplied; every path here is recomputed.
"""

from __future__ import annotations

import hashlib

from nixwarden.shared import base32
from nixwarden.shared.derivation import (Derivation, DerivationOutput, OutputKind,
                                         encode_text)
from nixwarden.shared.derivation_hash import hash_derivation_modulo
from nixwarden.shared.hashes import Hash, HashAlgo
from nixwarden.shared.storepath import StoreDir, output_path_name
from nixwarden.supervisor.build.placeholders import rewrite

FEATURE = "ca-derivations"


def drv_output_id(drv_hash: Hash) -> str:
    """The ``drvPath`` column of a realisation: ``sha256:<hex>``."""
    return f"sha256:{drv_hash.to_base16()}"


def downstream_placeholder(drv_path: str, drv_name: str, output: str) -> str:
    """What stands for an input's not-yet-known output path (Nix's
    ``downstreamPlaceholder``)."""
    hash_part = drv_path.rsplit("/", 1)[1][:32]
    text = f"nix-upstream-output:{hash_part}:{output_path_name(drv_name, output)}"
    return "/" + base32.encode(hashlib.sha256(encode_text(text)).digest())


def floating_scratch_path(store_dir: StoreDir, drv_path: str, drv_name: str,
                          output: str) -> str:
    inner = f"rewrite:{drv_path.rsplit('/', 1)[1]}:name:{output}"
    return store_dir.print(store_dir.make_store_path(
        inner, Hash(HashAlgo.SHA256, bytes(32)), output_path_name(drv_name, output)))


def resolve(drv: Derivation, store_dir: StoreDir, input_names, realised, read_drv
            ) -> Derivation:
    """Nix's ``Derivation::tryResolve``: inputs replaced by their outputs.

    Args:
        input_names: input drv path -> its derivation's name.
        realised: (input drv path, output) -> realised output path.
        read_drv: reads a ``.drv`` (for hashing the resolved derivation).
    """
    rewrites, srcs = {}, set(drv.input_srcs)
    for path, outs in drv.input_drvs.items():
        for out in outs:
            actual = realised[(path, out)]
            srcs.add(actual)
            rewrites[downstream_placeholder(path, input_names[path], out)] = actual
    env = {rewrite(k, rewrites): rewrite(v, rewrites) for k, v in drv.env.items()}
    resolved = Derivation(drv.outputs, {}, tuple(srcs), drv.platform,
                          rewrite(drv.builder, rewrites),
                          tuple(rewrite(a, rewrites) for a in drv.args), env, drv.name)
    return _fix_deferred(resolved, store_dir, read_drv)


def _fix_deferred(drv: Derivation, store_dir: StoreDir, read_drv) -> Derivation:
    """Deferred outputs become input-addressed once nothing is deferred."""
    deferred = [n for n, o in drv.outputs.items() if o.kind is OutputKind.DEFERRED]
    if not deferred:
        return drv
    hashes = hash_derivation_modulo(drv, store_dir, read_drv, True)
    outputs, env = dict(drv.outputs), dict(drv.env)
    for name in deferred:
        path = store_dir.print(store_dir.make_output_path(name, hashes[name], drv.name))
        outputs[name] = DerivationOutput.input_addressed(path)
        env[name] = path
    return Derivation(outputs, {}, drv.input_srcs, drv.platform, drv.builder, drv.args,
                      env, drv.name)


def hash_modulo_self(chunks, modulus: str, algo: HashAlgo) -> Hash:
    """Hash a byte stream with every occurrence of ``modulus`` zeroed and its
    offset appended (spec store-formats §11.3)."""
    target = modulus.encode()
    zero = bytes(len(target))
    h = hashlib.new(algo.value)
    carry, offset, positions = b"", 0, []
    keep = len(target) - 1
    for chunk in chunks:
        buf = bytearray(carry + chunk)
        start = 0
        while (i := buf.find(target, start)) >= 0:
            positions.append(offset + i)
            buf[i:i + len(target)] = zero
            start = i + len(target)
        cut = max(len(buf) - keep, 0)
        h.update(buf[:cut])
        offset += cut
        carry = bytes(buf[cut:])
    h.update(carry)
    for pos in positions:
        h.update(f"|{pos}".encode())
    return Hash(algo, h.digest())


def output_map(db, store_dir: StoreDir, read_drv, drv_path: str) -> dict[str, str | None]:
    """Every output of a valid derivation and its path, where known:
    statically known ones from DerivationOutputs, content-addressed ones
    from their realisations (Nix's ``queryPartialDerivationOutputMap``)."""
    known = db.query_derivation_outputs(drv_path)
    drv = read_drv(drv_path)
    result = {name: known.get(name) or out.path for name, out in drv.outputs.items()}
    if any(p is None for p in result.values()):
        drv_hash = hash_derivation_modulo(drv, store_dir, read_drv, True)
        for name, path in result.items():
            if path is None:
                found = db.query_realisation(drv_output_id(drv_hash[name]), name)
                result[name] = found[0] if found else None
    return result
