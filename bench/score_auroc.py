"""What the scores are worth: on the demo crawl's ground truth, the AUROC of every score column for
telling the teacher's domain (MNIST digits in the crawl) from the rest, and the precision of the
top-k set by each score. Prints JSON, then a markdown table.

    python bench/score_auroc.py [--workspace workspace] [--truth demo/crawl/ground_truth.parquet]

Run `make demo` first (it scores the demo crawl). Reads the candidates view, so kNN scores from the
index stage (e.g. knn_digit_prompts, CLIP similarity to "handwritten digit N") are compared too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.report import score_quality  # noqa: E402
from curation.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="workspace")
    ap.add_argument("--truth", default="demo/crawl/ground_truth.parquet")
    ap.add_argument("--k", type=int, nargs="+", default=[500, 1000, 1500])
    args = ap.parse_args()
    result = score_quality(Workspace(args.workspace), Path(args.truth).resolve(), args.k)
    print(json.dumps(result, indent=2))
    print()
    print(f"{result['in_domain']} in-domain samples (MNIST) among {result['samples']}; chance precision "
          f"{result['in_domain'] / result['samples']:.3f}")
    print()
    print("| score | AUROC | " + " | ".join(f"precision@{k}" for k in args.k) + " |")
    print("|---|---|" + "---|" * len(args.k))
    for r in result["scores"]:
        print(f"| {r['score']} | {r['auroc']:.3f} | " + " | ".join(f"{r[f'precision@{k}']:.3f}" for k in args.k) + " |")


if __name__ == "__main__":
    main()
