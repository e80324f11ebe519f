"""The documentation site builds with --strict, its references are the code's, and the ways
it and the README give to read a dataset folder read what the manifest lists.

The site is built once (mkdocs, a few seconds); the snippets run as a user runs them, each
in a fresh interpreter, against a real dataset folder featurised from the mp_elastic
snapshot.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main
from conftest import snapshot_rows

from crystalformer import read_dataset
from crystalformer.cli import app
from crystalformer.conf import datasets_config
from crystalformer.datasets import featurize_inputs
from crystalformer.records import RawInput
from crystalformer.shards import Manifest, read_rejects
from crystalformer.sources.snapshots import table_spec

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [
    "index.html",
    "quickstart/index.html",
    "concepts/datasets/index.html",
    "concepts/models/index.html",
    "concepts/screening/index.html",
    "how-to/fetch-materials-project/index.html",
    "how-to/train/index.html",
    "how-to/screen-cifs/index.html",
    "how-to/dask-cluster/index.html",
    "how-to/deployments/index.html",
    "reference/cli/index.html",
    "reference/python/index.html",
    "model/index.html",
]
SNIPPET_FOLDER = "var/datasets/mp_elastic"  # the folder the reading snippets name


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    return out


def verbs() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    context = click.Context(group, info_name="crystalformer")
    return {name: group.get_command(context, name) for name in group.list_commands(context)}


def flags(command: click.Command) -> set[str]:
    return {name for p in command.params for name in p.opts + p.secondary_opts if name[:2] == "--"}


def test_site_builds_strictly_with_every_page(site):
    for page in PAGES:
        assert (site / page).is_file(), page
    assert not (site / "hooks").exists()  # the build hook is not published


def test_cli_reference_shows_every_verb_with_every_option(site):
    page = (site / "reference" / "cli" / "index.html").read_text()
    assert len(verbs()) >= 7
    for name, command in verbs().items():
        assert f"Usage: crystalformer {name} [OPTIONS]" in page, name
        for flag in flags(command):
            assert flag in page, (name, flag)


def test_python_reference_documents_the_public_api(site):
    page = (site / "reference" / "python" / "index.html").read_text()
    for name in [
        "crystalformer.load_model",
        "crystalformer.read_dataset",
        "crystalformer.predict.LoadedModel.predict",
        "crystalformer.datasets.featurize_sources",
        "crystalformer.shards.read_dataset",
        "crystalformer.sources.resolve",
        "crystalformer.model.Runtime",
        "crystalformer.train.Trainer",
        "crystalformer.tracking.train_property",
        "crystalformer.screen_run.ScreenOptions",
        "crystalformer.screen.screen",
        "crystalformer.expressions.parse",
    ]:
        assert f'id="{name}"' in page, name


def commands_in(text: str) -> list[tuple[str, str]]:
    """(verb, rest of the command) for every `crystalformer VERB ...` in a page, with shell
    continuation lines joined and inline code cut at its closing backtick."""
    joined = text.replace("\\\n", " ")
    found = []
    for match in re.finditer(r"crystalformer (\w+)([^\n`]*)", joined):
        found.append((match.group(1), match.group(2)))
    return found


def test_docs_use_only_options_the_verbs_have():
    known = verbs()
    checked = 0
    for page in DOCS.rglob("*.md"):
        for verb, rest in commands_in(page.read_text()):
            if verb not in known:
                continue  # prose such as "the crystalformer encoder"
            unknown = set(re.findall(r"--[a-z][a-z-]*", rest)) - flags(known[verb])
            assert not unknown, (page.name, verb, unknown)
            checked += 1
    assert checked >= 15


def test_quick_start_holds_the_readme_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [c.strip() for c in re.findall(r"```bash\n(.+?)\n\s*```", setup)]
    assert len(commands) == 2
    quickstart = (DOCS / "quickstart.md").read_text()
    for command in commands:
        assert f"```bash\n{command}\n```" in quickstart


def test_importing_the_package_imports_no_data_library():
    heavy = "{'pyarrow', 'pandas', 'torch', 'mlflow'}"
    probe = f"import sys, crystalformer; print(sorted({heavy} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def elastic_folder(tmp_path_factory, settings) -> Path:
    """A real dataset folder of several shards written by two runs (mp_elastic rows), and a
    reject, so that a glob taking rejects.parquet for a shard reads one id too many."""
    spec = table_spec(datasets_config().datasets["mp_elastic"])
    raws = snapshot_rows("mp_elastic_cgcnn/elastic.csv.gz", spec, 20)
    folder = tmp_path_factory.mktemp("datasets") / "mp_elastic"
    empty = RawInput("not-a-crystal", "test", "cif", "data_empty\n")
    featurize_inputs([*raws[:12], empty], folder, settings, shard_size=5, progress=False)
    featurize_inputs(raws, folder, settings, shard_size=5, progress=False)
    assert len(Manifest.load(folder).shards) == 5
    assert read_rejects(folder)["id"].to_pylist() == ["not-a-crystal"]
    return folder


def reading_snippets(path: Path, heading: str) -> list[str]:
    """The python blocks of the section `heading` of a markdown file."""
    section = path.read_text().split(heading, 1)[1].split("\n#", 1)[0]
    return re.findall(r"```python\n(.+?)```", section, re.S)


SNIPPETS = [
    (page, heading, index)
    for page, heading in [
        (DOCS / "concepts" / "datasets.md", "## Reading a dataset folder"),
        (ROOT / "README.md", "### Reading a dataset folder"),
    ]
    for index in range(3)
]


@pytest.mark.parametrize(("page", "heading", "index"), SNIPPETS)
def test_reading_snippets_read_every_crystal_of_the_manifest(elastic_folder, page, heading, index):
    snippets = reading_snippets(page, heading)
    assert len(snippets) == 3, page
    code = snippets[index]
    for module in re.findall(r"^import (\w+)", code, re.M):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (not a dependency of this project)")
    assert SNIPPET_FOLDER in code
    ids = "\nimport json\nprint(json.dumps(sorted(map(str, df['id']))))"
    if "rel = duckdb" in code:
        ids += "\nprint(json.dumps(sorted(row[0] for row in rel.fetchall())))"
    script = code.replace(SNIPPET_FOLDER, str(elastic_folder)) + ids
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = sorted(read_dataset(elastic_folder)["id"].to_pylist())
    assert len(expected) == 20
    for line in result.stdout.splitlines():
        assert json.loads(line) == expected
