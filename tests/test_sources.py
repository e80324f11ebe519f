"""The remote-source registry: a source is one module implementing `RemoteSource` and registering
itself; conf/sources.yaml, `refresh` and `resolve` then know it with no other change.

The source registered here serves real matbench_phonons crystals (pymatgen Structure dicts)
and, like Materials Project, returns a state so a second refresh fetches nothing new.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from crystalformer.cli import app
from crystalformer.conf import ConfigError
from crystalformer.records import RawInput
from crystalformer.sources import resolve
from crystalformer.sources.base import REGISTRY, Fetched, RemoteSettings, register
from crystalformer.sources.jarvis import JarvisSettings
from crystalformer.sources.materials_project import MaterialsProjectSettings
from crystalformer.sources.refresh import STATE, refresh, sources_config
from crystalformer.structures import load


class PhononSettings(RemoteSettings):
    dataset: str = "phonons"
    rows: int


class Phonons:
    name = "phonons"
    settings = PhononSettings
    credential = None

    def __init__(self, raws: list[RawInput]):
        self.raws = raws

    def fetch(
        self, settings: PhononSettings, folder: Path, known: Mapping[str, str], secret: str | None
    ) -> Fetched:
        served = self.raws[: settings.rows]
        new = [raw for raw in served if raw.id not in known]
        state = {raw.id: "v1" for raw in served}
        return Fetched(new, [], unchanged=len(served) - len(new), state=state)


@pytest.fixture
def phonons(phonon_raws):
    source = Phonons(phonon_raws)
    register(source)
    yield source
    del REGISTRY[source.name]


def write_conf(folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "sources.yaml").write_text(text)
    return folder


def test_a_registered_source_is_configured_refreshed_and_read_back(phonons, tmp_path):
    conf = write_conf(tmp_path / "conf", "phonons:\n  rows: 7\n")
    sections = sources_config(conf).remote()
    assert sections["phonons"] == PhononSettings(rows=7)
    assert sections["materials_project"] is None  # registered, not configured here

    folder = tmp_path / "raw" / "phonons"  # records are read as from a source named so
    first = refresh(phonons, sections["phonons"], folder)
    assert (first.fetched, first.unchanged, first.total) == (7, 0, 7)
    assert (folder / STATE).exists()
    inputs, units = resolve(str(folder))
    read = list(inputs)
    assert [raw.id for raw in read] == [raw.id for raw in phonons.raws[:7]]
    assert all(raw.format == "structure" and raw.source == "phonons" for raw in read)
    for stored, served in zip(read, phonons.raws, strict=False):
        np.testing.assert_array_equal(load(stored).numbers, load(served).numbers)
        np.testing.assert_allclose(load(stored).lattice, load(served).lattice)
    assert units == {}

    more = refresh(phonons, PhononSettings(rows=9), folder)
    assert (more.fetched, more.unchanged, more.total) == (2, 7, 9)


def test_a_source_section_is_validated_by_its_own_settings(phonons, tmp_path):
    conf = write_conf(tmp_path / "conf", "phonons:\n  rows: many\n  colour: red\n")
    with pytest.raises(ConfigError) as raised:
        sources_config(conf)
    assert "phonons.rows" in str(raised.value) and "phonons.colour" in str(raised.value)
    unknown = write_conf(tmp_path / "other", "no_such_source: {}\n")
    with pytest.raises(ConfigError, match="no_such_source"):
        sources_config(unknown)


def test_a_name_is_registered_once(phonons, phonon_raws):
    with pytest.raises(ValueError, match="phonons"):
        register(Phonons(phonon_raws))


def test_the_shipped_conf_configures_every_registered_source():
    sections = sources_config().remote()
    assert set(sections) == set(REGISTRY) == {"materials_project", "jarvis"}
    assert all(settings is not None and settings.enabled for settings in sections.values())


def test_an_unconfigured_source_runs_on_defaults_only_when_every_key_has_one():
    assert JarvisSettings.defaults() == JarvisSettings()
    assert MaterialsProjectSettings.defaults() is None  # its query is the user's to write
    assert PhononSettings.defaults() is None


def test_fetch_offers_the_registered_sources():
    result = CliRunner().invoke(app, ["fetch", "--help"])
    assert result.exit_code == 0
    assert "materials_project" in result.output and "jarvis" in result.output
    refused = CliRunner().invoke(app, ["fetch", "phonons"])
    assert refused.exit_code == 2 and "phonons" in refused.output
