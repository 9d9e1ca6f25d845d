"""The report's figures (PNG, matplotlib, no display needed): training loss, pass@1 per
difficulty band, and the lock/fork diagnostics. Each function writes one file atomically."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a worker
import matplotlib.pyplot as plt  # noqa: E402

from tasks.core.files import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def training_loss(curves: dict[str, str | Path], out: str | Path) -> None:
    """curves: arm -> dvclive's loss curve of its train stage (a TSV: step, loss)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, path in curves.items():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], marker=".", label=arm)
    ax.set(xlabel="optimizer step", ylabel="loss (answer tokens)", title="SFT on the model's own samples")
    ax.legend()
    _save(fig, out)


def difficulty_bands(sets: dict[str, dict], out: str | Path) -> None:
    """pass@1 per difficulty band with its CI, one panel per eval set that has bands (report
    summary's sets: by_difficulty holds [pass@1, low, high] per band)."""
    banded = {name: s for name, s in sets.items() if "difficulty_problems" in s}
    fig, axes = plt.subplots(1, len(banded), figsize=(5 * len(banded), 3.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], banded.items()):
        bands = list(result["difficulty_problems"])
        width = 0.8 / len(result["models"])
        for i, (model, m) in enumerate(result["models"].items()):
            value, low, high = zip(*(m["by_difficulty"].get(b, (0.0, 0.0, 0.0)) for b in bands))
            errors = [[v - lo for v, lo in zip(value, low)], [hi - v for v, hi in zip(value, high)]]
            ax.bar([b + i * width for b in range(len(bands))], value, width, yerr=errors, capsize=2, label=model)
        ax.set_xticks([b + 0.4 - width / 2 for b in range(len(bands))],
                      [f"{b}\n({result['difficulty_problems'][b]})" for b in bands])
        ax.set(title=f"{name}: pass@1 by difficulty", ylabel="pass@1")
        ax.legend()
    _save(fig, out)


def diagnostics(metrics: dict[str, dict], out: str | Path, mechanism: dict | None = None) -> None:
    """metrics: model -> diagnose/<model>/metrics.json. Cumulative mass by rank at lock and fork
    positions, tokens surviving truncation over the T sweep, and (mechanism: the report's
    {arm: {other: {"lock.kept_mass": [delta, low, high], ...}}}) each arm's change against the
    base and the null control with its CI."""
    panels = 4 if mechanism else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    for model, m in metrics.items():
        for ax, cls in zip(axes[:2], ("lock", "fork")):
            if cls in m:
                mass = m[cls]["cum_mass_by_rank"]
                ax.plot(range(1, len(mass) + 1), mass, marker=".", label=f"{model} ({m[cls]['positions']} pos.)")
        survive = m["all"]["surviving_by_temperature"]
        axes[2].plot([float(t) for t in survive], list(survive.values()), marker="o", label=model)
    for ax, cls in zip(axes[:2], ("lock", "fork")):
        ax.set(xscale="log", xlabel="token rank", ylabel="cumulative probability (T=1)",
               title=f"{cls} positions (classed by the base)")
        ax.legend()
    axes[2].set(xlabel="T_eval", ylabel="tokens surviving top-k/top-p", title="surviving tokens vs temperature")
    axes[2].legend()
    if mechanism:
        rows = [(f"{arm} vs {other}: {key.replace('.', ' ').replace('_', ' ')}", *values)
                for arm, versus in mechanism.items() for other, compared in versus.items()
                for key, values in compared.items()]
        for y, (_, delta, low, high) in enumerate(rows):
            axes[3].errorbar(delta, y, xerr=[[delta - low], [high - delta]], fmt="o", capsize=3,
                             color="C0" if low > 0 or high < 0 else "C7")  # grey: the CI includes 0
        axes[3].axvline(0, color="black", linewidth=0.8)
        axes[3].set_yticks(range(len(rows)), [label for label, *_ in rows], fontsize=7)
        axes[3].set(xlabel="difference (paired CI over problems)", title="mechanism: change and its CI")
    _save(fig, out)


def temperature_sweep(choices: dict[str, dict], out: str | Path) -> None:
    """Validation pass@1 against T_eval per model, each model's chosen T marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for model, choice in choices.items():
        curve = {float(t): v for t, v in choice["validation_pass@1"].items()}
        line, = ax.plot(list(curve), list(curve.values()), marker="o", label=f"{model} (T={choice['chosen']:g})")
        ax.plot([choice["chosen"]], [curve[choice["chosen"]]], marker="*", markersize=14, color=line.get_color())
    ax.set(xlabel="T_eval", ylabel="pass@1 (validation)", title="T_eval sweep: each model at its own best T")
    ax.legend()
    _save(fig, out)


def grid_heatmap(cells: dict[tuple[float, float], float], out: str | Path, title: str) -> None:
    """cells: (T_train, T_eval) -> pass@1; rows T_train, columns T_eval, each cell labelled."""
    t_train = sorted({t for t, _ in cells})
    t_eval = sorted({t for _, t in cells})
    values = [[cells.get((a, b), float("nan")) for b in t_eval] for a in t_train]
    fig, ax = plt.subplots(figsize=(1.2 * len(t_eval) + 2.5, 0.8 * len(t_train) + 2))
    image = ax.imshow(values, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(t_eval)), [f"{t:g}" for t in t_eval])
    ax.set_yticks(range(len(t_train)), [f"{t:g}" for t in t_train])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
    ax.set(xlabel="T_eval", ylabel="T_train", title=title)
    fig.colorbar(image, ax=ax, label="pass@1")
    _save(fig, out)


def pass_vs_t_eff(cells: dict[tuple[float, float], float], out: str | Path, title: str) -> None:
    """pass@1 against T_eff = T_train x T_eval (the paper: performance follows T_eff), one
    line per T_train."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t_train in sorted({t for t, _ in cells}):
        points = sorted((t_train * t_eval, v) for (a, t_eval), v in cells.items() if a == t_train)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"T_train={t_train:g}")
    ax.set(xlabel="T_eff = T_train x T_eval", ylabel="pass@1", title=title)
    ax.legend(fontsize=8)
    _save(fig, out)
