"""`florence-ops registry show | history | rollback VERSION`: the model registry from the command line (wired up by
`florence_ops.cli`; the registry itself is `florence_ops.registry`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from florence_ops.config import Params
from florence_ops.serving.commands import params_for

EXAMPLES = """examples:
  florence-ops registry show                  # versions, the stages they hold, their metrics
  florence-ops registry history               # registrations and stage assignments, oldest first
  florence-ops registry rollback v0.0.3       # assign registry.stage (prod) to an earlier version
  florence-ops registry show --git-remote https://github.com/org/florence-ops.git
"""


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    """`registry`: an action, and the git remote when it is not params.yaml's `registry.git_remote`."""
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--git-remote", help="git URL, path or remote name of the registry (registry.git_remote)")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("show", parents=[remote], help="versions, the stages they hold, their metrics")
    actions.add_parser("history", parents=[remote], help="registrations and stage assignments")
    rollback = actions.add_parser("rollback", parents=[remote], help="assign the stage to an earlier version")
    rollback.add_argument("version", help="the version to serve again, e.g. v0.0.3")
    parser.epilog, parser.formatter_class = EXAMPLES, argparse.RawDescriptionHelpFormatter


def run_registry(args: argparse.Namespace) -> int:
    """Print the registry's versions or history, or roll back; RegistryError (one line) when it cannot."""
    from florence_ops import registry  # GTO and DVC load only for this command, not for every stage

    params = params_for(args.params, {"registry.git_remote": args.git_remote})
    repo = Path.cwd()
    if args.action == "rollback":
        held = registry.rollback(repo, params, args.version)
        print(f"{held.artifact}#{params.registry.stage}: {held.version} ({held.tag}, commit {held.commit[:12]})")
        return 0
    with registry.registry_view(registry.source_of(repo, params.registry)) as view:
        lines = show_lines(view, params) if args.action == "show" else history_lines(view, params)
    print("\n".join(lines))
    return 0


def show_lines(view: Path, params: Params) -> list[str]:
    """Who holds the stage, then one line per version: version, stages, commit, metric."""
    from florence_ops import registry

    cfg, metric = params.registry, params.promotion.metric
    held = registry.resolve(view, params)
    lines = [f"{cfg.artifact}#{cfg.stage}: {held.version if held else 'none'}"]
    lines.append(f"{'version':<10} {'stages':<12} {'commit':<12} {metric}")
    for version in registry.versions(view, params):
        score = (version.metrics or {}).get(metric)
        shown = f"{score:.4f}" if isinstance(score, int | float) else "-"
        lines.append(f"{version.version:<10} {','.join(version.stages) or '-':<12} {version.commit[:12]:<12} {shown}")
    return lines


def history_lines(view: Path, params: Params) -> list[str]:
    """One line per registration or assignment, oldest first."""
    from florence_ops import registry

    rows = registry.history(view, params)
    return [f"{r['timestamp']}  {r['event']:<12} {r['version']:<10} {r['stage'] or '-':<8} {r['commit'][:12]}  "
            f"{r['ref']}" for r in rows] or ["no versions registered"]  # fmt: skip
