"""Make-A-Volume inference cost next to mdagan on the same volume, and what the volumetric layers add.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \\
        .venv/bin/python benchmarks/make_a_volume.py [--tier cpu|paper] [--shape 64 64 48] [--steps 50 200]
        [--repeats 1] [--precision fp32] [--quick]

Contenders, each in its own fresh worker process (so that its peak RSS is its own), all through
:func:`volsynth.inference.predict.translate_volume` (preprocess → the method's inferer → inverse), i.e. what
``volsynth predict`` does per volume after loading:

* ``make_a_volume`` (``make_a_volume-<tier>``, stage ``volumetric``): encode every slice, DDIM with ``--steps``
  steps on all slices of the volume jointly (the volumetric layers see the whole volume), decode;
* ``mdagan`` (``mdagan-<tier>``, perception loss off): Gaussian sliding windows.

Weights are random (timing only; the latent scale is set to 1). The volume is random on [0, 1] with exact min 0
and max 1 and the config's spacing, so preprocessing neither rescales nor resamples: every contender sees the
same grid. Reported per contender: median seconds per volume over ``--repeats`` runs after one untimed warm-up
run, UNet/generator calls, conv GFLOP per volume (forward hooks; the share of the volumetric 1D convs), and
memory as **peak RSS** of the worker (``getrusage(RUSAGE_SELF).ru_maxrss``: the whole process, i.e. torch, the
weights and inference) with its rise over the RSS after building the network. A separate worker counts the
parameters of both presets of make_a_volume and the increase from the volumetric layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from _common import (
    ConvFlopCounter,
    emit_result,
    environment_line,
    log,
    markdown_table,
    median,
    peak_rss_mib,
    run_worker,
    timed,
)

TIERS = {"cpu": {"shape": [64, 64, 48]}, "paper": {"shape": [256, 256, 35]}}  # paper: RIRE's 256×256×35


def worker_parameters(spec: dict[str, Any]) -> None:
    from volsynth.experiment import load_config
    from volsynth.methods import build_method

    counts = {}
    for tier in ("cpu", "paper"):
        method = build_method(load_config(f"make_a_volume-{tier}").method)
        counts[tier] = method.parameter_counts()
        del method
    emit_result({"counts": counts})


def worker_translate(spec: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from volsynth.data.volume import Volume
    from volsynth.experiment import load_config
    from volsynth.inference.predict import translate_volume
    from volsynth.methods import build_method

    torch.manual_seed(spec["seed"])
    shape, spacing = spec["shape"], [1.0, 1.0, 1.0]
    overrides = [f"data.spacing={json.dumps(spacing)}", f"inference.precision={spec['precision']}"]
    if spec["method"] == "make_a_volume":
        overrides += ["method.stage=volumetric", f"inference.steps={spec['steps']}"]
    else:
        overrides += ["method.perception.weight=0"]
    config = load_config(f"{spec['method']}-{spec['tier']}", overrides + spec["overrides"])
    method = build_method(config.method, inference=True).eval()
    network = method.unet if spec["method"] == "make_a_volume" else method.generator
    if spec["method"] == "make_a_volume":
        method.latent_scale.fill_(1.0)  # random weights: any positive scale times the same
    built_rss = peak_rss_mib()
    calls = [0]
    network.register_forward_pre_hook(lambda _module, _args: calls.__setitem__(0, calls[0] + 1))
    rng = np.random.default_rng(spec["seed"])
    array = rng.random(shape, dtype=np.float32)
    array.flat[0], array.flat[-1] = 0.0, 1.0
    volume = Volume(array, spacing=tuple(spacing))

    def run() -> np.ndarray:
        return translate_volume(method, config, volume).array

    groups: dict[str, Any] = {"network": method}
    if spec["method"] == "make_a_volume":  # the 1D convs alone (also inside "network")
        groups["volumetric"] = torch.nn.ModuleList(layer.volumetric for layer in method.unet.volumetric_layers())
    flops = ConvFlopCounter(groups)
    with flops:
        warmup_s, output = timed(run)
    per_volume_calls = calls[0]
    times = [timed(run)[0] for _ in range(spec["repeats"])]
    assert output.shape == tuple(shape)
    emit_result({"method": spec["method"], "steps": spec.get("steps"), "times": times, "warmup_s": warmup_s,
                 "calls": per_volume_calls, "gflop": flops.forward["network"] / 1e9,
                 "volumetric_gflop": flops.forward.get("volumetric", 0.0) / 1e9, "built_rss_mib": built_rss,
                 "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads(),
                 "params": sum(p.numel() for p in method.parameters())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="cpu", help="presets *-cpu or *-paper")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="volume (Z = the slice axis); default 64×64×48 (cpu) or 256×256×35 (paper, RIRE)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200], help="DDIM steps to time")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 32×32×12 volume, DDIM 5 and 10 steps")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        (worker_parameters if spec["kind"] == "parameters" else worker_translate)(spec)
        return
    if args.quick:
        args.shape, args.steps = [32, 32, 12], [5, 10]
    shape = args.shape or TIERS[args.tier]["shape"]
    base = {"kind": "translate", "tier": args.tier, "shape": shape, "precision": args.precision,
            "repeats": args.repeats, "seed": args.seed, "overrides": args.overrides}
    results = []
    for steps in args.steps:
        log(f"make_a_volume DDIM {steps} on {shape} ...")
        results.append(run_worker(__file__, {**base, "method": "make_a_volume", "steps": steps}))
    log(f"mdagan on {shape} ...")
    results.append(run_worker(__file__, {**base, "method": "mdagan"}))
    log("parameter counts ...")
    counts = run_worker(__file__, {"kind": "parameters"})["counts"]
    report(args, shape, results, counts)


def report(args: argparse.Namespace, shape: list[int], results: list[dict[str, Any]],
           counts: dict[str, dict[str, int]]) -> None:
    volume = "×".join(map(str, shape))
    print(f"# Make-A-Volume inference, one {volume} volume ({environment_line()}; {results[0]['threads']} torch "
          f"threads in workers; {args.precision}; {args.tier} presets, random weights)\n")
    rows = []
    for r in results:
        name = f"make_a_volume DDIM {r['steps']}" if r["method"] == "make_a_volume" else "mdagan (sliding window)"
        seconds = median(r["times"]) if r["times"] else r["warmup_s"]
        rows.append([name, f"{r['params']:,}", r["calls"], f"{seconds:.2f}", f"{r['warmup_s']:.2f}",
                     f"{r['gflop']:,.1f}", f"{100 * r['volumetric_gflop'] / r['gflop']:.1f} %"
                     if r["method"] == "make_a_volume" else "–", f"{r['peak_rss_mib']:,.0f}",
                     f"+{r['peak_rss_mib'] - r['built_rss_mib']:,.0f}"])
    print(markdown_table(["contender", "parameters", "network calls/volume", "s/volume (median)", "warm-up run s",
                          "conv GFLOP/volume", "of which volumetric 1D convs", "peak RSS MiB (process)",
                          "RSS rise during inference MiB"], rows))
    print("\nParameters of make_a_volume (volumetric = the identity-initialised 1D convs):\n")
    rows = []
    for tier, c in counts.items():
        rows.append([tier, f"{c['autoencoder']:,}", f"{c['unet']:,}", f"{c['volumetric']:,}",
                     f"{100 * c['volumetric'] / c['unet']:.1f} %",
                     f"{100 * c['volumetric'] / (c['unet'] + c['autoencoder']):.1f} %"])
    print(markdown_table(["preset", "autoencoder", "2D UNet", "volumetric layers", "increase over the UNet",
                          "increase over UNet + autoencoder"], rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
