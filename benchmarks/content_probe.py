"""Do an unpaired slice method's two domains share one content space? A linear tissue probe across domains.

    python benchmarks/content_probe.py --run RUN --manifest M [--source t1 --target t2] [--out probe.json]

HiFi-Syn (DRIT++) translates by decoding the *source's* content code with the *target's* generator, so the method
only works when both content encoders put the same tissue at the same place in one shared space (the content
discriminator's job). This asks that directly: a logistic regression learns the tissue class (CSF/GM/WM, labels
majority-pooled to the content grid) from one domain's codes on the ``train`` subjects and is scored on the
``test`` subjects' codes of each domain. Within a domain it shows whether the codes carry tissue at all; across
domains, whether the space is shared. Compare both with the majority-class rate, which a probe that learnt
nothing reaches. The first use (benchmarks/RESULTS.md, HiFi-Syn, fourth session): at 2 mm each domain's codes
carry tissue (0.77-0.80 against 0.65) while the cross-domain rate sits at the majority rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DOMAINS = ("source", "target")


def probe_accuracies(codes: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], *, seed: int = 0
                     ) -> dict[str, float]:
    """Accuracy of a linear tissue probe trained on one domain's training codes, on each domain's test codes.

    ``codes[(domain, split)]`` is ``(features (N, C), classes (N,))`` for ``domain`` in :data:`DOMAINS` and
    ``split`` in ``train``/``test``. Returns ``"{trained}->{scored}"`` accuracies for the four pairs, each domain's
    test majority-class rate (``"majority_{domain}"``) and the distance between the two domains' test-code means
    over the mean within-class standard deviation (``"domain_gap"``; about 0 for a shared space).
    """
    from sklearn.linear_model import LogisticRegression

    result: dict[str, float] = {}
    for trained in DOMAINS:
        features, classes = codes[(trained, "train")]
        probe = LogisticRegression(max_iter=2000, random_state=seed).fit(features, classes)
        for scored in DOMAINS:
            test_features, test_classes = codes[(scored, "test")]
            result[f"{trained}->{scored}"] = float(probe.score(test_features, test_classes))
    for domain in DOMAINS:
        classes = codes[(domain, "test")][1]
        result[f"majority_{domain}"] = float(np.bincount(classes).max() / classes.size)
    (a, a_classes), (b, _) = codes[("source", "test")], codes[("target", "test")]
    spread = np.mean([a[a_classes == k].std(axis=0).mean() for k in np.unique(a_classes)])
    result["domain_gap"] = float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)) / spread)
    return result


def content_codes(run: Path, manifest: Path, source: str, target: str
                  ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Each subject's axial-slice content codes per domain, inside the brain, with their pooled tissue class."""
    import torch
    from learning_curve import read_subject

    from volsynth.experiment import load_method
    from volsynth.methods.base import fold_slices, to_network_scale

    method, _, _ = load_method(run / "checkpoints" / "last.pt", device="cpu")
    method.eval()
    codes: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for entry in json.loads(manifest.read_text())["subjects"]:
        if entry["split"] not in ("train", "test"):
            continue
        subject = read_subject(manifest, entry, source, target)
        # The method's own label → memory-class mapping and pooling to the content grid (tumour labels as its
        # unlisted_label_class), as its training saw them.
        classes = method.content_labels(torch.from_numpy(subject["tissue"])[None, None])  # (D, H/4, W/4)
        brain = classes > 0
        for index, domain in enumerate(DOMAINS):
            slices = fold_slices(torch.from_numpy(subject[domain])[None, None])  # (D, 1, H, W)
            with torch.no_grad():
                content = method.encode_content(to_network_scale(slices), index)
            codes.setdefault((domain, entry["split"]), []).append(
                (content.permute(0, 2, 3, 1)[brain].numpy(), classes[brain].numpy()))
    return {key: (np.concatenate([f for f, _ in parts]), np.concatenate([c for _, c in parts]))
            for key, parts in codes.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a hifisyn run folder (checkpoints/last.pt)")
    parser.add_argument("--manifest", type=Path, required=True, help="phantom manifest with tissue maps and splits")
    parser.add_argument("--source", default="t1")
    parser.add_argument("--target", default="t2")
    parser.add_argument("--out", type=Path, default=None, help="the accuracies as JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))  # learning_curve's reader
    result = probe_accuracies(content_codes(args.run, args.manifest, args.source, args.target))
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
