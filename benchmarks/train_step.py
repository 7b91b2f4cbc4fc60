"""Time one mdagan training iteration (G + D step) at the paper's widths next to a MONAI UNet trained with L1.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \\
        .venv/bin/python benchmarks/train_step.py [--sizes 64 96] [--steps 3] [--precisions fp32 bf16] [--quick]

Per (patch size, precision) a fresh worker process builds the flagship from ``configs/mdagan-paper.yaml`` (generator
6,176,846 parameters, multi-resolution UNet discriminator, 2.5D VGG-19 perception loss over every slice of the 3 views)
and a MONAI ``UNet`` of similar parameter count, runs warm-up steps, then alternates timed steps of the two (so the
machine's noise hits both alike) and reports medians, their ratio, peak RSS and the achieved conv GFLOP/s as a fraction
of this machine's conv3d ceiling (``measure_ceiling``, measured in the worker).

The VGG-19 ImageNet weights are not available offline, so the perception loss uses random weights
(``method.perception.weights=random``): the same network and FLOPs, only the loss values differ.

Peak memory is the worker's ``ru_maxrss``: the UNet's is read after its warm-up, before the flagship ever ran
(clean); the flagship's is the process peak (the larger of the two). "Δ" is over the process after building both
models and the batch (imports, weights, VGG: the baseline column).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from _common import (
    CALIBRATION_REFERENCE,
    ConvFlopCounter,
    calibrate,
    cpu_seconds,
    efficiency,
    emit_result,
    environment_line,
    gib,
    log,
    markdown_table,
    measure_ceiling,
    median,
    peak_rss_mib,
    run_worker,
    timed,
)

PAPER_OVERRIDES = ["method.perception.weights=random"]


def worker(spec: dict[str, Any]) -> None:
    import torch
    import torch.nn.functional as F
    from monai.networks.nets import UNet

    from volsynth.experiment import load_config
    from volsynth.methods import build_method
    from volsynth.methods.base import Batch, StepContext

    torch.manual_seed(spec["seed"])
    device = torch.device("cpu")
    precision, size = spec["precision"], spec["size"]
    config = load_config(spec["config"], spec["overrides"])
    method = build_method(config.method).to(device).train()

    def context(optimizers: dict[str, torch.optim.Optimizer]) -> StepContext:
        scalers = {k: torch.amp.GradScaler("cpu", enabled=False) for k in optimizers}
        return StepContext(device=device, precision=precision, optimizers=optimizers, scalers=scalers,
                           grad_clip=None)

    ctx = context(method.configure_optimizers(config.train))
    channels = tuple(spec["unet_channels"])
    unet = UNet(3, 1, 1, channels=channels, strides=(2,) * (len(channels) - 1),
                num_res_units=spec["unet_res_units"]).to(device).train()
    unet_ctx = context({"unet": torch.optim.Adam(unet.parameters(), lr=config.train.lr, betas=config.train.betas)})
    shape = (1, 1, size, size, size)
    batch = Batch(torch.rand(shape), torch.rand(shape))

    def flagship_step() -> dict[str, float]:
        return method.train_step(batch, ctx)

    def unet_step() -> float:
        with unet_ctx.autocast():
            loss = F.l1_loss(unet(batch.source).float(), batch.target)
        unet_ctx.step(loss, "unet")
        return float(loss.detach())

    probe_start = calibrate(precision)
    ceiling = measure_ceiling(precision)
    baseline = peak_rss_mib()
    groups = {"G": method.generator, "D": method.discriminator}
    if method.perception is not None:
        groups["VGG"] = method.perception.extractor
    # UNet first: its peak RSS is read before the flagship has run in this process. One warm-up step more than
    # the flagship's (cheap) so that a step with Adam's state already allocated is part of the peak.
    with ConvFlopCounter({"UNet": unet}) as unet_flops:
        unet_warm = [timed(unet_step)[0]]
    unet_warm += [timed(unet_step)[0] for _ in range(max(1, spec["warmup"]))]
    unet_peak = peak_rss_mib()
    log(f"  [{size}³ {precision}] UNet warm-up {', '.join(f'{t:.2f}' for t in unet_warm)} s")
    # The flagship's conv FLOPs are counted in its first step (a warm-up step, or with --warmup 0 the first timed
    # one: a Python hook per conv call, negligible next to a step of seconds).
    flagship_flops = ConvFlopCounter(groups)
    flagship_warm: list[float] = []
    for i in range(spec["warmup"]):
        with flagship_flops if i == 0 else contextlib.nullcontext():
            flagship_warm.append(timed(flagship_step)[0])
    if flagship_warm:
        log(f"  [{size}³ {precision}] mdagan warm-up {', '.join(f'{t:.1f}' for t in flagship_warm)} s")

    flagship_times: list[float] = []
    unet_times: list[float] = []
    losses: dict[str, float] = {}
    # Each round: half of the UNet's steps, one flagship step, the other half (U F U with the default 2), so a
    # slow spell of the shared machine during the long flagship step is bracketed by UNet samples.
    per_round = spec["unet_steps"]
    order = ["unet"] * (per_round // 2) + ["flagship"] + ["unet"] * (per_round - per_round // 2)
    for i in range(spec["steps"]):
        for who in order:
            if who == "flagship":
                with flagship_flops if i == 0 and not flagship_warm else contextlib.nullcontext():
                    seconds, losses = timed(flagship_step)
                flagship_times.append(seconds)
            else:
                unet_times.append(timed(unet_step)[0])
        log(f"  [{size}³ {precision}] round {i + 1}/{spec['steps']}: mdagan {flagship_times[-1]:.2f} s, "
            f"UNet {', '.join(f'{t:.3f}' for t in unet_times[-per_round:])} s")
    emit_result({
        "size": size, "precision": precision, "threads": torch.get_num_threads(),
        "params": {**method.parameter_counts(), "unet": sum(p.numel() for p in unet.parameters())},
        "flagship_times": flagship_times, "unet_times": unet_times,
        "flagship_warmup": flagship_warm, "unet_warmup": unet_warm,
        "flagship_flops": flagship_flops.as_dict(), "unet_flops": unet_flops.as_dict(),
        "rss_baseline_mib": baseline, "rss_unet_mib": unet_peak, "rss_peak_mib": peak_rss_mib(),
        "losses": losses, "worker_cpu_s": cpu_seconds(), "loadavg": os.getloadavg(),
        "probe_gflops": [probe_start, calibrate(precision)], "ceiling_gflops": ceiling,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="cubic patch sizes (multiples of 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed flagship steps first (0: time from the first "
                        "step; at tens of seconds per step its one-off costs are within the noise)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--config", default="configs/mdagan-paper.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides (after method.perception.weights=random)")
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[36, 72, 144, 288],
                        help="MONAI UNet widths (default ~6.0 M parameters with 2 residual units)")
    parser.add_argument("--unet-res-units", type=int, default=2)
    parser.add_argument("--unet-steps", type=int, default=2, help="UNet steps per flagship step, around it (the "
                        "UNet is cheap; more samples steady its median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-allocator-fix", action="store_true", help="do not set GLIBC_TUNABLES for workers")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32³, fp32, 1 warm-up + 1 step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import json

        worker(json.loads(args.worker))
        return
    if args.quick:
        args.sizes, args.precisions, args.steps, args.warmup = [32], ["fp32"], 1, 1
    if args.warmup < 0 or args.steps < 1 or args.unet_steps < 1:
        parser.error("--warmup must be >= 0, --steps and --unet-steps >= 1")

    results = []
    for size in args.sizes:
        for precision in args.precisions:
            spec = {"size": size, "precision": precision, "steps": args.steps, "warmup": args.warmup,
                    "config": args.config, "overrides": PAPER_OVERRIDES + args.overrides,
                    "unet_channels": args.unet_channels, "unet_res_units": args.unet_res_units,
                    "unet_steps": args.unet_steps, "seed": args.seed}
            log(f"training step {size}³ {precision} ...")
            results.append(run_worker(__file__, spec, allocator_fix=not args.no_allocator_fix))
    report(args, results)


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    params = results[0]["params"]
    warm = (f"{args.warmup} mdagan warm-up step(s)" if args.warmup else
            "no mdagan warm-up (its first step is timed and its FLOPs counted in it)")
    print(f"# Training step, batch 1 ({environment_line()}; {results[0]['threads']} torch threads in workers)\n")
    print(f"mdagan ({args.config}, {' '.join(PAPER_OVERRIDES + args.overrides)}): generator "
          f"{params['generator']:,} + discriminator {params['discriminator']:,} parameters; MONAI UNet "
          f"channels {tuple(args.unet_channels)}, strides 2, {args.unet_res_units} res units: {params['unet']:,} "
          f"parameters, L1 loss, Adam. Medians of {args.steps} mdagan and {args.steps * args.unet_steps} UNet steps, "
          f"interleaved, after {warm}; conv GFLOP/s as "
          "% of this machine's conv3d ceiling, measured in the worker (best of 32/64/128-channel 3×3×3 layers, "
          f"channels-last, batch 2: {results[0]['ceiling_gflops']:.0f} GFLOP/s {results[0]['precision']}).\n")
    rows = []
    for r in results:
        flag_s, unet_s = median(r["flagship_times"]), median(r["unet_times"])
        flag_gf, unet_gf = r["flagship_flops"]["total"] / 1e9, r["unet_flops"]["total"] / 1e9
        base = r["rss_baseline_mib"]
        rows.append([
            f"{r['size']}³", r["precision"], f"{flag_s:.2f}", f"{unet_s:.3f}", f"{flag_s / unet_s:.1f}×",
            f"{flag_gf:,.0f}", efficiency(flag_gf, flag_s, r["ceiling_gflops"]),
            f"{unet_gf:,.0f}", efficiency(unet_gf, unet_s, r["ceiling_gflops"]),
            f"{gib(r['rss_peak_mib'])} (+{gib(r['rss_peak_mib'] - base)})",
            f"{gib(r['rss_unet_mib'])} (+{gib(r['rss_unet_mib'] - base)})", gib(base),
        ])
    print(markdown_table(
        ["patch", "precision", "mdagan step s", "UNet step s", "ratio", "mdagan conv GFLOP/step",
         "mdagan GFLOP/s (% ceiling)", "UNet conv GFLOP/step", "UNet GFLOP/s (% ceiling)",
         "peak RSS mdagan GiB (Δ)", "peak RSS UNet GiB (Δ)", "baseline GiB"], rows))
    print("\nConv GFLOP per mdagan step by network (forward incl. checkpoint recomputation / backward: input- and "
          "weight-gradient GEMMs actually run); 'naive' = 3 × forward of every grad-enabled pass:\n")
    rows = []
    for r in results:
        f = r["flagship_flops"]
        cells = [f"{f['forward'].get(k, 0) / 1e9:,.0f} / {f['backward'].get(k, 0) / 1e9:,.0f}"
                 for k in ("G", "D", "VGG")]
        rows.append([f"{r['size']}³", r["precision"], *cells, f"{f['total'] / 1e9:,.0f}", f"{f['naive'] / 1e9:,.0f}"])
    print(markdown_table(["patch", "precision", "G fwd / bwd", "D fwd / bwd", "VGG fwd / bwd", "total", "naive"],
                         rows))
    print("\nRaw step times (s) and worker CPU time:\n")
    for r in results:
        warm = (f" (warm-up {', '.join(f'{t:.2f}' for t in r['flagship_warmup'])})" if r["flagship_warmup"]
                else " (no warm-up)")
        print(f"- {r['size']}³ {r['precision']}: mdagan {', '.join(f'{t:.2f}' for t in r['flagship_times'])}"
              f"{warm}; UNet "
              f"{', '.join(f'{t:.3f}' for t in r['unet_times'])}; worker CPU {r['cpu_s']:.0f} s, load average at "
              f"end {r['loadavg'][0]:.1f}; {probe_text(r)}; last losses "
              f"{', '.join(f'{k}={v:.3g}' for k, v in r['losses'].items())}")
    sys.stdout.flush()


def probe_text(r: dict[str, Any]) -> str:
    ref = CALIBRATION_REFERENCE[r["precision"]]
    start, end = r["probe_gflops"]
    return (f"machine probe (Conv3d 64ch 32³ fwd) {start:.0f} → {end:.0f} GFLOP/s = {100 * start / ref:.0f} → "
            f"{100 * end / ref:.0f} % of its idle-machine {ref:.0f}")


if __name__ == "__main__":
    main()
