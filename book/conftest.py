"""pytest run from inside book/: collect each notebook once.

The book holds no tests of its own; its pages are the notebooks, which the repository's `pytest` runs
through nbval from notebooks/. Under book/ they are reachable twice more: through book/notebooks (a
committed symlink to ../notebooks) and as the copies a `jupyter-book build` leaves in book/_build
(html/_sources, jupyter_execute, ...). So book/_build is never collected, and book/notebooks only when
the real notebooks/ folder is not part of the same run (`pytest` in book/ tests each notebook once;
`pytest .` at the root does not test them twice).
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent

collect_ignore = ["_build"]


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if collection_path == HERE / "notebooks":
        real = collection_path.resolve()
        targets = [Path(arg.split("::")[0]).resolve() for arg in config.args]
        if any(real == target or target in real.parents for target in targets):
            return True  # the real folder is collected in this run already
    return None
