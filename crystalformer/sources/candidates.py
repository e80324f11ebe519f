"""Screening candidates: known crystals × likely ionic substitutions.

The parents are pymatgen's 288 AFLOW prototype structures by default, or the crystals a user
names (`InputParents`: bundled datasets, featurised dataset folders, CIF/POSCAR/JSON files,
tables and folders of them). Each parent gets oxidation states from
`Composition.oxi_state_guesses()`: the most probable guess whose states are all integers and
all in the ICSD-derived substitution table (Hautier et al., Inorg. Chem. 50, 656 (2011)).
Parents with no such guess (elements, intermetallics, mixed valence such as Fe3O4, anions
the table lacks such as Te2- or As3-), with more sites than `max_atoms`, with partially
occupied sites, with the id of an earlier parent, or that cannot be read are skipped,
counted, and written with the reason to `<stem>.rejects.csv` beside the table. Every
species of a parent is then replaced by a species of the table, keeping the substitutions
whose probability Π P(new | old) (`SubstitutionProbability.cond_prob`, the product pymatgen's
`SubstitutionPredictor.list_prediction` ranks by) reaches the threshold and that leave the
cell charge-balanced. Sites keep the parent's lattice and coordinates; the candidate's
structure has plain elements.

Output order is explicit, never hash order: prototypes by parent name (inputs in the order
they are read: files by name, table rows in order), then within one parent by falling
probability and then the substitution text. Duplicates are removed by `structure_hash`
(exact, site-order-free) across all parents: two oxidation-state assignments with the same
elements give the same crystal, and only the first (most probable) is kept; a candidate equal
to any parent is dropped too. Crystals that are alike but not equal, such as the same
structure type substituted from two parents with different lattice parameters, are all kept.
The hashes seen are held in an on-disk index (`IdIndex`, a scratch file in the temporary
folder) and the table is written in row groups, so memory does not grow with the number of
candidates (peak RSS 359 MiB for 100,000 from mp2018, 415 MiB for 1,000,000).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator
from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY
from pymatgen.analysis.structure_prediction.substitution_probability import (
    SubstitutionProbability,
)
from pymatgen.core import Composition, Element, Species, Structure

from crystalformer.conf import CONF_DIR, Strict, load_yaml
from crystalformer.featurize import ELEMENT_SYMBOLS, reduced_formula
from crystalformer.idindex import IdIndex
from crystalformer.records import Crystal, InputRejected, RawInput, Reject
from crystalformer.shards import REJECT_COLUMNS, Manifest, iter_crystals, rejects_path, write_atomic
from crystalformer.sources import count_all, resolve
from crystalformer.structures import crystal_from_structure, load, structure_hash

ROWS_PER_WRITE = 1000
TABLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parent", pa.string()),
        ("substitution", pa.string()),
        ("probability", pa.float64()),
        ("structure", pa.string()),
    ]
)


class GenerateConfig(Strict):
    """conf/generate.yaml: which substitutions of which parents become candidates."""

    threshold: float = Field(1e-3, gt=0, le=1)
    elements: list[str] | None = Field(None, min_length=1)
    max_atoms: int = Field(64, ge=1)
    max_substitutions_per_prototype: int | None = Field(None, ge=1)  # per parent
    max_candidates: int | None = Field(None, ge=1)

    @field_validator("elements")
    @classmethod
    def _known_elements(cls, elements: list[str] | None) -> list[str] | None:
        unknown = [symbol for symbol in elements or [] if not Element.is_valid_symbol(symbol)]
        if unknown:
            raise ValueError(f"not element symbols: {', '.join(unknown)}")
        return elements


def generate_config(conf_dir: Path = CONF_DIR) -> GenerateConfig:
    return load_yaml(Path(conf_dir) / "generate.yaml", GenerateConfig)


@dataclass(frozen=True)
class Parent:
    """A crystal to substitute into. `name` begins the ids of its candidates: the AFLOW label
    plus the prototype's formula (the label alone names several prototypes), or the input id."""

    name: str
    crystal: Crystal
    origin: str = ""


@dataclass(frozen=True)
class Candidate:
    """A substituted parent. `substitution` lists only the elements that change, as `changes`
    (old, new) pairs do; the structure is the parent's with those elements replaced."""

    id: str
    parent: str
    substitution: str
    probability: float
    changes: tuple[tuple[str, str], ...]
    parent_json: _StructureJson = field(repr=False, compare=False)

    def structure_json(self) -> str:
        """The candidate as pymatgen Structure JSON (`Structure.as_dict()`)."""
        return self.parent_json.with_elements(dict(self.changes))

    def as_dict(self) -> dict[str, Any]:
        return json.loads(self.structure_json())

    @property
    def structure(self) -> Structure:
        return Structure.from_dict(self.as_dict())


