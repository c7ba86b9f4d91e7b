"""The PositiveCoOp paper's analyses (a layer around the method): the Table 1 sweep, the paper-vs-code
switches, zero-shot prompts, Table 2's negation similarities and Fig. 1's similarity maps.
`python -m clipmlr.analysis --help` lists the commands.

    commands.py     the command line: sweep, zeroshot, negation, maps
    sweep.py        heads x label fractions x seeds, each trained by run.py in its own process; Table 1
                    and a plot
    switches.py     where the paper, the authors' code and clipmlr differ: each choice switched alone, its mAP
    similarity.py   cosines of dense image features and prompts (Table 2, zero-shot scores, Fig. 1 maps)
    templates.py    the 85 prompt templates of the supplement, and COCO's class names
    plots.py        PNG line plots and heat-map overlays with Pillow alone
"""
from .commands import main

__all__ = ["main"]
