"""The report is one self-contained page: it opens offline in a real browser, every section and figure shows, the
attention view switches sentences, figures export as PNG and SVG, and tables read well.  Built from a small random
model, so the analyses take seconds."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from legointerp.checkpoint import Checkpoint, save_checkpoint
from legointerp.cli import main
from legointerp import evaluate
from legointerp.plots import accuracy_figure, training_curves_figure, wilson_interval
from legointerp.report import TABLE_ROWS, analyse, cell, model_report
from legointerp.task import LegoTask, TaskConfig
from tests.conftest import small_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ["Accuracy per chain position", "Training curves", "Attention heads", "Attention patterns",
            "Information percolation", "Activation patching", "Shortcut detection"]
SENTENCES = 3
DEVELOPER_FOLDER = "/home/someone/runs"
N = 6

# After the page's own scripts: errors, headings, figures (drawn, legend inside), PNG/SVG export, and the attention
# view before and after choosing the last sentence, written into the DOM where --dump-dom reads it.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
const consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.map(String).join(' ')); consoleError(...args); };
const pause = ms => new Promise(done => setTimeout(done, ms));
async function probe() {
  const result = {errors: window.__errors};
  result.headings = [...document.querySelectorAll('h2')].map(h => ({text: h.textContent,
    visible: h.getBoundingClientRect().height > 0 && getComputedStyle(h).visibility === 'visible'}));
  result.figures = [...document.querySelectorAll('.figure')].map(figure => {
    const plot = figure.querySelector('div.js-plotly-plot');
    if (!plot) return {drawn: false};
    const box = plot.getBoundingClientRect(), legend = plot.querySelector('.legend');
    const inside = !legend || ((b) => b.top >= box.top - 1 && b.bottom <= box.bottom + 1 && b.right <= box.right + 1)(legend.getBoundingClientRect());
    return {id: plot.id, drawn: box.height > 0 && plot.querySelectorAll('.main-svg').length > 0, legendInside: inside};
  });
  result.plots = document.querySelectorAll('.js-plotly-plot').length;
  const image = (plot, format) => Plotly.toImage(plot, {format: format}).then(url => url.startsWith('data:image/' + format), () => false);
  const plots = [...document.querySelectorAll('div.js-plotly-plot')];
  result.exports = await Promise.all(plots.flatMap(plot => [image(plot, 'png'), image(plot, 'svg')]));
  const frame = document.getElementById('attention-frame'), select = document.querySelector('select.sentence');
  const widget = () => { const view = frame.contentDocument.getElementById('widget');
                         return {mounted: view ? view.textContent : '', source: frame.srcdoc.slice(-300)}; };
  result.views = [widget()];
  result.frameHeight = frame.getBoundingClientRect().height;
  const loaded = new Promise(done => frame.addEventListener('load', done, {once: true}));
  select.value = String(select.options.length - 1);
  select.dispatchEvent(new Event('change'));
  await loaded;
  await pause(1500);
  result.views.push(widget());
  const out = document.createElement('pre'); out.id = '__probe';
  out.textContent = JSON.stringify(result); document.body.appendChild(out);
}
window.addEventListener('load', () => setTimeout(probe, 1500));
</script>"""


