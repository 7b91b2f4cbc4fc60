"""Time ``make_phantom_cohort``: 20 subjects at 2 mm with all contrasts, lesions p=0.5, montages (the defaults).

    .venv/bin/python benchmarks/phantom.py [--subjects 20] [--spacing 2] [--no-montage] [--out DIR]

Prints the wall time of the whole cohort (including the one-off template load and resampling, reported
separately), the time per subject, the CPU time and the load average (the machine may be shared). Writes to a
temporary folder that is deleted afterwards unless --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-montage", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep the cohort here (default: a temporary dir)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    from volsynth.data import phantom
    from volsynth.data.phantom.anatomy import template_anatomy

    t_import = time.perf_counter() - t0
    out = args.out or Path(tempfile.mkdtemp(prefix="volsynth-phantom-bench-"))
    try:
        t1 = time.perf_counter()
        template_anatomy(float(args.spacing))  # measured on its own: paid once per process and spacing
        t_template = time.perf_counter() - t1
        t2, cpu2 = time.perf_counter(), time.process_time()
        manifest = phantom.make_phantom_cohort(out, args.subjects, seed=args.seed, spacing=args.spacing,
                                               montage=not args.no_montage)
        t_cohort, cpu_cohort = time.perf_counter() - t2, time.process_time() - cpu2
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        shape = template_anatomy(float(args.spacing)).shape
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    total = t_template + t_cohort
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"phantom: {args.subjects} subjects at {args.spacing:g} mm (grid {shape[0]}x{shape[1]}x{shape[2]}, "
          f"{'no ' if args.no_montage else ''}montage) on {os.cpu_count()} CPU cores")
    print(f"  import {t_import:.2f} s, template load+resample {t_template:.2f} s, cohort {t_cohort:.2f} s "
          f"({t_cohort / args.subjects:.3f} s/subject), {size / 1e6:.0f} MB written")
    # CPU time (all threads of this process) is less sensitive than wall time to other users of the machine.
    print(f"  cohort CPU time {cpu_cohort:.1f} s; 1-min load average at the end {load:.1f}")
    print(f"  total (template + cohort): {total:.1f} s; manifest {manifest if args.out else '(deleted)'}")


if __name__ == "__main__":
    main()
