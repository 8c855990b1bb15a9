"""PlainMamba-L1 on ImageNet-1k, the official recipe; `top` is ToP fine-tuning.

Train from scratch (plain_mamba_configs/plain_mamba_l1_in1k_300e.py; expected top-1 77.9% as the
PlainMamba paper, 3.0 GFLOPs, 7.55M parameters):
  python -m toppax.main --config=configs/plainmamba_l1.py --workdir=/tmp/plainmamba_l1

ToP fine-tuning from the official dense checkpoint (30 epochs, lr 5e-6 at batch 512, wd 1e-8,
drop-path 0), pruning after layers (3, 9, 15) with keep ratio 0.5: tokens 196 -> 98 -> 49 -> 25,
1.76 GFLOPs with the alignment decay counted (-41.6%; plain removal 1.61):
  python -m toppax.main --config=configs/plainmamba_l1.py:top --workdir=/tmp/plainmamba_l1_top \
    --config.init_from=/path/to/plainmamba_l1_official.pth

The schedule lives in toppax.tools.flops.PLAINMAMBA_TOP_SCHEDULES (docs/flops.md); `:removal` is
the same schedule without alignment. Evaluate: `--mode=eval`; FLOPs: `--mode=flops`; throughput:
`:bench --mode=bench`. Other arguments: `res=384`, `folder=DIR`, `data_dir=DIR`, `runlocal`.
"""
from configs import _plainmamba


def get_config(arg=None):
  return _plainmamba.get_config("plainmamba_l1", arg)
