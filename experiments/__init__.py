"""
The experiments: scripts that use the library (the top-level files) to test the papers' claims and to
measure it; the library never imports them. Run each from the repository root as a module:

    python -m experiments.claims table ...    the papers' Table 2 on real data (table.py, runs.py)
    python -m experiments.claims noise ...    the LIFT / RoCoFT / LoRA-SB / HyperAdapt claims (perturb.py)
    python -m experiments.analyze BASE TUNED  what a fine-tuned model changed, per matrix
    python -m experiments.bench methods       speed and memory, side by side
    python -m experiments.memory              the training-memory plan per method and GPU
"""
