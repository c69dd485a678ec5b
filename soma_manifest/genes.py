"""Gene harmonization: a gene reference, the mapping of a sample's features onto it, the organism guard.

A reference is a TSV (gzip allowed) with a header `id`, `symbol` and optional `alias_ids`,
`alias_symbols` (`;`-separated), or a Cell Ranger features.tsv[.gz] (no header: id, symbol, type).
A feature maps by the first rule that finds it: id (version suffix ignored), alias id, symbol,
alias symbol, all compared in upper case. A key that names several reference genes under a rule
is ambiguous there; the feature then tries the next rule, and is ambiguous if no later rule maps it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from soma_manifest import storage
from soma_manifest.errors import SchemaError, SourceError, StorageError
from soma_manifest.schema import AtlasSchema
from soma_manifest.state import GeneMapping
from soma_manifest.storage import Location

Unmapped = Literal["drop", "keep", "fail"]
RULES = ("by_id", "by_alias_id", "by_symbol", "by_alias_symbol")
UNMAPPED, AMBIGUOUS = -1, -2
#: Below this share of mapped features a sample is refused: the cause is its input, not a few odd genes.
MIN_MAPPED = 0.5
EXAMPLES = 5

# Ensembl gene id prefix and symbol convention per organism (HGNC upper case; MGI/RGD title case).
ORGANISMS: dict[str, tuple[str, str]] = {
    "homo_sapiens": ("ENSG", "upper"),
    "mus_musculus": ("ENSMUSG", "title"),
    "rattus_norvegicus": ("ENSRNOG", "title"),
    "macaca_mulatta": ("ENSMMUG", "upper"),
    "macaca_fascicularis": ("ENSMFAG", "upper"),
    "sus_scrofa": ("ENSSSCG", "upper"),
    "danio_rerio": ("ENSDARG", "lower"),
}
_CONVENTIONS = ("upper", "title")
_BY_PREFIX = {prefix: organism for organism, (prefix, _) in ORGANISMS.items()}
_ENSEMBL = r"^(ENS[A-Z]*G)\d{11}"
# An accession that may carry a ".version": letters (and _), then digits (ENSG00000198851.15, NM_000733.4).
# Symbols such as CH507-9B2.2 have a hyphen and keep their suffix.
_ACCESSION = re.compile(r"[A-Z][A-Z_]*\d+")


@dataclass(frozen=True, eq=False)
class GeneReference:
    """A parsed reference: one row per gene, and per rule a key -> row lookup (AMBIGUOUS when shared)."""

    path: str
    ids: np.ndarray  # str (object), as written in the file
    symbols: np.ndarray
    lookups: tuple[pd.Series, ...]  # one per RULES entry, indexed by upper-case key


def schema_reference(schema: AtlasSchema) -> GeneReference | None:
    """The schema's gene reference (parsed once per process), None without one."""
    path = schema.gene_reference_path()
    return None if path is None else load_reference(str(path), schema.gene_reference_digest)


@lru_cache(maxsize=4)
def load_reference(path: str, digest: str) -> GeneReference:
    """The reference at `path`, parsed once per process; `digest` (from the schema) must still match."""
    try:
        data = storage.read_bytes(Location(path))
    except StorageError as exc:
        raise SchemaError(f"cannot read the gene reference: {exc.message.removeprefix('cannot read: ')}",
                          where=path, hint="fix genes.reference in the schema") from None
    if hashlib.blake2b(data, digest_size=16).hexdigest() != digest:
        raise SchemaError("the gene reference changed while apply was running", where=path,
                          hint="run apply again")
    table = _parse(data, path)
    ids = table["id"].to_numpy(dtype=object)
    symbols = table["symbol"].to_numpy(dtype=object)
    id_keys = _id_keys(ids)
    dupes = np.flatnonzero(pd.Index(id_keys).duplicated(keep=False))
    if len(dupes):
        lines = ", ".join(str(line) for line in table["__line__"].to_numpy()[dupes[:5]])
        raise SchemaError(f"gene id {ids[dupes[0]]!r} appears more than once (lines {lines}; "
                          "ids are compared in upper case without version suffix)", where=path,
                          hint="give each gene one row")
    rows = np.arange(len(table))
    lookups = (
        _lookup(id_keys, rows),
        _lookup(*_exploded(table.get("alias_ids"), rows, ids=True)),
        _lookup(_symbol_keys(symbols), rows),
        _lookup(*_exploded(table.get("alias_symbols"), rows, ids=False)),
    )
    return GeneReference(path, ids, symbols, lookups)


