"""Entry point and configs: flags, clear errors for typos and missing data, every config loads."""
import os
import subprocess
import sys

import pytest

from configs import common, digits, vim_b, vim_s, vim_t
from toppax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "toppax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_a_config_typo_fails_loudly():
  r = _run("--config=configs/digits.py", "--config.lrr=1e-3", "--mode=doctor")
  assert r.returncode != 0
  assert "lrr" in r.stderr and ("not found" in r.stderr or "KeyError" in r.stderr)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  r = _run("--config=configs/vim_t.py:runlocal,folder=/nonexistent/imagenet",
           f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert "DatasetNotFoundError" in r.stderr and "class-per-folder" in r.stderr
  assert "/nonexistent/imagenet/train" in r.stderr


def test_doctor_mode_and_printed_workdir():
  r = _run("--config=configs/digits.py:runlocal", "--mode=doctor")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "backend: cpu" in r.stdout
  assert f"workdir: {main.default_workdir('configs/digits.py:runlocal')}" in r.stdout


def test_default_workdir_names_config_and_args():
  w = main.default_workdir("configs/vim_s.py:top,res=384")
  assert w.endswith(os.path.join("toppax", "vim_s-top-res384"))
  assert main.default_workdir("configs/digits.py").endswith(os.path.join("toppax", "digits"))


def test_parse_arg():
  a = common.parse_arg("top,res=384", top=False, res=224, runlocal=False)
  assert (a.top, a.res, a.runlocal) == (True, 384, False)
  with pytest.raises(ValueError, match="unknown config argument 'tpo'"):
    common.parse_arg("tpo", top=False)


@pytest.mark.parametrize("module,name", [(vim_t, "vim_t"), (vim_s, "vim_s"), (vim_b, "vim_b")])
def test_vim_configs(module, name):
  c = module.get_config()
  assert (c.model.name, c.model.img_size, c.pruning.enabled) == (name, 224, False)
  top = module.get_config("top,res=384")
  assert top.model.img_size == 384 and top.pruning.enabled and top.pruning.alignment
  assert top.pruning.layers == {"vim_t": (10,), "vim_s": (5, 10, 15), "vim_b": (5, 10, 15)}[name]
  assert top.lr == 5e-6 and top.batch_size == 512 and top.weight_decay == 1e-8
  assert module.get_config("removal").pruning.alignment is False
  assert module.get_config("evit").pruning.fused_token is True
  assert module.get_config("bench").bench.devices == (1, 0)
  assert name in (module.__doc__ or "") and "python -m toppax.main" in module.__doc__


def test_digits_config_is_the_embedded_default():
  c = digits.get_config()
  assert c.data.source == "digits" and c.compare == ("dense", "top", "removal")
  assert "python -m toppax.main --config=configs/digits.py" in digits.__doc__
