"""Seconds per volume of mdagan inference: volsynth's full pipeline next to a plain MONAI sliding-window call.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \\
        .venv/bin/python benchmarks/inference.py [--shape 160 192 160] [--roi 96] [--precisions fp32 bf16]
        [--repeats 2] [--contenders volsynth monai] [--quick]

The flagship generator at the paper's widths (``configs/mdagan-paper.yaml``, 6,176,846 parameters, random
initialisation: timing only) translates a random volume of ``--shape`` voxels (1 mm, values on [0, 1] with exact
min 0 and max 1, so the min-max scaling is the identity and nothing is cropped: both contenders process the same
grid). Contenders, interleaved A B B A … in one worker process per precision:

* ``volsynth``: :func:`volsynth.inference.predict.translate_volume` (preprocess → Gaussian sliding window through
  ``method.translate`` → inverse preprocessing), i.e. what ``volsynth predict`` does per volume after loading;
* ``monai``: ``monai.inferers.sliding_window_inference`` on the same tensor with the same generator and settings
  (roi, overlap, Gaussian blending with the same sigma, constant padding, same ``sw_batch_size``, same autocast).

Reported: median seconds, their ratio, windows per volume, conv GFLOP per volume (forward hooks) and achieved
GFLOP/s as a fraction of this machine's conv3d ceiling (``measure_ceiling``, measured in the worker), peak RSS
(the first contender of the first round reads its own clean peak; the other's is the process peak, i.e. the larger
of the two) and the largest voxel difference between the two outputs.

Defaults are the paper's: roi 96³, overlap 0.625, sigma 0.125, sw_batch_size 3 (the preset's). The perception
loss is switched off (``method.perception.weight=0``): inference never runs it, and that avoids loading VGG.
"""

from __future__ import annotations

import argparse
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

BASE_OVERRIDES = ["method.perception.weight=0"]


