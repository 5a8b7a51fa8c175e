"""Files and environment variables we read and write: data-only torch loads with one-line reasons,
atomic writes, folder locks, the ``DIRE_*`` variables. Imports nothing of ours but ``errors``;
torch only inside the torch functions."""
