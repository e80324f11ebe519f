"""MkDocs hook: the command-line reference is the app's own help, rendered at build time.

A page holding MARKER gets `crystalformer --help` and then one section per verb of the Typer
app with the text `crystalformer <verb> --help` prints, so the reference cannot drift from
the code: a verb or an option added to crystalformer/cli.py shows up at the next build.
"""

from __future__ import annotations

import click
import typer.main

MARKER = "<!-- crystalformer-cli -->"
PROGRAM = "crystalformer"
WIDTH = 88  # columns the help text is wrapped to, as on a wide terminal


def command_help() -> dict[str, str]:
    """The program's help ("" key) and each verb's, in the order `--help` lists the verbs."""
    from crystalformer.cli import app

    group = typer.main.get_command(app)
    root = click.Context(group, info_name=PROGRAM, terminal_width=WIDTH, max_content_width=WIDTH)
    texts = {"": group.get_help(root)}
    for name in group.list_commands(root):
        verb = group.get_command(root, name)
        texts[name] = verb.get_help(click.Context(verb, info_name=name, parent=root))
    return texts


def reference_markdown() -> str:
    """One section per command line (`crystalformer`, `crystalformer featurize`, ...) with
    its help as a text block."""
    sections = []
    for name, text in command_help().items():
        command = f"{PROGRAM} {name}".strip()
        sections.append(f"## `{command}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: fill the marker of the page that asks for the reference."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference_markdown())
