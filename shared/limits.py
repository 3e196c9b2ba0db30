"""Every cap and timeout nixwarden applies, each with its reason.

Imports nothing.  A decoder never reads a length without checking it
against one of these first, and never allocates a declared length ahead of
the bytes that actually arrive (STYLE.md 2.2).
"""

# --- worker protocol (client -> worker) --------------------------------------

#: Longest protocol string (store paths, setting values, error texts, JSON
#: realisations).  Real ones are far below this; a derivation's env values
#: can be large, so keep it generous.
MAX_STRING = 64 * 1024 * 1024

#: Longest store path string (store dir + 32 + 1 + 211, with a long store dir).
MAX_STORE_PATH = 4096

#: Most elements in one protocol list/set/map.  `QueryValidPaths` of a large
#: closure is the biggest real one (tens of thousands).
MAX_LIST_ITEMS = 1_000_000

#: Most settings a client can send in SetOptions overrides.
MAX_OVERRIDES = 4096

#: Largest single frame of a framed stream (the C++ reader's 32-bit limit).
MAX_FRAME = 2**32 - 1

#: How many bytes the worker reads from the client socket at once.  Kept
#: below malloc's mmap threshold (128 KiB): a larger read buffer costs an
#: mmap and munmap on every small request.
RECV_CHUNK = 64 * 1024

# --- NAR ----------------------------------------------------------------------

#: Longest directory-entry name in a NAR (NAME_MAX).
MAX_NAR_NAME = 255

#: Longest symlink target in a NAR (PATH_MAX - 1).
MAX_NAR_TARGET = 4095

#: Deepest directory nesting in a NAR.
MAX_NAR_DEPTH = 256

#: Longest NAR keyword token ("nix-archive-1", "executable", ...).
MAX_NAR_TOKEN = 32

#: Bytes read from a file at once when dumping it into a NAR: big enough to
#: keep per-chunk overhead low, small enough that a dump never holds much
#: of a file in memory.
NAR_DUMP_CHUNK = 256 * 1024

# --- derivations (.drv ATerm) -------------------------------------------------

#: Largest .drv text parsed, in bytes: the same cap as a protocol string,
#: since a .drv arrives as one (AddTextToStore, AddToStore) and its env
#: values (structured attributes, passAsFile contents) can be large.
MAX_DRV_SIZE = MAX_STRING

#: Most elements in any one list of a .drv (input derivations, input
#: sources, args, env entries, an input's output names).  Large real ones
#: (NixOS system closures) have thousands; each element costs Python objects
#: well beyond its text size, so the size cap alone is not enough.
MAX_DRV_LIST_ITEMS = 1_000_000

#: Most outputs of one derivation.  Real ones have at most a few dozen;
#: each output costs a store-path computation when outputs are checked.
MAX_DRV_OUTPUTS = 1024

# --- signing keys -------------------------------------------------------------

#: Largest secret-key file read (``secret-key-files``).  A key file is one
#: line of about 100 bytes; the cap only stops a misconfigured path (a log,
#: a device) from being read whole.
MAX_KEY_FILE = 64 * 1024

# --- internal RPC (worker <-> session) ----------------------------------------

#: Largest RPC frame payload.  Bulk data travels as Chunk frames well below
#: this; a query answer with a very large path set is the biggest message.
RPC_FRAME_MAX = 64 * 1024 * 1024

#: Size of one bulk-data Chunk frame: half the RPC pipe (channel.PIPE_SIZE),
#: so the worker writes the next chunk while the session handles one.
RPC_CHUNK = 128 * 1024

# --- processes ----------------------------------------------------------------

#: Worker crashes (killed by a fault signal) before the zygote is replaced.
ZYGOTE_MAX_CRASHES = 16

#: Session processes the supervisor keeps forked and waiting (a burst of
#: connections beyond this forks on demand).
SESSION_POOL = 4

#: Workers the zygote keeps forked and waiting.
WORKER_POOL = 2

#: How long the supervisor and the zygote stay idle before refilling their
#: pools: a fork (copying a large process's page tables) then never competes
#: for a CPU with the connection just handed over, or with one waiting.
POOL_REFILL_IDLE = 0.020

#: listen() backlog; bursts of connections must not be refused.
LISTEN_BACKLOG = 1024

#: Open files a worker may hold (client socket, RPC channel, store reads).
WORKER_RLIMIT_NOFILE = 64

#: Address space of a worker; bounds what a hostile client can make it use.
WORKER_RLIMIT_AS = 2 * 1024 * 1024 * 1024
