"""Batches of crystals as flat tensors: atoms, (i, j) pairs, and (pair, image) triples.

Crystals of any size share one batch with no padding between crystals: every per-crystal
quantity is a segment of a flat array, and every reduction is a scatter over segment ids.
Only the images are laid out in blocks: each atom's images fill whole blocks of IMAGE_BLOCK,
so per-atom sums over images are batched matrix products; the few padding images that fill
an atom's last block weigh exactly 0. Building a batch from a shard table is vectorised over
the whole table (no Python loop per crystal).

Without angles, a batch holds one atom per class of equivalent atoms (the shard's
`equivalent_atom`, e.g. a symmetry orbit): they get equal features in every layer, so each
class is computed once and counts with its multiplicity in the mean over atoms, and the
images of i to every atom of one class are the images of one pair (i, class): their keys
and values are equal, so the softmax over j and the sums over images are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from crystalformer.records import MAX_Z


class TensorBatch:
    """A dataclass of tensors (and plain numbers) that moves to a device as one."""

    def to(self, device: torch.device | str):
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(
            self, **{k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        )


@dataclass
class CrystalBatch(TensorBatch):
    """Flat tensors for a batch; `*_crystal`, `pair_*` and `image_pair` are segment ids."""

    n_crystals: int
    species_atom: torch.Tensor  # (S,) atom of each (atom, element, occupancy) triple
    species_z: torch.Tensor  # (S,) atomic number
    species_occupancy: torch.Tensor  # (S,) occupancy (1 for ordered sites)
    atom_crystal: torch.Tensor  # (A,) crystal of each atom
    atom_multiplicity: torch.Tensor  # (A,) atoms of the crystal it stands for (its class)
    pair_i: torch.Tensor  # (P,) attending atom (global index)
    pair_j: torch.Tensor  # (P,) attended atom (global index)
    pair_min_dist_sq: torch.Tensor  # (P,) squared distance of the pair's nearest image
    image_pair: torch.Tensor  # (T,) pair of each image (T: a multiple of IMAGE_BLOCK)
    image_atom: torch.Tensor  # (T,) attending atom i of each image's pair
    image_dist_sq: torch.Tensor  # (T,) squared distance of each image, Å²
    image_log_count: torch.Tensor  # (T,) log of how many of the pair's images it stands for:
    # log c for c merged images, -inf for padding, which stands for none (its weight is 0)
    max_distance: float = 0.0  # Å, of the farthest image (a plain number: no device sync)
    image_unit: torch.Tensor | None = None  # (T, 3) direction r̂ of each image, 0 for r = 0

    @property
    def n_atoms(self) -> int:
        return len(self.atom_crystal)

    @property
    def image_padding(self) -> torch.Tensor:
        """(T,) True for the padding images that fill each atom's last block."""
        return self.image_log_count == -torch.inf