def _parse(data: bytes, path: str) -> pd.DataFrame:
    try:
        text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
        first = text.split("\n", 1)[0].rstrip("\r").split("\t")
        header = [c.strip().lower() for c in first]
        headerless = not ("id" in header and "symbol" in header)
        table = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False,
                            header=None if headerless else 0, comment=None)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SchemaError(f"cannot parse the gene reference: {exc}", where=path,
                          hint="a TSV with a header id, symbol[, alias_ids, alias_symbols], "
                               "or a Cell Ranger features.tsv") from None
    table["__line__"] = np.arange(len(table)) + (1 if headerless else 2)
    if headerless:
        if table.shape[1] < 3:
            raise SchemaError("the gene reference has one column and no header", where=path,
                              hint="add a header line 'id<TAB>symbol', or use a Cell Ranger features.tsv")
        if 2 in table.columns:  # Cell Ranger: keep genes, not antibodies or CRISPR guides
            table = table[table[2] == "Gene Expression"]
        table = table.rename(columns={0: "id", 1: "symbol"})[["id", "symbol", "__line__"]]
    else:
        table.columns = [str(c).strip().lower() for c in table.columns]
    table = table.reset_index(drop=True)
    empty = np.flatnonzero((table["id"].str.strip() == "") | (table["symbol"].str.strip() == ""))
    if len(empty):
        raise SchemaError(f"line {table['__line__'][empty[0]]}: a gene needs an id and a symbol", where=path,
                          hint="fill in both columns")
    if table.empty:
        raise SchemaError("the gene reference lists no genes", where=path, hint="fix genes.reference")
    return table


def _id_key(value: str) -> str:
    key = value.strip().upper()
    head, dot, version = key.rpartition(".")
    return head if dot and version.isdigit() and _ACCESSION.fullmatch(head) else key


def _id_keys(values: np.ndarray) -> np.ndarray:
    """Ids in upper case without version suffix. Plain Python: pandas' regex replace is 20x slower."""
    return np.fromiter((_id_key(str(v)) for v in values), dtype=object, count=len(values))


def _symbol_keys(values: np.ndarray) -> np.ndarray:
    return np.fromiter((str(v).strip().upper() for v in values), dtype=object, count=len(values))


def _exploded(column: pd.Series | None, rows: np.ndarray, *, ids: bool) -> tuple[np.ndarray, np.ndarray]:
    """(keys, rows) of a `;`-separated alias column, one entry per alias."""
    if column is None:
        return np.array([], dtype=object), np.array([], dtype=np.int64)
    parts = column.fillna("").str.split(";").explode()
    parts = parts[parts.str.strip() != ""]
    values = parts.to_numpy(dtype=object)
    return (_id_keys(values) if ids else _symbol_keys(values)), rows[parts.index.to_numpy()]


def _lookup(keys: np.ndarray, rows: np.ndarray) -> pd.Series:
    """key -> row, AMBIGUOUS where one key names several rows."""
    pairs = pd.DataFrame({"key": keys, "row": rows}).drop_duplicates()
    shared = pairs["key"].duplicated(keep=False)
    pairs.loc[shared, "row"] = AMBIGUOUS
    pairs = pairs.drop_duplicates("key")
    return pd.Series(pairs["row"].to_numpy(dtype=np.int64), index=pd.Index(pairs["key"], dtype=object))


