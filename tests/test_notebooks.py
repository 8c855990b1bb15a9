"""The Colab notebooks run top to bottom on CPU with small settings and are stored clean.

Execution goes through nbclient and an ipykernel kernel (both in the ``test`` extra), in a
temporary working directory, with ``TOPPAX_NOTEBOOK_SMALL=1``. Each notebook writes a small
results JSON there; the checks below read it, so a notebook that runs but computes the wrong
thing still fails.
"""
import json
import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ("quickstart.ipynb", "finetune_pruned.ipynb")


def _load(name):
  with open(REPO / "notebooks" / name) as f:
    return json.load(f)


def _code(nb):
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
  nb = _load(name)
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [], f"{name} cell {i} has stored outputs: clear them"
      assert cell["execution_count"] is None, f"{name} cell {i} has an execution count"
  assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_keeps_the_runtime_jax(name):
  install = _code(_load(name))[0]
  # Skipped where toppax imports; never lets pip resolve (and replace) Colab's jax/jaxlib.
  assert 'find_spec("toppax") is None' in install and '"--no-deps"' in install
  needed = install.split("needed = [", 1)[1].split("]", 1)[0]
  assert '"jax' not in needed and "jaxlib" not in needed


def _execute(name, workdir, monkeypatch):
  nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (test extra)")
  nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (test extra)")
  pytest.importorskip("ipykernel", reason="ipykernel not installed (test extra)")
  # The kernel inherits this environment: small settings, and the checkout importable even
  # where it is not pip-installed.
  monkeypatch.setenv("TOPPAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("TOPPAX_NOTEBOOK_WORKDIR", str(workdir / "runs"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(str(REPO / "notebooks" / name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute()
  return nb


def test_quickstart_runs(tmp_path, monkeypatch):
  _execute("quickstart.ipynb", tmp_path, monkeypatch)
  with open(tmp_path / "quickstart_results.json") as f:
    r = json.load(f)
  assert r["small"] is True and r["img_size"] == 32
  # 8x8 patches + cls = 65 tokens; keep 0.7 three times: ceil(64 * 0.7) = 45, then 31, 21.
  assert r["tokens"] == [65, 45, 31, 21]
  prev = None
  for stage, k in zip(r["positions"], r["tokens"][1:]):
    pos = np.asarray(stage)
    assert pos.shape == (4, k)
    assert (pos == 32).sum(axis=1).tolist() == [1] * 4      # the cls token stays, once
    assert (np.diff(pos, axis=1) > 0).all()                  # spatial order kept
    if prev is not None:
      assert all(set(a) <= set(b) for a, b in zip(pos.tolist(), prev.tolist()))
    prev = pos
  rows = {row["model"]: row for row in r["rows"]}
  assert rows["ToP"]["gflops"] < rows["dense"]["gflops"]
  assert rows["removal"]["gflops"] < rows["ToP"]["gflops"]   # alignment's decay costs a little
  assert all(row["img_per_s"] > 0 for row in rows.values())
  curve = r["flops_curve"]
  assert curve["ToP"][-1] == pytest.approx(curve["dense"])   # keep ratio 1 prunes nothing
  assert rows["ToP"]["gflops"] == pytest.approx(curve["ToP"][curve["keep_ratio"].index(0.7)])
  for png in ("kept_tokens.png", "flops_vs_keep_ratio.png"):
    with open(tmp_path / png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_finetune_runs(tmp_path, monkeypatch):
  _execute("finetune_pruned.ipynb", tmp_path, monkeypatch)
  with open(tmp_path / "finetune_results.json") as f:
    r = json.load(f)
  assert r["small"] is True and r["data"] == "digits"
  # 120 steps from scratch on the digits: measured 94% top-1 on 2 CPU cores.
  assert r["dense_top1"] > 0.8
  loss = [v for _, v in r["pretrain_loss"]]
  assert loss[-1] < loss[0] and np.isfinite(loss).all()
  assert len(r["sweep"]["ToP"]) == len(r["sweep"]["removal"]) == len(r["keep_ratios"])
  for name in ("ToP", "removal"):
    ft = r["finetune"][name]
    steps = [s for s, _ in ft["acc"]]
    assert steps == [0, 10, 20, 30, 40] and len(ft["loss"]) == 40
    # The pruned model starts below the dense one and fine-tuning recovers part of the gap.
    assert ft["acc"][0][1] < r["dense_top1"]
    assert ft["acc"][-1][1] > ft["acc"][0][1] + 0.03
  # Fine-tuning starts from the training-free pruned model of the sweep at the same ratio.
  i = r["keep_ratios"].index(0.5)
  assert r["finetune"]["ToP"]["acc"][0][1] == pytest.approx(r["sweep"]["ToP"][i])
  # 17 tokens (cls at 8) -> 9 -> 5.
  assert [np.asarray(p).shape for p in r["positions"]] == [(4, 9), (4, 5)]
  for name in ("accuracy_vs_keep_ratio.png", "finetune_curves.png",
               "kept_tokens_finetuned.png"):
    assert os.path.getsize(tmp_path / name) > 1000
