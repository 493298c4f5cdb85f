"""Tools that make new checkpoints from old ones (quantize, and the tokenizer a GGUF file carries;
prune; distill) and measure what that cost (evaluate).

The option values live here, free of torch, so that the CLI can list them without loading it."""

QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "int8", "int4")  # see quantize.py's docstring
FLOAT_TYPES = ("f32", "f16", "bf16")  # no quantization: a float GGUF file, as llama.cpp's converter writes
EMBEDDING_TYPES = ("f16", "q8_0", "same")  # for the token embedding and an untied LM head
