"""What the featurisation benchmark checks besides speed (bench/featurize.py runs them).

- Our image lists against pymatgen's `get_neighbor_list` on the same stored cells, and our
  cells against the reference preprocessing's primitive standard cells.
- gemmi against pymatgen as CIF readers: on the real input CIFs, on the same crystals
  re-written with symmetry, on partial occupancies and special positions, and on malformed
  text; and which reader `structures.parse` takes for each.
"""

from __future__ import annotations

import time

import numpy as np

REFERENCE_CUTOFF = 6.93  # Å, the reference preprocessing's neighbour radius
TIE_TOLERANCE = 1e-6  # Å: a neighbour this close to the cutoff may fall either side
GEMMI_SAMPLE = 100  # crystals re-written with symmetry for the gemmi checks


# --- readers ------------------------------------------------------------------------------------


def structure_of(cif: str):
    from pymatgen.core import Structure

    return Structure.from_str(cif, "cif")


def gemmi_sites(cif: str):
    """CIF text to (lattice, frac, numbers, occupancy) with gemmi, symmetry applied."""
    import gemmi

    small = gemmi.make_small_structure_from_block(gemmi.cif.read_string(cif)[0])
    sites = small.get_all_unit_cell_sites()
    lattice = np.array(small.cell.orth.mat.tolist()).T
    frac = np.array([site.fract.tolist() for site in sites]).reshape(-1, 3)
    numbers = np.array([site.element.atomic_number for site in sites])
    return lattice, frac, numbers, np.array([site.occ for site in sites])


def pymatgen_cif(cif: str):
    from pymatgen.io.cif import CifParser

    return CifParser.from_str(cif).parse_structures(primitive=False)[0]


# --- our image lists against pymatgen's -----------------------------------------------------------


def correctness(raws: list) -> dict:
    """Our neighbours within 6.93 Å against pymatgen's get_neighbor_list on our stored cell."""
    from pymatgen.core import Lattice, Structure

    from crystalformer.conf import default_settings
    from crystalformer.featurize import featurize_chunk

    result = featurize_chunk(raws, default_settings())
    mismatches, ties_only, worst_distance = [], 0, 0.0
    for row in result.rows:
        crystal, images = row.crystal, row.images
        structure = Structure(
            Lattice(crystal.lattice), crystal.numbers.tolist(), crystal.frac_coords
        )
        theirs = np.sort(structure.get_neighbor_list(REFERENCE_CUTOFF)[3])
        i, j = np.divmod(images.pair, crystal.n_atoms)
        keep = (images.dist <= REFERENCE_CUTOFF) & ((i != j) | images.shift.any(axis=1))
        ours = np.sort(images.dist[keep])
        if len(ours) == len(theirs):
            if len(ours):
                worst_distance = max(worst_distance, float(np.abs(ours - theirs).max()))
            continue
        near = np.count_nonzero(np.abs(images.dist - REFERENCE_CUTOFF) <= TIE_TOLERANCE)
        near += np.count_nonzero(np.abs(theirs - REFERENCE_CUTOFF) <= TIE_TOLERANCE)
        if abs(len(ours) - len(theirs)) <= near:
            ties_only += 1
        else:
            mismatches.append({"id": crystal.id, "ours": len(ours), "pymatgen": len(theirs)})
    return {
        "crystals_checked": len(result.rows),
        "rejected": [(r.id, r.reason) for r in result.rejects],
        "neighbour_count_mismatches": len(mismatches),
        "mismatch_examples": mismatches[:5],
        "boundary_ties": ties_only,
        "max_distance_difference": worst_distance,
        "gemmi_vs_pymatgen": compare_parsers(raws),
    }


