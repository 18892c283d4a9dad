"""What could shorten the quickstart: variants of experiment=digits (the DDPM of the earlier quickstart, 1600 steps)
judged against its quality. The one chosen, experiment=quickstart, is flow_12_1000 (docs/objectives.md#the-quickstart).

    python benchmarks/quickstart_budget.py [--only flow_12_1000 eps_seed1 ...] [--samples 500] [--samplers ...]

Each variant trains experiment=digits (same network, data and seed unless the variant changes them) once, judges the
EMA weights at its steps with FD-digits (as in time_to_quality.py, lower is better; 500 samples, seeds 0, 1, ...) for
DPM-Solver++(2M) with 10 steps and DDIM-50 (the sampler of the README's results), or the --samplers given (e.g. also
heun_18), and, for the variants that list widths, the post-hoc EMA of each width at the last step (Karras et al.
2024; the run keeps snapshots every 50 steps). One JSON per variant, benchmarks/results/quickstart_budget_<variant>.json,
written as each finishes; OMP_NUM_THREADS=1 makes the seconds one core's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from objectives import RESULTS, digits_judge, judge_checkpoint, train_run  # noqa: E402
from objectives import SAMPLERS as SAMPLERS_ALL  # noqa: E402

FLOW = ["schedule=rectified_flow", "module.parameterization=flow"]
V_MIN_SNR = ["module.parameterization=v", "module.weighting=min_snr"]
COSINE = "module.lr_decay=cosine"
CH_12 = ["model.ch_mult=[1,2]"]
WIDTHS = [0.05, 0.08, 0.12, 0.17, 0.25]
SAMPLERS = ["dpmpp_2m_10", "ddim_50"]  # of objectives.SAMPLERS
# every run keeps post-hoc EMA snapshots, for the variants that list widths
POSTHOC = ["callbacks=posthoc_ema", "callbacks.posthoc_ema.every_n_steps=50"]
VARIANTS = {  # name: (overrides of experiment=digits, steps judged, post-hoc EMA widths at the last step)
    "eps_seed1": (["seed=1"], [1600], []),  # the quickstart with other seeds: its spread
    "eps_seed2": (["seed=2"], [1600], []),
    "eps_posthoc": ([], [800], WIDTHS),  # a longer or shorter average at 800 steps
    "flow_seed0": (FLOW, [800], WIDTHS),  # the best objective at 800 steps (objectives.py), three seeds
    "flow_seed1": ([*FLOW, "seed=1"], [800], WIDTHS),
    "flow_seed2": ([*FLOW, "seed=2"], [800], WIDTHS),
    "batch64": (["data.batch_size=64"], [800, 1200, 1600], []),  # fewer images per step
    "batch32": (["data.batch_size=32"], [800, 1200, 1600], []),
    "ch_mult_122": (["model.ch_mult=[1,2,2]"], [800, 1200, 1600], []),  # a cheaper network
    "ch_mult_12": (CH_12, [800, 1200, 1600], []),
    # the learning rate decayed to zero at the last step (module.lr_decay), so a short run ends on a settled model
    "eps_cos800": ([COSINE], [800], []),
    "eps_cos800_lr2e3": ([COSINE, "module.optimizer.lr=2e-3"], [800], []),
    "flow_cos800": ([*FLOW, COSINE], [800], []),
    "v_min_snr_cos800": ([*V_MIN_SNR, COSINE], [800], []),
    # flow matching on the cheaper network
    "eps_12_cos1000": ([COSINE, *CH_12], [1000], []),
    "flow_12_cos1000": ([*FLOW, COSINE, *CH_12], [1000], []),
    "flow_12_cos1000_seed1": ([*FLOW, COSINE, *CH_12, "seed=1"], [1000], []),
    "flow_12_cos1000_logit": ([*FLOW, COSINE, *CH_12, "schedule.t_sampling=logit_normal"], [1000], []),
    "flow_12_1000_lr2e3": ([*FLOW, *CH_12, "module.optimizer.lr=2e-3"], [1000], []),
    "flow_12_800": ([*FLOW, *CH_12], [800], []),
    "flow_12_1000": ([*FLOW, *CH_12], [1000], []),  # experiment=quickstart, three seeds
    "flow_12_1000_seed1": ([*FLOW, *CH_12, "seed=1"], [1000], []),
    "flow_12_1000_seed2": ([*FLOW, *CH_12, "seed=2"], [1000], []),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--samplers", nargs="+", choices=list(SAMPLERS_ALL), default=SAMPLERS)
    args = p.parse_args()
    from ddpm_lightning.training.posthoc_ema import write_checkpoint

    judge, x_val, floor = digits_judge(args.samples)
    for name in args.only:
        overrides, steps, widths = VARIANTS[name]
        with tempfile.TemporaryDirectory(prefix=f"quickstart_budget_{name}_") as tmp:
            out = Path(tmp)
            run = train_run([*POSTHOC, *overrides], steps, out)
            checkpoints = [(s, "run", ckpt) for s, ckpt in run["checkpoints"].items()]
            checkpoints += [(max(steps), f"posthoc {w}", write_checkpoint(out, sigma_rel=w)) for w in widths]
            rows = [{"steps": s, "ema": ema, "sampler": label, "nfe": r["nfe"], "fd_digits": r["fd_digits"]}
                    for s, ema, ckpt in checkpoints for label, r in judge_checkpoint(ckpt, judge, x_val, args.samples, args.samplers).items()]
        result = {"variant": name, "overrides": ["experiment=digits", *overrides], "samples": args.samples,
                  "train_seconds": run["seconds"], "train_images_per_s": run["images_per_s"], "rows": rows,
                  "fd_digits_real_train_vs_val": floor, "machine": common.machine(run["config"])}
        (RESULTS / f"quickstart_budget_{name}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
