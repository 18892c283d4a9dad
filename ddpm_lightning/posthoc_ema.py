"""`python -m ddpm_lightning.posthoc_ema <run_dir> sigma_rel=0.08 [step=N] [out=<path>]`: write the checkpoint of
the post-hoc EMA of width sigma_rel (Karras et al. 2024), reconstructed from the run's snapshots, to
`<run>/checkpoints/posthoc_ema_sigma0.080.ckpt` by default (see ddpm_lightning.training.posthoc_ema)."""

from __future__ import annotations

import sys

from ddpm_lightning.training.posthoc_ema import write_checkpoint

USAGE = "usage: python -m ddpm_lightning.posthoc_ema <run_dir> sigma_rel=<width, e.g. 0.08> [step=<step>] [out=<path>]"
KEYS = ("sigma_rel", "step", "out")


def parse(argv: list[str]) -> tuple[str, dict]:
    """The run directory and the key=value options of the command line."""
    runs = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(options) - set(KEYS))
    if len(runs) != 1 or unknown or "sigma_rel" not in options:
        why = f"unknown option {', '.join(unknown)}; " if unknown else ""
        raise ValueError(f"{why}{USAGE}")
    try:
        options["sigma_rel"] = float(options["sigma_rel"])
        if "step" in options:
            options["step"] = int(options["step"])
    except ValueError:
        raise ValueError(f"sigma_rel must be a number and step an integer; {USAGE}") from None
    return runs[0], options


def main(argv: list[str] | None = None) -> int:
    try:
        run_dir, options = parse(sys.argv[1:] if argv is None else argv)
        path = write_checkpoint(run_dir, **options)
    except (ValueError, FileNotFoundError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {path} (post-hoc EMA, sigma_rel={options['sigma_rel']}); sample it with: python evaluate.py ckpt_path={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