@dataclass(frozen=True)
class _StructureJson:
    """A parent's `Structure.as_dict()` JSON cut where its element symbols go, so that a
    candidate's costs a join: encoding each candidate's floats was the largest cost of
    generation (json.dumps: 30 of 113 profiled seconds for 51,553 candidates from 400 mp2018
    parents)."""

    head: str  # up to the sites
    symbols: tuple[str, ...]  # element of each site
    sites: tuple[str, ...]  # each site's JSON after its species and label

    @classmethod
    def of(cls, crystal: Crystal) -> _StructureJson:
        symbols = tuple(ELEMENT_SYMBOLS[z - 1] for z in crystal.numbers.tolist())
        data = Structure(crystal.lattice, symbols, crystal.frac_coords).as_dict()
        sites = data.pop("sites")
        head = json.dumps({**data, "sites": []})[: -len("]}")]
        rests = []
        for site in sites:
            rest = {k: v for k, v in site.items() if k not in ("species", "label")}
            rests.append(json.dumps(rest)[1:])  # '"abc": [...], "properties": {}, ...}'
        return cls(head, symbols, tuple(rests))

    def with_elements(self, new: dict[str, str]) -> str:
        sites = []
        for symbol, rest in zip(self.symbols, self.sites, strict=True):
            symbol = new.get(symbol, symbol)  # symbols need no JSON escaping
            species = f'"species": [{{"element": "{symbol}", "occu": 1}}]'
            sites.append(f'{{{species}, "label": "{symbol}", {rest}')
        return f"{self.head}{', '.join(sites)}]}}"


@dataclass
class GenerationCounts:
    """What generation looked at and why it dropped what it did; filled in as it runs."""

    parents: int = 0
    unreadable: int = 0  # could not be read, parsed or validated (first ones in `rejects`)
    repeated_ids: int = 0  # a parent with the id of an earlier one: its ids would clash
    disordered: int = 0  # partially occupied sites: no one element per site to replace
    too_large: int = 0  # more sites than max_atoms
    no_oxidation_states: int = 0
    substitutions: int = 0  # to allowed elements, charge-balanced, at or above the threshold
    unchanged: int = 0  # no element changed (at most an oxidation state): the parent itself
    equal_to_parent: int = 0  # the same crystal as one of the parents
    duplicates: int = 0  # the same crystal as an earlier candidate
    over_prototype_cap: int = 0  # beyond max_substitutions_per_prototype of its parent
    candidates: int = 0
    # called with each skipped parent and why (write_generation writes them to a CSV)
    on_skip: Callable[[Reject], object] | None = field(default=None, repr=False, compare=False)

    def line(self) -> str:
        """'parents 288, unreadable 0, ...' for a person."""
        numbers = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "on_skip"}
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in numbers.items())

    def skipped(self) -> int:
        """Parents skipped: every one of them a line of the rejects."""
        return (
            self.unreadable + self.repeated_ids + self.disordered + self.too_large
            + self.no_oxidation_states
        )  # fmt: skip

    def skip(self, reason: str, reject: Reject) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        if self.on_skip is not None:
            self.on_skip(reject)


ParentStream = Iterable[Parent | Reject]
_PARENT = ""  # IdIndex origin of a parent's structure hash; a candidate's is its id


def generate_candidates(
    config: GenerateConfig,
    counts: GenerationCounts | None = None,
    parents: ParentStream | None = None,
    progress: Callable[[], None] | None = None,
) -> Iterator[Candidate]:
    """Candidates in their fixed order, one parent's worth in memory at a time.

    `parents` (default: the AFLOW prototypes) is read twice: first every parent's structure
    hash (so that a candidate equal to a later parent is dropped too), then the substitutions.
    `progress` is called once per parent of the second pass (the first only parses and
    hashes: 8 s of the 3.4 min that 1,000,000 candidates from mp2018 took). `max_candidates`
    stops the stream after that many, so it keeps the first parents;
    `max_substitutions_per_prototype` keeps the most probable of every parent.
    """
    counts = counts if counts is not None else GenerationCounts()
    parents = parents if parents is not None else aflow_prototypes()
    if iter(parents) is parents:
        raise TypeError("parents are read twice: pass a sequence or InputParents, not an iterator")
    allowed = frozenset(config.elements) if config.elements is not None else None
    seen = IdIndex(Path(tempfile.gettempdir()))
    try:
        for parent in parents:
            if isinstance(parent, Parent):
                seen.first_read(structure_hash(parent.crystal), _PARENT)
        stream = (
            candidate
            for parent in parents
            for candidate in _parent_candidates(parent, config, allowed, seen, counts, progress)
        )
        for candidate in islice(stream, config.max_candidates):
            counts.candidates += 1
            yield candidate
    finally:
        seen.close()


