"""Runs a notebook's code cells top to bottom in one namespace, without a
Jupyter server or kernel (GPU machines may have neither), saving every
matplotlib figure a cell leaves open. The equivalent of nbclient for our
notebooks, which use only print and matplotlib."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path


def run_notebook(path: Path, figure_dir: Path) -> tuple[str, list[Path]]:
    """Returns (everything the cells printed, the figure files written). A
    failing cell raises with the cell's index and source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.show = lambda *args, **kwargs: None  # figures are saved below instead
    cells = [cell for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]
    namespace: dict = {"__name__": "__main__"}
    printed = io.StringIO()
    figures: list[Path] = []
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)
        except Exception as exc:
            raise RuntimeError(f"{path.name} cell {index} failed: {exc!r}\n{source}") from exc
        for number in plt.get_fignums():
            figure = figure_dir / f"{path.stem}-cell{index}-fig{number}.png"
            plt.figure(number).savefig(figure, dpi=60)
            figures.append(figure)
        plt.close("all")
    return printed.getvalue(), figures