def compare_parsers(raws: list) -> dict:
    """gemmi and pymatgen on the same CIF text: sites, species, positions, and our path."""
    fast, differ, worst, failures = 0, [], 0.0, []
    for raw in raws:
        fast += our_path(raw.payload) == "gemmi"
        try:
            distance = site_distance(gemmi_sites(raw.payload), pymatgen_cif(raw.payload))
        except Exception as error:
            failures.append((raw.id, f"{type(error).__name__}: {str(error)[:100]}"))
            continue
        if distance is None:
            differ.append(raw.id)
        else:
            worst = max(worst, distance)
    return {
        "crystals": len(raws),
        "our_gemmi_path": fast,
        "different_sites": len(differ),
        "different_examples": differ[:5],
        "max_position_difference": worst,
        "failures": failures[:5],
    }


def site_distance(gemmi_result, structure) -> float | None:
    """Largest distance (Å) from a gemmi site to the nearest pymatgen site of the same element,
    both ways; None when the site counts or element counts differ."""
    _, frac, numbers, _ = gemmi_result
    theirs = np.array([site.specie.Z for site in structure])
    if len(numbers) != len(theirs) or sorted(numbers.tolist()) != sorted(theirs.tolist()):
        return None
    if not len(numbers):
        return 0.0
    d = frac[:, None, :] - structure.frac_coords[None, :, :]
    d -= np.round(d)
    distance = np.linalg.norm(d @ structure.lattice.matrix, axis=-1)
    distance[numbers[:, None] != theirs[None, :]] = np.inf
    return float(max(distance.min(axis=1).max(), distance.min(axis=0).max()))


def compare_with_reference(ours: dict, reference_rows: list, ids: list[str]) -> dict:
    """Our stored cell against the reference's primitive standard cell, crystal by crystal."""
    same_atoms = same_neighbours = compared = 0
    for raw_id, (atoms, neighbours) in zip(ids, reference_rows, strict=True):
        if raw_id in ours:
            compared += 1
            same_atoms += ours[raw_id]["atoms"] == atoms
            same_neighbours += ours[raw_id]["neighbours"] == neighbours
    return {
        "vs_reference_cell_same_atom_count": same_atoms,
        "vs_reference_cell_same_neighbour_count": same_neighbours,
        "vs_reference_cell_compared": compared,
    }


# --- gemmi beyond plain P1 ----------------------------------------------------------------------


def gemmi_checks(raws: list) -> dict:
    """gemmi against pymatgen on symmetrised CIFs, partial occupancies and malformed text."""
    return {
        "symmetrised": symmetrised_cifs(raws[:GEMMI_SAMPLE]),
        "partial_occupancy": partial_occupancy(),
        "malformed": malformed(raws[0].payload),
    }