def _parent_candidates(
    parent: Parent | Reject,
    config: GenerateConfig,
    allowed: frozenset[str] | None,
    seen: IdIndex,
    counts: GenerationCounts,
    progress: Callable[[], None] | None,
) -> Iterator[Candidate]:
    counts.parents += 1
    if progress is not None:
        progress()
    if isinstance(parent, Reject):
        counts.skip("unreadable", parent)
        return
    first = seen.first_read(f"id {parent.name}", parent.origin)
    if first is not None:
        reason = f"id read before, from {first}: its candidates' ids would clash"
        counts.skip("repeated_ids", _reject(parent, "duplicate", reason))
        return
    crystal = parent.crystal
    if crystal.disorder is not None:
        reason = "partially occupied sites: substitution needs one element per site"
        counts.skip("disordered", _reject(parent, "validate", reason))
        return
    if crystal.n_atoms > config.max_atoms:
        reason = f"{crystal.n_atoms} sites, more than max_atoms ({config.max_atoms})"
        counts.skip("too_large", _reject(parent, "validate", reason))
        return
    elements, amounts = _reduced_composition(crystal.numbers)
    species = _oxidation_states(elements, amounts)
    if species is None:
        pairs = zip(elements, amounts, strict=True)
        formula = "".join(f"{e}{n if n > 1 else ''}" for e, n in pairs)
        reason = (
            f"no oxidation states of {formula} that are all integers and in the substitution "
            "table: nothing to substitute"
        )
        counts.skip("no_oxidation_states", _reject(parent, "substitute", reason))
        return
    found = _balanced_substitutions(species, amounts, config.threshold, allowed)
    counts.substitutions += len(found)
    kept = 0
    parent_json = None
    for probability, text, changes in found:
        if not changes:
            counts.unchanged += 1
            continue
        if kept == config.max_substitutions_per_prototype:
            counts.over_prototype_cap += 1
            continue
        name = f"{parent.name}:{text.replace(' ', '')}"
        numbers = _substituted(crystal.numbers, changes)
        hashed = structure_hash(
            Crystal(name, crystal.source, crystal.lattice, crystal.frac_coords, numbers)
        )
        first = seen.first_read(hashed, name)
        if first is not None:
            if first == _PARENT:
                counts.equal_to_parent += 1
            else:
                counts.duplicates += 1
            continue
        kept += 1
        if parent_json is None:
            parent_json = _StructureJson.of(crystal)
        yield Candidate(name, parent.name, text, probability, changes, parent_json)


def _reject(parent: Parent, stage: str, reason: str) -> Reject:
    return Reject(parent.name, parent.crystal.source, stage, reason, parent.origin)


