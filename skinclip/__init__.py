"""SkinCLIP-VL library code shared by the entry points (train, predict, evaluate, demo, converters).

The Hugging Face remote-code files (`configuration_skinclip.py`, `modeling_skinclip.py`) stay at the top level
and self-contained; everything else that is a library lives here, one job per module.
"""
