"""report.html: the Markdown report rendered, with its figures inlined."""

import base64

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vitzoo.eval.html import write_report  # noqa: E402


def test_report_html_inlines_figures_and_renders_tables(tmp_path):
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    figure.savefig(tmp_path / "plot.png")
    plt.close(figure)
    text = "# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![plot](plot.png)\n\n![missing](nowhere.png)\n"
    assert write_report(tmp_path, text) == tmp_path / "report.md" and (tmp_path / "report.md").read_text() == text
    page = (tmp_path / "report.html").read_text()
    assert "<title>Title</title>" in page and "<td>1</td>" in page and "<th>a</th>" in page
    inlined = base64.b64encode((tmp_path / "plot.png").read_bytes()).decode()
    assert f"data:image/png;base64,{inlined}" in page  # self-contained: the figure's bytes are in the page
    assert 'src="nowhere.png"' in page  # a figure that is not there stays a link
