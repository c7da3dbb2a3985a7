"""Figures and the report, drawn from a results directory the real runner wrote."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from gaia import plots, report
from gaia.experiments.definition import load
from gaia.experiments.reproduce import publish, republish
from gaia.experiments.runner import run
from gaia.results import Paths, RunDir


@pytest.fixture
def run_dir(project: Paths) -> RunDir:
    console = Console(file=io.StringIO())
    return RunDir(run(load("tiny", project.experiments), paths=project, console=console))


def test_figure_is_written_as_png_and_pdf(project: Paths, run_dir: RunDir) -> None:
    written = plots.plot_run(run_dir.path, project)
    assert written == [project.figures / "tiny.png", project.figures / "tiny.pdf"]
    assert written[0].read_bytes().startswith(b"\x89PNG")
    assert written[1].read_bytes().startswith(b"%PDF")


def test_figure_needs_only_the_results_files(project: Paths, run_dir: RunDir) -> None:
    # the definition may change or vanish after the run: the run directory is enough
    (project.experiments / "tiny.yaml").unlink()
    assert all(p.stat().st_size > 0 for p in plots.plot_run(run_dir.path, project))


def test_report_section_compares_paper_and_measured(project: Paths, run_dir: RunDir) -> None:
    path = report.update(run_dir.path, project)
    text = path.read_text()
    assert text.startswith("# GAIA: paper claims vs measurements")
    assert "<!-- gaia:tiny:begin -->" in text and "<!-- gaia:tiny:end -->" in text
    assert f"`results/tiny/{run_dir.path.name}` (complete" in text
    assert run_dir.env()["git"]["commit"] in text
    assert "| claim | paper | measured | measured / paper | verdict | like for like |" in text
    assert "| Floor latency, 1 replica, µs (vs `local-fsync`) | 300 |" in text
    line = next(x for x in text.splitlines() if x.startswith("| fsync costs at least 10x memory"))
    assert "| ≥ 10 |" in line and ("| holds |" in line or "| does not hold |" in line)
    assert "| no (fsync vs memory) |" in line
    dare = next(x for x in text.splitlines() if x.startswith("| DARE latency"))
    assert "not run here: dare: testbed only" in dare and dare.endswith("| not run here | yes |")
    assert "- `dare`: not run here: dare: testbed only" in text
    assert "acknowledged entries are on disk (survive a machine crash): `local-fsync`" in text


def test_report_keeps_other_sections_and_replaces_its_own(project: Paths, run_dir: RunDir) -> None:
    project.figures.mkdir(parents=True)
    other = "<!-- gaia:vm-sync:begin -->\n## vm-sync\nkept\n<!-- gaia:vm-sync:end -->"
    project.report.write_text(f"# GAIA: paper claims vs measurements\n\n{other}\n")
    report.update(run_dir.path, project)
    report.update(run_dir.path, project)
    text = project.report.read_text()
    assert other in text
    assert text.count("<!-- gaia:tiny:begin -->") == 1


def test_publish_and_republish_use_the_latest_run(project: Paths, run_dir: RunDir) -> None:
    outcome = publish(run_dir.path, project)
    assert outcome.experiment == "tiny" and outcome.run_dir == run_dir.path
    assert [o.run_dir for o in republish("all", paths=project)] == [run_dir.path]
    table = report.summary_table(run_dir.path)
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(table)
    assert "fsync costs at least 10x memory" in console.export_text()


def test_republish_skips_runs_that_did_not_complete(project: Paths, run_dir: RunDir) -> None:
    run_dir.set_status("interrupted")
    assert republish("tiny", paths=project) == []
    assert [o.run_dir for o in republish("tiny", run=run_dir.path, paths=project)] == [run_dir.path]
