"""Build the paper-style Markdown results table from finished run folders.

    python scripts/collect_results.py RUNS_DIR [-o TABLE.md]

RUNS_DIR holds one folder per recipe, as the Makefile lays them out (cifar10-vgg19/baseline,
sparse, pruned-0.7.pt, finetune-0.7/ …). Stages that have not run show "not yet run".
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from slimctl import SlimctlError, atomic_write_text, markdown_table


@click.command()
@click.argument("runs_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Also write the table here.")
def main(runs_dir: Path, out: Path | None) -> None:
    try:
        table = markdown_table(runs_dir)
    except SlimctlError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    if out is not None:
        atomic_write_text(out, table)
    click.echo(table)


if __name__ == "__main__":
    main()
