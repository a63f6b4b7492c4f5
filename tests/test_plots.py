"""The benches' figures (bench/plots.py): drawn from the tables the benches write, so a figure
shows exactly its table's numbers, and a table whose columns change breaks its figure here."""

from __future__ import annotations

import shutil

import pytest

from bench import plots

STRATEGIES = """# Strategy benchmark

| row | workers | frames | latent frames | tokens | wall s | s/frame | comm s/step | comm MB/step | comm % of step | peak RSS MB/worker: +over load (abs) | max \\|diff\\| vs vanilla |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| exact | 1 | 129 | 33 | 8448 | 20.0 | 0.15 | 0.1 | 0.00 | 1.1 | 466 (873) | 0.00e+00 |
| exact | 2 | 129 | 33 | 8448 | 10.0 | 0.07 | 0.3 | 138.41 | 7.2 | 226 (634) | 0.00e+00 |
| exact | 1 | 257 | 65 | 16640 | 80.0 | 0.3 | 0.3 | 0.00 | 1.1 | 398 (824) | 0.00e+00 |
| exact | 2 | 257 | 65 | 16640 | 50.0 | 0.2 | 1.1 | 272.63 | 6.3 | 229 (644) | 0.00e+00 |
| vanilla | 1 | 129 | 33 | 8448 | 19.0 | 0.15 | n/a | n/a | n/a | 222 (637) | 0.00e+00 |
"""


def test_a_figure_is_its_table(tmp_path):
    doc = tmp_path / "bench-strategies.md"
    doc.write_text(STRATEGIES)
    figures = plots.series(doc)
    time = figures["bench-strategies-time.png"]["wall seconds vs frames (log-log: slope 1 linear, 2 quadratic)"]
    assert time == {"exact, 1 worker": [(129, 20.0), (257, 80.0)], "exact, 2 workers": [(129, 10.0), (257, 50.0)],
                    "vanilla, 1 worker": [(129, 19.0)]}
    memory = figures["bench-strategies-memory.png"]["peak RSS per rank (MB) vs frames"]
    assert memory["exact, 2 workers"] == [(129, 634.0), (257, 644.0)]  # the absolute peak, in parentheses
    speedup = figures["bench-strategies-speedup.png"]["speed-up over 1 worker vs workers"]
    assert speedup == {"exact, 129 frames": [(1, 1.0), (2, 2.0)], "exact, 257 frames": [(1, 1.0), (2, 1.6)]}

    written = plots.draw(doc)
    assert sorted(p.name for p in written) == sorted(figures)
    assert all(p.stat().st_size > 5_000 for p in written)  # a drawn PNG, not an empty canvas
    text = doc.read_text()
    assert text.startswith(STRATEGIES)  # the table stays as the bench wrote it
    assert all(f"]({p.name})" in text for p in written)  # linked from the doc
    plots.draw(doc)  # drawn again: the figures section is replaced, not repeated
    assert doc.read_text().count("<!-- begin figures -->") == 1


def test_a_table_written_under_another_name_is_drawn_by_its_kind(tmp_path):
    """A bench's --output anywhere (python -m bench.quality --output /tmp/q.md) still gets its figures."""
    doc = tmp_path / "q.md"
    doc.write_text(STRATEGIES)
    with pytest.raises(KeyError):
        plots.series(doc)  # the name alone says nothing of the tables
    written = plots.draw(doc, "bench-strategies.md")
    assert sorted(p.name for p in written) == sorted(plots.series(doc, "bench-strategies.md"))
    assert all(p.parent == tmp_path for p in written)


@pytest.mark.parametrize("name", sorted(plots.FIGURES))
def test_every_doc_with_figures_still_has_their_tables(name, tmp_path):
    """The docs as committed: every panel of every figure has data (a bench that renamed a column
    would leave its figure empty or fail here)."""
    doc = tmp_path / name
    shutil.copy(plots.DOCS / name, doc)
    for figure, panels in plots.series(doc).items():
        assert (plots.DOCS / figure).is_file(), f"{figure} is not drawn in docs/: python -m bench.plots"
        for title, lines in panels.items():
            assert lines and all(len(points) >= 1 for points in lines.values()), (figure, title)
