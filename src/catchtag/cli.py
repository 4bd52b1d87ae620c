"""The command line: a thin layer over the Python API (one command per API function)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="catchtag",
    help="Attention sinks and the catch, tag, release mechanism in Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


from catchtag.toy.cli import toy_app  # noqa: E402

app.add_typer(toy_app, name="toy")


@app.callback()
def _root() -> None:
    """catchtag: detect sinks, decompose heads into tag / non-tag, and show it."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
