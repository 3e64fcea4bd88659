"""The SHAP audit of the demo's model: seconds per version, and agreement with KernelExplainer.

Builds the demo's job (server/demo.py ``demo_spec``: an MLP [64, 32] on
mlc_churn, reference = the 1,000 held-out rows), trains it for a few FedAvg
rounds over the natural split by state (the demo's local training), then:

- times ``audit_version`` for one version with the spec's audit defaults
  (1,000 explained rows, 100 background rows, 20 validation rows, both plots,
  drift against the previous version's report): the first audit in a process
  (which pays numba's compilation inside shap's permutation explainer) and the
  median of ``--repeat`` further ones, with the parts (DeepLIFT pass,
  validation, plots);
- compares the audit's SHAP values on ``--kernel-rows`` rows with
  ``shap.KernelExplainer`` over the same background (Pearson correlation of
  all values, per input column and per original feature; target >= 0.95).

    python bench/audit.py [--rounds 3] [--devices 8] [--repeat 3] [--kernel-rows 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.demo import demo_spec  # noqa: E402
from shared.datasets import load_dataset, natural_split, test_split  # noqa: E402
from shared.jobspec import validate_spec  # noqa: E402
from shared.tabular import Preprocessor, local_statistics, merge_statistics  # noqa: E402
from shared.training import evaluate, train_local  # noqa: E402
from shared.zoo import architecture, build_model, flatten_parameters, load_flat_parameters  # noqa: E402
from training_cluster.audit import (  # noqa: E402
    audit_version,
    beeswarm_plot,
    draw_rows,
    explain,
    feature_groups,
    importance_plot,
    load_model,
    to_features,
    validate,
)


def fedavg_rounds(spec, pre, arch, train, group: str, devices: int, rounds: int) -> list[np.ndarray]:
    """The demo's rounds without the network: each device trains from the global model, FedAvg sums."""
    parts = [pre.transform(part) for part in natural_split(train, group, devices, spec.seed)]
    vector = flatten_parameters(build_model(arch, seed=spec.seed))
    versions = []
    t = spec.training
    for rnd in range(1, rounds + 1):
        total = np.zeros(vector.shape, dtype=np.float64)
        weight = 0
        for i, (x, y) in enumerate(parts):
            model = build_model(arch)
            load_flat_parameters(model, vector)
            train_local(
                model,
                x,
                y,
                task=spec.data.task,
                epochs=t.epochs,
                batch_size=t.batch_size,
                learning_rate=t.learning_rate,
                optimizer=t.optimizer,
                seed=rnd * 1000 + i,
            )
            total += len(y) * flatten_parameters(model)
            weight += len(y)
        vector = (total / weight).astype(np.float32)
        versions.append(vector)
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kernel-rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the audit's default: 1)")
    args = parser.parse_args()

    df, schema, group = load_dataset("mlc_churn")
    train, reference = test_split(df, 0.2, args.seed, stratify_column=schema["target"])
    spec = validate_spec(
        demo_spec(schema, rounds=args.rounds, devices=args.devices, seed=args.seed, reference="reference.csv")
    )
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(train, spec.data)]), spec.data)
    arch = architecture(spec.model, pre.input_dim, pre.output_dim)
    started = time.perf_counter()
    versions = fedavg_rounds(spec, pre, arch, train, group, args.devices, args.rounds)
    train_seconds = time.perf_counter() - started
    header = {"arch": arch, "preprocess": pre.to_dict()}
    x_ref, y_ref = pre.transform(reference)
    metrics = evaluate(load_model(header, versions[-1]), x_ref, y_ref, task="binary")
    print(
        f"demo model: mlp {spec.model.hidden} on mlc_churn, {pre.input_dim} input columns"
        f" ({len(spec.data.features)} features), {args.rounds} FedAvg rounds over {args.devices} devices"
        f" in {train_seconds:.1f} s; reference AUC {metrics.get('auc', float('nan')):.3f}"
    )
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")

    # Audit seconds per version, with the previous version's report in hand as the worker has it.
    # The first audit in a process also pays numba's compilation inside shap's permutation explainer.
    last, before = len(versions), len(versions) - 1
    t0, c0 = time.perf_counter(), time.process_time()
    previous = audit_version(
        spec, {**header, "version": before}, versions[-2], reference, threads=args.threads
    ).report
    cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"  first audit in this process (v{before}): {cold:.2f} s wall, {cold_cpu:.2f} s CPU")
    runs, cpu = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result = audit_version(
            spec,
            {**header, "version": last},
            versions[-1],
            reference,
            previous=previous,
            threads=args.threads,
        )
        runs.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    steady, steady_cpu = statistics.median(runs), statistics.median(cpu)
    report = result.report
    print(
        f"audit seconds per version ({report['rows']} rows, background {report['background']},"
        f" {report['validation']['rows']} validation rows, 2 plots, drift vs v{before}):"
        f" median {steady:.2f} s wall, {steady_cpu:.2f} s CPU over {args.repeat}"
        f" (wall {', '.join(f'{r:.2f}' for r in runs)})"
    )

    # The parts, timed alone on the same rows.
    x = pre.transform_features(reference)
    rows, background = draw_rows(len(x), spec.audit, spec.seed, last)
    model = load_model(header, versions[-1])
    t0 = time.perf_counter()
    attributions = explain(model, x[rows], x[background], threads=args.threads)
    deep_seconds = time.perf_counter() - t0
    import shap

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    loop_values = shap.DeepExplainer(model, torch.from_numpy(x[background])).shap_values(
        torch.from_numpy(x[rows]), check_additivity=False
    )
    loop_seconds = time.perf_counter() - t0
    loop_diff = float(
        np.max(np.abs(np.asarray(loop_values).reshape(attributions.values.shape) - attributions.values))
    )
    features, groups = feature_groups(pre)
    values = to_features(attributions.values, groups)
    k = spec.audit.validate_rows
    t0 = time.perf_counter()
    validate(model, x[rows][:k], x[background], values[:k], groups, seed=spec.seed)
    validation_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    importance_plot({"all": report["importance"]}, report["top_features"], "bench")
    beeswarm_plot(values[:, :, 0], np.full(values.shape[:2], np.nan), features, "bench")
    plot_seconds = time.perf_counter() - t0
    print(
        f"  parts: DeepLIFT on {len(rows)} rows {deep_seconds:.2f} s (shap's own row-by-row loop:"
        f" {loop_seconds:.2f} s, max |diff| {loop_diff:.1e}), validation on {k} rows"
        f" {validation_seconds:.2f} s, plots {plot_seconds:.2f} s"
    )
    print(
        f"  report: additivity max error {report['additivity_max_error']:.2e}, validation"
        f" ({report['validation']['explainer']}) correlation {report['validation']['correlation']:.4f},"
        f" rank correlation with v{before} {report['drift']['rank_correlation']:.3f}, verdict {report['verdict']}"
    )
    print(f"  top features: {', '.join(report['top_features'])}")

    # Agreement with KernelExplainer on the first --kernel-rows explained rows.
    n = min(args.kernel_rows, len(rows))

    def f(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(batch, dtype=np.float32))).numpy()[:, 0]

    t0 = time.perf_counter()
    kernel = shap.KernelExplainer(f, x[background])
    kernel_values = np.asarray(kernel.shap_values(x[rows][:n], silent=True), dtype=np.float64).reshape(n, -1)
    kernel_seconds = time.perf_counter() - t0
    ours_columns = attributions.values[:n, :, 0]
    column_corr = float(np.corrcoef(ours_columns.reshape(-1), kernel_values.reshape(-1))[0, 1])
    feature_corr = float(
        np.corrcoef(values[:n, :, 0].reshape(-1), (kernel_values @ groups).reshape(-1))[0, 1]
    )
    max_diff = float(np.max(np.abs(values[:n, :, 0] - kernel_values @ groups)))
    print(
        f"correlation with KernelExplainer on {n} rows (same background, nsamples auto):"
        f" {feature_corr:.4f} per feature, {column_corr:.4f} per input column"
        f" (max |diff| {max_diff:.3f} logit; Kernel took {kernel_seconds:.1f} s, target >= 0.95)"
    )

    print(
        json.dumps(
            {
                "bench": "audit",
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                "load_average_1m": round(os.getloadavg()[0], 2),
                "torch": torch.__version__,
                "threads": args.threads,
                "shap": shap.__version__,
                "input_columns": pre.input_dim,
                "features": len(features),
                "rows": report["rows"],
                "background": report["background"],
                "validate_rows": report["validation"]["rows"],
                "reference_auc": metrics.get("auc"),
                "audit_seconds_first": round(cold, 3),
                "audit_seconds_median": round(steady, 3),
                "audit_cpu_seconds_median": round(steady_cpu, 3),
                "deeplift_seconds": round(deep_seconds, 3),
                "deeplift_shap_loop_seconds": round(loop_seconds, 3),
                "validation_seconds": round(validation_seconds, 3),
                "plot_seconds": round(plot_seconds, 3),
                "additivity_max_error": report["additivity_max_error"],
                "validation_correlation": report["validation"]["correlation"],
                "kernel_rows": n,
                "kernel_correlation_features": round(feature_corr, 4),
                "kernel_correlation_columns": round(column_corr, 4),
                "kernel_max_abs_diff": round(max_diff, 4),
                "kernel_seconds": round(kernel_seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
