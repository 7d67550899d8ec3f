"""Benchmark: what a `blmm inputs.yml` run costs outside its stages (issue 21), in CPU seconds.

Each part runs in a fresh interpreter, timed by CPU time (user + system of this process), which a
shared, loaded machine disturbs far less than wall time:

* ``python``: the interpreter's start (``python -c pass``, from the parent's child rusage);
* ``import``: ``import blmm.cli.run`` and what a run imports before its first stage;
* ``config``: ``load_config`` (tables read, every image header checked);
* ``plan``: ``plan_run``;
* ``engine``: opening and closing the engine the run would choose (inline: nothing);
* ``report``: ``write_report`` on a finished outdir (``--outdir``, e.g. a run of the same YAML).

    PYTHONPATH=$PWD python benchmarks/fixed_costs.py INPUTS.yml --outdir FINISHED_OUTDIR [--repeat 3] [--json F --label L]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_line import emit  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(inputs: str, outdir: str) -> dict[str, float]:
    """One fresh process: each part's CPU seconds (and wall seconds, noisy here)."""
    parts: dict[str, float] = {}
    c, w = cpu(), time.perf_counter()

    def mark(name: str) -> None:
        nonlocal c, w
        parts[name] = round(cpu() - c, 3)
        parts[name + "_wall"] = round(time.perf_counter() - w, 3)
        c, w = cpu(), time.perf_counter()

    import blmm.cli.run  # noqa: F401
    mark("import_cli")
    from blmm.config import load_config
    from blmm.engine import EngineSpec, open_engine
    from blmm.engine.choice import choose_engine
    from blmm.pipeline import estimate_work, plan_run
    import blmm.pipeline.stages  # noqa: F401
    mark("import_run")
    config = load_config(inputs, {"outdir": os.path.join(outdir, "..", "fixed_costs_scratch")})
    mark("config")
    plan = plan_run(config, force=True)
    mark("plan")
    choice = choose_engine(EngineSpec.from_config(config.cluster_type, None, config.cluster, {"progress": "off"}),
                           estimate_work(plan).total_seconds)
    with open_engine(choice.spec):
        pass
    mark("engine")
    parts["engine_kind"] = choice.spec.kind
    from blmm.report import write_report
    mark("import_report")
    write_report(outdir)
    mark("report")
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs")
    ap.add_argument("--outdir", required=True, help="a finished run's outdir (its report is rewritten)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="append the medians as one JSON line to this file")
    ap.add_argument("--label", default="", help="a label for the JSON line (e.g. the commit)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.inputs, args.outdir)))
        return
    # here, not at the top: end_to_end imports numpy, which the measured child must import itself
    from end_to_end import compile_checkout, user_environment

    compile_checkout()  # the parts run from bytecode, as a user's install does (end_to_end.user_environment)
    runs = []
    for _ in range(args.repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, __file__, args.inputs, "--outdir", args.outdir, "--one"],
                             check=True, capture_output=True, text=True, env=user_environment()).stdout
        parts = json.loads(out.strip().splitlines()[-1])
        parts["python"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
        runs.append(parts)
        print(json.dumps(parts))
    keys = [k for k, v in runs[0].items() if isinstance(v, float) and not k.endswith("_wall")]
    emit({"what": "fixed costs of a run, CPU s (median of --repeat fresh processes)", "inputs": args.inputs,
          "label": args.label, "median_cpu_s": {k: round(statistics.median(r[k] for r in runs), 3) for k in keys},
          "load": round(os.getloadavg()[0], 2)}, args.json)


if __name__ == "__main__":
    main()
