"""The shipped replication table, recomputed from the shipped logs and the rows' per-model numbers by code written
apart from ``legointerp/replicate.py`` (no helper of it is imported): endpoints, fits, effects, intervals, decisions
and verdicts.  A row edited by hand, logs from other runs, or a rule that drifted from the code fails here."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROWS = sorted((DOCS / "replication").glob("*.json"))
FIT, LAST_EVALS = 0.9, 3  # as docs/replication.md states them


def _log(row: dict, name: str) -> list[dict]:
    path = DOCS / "replication" / "logs" / row["scale"]["name"] / name.replace(".pt", ".log.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _end(log: list[dict]) -> np.ndarray:
    return np.array([r["accuracy"] for r in log[-LAST_EVALS:]]).mean(0)


def _welch(a, b) -> tuple[float, float, float]:
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a.mean() - b.mean()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return d, d, d
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    return d, d - half, d + half


def _student(x) -> tuple[float, float, float]:
    x = np.asarray(x, float)
    if x.std() == 0:
        return x.mean(), x.mean(), x.mean()
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean(), x.mean() - half, x.mean() + half


def _clopper_pearson(k: int, n: int) -> tuple[float, float, float]:
    low = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    high = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    return k / n, low, high


def _decide(part: dict, effect: tuple[float, float, float]) -> str:
    _, low, high = effect
    above, reaches = low > part["null"], high >= part["null"] + part["margin"]
    return {(True, True): "holds", (True, False): "smaller", (False, False): "fails", (False, True): "undecided"}[above, reaches]


def _verdict(decisions: list[str]) -> str:
    tested = [d for d in decisions if d not in ("untestable", "undecided")]
    if not tested:
        return "untestable"
    if all(d == "holds" for d in decisions):
        return "yes"
    return "no" if all(d == "fails" for d in tested) else "partly"


def _check(part: dict, effect: tuple[float, float, float] | None) -> None:
    """The part's effect and decision as recomputed (None: untestable by its own preconditions)."""
    if effect is None or not all(c["held"] for c in part["conditions"]):
        assert part["decision"] == "untestable"
        return
    shipped = part["effect"]
    assert (shipped["estimate"], shipped["low"], shipped["high"]) == pytest.approx(effect, abs=1e-9)
    assert part["decision"] == _decide(part, effect)
    assert f"reaches {part['null'] + part['margin']:g}" in part["rule"]  # the printed rule is the checked one


@pytest.fixture(params=ROWS, ids=[p.stem for p in ROWS])
def row(request) -> dict:
    return json.loads(request.param.read_text())


def test_endpoints_and_fits_come_from_the_shipped_logs(row):
    for arm, record in row["arms"].items():
        for name, final, fitted in zip(record["logs"], record["final"], record["fitted"]):
            end = _end(_log(row, name))
            assert final == pytest.approx(end.tolist(), abs=1e-12)
            assert fitted == bool(end[record["supervised"]].min() >= FIT)
            assert len(_log(row, name)[-1]["accuracy"]) == row["scale"]["n"]


def _fitted_means(row: dict, arm: str, positions: list[int]) -> list[float]:
    record = row["arms"][arm]
    return [float(np.mean(_end(_log(row, name))[positions])) for name, fitted in zip(record["logs"], record["fitted"]) if fitted]


def test_effects_and_decisions_recompute(row):
    key, parts = row["finding"], row["parts"]
    for part in parts:
        if "values" in part:  # an extrapolation comparison: arm A minus arm B over the runs that fit
            better, worse = list(part["values"])
            values = {arm: _fitted_means(row, arm, part["positions"]) for arm in (better, worse)}
            for arm in (better, worse):
                assert values[arm] == pytest.approx(part["values"][arm], abs=1e-12)
            enough = all(len(v) >= 4 for v in values.values())
            assert part["conditions"][0]["held"] == enough
            _check(part, _welch(values[better], values[worse]) if enough else None)
    if key == "R0":
        fitted = [f for record in row["arms"].values() for f in record["fitted"]]
        _check(parts[0], _clopper_pearson(sum(fitted), len(fitted)))
    if key == "R2":
        pretrained = row["numbers"]["pretrained"]
        for part, kind in zip(parts[:2], ("association", "manipulation")):
            _check(part, None if pretrained is None else
                   _student([pretrained["pretrained"][kind] - t[kind] for t in pretrained["random"]]))
        models = row["numbers"]["models"]
        grown = sum(m["association"] + m["manipulation"] > 0 for m in models)
        _check(parts[2], _clopper_pearson(grown, len(models)) if models else None)
    if key == "R3":
        lines = {}
        for m in row["numbers"]["models"]:
            depths = [d for d, layer in enumerate(m["resolution"]) if layer is not None]
            layers = [m["resolution"][d] for d in depths]
            if len(depths) >= 5 and len(set(layers)) > 1:
                slope, intercept = np.polyfit(depths, layers, 1)
                residual = np.sum((np.array(layers) - (slope * np.array(depths) + intercept)) ** 2)
                r2 = 1 - residual / np.sum((np.array(layers) - np.mean(layers)) ** 2)
                assert (m["slope"], m["r2"]) == pytest.approx((slope, r2), abs=1e-9)
                lines.setdefault("ALBERT" if m["arm"].startswith("albert") else "BERT", []).append(m)
        slopes = [m["slope"] for family in lines.values() for m in family]
        _check(parts[0], _student(slopes) if len(slopes) >= 4 else None)
        both = all(len(lines.get(f, [])) >= 4 for f in ("ALBERT", "BERT"))
        _check(parts[1], _welch([m["r2"] for m in lines["ALBERT"]], [m["r2"] for m in lines["BERT"]]) if both else None)
    if key == "R4":
        level = 0.5 + 0.25 * 0.5  # a quarter of the way from chance to 1
        n = row["scale"]["n"]
        middle = list(range(max(1, n // 2 - 1), n - 1))
        left = first = 0
        for name in row["arms"]["shortcut"]["logs"]:
            log = _log(row, name)
            reached = [next((r["samples"] for r in log if r["accuracy"][k] >= level), math.inf) for k in range(n)]
            if reached[-1] < math.inf:
                left += 1
                first += reached[-1] < np.median([reached[k] for k in middle])
        _check(parts[0], _clopper_pearson(first, left) if left >= 4 else None)
    assert row["verdict"] == _verdict([p["decision"] for p in parts])


def test_the_table_shows_every_row_as_shipped(row):
    table = (DOCS / "replication.md").read_text()
    assert f"| [{row['finding']}](#{row['finding'].lower()})" in table
    line = next(line for line in table.splitlines() if line.startswith(f"| [{row['finding']}]"))
    assert line.endswith(f"**{row['verdict']}** |")
    for part in row["parts"]:
        assert part["claim"] in table and part["rule"] in table
