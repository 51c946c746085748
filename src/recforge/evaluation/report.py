"""Leaderboards: metric means with bootstrap CIs and paired tests, as tables, markdown, CSV and a PNG chart."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from recforge.data.io import atomic_path, save_figure, write_table
from recforge.errors import DataError
from recforge.evaluation.evaluator import EvaluationResult
from recforge.evaluation.stats import bootstrap_ci, paired_test

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("rmse", "mae", "fit_seconds")


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` (``rmse``, ``mae@10``, ...) are better: errors and times."""
    return metric.split("@")[0] in LOWER_IS_BETTER


def leaderboard(
    results: Mapping[str, EvaluationResult],
    metrics: Sequence[str] | None = None,
    primary: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per model: each metric's mean and 95% bootstrap CI (``metric``, ``metric_lo``, ``metric_hi``),
    whole-model figures (coverage, rmse, ...), and the paired t-test p-value of ``primary`` against the best
    model (``p_vs_best``). Sorted best first on ``primary`` (default: the first metric)."""
    if not results:
        raise DataError("no results to rank")
    first = next(iter(results.values()))
    per_user_cols = [c for c in first.per_user.columns if c != "user_id"]
    metrics = list(metrics) if metrics else per_user_cols
    primary = primary or metrics[0]
    rows = []
    for name, res in results.items():
        row: dict[str, object] = {"model": name}
        for m in metrics:
            if m in res.per_user.columns:
                vals = res.per_user[m].to_numpy()
                row[m] = float(vals.mean())
                row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
            elif m in ("rmse", "mae") and res.squared_errors is not None:
                err = res.squared_errors if m == "rmse" else res.abs_errors
                assert err is not None
                lo, hi = bootstrap_ci(err, n_boot=n_boot, seed=seed)
                row[m] = res.summary[m]
                row[f"{m}_lo"], row[f"{m}_hi"] = (np.sqrt(lo), np.sqrt(hi)) if m == "rmse" else (lo, hi)
            elif m in res.summary:
                row[m] = res.summary[m]
        for key in ("fit_seconds",):
            if key in res.summary:
                row[key] = res.summary[key]
        rows.append(row)
    table = pd.DataFrame(rows)
    if primary not in table.columns:
        raise DataError(f"primary metric {primary!r} was not computed; available: {list(table.columns)}")
    ascending = lower_is_better(primary)
    table = table.sort_values(primary, ascending=ascending, kind="stable").reset_index(drop=True)
    best = table.loc[0, "model"]
    if primary in first.per_user.columns:
        ref = results[best].per_user
        pvals = []
        for name in table["model"]:
            cur = results[name].per_user
            if name == best or len(cur) != len(ref) or not np.array_equal(cur["user_id"], ref["user_id"]):
                pvals.append(np.nan)
            else:
                pvals.append(paired_test(cur[primary].to_numpy(), ref[primary].to_numpy()))
        table["p_vs_best"] = pvals
    table.attrs["primary"] = primary
    return table


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if np.isnan(value):
            return ""
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def display_columns(table: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """(header, [columns]) pairs for presenting a leaderboard: CIs folded next to their metric."""
    out = [("model", ["model"])]
    for col in table.columns:
        if col == "model" or col.endswith(("_lo", "_hi")):
            continue
        if f"{col}_lo" in table.columns:
            out.append((col, [col, f"{col}_lo", f"{col}_hi"]))
        else:
            out.append((col, [col]))
    return out


def _cell(row: pd.Series, cols: list[str], digits: int = 4) -> str:
    value = row[cols[0]]
    if len(cols) == 3 and not (isinstance(value, float) and np.isnan(value)):
        lo, hi = row[cols[1]], row[cols[2]]
        if digits < 4:
            return f"{_fmt(value)} [{lo:.{digits}f}, {hi:.{digits}f}]"
        return f"{_fmt(value)} [{_fmt(lo)}, {_fmt(hi)}]"
    return _fmt(value)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; CIs shown as ``mean [lo, hi]``."""
    spec = display_columns(table)
    lines = ["| " + " | ".join(h for h, _ in spec) + " |", "|" + "|".join("---" for _ in spec) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row, cols) for _, cols in spec) + " |")
    return "\n".join(lines) + "\n"


#: Shorter headers for the terminal table.
_SHORT = {"coverage": "cov", "fit_seconds": "fit s", "p_vs_best": "p"}


