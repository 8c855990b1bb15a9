"""UperNet on PlainMamba-L3 for ADE20K, the official recipe (schedule and arguments: configs/_seg.py).

  python -m toppax.main --config=configs/seg_plainmamba_l3.py:folder=/data/ADEChallengeData2016 \\
    --config.init_from=/path/to/official_plainmamba_l3.pth --workdir=/tmp/seg_plainmamba_l3
"""
from configs import _seg


def get_config(arg=None):
  return _seg.base("upernet_plainmamba_l3", arg)
