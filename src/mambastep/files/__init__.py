"""What mambastep reads and writes: model checkpoints (checkpoints), its own state and session
files and the safetensors reading and atomic writing behind all of them (formats), and
tokenizers (tokenizer)."""
