"""The ``pylux`` command: ``pylux experiments {list,<name>} [options]``."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["EXPERIMENTS", "main"]

#: experiment name -> module (relative to this package) defining ``add_arguments`` and ``run``.
EXPERIMENTS: dict[str, str] = {}
EXPERIMENTS["node-spiral"] = "node_spiral"
EXPERIMENTS["node-digits"] = "node_digits"
EXPERIMENTS["deq-digits"] = "deq_digits"
EXPERIMENTS["sde-spiral"] = "sde_spiral"
EXPERIMENTS["nsde-digits"] = "nsde_digits"
EXPERIMENTS["latent-ode-periodic"] = "latent_ode_periodic"
EXPERIMENTS["ncde-characters"] = "ncde_characters"
EXPERIMENTS["cnf-moons"] = "cnf_moons"
EXPERIMENTS["ffjord-digits"] = "ffjord_digits"


def _load(name: str):
    return importlib.import_module(f".{EXPERIMENTS[name]}", __package__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pylux", description="pylux command line")
    commands = parser.add_subparsers(dest="command", required=True)
    experiments = commands.add_parser("experiments", help="reproduce the papers' experiments")
    names = experiments.add_subparsers(dest="experiment", required=True)
    names.add_parser("list", help="list the experiments")
    for name in EXPERIMENTS:
        module = _load(name)
        sub = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        sub.add_argument("--out", default=f"runs/{name}", help="folder for tables and plots")
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.experiment == "list":
        for name in EXPERIMENTS:
            doc = (_load(name).__doc__ or "").strip().splitlines()
            print(f"{name:24s} {doc[0] if doc else ''}")
        return 0
    _load(args.experiment).run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
