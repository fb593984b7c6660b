"""The book runner (`python -m vitdiff.book run`): its dry run lists every recipe and notebook, --only
filters, bad arguments are clear errors, and a failing notebook is reported while the run goes on."""

from __future__ import annotations

import nbformat
import pytest

from vitdiff import book
from vitdiff.pretrained import RECIPES

NOTEBOOKS = sorted(p.name for p in book.NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = book.main(["run", *argv])
    return code, capsys.readouterr().out


def test_dry_run_lists_every_recipe_and_notebook(capsys):
    assert NOTEBOOKS, f"no notebooks found in {book.NOTEBOOK_DIR}"
    code, out = _run(capsys, "--budget", "full", "--dry-run")
    assert code == 0
    assert "budget=full" in out and "VITDIFF_BUDGET=full" in out and "device=" in out
    for name, r in RECIPES.items():
        line = next((line for line in out.splitlines() if line.split()[:1] == [name]), None)
        assert line is not None, f"recipe {name} missing from the dry run"
        assert f"{r.train['steps']} steps" in line
    positions = [out.index(name) for name in NOTEBOOKS]
    assert positions == sorted(positions), "notebooks are listed in chapter order"
    assert "nothing was run" in out


def test_quick_dry_run_does_not_train_unless_asked(capsys):
    _, out = _run(capsys, "--budget", "quick", "--dry-run")
    assert "not trained" in out and not any(f"{name} " in out for name in RECIPES)
    _, out = _run(capsys, "--budget", "quick", "--dry-run", "--checkpoints")
    assert all(name in out for name in RECIPES)
    _, out = _run(capsys, "--budget", "full", "--dry-run", "--skip-checkpoints")
    assert "not trained" in out and not any(f"{name} " in out for name in RECIPES)


def test_only_filters_notebooks_and_recipes(capsys):
    code, out = _run(capsys, "--budget", "full", "--dry-run", "--only", "4,05")
    assert code == 0
    assert [n for n in NOTEBOOKS if n in out] == [n for n in NOTEBOOKS if n[:2] in ("04", "05")]
    assert [n for n in RECIPES if f"{n} " in out] == [n for n, r in RECIPES.items() if r.chapter in ("04", "05")]


@pytest.mark.parametrize("argv, message", [
    (["--budget", "medium"], "invalid choice: 'medium'"),
    (["--dry-run"], "--budget"),
    (["--budget", "quick", "--only", "99"], "matches no notebook"),
    (["--budget", "quick", "--timeout", "0"], "--timeout must be positive"),
    (["--budget", "full", "--checkpoints", "--skip-checkpoints"], "not allowed with"),
])
def test_bad_arguments_are_clear_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        book.main(["run", *argv])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_headline_flattens_numeric_leaves():
    metrics = {"fd": 12.345678, "guidance": {"3.0": {"accuracy": 0.9}}, "pair": [1, 2], "device": "cuda",
               "ok": True, "eval_seconds": 3.0}
    assert book.headline(metrics) == "fd=12.35 guidance.3.0.accuracy=0.9 pair[0]=1 pair[1]=2"
    assert "no metrics" in book.headline({})


def _notebook(path, source: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_reports_a_failing_notebook_and_continues(capsys, tmp_path, monkeypatch):
    """Two tiny notebooks (one kernel start each): the failure is reported, the next one still runs."""
    monkeypatch.setenv("VITDIFF_DATA", str(tmp_path / "data"))
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_bad.ipynb", "raise ValueError('boom')")
    _notebook(folder / "02_ok.ipynb",
              "import os, pathlib\nprint(os.environ['VITDIFF_BUDGET'], pathlib.Path.cwd().name)")
    code, out = _run(capsys, "--budget", "quick", "--notebook-dir", str(folder), "--timeout", "120")
    assert code == 1
    assert "FAILED 01_bad.ipynb: ValueError: boom" in out
    ok = nbformat.read(folder / "02_ok.ipynb", as_version=4)
    assert ok.cells[0].outputs[0]["text"].strip() == "quick notebooks", "budget in env, cwd = notebook folder"
    assert not nbformat.read(folder / "01_bad.ipynb", as_version=4).cells[0].outputs, "a failure is not written back"
    assert (tmp_path / "data" / "book-failed" / "01_bad.ipynb").is_file()
    table = [line.split() for line in out.splitlines()]
    assert [row[0] for row in table if row[-1:] == ["ok"]] == ["02_ok.ipynb"]
    assert any(row[:1] == ["total"] for row in table)


def test_jobs_run_notebooks_side_by_side_in_their_own_processes(capsys, tmp_path, monkeypatch):
    """--jobs 2: both notebooks run at once, each in a subprocess; the failure is reported with its log."""
    monkeypatch.setenv("VITDIFF_DATA", str(tmp_path / "data"))
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_bad.ipynb", "raise ValueError('boom')")
    _notebook(folder / "02_ok.ipynb", "import os\nprint(os.environ['VITDIFF_BUDGET'])")
    code, out = _run(capsys, "--budget", "quick", "--jobs", "2", "--notebook-dir", str(folder), "--timeout", "120")
    assert code == 1
    assert "2 at a time" in out
    failed = next(line for line in out.splitlines() if line.startswith("FAILED 01_bad.ipynb"))
    assert "ValueError" in failed and "boom" in failed and "book-logs" in failed
    assert (tmp_path / "data" / "book-logs" / "01_bad.log").is_file()
    ok = nbformat.read(folder / "02_ok.ipynb", as_version=4)
    assert ok.cells[0].outputs[0]["text"].strip() == "quick"
    assert not nbformat.read(folder / "01_bad.ipynb", as_version=4).cells[0].outputs


@pytest.mark.parametrize("argv, message", [
    (["--budget", "quick", "--jobs", "0"], "--jobs must be at least 1"),
    (["--budget", "full", "--recipes", "nope", "--dry-run"], "no book checkpoint recipe 'nope'"),
])
def test_bad_parallel_arguments_are_clear_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        book.main(["run", *argv])
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_recipes_option_lists_candidates_and_their_steps(capsys):
    from vitdiff.pretrained import CANDIDATES

    name = next(iter(CANDIDATES))
    code, out = _run(capsys, "--budget", "quick", "--dry-run", "--recipes", f"fmnist_vae,{name}")
    assert code == 0
    assert f"{CANDIDATES[name].train['steps']:5d} steps" in out and "train and evaluate 2 recipes" in out
