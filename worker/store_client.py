"""``StoreAPI`` over the RPC channel to this connection's session.

Each call sends one request and reads frames until its reply; in-band
``LogLine`` frames before the reply are passed to the client's logger.  A
``Failure`` reply becomes ``StoreRefusal``.  A reply of the wrong type is
a broken session and ends the worker.  Process: worker.
"""

from __future__ import annotations

from nixwarden.shared import limits
from nixwarden.shared.errors import StoreRefusal, WorkerViolation
from nixwarden.shared.rpc import codec, schema
from nixwarden.shared.rpc.channel import Channel


_IN_BAND = (schema.LogLine, schema.StartActivity, schema.StopActivity,
            schema.ActivityResult)


class StoreClient:
    """Synchronous RPC client: one request in flight at a time."""

    def __init__(self, channel: Channel, logger=None):
        self.channel = channel
        self.logger = logger

    def _call(self, request, expect: type):
        self.channel.send(request)
        while True:
            reply = codec.decode_reply(self.channel.recv_frame())
            if type(reply) is expect:  # the usual case, first
                return reply
            if isinstance(reply, _IN_BAND):
                if self.logger is not None:
                    self._relay(reply)
                continue
            if isinstance(reply, schema.Failure):
                raise StoreRefusal(reply.message, reply.exit_status)
            if not isinstance(reply, expect):
                raise WorkerViolation(
                    f"session answered {type(reply).__name__} to {type(request).__name__}")
            return reply

    def _relay(self, msg) -> None:
        """Pass an in-band log message on to the client."""
        if isinstance(msg, schema.LogLine):
            self.logger.log(msg.level, msg.text)
        elif isinstance(msg, schema.StartActivity):
            self.logger.start_activity_as(msg.id, msg.level, msg.type, msg.text,
                                          tuple(msg.fields), msg.parent)
        elif isinstance(msg, schema.StopActivity):
            self.logger.stop_activity(msg.id)
        else:
            self.logger.result(msg.id, msg.type, tuple(msg.fields))
        self.logger.conn.flush()

    def build_paths(self, targets: list[str], mode: int) -> None:
        self._call(schema.BuildPaths(targets, mode, False), schema.Ok)

    def build_paths_with_results(self, targets: list[str], mode: int):
        return self._call(schema.BuildPaths(targets, mode, True), schema.BuildResults).results

    def ensure_path(self, path: str) -> None:
        self._call(schema.EnsurePath(path), schema.Ok)

    def build_derivation(self, req: schema.BuildDerivation) -> schema.BuildResult:
        return self._call(req, schema.BuildResult)

    def set_options(self, req: schema.SetOptions) -> list[str]:
        return self._call(req, schema.Warnings).lines

    def is_valid_path(self, path: str) -> bool:
        return self._call(schema.IsValidPath(path), schema.Bool).value

    def query_valid_paths(self, paths: list[str], substitute: bool) -> list[str]:
        return self._call(schema.QueryValidPaths(paths, substitute), schema.Paths).paths

    def query_path_info(self, path: str) -> schema.PathInfo | None:
        return self._call(schema.QueryPathInfo(path), schema.MaybePathInfo).info

    def query_referrers(self, path: str) -> list[str]:
        return self._call(schema.QueryReferrers(path), schema.Paths).paths

    def query_path_from_hash_part(self, hash_part: str) -> str | None:
        return self._call(schema.QueryPathFromHashPart(hash_part), schema.OptPath).path

    def query_all_valid_paths(self) -> list[str]:
        return self._call(schema.QueryAllValidPaths(), schema.Paths).paths

    def query_deriver(self, path: str) -> str | None:
        return self._call(schema.QueryDeriver(path), schema.OptPath).path

    def query_valid_derivers(self, path: str) -> list[str]:
        return self._call(schema.QueryValidDerivers(path), schema.Paths).paths

    def query_derivation_output_map(self, drv_path: str) -> list[tuple[str, str | None]]:
        return self._call(schema.QueryDerivationOutputMap(drv_path), schema.OutputMap).outputs

    def query_substitutable_paths(self, paths: list[str]) -> list[str]:
        return self._call(schema.QuerySubstitutablePaths(paths), schema.Paths).paths

    def query_substitutable_path_infos(self, paths: list[tuple[str, str]]) -> list[tuple]:
        req = schema.QuerySubstitutablePathInfos(paths)
        return self._call(req, schema.SubstitutableInfos).infos

    def query_missing(self, targets: list[str]) -> schema.Missing:
        return self._call(schema.QueryMissing(targets), schema.Missing)

    def add_temp_root(self, path: str) -> None:
        self._call(schema.AddTempRoot(path), schema.Ok)

    def query_realisation(self, drv_hash: str, output: str) -> schema.Realisation | None:
        reply = self._call(schema.QueryRealisation(drv_hash, output),
                           (schema.Realisation, schema.NoRealisation))
        return reply if isinstance(reply, schema.Realisation) else None

    def register_drv_output(self, drv_hash: str, output: str, path: str, sigs,
                            dependents=()) -> None:
        self._call(schema.RegisterDrvOutput(drv_hash, output, path, list(sigs),
                                            [list(d) for d in dependents]), schema.Ok)

    #: Pieces gathered into one Chunk at most (the client's frames may be tiny).
    MAX_PIECES = 64

    def _send_chunks(self, chunks) -> None:
        """Send bulk data as Chunk frames of about ``RPC_CHUNK`` bytes: the
        pieces as they arrive are gathered (not copied) up to that size, so
        the session handles a few large frames rather than many small ones."""
        step = limits.RPC_CHUNK
        pieces: list = []
        size = 0
        for data in chunks:
            for start in range(0, len(data), step):
                piece = data[start:start + step] if len(data) > step else data
                pieces.append(piece)
                size += len(piece)
                if size >= step or len(pieces) >= self.MAX_PIECES:
                    self.channel.send_chunk(pieces)
                    pieces, size = [], 0
        if pieces:
            self.channel.send_chunk(pieces)

    def _stream(self, request, chunks, expect: type):
        """Send ``request``, then the bulk data as Chunk frames and End."""
        self.channel.send(request)
        self._send_chunks(chunks)
        return self._call(schema.End(), expect)

    def add_to_store(self, req: schema.AddToStore, chunks) -> schema.PathInfo:
        return self._stream(req, chunks, schema.PathInfo)

    def add_to_store_nar(self, req: schema.AddToStoreNar, chunks) -> None:
        self._stream(req, chunks, schema.Ok)

    def add_nars(self, items) -> None:
        """AddMultipleToStore's paths, sent without waiting for answers (the
        session adds one while the next is read from the client), then one
        answer for all (``schema.AddNarBatch``).

        Args:
            items: yields ``(AddToStoreNar, chunks)``; a ``StoreRefusal`` it
                raises ends the batch there: the paths before it are still
                added, and an earlier path's failure is the one raised.
        """
        self.channel.send(schema.AddNarBatch())
        try:
            for request, chunks in items:
                self.channel.send(request)
                self._send_chunks(chunks)
                self.channel.send(schema.End())
        except StoreRefusal:
            self._call(schema.EndNarBatch(), schema.Ok)
            raise
        self._call(schema.EndNarBatch(), schema.Ok)

    def import_path(self, chunks, meta) -> str:
        """Send one exported NAR, then its metadata (read after the NAR)."""
        self.channel.send(schema.ImportPath())
        self._send_chunks(chunks)
        self.channel.send(schema.End())
        try:
            request = meta()
        except StoreRefusal:
            # The session holds the NAR waiting for its metadata: have it
            # discard the NAR (its Failure answer is expected), then report
            # our own reason to the client.
            try:
                self._call(schema.ImportAbandoned(), schema.Ok)
            except StoreRefusal:
                pass
            raise
        self._call(request, schema.Ok)
        return request.path

    def optimise_store(self) -> None:
        self._call(schema.OptimiseStore(), schema.Ok)

    def verify_store(self, check_contents: bool, repair: bool) -> bool:
        return self._call(schema.VerifyStore(check_contents, repair), schema.Bool).value

    def add_build_log(self, drv_path: str, chunks) -> None:
        self._stream(schema.AddBuildLog(drv_path), chunks, schema.Ok)

    def find_roots(self) -> list[tuple[str, str]]:
        return self._call(schema.FindRoots(), schema.Roots).roots

    def collect_garbage(self, action: int, paths: list[str], ignore_liveness: bool,
                        max_freed: int) -> schema.GcResult:
        req = schema.CollectGarbage(action, paths, ignore_liveness, max_freed)
        return self._call(req, schema.GcResult)

    def add_perm_root(self, path: str, link: str) -> str:
        return self._call(schema.AddPermRoot(path, link), schema.Strings).items[0]

    def add_indirect_root(self, link: str) -> None:
        self._call(schema.AddIndirectRoot(link), schema.Ok)

    def add_signatures(self, path: str, sigs: list[str]) -> None:
        self._call(schema.AddSignatures(path, sigs), schema.Ok)

    def goodbye(self, status: int) -> None:
        """Tell the session how the client's session ended (advisory)."""
        try:
            self.channel.send(schema.Goodbye(status))
        except OSError:
            pass

    def check_nar_readable(self, path: str) -> None:
        self._call(schema.CheckNarReadable(path), schema.Ok)
