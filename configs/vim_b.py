"""ViM-B (Base) on ImageNet-1k, the official recipe; `top` is ToP fine-tuning.

Train from scratch (DeiT/Vim recipe, 300 epochs; expected top-1 81.9% as the Vim paper):
  python -m toppax.main --config=configs/vim_b.py --workdir=/tmp/vim_b

ToP fine-tuning from the official dense checkpoint (30 epochs, lr 5e-6 at batch 512, wd 1e-8,
drop-path 0; the paper reports no ViM-B numbers):
  python -m toppax.main --config=configs/vim_b.py:top --workdir=/tmp/vim_b_top \
    --config.init_from=/path/to/vim_b_official.pth

Baselines for the study: `:removal` (pruning without alignment) and `:evit` (EViT fused token).
Evaluate: `--mode=eval` (latest checkpoint in --workdir, else `config.init_from`).
Throughput on all local devices (data parallel train step on 1 and all devices):
  python -m toppax.main --config=configs/vim_b.py:bench --mode=bench --workdir=/tmp/bench_vim_b
Other arguments: `res=384` (input size), `folder=DIR` (DIR/train, DIR/val class-per-folder
trees instead of tfds), `data_dir=DIR` (tfds data_dir), `runlocal` (seconds-long smoke run).
"""
from configs import _vim


def get_config(arg=None):
  return _vim.get_config("vim_b", arg)
