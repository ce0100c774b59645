"""The tuning database: verified tune results as JSON data, and lookup with an explained fallback.

One entry per tune result, a verified winner or "keep defaults" (flags ``{}``), with its full key
(versions, GPU, model signature, engine, workload and size bucket, policy), the flags, the decision
text, the measurements and the provenance (date, compilepass version, exact command, study name).

- :mod:`~compilepass.db.keys`: the key and its size buckets;
- :mod:`~compilepass.db.store`: files (parse, load, atomic locked writes, merge, the merged view);
- :mod:`~compilepass.db.recording`: entries from tune results;
- :mod:`~compilepass.db.lookup`: the best entry for a query, with the level that matched and why.

This package imports neither the tuner nor the GRPO runtime: it is data and lookup only.
"""

from compilepass.core.workload_spec import ENGINES, POLICIES
from compilepass.db.keys import (ModelSignature, TuneKey, arch_of, bucket_dims, bucket_distance, bucket_string,
                                 bucket_within, dtype_name, parse_bucket, torch_minor)
from compilepass.db.lookup import (LEVEL_NAMES, NEARBY_FACTOR, SAFE_DEFAULTS, SIMILAR_PARAMS, Match, Query,
                                   bucket_dims_from_string, lookup)
from compilepass.db.recording import NotRecordable, entry_from_tune_result, record_tune_result, resolved_dtype_name
from compilepass.db.store import (REQUIRED_ENTRY_FIELDS, SCHEMA_VERSION, SHIPPED_DB_NAME, USER_DB_NAME, DatabaseError,
                                  add_entries, check_db_writable, empty_db, find_entry, load_db, load_shipped, locked,
                                  merge_entries, merged_view, now_iso, parse_date, parse_db, remove_entry, save_db,
                                  shipped_db_path, user_db_path)

__all__ = [
    "ENGINES", "POLICIES", "ModelSignature", "TuneKey", "arch_of", "bucket_dims", "bucket_distance", "bucket_string",
    "bucket_within", "dtype_name", "parse_bucket", "torch_minor", "LEVEL_NAMES", "NEARBY_FACTOR", "SAFE_DEFAULTS",
    "SIMILAR_PARAMS", "Match", "Query", "bucket_dims_from_string", "lookup", "NotRecordable",
    "entry_from_tune_result", "record_tune_result", "resolved_dtype_name", "REQUIRED_ENTRY_FIELDS", "SCHEMA_VERSION",
    "SHIPPED_DB_NAME", "USER_DB_NAME", "DatabaseError", "add_entries", "check_db_writable", "empty_db", "find_entry",
    "load_db", "load_shipped", "locked", "merge_entries", "merged_view", "now_iso", "parse_date", "parse_db",
    "remove_entry", "save_db", "shipped_db_path", "user_db_path",
]
