"""``ldae fit``: train one stage from a YAML config or a packaged preset, with dotted overrides."""

from __future__ import annotations

import argparse

HELP = "train a stage (autoencoder, diffusion, representation) from a config or preset"
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML config file (may _inherit a packaged preset)")
    src.add_argument("--preset", choices=["paper", "small", "tiny"], help="packaged preset")
    from ldae.training import STAGE_MODULES

    p.add_argument("--stage", choices=list(STAGE_MODULES), help="stage (required with --preset)")
    p.add_argument("--out", help="run folder (overrides the config's 'out')")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.epilog = "Any other --section.key VALUE overrides one config entry, e.g. --trainer.max_epochs 3"


def run(args: argparse.Namespace) -> int:
    from ldae.config import apply_overrides, dump_config, load_config, load_preset
    from ldae.errors import ConfigError
    from ldae.training import fit

    if args.preset:
        if not args.stage:
            raise ConfigError("--preset needs --stage")
        cfg = load_preset(args.preset, args.stage)
    else:
        cfg = load_config(args.config)
        if args.stage and cfg.get("stage") != args.stage:
            raise ConfigError(f"{args.config}: config is for stage '{cfg.get('stage')}', not '{args.stage}'")
    cfg = apply_overrides(cfg, args.overrides)
    if args.out:
        cfg["out"] = args.out
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from ldae.distributed import is_main_process

    best = fit(cfg, resume=args.resume)
    if is_main_process():  # under DDP every process returns here
        print(f"best checkpoint: {best}")
    return 0