def symmetrised_cifs(raws: list) -> dict:
    """Real crystals re-written by CifWriter(symprec=0.01): asymmetric unit + symmetry ops."""
    from pymatgen.io.cif import CifWriter

    texts = [str(CifWriter(structure_of(raw.payload), symprec=0.01)) for raw in raws]
    non_p1 = sum("_symmetry_Int_Tables_number   1\n" not in text for text in texts)
    differ, worst = 0, 0.0
    for text in texts:
        distance = site_distance(gemmi_sites(text), pymatgen_cif(text))
        if distance is None:
            differ += 1
        else:
            worst = max(worst, distance)
    timings = {}
    for name, function in (("gemmi", gemmi_sites), ("pymatgen", pymatgen_cif)):
        function(texts[0])
        start = time.perf_counter()
        for text in texts:
            function(text)
        timings[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / len(texts)
    return {
        "crystals": len(texts),
        "non_p1": non_p1,
        "different_sites": differ,
        "max_position_difference": worst,
        **timings,
    }


def partial_occupancy() -> dict:
    """A mixed site, a vacancy, and an atom 0.3 Å off a special position."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    rock_salt = Lattice.cubic(4.2)
    cases = {
        "(Mg0.5Fe0.5)O, P1": CifWriter(
            Structure(rock_salt, [{"Mg": 0.5, "Fe": 0.5}, "O"], [[0, 0, 0], [0.5] * 3])
        ),
        "(Mg0.5Fe0.5)O, Fm-3m": CifWriter(
            Structure(rock_salt, [{"Mg": 0.5, "Fe": 0.5}, "O"], [[0, 0, 0], [0.5] * 3]),
            symprec=0.01,
        ),
        "Mg0.7O (vacancy), P1": CifWriter(
            Structure(rock_salt, [{"Mg": 0.7}, "O"], [[0, 0, 0], [0.5] * 3])
        ),
    }
    out = {}
    for name, writer in cases.items():
        text = str(writer)
        _, _, numbers, occupancy = gemmi_sites(text)
        structure = pymatgen_cif(text)
        out[name] = {
            "gemmi_sites": [f"Z{z}:{o:g}" for z, o in zip(numbers, occupancy, strict=True)],
            "pymatgen_sites": [site.species.formula for site in structure],
            "our_path": our_path(text),
        }
    # A P4/mmm cell with one Cu site 0.15 Å above the z=0 mirror: two atoms 0.3 Å apart.
    text = SPLIT_SITE_CIF
    _, frac, numbers, _ = gemmi_sites(text)
    out["Cu 0.15 Å off a mirror (images 0.3 Å apart), P4/mmm"] = {
        "gemmi_sites": len(numbers),
        "pymatgen_sites": len(pymatgen_cif(text)),
    }
    return out


SPLIT_SITE_CIF = """data_split
_symmetry_space_group_name_H-M   'P 4/m m m'
_symmetry_Int_Tables_number   123
_cell_length_a   3.0
_cell_length_b   3.0
_cell_length_c   10.0
_cell_angle_alpha   90
_cell_angle_beta   90
_cell_angle_gamma   90
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Cu  Cu1  0.0  0.0  0.015  1
"""


def malformed(good: str) -> dict:
    """What gemmi, pymatgen and our featurize_chunk make of broken CIF text."""
    lines = good.splitlines()

    def without(prefix: str) -> str:
        return "\n".join(line for line in lines if not line.startswith(prefix))

    first_site = next(line for line in lines[::-1] if line.startswith("  ")).split()
    coordinates = "  ".join(first_site[3:6])
    cases = {
        "truncated in the atom loop": "\n".join(lines[:-1]) + "\n  " + first_site[0] + "  X9  1",
        "no atom loop": "\n".join(lines[:12]),
        "no data_ header": without("data_"),
        "POSCAR text": "NaCl\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n1 1\ndirect\n0 0 0\n.5 .5 .5\n",
        "coordinate 'abc'": good.replace(coordinates, "abc  " + "  ".join(first_site[4:6]), 1),
        "no _cell_length_c": without("_cell_length_c"),
        "no _cell_angle_alpha": without("_cell_angle_alpha"),
        "element 'Xx'": good.replace(f"  {first_site[0]}  {first_site[1]}", "  Xx  Xx1", 1),
        "occupancy '?'": good.replace(f"{coordinates}  1", f"{coordinates}  ?", 1),
        "uncertainty 0.625(3)": good.replace(coordinates, coordinates.replace("  ", "(3)  ", 1), 1),
        "two data blocks": good + "\n" + good.replace("data_", "data_second", 1),
    }
    return {name: malformed_outcome(text) for name, text in cases.items()}


def malformed_outcome(text: str) -> dict:
    import gemmi
    from pymatgen.io.cif import CifParser

    from crystalformer.conf import default_settings
    from crystalformer.featurize import featurize_chunk
    from crystalformer.records import RawInput

    try:
        doc = gemmi.cif.read_string(text)
        small = gemmi.make_small_structure_from_block(doc[0])
        cell = small.cell
        gemmi_says = (
            f"{len(small.sites)} sites, {len(doc)} block(s), cell "
            f"{cell.a:g} {cell.b:g} {cell.c:g} {cell.alpha:g} {cell.beta:g} {cell.gamma:g}"
        )
        first = small.sites[0] if small.sites else None
        if first is not None:
            gemmi_says += (
                f", first site {first.element.name} {first.fract.tolist()} occ {first.occ:g}"
            )
    except Exception as error:
        gemmi_says = f"{type(error).__name__}: {str(error)[:80]}"
    try:
        structures = CifParser.from_str(text).parse_structures(primitive=False)
        pymatgen_says = f"{[len(s) for s in structures]} sites"
    except Exception as error:
        pymatgen_says = f"{type(error).__name__}: {str(error)[:80]}"
    result = featurize_chunk([RawInput("x", "bench", "cif", text)], default_settings())
    if result.rows:
        crystal = result.rows[0].crystal
        lengths = np.linalg.norm(crystal.lattice, axis=1)
        ours = f"accepted: {result.rows[0].formula}, |a|,|b|,|c| = {np.round(lengths, 3).tolist()}"
    else:
        ours = f"rejected ({result.rejects[0].stage}): {result.rejects[0].reason[:90]}"
    return {
        "gemmi": gemmi_says,
        "pymatgen": pymatgen_says,
        "ours": ours,
        "our_path": our_path(text),
    }


def our_path(text: str) -> str:
    """Which reader `structures.parse` uses for this text (a private function: may move)."""
    from crystalformer import structures

    fast = getattr(structures, "_read_p1_cif_with_gemmi", None)
    if fast is None:
        return "unknown"
    return "gemmi" if fast(text) is not None else "pymatgen"


# --- reporting ----------------------------------------------------------------------------------


def print_check(check: dict, agreement: dict) -> None:
    print(
        f"\ncorrectness on {check['crystals_checked']} accepted crystals "
        f"({len(check['rejected'])} rejected): neighbours within {REFERENCE_CUTOFF} Å vs "
        f"pymatgen get_neighbor_list on our stored cell: {check['neighbour_count_mismatches']} "
        f"mismatches, {check['boundary_ties']} boundary ties, largest distance difference "
        f"{check['max_distance_difference']:.2e} Å"
    )
    for example in check["mismatch_examples"]:
        print(f"  mismatch {example}")
    for raw_id, reason in check["rejected"][:5]:
        print(f"  rejected {raw_id}: {reason}")
    print(
        f"vs the reference's primitive standard cell: same atom count "
        f"{agreement['vs_reference_cell_same_atom_count']}/{agreement['vs_reference_cell_compared']}"
        f", same neighbour count {agreement['vs_reference_cell_same_neighbour_count']}"
        f"/{agreement['vs_reference_cell_compared']}"
    )


def print_gemmi(real: dict, findings: dict) -> None:
    print(
        f"\ngemmi vs pymatgen on the {real['crystals']} input CIFs: {real['different_sites']} "
        f"with different sites, largest position difference {real['max_position_difference']:.2e}"
        f" Å, {real['our_gemmi_path']} took our gemmi path, failures {real['failures']}"
    )
    sym = findings["symmetrised"]
    print(
        f"symmetrised (CifWriter symprec=0.01, {sym['non_p1']}/{sym['crystals']} non-P1): "
        f"{sym['different_sites']} with different sites, largest position difference "
        f"{sym['max_position_difference']:.2e} Å; gemmi {sym['gemmi_ms']:.3f} ms, pymatgen "
        f"{sym['pymatgen_ms']:.3f} ms per CIF"
    )
    print("partial occupancy and special positions (sites as read):")
    for name, outcome in findings["partial_occupancy"].items():
        path = f", our reader: {outcome['our_path']}" if "our_path" in outcome else ""
        sites = f"gemmi {outcome['gemmi_sites']}, pymatgen {outcome['pymatgen_sites']}"
        print(f"  {name}: {sites}{path}")
    print("malformed text:")
    for name, outcome in findings["malformed"].items():
        print(f"  {name} [{outcome['our_path']}]")
        for who in ("gemmi", "pymatgen", "ours"):
            print(f"      {who:<9}{outcome[who]}")
