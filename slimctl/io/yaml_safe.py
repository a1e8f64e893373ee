"""YAML read safely: PyYAML's safe loader (plain types only), bounded in size and in what aliases
expand to, for configs, `--set` values and run folders' config.yaml."""

from __future__ import annotations

from typing import Any

import yaml

from slimctl.errors import SlimctlError

MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few hundred bytes
MAX_NODES = 100_000  # values once YAML aliases (*name) are expanded: a recipe has about a hundred


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """How many values `node` stands for with every alias expanded (aliases share nodes: a DAG)."""
    if id(node) not in memo:
        memo[id(node)] = 0  # a recursive alias counts once rather than looping
        children = node.value if isinstance(node.value, list) else []
        items = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
        memo[id(node)] = 1 + sum(_expanded_size(item, memo) for item in items)
    return memo[id(node)]


def safe_yaml(text: str, where: str) -> Any:
    """`text` parsed as YAML into plain types (PyYAML's safe loader), bounded in size and in what
    its aliases expand to (a few hundred bytes of nested aliases stand for billions of values);
    a SlimctlError names `where`. yaml.YAMLError passes through for the caller to word."""
    if len(text) > MAX_CONFIG_BYTES:
        raise SlimctlError(f"{where}: {len(text):,} characters; a config is at most {MAX_CONFIG_BYTES:,}")
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None and _expanded_size(node, {}) > MAX_NODES:
        raise SlimctlError(f"{where}: its YAML aliases (*name) expand to more than {MAX_NODES:,} values; refused")
    try:
        return yaml.safe_load(text)
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise SlimctlError(f"{where}: a number too long to read") from None