# --- mapping -------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FeatureMap:
    """Per input feature: the reference row (or UNMAPPED/AMBIGUOUS) and the rule that found it (-1: none)."""

    rows: np.ndarray
    rules: np.ndarray


def map_features(reference: GeneReference, ids: np.ndarray, symbols: np.ndarray) -> FeatureMap:
    """Map features by id, alias id, symbol, alias symbol (first unique match wins); vectorized."""
    id_keys, symbol_keys = _id_keys(ids), _symbol_keys(symbols)
    rows = np.full(len(ids), UNMAPPED, dtype=np.int64)
    rules = np.full(len(ids), -1, dtype=np.int8)
    for rule, (lookup, keys) in enumerate(zip(reference.lookups, (id_keys, id_keys, symbol_keys, symbol_keys))):
        open_ = rows < 0
        if not open_.any():
            break
        if lookup.empty:
            continue
        position = lookup.index.get_indexer(keys[open_])
        found = np.where(position >= 0, lookup.to_numpy()[position], UNMAPPED)
        hit = found >= 0
        where = np.flatnonzero(open_)
        rows[where[hit]] = found[hit]
        rules[where[hit]] = rule
        # Ambiguous under this rule, unless a later rule maps it uniquely.
        rows[where[found == AMBIGUOUS]] = AMBIGUOUS
    return FeatureMap(rows, rules)


def harmonize(reference: GeneReference, counts: sp.csr_matrix, ids: np.ndarray, symbols: np.ndarray,
              own_ids: np.ndarray, policy: Unmapped, sample: str
              ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, GeneMapping]:
    """Counts on reference genes (features of one gene summed), their ids and symbols, and the report.

    `own_ids` name the features kept unmapped under policy `keep`. Raises SourceError when most
    features do not map, or any does not under policy `fail`.
    """
    mapped = map_features(reference, ids, symbols)
    ok = mapped.rows >= 0
    failed = np.flatnonzero(~ok)
    examples = [f"{ids[i]} ({symbols[i]})" if ids[i] != symbols[i] else str(ids[i]) for i in failed[:EXAMPLES]]
    n = len(ids)
    if n and ok.sum() < MIN_MAPPED * n:
        raise SourceError(
            f"sample {sample}: only {int(ok.sum())} of {n} features map onto the gene reference "
            f"{Location(reference.path).name} (unmapped e.g. {', '.join(examples)})",
            hint=f"{likely_cause(ids, symbols)}; or fix genes.reference")
    if len(failed) and policy == "fail":
        raise SourceError(
            f"sample {sample}: {len(failed)} features do not map onto the gene reference "
            f"{Location(reference.path).name}: {', '.join(examples)}",
            hint="add them to the reference (or as aliases), or set genes.unmapped to drop or keep")
    # Output columns: the sample's reference genes in reference order, then its kept features.
    targets = np.unique(mapped.rows[ok])
    column = np.full(n, -1, dtype=np.int64)
    column[ok] = np.searchsorted(targets, mapped.rows[ok])
    out_ids, out_symbols = reference.ids[targets], reference.symbols[targets]
    kept = failed if policy == "keep" else failed[:0]
    if len(kept):
        column[kept] = len(targets) + np.arange(len(kept))
        out_ids = np.concatenate([out_ids, own_ids[kept]]).astype(object)
        out_symbols = np.concatenate([out_symbols, symbols[kept]]).astype(object)
    if not pd.Index(out_ids).is_unique:
        clash = pd.Index(out_ids)[pd.Index(out_ids).duplicated()][0]
        raise SourceError(f"sample {sample}: kept unmapped feature {clash!r} has the id of a reference gene",
                          hint="rename the feature, or set genes.unmapped to drop")
    used = np.flatnonzero(column >= 0)
    # A features x genes 0/1 matrix: the product sums the features of one gene (int64: no overflow).
    assign = sp.csr_matrix((np.ones(len(used), dtype=np.int64), (used, column[used])),
                           shape=(n, len(out_ids)))
    harmonized = (counts.astype(np.int64) @ assign).tocsr()
    counts_by_rule = np.bincount(mapped.rules[ok], minlength=len(RULES))
    report = GeneMapping(
        features=n, **{rule: int(c) for rule, c in zip(RULES, counts_by_rule)},
        unmapped=int((mapped.rows == UNMAPPED).sum()), ambiguous=int((mapped.rows == AMBIGUOUS).sum()),
        kept=len(kept), dropped=len(failed) - len(kept), summed=int(ok.sum()) - len(targets),
        genes=len(out_ids), examples=examples)
    return harmonized, out_ids.astype(object), out_symbols.astype(object), report


