"""``python -m toppax.tools.flops MODEL [--img-size N] [--paper | --keep R --layers 5,10,15]``."""
from toppax.tools.flops import main

main()
