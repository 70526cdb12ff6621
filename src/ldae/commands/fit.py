"""``ldae fit``: train one stage from a YAML config or a packaged preset, with dotted overrides."""

from __future__ import annotations

import argparse

HELP = "train a stage (autoencoder, diffusion, representation) from a config or preset"
ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ldae.config import PRESETS, TRAINABLE_STAGES

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML config file (may _inherit a packaged preset)")
    src.add_argument("--preset", choices=PRESETS, help="packaged preset")
    p.add_argument("--stage", choices=TRAINABLE_STAGES, help="stage (required with --preset)")
    p.add_argument("--out", help="run folder (overrides the config's 'out')")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.epilog = "Any other --section.key VALUE overrides one config entry, e.g. --trainer.max_epochs 3"


def main(args: argparse.Namespace) -> int:
    from ldae.config import dump_config, load_preset, load_settings
    from ldae.errors import ConfigError
    from ldae.training import fit

    if args.preset:
        if not args.stage:
            raise ConfigError("--preset needs --stage")
        cfg = load_preset(args.preset, args.stage, args.overrides)
    else:
        cfg = load_settings(args.config, overrides=args.overrides)
        if args.stage and cfg.get("stage") != args.stage:
            raise ConfigError(f"{args.config}: config is for stage '{cfg.get('stage')}', not '{args.stage}'")
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