def flat_list(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, offsets starting at 0."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


IMAGE_BLOCK = 32  # image slots per block; each atom's images fill whole blocks
SELF_DISTANCE = 1e-3  # Å: an image this close is the atom itself (atoms are ≥ 0.5 Å apart)


def batch_from_table(
    table: pa.Table, dtype: torch.dtype = torch.float32, image_vectors: bool = False
) -> CrystalBatch:
    """A batch from shard rows (columns of crystalformer.shards.base_schema).

    `image_vectors` adds each image's direction, rebuilt from `positions`, `lattice` and
    `image_shift` (r_ijn = p_j + n·L - p_i), for encoders that measure angles.
    """
    n_crystals = table.num_rows
    numbers, atom_offsets = flat_list(table["atomic_numbers"])
    n_atoms = np.diff(atom_offsets)
    atom_crystal = np.repeat(np.arange(n_crystals), n_atoms)

    species_atom, species_z, species_occ = species_triples(table, numbers, atom_offsets)

    pair_code, image_offsets = flat_list(table["image_pair"])
    dist, _ = flat_list(table["image_dist"])
    images_per_crystal = np.diff(image_offsets)
    image_crystal = np.repeat(np.arange(n_crystals), images_per_crystal)
    i, j = np.divmod(pair_code.astype(np.int64), n_atoms[image_crystal])
    global_i = atom_offsets[image_crystal] + i
    global_j = atom_offsets[image_crystal] + j
    # with angles, images of one pair differ in direction: every atom stays
    first = np.arange(len(numbers)) if image_vectors else _first_equivalent(table, atom_offsets)
    kept_atom = first == np.arange(len(numbers))  # each class's first atom
    new_index = np.cumsum(kept_atom) - 1
    multiplicity = np.bincount(first, minlength=len(numbers))[kept_atom]
    attending = kept_atom[global_i]
    global_i, global_j, dist = global_i[attending], global_j[attending], dist[attending]
    image_crystal = image_crystal[attending]
    global_i, global_j = new_index[global_i], new_index[first[global_j]]
    atom_crystal = atom_crystal[kept_atom]
    species_kept = kept_atom[species_atom]
    species_atom = new_index[species_atom[species_kept]]
    species_z, species_occ = species_z[species_kept], species_occ[species_kept]
    n_kept = len(atom_crystal)
    # images are grouped by pair within a crystal and crystals follow each other, so the
    # global pair key is non-decreasing and each new key starts a pair segment (merging
    # sorts them again after classes relabelled j)
    key = global_i * n_kept + global_j
    count = np.ones(len(key), np.int64)
    if not image_vectors:  # without angles, images of a pair at one distance are alike
        kept, count = merge_equal_distances(key, dist)
        key, dist, global_i, global_j = key[kept], dist[kept], global_i[kept], global_j[kept]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, int)
    image_pair = np.cumsum(np.r_[False, key[1:] != key[:-1]]) if len(key) else key
    dist_sq = dist.astype(np.float64) ** 2
    min_dist_sq = np.minimum.reduceat(dist_sq, starts) if len(starts) else dist_sq
    source, padding = image_blocks(global_i, n_kept)
    unit = None
    if image_vectors:
        unit = _image_units(table, image_crystal, global_i, global_j)[source]
        unit[padding] = 0.0
        unit = torch.from_numpy(unit).to(dtype)
    image_pair = image_pair[source]
    log_count = np.log(count)[source]
    log_count[padding] = -np.inf  # stands for no image: weight exp(-inf) = 0 for any σ
    dist_sq = dist_sq[source]
    return CrystalBatch(
        n_crystals=n_crystals,
        species_atom=torch.from_numpy(species_atom),
        species_z=torch.from_numpy(species_z),
        species_occupancy=torch.from_numpy(species_occ).to(dtype),
        atom_crystal=torch.from_numpy(atom_crystal),
        atom_multiplicity=torch.from_numpy(multiplicity).to(dtype),
        pair_i=torch.from_numpy(global_i[starts]),
        pair_j=torch.from_numpy(global_j[starts]),
        pair_min_dist_sq=torch.from_numpy(min_dist_sq).to(dtype),
        image_pair=torch.from_numpy(image_pair.astype(np.int64)),
        image_atom=torch.from_numpy(global_i[source]),
        image_dist_sq=torch.from_numpy(dist_sq).to(dtype),
        image_log_count=torch.from_numpy(log_count).to(dtype),
        max_distance=float(dist.max()) if len(dist) else 0.0,
        image_unit=unit,
    )


def batch_images(table: pa.Table, image_vectors: bool = False) -> np.ndarray:
    """Per row, the images its batch holds before merging: those of the first atom of each
    class of equivalent atoms (every image with `image_vectors`). Bounds a batch's memory."""
    pair_code, image_offsets = flat_list(table["image_pair"])
    image_row = np.repeat(np.arange(table.num_rows), np.diff(image_offsets))
    if image_vectors:
        return np.bincount(image_row, minlength=table.num_rows)
    _, atom_offsets = flat_list(table["atomic_numbers"])
    first = _first_equivalent(table, atom_offsets)
    attending = first == np.arange(len(first))
    i = pair_code // np.diff(atom_offsets)[image_row]
    kept = attending[atom_offsets[image_row] + i]
    return np.bincount(image_row[kept], minlength=table.num_rows)


