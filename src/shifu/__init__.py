"""shifu (师父): distill a strong teacher LLM into a small student model, starting from raw text.

    from shifu.config import load_config
    from shifu.pipeline import run_all
    run_all(load_config("configs/demo.yaml"))
"""

__version__ = "0.1.0"
