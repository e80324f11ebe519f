"""Parse every supported input into a `Crystal`, and validate it.

CIF goes through gemmi when the file provably is a P1, fully occupied cell (about 200× faster
than pymatgen's parser); everything else goes through pymatgen, the field's reference reader,
which expands the symmetry. Every failure becomes an `InputRejected` with a reason a person
understands.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import Any

import gemmi
import numpy as np
from pymatgen.core import Structure
from pymatgen.core.periodic_table import DummySpecies
from pymatgen.io.cif import CifParser
from pymatgen.io.vasp import Poscar

from crystalformer.lattice import ImageList, closest_pair
from crystalformer.records import MAX_Z, Crystal, InputRejected, RawInput, SiteOccupancy

MIN_VOLUME = 0.1  # Å³
MAX_LENGTH = 1e4  # Å: no real cell vector comes near; 1e300 would overflow the volume
MIN_NORMALISED_VOLUME = 1e-4  # V / (|a||b||c|): 1 for a cube, 0 for coplanar vectors
OCCUPANCY_TOLERANCE = 1e-3
SAME_SITE = 0.01  # Å: atoms closer than this are one site written twice


def parse(raw: RawInput) -> Crystal:
    """Turn a raw input into a Crystal (not yet validated) or raise InputRejected."""
    readers = {
        "cif": _read_cif,
        "poscar": _read_poscar,
        "structure": _read_structure_dict,
        "arrays": _read_arrays,
    }
    if raw.format not in readers:
        raise InputRejected("parse", f"unknown input format {raw.format!r}")
    payload = raw.payload
    if payload is None or (isinstance(payload, str) and not payload.strip()):
        raise InputRejected("parse", f"empty {raw.format} input")
    lattice, frac, numbers, disorder = readers[raw.format](payload)
    return Crystal(
        id=raw.id,
        source=raw.source,
        lattice=lattice,
        frac_coords=frac,
        numbers=numbers,
        disorder=disorder,
        targets=dict(raw.targets),
        split=raw.split,
    )


def load(raw: RawInput) -> Crystal:
    """Parse and validate: the one call a source needs."""
    crystal = parse(raw)
    validate(crystal)
    return crystal


def crystal_from_structure(structure: Structure, id: str = "", source: str = "") -> Crystal:
    """A Crystal from a pymatgen Structure (validation not included)."""
    lattice, frac, numbers, disorder = _arrays_from_structure(structure)
    return Crystal(id, source, lattice, frac, numbers, disorder)


# --- readers: each returns (lattice, frac_coords, numbers, disorder) -------------------------


def _read_cif(text: str):
    try:
        doc = gemmi.cif.read_string(text)
    except Exception:  # pymatgen tries it too, and _cif_problem says what is wrong
        doc = None
    if doc is not None:
        fast = _read_p1_cif_with_gemmi(doc)  # every occupancy 1, when it reads the file
        if fast is not None:
            return fast
        _check_cif_occupancies(doc)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser = CifParser.from_str(text)
            # check_occu=False keeps occupancies that sum above 1 as written (pymatgen would
            # drop the structure without saying why), so `validate` can name the site.
            structures = parser.parse_structures(primitive=False, check_occu=False)
    except Exception as error:  # pymatgen raises many types for malformed text
        reason = _cif_problem(text) or f"unreadable CIF: {_first_line(error)}"
        raise InputRejected("parse", reason) from None
    if not structures:
        raise InputRejected("parse", "CIF holds no crystal structure")
    return _arrays_from_structure(structures[0])


def _cif_problem(text: str) -> str | None:
    """Why pymatgen could not read a CIF, in words (pymatgen's are internal), or None."""
    try:
        doc = gemmi.cif.read_string(text)
    except Exception as error:  # gemmi: "string:LINE:COL(OFFSET): message"
        where, _, message = str(error).partition(": ")
        line = where.split(":")[1] if where.count(":") >= 2 else "?"
        return (
            f"unreadable CIF: CIF syntax error at line {line}: {message or where} (truncated "
            "or corrupt file?)"
        )
    for block in doc:
        cell = [gemmi.cif.as_number(block.find_value(tag) or "?") for tag in _CIF_CELL_TAGS]
        lengths, angles = cell[:3], cell[3:]
        shown = ", ".join(block.find_value(tag) or "missing" for tag in _CIF_CELL_TAGS)
        if not all(0 <= x < math.inf for x in lengths) or not all(0 <= x <= 180 for x in angles):
            return (
                "unreadable CIF: missing or invalid cell parameters (a, b, c, alpha, beta, "
                f"gamma: {shown})"
            )
        volume = _cell_volume(lengths, angles)
        if volume < MIN_VOLUME:
            return (
                f"degenerate lattice: volume {volume:.3g} Å³ (a, b, c, alpha, beta, gamma: {shown})"
            )
    if not any(len(block.find_values(tag)) for block in doc for tag in _CIF_SITE_TAGS):
        return "unreadable CIF: no atom sites (no _atom_site_fract_x values: truncated file?)"
    return None


def _cell_volume(lengths: list[float], angles: list[float]) -> float:
    """Volume of the cell a, b, c, alpha, beta, gamma (degrees); 0 for impossible angles."""
    c = [math.cos(math.radians(x)) for x in angles]
    gram = 1 - c[0] ** 2 - c[1] ** 2 - c[2] ** 2 + 2 * c[0] * c[1] * c[2]
    return math.prod(lengths) * math.sqrt(max(gram, 0.0))


_CIF_CELL_TAGS = tuple(f"_cell_length_{x}" for x in "abc") + tuple(
    f"_cell_angle_{x}" for x in ("alpha", "beta", "gamma")
)
_CIF_SITE_TAGS = ("_atom_site_fract_x", "_atom_site_Cartn_x")
# How each symmetry tag gemmi reads (the standard CIF 1 ones) says P1, spaces removed and in
# lower case: the identity operation, the H-M or Hall symbol "P 1", the space-group number 1.
_P1_VALUES = {"x,y,z", "+x,+y,+z", "p1", "1"}


def _says_p1(small: gemmi.SmallStructure) -> bool:
    """Whether the CIF's symmetry tags say P1 and none says otherwise.

    Anything less (a space-group symbol alone, no symmetry at all) goes to pymatgen, which
    expands the symmetry; read as P1 it would be the asymmetric unit, a different crystal.
    """
    number = str(small.spacegroup_number) if small.spacegroup_number else ""
    values = [*small.symops, small.spacegroup_hm, small.spacegroup_hall, number]
    values = [value.replace(" ", "").lower() for value in values]
    values = [value for value in values if value not in ("", "?", ".")]  # absent or unknown
    return bool(values) and all(value in _P1_VALUES for value in values)


def _check_cif_occupancies(doc: gemmi.cif.Document) -> None:
    """Reject an occupancy <= 0 before pymatgen reads it (it stores 1e-8 without a word)."""
    for block in doc:
        occupancies = block.find_values("_atom_site_occupancy")
        for row, text in enumerate(occupancies):
            if gemmi.cif.as_number(text) <= 0:  # "?" and "." (pymatgen's 1) are NaN
                labels = block.find_values("_atom_site_label")
                same = len(labels) == len(occupancies)
                site = gemmi.cif.as_string(labels[row]) if same else f"row {row + 1}"
                raise _nonpositive_occupancy(text, site)


def _nonpositive_occupancy(occupancy: object, site: object) -> InputRejected:
    return InputRejected("parse", f"occupancy {occupancy} of site {site}: occupancies must be > 0")


def _read_p1_cif_with_gemmi(doc: gemmi.cif.Document):
    """Sites of a P1 CIF with every occupancy 1, or None to use pymatgen instead."""
    if len(doc) != 1:
        return None
    try:
        small = gemmi.make_small_structure_from_block(doc[0])
    except Exception:
        return None
    if not small.sites or not small.cell.is_crystal() or not _says_p1(small):
        # gemmi leaves a missing or invalid cell as a 1 Å cube: let pymatgen report it
        return None
    numbers = np.array([site.element.atomic_number for site in small.sites], dtype=np.int16)
    occupancy = np.array([site.occ for site in small.sites])
    if np.any(numbers < 1) or np.any(occupancy != 1.0):
        return None
    frac = np.array([site.fract.tolist() for site in small.sites], dtype=np.float64)
    lattice = np.array(small.cell.orth.mat.tolist(), dtype=np.float64).T
    return lattice, frac, numbers, None


def _read_poscar(text: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Poscar.from_str(text, read_velocities=False).structure
    except IndexError:  # pymatgen ran past the last line
        raise InputRejected(
            "parse",
            "unreadable POSCAR: the file ends early (truncated?); it needs a comment line, a "
            "scale, 3 lattice rows, element counts and one coordinate row per atom",
        ) from None
    except Exception as error:
        raise InputRejected("parse", f"unreadable POSCAR: {_first_line(error)}") from None
    return _arrays_from_structure(structure)


def _read_structure_dict(payload: str | dict[str, Any]):
    try:
        data = json.loads(payload) if isinstance(payload, str) else payload
        _check_dict_occupancies(data)
        structure = Structure.from_dict(data)
    except InputRejected:
        raise
    except Exception as error:
        raise InputRejected("parse", f"unreadable structure dict: {_first_line(error)}") from None
    return _arrays_from_structure(structure)


def _check_dict_occupancies(data: dict[str, Any]) -> None:
    """Reject an occupancy <= 0 (pymatgen refuses a negative one in words of its own and
    drops a zero one, leaving a site with no species)."""
    for index, site in enumerate(data.get("sites", [])):
        for species in site.get("species", []):
            occupancy = species.get("occu", 1)
            if isinstance(occupancy, int | float) and occupancy <= 0:
                raise _nonpositive_occupancy(occupancy, site.get("label") or index)


def _read_arrays(payload: str | dict[str, Any]):
    try:
        if isinstance(payload, str):
            payload = json.loads(payload)
        lattice = np.asarray(payload["lattice"], dtype=np.float64).reshape(3, 3)
        frac = np.asarray(payload["frac_coords"], dtype=np.float64).reshape(-1, 3)
        numbers = np.asarray(payload["numbers"]).reshape(-1)
    except (KeyError, TypeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise InputRejected("parse", f"malformed arrays input: {_first_line(error)}") from None
    if len(numbers) != len(frac):
        raise InputRejected("parse", f"{len(numbers)} species for {len(frac)} coordinates")
    if numbers.size and not np.issubdtype(numbers.dtype, np.integer):  # [] reads as float
        raise InputRejected("parse", "atomic numbers must be integers")
    return lattice, frac, numbers.astype(np.int16), None


def _arrays_from_structure(structure: Structure):
    lattice = np.array(structure.lattice.matrix, dtype=np.float64)
    frac = np.array(structure.frac_coords, dtype=np.float64).reshape(-1, 3)
    numbers, site, z, occupancy = [], [], [], []
    for index, species in enumerate(structure.species_and_occu):
        items = list(species.items())
        if not items:  # pymatgen drops a species of occupancy 0
            raise InputRejected("parse", f"site {index} has no species: occupancies must be > 0")
        for element, _ in items:
            if isinstance(element, DummySpecies) or element.Z < 1:
                symbol = getattr(element, "symbol", element)  # not str(): "X0+" for X
                raise InputRejected("parse", f"dummy or unknown element {symbol}")
        numbers.append(max(items, key=lambda item: item[1])[0].Z)
        if len(items) != 1 or items[0][1] != 1.0:
            site += [index] * len(items)
            z += [element.Z for element, _ in items]
            occupancy += [amount for _, amount in items]
    disorder = (
        SiteOccupancy(np.array(site), np.array(z, dtype=np.int16), np.array(occupancy))
        if site
        else None
    )
    return lattice, frac, np.array(numbers, dtype=np.int16), disorder


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


# --- validation --------------------------------------------------------------------------------


def validate(crystal: Crystal) -> None:
    """Reject what no model should see: raise InputRejected("validate", reason).

    Atoms that are too close are caught by `check_separation` on the image list, which
    featurisation computes anyway.
    """
    if crystal.n_atoms == 0:
        raise InputRejected("validate", "structure has no atoms")
    for name, values in (("lattice", crystal.lattice), ("coordinates", crystal.frac_coords)):
        if not np.all(np.isfinite(values)):
            raise InputRejected("validate", f"non-finite number in the {name}")
    lengths = np.hypot.reduce(crystal.lattice, axis=1)  # no overflow to inf, unlike norm
    if lengths.max() > MAX_LENGTH:
        raise InputRejected(
            "validate",
            f"lattice vector length {lengths.max():.3g} Å is too large (the maximum is "
            f"{MAX_LENGTH:g} Å)",
        )
    volume = abs(float(np.linalg.det(crystal.lattice)))
    if volume < MIN_VOLUME or volume < MIN_NORMALISED_VOLUME * float(np.prod(lengths)):
        raise InputRejected(
            "validate",
            f"degenerate lattice: cell volume {volume:.3g} Å³ for vector lengths "
            f"{', '.join(f'{x:.3g}' for x in lengths)} Å (vectors zero or nearly coplanar)",
        )
    _check_species(crystal)


def check_separation(images: ImageList, crystal: Crystal, min_distance: float) -> None:
    """Reject two atoms (periodic images included) closer than min_distance.

    Atoms within SAME_SITE of each other are one site written twice (two CIF rows, two
    JSON sites); when their occupancies sum above 1 that is the reason given.
    """
    n_atoms = crystal.n_atoms
    if np.count_nonzero(images.dist < min_distance) <= n_atoms:
        return  # only the n = 0 term of each atom with itself
    distance, i, j = closest_pair(images, n_atoms)
    if distance >= min_distance:
        return
    if distance < SAME_SITE:
        shared = np.unique(images.pair[(images.pair // n_atoms == i) & (images.dist < SAME_SITE)])
        total = float(site_occupancies(crystal)[shared % n_atoms].sum())
        if total > 1 + OCCUPANCY_TOLERANCE:
            raise InputRejected(
                "validate",
                f"occupancies of site {i} sum to {total:.4g} > 1 (atoms {i} and {j} share it, "
                f"{distance:.3f} Å apart)",
            )
    raise InputRejected(
        "validate",
        f"atoms {i} and {j} are {distance:.3f} Å apart (periodic images included); "
        f"the minimum is {min_distance} Å",
    )


def site_occupancies(crystal: Crystal) -> np.ndarray:
    """The total occupancy of each site: 1 for an ordered one."""
    totals = np.ones(crystal.n_atoms)
    disorder = crystal.disorder
    if disorder is not None:
        sums = np.bincount(disorder.site, weights=disorder.occupancy, minlength=crystal.n_atoms)
        totals[disorder.site] = sums[disorder.site]
    return totals


def _check_species(crystal: Crystal) -> None:
    numbers = crystal.numbers
    bad = numbers[(numbers < 1) | (numbers > MAX_Z)]
    if bad.size:
        raise InputRejected(
            "validate", f"element Z={int(bad[0])} is not supported (Z must be 1 to {MAX_Z})"
        )
    disorder = crystal.disorder
    if disorder is None:
        return
    if np.any((disorder.z < 1) | (disorder.z > MAX_Z)):
        raise InputRejected("validate", f"element outside Z=1..{MAX_Z} on a disordered site")
    if not np.all(np.isfinite(disorder.occupancy)) or np.any(disorder.occupancy <= 0):
        raise InputRejected("validate", "site occupancies must be finite and positive")
    totals = site_occupancies(crystal)
    worst = int(np.argmax(totals))
    if totals[worst] > 1 + OCCUPANCY_TOLERANCE:
        raise InputRejected(
            "validate", f"occupancies of site {worst} sum to {totals[worst]:.4g} > 1"
        )


# --- identity ---------------------------------------------------------------------------------


def site_types(crystal: Crystal, decimals: int | None = 6) -> np.ndarray:
    """One integer per distinct site composition, whatever the site order.

    Ordered sites keep their atomic number; disordered ones get 1000 + the rank of their
    composition among the crystal's distinct disordered compositions, occupancies compared
    to `decimals` places (None: exactly, as the model embeds them).
    """
    types = crystal.numbers.astype(np.int64)
    for rank, (_, sites) in enumerate(_disordered_compositions(crystal, decimals)):
        types[sites] = 1000 + rank
    return types


def _disordered_compositions(
    crystal: Crystal, decimals: int | None = 6
) -> list[tuple[tuple, list[int]]]:
    """Sorted (composition, sites) for the disordered sites; a composition is ((Z, occ), ...)."""
    disorder = crystal.disorder
    if disorder is None:
        return []
    occupancies = disorder.occupancy if decimals is None else np.round(disorder.occupancy, decimals)
    by_site: dict[int, list] = {}
    for site, z, occupancy in zip(
        disorder.site.tolist(),
        disorder.z.tolist(),
        occupancies.tolist(),
        strict=True,
    ):
        by_site.setdefault(site, []).append((z, occupancy))
    groups: dict[tuple, list[int]] = {}
    for site, composition in by_site.items():
        groups.setdefault(tuple(sorted(composition)), []).append(site)
    return sorted(groups.items())


def structure_hash(crystal: Crystal) -> str:
    """Content hash of the structure (not its id or labels), independent of site order.

    Coordinates are wrapped into the cell and rounded (lattice 1e-4 Å, fractions 1e-5) so the
    same crystal written twice hashes the same.
    """
    frac = np.round(crystal.frac_coords % 1.0, 5) % 1.0
    types = site_types(crystal)
    order = np.lexsort((frac[:, 2], frac[:, 1], frac[:, 0], types))
    digest = hashlib.sha256()
    digest.update(np.round(crystal.lattice, 4).astype(np.float64).tobytes())
    digest.update(types[order].tobytes())
    digest.update(frac[order].tobytes())
    compositions = [composition for composition, _ in _disordered_compositions(crystal)]
    digest.update(repr(compositions).encode())
    return digest.hexdigest()[:32]
