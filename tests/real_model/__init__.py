"""The real-model tier (SmolLM2-135M-Instruct); `from real_model.smollm2 import smollm2_dir` in other tests."""