def _reduced_composition(numbers: np.ndarray) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Element symbols in alphabetical order and their amounts divided by the common factor."""
    z, counts = np.unique(numbers, return_counts=True)
    divisor = math.gcd(*counts.tolist())
    symbols = [ELEMENT_SYMBOLS[k - 1] for k in z.tolist()]
    pairs = sorted(zip(symbols, (counts // divisor).tolist(), strict=True))
    return tuple(e for e, _ in pairs), tuple(n for _, n in pairs)


def _substituted(numbers: np.ndarray, changes: tuple[tuple[str, str], ...]) -> np.ndarray:
    new = numbers.copy()
    for old, symbol in changes:
        new[numbers == _atomic_number(old)] = _atomic_number(symbol)
    return new


@functools.cache
def _atomic_number(symbol: str) -> int:
    return Element(symbol).Z


@functools.lru_cache(maxsize=2**16)
def _oxidation_states(
    elements: tuple[str, ...], amounts: tuple[int, ...]
) -> tuple[Species, ...] | None:
    """The most probable guess of integer states the substitution table knows, or None
    (one per element, in the order of `elements`).

    pymatgen's guess takes ~30 ms a parent (seconds for many sites of a multivalent element),
    most of mp2018's generation time; it is asked only when some choice of the table's states
    balances the charge (for no intermetallic does one), and cached by reduced composition.
    """
    if not _balanceable(elements, amounts):
        return None
    known = _table().index
    composition = Composition(dict(zip(elements, amounts, strict=True)))
    for guess in composition.oxi_state_guesses(max_sites=-1):
        if all(float(q).is_integer() for q in guess.values()):
            species = tuple(Species(e, int(guess[e])) for e in elements)
            if all(sp in known for sp in species):
                return species
    return None


def _balanceable(elements: tuple[str, ...], amounts: tuple[int, ...]) -> bool:
    """Whether one state per element from the table sums to zero charge: what every guess
    _oxidation_states accepts has, so where none does, pymatgen need not be asked."""
    charges = {0}
    for element, amount in zip(elements, amounts, strict=True):
        states = _table().states.get(element, ())
        charges = {charge + amount * q for charge in charges for q in states}
    return 0 in charges


@functools.lru_cache(maxsize=256)
def _balanced_substitutions(
    species: tuple[Species, ...],
    amounts: tuple[int, ...],
    threshold: float,
    allowed: frozenset[str] | None,
) -> tuple[tuple[float, str, tuple[tuple[str, str], ...]], ...]:
    """(probability, text, changes) of the charge-balanced substitutions, most probable first
    and then by text; `amounts` are the parent's, per species."""
    symbols = _table().symbols
    found = []
    for new, probability in _substitutions(species, amounts, threshold, allowed):
        pairs = zip(species, new, strict=True)
        changes = tuple((old.symbol, symbols[k]) for old, k in pairs if old.symbol != symbols[k])
        text = ", ".join(f"{old}→{symbol}" for old, symbol in changes)
        found.append((probability, text, changes))
    return tuple(sorted(found, key=lambda f: (-f[0], f[1])))


def _substitutions(
    old: tuple[Species, ...],
    amounts: tuple[int, ...],
    threshold: float,
    allowed: frozenset[str] | None,
) -> Iterator[tuple[tuple[int, ...], float]]:
    """(new species as _table() indices, Π P(new | old)) at or above threshold, each new
    species used once, charge-balanced (Σ amount × state = 0).

    The search SubstitutionPredictor.list_prediction makes, over the allowed elements only and
    best options first, so a branch stops at the first option that cannot reach the threshold.
    Species are integers here: comparing pymatgen Species made the search 10x slower.
    """
    table = _table()
    options = [
        [(k, p) for k, p in _options(fixed) if allowed is None or table.symbols[k] in allowed]
        for fixed in old
    ]
    best = [o[0][1] if o else 0.0 for o in options]
    best_rest = [math.prod(best[i:]) for i in range(len(old) + 1)]
    last = len(old) - 1

    def search(chosen: tuple[int, ...], probability: float, charge: int):
        i = len(chosen)
        for k, p in options[i]:
            if probability * p * best_rest[i + 1] < threshold:
                break
            if k in chosen:
                continue
            new_charge = charge + amounts[i] * table.charges[k]
            if i < last:
                yield from search((*chosen, k), probability * p, new_charge)
            elif new_charge == 0:
                yield (*chosen, k), probability * p

    yield from search((), 1.0, 0)


@dataclass(frozen=True)
class _SpeciesTable:
    """The substitution table's species by atomic number and then state, as integers."""

    species: tuple[Species, ...]
    index: dict[Species, int]
    symbols: tuple[str, ...]
    charges: tuple[int, ...]
    states: dict[str, tuple[int, ...]]  # by element symbol


@functools.cache
def _table() -> _SpeciesTable:
    species = tuple(sorted(_substitution_table().species, key=lambda sp: (sp.Z, sp.oxi_state)))
    states: dict[str, tuple[int, ...]] = {}
    for sp in species:
        states[sp.symbol] = (*states.get(sp.symbol, ()), int(sp.oxi_state))
    return _SpeciesTable(
        species,
        {sp: k for k, sp in enumerate(species)},
        tuple(sp.symbol for sp in species),
        tuple(int(sp.oxi_state) for sp in species),
        states,
    )


@functools.cache
def _options(fixed: Species) -> tuple[tuple[int, float], ...]:
    """Every species of the table (its _table() index) with P(species | fixed), most
    probable first.

    P is SubstitutionProbability.cond_prob with its normaliser summed by math.fsum: pymatgen
    sums it in set order, so its value changes in the last bits with the str hash seed.
    """
    table = _substitution_table()
    weights = [math.exp(table.get_lambda(sp, fixed)) for sp in _table().species]
    total = math.fsum(weights)
    options = [(k, w / total) for k, w in enumerate(weights)]
    return tuple(sorted(options, key=lambda option: -option[1]))


