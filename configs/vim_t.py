"""ViM-T (Tiny) on ImageNet-1k, the official recipe; `top` is ToP fine-tuning.

Train from scratch (DeiT/Vim recipe, 300 epochs; expected top-1 76.1% as the Vim paper,
1.45 GFLOPs):
  python -m toppax.main --config=configs/vim_t.py --workdir=/tmp/vim_t

ToP fine-tuning from the official dense checkpoint (30 epochs, lr 5e-6 at batch 512, wd 1e-8,
drop-path 0; expected: top-1 within about a point of the dense model at 1.29 GFLOPs, paper Table 1):
  python -m toppax.main --config=configs/vim_t.py:top --workdir=/tmp/vim_t_top \
    --config.init_from=/path/to/vim_t_official.pth

Baselines for the study: `:removal` (pruning without alignment) and `:evit` (EViT fused token).
Evaluate: `--mode=eval` (latest checkpoint in --workdir, else `config.init_from`).
Throughput on all local devices (data parallel train step on 1 and all devices):
  python -m toppax.main --config=configs/vim_t.py:bench --mode=bench --workdir=/tmp/bench_vim_t
Other arguments: `res=384` (input size), `folder=DIR` (DIR/train, DIR/val class-per-folder
trees instead of tfds), `data_dir=DIR` (tfds data_dir), `runlocal` (seconds-long smoke run).
"""
from configs import _vim


def get_config(arg=None):
  return _vim.get_config("vim_t", arg)
