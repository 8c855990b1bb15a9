"""Entry point and configs: flags, clear errors for typos and missing data, every config loads."""
import os
import subprocess
import sys

import pytest

from configs import cifar10, common, digits, vim_b, vim_s, vim_t
from toppax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300, cwd=ROOT, pythonpath=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=pythonpath + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "toppax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _printed_workdir(stdout):
  return [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("workdir: ")]


def test_a_config_typo_fails_loudly():
  r = _run("--config=configs/digits.py", "--config.lrr=1e-3", "--mode=doctor")
  assert r.returncode != 0
  assert "unknown config field 'lrr'" in r.stderr and 'Did you mean "lr"' in r.stderr
  assert "Traceback" not in r.stderr


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  r = _run("--config=configs/vim_t.py:runlocal,folder=/nonexistent/imagenet",
           f"--workdir={tmp_path}")
  assert r.returncode == 2
  assert "error: " in r.stderr and "class-per-folder" in r.stderr and "Traceback" not in r.stderr
  assert "/nonexistent/imagenet/train" in r.stderr


def test_doctor_mode_and_printed_workdir():
  r = _run("--config=configs/digits.py:runlocal", "--mode=doctor")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "backend: cpu" in r.stdout
  # The args appear once: `digits-runlocal`, not `digits-runlocalrunlocal`.
  assert _printed_workdir(r.stdout) == [main.default_workdir("configs/digits.py:runlocal")]
  assert _printed_workdir(r.stdout)[0].endswith(os.path.join("toppax", "digits-runlocal"))


def test_missing_config_file_is_a_short_error():
  r = _run("--config=configs/nope.py", "--mode=flops")
  assert r.returncode != 0
  assert "no config file 'configs/nope.py'" in r.stderr and "--config=configs/digits.py" in r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 3, r.stderr


def test_unloadable_config_file_is_a_short_error(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import no_such_module_xyz\n")
  r = _run(f"--config={bad}", "--mode=flops")
  assert r.returncode != 0
  assert f"cannot load '{bad}'" in r.stderr and "no_such_module_xyz" in r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 3, r.stderr


def test_default_workdir_names_config_and_args():
  w = main.default_workdir("configs/vim_s.py:top,res=384")
  assert w.endswith(os.path.join("toppax", "vim_s-top-res384"))
  assert main.default_workdir("configs/digits.py").endswith(os.path.join("toppax", "digits"))


def test_config_spec_has_args_once():
  # get_config_filename returns `path:args` in newer ml_collections, `path` in older ones.
  for filename in ("configs/vim_s.py:top,res=384", "configs/vim_s.py"):
    spec = main.config_spec(filename, "configs/vim_s.py:top,res=384")
    assert spec == "configs/vim_s.py:top,res=384"
    assert main.default_workdir(spec).endswith(os.path.join("toppax", "vim_s-top-res384"))
  assert main.config_spec("configs/digits.py", "configs/digits.py") == "configs/digits.py"


def test_default_workdir_reflects_overrides():
  plain = main.default_workdir("configs/digits.py:runlocal")
  assert main.default_workdir("configs/digits.py:runlocal", {}) == plain
  lr = main.default_workdir("configs/digits.py:runlocal", {"lr": 1e-4})
  assert lr.startswith(plain + "-o") and len(lr) == len(plain) + 10
  assert main.default_workdir("configs/digits.py:runlocal", {"lr": 2e-4}) != lr
  two = {"lr": 1e-4, "model.depth": 2}
  assert (main.default_workdir("configs/digits.py:runlocal", two)
          == main.default_workdir("configs/digits.py:runlocal", dict(reversed(two.items()))))


def test_runs_outside_the_repo_and_workdir_has_overrides(tmp_path):
  # No repo root on PYTHONPATH, cwd elsewhere: main finds the `configs` package by itself.
  config = os.path.join(ROOT, "configs", "digits.py")
  r = _run(f"--config={config}:runlocal", "--config.lr=0.0001", "--mode=flops", cwd=tmp_path,
           pythonpath="")
  assert r.returncode == 0, r.stderr[-2000:]
  want = main.default_workdir("configs/digits.py:runlocal", {"lr": 1e-4})
  assert _printed_workdir(r.stdout) == [want] and want != main.default_workdir(
      "configs/digits.py:runlocal")
  assert f"default workdir {want}" in r.stderr


def test_runlocal_keeps_explicit_arguments():
  c = cifar10.get_config("runlocal,ratios=0.3+0.6,seeds=2+3,ft_epochs=2,epochs=4")
  assert c.study.keep_ratios == (0.3, 0.6) and c.study.seeds == (2, 3)
  assert (c.study.finetune_epochs, c.study.finetune_steps) == (2, 0)
  assert (c.num_epochs, c.total_steps) == (4, 0)
  c = cifar10.get_config("runlocal")
  assert (c.study.keep_ratios, c.study.seeds, c.study.finetune_steps) == ((0.5,), (0,), 3)
  assert c.total_steps == 10
  d = digits.get_config("runlocal,epochs=3")
  assert (d.num_epochs, d.total_steps) == (3, 0)
  d = digits.get_config("runlocal")
  assert (d.num_epochs, d.total_steps) == (1, 6)


def test_study_runlocal_rejects_bad_explicit_ratios(tmp_path):
  # The audited command: runlocal used to replace the ratios, so the bad ones went unnoticed.
  r = _run("--config=configs/cifar10.py:runlocal,ratios=0+1.5", "--mode=study",
           f"--workdir={tmp_path}")
  assert r.returncode != 0 and "keep ratio 0.0 is outside (0, 1]" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("arg", ["top,evit", "top,removal", "removal,evit", "top,removal,evit"])
def test_vim_variants_exclude_each_other(arg):
  with pytest.raises(ValueError, match="give at most one of top, removal, evit"):
    vim_s.get_config(arg)


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


def test_per_layer_keep_ratios_from_the_command_line():
  r = _run("--config=configs/vim_s.py:top", "--config.pruning.keep_ratios=(0.9,0.7,0.5)",
           "--mode=flops")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "keep (0.9, 0.7, 0.5)" in r.stdout and "| block 24 | 63 |" in r.stdout
  # A uniform ratio stays a float field on every config, PlainMamba included.
  for module in (vim_s, cifar10):
    assert isinstance(module.get_config().pruning.keep_ratio, float)
  from configs import plainmamba_l3
  c = plainmamba_l3.get_config("top")
  assert c.pruning.keep_ratio == 0.6 and c.pruning.keep_ratios == ()


def test_segmentation_main_job_runs_end_to_end(tmp_path):
  """The README's segmentation main job (its smoke size): trains, prints the comparison table,
  writes the picture."""
  r = _run("--config=configs/seg_digits.py:runlocal", f"--workdir={tmp_path}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| dense | 64 |" in r.stdout and "| top | 64 -> 45 -> 32 |" in r.stdout
  assert "| removal | 64 -> 45 -> 32 |" in r.stdout
  for name in ("compare.md", "compare.json", "segmentation.png", "metrics.jsonl"):
    assert os.path.getsize(tmp_path / name) > 0, name