@functools.cache
def _substitution_table() -> SubstitutionProbability:
    """Built once: pymatgen caches it only while someone holds it, and a build takes ~1 s."""
    return SubstitutionProbability()


@functools.cache
def aflow_prototypes() -> tuple[Parent, ...]:
    """pymatgen's AFLOW prototypes, sorted by parent name: the default parents."""
    prototypes = []
    for entry in AFLOW_PROTOTYPE_LIBRARY:
        crystal = crystal_from_structure(entry["snl"].structure, source="aflow")
        name = f"{entry['tags']['aflow']}-{reduced_formula(crystal)}"
        prototypes.append(Parent(name, replace(crystal, id=name), "pymatgen AFLOW library"))
    return tuple(sorted(prototypes, key=lambda p: p.name))


@dataclass(frozen=True)
class InputParents:
    """The crystals of what a user names (`--from`), in the order given: featurised dataset
    folders (their shards), and anything `sources.resolve` reads (dataset names, files,
    folders, tables). Each iteration reads them again; an input that cannot be read, parsed
    or validated comes as a Reject. A spec that names nothing is refused here, before any
    input is read."""

    specs: tuple[str, ...]

    def __post_init__(self) -> None:
        for spec in self.specs:
            if not _is_dataset_folder(spec):
                resolve(spec)  # raises FileNotFoundError, naming the spec

    def __iter__(self) -> Iterator[Parent | Reject]:
        for spec in self.specs:
            if _is_dataset_folder(spec):
                for crystal in iter_crystals(Path(spec)):
                    yield Parent(crystal.id, crystal, f"{spec}: {crystal.id}")
                continue
            inputs, _ = resolve(spec)
            for raw in inputs:
                if isinstance(raw, Reject):
                    yield raw
                    continue
                try:
                    crystal = load(raw)
                except InputRejected as error:
                    yield error.to_reject(raw)
                    continue
                yield Parent(raw.id, crystal, raw.origin)

    def count(self) -> int | None:
        """How many parents an iteration yields, for a progress bar (None: not cheap to know)."""
        folders = [spec for spec in self.specs if _is_dataset_folder(spec)]
        others = count_all(spec for spec in self.specs if spec not in folders)
        if others is None:
            return None
        return others + sum(shard.rows for f in folders for shard in Manifest.load(f).shards)


def _is_dataset_folder(spec: str) -> bool:
    return Manifest.load(Path(spec)) is not None


def candidates_to_raw_inputs(
    candidates: Iterable[Candidate], source: str = "generated"
) -> Iterator[RawInput]:
    """Candidates as inputs for featurize_chunk; origin names the parent and the substitution."""
    for candidate in candidates:
        yield RawInput(
            id=candidate.id,
            source=source,
            format="structure",
            payload=candidate.structure_json(),
            origin=f"{candidate.parent} {candidate.substitution}",
        )


def write_generation(
    config: GenerateConfig,
    parents: ParentStream | None,
    path: Path,
    progress: Callable[[], None] | None = None,
) -> tuple[int, GenerationCounts]:
    """`crystalformer generate`: the candidates table at `path` and, beside it,
    `<stem>.rejects.csv` with every parent skipped and why, written as they are met (each
    file renamed into place at the end); the rows written and the counts."""
    counts = GenerationCounts()
    rows = 0

    def write_rejects(tmp: Path) -> None:
        nonlocal rows
        with Path(tmp).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(REJECT_COLUMNS)
            counts.on_skip = lambda r: writer.writerow([getattr(r, c) for c in REJECT_COLUMNS])
            candidates = generate_candidates(config, counts, parents, progress)
            rows = write_candidates_table(candidates, path)

    write_atomic(rejects_path(Path(path)), write_rejects)
    return rows, counts


def write_candidates_table(candidates: Iterable[Candidate], path: Path) -> int:
    """Write a Parquet table that iter_path reads (id and structure JSON columns); returns rows.

    Written in row groups as the candidates arrive, then renamed into place.
    """
    path = Path(path)
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        with pq.ParquetWriter(tmp, TABLE_SCHEMA, compression="zstd") as writer:
            iterator = iter(candidates)
            while batch := list(islice(iterator, ROWS_PER_WRITE)):
                columns = {
                    "id": [c.id for c in batch],
                    "parent": [c.parent for c in batch],
                    "substitution": [c.substitution for c in batch],
                    "probability": [c.probability for c in batch],
                    "structure": [c.structure_json() for c in batch],
                }
                writer.write_table(pa.table(columns, schema=TABLE_SCHEMA))
                rows += len(batch)

    write_atomic(path, write)
    return rows
