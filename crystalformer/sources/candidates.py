"""Screening candidates from data pymatgen ships: AFLOW prototypes × likely ionic substitutions.

Each of pymatgen's 288 AFLOW prototype structures gets oxidation states from
`Composition.oxi_state_guesses()`: the most probable guess whose states are all integers and
all in the ICSD-derived substitution table (Hautier et al., Inorg. Chem. 50, 656 (2011)).
Prototypes with no such guess (elements, intermetallics, mixed valence such as Fe3O4, anions
the table lacks such as Te2- or As3-) are skipped and counted. Every species of a prototype is
then replaced by a species of the table, keeping the substitutions whose probability
Π P(new | old) (`SubstitutionProbability.cond_prob`, the product pymatgen's
`SubstitutionPredictor.list_prediction` ranks by) reaches the threshold and that leave the
cell charge-balanced. Sites keep the prototype's lattice and coordinates; the candidate's
structure has plain elements.

Output order is explicit, never hash order: prototypes by parent name, then within one
prototype by falling probability and then the substitution text. Duplicates are removed by
`structure_hash` (exact, site-order-free): two oxidation-state assignments with the same
elements give the same crystal, and only the first (most probable) is kept. Crystals that are
alike but not equal, such as the same structure type substituted from two prototypes with
different lattice parameters, are all kept.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator
from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY
from pymatgen.analysis.structure_prediction.substitution_probability import (
    SubstitutionProbability,
)
from pymatgen.core import Element, Species, Structure

from crystalformer.conf import CONF_DIR, Strict, load_yaml
from crystalformer.featurize import reduced_formula
from crystalformer.records import RawInput
from crystalformer.shards import write_atomic
from crystalformer.structures import crystal_from_structure, structure_hash

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
    """conf/generate.yaml: which substitutions of which prototypes become candidates."""

    threshold: float = Field(1e-3, gt=0, le=1)
    elements: list[str] | None = Field(None, min_length=1)
    max_atoms: int = Field(64, ge=1)
    max_substitutions_per_prototype: int | None = Field(None, ge=1)
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
class Candidate:
    """A substituted prototype. `parent` is the AFLOW label plus the prototype's formula (the
    label alone names several prototypes); `substitution` lists only the elements that change."""

    id: str
    parent: str
    substitution: str
    probability: float
    structure: Structure


@dataclass
class GenerationCounts:
    """What generation looked at and why it dropped what it did; filled in as it runs."""

    prototypes: int = 0
    too_large: int = 0
    no_oxidation_states: int = 0
    substitutions: int = 0  # to allowed elements, charge-balanced, at or above the threshold
    unchanged: int = 0  # no element changed (at most an oxidation state): the prototype itself
    duplicates: int = 0
    over_prototype_cap: int = 0
    candidates: int = 0


@dataclass(frozen=True)
class _Prototype:
    parent: str
    structure: Structure
    species: tuple[Species, ...] | None  # by element symbol; None: no usable oxidation states


def generate_candidates(
    config: GenerateConfig, counts: GenerationCounts | None = None
) -> Iterator[Candidate]:
    """Candidates in their fixed order, one prototype's worth in memory at a time.

    `max_candidates` stops the stream after that many, so it keeps the first prototypes by
    name; `max_substitutions_per_prototype` keeps the most probable of every prototype.
    """
    counts = counts if counts is not None else GenerationCounts()
    allowed = set(config.elements) if config.elements is not None else None
    seen: set[str] = set()
    stream = (
        candidate
        for prototype in _prototypes()
        for candidate in _prototype_candidates(prototype, config, allowed, seen, counts)
    )
    for candidate in islice(stream, config.max_candidates):
        counts.candidates += 1
        yield candidate


def _prototype_candidates(
    prototype: _Prototype,
    config: GenerateConfig,
    allowed: set[str] | None,
    seen: set[str],
    counts: GenerationCounts,
) -> Iterator[Candidate]:
    counts.prototypes += 1
    if len(prototype.structure) > config.max_atoms:
        counts.too_large += 1
        return
    if prototype.species is None:
        counts.no_oxidation_states += 1
        return
    amounts = prototype.structure.composition
    found = []
    for new, probability in _substitutions(prototype.species, config.threshold, allowed):
        pairs = list(zip(prototype.species, new, strict=True))
        if sum(amounts[old.element] * sp.oxi_state for old, sp in pairs) == 0:
            mapping = {old.symbol: sp.symbol for old, sp in pairs if old.symbol != sp.symbol}
            text = ", ".join(f"{old}→{sp}" for old, sp in mapping.items())
            found.append((probability, text, mapping))
    counts.substitutions += len(found)
    kept = 0
    for probability, text, mapping in sorted(found, key=lambda f: (-f[0], f[1])):
        if not mapping:
            counts.unchanged += 1
            continue
        if kept == config.max_substitutions_per_prototype:
            counts.over_prototype_cap += 1
            continue
        structure = prototype.structure.replace_species(mapping, in_place=False)
        hashed = structure_hash(crystal_from_structure(structure))
        if hashed in seen:
            counts.duplicates += 1
            continue
        seen.add(hashed)
        kept += 1
        name = f"{prototype.parent}:{text.replace(' ', '')}"
        yield Candidate(name, prototype.parent, text, probability, structure)


def _substitutions(
    old: tuple[Species, ...], threshold: float, allowed: set[str] | None
) -> Iterator[tuple[tuple[Species, ...], float]]:
    """(new species, Π P(new | old)) at or above threshold, each new species used once.

    The search SubstitutionPredictor.list_prediction makes, over the allowed elements only and
    best options first, so a branch stops at the first option that cannot reach the threshold.
    """
    options = [
        [(sp, p) for sp, p in _options(fixed) if allowed is None or sp.symbol in allowed]
        for fixed in old
    ]
    best = [o[0][1] if o else 0.0 for o in options]
    best_rest = [math.prod(best[i:]) for i in range(len(old) + 1)]

    def search(chosen: tuple[Species, ...], probability: float):
        i = len(chosen)
        if i == len(old):
            yield chosen, probability
            return
        for sp, p in options[i]:
            if probability * p * best_rest[i + 1] < threshold:
                break
            if sp not in chosen:
                yield from search((*chosen, sp), probability * p)

    yield from search((), 1.0)


@functools.cache
def _options(fixed: Species) -> tuple[tuple[Species, float], ...]:
    """Every species of the table with P(species | fixed), most probable first.

    P is SubstitutionProbability.cond_prob with its normaliser summed by math.fsum: pymatgen
    sums it in set order, so its value changes in the last bits with the str hash seed.
    """
    table = _substitution_table()
    species = sorted(table.species, key=lambda sp: (sp.Z, sp.oxi_state))
    weights = [math.exp(table.get_lambda(sp, fixed)) for sp in species]
    total = math.fsum(weights)
    options = zip(species, [w / total for w in weights], strict=True)
    return tuple(sorted(options, key=lambda option: -option[1]))


@functools.cache
def _substitution_table() -> SubstitutionProbability:
    """Built once: pymatgen caches it only while someone holds it, and a build takes ~1 s."""
    return SubstitutionProbability()


@functools.cache
def _prototypes() -> tuple[_Prototype, ...]:
    """pymatgen's AFLOW prototypes with their oxidation states, sorted by parent name."""
    prototypes = []
    for entry in AFLOW_PROTOTYPE_LIBRARY:
        structure = entry["snl"].structure
        parent = f"{entry['tags']['aflow']}-{reduced_formula(crystal_from_structure(structure))}"
        prototypes.append(_Prototype(parent, structure, _oxidation_states(structure)))
    return tuple(sorted(prototypes, key=lambda p: p.parent))


def _oxidation_states(structure: Structure) -> tuple[Species, ...] | None:
    """The most probable guess of integer states the substitution table knows, or None."""
    known = _substitution_table().species
    for guess in structure.composition.oxi_state_guesses(max_sites=-1):
        if all(float(q).is_integer() for q in guess.values()):
            species = tuple(Species(e, int(q)) for e, q in sorted(guess.items()))
            if all(sp in known for sp in species):
                return species
    return None


def candidates_to_raw_inputs(
    candidates: Iterable[Candidate], source: str = "generated"
) -> Iterator[RawInput]:
    """Candidates as inputs for featurize_chunk; origin names the parent and the substitution."""
    for candidate in candidates:
        yield RawInput(
            id=candidate.id,
            source=source,
            format="structure",
            payload=candidate.structure.as_dict(),
            origin=f"{candidate.parent} {candidate.substitution}",
        )


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
                    "structure": [json.dumps(c.structure.as_dict()) for c in batch],
                }
                writer.write_table(pa.table(columns, schema=TABLE_SCHEMA))
                rows += len(batch)

    write_atomic(path, write)
    return rows