def worker(spec: dict[str, Any]) -> None:
    import contextlib
    import dataclasses

    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from volsynth.data.volume import Volume
    from volsynth.experiment import load_config
    from volsynth.inference.predict import translate_volume
    from volsynth.methods import build_method
    from volsynth.methods.base import TranslationMethod, autocast
    from volsynth.nets.mdaunet import level_key

    torch.manual_seed(spec["seed"])
    device = torch.device("cpu")
    precision, roi = spec["precision"], [spec["roi"]] * 3
    config = load_config(spec["config"], spec["overrides"] + [
        f"data.sampling.patch_size={roi}", f"inference.roi_size={roi}", f"inference.overlap={spec['overlap']}",
        f"inference.sigma_scale={spec['sigma_scale']}", f"inference.sw_batch_size={spec['sw_batch_size']}",
        "inference.blend=gaussian", f"inference.precision={precision}",
    ])
    method = build_method(config.method).to(device).eval()
    generator = method.generator
    inference = config.inference

    rng = np.random.default_rng(spec["seed"])
    array = rng.random(spec["shape"], dtype=np.float32)
    array.flat[0], array.flat[-1] = 0.0, 1.0  # exact min/max: the min-max scaling is the identity
    volume = Volume(array, spacing=(1.0, 1.0, 1.0))
    tensor = torch.from_numpy(array.copy())[None, None]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return generator(window)[level_key(0)].float()

    def run_monai() -> np.ndarray:
        with torch.inference_mode():
            output = sliding_window_inference(
                tensor, roi_size=roi, sw_batch_size=inference.sw_batch_size, predictor=predictor,
                overlap=inference.overlap, mode="gaussian", sigma_scale=inference.sigma_scale,
                padding_mode="constant", cval=0.0,
            )
        return output[0, 0].numpy()

    def run_volsynth() -> np.ndarray:
        return translate_volume(method, config, volume, device=device).array

    compiled_config = dataclasses.replace(config, inference=dataclasses.replace(config.inference, compile=True))

    def run_compiled() -> np.ndarray:  # `volsynth predict --compile`
        return translate_volume(method, compiled_config, volume, device=device).array

    def overheads(repeats: int) -> dict[str, float]:
        """Network-free parts, medians: translate_volume with an identity ``infer`` (preprocess + inverse)
        and MONAI's sliding window with an identity predictor (window cutting + Gaussian blending)."""
        original = TranslationMethod.infer

        def no_network(_method: Any, source: np.ndarray, *_args: Any, **_kwargs: Any) -> np.ndarray:
            return source

        def blend_only() -> None:
            with torch.inference_mode():
                sliding_window_inference(tensor, roi_size=roi, sw_batch_size=inference.sw_batch_size,
                                         predictor=lambda w: w, overlap=inference.overlap, mode="gaussian",
                                         sigma_scale=inference.sigma_scale, padding_mode="constant", cval=0.0)

        TranslationMethod.infer = no_network  # type: ignore[method-assign]
        try:
            pipeline = [timed(run_volsynth)[0] for _ in range(repeats)]
        finally:
            TranslationMethod.infer = original  # type: ignore[method-assign]
        blending = [timed(blend_only)[0] for _ in range(repeats)]
        return {"pipeline_s": median(pipeline), "blending_s": median(blending)}

    windows = [0]
    generator.register_forward_pre_hook(lambda _module, args: windows.__setitem__(0, windows[0] + args[0].shape[0]))
    probe_start = calibrate(precision)
    ceiling = measure_ceiling(precision)
    baseline = peak_rss_mib()
    warmup_s = None
    # Warm-up: one window batch (oneDNN primitives, first-touch memory) at 1/n of a volume's cost.
    if spec["warmup"] and spec["contenders"]:
        batch = torch.rand(inference.sw_batch_size, 1, *roi)
        with torch.inference_mode():
            warmup_s = timed(predictor, batch)[0]
        log(f"  [{precision}] warm-up window batch {warmup_s:.2f} s")
    compile_s = None
    if "compiled" in spec["contenders"]:
        # The one-off compile, outside the timed runs (reported apart), through the very path the timed runs take
        # (so no guard differs): a volume of exactly one full window batch along the last axis.
        stride = max(1, int(roi[2] * (1 - inference.overlap)))
        small = np.ones((roi[0], roi[1], roi[2] + stride * (inference.sw_batch_size - 1)), dtype=np.float32)
        small[0, 0, 0] = 0.0
        compile_s = timed(translate_volume, method, compiled_config, Volume(small, spacing=(1.0, 1.0, 1.0)),
                          device=device)[0]
        log(f"  [{precision}] compile + one window batch {compile_s:.2f} s")

    runs = {"volsynth": run_volsynth, "monai": run_monai, "compiled": run_compiled}
    contenders = spec["contenders"]
    times: dict[str, list[float]] = {name: [] for name in contenders}
    flops = {name: ConvFlopCounter({"G": generator}) for name in contenders}
    window_count: dict[str, int] = {}
    first_peak: dict[str, float] = {}
    outputs: dict[str, np.ndarray] = {}
    for i in range(spec["repeats"]):
        order = contenders if i % 2 == 0 else contenders[::-1]
        for name in order:
            windows[0] = 0
            if i == 0:
                # Hooks added after compiling would make dynamo recompile mid-run: the compiled contender is not
                # hooked and does the same network work as the others (its count is copied below).
                with flops[name] if name != "compiled" else contextlib.nullcontext():
                    seconds, outputs[name] = timed(runs[name])
                window_count[name] = windows[0]
                first_peak[name] = peak_rss_mib()
            else:
                seconds = timed(runs[name])[0]
            times[name].append(seconds)
            log(f"  [{precision}] round {i + 1}/{spec['repeats']}: {name} {seconds:.2f} s")
    if "compiled" in flops and len(contenders) > 1:
        flops["compiled"] = next(flops[name] for name in contenders if name != "compiled")
    # After the network runs, so that their peak RSS is read first.
    overhead = overheads(spec["overhead_repeats"]) if spec["overhead_repeats"] else None
    diff = (float(np.abs(np.clip(outputs["monai"], 0, 1) - outputs["volsynth"]).max())
            if {"monai", "volsynth"} <= outputs.keys() else None)
    compiled_diff = (float(np.abs(np.clip(outputs["monai"], 0, 1) - outputs["compiled"]).max())
                     if {"monai", "compiled"} <= outputs.keys() else None)
    emit_result({
        "precision": precision, "threads": torch.get_num_threads(), "times": times,
        "windows": window_count, "flops": {k: v.total for k, v in flops.items()}, "warmup_s": warmup_s,
        "overhead": overhead, "rss_baseline_mib": baseline, "rss_first_mib": first_peak,
        "rss_peak_mib": peak_rss_mib(), "first": contenders[0] if contenders else None, "max_abs_diff": diff,
        "compiled_max_abs_diff": compiled_diff, "compile_s": compile_s,
        "params": sum(p.numel() for p in generator.parameters()), "worker_cpu_s": cpu_seconds(),
        "loadavg": os.getloadavg(), "probe_gflops": [probe_start, calibrate(precision)], "ceiling_gflops": ceiling,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160], metavar=("X", "Y", "Z"))
    parser.add_argument("--roi", type=int, default=96, help="cubic window size (multiple of 8)")
    parser.add_argument("--overlap", type=float, default=0.625)
    parser.add_argument("--sigma-scale", type=float, default=0.125)
    parser.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward (default: the "
                        "config's inference.sw_batch_size, 3 for the paper preset)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=1, choices=[0, 1], help="one untimed window batch first")
    parser.add_argument("--contenders", nargs="+", default=["monai", "volsynth", "compiled"],
                        choices=["monai", "volsynth", "compiled"],
                        help="which to run (compiled = `predict --compile`); the first one's peak RSS is read clean")
    parser.add_argument("--overhead-repeats", type=int, default=3, help="runs of the network-free parts (identity "
                        "network): volsynth's preprocess + inverse, and MONAI's window cutting + blending")
    parser.add_argument("--overhead-only", action="store_true", help="measure only the network-free parts")
    parser.add_argument("--config", default="mdagan-paper")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides (after method.perception.weight=0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-allocator-fix", action="store_true", help="do not set GLIBC_TUNABLES for workers")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40×48×40 volume, roi 24, fp32, 1 repeat")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import json

        worker(json.loads(args.worker))
        return
    if args.quick:
        args.shape, args.roi, args.precisions, args.repeats = [40, 48, 40], 24, ["fp32"], 1
    if args.sw_batch_size is None:
        from volsynth.experiment import load_config

        args.sw_batch_size = load_config(args.config, BASE_OVERRIDES + args.overrides).inference.sw_batch_size
    contenders = [] if args.overhead_only else list(dict.fromkeys(args.contenders))
    if args.overhead_only and args.overhead_repeats < 1:
        parser.error("--overhead-only needs --overhead-repeats >= 1")
    results = []
    for precision in args.precisions:
        spec = {"shape": args.shape, "roi": args.roi, "overlap": args.overlap, "sigma_scale": args.sigma_scale,
                "sw_batch_size": args.sw_batch_size, "precision": precision, "repeats": args.repeats,
                "warmup": args.warmup, "contenders": contenders, "overhead_repeats": args.overhead_repeats,
                "config": args.config,
                "overrides": BASE_OVERRIDES + args.overrides, "seed": args.seed}
        log(f"inference {'×'.join(map(str, args.shape))} roi {args.roi} {precision} ...")
        results.append(run_worker(__file__, spec, allocator_fix=not args.no_allocator_fix))
    report(args, contenders, results)


def report(args: argparse.Namespace, contenders: list[str], results: list[dict[str, Any]]) -> None:
    shape = "×".join(map(str, args.shape))
    print(f"# Inference, one {shape} volume ({environment_line()}; {results[0]['threads']} torch threads in "
          "workers)\n")
    if not contenders:
        print(overhead_table(shape, args, results))
        sys.stdout.flush()
        return
    print(f"mdagan generator ({args.config}, {results[0]['params']:,} parameters, random init), roi {args.roi}³, "
          f"overlap {args.overlap}, Gaussian blending sigma {args.sigma_scale}, sw_batch_size {args.sw_batch_size}. "
          f"Medians of {args.repeats} interleaved run(s) per contender"
          f"{' after one warm-up window batch' if args.warmup else ''}; conv GFLOP/s as % of the "
          "this machine's conv3d ceiling, measured in the worker (best of 32/64/128-channel 3×3×3 layers, "
          f"channels-last, batch 2: {results[0]['ceiling_gflops']:.0f} GFLOP/s {results[0]['precision']}).\n")
    if results[0]["overhead"] is not None:
        print(overhead_table(shape, args, results) + "\n")
    rows = []
    for r in results:
        t = {name: median(r["times"][name]) for name in contenders}
        gflop = {name: r["flops"][name] / 1e9 for name in contenders}
        base = r["rss_baseline_mib"]
        first = r["first"]
        windows = r["windows"][contenders[0]]
        ratio = f"{t['volsynth'] / t['monai']:.3f}" if {"volsynth", "monai"} <= t.keys() else "–"
        row = [shape, f"{args.roi}³", windows, r["precision"]]
        row += [f"{t[n]:.2f}" if n in t else "–" for n in ("volsynth", "monai")]
        row += [ratio, f"{gflop[contenders[0]]:,.0f}", f"{t[contenders[0]] / windows:.2f}"]
        row += [efficiency(gflop[n], t[n], r["ceiling_gflops"]) if n in t else "–" for n in ("volsynth", "monai")]
        row += [f"{gib(r['rss_first_mib'][first])} (+{gib(r['rss_first_mib'][first] - base)})",
                f"{gib(r['rss_peak_mib'])} (+{gib(r['rss_peak_mib'] - base)})",
                "–" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"]
        rows.append(row)
    print(markdown_table(
        ["volume", "roi", "windows", "precision", "volsynth translate_volume s", "plain MONAI s",
         "ratio volsynth/MONAI", "conv GFLOP/volume", f"s/window ({contenders[0]})", "volsynth GFLOP/s (% ceiling)",
         "MONAI GFLOP/s (% ceiling)", f"peak RSS {contenders[0]} GiB (Δ, clean)", "peak RSS process GiB (Δ)",
         "max |Δ| output"], rows))
    for r in results:
        if "compiled" in r["times"] and "monai" in r["times"]:
            t_compiled, t_monai = median(r["times"]["compiled"]), median(r["times"]["monai"])
            print(f"\n`predict --compile` ({r['precision']}): {t_compiled:.2f} s per volume vs plain MONAI "
                  f"{t_monai:.2f} s = **{t_monai / t_compiled:.2f}× faster** "
                  f"({efficiency(r['flops']['compiled'] / 1e9, t_compiled, r['ceiling_gflops'])}); one-off compile + "
                  f"first window batch {r['compile_s']:.1f} s; max |Δ| vs MONAI {r['compiled_max_abs_diff']:.1e}")
    print("\nRaw times (s) and worker CPU time:\n")
    for r in results:
        ref = CALIBRATION_REFERENCE[r["precision"]]
        start, end = r["probe_gflops"]
        raw = "; ".join(f"{n} {', '.join(f'{s:.2f}' for s in r['times'][n])}" for n in contenders) or "no network runs"
        warm = f", warm-up batch {r['warmup_s']:.2f}" if r["warmup_s"] is not None else ""
        print(f"- {r['precision']}: {raw}{warm}; baseline RSS {gib(r['rss_baseline_mib'])} GiB; worker CPU "
              f"{r['cpu_s']:.0f} s, load average at end {r['loadavg'][0]:.1f}; machine probe (Conv3d 64ch 32³ fwd) "
              f"{start:.0f} → {end:.0f} GFLOP/s = {100 * start / ref:.0f} → {100 * end / ref:.0f} % of its "
              f"idle-machine {ref:.0f}")
    sys.stdout.flush()


def overhead_table(shape: str, args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    """Network-free costs: what volsynth adds (preprocess + inverse) and what both share (cutting + blending)."""
    rows = []
    for r in results:
        o = r["overhead"]
        share = ""
        if "monai" in r["times"]:
            share = f"{100 * o['pipeline_s'] / median(r['times']['monai']):.2f} %"
        rows.append([shape, f"{args.roi}³", r["precision"], f"{o['pipeline_s']:.3f}", f"{o['blending_s']:.3f}",
                     share or "–"])
    return (f"Network-free parts (identity network, medians of {args.overhead_repeats}):\n\n" + markdown_table(
        ["volume", "roi", "precision", "volsynth preprocess + inverse s", "window cutting + Gaussian blending s",
         "preprocess + inverse ÷ plain MONAI run"], rows))


if __name__ == "__main__":
    main()
