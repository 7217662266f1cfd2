"""Our decoders (GPT-2 and Llama families) and how checkpoints become them."""
