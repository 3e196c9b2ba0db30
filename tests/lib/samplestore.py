"""A small but varied store, filled by the real Nix directly (NIX_REMOTE=local).

``populate(env)`` adds, through ``nix-store --add``, ``nix-instantiate`` and
``nix-build``:

* ``file``: a regular file; ``dir``: a directory with a sub-directory, an
  executable, a symlink to a file in it and a dangling symlink;
* ``dep_drv`` / ``dep_out``: a built derivation with no inputs;
* ``top_drv`` / ``top_out`` / ``top_dev``: a built two-output derivation
  whose builder mentions ``dep_out`` (so ``top_out`` references it);
* ``unbuilt_drv``: an instantiated derivation depending on ``top``, never built;
* ``invalid``: a well-formed store path that is not valid.

It returns those paths by name.  Builders use ``/bin/sh`` builtins only.
"""

from __future__ import annotations

import os

NIX_EXPR = r"""
let
  sys = builtins.currentSystem;
  mk = attrs: builtins.derivation ({ system = sys; builder = "/bin/sh"; } // attrs);
  dep = mk { name = "dep"; args = [ "-c" "echo dependency > $out" ]; };
  top = mk {
    name = "top";
    outputs = [ "out" "dev" ];
    args = [ "-c" "echo ${dep} > $out; echo headers > $dev" ];
  };
  unbuilt = mk { name = "unbuilt"; args = [ "-c" "echo ${top.dev} > $out" ]; };
in { inherit dep top unbuilt; }
"""


def _make_tree(root: str) -> str:
    tree = os.path.join(root, "tree")
    os.makedirs(os.path.join(tree, "sub"), exist_ok=True)
    with open(os.path.join(tree, "sub", "data.txt"), "w") as f:
        f.write("some data\n" * 100)
    script = os.path.join(tree, "run.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(script, 0o755)
    with open(os.path.join(tree, "empty"), "w"):
        pass
    os.symlink("sub/data.txt", os.path.join(tree, "link"))
    os.symlink("/nonexistent/target", os.path.join(tree, "dangling"))
    return tree


def populate(env) -> dict[str, str]:
    """Fill ``env``'s store with the real Nix; return the interesting paths."""
    def local(*cmd) -> str:
        return env.run(*cmd, remote="local").stdout.decode().strip()

    home = os.path.join(env.root, "home")
    expr = os.path.join(home, "sample.nix")
    with open(expr, "w") as f:
        f.write(NIX_EXPR)
    paths = {"file": env.add_text("hello.txt", "hello world\n"),
             "dir": local("nix-store", "--add", _make_tree(home))}
    for attr in ("dep", "top", "unbuilt"):
        paths[f"{attr}_drv"] = local("nix-instantiate", expr, "-A", attr)
    paths["dep_out"] = local("nix-store", "-r", paths["dep_drv"])
    top_out, top_dev = sorted(local("nix-store", "-r", paths["top_drv"]).split(),
                              key=lambda p: p.endswith("-dev"))
    paths.update(top_out=top_out, top_dev=top_dev)
    base = os.path.basename(paths["file"])
    paths["invalid"] = os.path.join(env.store_dir, "0" * 32 + base[32:])
    return paths