# --- organism guard ------------------------------------------------------------------------------

def detect(ids: np.ndarray, symbols: np.ndarray) -> tuple[str, str] | None:
    """(what the genes look like, evidence) from Ensembl prefixes or symbol case; None when unclear.

    "What they look like" is an organism name for a prefix, or a symbol convention (upper, title).
    """
    n = len(ids)
    if n == 0:
        return None
    prefixes = pd.Series(ids, dtype=object).astype(str).str.upper().str.extract(_ENSEMBL, expand=False).dropna()
    if len(prefixes) >= MIN_MAPPED * n:
        counts = prefixes.value_counts()
        prefix, hits = counts.index[0], int(counts.iloc[0])
        if hits >= MIN_MAPPED * n:
            organism = _BY_PREFIX.get(prefix, f"an organism with Ensembl prefix {prefix}")
            return organism, f"{hits} of {n} gene ids start with {prefix}"
    text = pd.Series(symbols, dtype=object).astype(str)
    letters = text[text.str.contains("[A-Za-z]{2}", regex=True)]
    if len(letters) < 10:
        return None
    # "orf" is lower case in human symbols too (C21orf58).
    lower = letters.str.replace("orf", "", regex=False).str.contains("[a-z]", regex=True)
    title = letters.str.match(r"^[A-Z0-9][a-z0-9\-\.]*[a-z][a-z0-9\-\.]*$")
    if (~lower).mean() > 0.9:
        return "upper", f"{int((~lower).sum())} of {len(letters)} symbols are upper case (like CD3E)"
    if title.mean() > MIN_MAPPED:
        return "title", f"{int(title.sum())} of {len(letters)} symbols are title case (like Cd3e)"
    return None


def check_organism(organism: str, ids: np.ndarray, symbols: np.ndarray, sample: str) -> None:
    """Refuse a sample whose genes clearly belong to another organism than the declared one."""
    expected = ORGANISMS.get(organism)
    seen = detect(ids, symbols)
    if expected is None or seen is None:
        return
    looks, evidence = seen
    if looks == (expected[1] if looks in _CONVENTIONS else organism):
        return
    raise SourceError(
        f"sample {sample}: its genes look like {_describe(looks)}, not {organism} ({evidence})",
        hint="check the sample, or set `organism:` on its study in the manifest for a deliberate cross-species atlas")


def likely_cause(ids: np.ndarray, symbols: np.ndarray) -> str:
    """A guess at why a sample's features do not map, for the error message."""
    seen = detect(ids, symbols)
    looks = f" (the sample's genes look like {_describe(seen[0])}: {seen[1]})" if seen else ""
    return (f"likely cause: the reference is of another organism than the sample{looks}, "
            "or the sample's id/symbol columns hold something else than gene ids and symbols")


def _describe(looks: str) -> str:
    if looks == "upper":
        return "human or primate genes (upper-case symbols)"
    if looks == "title":
        return "mouse or rat genes (title-case symbols)"
    return looks
