"""What a finished sweep leaves behind: the trials table, best config, plot and terminal summary."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

# Keys that place or name one run: left out of the best config, so it trains anywhere.
RUN_KEYS = ("mode", "resume", "project", "name", "exist_ok")


def trial_rows(results, state, space: dict, mode: str, checkpoint_uri) -> pd.DataFrame:
    """One row per trial: its sampled values, best and last objective, epochs, status, runs."""
    rows = []
    for result in results:
        df = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        config = result.config or {}
        row = {"trial_id": trial_id}
        row.update({key: config.get(key) for key in space})
        known = (state.mlflow_runs.get(trial_id), state.status.get(trial_id))
        run_id, status = known if known[0] else (state.recorded(trial_id) or ("", None))
        logged = state.objective_history(run_id) if run_id else []
        objective = merged_objectives(df, logged, int(metrics.get("training_iteration") or 0))
        best = (objective.max() if mode == "max" else objective.min()) if len(objective) else math.nan
        row["objective"] = float(best)
        row["last_objective"] = float(objective.iloc[-1]) if len(objective) else math.nan
        row["epochs"] = int(len(objective))
        row["status"] = status or ("FAILED" if result.error else "NOT_STARTED")
        row["error"] = state.errors.get(trial_id, "")
        row["mlflow_run_id"] = run_id
        row["checkpoint"] = checkpoint_uri(result) or ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values("objective", ascending=(mode == "min"), na_position="last", kind="stable")
    return table.reset_index(drop=True)


def trial_line(trial, error: str | None = None, stopped: bool = False) -> str:
    """One console line for a trial that ended (by itself, or ``stopped`` by Tune): its sampled
    values, then its last objective and epochs, or its error's line."""
    values = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (trial.evaluated_params or {}).items())
    if error is not None:
        return f"trial {trial.trial_id} failed  {values}  error: {error}"
    result = trial.last_result or {}
    objective, epochs = result.get("objective"), result.get("training_iteration", 0)
    reached = f"objective {objective:.4g}" if isinstance(objective, (int, float)) else "no objective"
    return f"trial {trial.trial_id} {'stopped' if stopped else 'ended'}  {values}  {reached} after {epochs} epoch(s)"


def merged_objectives(df, logged: list[float], taken: int) -> pd.Series:
    """The trial's objectives: Tune's results or, when longer, the first ``taken`` (the reports Tune
    took) of those its child run logged (Tune's copy of its results can miss the last reports
    before a restart from a checkpoint). The child run logs an objective at every epoch trained,
    also at epochs trained after Tune decided to stop the trial (ASHA), which Tune never ranked."""
    tune_side = df["objective"].dropna() if df is not None and "objective" in df else pd.Series(dtype=float)
    logged_side = pd.Series(logged[:taken], dtype=float).dropna()
    return logged_side if len(logged_side) > len(tune_side) else tune_side.reset_index(drop=True)


def best_row(table: pd.DataFrame):
    ok = table[table["objective"].notna()] if len(table) else table
    return None if not len(ok) else ok.iloc[0]


def best_config(base_args, overrides: dict) -> dict:
    """The full training config of the best trial, minus the keys that place a run."""
    values = {**base_args.to_dict(), **overrides}
    return {k: v for k, v in values.items() if k not in RUN_KEYS}


def write_tables(table: pd.DataFrame, folder: Path) -> list[Path]:
    csv, parquet = folder / "trials.csv", folder / "trials.parquet"
    table.to_csv(csv, index=False)
    table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(parquet, index=False)
    return [csv, parquet]


def write_best(config: dict, folder: Path) -> Path:
    path = folder / "best.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _axis(values: pd.Series, kind: str, options=()) -> tuple[np.ndarray, list[str], list[float]]:
    """Values scaled to 0..1 for one axis, with tick labels (categories in space order, or low/high)."""
    if kind in ("choice", "grid") or values.dtype == object:
        cats = list(dict.fromkeys([str(o) for o in options] + list(values.astype(str))))
        pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
        return np.array([pos[str(v)] for v in values]), cats, [pos[c] for c in cats]
    x = values.astype(float).to_numpy()
    if kind == "loguniform":
        x = np.log10(np.clip(x, 1e-300, None))
    lo, hi = np.nanmin(x), np.nanmax(x)
    scaled = (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)
    raw = values.astype(float)
    return scaled, [f"{raw.min():.3g}", f"{raw.max():.3g}"], [0.0, 1.0] if hi > lo else [0.5, 0.5]


def parallel_coordinates(table: pd.DataFrame, space: dict, path: Path, objective: str = "objective") -> Path | None:
    """One line per trial across the searched keys and the objective, coloured by objective."""
    ok = table[table["objective"].notna()]
    if not len(ok):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [(key, kind, opts) for key, (kind, opts) in space.items()] + [("objective", "uniform", ())]
    fig, ax = plt.subplots(figsize=(max(4.0, 2.2 * len(axes)), 4.5), dpi=120)
    columns = [_axis(ok[key], kind, opts if kind in ("choice", "grid") else ()) for key, kind, opts in axes]
    obj = ok["objective"].astype(float).to_numpy()
    span = obj.max() - obj.min()
    colours = plt.cm.viridis((obj - obj.min()) / span if span > 0 else np.full_like(obj, 0.5))
    for i in range(len(ok)):
        ax.plot(range(len(axes)), [col[0][i] for col in columns], color=colours[i], alpha=0.8, lw=1.5)
    for j, (_, labels, ticks) in enumerate(columns):
        ax.axvline(j, color="0.6", lw=0.8)
        for label, y in zip(labels, ticks):
            ax.annotate(label, (j, y), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(range(len(axes)))
    ax.set_xticklabels([k for k, _, _ in axes[:-1]] + [objective])
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes) - 0.6)
    ax.set_title(f"{len(ok)} trials (colour: objective)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary(table: pd.DataFrame, space: dict, best_checkpoint: str | None, objective: str) -> str:
    """A plain-text table of the trials, best first, for the terminal."""
    cols = ["trial_id", *space, "objective", "epochs", "status"]
    cells = [[_fmt(row[c]) for c in cols] for _, row in table.iterrows()]
    head = [c if c != "objective" else f"objective ({objective})" for c in cols]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(head)]
    line = lambda items: "  ".join(str(x).ljust(w) for x, w in zip(items, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    best = best_row(table)
    if best is not None:
        out.append(f"best: trial {best['trial_id']} objective {_fmt(best['objective'])}"
                   + (f"  checkpoint {best_checkpoint}" if best_checkpoint else ""))
    return "\n".join(out)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.5g}"
    return str(value)
