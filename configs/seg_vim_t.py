"""UperNet on ViM-T for ADE20K, the official recipe (schedule and arguments: configs/_seg.py).

  python -m toppax.main --config=configs/seg_vim_t.py:folder=/data/ADEChallengeData2016 \\
    --config.init_from=/path/to/official_vim_t.pth --workdir=/tmp/seg_vim_t
"""
from configs import _seg


def get_config(arg=None):
  return _seg.base("upernet_vim_t", arg)
