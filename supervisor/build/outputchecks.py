"""A derivation's own rules on what its outputs may refer to (spec local-store §8.7 step 11).

``allowedReferences``, ``allowedRequisites``, ``disallowedReferences`` and
``disallowedRequisites`` (environment variables, or
``outputChecks.<output>`` with ``maxSize``/``maxClosureSize`` too under
structured attributes), applied after references were scanned and before
anything is registered, with Nix 2.8's messages.  Process: session.

Trust: the rules are client-supplied but only ever make a build fail.
"""

from __future__ import annotations

from collections import deque

from nixwarden.shared.errors import StoreRefusal
from nixwarden.supervisor.build.structured import structured_attrs

KINDS = (("allowedReferences", True, False), ("allowedRequisites", True, True),
         ("disallowedReferences", False, False), ("disallowedRequisites", False, True))


def check_outputs(goal, infos: dict[str, object], store_dir, query_info) -> None:
    """Raise ``StoreRefusal`` if any output breaks its derivation's rules.

    Args:
        infos: output name -> the PathInfo about to be registered.
        query_info: reads a PathInfo of an already valid path.
    """
    by_path = {i.path: i for i in infos.values()}
    attrs = structured_attrs(goal.drv, goal.drv_path)
    for name, info in infos.items():
        if attrs is not None:
            rules = (attrs.get("outputChecks") or {}).get(name)
            if isinstance(rules, dict):
                _apply(goal, name, info, infos, by_path, store_dir, query_info,
                       _structured_rules(goal, rules), ignore_self=False)
        else:
            rules = {k: goal.drv.env[k].split() for k, _, _ in KINDS if k in goal.drv.env}
            _apply(goal, name, info, infos, by_path, store_dir, query_info, rules,
                   ignore_self=True)


def _structured_rules(goal, rules: dict) -> dict:
    out = {}
    for key in ("maxSize", "maxClosureSize"):
        if key in rules:
            out[key] = int(rules[key])
    for key, _, _ in KINDS:
        if key in rules:
            value = rules[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise StoreRefusal(f"attribute '{key}' of derivation '{goal.drv_path}' "
                                   "must be a list of strings")
            out[key] = value
    return out


def _closure(start, by_path, query_info) -> tuple[set[str], int]:
    done, size, todo = set(), 0, deque([start])
    while todo:
        path = todo.popleft()
        if path in done:
            continue
        done.add(path)
        info = by_path.get(path) or query_info(path)
        size += info.nar_size
        todo.extend(info.references)
    return done, size


def _apply(goal, name, info, infos, by_path, store_dir, query_info, rules, *, ignore_self):
    if "maxSize" in rules and info.nar_size > rules["maxSize"]:
        raise StoreRefusal(f"path '{info.path}' is too large at {info.nar_size} bytes; "
                           f"limit is {rules['maxSize']} bytes")
    if "maxClosureSize" in rules:
        size = _closure(info.path, by_path, query_info)[1]
        if size > rules["maxClosureSize"]:
            raise StoreRefusal(f"closure of path '{info.path}' is too large at {size} "
                               f"bytes; limit is {rules['maxClosureSize']} bytes")
    for key, allowed, recursive in KINDS:
        if key not in rules:
            continue
        spec = _spec(rules[key], infos, store_dir)
        used = _closure(info.path, by_path, query_info)[0] if recursive else set(info.references)
        if recursive and ignore_self:
            used.discard(info.path)
        bad = sorted(p for p in used if (p not in spec) == allowed)
        if bad:
            raise StoreRefusal(f"output '{info.path}' is not allowed to refer to the following "
                               "paths:" + "".join(f"\n  {p}" for p in bad))


def _spec(items, infos, store_dir) -> set[str]:
    spec = set()
    for item in items:
        if store_dir.is_in_store(item):
            try:
                spec.add(store_dir.print(store_dir.parse(item)))
                continue
            except ValueError:
                pass
        if item in infos:
            spec.add(infos[item].path)
        else:
            raise StoreRefusal(f"derivation contains an illegal reference specifier '{item}'")
    return spec