def training_log(n: int) -> list[dict]:
    """Rows as train.py writes them: a curriculum growing to n clauses, and a dip of #0 under 0.4 on the way."""
    rows = []
    for i, step in enumerate(range(50, 650, 50)):
        accuracy = [min(1.0, 0.5 + 0.05 * i - 0.02 * k) for k in range(n)]
        accuracy[0] = 0.3 if i == 3 else accuracy[0]
        rows.append({"step": step, "samples": 128 * step, "elapsed_s": step / 5, "loss": 1.0 / step,
                     "longest_chain": min(n, 2 + i // 2), "accuracy": accuracy})
    return rows


@pytest.fixture(scope="module")
def inputs():
    task = LegoTask(TaskConfig(n=N))
    model = small_model(task, n_layers=2, n_heads=2)
    checkpoint = Checkpoint(model.cfg, task.config, model.state_dict(), accuracy=[0.5] * N,
                            provenance={"command": f"legointerp train --n {N} --out {DEVELOPER_FOLDER}/x.pt"})
    return model, task, checkpoint, evaluate.test_batch(task, 60, seed=0), training_log(N)


@pytest.fixture(scope="module")
def analyses(inputs):
    model, task, checkpoint, batch, log = inputs
    return analyse(model, task, checkpoint, batch, log, head_samples=30, patch_samples=2, sentences=SENTENCES)


@pytest.fixture(scope="module")
def page(inputs, analyses):
    return model_report(name="x.pt", checkpoint=inputs[2], log=inputs[4], analyses=analyses)


def visible_text(page: str) -> str:
    return re.sub(r"<script.*?</script>", "", page, flags=re.S)


def test_page_is_self_contained_with_every_section_once(page):
    assert not re.search(r"<script[^>]+src=[\"']https?://", page)
    assert not re.search(r"<link[^>]+href=[\"']https?://", page)
    headings = re.findall(r"<h2[^>]*>(.*?)</h2>", page)
    assert [h.split(":")[0] for h in headings] == SECTIONS
    ids = re.findall(r"""\bid=["']([^"']+)["']""", visible_text(page))
    assert len(ids) == len(set(ids)), "an id used twice lets a figure draw into the wrong element"


def test_header_shows_the_command_without_developer_paths_or_backticks(page):
    header = visible_text(page).split("<nav>")[0]
    assert DEVELOPER_FOLDER not in page
    assert "--out x.pt" in header
    assert "`" not in header


def test_tables_are_short_and_numbers_read_well(page, analyses):
    text = visible_text(page)
    heads_section = text.split("id='attention-heads'")[1].split("<h2")[0]
    assert heads_section.count("<tr") == min(TABLE_ROWS, len(analyses.heads.to_frame())) + 1  # header + strongest heads
    assert "-0.000" not in text
    assert [cell(-0.0004), cell(800000.0), cell(11.0), cell(None), cell(np.float32("nan")), cell(np.True_), cell(0.12345)] == \
           ["0.000", "800,000", "11", "–", "–", "yes", "0.123"]


def test_attention_views_store_circuitsvis_once(page, analyses):
    payload = json.loads(re.search(r"<script type='application/json' id='attention-views'>(.*?)</script>", page, re.S).group(1))
    assert len(payload["views"]) == len(analyses.views.sentences) == SENTENCES
    assert all(len(view) < len(payload["shared"]) / 10 for view in payload["views"])
    assert "circuits-vis-" not in payload["shared"] and "/>" not in payload["shared"].split("<script")[0]
    assert page.count("<option") == SENTENCES


def test_accuracy_figure_shows_intervals_and_recorded_bars_beside_not_over_them():
    accuracy, counts = np.array([1.0, 0.97, 0.5]), np.array([400, 400, 400])
    figure = accuracy_figure(accuracy.tolist(), counts.tolist(), recorded=[1.0, 0.99, 0.6])
    low, high = wilson_interval(accuracy, counts)
    assert np.all((0 <= low) & (low <= accuracy) & (accuracy <= high) & (high <= 1))
    assert high[1] - low[1] > high[0] - low[0] > 0  # an interval at 1.0 still has width, and it grows away from it
    assert "400" in figure.layout.title.text
    assert [trace.type for trace in figure.data] == ["bar", "bar"] and figure.layout.barmode == "group"
    assert figure.data[0].error_y.array is not None


def test_training_curves_show_dips_every_position_and_the_curriculum():
    log = training_log(N)
    figure = training_curves_figure(log, supervised=[0, 1, N - 1])
    lowest = min(min(row["accuracy"]) for row in log)
    assert figure.layout.yaxis.range[0] < lowest
    names = [trace.name for trace in figure.data]
    assert names[:N] == [f"#{k}" + ("" if k in (0, 1, N - 1) else " (unsupervised)") for k in range(N)]
    curriculum = figure.data[N]
    assert curriculum.yaxis == "y2" and list(curriculum.y) == [row["longest_chain"] for row in log]
    assert figure.layout.yaxis2.range[1] >= N


def test_report_command_writes_the_page_for_a_checkpoint_without_log(tmp_path, inputs):
    _, task, checkpoint, _, _ = inputs
    save_checkpoint(checkpoint, tmp_path / "x.pt")
    out = tmp_path / "report.html"
    assert main(["report", "--ckpt", str(tmp_path / "x.pt"), "--out", str(out), "--samples", "24",
                 "--head-samples", "12", "--patch-samples", "1", "--quiet"]) == 0
    page = out.read_text()
    assert "no training log found" in page.lower() and "legointerp report: x.pt" in page
    assert "figure-training-curves" not in page  # no empty axis: the section says why there is no figure


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs Debian's chromium)")
def test_report_renders_offline_in_chromium_every_section_and_figure(page, tmp_path):
    path = tmp_path / "probe.html"
    path.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
               "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",  # networking off
               "--window-size=1400,1000", "--virtual-time-budget=30000", "--dump-dom", path.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="__probe">(.*?)</pre>', dom, re.S)
    assert found is not None, "the page never finished loading"
    result = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert result["errors"] == [], "\n".join(result["errors"])
    assert [h["text"].split(":")[0] for h in result["headings"]] == SECTIONS
    assert all(h["visible"] for h in result["headings"])
    assert len(result["figures"]) == page.count('class="figure"') == result["plots"] == 6
    assert all(f["drawn"] for f in result["figures"]), result["figures"]
    assert all(f["legendInside"] for f in result["figures"]), result["figures"]
    assert result["exports"] == [True] * 12
    first, last = result["views"]
    assert "Head Selector" in first["mounted"] and "Head Selector" in last["mounted"]  # the widget mounted both times
    assert first["source"] != last["source"]  # on another sentence
    assert result["frameHeight"] > 300  # the frame grew to its widget


def test_shortcut_section_points_at_a_head_counting_the_signs(inputs, analyses):
    from dataclasses import replace

    from legointerp import zoo
    from legointerp.heads import classify_heads

    built = zoo.build("counter-only-last")
    heads = classify_heads(built.model, evaluate.test_batch(built.task, 24, seed=3), built.task, ablate=False)
    page = model_report(name="x.pt", checkpoint=inputs[2], log=inputs[4], analyses=replace(analyses, heads=heads))
    shortcut = visible_text(page).split("id='shortcut-detection")[1].split("<h2")[0]
    assert "L1H3 at the last variable" in shortcut
    assert "No head is labelled operators" in visible_text(model_report(name="x.pt", checkpoint=inputs[2], log=inputs[4],
                                                                        analyses=analyses))


def test_a_table_column_of_sentences_keeps_a_readable_width():
    import pandas as pd

    from legointerp.report import STYLE, frame_html

    flag = "ablation costs 0.24 (resample) but the attention matches no kind"
    page = frame_html(pd.DataFrame({"head": [0, 1], "label": ["diffuse", "structured"], "flag": [flag, ""]}))
    cells = re.findall(r"<td class='([^']*)'>([^<]*)</td>", page)
    assert (("wide", flag) in cells and ("", "diffuse") in cells and ("num", "0") in cells)
    assert re.search(r"td\.wide \{ min-width: \d+em", STYLE)