def _same_as(table: pd.DataFrame, col: str, earlier: list[str]) -> str | None:
    """The earlier metric column that ``col`` repeats on every row (``map@10`` and ``mrr@10`` when every user has one
    relevant item), or ``None``."""
    values = pd.to_numeric(table[col], errors="coerce").to_numpy(float)
    for other in earlier:
        if np.allclose(values, pd.to_numeric(table[other], errors="coerce").to_numpy(float), rtol=0, atol=1e-12,
                       equal_nan=True):
            return other
    return None


def _terminal_cell(row: pd.Series, header: str, cols: list[str]) -> str:
    value = row[cols[0]]
    if isinstance(value, float) and not np.isnan(value):
        if header == "fit_seconds":
            return f"{value:.1f}"
        if header == "p_vs_best":
            return "<0.001" if value < 0.001 else f"{value:.3f}"
    return _cell(row, cols, digits=3)


def print_leaderboard(table: pd.DataFrame, title: str | None = None, kinds: dict[str, str] | None = None,
                      note: str | None = None) -> None:
    """Print a leaderboard as a terminal table that fits 100 columns: the primary metric with its 95% interval
    ``[lo, hi]``, the other metrics as values, each distinct metric once (a column equal to an earlier one on
    every row is left out and named in the caption), ``kinds`` (label -> what the model learns from) beside the
    model, and ``note`` (e.g. what the protocol does) under the table. The CSV keeps everything."""
    primary = table.attrs.get("primary")
    spec, shown, repeats = [("model", ["model"])], [], []
    for header, cols in display_columns(table)[1:]:
        twin = _same_as(table, cols[0], shown) if header not in ("fit_seconds", "p_vs_best") else None
        if twin is not None:
            repeats.append(f"{header} = {twin}")
            continue
        shown.append(cols[0])
        spec.append((header, cols if header == primary else cols[:1]))
    rt = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    rt.add_column("model", no_wrap=True)
    if kinds:
        rt.add_column("learns", no_wrap=True)
    for header, cols in spec[1:]:
        name = next((header.replace(k, v) for k, v in _SHORT.items() if header.startswith(k)), header)
        rt.add_column(f"{name} [95% CI]" if len(cols) == 3 else name, justify="right", no_wrap=True)
    for _, row in table.iterrows():
        cells = [str(row["model"]), *([kinds.get(str(row["model"]), "")] if kinds else [])]
        cells += [_terminal_cell(row, header, cols) for header, cols in spec[1:]]
        rt.add_row(*map(escape, cells))
    caption = ["[lo, hi]: 95% bootstrap interval over users"]
    if "p_vs_best" in table.columns:
        caption.append("p: paired t-test against the best")
    if repeats:
        caption.append("equal here, shown once: " + ", ".join(repeats))
    rt.caption = escape("; ".join(caption) + (f"\n{note}" if note else ""))
    rt.caption_justify = "left"
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: never wrap a results table (and no escape codes)
    console.print(rt)


def plot_leaderboard(table: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """A horizontal bar chart of ``metric`` with CI error bars, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric not in table.columns:
        raise DataError(f"cannot plot {metric!r}: not in the leaderboard")
    data = table.iloc[::-1]
    vals = data[metric].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(data) + 1.2))
    if f"{metric}_lo" in data.columns:
        err = np.vstack([vals - data[f"{metric}_lo"].to_numpy(float), data[f"{metric}_hi"].to_numpy(float) - vals])
        ax.barh(data["model"], vals, xerr=err, capsize=4, color="#4C72B0")
    else:
        ax.barh(data["model"], vals, color="#4C72B0")
    ax.set_xlabel(f"{metric} (95% bootstrap CI)")
    ax.set_title(table.attrs.get("title", "recforge leaderboard"))
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def save_leaderboard(
    table: pd.DataFrame, out_dir: str | Path, metric: str | None = None, stem: str = "leaderboard"
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.png`` (default stem ``leaderboard``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_table(table, out / f"{stem}.csv")}
    with atomic_path(out / f"{stem}.md") as tmp:
        tmp.write_text(to_markdown(table))
    paths["md"] = out / f"{stem}.md"
    if len(table):
        paths["png"] = plot_leaderboard(table, metric or table.attrs.get("primary", table.columns[1]),
                                        out / f"{stem}.png")
    return paths