def _first_equivalent(table: pa.Table, atom_offsets: np.ndarray) -> np.ndarray:
    """Per atom, the global index of the first atom equivalent to it (`equivalent_atom`);
    itself in rows without one (shards written before the column existed read as null)."""
    first = np.arange(atom_offsets[-1])
    if "equivalent_atom" not in table.column_names:
        return first
    values, offsets = flat_list(table["equivalent_atom"])
    n_atoms = np.diff(atom_offsets)
    first_atom = np.repeat(atom_offsets[:-1], n_atoms)
    has = np.repeat(np.diff(offsets) > 0, n_atoms)
    first[has] = first_atom[has] + values
    return first


def merge_equal_distances(key: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images kept, how many each stands for): one image per pair `key` and distance.

    The images of a pair at one distance (symmetry makes them common: half of all images
    of generated candidates) weigh alike in α, w and β, so one image with its count is the
    same sum. Distances must be exactly equal (the stored float32 values). Kept images are
    sorted by key, then distance.
    """
    order = np.lexsort((dist, key))
    key, dist = key[order], dist[order]
    first = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (dist[1:] != dist[:-1])])
    return order[first], np.diff(np.r_[first, len(key)])


def image_blocks(image_atom: np.ndarray, n_atoms: int) -> tuple[np.ndarray, np.ndarray]:
    """The blocked image layout: for each slot, the image it holds, and whether it is padding.

    Each atom's images, in order, fill blocks of IMAGE_BLOCK slots; the padding slots of its
    last block repeat its last image (same atom, pair and distance) with a count of 0.
    `image_atom` must be non-decreasing (images grouped by attending atom, as shards store
    them).
    """
    counts = np.bincount(image_atom, minlength=n_atoms)
    blocks = -(-counts // IMAGE_BLOCK)
    first_slot = (np.cumsum(blocks) - blocks) * IMAGE_BLOCK
    first_image = np.cumsum(counts) - counts
    slot = first_slot[image_atom] + np.arange(len(image_atom)) - first_image[image_atom]
    source = np.zeros(blocks.sum() * IMAGE_BLOCK, np.int64)
    source[slot] = np.arange(len(image_atom))
    padding = np.ones(len(source), bool)
    padding[slot] = False
    return np.maximum.accumulate(source), padding


def _image_units(
    table: pa.Table, image_crystal: np.ndarray, global_i: np.ndarray, global_j: np.ndarray
) -> np.ndarray:
    """Unit vectors r̂ of the images (T, 3) in float64; zero for the atom itself."""
    positions = flat_list(table["positions"])[0].reshape(-1, 3)
    lattice = flat_list(table["lattice"])[0].reshape(-1, 3, 3)
    shift = flat_list(table["image_shift"])[0].reshape(-1, 3).astype(np.float64)
    vector = (
        positions[global_j]
        + np.einsum("tx,txy->ty", shift, lattice[image_crystal])
        - positions[global_i]
    )
    norm = np.linalg.norm(vector, axis=1, keepdims=True)
    return np.where(norm > SELF_DISTANCE, vector / np.maximum(norm, SELF_DISTANCE), 0.0)


def species_triples(
    table: pa.Table, numbers: np.ndarray, atom_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(atom, Z, occupancy) triples: one per ordered site, the full list for disordered ones.

    A Z outside 1..MAX_Z (the rows of an encoder's element embedding) raises ValueError.
    """
    n_atoms = len(numbers)
    atom = np.arange(n_atoms)
    z = numbers.astype(np.int64)
    occupancy = np.ones(n_atoms)
    site, site_offsets = flat_list(table["disorder_site"])
    if len(site):
        crystal_of_entry = np.repeat(np.arange(table.num_rows), np.diff(site_offsets))
        disordered_atom = atom_offsets[crystal_of_entry] + site.astype(np.int64)
        disorder_z, _ = flat_list(table["disorder_z"])
        disorder_occupancy, _ = flat_list(table["disorder_occupancy"])
        ordered = np.ones(n_atoms, bool)
        ordered[disordered_atom] = False
        atom = np.concatenate([atom[ordered], disordered_atom])
        z = np.concatenate([z[ordered], disorder_z.astype(np.int64)])
        occupancy = np.concatenate([occupancy[ordered], disorder_occupancy.astype(np.float64)])
    if np.any((z < 1) | (z > MAX_Z)):
        raise ValueError(f"atomic numbers must be 1..{MAX_Z}")
    return atom, z, occupancy
