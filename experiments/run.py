"""Entry point: ``python experiments/run.py fit|validate|test|predict [--config FILE] [--key value ...]``.

With no config this runs the embedded default: the synthetic task, a small GPT-2 trained from scratch
on CPU, through CoT, the latent curriculum and Dropout-GRPO.
"""
from lightning_latent.cli import main

if __name__ == "__main__":
    main()
