"""Lookup with an explained fallback: the best entry for a query, and which level matched and why.

Levels, tried in order:

1. ``exact``: the same key.
2. ``nearby-bucket``: the same key but another size bucket of the same workload kind, the nearest
   one (every known dimension within 4x).
3. ``similar-model``: the same model family, parameter count within 2x, same GPU, torch, workload kind.
4. ``same-torch-arch``: the same torch minor ("2.11") and GPU architecture (compute capability major,
   or "cpu") and workload kind; of the same family only when the query says ``cross_family=False``
   (selection does so for families the tuner cannot measure: no other architecture's flags for them).
5. ``safe-defaults``: the curated table :data:`SAFE_DEFAULTS` for the torch minor: torch's own
   defaults (``{}``) unless an entry there is justified; nothing unmeasured is shipped.

Engine, policy and quantization are never mixed: flags measured for the native engine are not
offered to vLLM, a "throughput" entry (compile time allowed to grow) is not offered to a "balanced"
caller, and an entry for a 4-bit base (``ModelSignature.quant``) is offered only to a model of the
same quantization, at every level (a 16-bit entry never to a 4-bit model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from compilepass.db.keys import TuneKey, bucket_dims, bucket_distance, bucket_within, parse_bucket
from compilepass.db.store import merged_view, parse_date

LEVEL_NAMES = {1: "exact", 2: "nearby-bucket", 3: "similar-model", 4: "same-torch-arch", 5: "safe-defaults"}


#: Curated flags per torch minor when nothing measured applies. Deliberately empty: every flag set we
#: know of changes speed by GPU, model and version (e.g. triton.cudagraphs is 3x on H100 rollout
#: only together with other flags and doubles compile time), so the safe answer is torch's defaults.
SAFE_DEFAULTS: dict[str, dict] = {}

NEARBY_FACTOR = 4.0  # level 2: every known size dimension within this factor
SIMILAR_PARAMS = 2.0  # level 3: parameter count within this factor


@dataclass
class Match:
    entry: Optional[dict]
    flags: dict
    level: int
    reason: str
    source: str = ""

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]

    @property
    def entry_id(self) -> Optional[str]:
        return None if self.entry is None else self.entry["id"]


@dataclass
class Query:
    """What a caller wants flags for: the key with a possibly partial size bucket."""

    key: TuneKey  # bucket may be "" when some size is unknown
    dims: dict = field(default_factory=dict)  # known/unknown size dimensions
    cross_family: bool = True  # level 4 may offer another model family's entry


def _describe(entry: dict) -> str:
    k = entry["key"]
    what = "keep defaults" if not entry["flags"] else f"{len(entry['flags'])} flags"
    return (f"entry {entry['id']} ({entry.get('model_name', k['model']['family'])} {k['workload']} {k['bucket']}, "
            f"{k['device_name']}, torch {k['torch']}, {entry.get('policy', k.get('policy'))}: {what})")


def lookup(query: Union[Query, TuneKey], entries: Optional[list] = None) -> Match:
    """The best entry for ``query`` with the fallback chain of the module docstring.

    ``entries`` is a list of entries or (entry, source) pairs; default: the merged view.
    """
    if isinstance(query, TuneKey):
        query = Query(query, bucket_dims_from_string(query.workload, query.bucket))
    q = query.key
    rows = merged_view() if entries is None else [e if isinstance(e, tuple) else (e, "") for e in entries]
    parsed = []
    for e, src in rows:
        try:
            parsed.append((e, src, TuneKey.from_dict(e["key"])))
        except (KeyError, TypeError):
            continue
    pool = [(e, s, k) for e, s, k in parsed if k.engine == q.engine and k.policy == q.policy and k.workload == q.workload
            and k.model.quant == q.model.quant]  # a 4-bit model's flags never go to a 16-bit one, nor back

    def pick(cands, sort_key):
        if not cands:
            return None
        best = min(sort_key(c) for c in cands)
        tied = [c for c in cands if sort_key(c) == best]
        return max(tied, key=lambda c: parse_date(c[0]["provenance"].get("date")))

    def found(level, c, why):
        e, src, _ = c
        return Match(e, dict(e["flags"]), level, f"{LEVEL_NAMES[level]}: {_describe(e)}; {why}", src)

    # 1. exact
    if q.bucket:
        exact = [c for c in pool if c[2].same_environment(q) and c[2].model == q.model and c[2].bucket == q.bucket]
        if exact:
            return found(1, pick(exact, lambda c: 0), "same versions, GPU, model, workload and size")
    # 2. nearby bucket
    same = [c for c in pool if c[2].same_environment(q) and c[2].model == q.model
            and bucket_distance(query.dims, c[2].bucket) is not None
            and bucket_within(query.dims, c[2].bucket, NEARBY_FACTOR)]
    if same:
        c = pick(same, lambda c: bucket_distance(query.dims, c[2].bucket))
        known = {k: v for k, v in query.dims.items() if v is not None}
        asked = ", ".join(f"{k}={v}" for k, v in known.items()) or "no sizes given"
        return found(2, c, f"same versions, GPU and model; nearest size bucket to {asked}")
    # 3. same family and size class, same GPU/torch
    qp = q.model.parameters()

    def pratio(c):
        return abs(math.log(c[2].model.parameters() / qp))

    similar = [c for c in pool if c[2].device_name == q.device_name and c[2].torch == q.torch
               and c[2].model.family == q.model.family and c[2].model.dtype == q.model.dtype
               and pratio(c) <= math.log(SIMILAR_PARAMS) + 1e-9]
    if similar:
        c = pick(similar, lambda c: (round(pratio(c), 6), bucket_distance(query.dims, c[2].bucket) or 0.0))
        return found(3, c, f"same GPU and torch, {q.model.family} with {c[2].model.parameters() / 1e6:.0f}M "
                           f"parameters vs {qp / 1e6:.0f}M (within {SIMILAR_PARAMS:g}x)")
    # 4. same torch minor and GPU architecture
    arch = [c for c in pool if c[2].torch_minor == q.torch_minor and c[2].arch == q.arch
            and (query.cross_family or c[2].model.family == q.model.family)]
    if arch:
        c = pick(arch, lambda c: (c[2].device_name != q.device_name, c[2].model.family != q.model.family,
                                  round(pratio(c), 6), bucket_distance(query.dims, c[2].bucket) or 0.0))
        return found(4, c, f"same torch minor {q.torch_minor} and GPU architecture {q.arch}; no entry for this "
                           f"GPU/model")
    # 5. curated safe defaults
    flags = dict(SAFE_DEFAULTS.get(q.torch_minor, {}))
    others = [c for c in parsed if c[2].policy != q.policy and c[2].engine == q.engine
              and c[2].workload == q.workload and c[2].same_environment(q) and c[2].model == q.model]
    hint = f"; {len(others)} entry for policy {others[0][2].policy!r} exists (not used)" if others else ""
    of = "" if query.cross_family else f" of family {q.model.family} (other families' entries are not applied to it)"
    if q.model.quant:
        of += f" for {q.model.quant} 4-bit models (16-bit entries are not applied to them)"
    reason = (f"{LEVEL_NAMES[5]}: no measured {q.engine} {q.workload} entry ({q.policy}){of} for torch "
              f"{q.torch_minor} on {q.arch}; using " + ("curated flags" if flags else "torch's own defaults (no flags)")
              + hint)
    return Match(None, flags, 5, reason, "curated")


def bucket_dims_from_string(kind: str, bucket: str) -> dict:
    parsed = parse_bucket(bucket)
    names = bucket_dims(kind).keys()
    return {n: parsed.get(n) for n in names}
