"""PlainMamba-L3 on ImageNet-1k, the official recipe; `top` is ToP fine-tuning.

Train from scratch (plain_mamba_configs/plain_mamba_l3_in1k_300e.py; expected top-1 82.3% as the
PlainMamba paper, 14.4 GFLOPs, 51.0M parameters):
  python -m toppax.main --config=configs/plainmamba_l3.py --workdir=/tmp/plainmamba_l3

ToP fine-tuning from the official dense checkpoint (30 epochs, lr 5e-6 at batch 512, wd 1e-8,
drop-path 0), pruning after layers (8, 15, 22) with keep ratio 0.6: tokens 196 -> 118 -> 71 -> 43,
8.42 GFLOPs with the alignment decay counted (-41.7%; plain removal 8.01); the ToP paper reports
81.7% top-1 at 8.4 GFLOPs (-41.6%):
  python -m toppax.main --config=configs/plainmamba_l3.py:top --workdir=/tmp/plainmamba_l3_top \
    --config.init_from=/path/to/plainmamba_l3_official.pth

The schedule lives in toppax.tools.flops.PLAINMAMBA_TOP_SCHEDULES (docs/flops.md); `:removal` is
the same schedule without alignment. Evaluate: `--mode=eval`; FLOPs: `--mode=flops`; throughput:
`:bench --mode=bench`. Other arguments: `res=384`, `folder=DIR`, `data_dir=DIR`, `runlocal`.
"""
from configs import _plainmamba


def get_config(arg=None):
  return _plainmamba.get_config("plainmamba_l3", arg)
