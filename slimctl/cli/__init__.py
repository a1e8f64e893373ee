"""`slimctl` command line: each command parses options, makes one library call, prints the result.

The modules: `common` (the group, errors and exit codes, consoles, shared options, `main`), and the
commands in `training` (sparse-train, finetune, scratch), `pruning` (prune, sweep) and
`inspection` (eval, info, groups, report, compare, bench, export).

Exit codes: 0 ok; 2 bad input (one message on stderr, no traceback); 1 anything unexpected.
"""

from slimctl.cli import inspection, pruning, training  # each registers its commands on `cli`
from slimctl.cli.common import cli, main

__all__ = ["cli", "inspection", "main", "pruning", "training"]
