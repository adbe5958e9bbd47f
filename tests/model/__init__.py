"""The xLSTM-7B model: forward and gradients, safetensors checkpoints, generation."""
